import Logging
import NIOCore
import NIOHTTP1

/// Serves one connection's HTTP: the page, POST publishing, and the websocket handshake, which
/// `WebSocketUpgrade` completes by switching the connection over; with `auth_url`, a request
/// waits for the hook (`HookWait`) before it is upgraded or its body read.
final class HTTPHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let shared: Shared
    private let overConnectionLimit: Bool
    private let encoder: HTTPResponseEncoder
    private let decoder: ByteToMessageHandler<HTTPRequestDecoder>
    /// The node's logger, for the websocket handler (which adds its metadata per line logged).
    private let nodeLogger: Logger
    /// The node's, with this connection's metadata.
    private var logger: Logger

    private enum State {
        case idle
        case receivingBody(HTTPRequestHead, channel: String, ByteBuffer)
        /// A bodiless request that gets an error: answered at its `.end`.
        case rejecting(HTTPRequestHead, Refusal)
        case ignoringBody
        /// A valid upgrade request whose `.end` has not arrived yet.
        case awaitingUpgradeEnd(HTTPRequestHead, WebSocketUpgrade)
        /// Waiting for the authorization hook, reading nothing: for an upgrade, after its
        /// `.end`; for a POST, before its body.
        case authorizing(HTTPRequestHead, channel: String, HookedRequest)
        case upgrading
    }
    private var state = State.idle
    private var isAuthorizing: Bool {
        if case .authorizing = self.state { return true }
        return false
    }
    private var isIdle: Bool {
        if case .idle = self.state { return true }
        return false
    }
    /// Whether requests are asked about (`auth_url` is set): then a missing hook client refuses.
    private var isHooked: Bool { self.shared.access.hook.url != nil }
    /// One deadline from accept until the request is complete and answered (head, body and
    /// response, whatever the state of reading); re-armed for the next keep-alive request.
    /// Hand-written: NIO's `IdleStateHandler` times silence, which a byte a second defeats.
    private var requestTimer: Scheduled<Void>?
    private var requestDeadline = NIODeadline.now()
    private let hookWait = HookWait()
    /// The head of the request being answered, until its response is written.
    private var currentHead: HTTPRequestHead?
    private var pipelining = HTTPPipelining()

    private static let shuttingDownRefusal = Refusal(status: .serviceUnavailable, reason: "server shutting down", closes: true)

    init(shared: Shared, overConnectionLimit: Bool, encoder: HTTPResponseEncoder, decoder: ByteToMessageHandler<HTTPRequestDecoder>, logger: Logger) {
        self.shared = shared
        self.overConnectionLimit = overConnectionLimit
        self.encoder = encoder
        self.decoder = decoder
        self.nodeLogger = logger
        self.logger = logger
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if let remote = context.channel.remoteAddress { self.logger[metadataKey: "remote"] = "\(remote)" }
        self.armRequestTimer(context: context)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.requestTimer?.cancel()
        self.hookWait.abandon()
    }

    /// A client that leaves while its hook call is pending: the call stops, its slot is given
    /// back, and its answer (if any still comes) is ignored.
    func channelInactive(context: ChannelHandlerContext) {
        self.hookWait.abandon()
        context.fireChannelInactive()
    }

    // MARK: - Reading requests

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if let part = self.pipelining.received(self.unwrapInboundIn(data), waiting: self.isAuthorizing) {
            self.handle(part, context: context)
        }
    }

    /// Handles held parts until a response is in flight again.
    private func releaseHeld(context: ChannelHandlerContext) {
        while let part = self.pipelining.nextHeld(waiting: self.isAuthorizing) {
            self.handle(part, context: context)
        }
        if self.pipelining.isDrained(waiting: self.isAuthorizing), context.channel.isActive {
            context.close(promise: nil)
        }
    }

    private func handle(_ part: HTTPServerRequestPart, context: ChannelHandlerContext) {
        switch part {
        case .head(let head):
            self.requestHead(head, context: context)
        case .body(let chunk):
            guard case .receivingBody(let head, let channel, var body) = self.state else { return }
            self.state = .idle  // so `body` is uniquely referenced while it grows
            if body.readableBytes + chunk.readableBytes > self.shared.limits.maxMessageSize {
                // Known to be too large now: answer now, read no more of it.
                self.reject(head, RequestRoute.tooLarge(self.shared.limits.maxMessageSize), context: context)
            } else {
                body.writeImmutableBuffer(chunk)
                self.state = .receivingBody(head, channel: channel, body)
            }
        case .end:
            switch self.state {
            case .receivingBody(let head, let channel, let body):
                self.state = .idle
                self.post(head, channel: channel, body: body, context: context)
            case .rejecting(let head, let refusal):
                self.state = .idle
                self.respond(head, refusal, context: context)
            case .ignoringBody:
                self.state = .idle
            case .awaitingUpgradeEnd(let head, let upgrade):
                if self.pipelining.shuttingDown {
                    // No websocket starts now: answer at once, without asking the hook.
                    self.reject(head, Self.shuttingDownRefusal, context: context)
                } else if self.isHooked {
                    self.authorize(head, channel: upgrade.channel, .upgrade(upgrade), context: context)
                } else {
                    self.join(head, upgrade, permission: .both, context: context)
                }
            case .idle, .upgrading, .authorizing:
                break
            }
        }
    }

    private func requestHead(_ head: HTTPRequestHead, context: ChannelHandlerContext) {
        self.currentHead = head
        self.pipelining.requestStarted(head)
        if self.overConnectionLimit {
            self.shared.counters.connectionsRefused.wrappingIncrement(ordering: .relaxed)
            return self.reject(head, Refusal(status: .serviceUnavailable, reason: "too many connections, try again later", closes: true), context: context)
        }
        switch RequestRoute.of(head, access: self.shared.access, maxMessageSize: self.shared.limits.maxMessageSize) {
        case .page(let page):
            self.state = .ignoringBody
            self.writeResponse(context: context, head: head, status: .ok, contentType: "text/html; charset=utf-8", body: page.html, keepAlive: head.isKeepAlive, omitBody: head.method == .HEAD, extraHeaders: page.headers)
        case .post(let channel) where self.isHooked:
            // Asked before the body is read: a refused body is never read.
            self.authorize(head, channel: channel, .post, context: context)
        case .post(let channel):
            self.receiveBody(head, channel: channel, context: context)
        case .upgrade(let upgrade):
            // Nothing more is read until the pipeline is a websocket one.
            context.channel.setOption(ChannelOptions.autoRead, value: false).whenComplete { _ in }
            self.state = .awaitingUpgradeEnd(head, upgrade)
        case .refuse(let refusal):
            self.reject(head, refusal, context: context)
        }
    }

    private func receiveBody(_ head: HTTPRequestHead, channel name: String, context: ChannelHandlerContext) {
        self.state = .receivingBody(head, channel: name, context.channel.allocator.buffer(capacity: 0))
        if head.headers[canonicalForm: "expect"].contains(where: { $0.lowercased() == "100-continue" }) {
            context.writeAndFlush(self.wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: .continue))), promise: nil)
        }
    }

    private func post(_ head: HTTPRequestHead, channel: String, body: ByteBuffer, context: ChannelHandlerContext) {
        let (isText, refusal) = RequestRoute.publication(of: body, head)
        if let refusal { return self.respond(head, refusal, context: context) }
        let receivers = self.shared.hub.publish(channel: channel, payload: body, isText: isText, on: context.eventLoop)
        let json = "{\"channel\":\"\(Page.jsonEscaped(channel))\",\"receivers\":\(receivers)}\n"
        self.writeResponse(context: context, head: head, status: .accepted, contentType: "application/json", body: json, keepAlive: head.isKeepAlive)
    }

    // MARK: - The authorization hook and the upgrade

    /// Asks the hook about a request that passed every other check, reading nothing more from
    /// the connection until it has answered; its deadline is the request's at the latest.
    private func authorize(_ head: HTTPRequestHead, channel: String, _ request: HookedRequest, context: ChannelHandlerContext) {
        guard let authorizer = self.shared.authorizer else {
            // auth_url is set but there is no client to ask it with: refuse, never admit.
            return self.reject(head, Refusal(status: .serviceUnavailable, reason: "authorization hook not available", closes: true), context: context)
        }
        context.channel.setOption(ChannelOptions.autoRead, value: false).whenComplete { _ in }
        self.state = .authorizing(head, channel: channel, request)
        let headers = HookRequest.headers(for: head, channel: channel, peerIP: context.channel.remoteAddress?.ipAddress)
        self.hookWait.ask(authorizer, headers: headers, requestDeadline: self.requestDeadline, on: context.eventLoop) { [self] decision in
            self.authorized(decision, context: context)
        }
    }

    /// Acts on the hook's decision for the request in `.authorizing`.
    private func authorized(_ decision: HookDecision, context: ChannelHandlerContext) {
        guard case .authorizing(let head, let channel, let request) = self.state else { return }
        guard context.channel.isActive else {
            self.state = .idle
            return
        }
        self.shared.authorizer?.record(decision)
        decision.log(to: self.logger)
        switch request.outcome(of: decision) {
        case .upgrade(let upgrade, let permission):
            self.join(head, upgrade, permission: permission, context: context)
        case .receiveBody:
            self.receiveBody(head, channel: channel, context: context)
            self.resumeReading(context: context)
        case .refuse(let refusal):
            self.reject(head, refusal, context: context)
            self.resumeReading(context: context)
        }
    }

    /// Reads again after the hook answered a POST, beginning with what arrived meanwhile.
    private func resumeReading(context: ChannelHandlerContext) {
        guard !self.pipelining.isAnswering else { return }
        context.channel.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
        self.releaseHeld(context: context)
    }

    /// Joins the staps channel (bound in the cluster when clustered), then switches the
    /// connection to the websocket protocol. Until the websocket handler holds the membership,
    /// every path that gives up leaves it.
    private func join(_ head: HTTPRequestHead, _ upgrade: WebSocketUpgrade, permission: Permission, context: ChannelHandlerContext) {
        self.state = .upgrading
        let (membership, ready) = self.shared.hub.join(upgrade.channel, on: context.eventLoop)
        let id = self.shared.connectionIDs.wrappingIncrementThenLoad(ordering: .relaxed)
        self.logger[metadataKey: "connection.id"] = "\(id)"
        self.logger[metadataKey: "channel"] = "\(upgrade.channel)"
        // `Hub.join` hops `ready` to this connection's loop.
        ready.assumeIsolated().whenComplete { [self] result in
            switch result {
            case .success:
                guard context.channel.isActive else {
                    membership.leave()
                    return context.close(promise: nil)
                }
                guard !self.pipelining.shuttingDown else {
                    membership.leave()
                    return self.reject(head, Self.shuttingDownRefusal, context: context)
                }
                upgrade.switchProtocols(context, codec: [self.decoder, self.encoder], membership: membership, id: id, permission: permission, shared: self.shared, logger: self.nodeLogger)
            case .failure(let error):
                membership.leave()
                self.logger.warning("the channel's cluster binding failed", metadata: ["error": "\(error)"])
                self.reject(head, Refusal(status: .serviceUnavailable, reason: "the channel's cluster binding failed: \(error)", closes: true), context: context)
            }
        }
    }

    // MARK: - Answering

    private func armRequestTimer(context: ChannelHandlerContext) {
        self.requestTimer?.cancel()
        // The loop's clock (virtual on an EmbeddedEventLoop), like every deadline here.
        self.requestDeadline = context.eventLoop.now + self.shared.limits.handshakeTimeout
        // Handlers run on their connection's loop, and so does this task.
        self.requestTimer = context.eventLoop.assumeIsolated().scheduleTask(deadline: self.requestDeadline) { [self] in
            self.requestTimedOut(context: context)
        }
    }

    private func requestTimedOut(context: ChannelHandlerContext) {
        // Still waiting for the hook: the hook's failure (503), not the client's (408).
        if case .authorizing = self.state {
            if let failure = self.hookWait.timeOut(now: context.eventLoop.now) { self.authorized(failure, context: context) }
            return
        }
        // Mid-response or mid-upgrade there is nothing left to say.
        if self.pipelining.isAnswering { return context.close(promise: nil) }
        if case .upgrading = self.state { return context.close(promise: nil) }
        self.state = .ignoringBody
        // The request's own head when it has arrived (an upgrade's 408 counts as a refused handshake).
        let head = self.currentHead ?? HTTPRequestHead(version: .http1_1, method: .GET, uri: "/")
        self.respond(head, Refusal(status: .requestTimeout, reason: "request not complete within \(self.shared.limits.handshakeTimeout.nanoseconds / 1_000_000) ms", closes: true), context: context)
    }

    /// Answers an error: at the request's `.end` when it has no body, else at once, closing
    /// the connection (a body nobody wants is never read).
    private func reject(_ head: HTTPRequestHead, _ refusal: Refusal, context: ChannelHandlerContext) {
        if refusal.closes || RequestRoute.hasBody(head) {
            self.state = .ignoringBody
            var closing = refusal
            closing.closes = true
            self.respond(head, closing, context: context)
        } else {
            self.state = .rejecting(head, refusal)
        }
    }

    private func respond(_ head: HTTPRequestHead, _ refusal: Refusal, context: ChannelHandlerContext) {
        self.writeResponse(context: context, head: head, status: refusal.status, contentType: "text/plain; charset=utf-8", body: refusal.reason + "\n", keepAlive: head.isKeepAlive && !refusal.closes, extraHeaders: refusal.extraHeaders)
    }

    private func writeResponse(context: ChannelHandlerContext, head: HTTPRequestHead, status: HTTPResponseStatus, contentType: String, body: String, keepAlive: Bool, omitBody: Bool = false, extraHeaders: [(String, String)] = []) {
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: contentType)
        headers.add(name: "Content-Length", value: "\(body.utf8.count)")
        headers.add(name: "Cache-Control", value: "no-store")
        headers.add(name: "X-Staps-Node", value: self.shared.nodeID)
        for (name, value) in extraHeaders { headers.add(name: name, value: value) }
        let keepAlive = self.pipelining.responseStarted(keepAlive: keepAlive)
        self.currentHead = nil
        self.shared.counters.httpResponses.increment(Int(status.code))
        self.shared.counters.httpResponseTotal.wrappingIncrement(ordering: .relaxed)
        if WebSocketUpgrade.isRequested(by: head.headers) { self.shared.counters.handshakesRejected.increment(Int(status.code)) }
        if !keepAlive { headers.add(name: "Connection", value: "close") }
        context.write(self.wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))), promise: nil)
        if !omitBody {
            context.write(self.wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
        }
        let done = context.writeAndFlush(self.wrapOutboundOut(.end(nil)))
        if !keepAlive {
            // Written on the connection's loop, so its future completes there.
            done.assumeIsolated().whenComplete { _ in context.close(promise: nil) }
            return
        }
        // Nothing more is read until this response is written.
        context.channel.setOption(ChannelOptions.autoRead, value: false).whenComplete { _ in }
        // Written on the connection's loop, so its future completes there.
        done.assumeIsolated().whenComplete { [self] result in
            let closes = self.pipelining.responseWritten(idle: self.isIdle)
            guard case .success = result, context.channel.isActive else { return }
            self.armRequestTimer(context: context)
            if closes { return context.close(promise: nil) }
            context.channel.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
            self.releaseHeld(context: context)
        }
    }

    // MARK: - Events

    /// The node is stopping (`Node.shutdown`).
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard event is ChannelShouldQuiesceEvent else { return context.fireUserInboundEventTriggered(event) }
        if self.pipelining.quiesce(idle: self.isIdle) { context.close(promise: nil) }
        // An upgrade waiting for the hook would be dropped once admitted (no websocket
        // starts during shutdown): drop it now, its call with it. A POST is still answered.
        if case .authorizing(let head, _, .upgrade) = self.state {
            self.hookWait.abandon()
            self.reject(head, Self.shuttingDownRefusal, context: context)
        }
    }

    /// A request the decoder cannot parse gets its status (when no response is under way), then
    /// the connection closes: nothing after it can be trusted.
    func errorCaught(context: ChannelHandlerContext, error: Error) {
        self.logger.debug("http error", metadata: ["error": "\(error)"])
        guard let parserError = error as? HTTPParserError, !self.pipelining.isAnswering, self.isIdle else {
            return context.close(promise: nil)
        }
        self.state = .ignoringBody
        self.respond(HTTPRequestHead(version: .http1_1, method: .GET, uri: "/"), RequestRoute.refusal(for: parserError), context: context)
    }
}
