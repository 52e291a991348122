import Atomics
import StapsCluster

/// What one event loop counts on the hot path. Each counter is written only by its loop, with
/// a plain load and store (no read-modify-write, no lock, no allocation), and read from any
/// thread when metrics are collected: a reader sees a value at most one message old.
public final class LoopCounters: Sendable {
    /// Messages received from websocket clients on this loop, and their payload bytes.
    let websocketMessages = ManagedAtomic<Int>(0)
    /// POST bodies published from this loop, and their bytes.
    let postMessages = ManagedAtomic<Int>(0)
    let bytesReceived = ManagedAtomic<Int>(0)
    /// Receivers reached on this loop (one per message per receiver), and the payload bytes.
    let messagesDelivered = ManagedAtomic<Int>(0)
    let bytesDelivered = ManagedAtomic<Int>(0)
    /// Messages dropped because their sender may only subscribe (`X-Staps-Allow: subscribe`).
    let droppedSubscribeOnly = ManagedAtomic<Int>(0)
    /// Websocket clients attached to a channel on this loop.
    let websocketClients = ManagedAtomic<Int>(0)
    /// Receivers on the node per message relayed from this loop.
    let fanout = CountHistogram(bounds: CountHistogram.fanoutBounds)

    @inline(__always)
    public static func add(_ n: Int, to counter: ManagedAtomic<Int>) {
        counter.store(counter.load(ordering: .relaxed) &+ n, ordering: .relaxed)
    }
}

/// A counter per value of a small bounded key (an HTTP status, a close code): one atomic per
/// possible value, made up front, so counting never allocates or locks.
public final class KeyedCounter: Sendable {
    public let keys: [String]
    private let values: [ManagedAtomic<Int>]

    public init(keys: [String]) {
        self.keys = keys
        self.values = keys.map { _ in ManagedAtomic<Int>(0) }
    }

    public func increment(_ index: Int) {
        self.values[index].wrappingIncrement(ordering: .relaxed)
    }

    public func load(_ index: Int) -> Int { self.values[index].load(ordering: .relaxed) }

    /// Each key with its count.
    public var all: [(String, Int)] { zip(self.keys, self.values).map { ($0, $1.load(ordering: .relaxed)) } }
}

/// HTTP statuses by code: 100–599, anything else is not a status.
public final class StatusCounter: Sendable {
    private let counter = KeyedCounter(keys: (100..<600).map(String.init))

    public func increment(_ status: Int) {
        guard (100..<600).contains(status) else { return }
        self.counter.increment(status - 100)
    }

    public subscript(status: Int) -> Int { (100..<600).contains(status) ? self.counter.load(status - 100) : 0 }

    /// The statuses counted at least once, with their counts.
    public var seen: [(Int, Int)] {
        (100..<600).compactMap { s in
            let n = self.counter.load(s - 100)
            return n > 0 ? (s, n) : nil
        }
    }
}

/// Websocket closes by code, and by who started them.
public final class CloseCounter: Sendable {
    /// The codes a close is counted under: RFC 6455's, 1005 for a close frame without a code,
    /// 1006 for a connection that ended without a close handshake, and `application` for 3000–4999.
    public static let codes = ["1000", "1001", "1002", "1003", "1005", "1006", "1007", "1008", "1009", "1010", "1011", "1012", "1013", "1014", "application", "other"]
    public static let initiators = ["client", "node"]
    private let counter = KeyedCounter(keys: CloseCounter.initiators.flatMap { by in CloseCounter.codes.map { "\(by) \($0)" } })

    public static func label(of code: Int) -> String {
        switch code {
        case 1000...1003, 1005...1014: return String(code)
        case 3000...4999: return "application"
        default: return "other"
        }
    }

    public func increment(code: Int, byClient: Bool) {
        let label = Self.label(of: code)
        let c = Self.codes.firstIndex(of: label)!
        self.counter.increment((byClient ? 0 : Self.codes.count) + c)
    }

    /// (code label, initiator, count) for every combination.
    public var all: [(code: String, by: String, count: Int)] {
        Self.initiators.enumerated().flatMap { (b, by) in
            Self.codes.enumerated().map { (c, code) in (code, by, self.counter.load(b * Self.codes.count + c)) }
        }
    }
}

/// Counters a node keeps for events off the hot path (per connection, per close, per drop).
/// The per-message ones are per event loop (`LoopCounters`).
public final class NodeCounters: Sendable {
    /// Receivers closed with 1008 for staying over their send buffer.
    public let slowConsumersClosed = ManagedAtomic<Int>(0)
    /// Bytes dropped with them: what was queued for them and not yet handed to NIO.
    public let slowConsumerDroppedBytes = ManagedAtomic<Int>(0)
    /// Connections refused with 503 for being over `max_connections`.
    public let connectionsRefused = ManagedAtomic<Int>(0)
    /// Messages between event loops dropped because the target loop was too far behind.
    public let crossLoopDropped = ManagedAtomic<Int>(0)
    /// Messages from other nodes for channels with no client here: what a shared (bucket)
    /// binding brings a node that it then ignores.
    public let clusterUnmatched = ManagedAtomic<Int>(0)
    /// Times freed memory was given back to the system after a busy spell.
    public let memoryTrims = ManagedAtomic<Int>(0)
    /// HTTP responses written (pages, POST answers, errors), by status; 101s are not in it.
    public let httpResponses = StatusCounter()
    /// All of them (read every 2 s by the memory trim).
    public let httpResponseTotal = ManagedAtomic<Int>(0)
    /// Websocket upgrade requests answered with an error, by status.
    public let handshakesRejected = StatusCounter()
    /// Websocket closes by code and initiator.
    public let closes = CloseCounter()
    /// Open connections (HTTP and websocket) on TCP and on unix socket listeners.
    public let tcpConnections = ManagedAtomic<Int>(0)
    public let unixConnections = ManagedAtomic<Int>(0)
    // The authorization hook (`auth_url`): one outcome counted per websocket handshake or
    // POST that was asked about. A client that left before the answer is counted in none.

    /// Requests the hook admitted (a 2xx with a valid `X-Staps-Allow`, or none).
    public let authAdmitted = ManagedAtomic<Int>(0)
    /// Requests the hook refused: its 401 or 403, passed on to the client.
    public let authDenied = ManagedAtomic<Int>(0)
    /// 503s because the hook answered another status (3xx, 404, 5xx, ...).
    public let authFailedStatus = ManagedAtomic<Int>(0)
    /// 503s because the hook could not be reached (refused, reset, no such socket).
    public let authFailedUnreachable = ManagedAtomic<Int>(0)
    /// 503s because the hook had not answered within `auth_timeout` (or the request deadline).
    public let authFailedTimeout = ManagedAtomic<Int>(0)
    /// 503s at once because `auth_concurrency` calls to the hook were already in flight.
    public let authFailedOverConcurrency = ManagedAtomic<Int>(0)
    /// 503s because the hook's answer was unusable: an invalid `X-Staps-Allow`, not HTTP, or
    /// the connection closed without an answer.
    public let authFailedBadAnswer = ManagedAtomic<Int>(0)

    /// Messages from other nodes' fan-out here (written by the cluster link's thread only).
    let clusterFanout = CountHistogram(bounds: CountHistogram.fanoutBounds)

    public init() {}
}
