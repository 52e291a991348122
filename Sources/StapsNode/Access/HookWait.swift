import Logging
import NIOCore
import NIOHTTP1

/// One request's wait for the authorization hook: the call, its own timer (when `auth_timeout`
/// ends before the request's deadline, whose timer serves otherwise) and when it was asked.
/// Held by the connection's `HTTPHandler`, used on its event loop only.
final class HookWait {
    private var call: HookCall?
    private var timer: Scheduled<Void>?
    private var asked = NIODeadline.now()

    /// Asks the hook, within `auth_timeout` or what is left until `requestDeadline`, whichever
    /// is less. `decided` runs once on `loop`: with the hook's decision, or with a timeout
    /// failure when `auth_timeout` runs out first; never after `timeOut` or `abandon`.
    func ask(_ authorizer: Authorizer, headers: HTTPHeaders, requestDeadline: NIODeadline, on loop: EventLoop, decided: @escaping (HookDecision) -> Void) {
        self.asked = loop.now
        let deadline = min(self.asked + authorizer.settings.timeout, requestDeadline)
        let call = authorizer.ask(headers: headers, within: deadline - self.asked, on: loop)
        self.call = call
        if deadline < requestDeadline {
            // Called on `loop` (the connection's handler asks), where the task runs too.
            self.timer = loop.assumeIsolated().scheduleTask(deadline: deadline) { [self] in
                if let failure = self.timeOut(now: loop.now) { decided(failure) }
            }
        }
        // The answer completes on `loop` (`Authorizer.ask` hops it there).
        call.answer.assumeIsolated().whenSuccess { [self] decision in
            // A call given up on (time ran out, the client left) has nothing more to say.
            guard self.call === call else { return }
            self.call = nil
            self.cancelTimer()
            decided(decision)
        }
    }

    /// Gives up on the pending call because its time ran out: the failure to act on, or nil
    /// when no call is pending.
    func timeOut(now: NIODeadline) -> HookDecision? {
        guard self.call != nil else { return nil }
        self.abandon()
        return .unavailable(HookFailure(.timeout, "authorization hook did not answer within \((now - self.asked).nanoseconds / 1_000_000) ms"))
    }

    /// The request no longer waits (its client left, the node is stopping): the call stops,
    /// its slot is given back, and its answer, if one still comes, is ignored. Idempotent.
    func abandon() {
        self.cancelTimer()
        if let call = self.call {
            self.call = nil
            call.cancel()
        }
    }

    private func cancelTimer() {
        self.timer?.cancel()
        self.timer = nil
    }
}

/// What a request the hook is asked about goes on to.
enum HookedRequest {
    case upgrade(WebSocketUpgrade)
    case post

    /// What the hook's decision means for this request (pure).
    enum Outcome {
        case upgrade(WebSocketUpgrade, Permission)
        /// A POST admitted to publish: its body is read now.
        case receiveBody
        case refuse(Refusal)
    }

    func outcome(of decision: HookDecision) -> Outcome {
        var refusal: Refusal
        switch decision {
        case .admit(let permission):
            switch self {
            case .upgrade(let upgrade): return .upgrade(upgrade, permission)
            case .post where permission.mayPublish: return .receiveBody
            case .post: refusal = Refusal(status: .forbidden, reason: "this client may only subscribe (X-Staps-Allow: subscribe)")
            }
        case .passOn(let status, let wwwAuthenticate):
            let reason = status == 401 ? "authorization required" : "forbidden by the authorization hook"
            refusal = Refusal(status: HTTPResponseStatus(statusCode: status), reason: reason, extraHeaders: wwwAuthenticate.map { ("WWW-Authenticate", $0) })
        case .unavailable(let failure):
            refusal = Refusal(status: .serviceUnavailable, reason: failure.message, closes: true)
        }
        // An upgrade's `.end` was read, and NIO's parser reads nothing after it: its refusal closes.
        if case .upgrade = self { refusal.closes = true }
        return .refuse(refusal)
    }
}

extension HookDecision {
    /// One debug line per decision acted on (failures are also counted and warned about by `Authorizer.record`).
    func log(to logger: Logger) {
        switch self {
        case .admit(let permission):
            logger.debug("authorization hook admitted", metadata: ["auth.allow": "\(permission.rawValue)"])
        case .passOn(let status, _):
            logger.debug("authorization hook refused", metadata: ["http.status": "\(status)"])
        case .unavailable(let failure):
            logger.debug("authorization hook failed", metadata: ["auth.failure": "\(failure.reason.rawValue)"])
        }
    }
}
