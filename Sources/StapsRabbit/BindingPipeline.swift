import NIOCore
import RabbitClient

/// The binds and unbinds of this node's queue on their way to the broker: the `Topology` state
/// machine (which binding keys are wanted, bound, in flight), the requests it counts as in
/// flight that the socket has not taken yet, and when the broker last answered one. No I/O: the
/// link's thread writes what `nextUnsent()` gives and reports each answer with `answered(_:)`.
///
/// Confined to the link's thread, like the `LinkWorker` that holds it.
struct BindingPipeline {
    /// A join waiting for its key's `bind-ok` (nil when it proceeded already).
    typealias Waiter = EventLoopPromise<Void>?
    typealias Request = Topology<Waiter>.Request

    private var topology: Topology<Waiter>
    private var unsent: [Request] = []
    private var unsentHead = 0
    /// When the broker last answered a bind or unbind, or one was sent with none in flight:
    /// what the link's answer timeout is measured from.
    private(set) var lastProgress = NIODeadline.now()

    init(linger: TimeAmount) {
        self.topology = Topology(linger: linger)
    }

    /// Binds and unbinds sent (or queued) and not answered yet.
    var inFlight: Int { self.topology.requestsInFlight }
    /// Binding keys wanted and not bound again yet after a reconnection.
    var rebindsLeft: Int { self.topology.rebindsLeft }
    /// Binding keys the broker confirmed on the current connection.
    var boundCount: Int { self.topology.bound.count }

    /// A new connection is up: every wanted key is to be bound again.
    mutating func connected(now: NIODeadline) {
        self.topology.connected()
        self.lastProgress = now
    }

    /// The connection is gone: nothing is bound, in flight or unsent. Returns every join that
    /// was waiting (the link lets them proceed, or fails them when it stops).
    mutating func disconnected() -> [Waiter] {
        self.unsent = []
        self.unsentHead = 0
        return self.topology.disconnected()
    }

    /// What the event loops asked for (see `LoopHandoff`). Returns the joins that may proceed
    /// now (bound already, or the broker is down: local service); the binds still needed are
    /// queued.
    mutating func handle(_ commands: [LoopHandoff.Command], now: NIODeadline) -> [Waiter] {
        var ready: [Waiter] = []
        var requests: [Request] = []
        for command in commands {
            let wanted: (key: String, waiter: Waiter)
            switch command {
            case .firstChannel(let key, let promise): wanted = (key, promise)
            case .awaitBinding(let key, let promise): wanted = (key, promise)
            case .lastChannelGone(let key):
                self.topology.linger(key, now: now)
                continue
            }
            let (proceed, send) = self.topology.want(wanted.key, wanted.waiter)
            if let proceed { ready.append(proceed) }
            if let send { requests.append(send) }
        }
        self.queue(requests, now: now)
        return ready
    }

    /// Queues the unbinds of keys whose linger ended (`keep` may claim one back: see
    /// `Topology.expire`), then the next rebinds after a reconnection.
    mutating func expireAndRebind(now: NIODeadline, keep: (String) -> Bool) {
        self.queue(self.topology.expire(now: now, keep: keep), now: now)
        self.queue(self.topology.nextRebinds(), now: now)
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

    /// The broker answered the oldest bind or unbind: its key, whether that key is now bound
    /// with nothing in flight to change it, and the joins it lets proceed.
    mutating func answered(_ operation: TopologyMethod, now: NIODeadline) throws(Topology<Waiter>.OutOfOrder) -> (key: String, settled: Bool, waiters: [Waiter]) {
        let (key, waiters) = try self.topology.answered(operation)
        self.lastProgress = now
        return (key, self.topology.isSettled(key), waiters)
    }

    /// Requests the topology now counts as in flight, to write; the answer timeout starts
    /// with the first of them when nothing was in flight before.
    private mutating func queue(_ requests: [Request], now: NIODeadline) {
        guard !requests.isEmpty else { return }
        if self.topology.requestsInFlight == requests.count { self.lastProgress = now }
        self.unsent.append(contentsOf: requests)
    }
}
