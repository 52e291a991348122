import NIOCore

/// What one websocket connection has to send, on its way to NIO: frames are handed over whole,
/// only while NIO takes them (it then holds about a send buffer), and what NIO does not hold
/// waits in the `Outbox`, with at most one pong beside it. How long a backed-up client may stay
/// so is the handler's to decide; this only says how much waits.
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

    /// Queues a frame; a big tick's share goes to NIO at once, so writability (and the caps
    /// that hang on it) applies within the tick too.
    @inline(__always)
    mutating func append(_ frame: ByteBuffer, context: ChannelHandlerContext) {
        self.outbox.append(frame, allocator: context.channel.allocator)
        if self.outbox.bytes >= Self.handOverAt {
            self.handOver(context: context)
        }
    }

    /// Queues the answer to a ping. Every ping is answered while the client reads (through the
    /// outbox, so tiny pongs are copied together and counted); one that does not read gets its
    /// send buffer's worth, then only its latest ping answered.
    mutating func appendPong(_ pong: ByteBuffer, context: ChannelHandlerContext) {
        if self.pendingPong == nil, context.channel.isWritable {
            self.outbox.append(pong, allocator: context.channel.allocator)
        } else {
            self.pendingPong = pong
        }
    }

    /// Hands NIO what it will take (the waiting pong first, then whole frames) and flushes.
    mutating func flush(context: ChannelHandlerContext) {
        if let pong = self.pendingPong, context.channel.isWritable {
            self.pendingPong = nil
            context.write(NIOAny(pong), promise: nil)
        }
        self.handOver(context: context)
        context.flush()
    }

    /// Writes every waiting frame, whatever NIO holds already (before a close frame); drops
    /// the waiting pong. Does not flush.
    mutating func writeAll(context: ChannelHandlerContext) {
        while let frame = self.outbox.popFirst() {
            context.write(NIOAny(frame), promise: nil)
        }
        self.pendingPong = nil
    }

    /// Drops everything waiting.
    mutating func removeAll() {
        self.outbox.removeAll()
        self.pendingPong = nil
    }

    /// Hands NIO whole frames while it takes them.
    private mutating func handOver(context: ChannelHandlerContext) {
        let connection = context.channel
        while connection.isWritable, let frame = self.outbox.popFirst() {
            context.write(NIOAny(frame), promise: nil)
        }
    }
}
