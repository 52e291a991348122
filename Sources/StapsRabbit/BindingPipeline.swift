import NIOCore
import RabbitClient
import StapsCluster

/// The binds and unbinds of this node's queue on their way to the broker: the `BindingPolicy`
/// (which key covers each channel; `Topology` inside it: what is bound and in flight), the
/// requests it counts as in flight that the socket has not taken yet, and when the broker last
/// answered one. No I/O: the link's thread writes what `nextUnsent()` gives, reports each answer
/// with `answered(_:now:)`, and carries out each returned `Effects` (joins to let proceed, keys
/// to mark bound in the handoff).
///
/// Confined to the link's thread, like the `LinkWorker` that holds it.
struct BindingPipeline {
    /// A join waiting for its channel's binding (nil when it proceeded already).
    typealias Waiter = EventLoopPromise<Void>?
    typealias Request = Topology.Request
    typealias Effects = BindingPolicy<Waiter>.Effects

    private(set) var policy: BindingPolicy<Waiter>
    private var unsent: [Request] = []
    private var unsentHead = 0
    /// When the broker last answered a bind or unbind, or one was sent with none in flight:
    /// what the link's answer timeout is measured from.
    private(set) var lastProgress = NIODeadline.now()

    init(_ settings: BindingPolicy<Waiter>.Settings) {
        self.policy = BindingPolicy(settings)
    }

    var topology: Topology { self.policy.topology }
    /// Binds and unbinds sent (or queued) and not answered yet.
    var inFlight: Int { self.policy.topology.requestsInFlight }
    /// Binding keys not bound again yet after a reconnection.
    var rebindsLeft: Int { self.policy.rebindsLeft }
    /// Binding keys the broker confirmed on the current connection.
    var boundCount: Int { self.policy.topology.bound.count }

    /// A new connection is up: every channel is to be covered again.
    mutating func connected(now: NIODeadline) -> Effects {
        self.lastProgress = now
        self.policy.connected(now: now)
        return self.settle(now: now)
    }

    /// The connection is gone: nothing is bound, in flight or unsent. Returns every join that
    /// was waiting (the link lets them proceed, or fails them when it stops).
    mutating func disconnected() -> Effects {
        self.unsent = []
        self.unsentHead = 0
        self.policy.disconnected()
        return self.policy.takeEffects()
    }

    /// What the event loops asked for (see `LoopHandoff`).
    mutating func handle(_ commands: [LoopHandoff.Command], now: NIODeadline) -> Effects {
        for command in commands {
            switch command {
            case .firstChannel(let keys, let promise): self.policy.join(keys, promise, now: now)
            case .awaitBinding(let channel, let promise): self.policy.awaitBinding(channel, promise)
            case .lastChannelGone(let channel): self.policy.leave(channel, now: now)
            }
        }
        return self.settle(now: now)
    }

    /// Keys to unmark in the handoff as it hands over its commands (see `BindingPolicy`).
    mutating func retireCandidates() -> Set<String> { self.policy.retireCandidates() }

    /// After the commands taken with the unmarking were handled: unbinds what is still unheld.
    mutating func finishRetire(_ keys: Set<String>, now: NIODeadline) -> Effects {
        guard !keys.isEmpty else { return Effects() }
        self.policy.finishRetire(keys, now: now)
        return self.settle(now: now)
    }

    /// Lingers that ended, then the next rebinds or refinements.
    mutating func tick(now: NIODeadline) -> Effects {
        self.policy.tick(now: now)
        return self.settle(now: now)
    }

    /// The next request to write, if any waits.
    mutating func nextUnsent() -> Request? {
        guard self.unsentHead < self.unsent.count else {
            if !self.unsent.isEmpty {
                self.unsent.removeAll(keepingCapacity: true)
                self.unsentHead = 0
            }
            return nil
        }
        defer { self.unsentHead += 1 }
        return self.unsent[self.unsentHead]
    }

    /// The broker answered the oldest bind or unbind.
    mutating func answered(_ operation: TopologyMethod, now: NIODeadline) throws(Topology.OutOfOrder) -> (answer: Topology.Answer, effects: Effects) {
        let answer = try self.policy.answered(operation, now: now)
        self.lastProgress = now
        return (answer, self.settle(now: now))
    }

    /// Queues the requests the policy made; the answer timeout starts with the first of them
    /// when nothing was in flight before.
    private mutating func settle(now: NIODeadline) -> Effects {
        var effects = self.policy.takeEffects()
        if !effects.requests.isEmpty {
            if self.inFlight == effects.requests.count { self.lastProgress = now }
            self.unsent.append(contentsOf: effects.requests)
            effects.requests = []
        }
        return effects
    }
}
