import Atomics
import Logging
import NIOCore
import NIOHTTP1

/// What carries the calls to the authorization hook: `HTTPHookTransport` (module `StapsHook`,
/// NIO's HTTP codec) in the node, a scripted one in the tests.
public protocol HookTransport: Sendable {
    /// Sends the hook's `GET` with `headers`; called on `eventLoop`. The future completes on `eventLoop`, never
    /// fails (a failure is a decision), at the latest soon after `timeout`; `cancel` stops
    /// the call (the future then completes soon, with whatever decision).
    func call(headers: HTTPHeaders, timeout: TimeAmount, on eventLoop: EventLoop) -> (EventLoopFuture<HookDecision>, cancel: @Sendable () -> Void)
    /// Closes its connections; no call is made after it.
    func shutdown() async
}

/// Makes the node's `HookTransport` at start, when `auth_url` is set.
public typealias HookTransportFactory = @Sendable (HookURL, HookSettings, EventLoopGroup) throws -> any HookTransport

/// The node's side of the hook: the bound on calls in flight, the counting and the logging
/// of outcomes. One per node, made at start when `auth_url` is set.
final class Authorizer: Sendable {
    let settings: HookSettings
    private let transport: any HookTransport
    private let counters: NodeCounters
    private let logger: Logger
    /// Calls in flight, node-wide (the cold path: one atomic add per call).
    private let inFlight = ManagedAtomic<Int>(0)
    /// When the next failure may be logged as a warning (uptime nanoseconds).
    private let nextWarning = ManagedAtomic<UInt64>(0)

    init(settings: HookSettings, transport: any HookTransport, counters: NodeCounters, logger: Logger) {
        self.settings = settings
        self.transport = transport
        self.counters = counters
        self.logger = logger
    }

    /// Calls the hook now in flight (for tests and status).
    var callsInFlight: Int { self.inFlight.load(ordering: .relaxed) }

    /// Starts asking the hook about one request, unless `auth_concurrency` calls are already
    /// in flight (then the call's answer is that failure, at once). The answer completes on
    /// `eventLoop`.
    func ask(headers: HTTPHeaders, within timeout: TimeAmount, on eventLoop: EventLoop) -> HookCall {
        if self.inFlight.loadThenWrappingIncrement(ordering: .relaxed) >= self.settings.concurrency {
            self.inFlight.wrappingDecrement(ordering: .relaxed)
            let failure = HookFailure(.overConcurrency, "too many authorization checks in flight, try again later")
            return HookCall(answer: eventLoop.makeSucceededFuture(.unavailable(failure)), cancel: {}, slot: nil)
        }
        let slot = HookSlot(self.inFlight)
        let (answer, cancel) = self.transport.call(headers: headers, timeout: timeout, on: eventLoop)
        answer.whenComplete { _ in slot.release() }
        return HookCall(answer: answer.hop(to: eventLoop), cancel: cancel, slot: slot)
    }

    /// Counts the decision acted on; failures are also logged (a warning at most every 10 s).
    func record(_ decision: HookDecision) {
        switch decision {
        case .admit:
            self.counters.authAdmitted.wrappingIncrement(ordering: .relaxed)
        case .passOn:
            self.counters.authDenied.wrappingIncrement(ordering: .relaxed)
        case .unavailable(let failure):
            let counter: ManagedAtomic<Int>
            switch failure.reason {
            case .errorStatus: counter = self.counters.authFailedStatus
            case .unreachable: counter = self.counters.authFailedUnreachable
            case .timeout: counter = self.counters.authFailedTimeout
            case .overConcurrency: counter = self.counters.authFailedOverConcurrency
            case .badAnswer: counter = self.counters.authFailedBadAnswer
            }
            let total = counter.wrappingIncrementThenLoad(ordering: .relaxed)
            let now = NIODeadline.now().uptimeNanoseconds
            let next = self.nextWarning.load(ordering: .relaxed)
            guard now >= next, self.nextWarning.compareExchange(expected: next, desired: now + 10_000_000_000, ordering: .relaxed).exchanged else { return }
            self.logger.warning("authorization hook failed: clients get 503", metadata: [
                "auth.failure": "\(failure.reason.rawValue)", "auth.reason": "\(failure.message)", "auth.failures": "\(total)",
            ])
        }
    }

    func shutdown() async {
        await self.transport.shutdown()
    }
}

/// One of `auth_concurrency`: taken by `Authorizer.ask`, given back once, by whichever of the
/// answer and the cancellation comes first.
final class HookSlot: Sendable {
    private let inFlight: ManagedAtomic<Int>
    private let released = ManagedAtomic(false)

    init(_ inFlight: ManagedAtomic<Int>) { self.inFlight = inFlight }

    func release() {
        if !self.released.exchange(true, ordering: .relaxed) {
            self.inFlight.wrappingDecrement(ordering: .relaxed)
        }
    }
}

/// One call to the hook, held by the connection that waits for it.
final class HookCall: Sendable {
    /// Completes on the connection's event loop and never fails.
    let answer: EventLoopFuture<HookDecision>
    private let cancelTransport: @Sendable () -> Void
    private let slot: HookSlot?

    init(answer: EventLoopFuture<HookDecision>, cancel: @escaping @Sendable () -> Void, slot: HookSlot?) {
        self.answer = answer
        self.cancelTransport = cancel
        self.slot = slot
    }

    /// The connection no longer waits (its client left, or time ran out): stops the call and
    /// gives its slot back at once. Idempotent.
    func cancel() {
        self.slot?.release()
        self.cancelTransport()
    }
}
