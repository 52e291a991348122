import Logging
import NIOCore
import NIOWebSocket

/// Sent down the pipeline when the node shuts down: websockets close with 1001.
struct ShutdownEvent: Sendable {}

/// One websocket client on the event loop: feeds its bytes to its `WebSocketStateMachine`,
/// relays its messages through the hub, and writes what others send it through its `Outbox`,
/// bounded by its send buffer.
///
/// It owns the client's `Membership` in its staps channel: attached when the handler is added
/// (in the event-loop step that writes the 101), left on close, inactive or removal. What the
/// authorization hook allowed narrows it: a publish-only client is never attached (it receives
/// nothing, at no cost to anyone's hot path); a subscribe-only client's messages are dropped
/// and counted after the state machine has checked them (one Bool per message).
final class WebSocketHandler: ChannelInboundHandler, RemovableChannelHandler, ChannelReceiver {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// Work one connection may cause per event-loop turn (one unit per message, plus one per
    /// receiver it reaches): a client flooding tiny messages into a big channel waits, with
    /// reading paused, while its loop serves everyone else's I/O.
    static let workPerTurn = 1024
    /// How long a connection over its budget waits: long enough that its loop polls for I/O
    /// first (a task ready at once would run in the same loop turn).
    static let pause = TimeAmount.microseconds(500)

    let id: UInt64
    /// This client's place in its staps channel.
    let membership: Membership
    /// The membership's, copied so the hot path reaches it without a hop.
    private let loopHub: LoopHub
    private let limits: Limits
    private let counters: NodeCounters
    private var logger: Logger
    /// What the hook allowed (`.both` without a hook).
    let permission: Permission
    /// `permission.mayPublish`, read per message.
    private let mayPublish: Bool

    private var context: ChannelHandlerContext!
    private var machine: WebSocketStateMachine
    private enum State { case open, closing, closed }
    private var closeCounted = false
    private var state = State.open
    private var isDirty = false

    /// Bytes read but not used yet: a partial frame header, or what is left over the turn's budget.
    private var unread: ByteBuffer?
    private var readingPaused = false

    private var outbox = Outbox()
    /// At most one pong waits while the connection is over its send buffer: a newer ping
    /// replaces it (RFC 6455 §5.5.3 allows answering only the latest).
    private var pendingPong: ByteBuffer?

    // Keepalive.
    private var awaitingPong = false
    private var pongTimer: Scheduled<Void>?

    // Slow-consumer accounting: armed while the connection is over its send buffer.
    private var slowTimer: Scheduled<Void>?
    private var closeTimer: Scheduled<Void>?

    init(id: UInt64, membership: Membership, limits: Limits, counters: NodeCounters, logger: Logger, permission: Permission = .both) {
        self.id = id
        self.permission = permission
        self.mayPublish = permission.mayPublish
        self.membership = membership
        self.loopHub = membership.loopHub
        self.limits = limits
        self.counters = counters
        self.logger = logger
        self.machine = WebSocketStateMachine(maxMessageSize: limits.maxMessageSize)
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        if self.permission.mayReceive { self.membership.attach(self) }
        self.logger.debug("websocket open", metadata: self.permission == .both ? [:] : ["auth.allow": "\(self.permission.rawValue)"])
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.leave()
        self.context = nil
    }

    func channelInactive(context: ChannelHandlerContext) {
        // Gone without a close handshake (1006): the client dropped it (the node's own drops
        // are counted where it makes them).
        self.countClose(code: .abnormalClosure, byClient: true)
        self.leave()
        self.state = .closed
        self.outbox.removeAll()
        self.pendingPong = nil
        self.unread = nil
        self.logger.debug("websocket closed")
        context.fireChannelInactive()
    }

    /// The code of the close frame the node answers a client's close with (1005: none), and
    /// whether it carries a reason (the client's close was broken).
    static func closeCode(ofReply reply: ByteBuffer) -> (WebSocketErrorCode, failed: Bool) {
        let length = Framing.payloadLength(ofServerFrame: reply)
        guard length >= 2, let code = reply.getWebSocketErrorCode(at: reply.readerIndex + 2) else { return (.noStatusReceived, false) }
        return (code, length > 2)
    }

    /// Counts this connection's close once: the first of the client's close, the node's, or
    /// the connection ending without either.
    private func countClose(code: WebSocketErrorCode, byClient: Bool) {
        guard !self.closeCounted else { return }
        self.closeCounted = true
        self.counters.closes.increment(code: Int(UInt16(webSocketErrorCode: code)), byClient: byClient)
    }

    /// Stops the timers and leaves the staps channel (both idempotent).
    private func leave() {
        self.pongTimer?.cancel()
        self.slowTimer?.cancel()
        self.closeTimer?.cancel()
        self.membership.leave()
    }

    // MARK: Outbound (called by the loop hub)

    /// Queues a framed message; the hub flushes once per tick. False when it was not queued
    /// (the receiver is closing, or is closed for it now as a slow consumer).
    @inline(__always) @discardableResult
    func enqueue(_ message: FramedMessage) -> Bool {
        let frame = message.bytes
        guard self.state == .open else { return false }
        let context = self.context!
        if !context.channel.isWritable {
            // NIO holds a full send buffer: a hard cap at twice it, and a grace timer.
            if self.queuedBytes + frame.readableBytes > 2 * self.limits.sendBuffer {
                self.closeSlowConsumer()
                return false
            }
            if self.slowTimer == nil {
                self.armSlowTimer(context: context)
            }
        }
        self.outbox.append(frame, allocator: context.channel.allocator)
        if self.outbox.bytes >= Self.handOverAt {
            // A big tick: hand NIO its share now, so writability (and with it the caps
            // above) applies within the tick too.
            self.handOver(context: context)
        }
        self.markDirty()
        return true
    }

    /// Bytes the outbox may collect in one tick before they are handed to NIO early.
    static let handOverAt = 256 << 10

    /// Hands NIO whole frames while it takes them (it holds at most about a send buffer).
    private func handOver(context: ChannelHandlerContext) {
        let connection = context.channel
        while connection.isWritable, let frame = self.outbox.popFirst() {
            context.write(self.wrapOutboundOut(frame), promise: nil)
        }
    }

    @inline(__always)
    private func markDirty() {
        if !self.isDirty {
            self.isDirty = true
            self.loopHub.flushAtEndOfTick(self)
        }
    }

    /// Bytes waiting to reach the client: held by NIO and in the outbox.
    private var queuedBytes: Int {
        guard let connection = self.context?.channel else { return 0 }
        let buffered = (try? connection.syncOptions?.getOption(.bufferedWritableBytes)) ?? 0
        return buffered + self.outbox.bytes + (self.pendingPong?.readableBytes ?? 0)
    }

    /// Hands NIO what it will take (whole frames, until it is over the send buffer) and flushes.
    func flushQueued() {
        self.isDirty = false
        guard let context = self.context, self.state != .closed else { return }
        let connection = context.channel
        if let pong = self.pendingPong, connection.isWritable {
            self.pendingPong = nil
            context.write(self.wrapOutboundOut(pong), promise: nil)
        }
        self.handOver(context: context)
        context.flush()
        if self.state == .open, !self.outbox.isEmpty || self.pendingPong != nil, self.slowTimer == nil {
            self.armSlowTimer(context: context)
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            self.flushQueued()
            if self.outbox.isEmpty, self.pendingPong == nil {
                self.slowTimer?.cancel()
                self.slowTimer = nil
            }
        }
        context.fireChannelWritabilityChanged()
    }

    /// After the grace period, a receiver still holding more than its send buffer is closed;
    /// one that drained below it but is still backed up gets another period.
    private func armSlowTimer(context: ChannelHandlerContext) {
        self.slowTimer = context.eventLoop.assumeIsolated().scheduleTask(in: self.limits.slowConsumerGrace) { [self] in
            self.slowTimer = nil
            guard self.state == .open, self.context != nil else { return }
            if self.queuedBytes > self.limits.sendBuffer {
                self.closeSlowConsumer()
            } else if !self.outbox.isEmpty || !context.channel.isWritable {
                self.armSlowTimer(context: context)
            }
        }
    }

    /// Drops what was queued behind the frames NIO holds (so the client gets whole frames
    /// only), then closes with 1008.
    private func closeSlowConsumer() {
        self.counters.slowConsumersClosed.wrappingIncrement(ordering: .relaxed)
        self.counters.slowConsumerDroppedBytes.wrappingIncrement(by: self.outbox.bytes, ordering: .relaxed)
        self.logger.warning("closing slow consumer", metadata: [
            "send_buffer": "\(self.limits.sendBuffer)", "queued": "\(self.queuedBytes)",
        ])
        self.outbox.removeAll()
        self.pendingPong = nil
        self.close(code: .policyViolation, reason: "slow consumer")
    }

    // MARK: Inbound

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard self.state != .closed else { return }
        self.awaitingPong = false
        var bytes = self.unwrapInboundIn(data)
        if var unread = self.unread {
            self.unread = nil
            unread.discardReadBytes()  // never carry what was already used
            unread.writeBuffer(&bytes)
            bytes = unread
        }
        self.process(bytes, context: context)
    }

    /// Runs the state machine over `bytes` up to the turn's work budget; the rest waits for a
    /// later turn with reading paused.
    private func process(_ bytes: ByteBuffer, context: ChannelHandlerContext) {
        var bytes = bytes
        var budget = Self.workPerTurn
        let allocator = context.channel.allocator
        if self.loopHub.otherLoopsAreBehind, bytes.readableBytes > 0, self.machine.isOpen {
            return self.pauseReading(holding: bytes, context: context)
        }
        while true {
            switch self.machine.next(&bytes, allocator: allocator) {
            case .needMoreData:
                // At most a partial frame header is left: copied out, so the read buffer it
                // sits at the end of is not kept.
                if bytes.readableBytes > 0 {
                    var leftover = allocator.buffer(capacity: bytes.readableBytes)
                    leftover.writeBuffer(&bytes)
                    self.unread = leftover
                }
                if self.readingPaused {
                    self.readingPaused = false
                    context.channel.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
                }
                return
            case .relay(let frame, let headerLength, let isText):
                let stats = self.loopHub.counters
                if self.mayPublish {
                    LoopCounters.add(1, to: stats.websocketMessages)
                    LoopCounters.add(frame.readableBytes &- headerLength, to: stats.bytesReceived)
                    budget -= self.membership.publish(FramedMessage(bytes: frame, headerLength: headerLength), isText: isText, connectionID: self.id)
                } else {
                    LoopCounters.add(1, to: stats.droppedSubscribeOnly)
                    budget -= 1
                }
                if budget <= 0, bytes.readableBytes > 0 {
                    return self.pauseReading(holding: bytes, context: context)
                }
            case .pong(let pong):
                // Every ping is answered while the client reads (through the outbox, so tiny
                // pongs are copied together and counted); one that does not read gets its send
                // buffer's worth, then only its latest ping answered.
                if self.pendingPong == nil, context.channel.isWritable {
                    self.outbox.append(pong, allocator: allocator)
                } else {
                    self.pendingPong = pong
                }
                self.markDirty()
                budget -= 1
            case .close(let code, let reason):
                self.close(code: code, reason: reason)
                if !self.machine.awaitsClose { return }
            case .replyToClose(let reply):
                // A valid close is echoed without a reason; one with a reason is the node
                // failing a broken close (1002, 1007).
                let (code, failed) = Self.closeCode(ofReply: reply)
                self.countClose(code: code, byClient: !failed)
                self.leave()
                self.state = .closing
                self.outbox.removeAll()
                self.pendingPong = nil
                self.armCloseTimer(context: context)
                context.writeAndFlush(self.wrapOutboundOut(reply)).assumeIsolated().whenComplete { _ in context.close(promise: nil) }
                return
            case .closed:
                context.close(promise: nil)
                return
            }
        }
    }

    private func pauseReading(holding bytes: ByteBuffer, context: ChannelHandlerContext) {
        self.unread = bytes
        if !self.readingPaused {
            self.readingPaused = true
            context.channel.setOption(ChannelOptions.autoRead, value: false).whenComplete { _ in }
        }
        context.eventLoop.assumeIsolated().scheduleTask(in: Self.pause) { [self] in
            guard self.state != .closed, let context = self.context, let unread = self.unread else { return }
            self.unread = nil
            self.process(unread, context: context)
        }
    }

    /// Starts the closing handshake: what is queued, then the close frame; no more messages in
    /// either direction, and the connection is dropped if the client has not answered in time.
    func close(code: WebSocketErrorCode, reason: String) {
        guard self.state == .open, let context = self.context else { return }
        self.state = .closing
        _ = self.machine.startClosing()
        self.countClose(code: code, byClient: false)
        self.leave()
        self.logger.debug("closing websocket", metadata: ["close.code": "\(UInt16(webSocketErrorCode: code))", "close.reason": "\(reason)"])
        while let frame = self.outbox.popFirst() {
            context.write(self.wrapOutboundOut(frame), promise: nil)
        }
        self.pendingPong = nil
        let written = context.writeAndFlush(self.wrapOutboundOut(Framing.closeFrame(code: code, reason: reason, allocator: context.channel.allocator)))
        if !self.machine.awaitsClose {
            // The client's own close was the bad frame: nothing more will come.
            written.assumeIsolated().whenComplete { _ in context.close(promise: nil) }
        }
        self.armCloseTimer(context: context)
    }

    private func armCloseTimer(context: ChannelHandlerContext) {
        self.closeTimer?.cancel()
        self.closeTimer = context.eventLoop.assumeIsolated().scheduleTask(in: max(self.limits.shutdownTimeout, .seconds(1))) {
            context.close(promise: nil)
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        switch event {
        case is ShutdownEvent:
            self.close(code: .goingAway, reason: "server shutting down")
        case let idle as IdleStateHandler.IdleStateEvent where idle == .read:
            guard self.state == .open, !self.awaitingPong else { return }
            self.awaitingPong = true
            var ping = context.channel.allocator.buffer(capacity: 2)
            Framing.writeHeader(into: &ping, opcode: .ping, length: 0)
            context.writeAndFlush(self.wrapOutboundOut(ping), promise: nil)
            self.pongTimer?.cancel()
            self.pongTimer = context.eventLoop.assumeIsolated().scheduleTask(in: self.limits.pongTimeout) { [self] in
                if self.awaitingPong, self.state == .open { self.close(code: .goingAway, reason: "no pong within the pong timeout") }
            }
        default:
            context.fireUserInboundEventTriggered(event)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        self.logger.debug("websocket error", metadata: ["error": "\(error)"])
        self.countClose(code: .abnormalClosure, byClient: false)
        context.close(promise: nil)
    }
}
