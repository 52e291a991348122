import NIOCore
import RabbitClient
import StapsCluster

/// The binds and unbinds of this node's queue on the broker, key by key, as a pure state
/// machine: which binding keys the broker confirmed bound, which requests are in flight, and
/// how fast the broker answers. No I/O and no policy: `BindingPolicy` decides what to bind.
///
/// Binds and unbinds are pipelined: any number may be in flight on the topology AMQP channel,
/// and the broker answers them in order, so each `bind-ok`/`unbind-ok` settles the oldest
/// request. A key is *settled* when the broker confirmed it bound and nothing in flight may
/// change that.
struct Topology {

    /// A method to send to the broker now.
    struct Request: Equatable, Sendable {
        var operation: TopologyMethod
        var key: String
    }

    /// The broker answered something other than what the oldest request expects.
    struct OutOfOrder: Error, CustomStringConvertible {
        var expected: TopologyMethod?
        var got: TopologyMethod
        var description: String { "broker answered \(got)-ok while \(expected.map { "\($0)-ok" } ?? "nothing") was due" }
    }

    /// What an answer settled.
    struct Answer {
        var key: String
        var operation: TopologyMethod
        /// Bound, with nothing in flight to change it.
        var settled: Bool
        /// From sending the request to its answer.
        var latency: TimeAmount
        /// The key's granularity.
        var granularity: BindingGranularity
    }

    private struct InFlight {
        var request: Request
        var sentAt: NIODeadline
        var isRebind: Bool
    }

    /// Keys whose binding the broker confirmed on the current connection.
    private(set) var bound: Set<String> = []
    /// How many of `bound` are exact keys, 4096, 256 and 16 buckets (`BindingGranularity` order).
    private(set) var boundByGranularity = [0, 0, 0, 0]
    /// True between `connected()` and `disconnected()`.
    private(set) var isUp = false
    /// Rebinds in flight (after a reconnection).
    private(set) var rebindsInFlight = 0
    /// The broker's time per request when it is busy (moving average of the gaps between
    /// answers, or of the latency when one request was alone): what a request waits behind
    /// each one in flight.
    private(set) var serviceTime: TimeAmount = .milliseconds(1)

    private var inFlight: [InFlight] = []
    private var head = 0
    /// Sequence number of `inFlight[0]`.
    private var firstSeq = 0
    /// Key → sequence number of its newest request in flight.
    private var newest: [String: Int] = [:]
    private var lastAnswer = NIODeadline.uptimeNanoseconds(0)

    var requestsInFlight: Int { self.inFlight.count - self.head }

    /// How long a request sent now would wait behind those in flight, by the current estimate:
    /// the queueing, not its own time (a slow broker with nothing queued is not backed up).
    var expectedWait: TimeAmount { .nanoseconds(self.serviceTime.nanoseconds * Int64(self.requestsInFlight)) }

    /// True when `key` is bound and nothing in flight may change that.
    func isSettled(_ key: String) -> Bool {
        self.newest[key] == nil && self.bound.contains(key)
    }

    /// True when `key` is bound or its newest request in flight is a bind.
    func isHeld(_ key: String) -> Bool {
        if let seq = self.newest[key] { return self.inFlight[seq - self.firstSeq].request.operation == .bind }
        return self.bound.contains(key)
    }

    /// Makes sure `key` gets bound: the bind to send, or nil when it is bound or being bound
    /// (or the broker is down: nothing is sent then).
    mutating func bind(_ key: String, now: NIODeadline, rebind: Bool = false) -> Request? {
        guard self.isUp, !self.isHeld(key) else { return nil }
        return self.send(.bind, key, now: now, rebind: rebind)
    }

    /// Makes sure `key` gets unbound: the unbind to send, or nil when it is not bound nor
    /// being bound.
    mutating func unbind(_ key: String, now: NIODeadline) -> Request? {
        guard self.isUp, self.isHeld(key) else { return nil }
        return self.send(.unbind, key, now: now)
    }

    /// The broker answered the oldest request.
    mutating func answered(_ operation: TopologyMethod, now: NIODeadline) throws(OutOfOrder) -> Answer {
        guard self.head < self.inFlight.count else { throw OutOfOrder(expected: nil, got: operation) }
        let entry = self.inFlight[self.head]
        guard entry.request.operation == operation else { throw OutOfOrder(expected: entry.request.operation, got: operation) }
        let seq = self.firstSeq + self.head
        self.head += 1
        let key = entry.request.key
        if self.newest[key] == seq { self.newest[key] = nil }
        let granularity = BindingGranularity(ofKey: key)
        switch operation {
        case .bind: if self.bound.insert(key).inserted { self.boundByGranularity[granularity.index] += 1 }
        case .unbind: if self.bound.remove(key) != nil { self.boundByGranularity[granularity.index] -= 1 }
        }
        if entry.isRebind { self.rebindsInFlight -= 1 }
        let latency = now - entry.sentAt
        // Busy since the previous answer: the gap is the broker's time for this one.
        let gap = entry.sentAt < self.lastAnswer ? now - self.lastAnswer : latency
        self.serviceTime = .nanoseconds((self.serviceTime.nanoseconds * 7 + max(0, gap.nanoseconds)) / 8)
        self.lastAnswer = now
        if self.head == self.inFlight.count {
            self.firstSeq += self.head
            self.inFlight.removeAll(keepingCapacity: true)
            self.head = 0
        } else if self.head > 4096, self.head * 2 > self.inFlight.count {
            self.firstSeq += self.head
            self.inFlight.removeFirst(self.head)
            self.head = 0
        }
        return Answer(key: key, operation: operation, settled: self.isSettled(key), latency: latency, granularity: granularity)
    }

    /// A new connection is up (queue declared and consumed); nothing is bound on it yet.
    mutating func connected() {
        self.isUp = true
    }

    /// The connection is gone: nothing is bound or in flight any more.
    mutating func disconnected() {
        self.isUp = false
        self.bound = []
        self.boundByGranularity = [0, 0, 0, 0]
        self.firstSeq += self.inFlight.count
        self.inFlight = []
        self.head = 0
        self.newest = [:]
        self.rebindsInFlight = 0
    }

    private mutating func send(_ operation: TopologyMethod, _ key: String, now: NIODeadline, rebind: Bool = false) -> Request {
        let request = Request(operation: operation, key: key)
        let seq = self.firstSeq + self.inFlight.count
        self.inFlight.append(InFlight(request: request, sentAt: now, isRebind: rebind))
        if rebind { self.rebindsInFlight += 1 }
        self.newest[key] = seq
        return request
    }
}
