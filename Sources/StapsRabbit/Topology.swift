import RabbitClient
import NIOCore

/// Which binding keys this node's queue is bound with (one per staps channel, or one per bucket
/// of channels: `RoutingKey.binding`; the link works in keys only), as a pure state machine: no I/O, so it is
/// tested in memory. The link's thread feeds it what the event loops asked for and what the
/// broker answered, and carries out the `Request`s it returns.
///
/// Binds and unbinds are pipelined: any number may be in flight on the topology AMQP channel,
/// and the broker answers them in order, so each `bind-ok`/`unbind-ok` settles the oldest
/// request. A join waits for the answer to the newest bind of its key (never one that an
/// unbind in flight will undo). After a reconnection every wanted key is rebound in the
/// background, at most `rebindWindow` at a time, while joins go first.
///
/// `Waiter` is what a join waits with (an `EventLoopPromise<Void>` in the link; anything in tests).
struct Topology<Waiter> {

    /// A method to send to the broker now.
    struct Request: Equatable, Sendable {
        var operation: TopologyMethod
        var key: String
    }

    enum Want: Equatable {
        case active
        case lingering(until: NIODeadline)
    }

    /// The broker answered something other than what the oldest request expects.
    struct OutOfOrder: Error, CustomStringConvertible {
        var expected: TopologyMethod?
        var got: TopologyMethod
        var description: String { "broker answered \(got)-ok while \(expected.map { "\($0)-ok" } ?? "nothing") was due" }
    }

    private struct InFlight {
        var request: Request
        var waiters: [Waiter]
        var isRebind: Bool
    }

    /// Keys this node wants bound: with local clients, or lingering after the last left.
    private(set) var wanted: [String: Want] = [:]
    /// Keys whose binding the broker confirmed on the current connection.
    private(set) var bound: Set<String> = []
    /// True between `connected()` and `disconnected()`.
    private(set) var isUp = false
    /// Rebinds in flight at most, so joins never queue behind a whole rebind.
    let rebindWindow: Int
    let linger: TimeAmount

    private var inFlight: [InFlight] = []
    private var head = 0
    /// Sequence number of `inFlight[0]`.
    private var firstSeq = 0
    /// Key → sequence number of its newest request in flight.
    private var newest: [String: Int] = [:]
    /// Keys still to rebind after a reconnection.
    private var rebinding: [String] = []
    private var rebindingHead = 0
    private var rebindsInFlight = 0
    /// Lingering keys in deadline order (the linger is constant, so append keeps the order).
    private var lingerQueue: [(key: String, until: NIODeadline)] = []
    private var lingerHead = 0

    init(linger: TimeAmount, rebindWindow: Int = 2048) {
        self.linger = linger
        self.rebindWindow = rebindWindow
    }

    var requestsInFlight: Int { self.inFlight.count - self.head }
    /// Keys wanted and not yet bound or being bound (after a reconnection).
    var rebindsLeft: Int { self.rebinding.count - self.rebindingHead + self.rebindsInFlight }

    /// `key` got its first staps channel with local clients. Returns the waiter when it may
    /// proceed at once (already bound, or the broker is down: local service), and the bind to
    /// send when one is needed.
    mutating func want(_ key: String, _ waiter: Waiter) -> (ready: Waiter?, send: Request?) {
        self.wanted[key] = .active
        guard self.isUp else { return (waiter, nil) }
        if let seq = self.newest[key] {
            let i = seq - self.firstSeq
            if self.inFlight[i].request.operation == .bind {
                self.inFlight[i].waiters.append(waiter)
                return (nil, nil)
            }
            // An unbind is in flight: bind again after it.
            return (nil, self.send(.bind, key, [waiter]))
        }
        if self.bound.contains(key) { return (waiter, nil) }
        return (nil, self.send(.bind, key, [waiter]))
    }

    /// `key`'s last staps channel with local clients went: keep it bound for the linger.
    mutating func linger(_ key: String, now: NIODeadline) {
        let until = now + self.linger
        self.wanted[key] = .lingering(until: until)
        self.lingerQueue.append((key, until))
    }

    /// Unbinds for keys whose linger has passed. `keep` is asked last (it may be a
    /// commitment: the link's handoff releases the key when it answers false); true makes the
    /// key active again instead.
    mutating func expire(now: NIODeadline, keep: (String) -> Bool = { _ in false }) -> [Request] {
        var out: [Request] = []
        while self.lingerHead < self.lingerQueue.count, self.lingerQueue[self.lingerHead].until <= now {
            let (key, until) = self.lingerQueue[self.lingerHead]
            self.lingerHead += 1
            // Rejoined since (active) or lingering again with a later deadline: not yet.
            guard self.wanted[key] == .lingering(until: until) else { continue }
            if keep(key) {
                self.wanted[key] = .active
                continue
            }
            self.wanted[key] = nil
            guard self.isUp else { continue }
            let bindInFlight = self.newest[key].map { self.inFlight[$0 - self.firstSeq].request.operation == .bind } ?? false
            if bindInFlight || (self.newest[key] == nil && self.bound.contains(key)) {
                out.append(self.send(.unbind, key, []))
            }
        }
        if self.lingerHead > 1024, self.lingerHead * 2 > self.lingerQueue.count {
            self.lingerQueue.removeFirst(self.lingerHead)
            self.lingerHead = 0
        }
        return out
    }

    /// The next rebinds to send, keeping at most `rebindWindow` in flight.
    mutating func nextRebinds() -> [Request] {
        var out: [Request] = []
        while self.rebindsInFlight < self.rebindWindow, self.rebindingHead < self.rebinding.count {
            let key = self.rebinding[self.rebindingHead]
            self.rebindingHead += 1
            // Gone, or a join already bound it.
            guard self.wanted[key] != nil, self.newest[key] == nil, !self.bound.contains(key) else { continue }
            self.rebindsInFlight += 1
            out.append(self.send(.bind, key, [], rebind: true))
        }
        if self.rebindingHead == self.rebinding.count, !self.rebinding.isEmpty {
            self.rebinding = []
            self.rebindingHead = 0
        }
        return out
    }

    /// True when `key` is bound and nothing in flight may change that.
    func isSettled(_ key: String) -> Bool {
        self.newest[key] == nil && self.bound.contains(key)
    }

    /// The broker answered the oldest request: returns its key and the joins it lets proceed.
    mutating func answered(_ operation: TopologyMethod) throws(OutOfOrder) -> (key: String, waiters: [Waiter]) {
        guard self.head < self.inFlight.count else { throw OutOfOrder(expected: nil, got: operation) }
        let entry = self.inFlight[self.head]
        guard entry.request.operation == operation else { throw OutOfOrder(expected: entry.request.operation, got: operation) }
        let seq = self.firstSeq + self.head
        self.head += 1
        let key = entry.request.key
        if self.newest[key] == seq { self.newest[key] = nil }
        switch operation {
        case .bind:
            self.bound.insert(key)
        case .unbind:
            self.bound.remove(key)
        }
        if entry.isRebind { self.rebindsInFlight -= 1 }
        if self.head == self.inFlight.count {
            self.firstSeq += self.head
            self.inFlight.removeAll(keepingCapacity: true)
            self.head = 0
        } else if self.head > 4096, self.head * 2 > self.inFlight.count {
            self.firstSeq += self.head
            self.inFlight.removeFirst(self.head)
            self.head = 0
        }
        return (key, entry.waiters)
    }

    /// A new connection is up (queue declared and consumed): every wanted key is to be rebound.
    mutating func connected() {
        self.isUp = true
        self.rebinding = Array(self.wanted.keys)
        self.rebindingHead = 0
    }

    /// The connection is gone: nothing is bound or in flight any more. Returns every join that
    /// was waiting; the link lets them proceed (local service) or, when stopping, fails them.
    mutating func disconnected() -> [Waiter] {
        let waiters = self.inFlight[self.head...].flatMap(\.waiters)
        self.isUp = false
        self.bound = []
        self.firstSeq += self.inFlight.count
        self.inFlight = []
        self.head = 0
        self.newest = [:]
        self.rebinding = []
        self.rebindingHead = 0
        self.rebindsInFlight = 0
        return waiters
    }

    private mutating func send(_ operation: TopologyMethod, _ key: String, _ waiters: [Waiter], rebind: Bool = false) -> Request {
        let request = Request(operation: operation, key: key)
        let seq = self.firstSeq + self.inFlight.count
        self.inFlight.append(InFlight(request: request, waiters: waiters, isRebind: rebind))
        self.newest[key] = seq
        return request
    }
}
