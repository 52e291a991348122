import Logging
import NIOCore
import NIOHTTP1

/// The authorization hook: asking it, waiting without reading, acting on its decision.
extension HTTPHandler {
    /// Asks the hook about a request that passed every other check, reading nothing more from
    /// the connection until it has answered. The hook gets until `auth_timeout` or the
    /// request's deadline, whichever comes first; then the client gets 503.
    func authorize(_ head: HTTPRequestHead, channel name: String, then next: Authorized, context: ChannelHandlerContext) {
        guard let authorizer = self.shared.authorizer else {
            // auth_url is set but there is no client to ask it with: refuse, never admit.
            return self.reject(head, .serviceUnavailable, "authorization hook not available", close: true, context: context)
        }
        context.channel.setOption(ChannelOptions.autoRead, value: false).whenComplete { _ in }
        self.state = .authorizing(head, channel: name, then: next)
        let headers = HookRequest.headers(for: head, channel: name, peerIP: context.channel.remoteAddress?.ipAddress)
        self.hookAsked = context.eventLoop.now
        let deadline = min(self.hookAsked + authorizer.settings.timeout, self.requestDeadline)
        let call = authorizer.ask(headers: headers, within: deadline - self.hookAsked, on: context.eventLoop)
        self.hookCall = call
        if deadline < self.requestDeadline {
            self.hookTimer = context.eventLoop.assumeIsolated().scheduleTask(deadline: deadline) { [self] in
                self.hookTimedOut(context: context)
            }
        }
        call.answer.assumeIsolated().whenSuccess { [self] decision in
            // A call given up on (time ran out, the client left) has nothing more to say.
            guard self.hookCall === call else { return }
            self.hookCall = nil
            self.hookTimer?.cancel()
            self.hookTimer = nil
            self.authorized(decision, context: context)
        }
    }

    /// The hook's deadline or the request's passed with the call still pending.
    func hookTimedOut(context: ChannelHandlerContext) {
        guard let call = self.hookCall else { return }
        self.hookCall = nil
        self.hookTimer?.cancel()
        self.hookTimer = nil
        call.cancel()
        let waited = context.eventLoop.now - self.hookAsked
        self.authorized(.unavailable(HookFailure(.timeout, "authorization hook did not answer within \(waited.nanoseconds / 1_000_000) ms")), context: context)
    }

    func abandonHookCall() {
        self.hookTimer?.cancel()
        self.hookTimer = nil
        if let call = self.hookCall {
            self.hookCall = nil
            call.cancel()
        }
    }

    /// Acts on the hook's decision for the request in `.authorizing`.
    func authorized(_ decision: HookDecision, context: ChannelHandlerContext) {
        guard case .authorizing(let head, let name, let next) = self.state else { return }
        guard context.channel.isActive else {
            self.state = .idle
            return
        }
        self.shared.authorizer?.record(decision)
        switch decision {
        case .admit(let permission):
            self.logger.debug("authorization hook admitted", metadata: ["auth.allow": "\(permission.rawValue)"])
            switch next {
            case .upgrade(let key):
                self.join(head, channel: name, key: key, permission: permission, context: context)
            case .post where !permission.mayPublish:
                self.refuseAuthorized(head, next, .forbidden, "this client may only subscribe (X-Staps-Allow: subscribe)", context: context)
            case .post:
                self.receiveBody(head, channel: name, context: context)
                self.resumeReading(context: context)
            }
        case .passOn(let status, let wwwAuthenticate):
            self.logger.debug("authorization hook refused", metadata: ["http.status": "\(status)"])
            let reason = status == 401 ? "authorization required" : "forbidden by the authorization hook"
            self.refuseAuthorized(head, next, HTTPResponseStatus(statusCode: status), reason, extraHeaders: wwwAuthenticate.map { ("WWW-Authenticate", $0) }, context: context)
        case .unavailable(let failure):
            self.logger.debug("authorization hook failed", metadata: ["auth.failure": "\(failure.reason.rawValue)"])
            self.refuseAuthorized(head, next, .serviceUnavailable, failure.message, close: true, context: context)
        }
    }

    /// Answers a request the hook did not admit: an upgrade at once (its `.end` was read, and
    /// NIO's parser reads nothing after it, so the connection closes); a POST as `reject` does,
    /// never reading a body.
    func refuseAuthorized(_ head: HTTPRequestHead, _ next: Authorized, _ status: HTTPResponseStatus, _ reason: String, extraHeaders: [(String, String)] = [], close: Bool = false, context: ChannelHandlerContext) {
        switch next {
        case .upgrade:
            self.state = .idle
            self.respond(context: context, head: head, status: status, text: reason, extraHeaders: extraHeaders, close: true)
        case .post:
            self.reject(head, status, reason, close: close, extraHeaders: extraHeaders, context: context)
            self.resumeReading(context: context)
        }
    }

    /// Reads again after the hook answered a POST, beginning with what arrived meanwhile.
    func resumeReading(context: ChannelHandlerContext) {
        guard !self.closing, !self.responding else { return }
        context.channel.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
        self.releaseHeld(context: context)
    }
}
