import NIOCore

/// What one websocket connection has to send, on its way to NIO: frames are handed over whole,
/// only while NIO takes them (it then holds about a send buffer), and what NIO does not hold
/// waits in the `Outbox`, with at most one pong beside it. How long a backed-up client may stay
/// so is the handler's to decide; this only says how much waits.
///
/// It makes no call into NIO: the handler writes what it takes from here. A write or a flush
/// can call back into the handler (a failed flush closes the connection and fires
/// `channelInactive`; one that drains below the low watermark fires
/// `channelWritabilityChanged`), and a mutating method of this struct would hold exclusive
/// access to it across that call: Swift stops the process on the second access.
///
/// Confined to the connection's event loop, like the handler that holds it.
struct OutboundWriter {
    private var outbox = Outbox()
    /// At most one pong waits while the connection is over its send buffer: a newer ping
    /// replaces it (RFC 6455 §5.5.3 allows answering only the latest).
    private var pendingPong: ByteBuffer?

    /// Bytes the outbox may collect in one tick before they are handed to NIO early.
    static let handOverAt = 256 << 10

    /// Bytes of frames waiting in the outbox (what a slow consumer's close drops).
    var outboxBytes: Int { self.outbox.bytes }
    /// Whether frames wait in the outbox.
    var hasFramesWaiting: Bool { !self.outbox.isEmpty }
    /// Whether anything waits for NIO to take it.
    var isBackedUp: Bool { !self.outbox.isEmpty || self.pendingPong != nil }

    /// Bytes waiting to reach the client: held by NIO and here.
    func queuedBytes(on connection: Channel) -> Int {
        let buffered = (try? connection.syncOptions?.getOption(.bufferedWritableBytes)) ?? 0
        return buffered + self.outbox.bytes + (self.pendingPong?.readableBytes ?? 0)
    }

    /// Queues a frame; true when a big tick's share should go to NIO at once (`handOver`), so
    /// that writability (and the caps that hang on it) applies within the tick too.
    @inline(__always)
    mutating func append(_ frame: ByteBuffer, allocator: ByteBufferAllocator) -> Bool {
        self.outbox.append(frame, allocator: allocator)
        return self.outbox.bytes >= Self.handOverAt
    }

    /// Queues the answer to a ping. Every ping is answered while the client reads (through the
    /// outbox, so tiny pongs are copied together and counted); one that does not read gets its
    /// send buffer's worth, then only its latest ping answered.
    mutating func appendPong(_ pong: ByteBuffer, writable: Bool, allocator: ByteBufferAllocator) {
        if self.pendingPong == nil, writable {
            self.outbox.append(pong, allocator: allocator)
        } else {
            self.pendingPong = pong
        }
    }

    /// The waiting pong, to write now.
    mutating func takePong() -> ByteBuffer? {
        defer { self.pendingPong = nil }
        return self.pendingPong
    }

    /// The oldest waiting frame, to write now.
    mutating func popFrame() -> ByteBuffer? { self.outbox.popFirst() }

    /// Drops everything waiting.
    mutating func removeAll() {
        self.outbox.removeAll()
        self.pendingPong = nil
    }
}
