import NIOCore
import NIOWebSocket

/// The protocol of one websocket connection, server side (RFC 6455), as a pure state machine:
/// fed the client's bytes, it says what to do, one action at a time.
///
/// Frames are parsed here (not by NIO's decoder) so that a payload is checked as it arrives:
/// invalid UTF-8 fails at the first bad byte, an oversize message fails at its frame header,
/// and after either the rest of the frame is skipped so the client's close still reaches us.
struct WebSocketStateMachine {
    enum Action: Equatable {
        /// Everything given has been used: call again with more bytes.
        case needMoreData
        /// A complete message, framed for its receivers (`headerLength` bytes of frame header
        /// in front of the payload).
        case relay(ByteBuffer, headerLength: Int, isText: Bool)
        /// Answer a ping with this framed pong.
        case pong(ByteBuffer)
        /// The client broke the protocol: send a close frame with `code` and `reason`, then wait
        /// (bounded) for its close. Later bytes are read only to find that close.
        case close(code: WebSocketErrorCode, reason: String)
        /// The client closed: write this framed close, then drop the connection.
        case replyToClose(ByteBuffer)
        /// The client answered our close: drop the connection.
        case closed
    }

    /// Bytes kept free in front of a message's payload for its frame header (at most 10).
    static let headroom = 10

    let maxMessageSize: Int

    private enum Mode { case open, closing, closed }
    private var mode = Mode.open

    // The frame being read.
    private var inPayload = false
    /// The raw 4-bit opcode (`Opcode`), matched per frame: matching NIO's `WebSocketOpcode`
    /// would lean on the optimizer inlining its Equatable conformance across modules.
    private var opcode: UInt8 = 0
    private var fin = false
    private var maskKey: UInt32 = 0
    private var frameRemaining = 0
    /// Payload bytes of this frame already read: the mask's phase.
    private var frameRead = 0
    /// The rest of this frame is skipped (after a failure, or while closing).
    private var skipping = false

    // The message being reassembled (payload after `headroom` spare bytes).
    private var message: ByteBuffer?
    private var messageIsText = false
    private var utf8 = UTF8Validator()

    // A control frame's payload (at most 125 bytes).
    private var control: ByteBuffer?

    init(maxMessageSize: Int) {
        self.maxMessageSize = maxMessageSize
    }

    /// Whether messages may still be relayed (no close sent or received).
    var isOpen: Bool { self.mode == .open }

    /// Whether a close from the client is still to come (after we sent ours).
    var awaitsClose: Bool { self.mode == .closing }

    /// The server starts closing (shutdown, slow consumer, no pong): no more messages are
    /// relayed; the client's close reply is still recognised. False when already closing.
    mutating func startClosing() -> Bool {
        guard self.mode == .open else { return false }
        self.mode = .closing
        self.message = nil
        self.skipping = self.inPayload && self.opcode != Opcode.close
        return true
    }

    /// The next action for the bytes in `buffer` (consumed as they are used).
    mutating func next(_ buffer: inout ByteBuffer, allocator: ByteBufferAllocator) -> Action {
        while true {
            if self.mode == .closed {
                buffer.moveReaderIndex(to: buffer.writerIndex)
                return .needMoreData
            }
            if self.inPayload, self.frameRemaining == 0 {
                // Also reached after an action returned mid-frame: the frame ends here.
                self.inPayload = false
                if let action = self.endFrame(allocator: allocator) { return action }
            } else if !self.inPayload {
                guard self.readHeader(&buffer) else { return .needMoreData }
                if let action = self.beginFrame(allocator: allocator) { return action }
            } else {
                let n = min(self.frameRemaining, buffer.readableBytes)
                guard n > 0 else { return .needMoreData }
                if let action = self.readPayload(&buffer, count: n) { return action }
            }
        }
    }

    // MARK: Frames

    private var rsv: UInt8 = 0
    private var masked = false
    private var lengthTooLarge = false

    /// Reads a whole frame header, or nothing when it has not all arrived.
    private mutating func readHeader(_ buffer: inout ByteBuffer) -> Bool {
        guard let b0 = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self),
              let b1 = buffer.getInteger(at: buffer.readerIndex + 1, as: UInt8.self) else { return false }
        let code = b1 & 0x7F
        let extended = code == 126 ? 2 : (code == 127 ? 8 : 0)
        let masked = b1 & 0x80 != 0
        let headerLength = 2 + extended + (masked ? 4 : 0)
        guard buffer.readableBytes >= headerLength else { return false }
        buffer.moveReaderIndex(forwardBy: 2)
        var length: UInt64 = UInt64(code)
        if code == 126 {
            length = UInt64(buffer.readInteger(as: UInt16.self)!)
        } else if code == 127 {
            length = buffer.readInteger(as: UInt64.self)!
        }
        self.maskKey = 0
        if masked {
            // Kept in memory order, as `Framing.unmask` wants it.
            self.maskKey = buffer.readInteger(endianness: .host, as: UInt32.self)!
        }
        self.fin = b0 & 0x80 != 0
        self.rsv = b0 & 0x70
        self.opcode = b0 & 0x0F
        self.masked = masked
        self.lengthTooLarge = length > UInt64(Int.max)
        self.frameRemaining = Int(min(length, UInt64(Int.max)))
        self.frameRead = 0
        self.skipping = false
        self.inPayload = true
        return true
    }

    /// Checks a frame header against the protocol and the limits, and sets up its payload.
    private mutating func beginFrame(allocator: ByteBufferAllocator) -> Action? {
        if self.mode == .closing {
            // Only the client's close matters now; everything else is skipped unchecked.
            if self.opcode == Opcode.close, self.frameRemaining <= 125 {
                self.control = allocator.buffer(capacity: self.frameRemaining)
            } else {
                self.skipping = true
            }
            return nil
        }
        guard self.rsv == 0 else { return self.fail(.protocolError, "reserved bits set without an extension") }
        guard self.masked else { return self.fail(.protocolError, "client frames must be masked") }
        guard !self.lengthTooLarge else { return self.fail(.protocolError, "frame length has its top bit set") }
        switch self.opcode {
        case Opcode.close, Opcode.ping, Opcode.pong:
            guard self.fin else { return self.fail(.protocolError, "fragmented control frame") }
            guard self.frameRemaining <= 125 else { return self.fail(.protocolError, "control frame longer than 125 bytes") }
            self.control = allocator.buffer(capacity: self.frameRemaining)
        case Opcode.text, Opcode.binary:
            guard self.message == nil else { return self.fail(.protocolError, "new message before the fragmented one ended") }
            guard self.frameRemaining <= self.maxMessageSize else { return self.tooLarge() }
            // What a header claims is not allocated before the bytes arrive: at most 64 KiB
            // up front, then the buffer grows with the payload.
            let expected = min(self.fin ? self.frameRemaining : max(2 * self.frameRemaining, 1024), self.maxMessageSize, 1 << 16)
            var message = allocator.buffer(capacity: Self.headroom + expected)
            message.moveWriterIndex(forwardBy: Self.headroom)
            message.moveReaderIndex(forwardBy: Self.headroom)
            self.message = message
            self.messageIsText = self.opcode == Opcode.text
            self.utf8 = UTF8Validator()
        case Opcode.continuation:
            guard let message = self.message else { return self.fail(.protocolError, "continuation frame without a message") }
            guard self.frameRemaining <= self.maxMessageSize - message.readableBytes else { return self.tooLarge() }
        default:
            return self.fail(.protocolError, "unknown opcode \(self.opcode)")
        }
        return nil
    }

    private mutating func readPayload(_ buffer: inout ByteBuffer, count n: Int) -> Action? {
        let phase = self.frameRead
        self.frameRemaining -= n
        self.frameRead += n
        if self.skipping {
            buffer.moveReaderIndex(forwardBy: n)
            return nil
        }
        if self.opcode >= Opcode.close {
            Self.appendUnmasked(buffer.readSlice(length: n)!, key: self.maskKey, phase: phase, to: &self.control!)
            return nil
        }
        var message = self.message!
        self.message = nil  // uniquely referenced while it grows
        let start = message.writerIndex - message.readerIndex
        Self.appendUnmasked(buffer.readSlice(length: n)!, key: self.maskKey, phase: phase, to: &message)
        if self.messageIsText {
            let valid = message.withUnsafeReadableBytes { self.utf8.feed(UnsafeRawBufferPointer(rebasing: $0[start...])) }
            guard valid else { return self.fail(.dataInconsistentWithMessage, "text message is not valid UTF-8") }
        }
        self.message = message
        return nil
    }

    private mutating func endFrame(allocator: ByteBufferAllocator) -> Action? {
        if self.skipping {
            self.skipping = false
            return nil
        }
        switch self.opcode {
        case Opcode.close:
            let payload = self.control.take()!
            if self.mode == .closing {
                self.mode = .closed
                return .closed
            }
            self.mode = .closed
            self.message = nil
            return .replyToClose(Self.closeReply(to: payload, allocator: allocator))
        case Opcode.ping:
            return .pong(Framing.frame(opcode: .pong, payload: self.control.take()!, allocator: allocator))
        case Opcode.pong:
            self.control = nil
            return nil
        default:
            guard self.fin, var message = self.message.take() else { return nil }
            if self.messageIsText, !self.utf8.isComplete { return self.fail(.dataInconsistentWithMessage, "text message is not valid UTF-8") }
            let length = message.readableBytes
            guard length > 0 else { return nil }  // empty messages are keepalives, not relayed
            let headerLength = Framing.headerLength(payload: length)
            let at = message.readerIndex - headerLength
            message.setInteger(0x80 | (self.messageIsText ? Opcode.text : Opcode.binary), at: at)
            if length < 126 {
                message.setInteger(UInt8(length), at: at + 1)
            } else if length <= 0xFFFF {
                message.setInteger(UInt8(126), at: at + 1)
                message.setInteger(UInt16(length), at: at + 2)
            } else {
                message.setInteger(UInt8(127), at: at + 1)
                message.setInteger(UInt64(length), at: at + 2)
            }
            message.moveReaderIndex(to: at)
            return .relay(message, headerLength: headerLength, isText: self.messageIsText)
        }
    }

    // MARK: Failing and closing

    private mutating func fail(_ code: WebSocketErrorCode, _ reason: String) -> Action {
        // A broken close frame was the client's close: no other will come, so the connection
        // is dropped once ours is written.
        self.mode = self.inPayload && self.opcode == Opcode.close ? .closed : .closing
        self.message = nil
        self.control = nil
        self.skipping = self.inPayload
        return .close(code: code, reason: reason)
    }

    private mutating func tooLarge() -> Action {
        self.fail(.messageTooLarge, "message larger than \(self.maxMessageSize) bytes")
    }

    /// The close frame answering a client's close (RFC 6455 §5.5.1, §7.4): its own code when it
    /// is one a client may send and its reason is UTF-8, else 1002 or 1007.
    static func closeReply(to payload: ByteBuffer, allocator: ByteBufferAllocator) -> ByteBuffer {
        var payload = payload
        guard payload.readableBytes > 0 else {
            var out = allocator.buffer(capacity: 2)
            Framing.writeHeader(into: &out, opcode: .connectionClose, length: 0)
            return out
        }
        guard let code = payload.readInteger(as: UInt16.self) else {
            return Framing.closeFrame(code: .protocolError, reason: "close frame with a one-byte payload", allocator: allocator)
        }
        guard isValidReceivedCloseCode(code) else {
            return Framing.closeFrame(code: .protocolError, reason: "invalid close code \(code)", allocator: allocator)
        }
        guard UTF8Validation.isValid(payload) else {
            return Framing.closeFrame(code: .dataInconsistentWithMessage, reason: "close reason is not valid UTF-8", allocator: allocator)
        }
        return Framing.closeFrame(code: WebSocketErrorCode(codeNumber: Int(code)), reason: "", allocator: allocator)
    }

    /// Close codes a client may send: the registered ones an endpoint may put in a frame
    /// (1000–1003, 1007–1014) and the private and library ranges (3000–4999). 1004–1006 and
    /// 1015 are reserved; 1016–2999 are unassigned.
    static func isValidReceivedCloseCode(_ code: UInt16) -> Bool {
        switch code {
        case 1000...1003, 1007...1014, 3000...4999: return true
        default: return false
        }
    }

    private static func appendUnmasked(_ bytes: ByteBuffer, key: UInt32, phase: Int, to buffer: inout ByteBuffer) {
        let offset = buffer.writerIndex - buffer.readerIndex
        buffer.writeImmutableBuffer(bytes)
        buffer.withUnsafeMutableReadableBytes { all in
            Framing.unmask(UnsafeMutableRawBufferPointer(rebasing: all[offset...]), key: key, phase: phase)
        }
    }
}

/// NIO's opcodes as the raw nibble the parser matches.
private enum Opcode {
    static var continuation: UInt8 { UInt8(webSocketOpcode: .continuation) }
    static var text: UInt8 { UInt8(webSocketOpcode: .text) }
    static var binary: UInt8 { UInt8(webSocketOpcode: .binary) }
    static var close: UInt8 { UInt8(webSocketOpcode: .connectionClose) }
    static var ping: UInt8 { UInt8(webSocketOpcode: .ping) }
    static var pong: UInt8 { UInt8(webSocketOpcode: .pong) }
}

extension Optional {
    /// The value, leaving nil behind (so a buffer taken out is uniquely referenced).
    fileprivate mutating func take() -> Wrapped? {
        defer { self = nil }
        return self
    }
}
