import Logging
import NIOCore
import NIOWebSocket

/// Sent down the pipeline when the node shuts down: websockets close with 1001.
struct ShutdownEvent: Sendable {}

/// One websocket client: reassembles and validates its messages, relays them through the hub,
/// and writes what others send it, bounded by its send buffer.
///
/// It owns the client's `Membership` in its staps channel: attached when the handler is added
/// (in the event-loop step that writes the 101), left on close, inactive or removal.
final class WebSocketHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = WebSocketFrame
    typealias OutboundOut = ByteBuffer

    let id: UInt64
    /// This client's place in its staps channel; the loop hub also keeps its member slot here.
    let membership: Membership
    // The membership's, copied so the hot path reaches them without a hop.
    private let entry: ChannelEntry
    private let loopHub: LoopHub
    private let limits: Limits
    private let counters: NodeCounters
    private var logger: Logger

    private var context: ChannelHandlerContext!
    private enum State { case open, closing, closed }
    private var state = State.open
    private var isDirty = false

    // Fragment reassembly.
    private var fragments: ByteBuffer?
    private var fragmentsAreText = false

    // Keepalive.
    private var awaitingPong = false
    private var pongTimer: Scheduled<Void>?

    // Slow-consumer accounting: armed while the connection is over its high watermark.
    private var slowTimer: Scheduled<Void>?
    private var closeTimer: Scheduled<Void>?

    init(id: UInt64, membership: Membership, limits: Limits, counters: NodeCounters, logger: Logger) {
        self.id = id
        self.membership = membership
        self.entry = membership.entry
        self.loopHub = membership.loopHub
        self.limits = limits
        self.counters = counters
        self.logger = logger
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        self.membership.attach(self)
        self.logger.debug("websocket open")
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.leave()
        self.context = nil
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.leave()
        self.state = .closed
        self.logger.debug("websocket closed")
        context.fireChannelInactive()
    }

    /// Stops the timers and leaves the staps channel (both idempotent).
    private func leave() {
        self.pongTimer?.cancel()
        self.slowTimer?.cancel()
        self.closeTimer?.cancel()
        self.membership.leave()
    }

    // MARK: Outbound (called by the loop hub)

    /// Writes a framed message (not flushed: the hub flushes once per tick).
    @inline(__always)
    func enqueue(_ frame: ByteBuffer) {
        guard self.state == .open else { return }
        let context = self.context!
        if !context.channel.isWritable {
            // Over the high watermark: a hard cap at twice the send buffer, and a grace timer.
            if Self.bufferedBytes(context.channel) + frame.readableBytes > 2 * self.limits.sendBuffer {
                self.closeSlowConsumer()
                return
            }
            if self.slowTimer == nil {
                self.armSlowTimer(context: context)
            }
        }
        context.write(self.wrapOutboundOut(frame), promise: nil)
        if !self.isDirty {
            self.isDirty = true
            self.loopHub.markDirty(self)
        }
    }

    /// After the grace period, a receiver still holding more than its send buffer is closed;
    /// one that drained below it but not yet below the low watermark gets another period.
    private func armSlowTimer(context: ChannelHandlerContext) {
        self.slowTimer = context.eventLoop.assumeIsolated().scheduleTask(in: self.limits.slowConsumerGrace) { [self] in
            self.slowTimer = nil
            guard self.state == .open, let connection = self.context?.channel, !connection.isWritable else { return }
            if Self.bufferedBytes(connection) > self.limits.sendBuffer {
                self.closeSlowConsumer()
            } else {
                self.armSlowTimer(context: context)
            }
        }
    }

    /// Bytes written to the connection and not yet taken by the kernel.
    private static func bufferedBytes(_ connection: Channel) -> Int {
        (try? connection.syncOptions?.getOption(.bufferedWritableBytes)) ?? 0
    }

    func flushPending() {
        self.isDirty = false
        self.context?.flush()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            self.slowTimer?.cancel()
            self.slowTimer = nil
        }
        context.fireChannelWritabilityChanged()
    }

    private func closeSlowConsumer() {
        self.counters.slowConsumersClosed.wrappingIncrement(ordering: .relaxed)
        self.logger.warning("closing slow consumer", metadata: [
            "send_buffer": "\(self.limits.sendBuffer)", "buffered": "\(Self.bufferedBytes(self.context.channel))",
        ])
        self.close(code: 1008, reason: "slow consumer")
    }

    // MARK: Inbound

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = self.unwrapInboundIn(data)
        guard self.state == .open else {
            if self.state == .closing, frame.opcode == .connectionClose { context.close(promise: nil) }
            return
        }
        self.awaitingPong = false
        guard frame.reservedBits.isEmpty else { return self.close(code: 1002, reason: "reserved bits set without an extension") }
        guard let maskKey = frame.maskKey else { return self.close(code: 1002, reason: "client frames must be masked") }
        switch frame.opcode {
        case .text, .binary:
            guard self.fragments == nil else { return self.close(code: 1002, reason: "new message before the fragmented one ended") }
            if frame.fin {
                self.relaySingleFrame(frame, maskKey: maskKey)
            } else {
                var buffer = context.channel.allocator.buffer(capacity: max(frame.length * 2, 1024))
                Self.appendUnmasked(frame, maskKey: maskKey, to: &buffer)
                self.fragments = buffer
                self.fragmentsAreText = frame.opcode == .text
            }
        case .continuation:
            guard var buffer = self.fragments else { return self.close(code: 1002, reason: "continuation frame without a message") }
            self.fragments = nil  // keep the buffer uniquely referenced while appending
            guard buffer.readableBytes + frame.length <= self.limits.maxMessageSize else {
                return self.close(code: 1009, reason: "message larger than \(self.limits.maxMessageSize) bytes")
            }
            Self.appendUnmasked(frame, maskKey: maskKey, to: &buffer)
            if frame.fin {
                self.relay(payload: buffer, isText: self.fragmentsAreText)
            } else {
                self.fragments = buffer
            }
        case .ping:
            guard frame.fin else { return self.close(code: 1002, reason: "fragmented control frame") }
            var payload = context.channel.allocator.buffer(capacity: frame.length)
            Self.appendUnmasked(frame, maskKey: maskKey, to: &payload)
            self.writeControl(Framing.frame(opcode: Framing.opPong, payload: payload, allocator: context.channel.allocator))
        case .pong:
            break
        case .connectionClose:
            self.receivedClose(frame, maskKey: maskKey)
        default:
            self.close(code: 1002, reason: "unknown opcode")
        }
    }

    /// The common case: one frame, one message. Frame it once for every receiver, unmasking
    /// straight into the outbound buffer.
    @inline(__always)
    private func relaySingleFrame(_ frame: WebSocketFrame, maskKey: WebSocketMaskingKey) {
        let length = frame.length
        guard length > 0 else { return }  // empty messages are keepalives, not relayed
        let opcode = frame.opcode == .text ? Framing.opText : Framing.opBinary
        let headerLength = Framing.headerLength(payload: length)
        var out = self.context.channel.allocator.buffer(capacity: headerLength + length)
        Framing.writeHeader(into: &out, opcode: opcode, length: length)
        out.writeImmutableBuffer(frame.data)
        let key = Framing.maskWord(maskKey)
        let valid = out.withUnsafeMutableReadableBytes { bytes -> Bool in
            let payload = UnsafeMutableRawBufferPointer(rebasing: bytes[headerLength...])
            Framing.unmask(payload, key: key, phase: 0)
            return opcode == Framing.opBinary || UTF8Validation.isValid(UnsafeRawBufferPointer(payload))
        }
        guard valid else { return self.close(code: 1007, reason: "text message is not valid UTF-8") }
        self.counters.messagesIn.wrappingIncrement(ordering: .relaxed)
        self.loopHub.publish(from: self, entry: self.entry, frame: out, headerLength: headerLength, isText: opcode == Framing.opText)
    }

    private func relay(payload: ByteBuffer, isText: Bool) {
        guard payload.readableBytes > 0 else { return }
        if isText, !UTF8Validation.isValid(payload) { return self.close(code: 1007, reason: "text message is not valid UTF-8") }
        let frame = Framing.frame(opcode: isText ? Framing.opText : Framing.opBinary, payload: payload, allocator: self.context.channel.allocator)
        self.counters.messagesIn.wrappingIncrement(ordering: .relaxed)
        self.loopHub.publish(from: self, entry: self.entry, frame: frame, headerLength: frame.readableBytes - payload.readableBytes, isText: isText)
    }

    private static func appendUnmasked(_ frame: WebSocketFrame, maskKey: WebSocketMaskingKey, to buffer: inout ByteBuffer) {
        let start = buffer.writerIndex
        buffer.writeImmutableBuffer(frame.data)
        let key = Framing.maskWord(maskKey)
        let offset = start - buffer.readerIndex
        buffer.withUnsafeMutableReadableBytes { bytes in
            Framing.unmask(UnsafeMutableRawBufferPointer(rebasing: bytes[offset...]), key: key, phase: 0)
        }
    }

    private func receivedClose(_ frame: WebSocketFrame, maskKey: WebSocketMaskingKey) {
        var payload = self.context.channel.allocator.buffer(capacity: frame.length)
        Self.appendUnmasked(frame, maskKey: maskKey, to: &payload)
        // Answer with the client's code when it is one a peer may send (RFC 6455 §7.4).
        var reply: (UInt16, String)? = nil
        if payload.readableBytes == 1 {
            reply = (1002, "close frame with a one-byte payload")
        } else if let code = payload.readInteger(as: UInt16.self) {
            if !Self.isValidReceivedCloseCode(code) {
                reply = (1002, "invalid close code")
            } else if !UTF8Validation.isValid(payload) {
                reply = (1007, "close reason is not valid UTF-8")
            } else {
                reply = (code, "")
            }
        }
        self.leave()
        self.state = .closing
        var out = self.context.channel.allocator.buffer(capacity: 4)
        if let (code, reason) = reply {
            out = Framing.closeFrame(code: code, reason: reason, allocator: self.context.channel.allocator)
        } else {
            Framing.writeHeader(into: &out, opcode: Framing.opClose, length: 0)
        }
        let context = self.context!
        context.writeAndFlush(self.wrapOutboundOut(out)).assumeIsolated().whenComplete { _ in context.close(promise: nil) }
    }

    static func isValidReceivedCloseCode(_ code: UInt16) -> Bool {
        switch code {
        case 1000...1003, 1007...1011: return true
        case 3000...4999: return true
        default: return false
        }
    }

    private func writeControl(_ frame: ByteBuffer) {
        self.context.writeAndFlush(self.wrapOutboundOut(frame), promise: nil)
    }

    /// Starts the closing handshake: close frame, stop receiving messages, and drop the TCP
    /// connection if the client has not answered within the shutdown timeout.
    func close(code: UInt16, reason: String) {
        guard self.state == .open, let context = self.context else { return }
        self.state = .closing
        self.fragments = nil
        self.leave()
        self.logger.debug("closing websocket", metadata: ["close.code": "\(code)", "close.reason": "\(reason)"])
        context.writeAndFlush(self.wrapOutboundOut(Framing.closeFrame(code: code, reason: reason, allocator: context.channel.allocator)), promise: nil)
        self.closeTimer = context.eventLoop.assumeIsolated().scheduleTask(in: max(self.limits.shutdownTimeout, .seconds(1))) {
            context.close(promise: nil)
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        switch event {
        case is ShutdownEvent:
            self.close(code: 1001, reason: "server shutting down")
        case let idle as IdleStateHandler.IdleStateEvent where idle == .read:
            guard self.state == .open, !self.awaitingPong else { return }
            self.awaitingPong = true
            var ping = context.channel.allocator.buffer(capacity: 2)
            Framing.writeHeader(into: &ping, opcode: Framing.opPing, length: 0)
            self.writeControl(ping)
            self.pongTimer?.cancel()
            self.pongTimer = context.eventLoop.assumeIsolated().scheduleTask(in: self.limits.pongTimeout) { [self] in
                if self.awaitingPong, self.state == .open { self.close(code: 1001, reason: "no pong within the pong timeout") }
            }
        default:
            context.fireUserInboundEventTriggered(event)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        switch error {
        case NIOWebSocketError.invalidFrameLength:
            self.close(code: 1009, reason: "message larger than \(self.limits.maxMessageSize) bytes")
        case NIOWebSocketError.fragmentedControlFrame:
            self.close(code: 1002, reason: "fragmented control frame")
        case NIOWebSocketError.multiByteControlFrameLength:
            self.close(code: 1002, reason: "control frame longer than 125 bytes")
        default:
            self.logger.debug("websocket error", metadata: ["error": "\(error)"])
            context.close(promise: nil)
        }
    }
}
