import NIOCore

/// Bytes a websocket connection has read but not used yet, and the pause of its reading while
/// it holds more than a partial frame header (over its turn's work budget, or while other event
/// loops catch up).
///
/// Confined to the connection's event loop, like the handler that holds it.
struct UnreadInput {
    private var held: ByteBuffer?
    private var readingPaused = false

    /// `bytes` just read, behind whatever was held.
    mutating func appending(_ bytes: ByteBuffer) -> ByteBuffer {
        guard var held = self.held else { return bytes }
        self.held = nil
        held.discardReadBytes()  // never carry what was already used
        held.writeImmutableBuffer(bytes)
        return held
    }

    /// Everything read was used but at most a partial frame header: keeps a copy of that (not
    /// the read buffer it sits at the end of). True when reading was paused and is to resume
    /// (the handler sets the option: this makes no call into NIO, see `OutboundWriter`).
    mutating func keepRest(of bytes: ByteBuffer, allocator: ByteBufferAllocator) -> Bool {
        if bytes.readableBytes > 0 {
            var rest = allocator.buffer(capacity: bytes.readableBytes)
            rest.writeImmutableBuffer(bytes)
            self.held = rest
        }
        defer { self.readingPaused = false }
        return self.readingPaused
    }

    /// Holds `bytes` for a later turn; true when reading is to pause meanwhile (it was not yet).
    mutating func hold(_ bytes: ByteBuffer) -> Bool {
        self.held = bytes
        defer { self.readingPaused = true }
        return !self.readingPaused
    }

    /// The held bytes, to use now.
    mutating func take() -> ByteBuffer? {
        defer { self.held = nil }
        return self.held
    }

    mutating func removeAll() {
        self.held = nil
    }
}
