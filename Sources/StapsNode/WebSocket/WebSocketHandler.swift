import Logging
import NIOCore
import NIOWebSocket

/// One websocket client on the event loop: feeds its bytes to its `WebSocketStateMachine`,
/// relays its messages through the hub, and writes what others send it through its
/// `OutboundWriter`, bounded by its send buffer. To the hub it is a `ChannelReceiver`.
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
    /// The node's logger: this connection's metadata is made per line logged (`log`), since a
    /// logger of its own would hold a copy of it on every idle connection.
    private let logger: Logger
    /// What the hook allowed (`.both` without a hook).
    let permission: Permission
    /// `permission.mayPublish`, read per message.
    private let mayPublish: Bool

    /// Where the connection is; the states that may still write carry the context they write
    /// through, so the hot path needs no optional.
    private enum State {
        /// Not in a pipeline yet.
        case notAdded
        /// Relaying messages both ways.
        case open(ChannelHandlerContext)
        /// A close was sent or answered: nothing more is relayed; the client's close (or the
        /// close timer) ends the connection.
        case closing(ChannelHandlerContext)
        /// The connection ended, or the handler was removed.
        case closed
    }
    private var state = State.notAdded
    private var machine: WebSocketStateMachine
    private var closeCounted = false
    private var flushRequested = false

    private var unread = UnreadInput()
    private var writer = OutboundWriter()

    // Keepalive: a client silent for the ping interval is pinged, and closed if it is still
    // silent after the pong timeout. One scheduled callback per connection, re-armed when it
    // runs (NIO's `IdleStateHandler` cost a handler, its context and a scheduled task with a
    // promise and three closures, on every idle connection).
    /// When the client's last bytes were read (the loop's clock).
    private var lastRead = NIODeadline.uptimeNanoseconds(0)
    /// A ping is out, unanswered: the keepalive is due at the pong timeout.
    private var awaitingPong = false
    private var keepalive: NIOScheduledCallback?

    /// Armed while the connection is over its send buffer: a slow consumer's grace period.
    private var slowTimer: Scheduled<Void>?
    /// Armed once a close is sent or answered: the client's time to end the connection.
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

    /// The context while the connection may still write (open or closing).
    private var writableContext: ChannelHandlerContext? {
        switch self.state {
        case .open(let context), .closing(let context): context
        case .notAdded, .closed: nil
        }
    }

    private var isOpen: Bool {
        if case .open = self.state { true } else { false }
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.state = .open(context)
        self.lastRead = context.eventLoop.now
        self.armKeepalive(at: self.lastRead + self.limits.pingInterval, context: context)
        if self.permission.mayReceive { self.membership.attach(self) }
        self.log(.debug, "websocket open", self.permission == .both ? [:] : ["auth.allow": "\(self.permission.rawValue)"], context: context)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.leave()
        self.state = .closed
    }

    func channelInactive(context: ChannelHandlerContext) {
        // Gone without a close handshake (1006): the client dropped it (the node's own drops
        // are counted where it makes them).
        self.countClose(code: .abnormalClosure, byClient: true)
        self.leave()
        self.state = .closed
        self.writer.removeAll()
        self.unread.removeAll()
        self.log(.debug, "websocket closed", context: context)
        context.fireChannelInactive()
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
        self.keepalive?.cancel()
        self.keepalive = nil
        self.slowTimer?.cancel()
        self.closeTimer?.cancel()
        self.membership.leave()
    }

    /// Logs `message` with this connection's metadata and `extra`, both made only when `level`
    /// is logged.
    private func log(_ level: Logger.Level, _ message: @autoclosure () -> Logger.Message, _ extra: @autoclosure () -> Logger.Metadata = [:], context: ChannelHandlerContext) {
        self.logger.log(level: level, message(), metadata: {
            var metadata = extra()
            metadata["connection.id"] = "\(self.id)"
            metadata["channel"] = "\(self.membership.channel.name)"
            if let remote = context.channel.remoteAddress { metadata["remote"] = "\(remote)" }
            return metadata
        }())
    }

    /// Runs `task` on the connection's event loop after `delay`.
    private func schedule(in delay: TimeAmount, context: ChannelHandlerContext, _ task: @escaping () -> Void) -> Scheduled<Void> {
        // assumeIsolated: handler methods run on the connection's event loop, `context.eventLoop`.
        context.eventLoop.assumeIsolated().scheduleTask(in: delay, task)
    }

    // MARK: Outbound (ChannelReceiver, called by the loop hub)

    /// Queues a framed message; the hub flushes once per tick. False when it was not queued
    /// (the receiver is closing, or is closed for it now as a slow consumer).
    @inline(__always) @discardableResult
    func enqueue(_ message: FramedMessage) -> Bool {
        guard case .open(let context) = self.state else { return false }
        if !context.channel.isWritable {
            // NIO holds a full send buffer: a hard cap at twice it, and a grace timer.
            if self.writer.queuedBytes(on: context.channel) + message.bytes.readableBytes > 2 * self.limits.sendBuffer {
                self.closeSlowConsumer(context: context)
                return false
            }
            if self.slowTimer == nil {
                self.armSlowTimer(context: context)
            }
        }
        if self.writer.append(message.bytes, allocator: context.channel.allocator) { self.handOver(context) }
        self.requestFlush()
        return true
    }

    @inline(__always)
    private func requestFlush() {
        if !self.flushRequested {
            self.flushRequested = true
            self.loopHub.flushAtEndOfTick(self)
        }
    }

    /// Hands NIO what it will take (whole frames, until it is over the send buffer) and flushes.
    func flushQueued() {
        self.flushRequested = false
        guard let context = self.writableContext else { return }
        self.flushWriter(context)
        if self.isOpen, self.writer.isBackedUp, self.slowTimer == nil {
            self.armSlowTimer(context: context)
        }
    }

    // MARK: Writing (each call into NIO between short accesses to `writer`: see OutboundWriter)

    /// Hands NIO whole frames while it takes them.
    private func handOver(_ context: ChannelHandlerContext) {
        while context.channel.isWritable, let frame = self.writer.popFrame() {
            context.write(NIOAny(frame), promise: nil)
        }
    }

    /// Hands NIO what it will take (the waiting pong first, then whole frames) and flushes.
    private func flushWriter(_ context: ChannelHandlerContext) {
        if context.channel.isWritable, let pong = self.writer.takePong() {
            context.write(NIOAny(pong), promise: nil)
        }
        self.handOver(context)
        context.flush()
    }

    /// Writes every waiting frame, whatever NIO holds already (before a close frame); drops
    /// the waiting pong. Does not flush.
    private func writeAllWaiting(_ context: ChannelHandlerContext) {
        while let frame = self.writer.popFrame() {
            context.write(NIOAny(frame), promise: nil)
        }
        _ = self.writer.takePong()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            self.flushQueued()
            if !self.writer.isBackedUp {
                self.slowTimer?.cancel()
                self.slowTimer = nil
            }
        }
        context.fireChannelWritabilityChanged()
    }

    /// After the grace period, a receiver still holding more than its send buffer is closed;
    /// one that drained below it but is still backed up gets another period.
    private func armSlowTimer(context: ChannelHandlerContext) {
        self.slowTimer = self.schedule(in: self.limits.slowConsumerGrace, context: context) { [self] in
            self.slowTimer = nil
            guard self.isOpen else { return }
            if self.writer.queuedBytes(on: context.channel) > self.limits.sendBuffer {
                self.closeSlowConsumer(context: context)
            } else if self.writer.hasFramesWaiting || !context.channel.isWritable {
                self.armSlowTimer(context: context)
            }
        }
    }

    /// Drops what was queued behind the frames NIO holds (so the client gets whole frames
    /// only), then closes with 1008.
    private func closeSlowConsumer(context: ChannelHandlerContext) {
        self.counters.slowConsumersClosed.wrappingIncrement(ordering: .relaxed)
        self.counters.slowConsumerDroppedBytes.wrappingIncrement(by: self.writer.outboxBytes, ordering: .relaxed)
        self.log(.warning, "closing slow consumer", [
            "send_buffer": "\(self.limits.sendBuffer)", "queued": "\(self.writer.queuedBytes(on: context.channel))",
        ], context: context)
        self.writer.removeAll()
        self.close(code: .policyViolation, reason: "slow consumer")
    }

    // MARK: Inbound

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if case .closed = self.state { return }
        self.awaitingPong = false
        self.lastRead = context.eventLoop.now
        self.process(self.unread.appending(self.unwrapInboundIn(data)), context: context)
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
                if self.unread.keepRest(of: bytes, allocator: context.channel.allocator) {
                    context.channel.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
                }
                return
            case .relay(let frame, let headerLength, let isText):
                budget -= self.relay(FramedMessage(bytes: frame, headerLength: headerLength), isText: isText)
                if budget <= 0, bytes.readableBytes > 0 {
                    return self.pauseReading(holding: bytes, context: context)
                }
            case .pong(let pong):
                self.writer.appendPong(pong, writable: context.channel.isWritable, allocator: context.channel.allocator)
                self.requestFlush()
                budget -= 1
            case .close(let code, let reason):
                self.close(code: code, reason: reason)
                if !self.machine.awaitsClose { return }
            case .replyToClose(let reply):
                return self.answerClose(with: reply, context: context)
            case .closed:
                context.close(promise: nil)
                return
            }
        }
    }

    /// Publishes a client's message (when the hook let it publish); returns the work it made.
    @inline(__always)
    private func relay(_ message: FramedMessage, isText: Bool) -> Int {
        let stats = self.loopHub.counters
        guard self.mayPublish else {
            LoopCounters.add(1, to: stats.droppedSubscribeOnly)
            return 1
        }
        LoopCounters.add(1, to: stats.websocketMessages)
        LoopCounters.add(message.payloadLength, to: stats.bytesReceived)
        return self.membership.publish(message, isText: isText, connectionID: self.id)
    }

    /// Holds the rest of `bytes`, with reading paused, for a later loop turn.
    private func pauseReading(holding bytes: ByteBuffer, context: ChannelHandlerContext) {
        if self.unread.hold(bytes) {
            context.channel.setOption(ChannelOptions.autoRead, value: false).whenComplete { _ in }
        }
        _ = self.schedule(in: Self.pause, context: context) { [self] in
            guard let context = self.writableContext, let unread = self.unread.take() else { return }
            self.process(unread, context: context)
        }
    }

    // MARK: Closing

    /// The client closed: echo its close (a valid one without a reason; one with a reason is
    /// the node failing a broken close, 1002 or 1007), then drop the connection.
    private func answerClose(with reply: ByteBuffer, context: ChannelHandlerContext) {
        let (code, failed) = Framing.closeCode(ofServerFrame: reply)
        self.countClose(code: code, byClient: !failed)
        self.leave()
        self.state = .closing(context)
        self.writer.removeAll()
        self.armCloseTimer(context: context)
        self.writeThenClose(reply, context: context)
    }

    /// Starts the closing handshake: what is queued, then the close frame; no more messages in
    /// either direction, and the connection is dropped if the client has not answered in time.
    func close(code: WebSocketErrorCode, reason: String) {
        guard case .open(let context) = self.state else { return }
        self.state = .closing(context)
        _ = self.machine.startClosing()
        self.countClose(code: code, byClient: false)
        self.leave()
        self.log(.debug, "closing websocket", ["close.code": "\(UInt16(webSocketErrorCode: code))", "close.reason": "\(reason)"], context: context)
        self.writeAllWaiting(context)
        let frame = Framing.closeFrame(code: code, reason: reason, allocator: context.channel.allocator)
        if self.machine.awaitsClose {
            context.writeAndFlush(self.wrapOutboundOut(frame), promise: nil)
        } else {
            // The client's own close was the bad frame: nothing more will come.
            self.writeThenClose(frame, context: context)
        }
        self.armCloseTimer(context: context)
    }

    private func writeThenClose(_ frame: ByteBuffer, context: ChannelHandlerContext) {
        // assumeIsolated: the write completes on the connection's event loop, `context.eventLoop`.
        context.writeAndFlush(self.wrapOutboundOut(frame)).assumeIsolated().whenComplete { _ in context.close(promise: nil) }
    }

    private func armCloseTimer(context: ChannelHandlerContext) {
        self.closeTimer?.cancel()
        self.closeTimer = self.schedule(in: max(self.limits.shutdownTimeout, .seconds(1)), context: context) {
            context.close(promise: nil)
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        switch event {
        case is ChannelShouldQuiesceEvent:  // the node is stopping
            self.close(code: .goingAway, reason: "server shutting down")
        default:
            context.fireUserInboundEventTriggered(event)
        }
    }

    // MARK: Keepalive

    private func armKeepalive(at deadline: NIODeadline, context: ChannelHandlerContext) {
        // Only fails once the loop is shutting down, when no connection is left to ping.
        self.keepalive = try? context.eventLoop.scheduleCallback(at: deadline, handler: Keepalive(handler: self))
    }

    /// The keepalive is due: the pong timeout ran out (close), or the client may have been
    /// silent for the ping interval (ping it, or wait for the rest of the interval).
    fileprivate func keepaliveDue() {
        self.keepalive = nil
        guard case .open(let context) = self.state else { return }
        if self.awaitingPong {
            return self.close(code: .goingAway, reason: "no pong within the pong timeout")
        }
        let now = context.eventLoop.now
        let silentEnough = self.lastRead + self.limits.pingInterval
        guard now >= silentEnough else { return self.armKeepalive(at: silentEnough, context: context) }
        self.awaitingPong = true
        var ping = context.channel.allocator.buffer(capacity: 2)
        Framing.writeHeader(into: &ping, opcode: .ping, length: 0)
        context.writeAndFlush(self.wrapOutboundOut(ping), promise: nil)
        self.armKeepalive(at: now + self.limits.pongTimeout, context: context)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        self.log(.debug, "websocket error", ["error": "\(error)"], context: context)
        self.countClose(code: .abnormalClosure, byClient: false)
        context.close(promise: nil)
    }
}

/// The keepalive's callback: its handler, in a struct of one reference (held inline, where NIO's
/// isolated `scheduleCallback` would box a loop-bound wrapper for every arming).
private struct Keepalive: NIOScheduledCallbackHandler, @unchecked Sendable {
    // @unchecked: armed on the connection's event loop and run there, like the handler it calls.
    let handler: WebSocketHandler

    func handleScheduledCallback(eventLoop: some EventLoop) {
        self.handler.keepaliveDue()
    }
}
