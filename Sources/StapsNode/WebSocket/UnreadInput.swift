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
    /// the read buffer it sits at the end of), and resumes reading if it was paused.
    mutating func keepRest(of bytes: ByteBuffer, context: ChannelHandlerContext) {
        if bytes.readableBytes > 0 {
            var rest = context.channel.allocator.buffer(capacity: bytes.readableBytes)
            rest.writeImmutableBuffer(bytes)
            self.held = rest
        }
        if self.readingPaused {
            self.readingPaused = false
            context.channel.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
        }
    }

    /// Holds `bytes` for a later turn, with reading paused meanwhile.
    mutating func hold(_ bytes: ByteBuffer, context: ChannelHandlerContext) {
        self.held = bytes
        if !self.readingPaused {
            self.readingPaused = true
            context.channel.setOption(ChannelOptions.autoRead, value: false).whenComplete { _ in }
        }
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
