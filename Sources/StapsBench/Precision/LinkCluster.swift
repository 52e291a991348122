import Atomics
import CRabbit
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import RabbitClient
import StapsCluster
import StapsRabbit

/// K of staps's RabbitMQ links in this process, one per simulated node, on one fresh exchange
/// of the real broker: what `precision` loads. A channel is held on a link as a node holds it
/// for its first local client (`startReceiving`), without a websocket (see `Rebind`).
///
/// Traffic channels are named `t-N` and held on links 0 and 1 only; every other channel (idle,
/// churn) gets no messages. So a delivery is *matched* when it is a traffic channel's on link 0
/// or 1, and *unmatched* otherwise: brought by a bucket (or a lingering) binding to a link
/// with no client on its channel. The link drops those itself (`RabbitCounters.discarded`);
/// the receivers count the rest, and any unmatched one that still reaches them.
final class LinkCluster: Sendable {
    let links: [RabbitLink]
    let receivers: [CountingReceiver]
    let exchange: String
    private let url: AMQPURL
    /// The loop the join promises complete on (latencies are taken there).
    let loop: any EventLoop
    private let group: MultiThreadedEventLoopGroup

    init(url: AMQPURL, nodes: Int, binding: BindingMode) {
        self.url = url
        self.exchange = "staps-precision-" + String(UUID4.make().prefix(8))
        let settings = ClusterSettings(exchange: self.exchange, binding: binding)
        var logger = Logger(label: "precision")
        logger.logLevel = .critical
        self.links = (0..<nodes).map { _ in RabbitLink(configuration: RabbitConfiguration(url: url, settings: settings), logger: logger) }
        self.receivers = (0..<nodes).map { i in CountingReceiver(wantsTraffic: i < 2) }
        self.group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        self.loop = self.group.next()
    }

    func start(timeout: Double = 10) async throws {
        for (link, receiver) in zip(self.links, self.receivers) { link.start(receiver: receiver) }
        let start = now()
        while !self.links.allSatisfy(\.isConnected) {
            guard Double(now() - start) / 1e9 < timeout else { throw BenchError("the links did not come up within \(timeout) s") }
            try await Task.sleep(nanoseconds: 10_000_000)
        }
    }

    /// Holds `names` on link `index`: one future per channel, succeeded once the broker confirmed its binding.
    func hold(_ names: some Sequence<String>, on index: Int) -> [EventLoopFuture<Void>] {
        names.map { name in
            let promise = self.loop.makePromise(of: Void.self)
            self.links[index].startReceiving(channel: name, whenBound: promise)
            return promise.futureResult
        }
    }

    func snapshot() -> ClusterSnapshot {
        var s = ClusterSnapshot(at: now())
        for (link, receiver) in zip(self.links, self.receivers) {
            let c = link.counters
            s.received += c.received.load(ordering: .relaxed)
            s.unmatched += c.discarded.load(ordering: .relaxed) + receiver.unmatched.load(ordering: .relaxed)
            s.published += c.published.load(ordering: .relaxed)
            s.bindsWaiting += c.bindsWaiting.load(ordering: .relaxed)
            for (i, gauge) in c.bindingKeysBound.enumerated() { s.bindings[i] += gauge.load(ordering: .relaxed) }
        }
        return s
    }

    /// Waits until the links' bindings stop changing: nothing waits for the broker and the
    /// bindings by granularity stayed the same for `quiet` seconds (an adaptive link refining
    /// its buckets to exact keys keeps changing them). Returns the seconds it took, nil when
    /// still changing after `limit`.
    func settle(quiet: Double = 1, limit: Double) async throws -> Double? {
        let start = now()
        var last = self.snapshot()
        var stableSince = now()
        while Double(now() - start) / 1e9 < limit {
            try await Task.sleep(nanoseconds: 100_000_000)
            let s = self.snapshot()
            if s.bindings != last.bindings || s.bindsWaiting > 0 {
                stableSince = now()
            } else if Double(now() - stableSince) / 1e9 >= quiet {
                return Double(stableSince - start) / 1e9
            }
            last = s
        }
        return nil
    }

    func shutdown() async {
        for link in self.links { await link.shutdown() }
        try? await self.group.shutdownGracefully()
        // The links declared the exchange (durable); nothing else uses it.
        if let connection = try? AMQPConnection(url: self.url, heartbeatSeconds: 0, connectTimeout: 5) {
            let name = CString(self.exchange)
            amqp_exchange_delete(connection.state, 1, name.bytes, 0)
            _ = amqp_get_rpc_reply(connection.state)
            connection.close()
        }
    }
}

/// The cluster's counters at one moment; the difference of two is what happened between them.
struct ClusterSnapshot {
    var at: UInt64
    /// Messages from other nodes the broker delivered (the links' `received`).
    var received = 0
    /// Of those, for a channel the receiving link has no client on.
    var unmatched = 0
    /// Messages the broker confirmed to their publishing link.
    var published = 0
    var bindsWaiting = 0
    /// Binding keys bound, by granularity: exact, 4096, 256, 16 (`BindingGranularity.allCases`).
    var bindings = [0, 0, 0, 0]

    init(at: UInt64) { self.at = at }

    /// What happened from `earlier` to this one (the bindings are this one's).
    func since(_ earlier: ClusterSnapshot) -> ClusterSnapshot {
        var d = self
        d.at = self.at - earlier.at
        d.received -= earlier.received
        d.unmatched -= earlier.unmatched
        d.published -= earlier.published
        return d
    }

    var deliveriesPerMessage: Double? { self.published > 0 ? Double(self.received) / Double(self.published) : nil }
    var neededPerMessage: Double? { self.published > 0 ? Double(self.received - self.unmatched) / Double(self.published) : nil }
    var unmatchedShare: Double? { self.received > 0 ? Double(self.unmatched) / Double(self.received) : nil }
    /// Unmatched deliveries per message: of the traffic, one link (the third) wants none, so
    /// this is the share of another node's traffic that reaches a node that does not want it.
    var unwantedPerMessage: Double? { self.published > 0 ? Double(self.unmatched) / Double(self.published) : nil }

    /// `exact 10030, 4096 0, 256 12, 16 0`, leaving out the granularities with none.
    var bindingsDescription: String {
        let parts = zip(BindingGranularity.allCases, self.bindings).filter { $0.1 > 0 }.map { "\($0.0) \($0.1)" }
        return parts.isEmpty ? "none" : parts.joined(separator: ", ")
    }
}

/// Where a benchmark link delivers: counts what reaches it for a channel it has no client on.
final class CountingReceiver: ClusterReceiver {
    let delivered = ManagedAtomic<Int>(0)
    let unmatched = ManagedAtomic<Int>(0)
    private let wantsTraffic: Bool
    var clusterBacklogBytes: Int { 0 }

    init(wantsTraffic: Bool) { self.wantsTraffic = wantsTraffic }

    func deliverFromCluster(_ batch: [ClusterMessage]) {
        let wanted = self.wantsTraffic ? batch.lazy.filter { $0.channel.hasPrefix("t-") }.count : 0
        self.delivered.wrappingIncrement(by: batch.count, ordering: .relaxed)
        if wanted < batch.count { self.unmatched.wrappingIncrement(by: batch.count - wanted, ordering: .relaxed) }
    }
}

/// Messages on the traffic channels `t-0` … `t-(channels-1)`, held on links 0 and 1: channel j
/// is published by link j % 2, so its one wanted delivery is to the other of the two.
final class TrafficPump: Sendable {
    private let stopped = ManagedAtomic<Bool>(false)
    private let task: Task<Void, Never>

    /// Starts publishing `rate` messages/s (16 bytes each) in 10 ms ticks, until `stop()` or `limit` seconds.
    init(cluster: LinkCluster, channels: Int, rate: Double, limit: Double) {
        let stopped = self.stopped
        self.task = Task {
            let start = now()
            var sent = 0
            var j = 0
            let payload = ByteBuffer(repeating: 0x2A, count: 16)
            while !stopped.load(ordering: .relaxed), Double(now() - start) / 1e9 < limit {
                let due = Int(Double(now() - start) / 1e9 * rate) - sent
                if due > 0 {
                    var batches: [[ClusterMessage]] = [[], []]
                    for _ in 0..<due {
                        batches[j % 2].append(ClusterMessage(channel: "t-\(j)", payload: payload, isText: false, connectionID: 1))
                        j = (j + 1) % channels
                    }
                    for (i, batch) in batches.enumerated() where !batch.isEmpty { cluster.links[i].publish(batch) }
                    sent += due
                }
                try? await Task.sleep(nanoseconds: 10_000_000)
            }
        }
    }

    func stop() async {
        self.stopped.store(true, ordering: .relaxed)
        await self.task.value
    }
}

/// Throw-away channels on the links: at `rate` per second (open loop, round-robin over the
/// links) a fresh channel is held (`startReceiving`) and, once the broker confirmed its binding,
/// released (`stopReceiving`). A cycle's connect time is from its `startReceiving` to the
/// confirmation: what a websocket client's handshake waits for. At most `maxInFlight` joins
/// wait at once; a cycle due beyond that is skipped (counted), so the load never piles up.
enum ChurnLoad {
    struct Result {
        var seconds: Double
        var offered = 0
        var skipped = 0
        /// Cycles whose join completed within the phase.
        var completed = 0
        var failed = 0
        /// Connect times of every cycle the phase started (also those completed after it).
        var histogram = Histogram()
        /// Time after the phase until its last join completed.
        var drainSeconds = 0.0
        var cyclesPerSecond: Double { Double(self.completed) / self.seconds }
    }

    private struct Shared {
        var histogram = Histogram()
        var completed = 0
        var failed = 0
    }

    static func run(on cluster: LinkCluster, rate: Double, seconds: Double, maxInFlight: Int, drainLimit: Double = 30) async throws -> Result {
        let shared = NIOLockedValueBox(Shared())
        let inFlight = ManagedAtomic<Int>(0)
        var result = Result(seconds: seconds)
        let start = now()
        let end = start + UInt64(seconds * 1e9)
        var issued = 0
        var next = 0
        while now() < end {
            let due = min(Int(Double(now() - start) / 1e9 * rate), Int(seconds * rate)) - issued
            for _ in 0..<max(0, due) {
                issued += 1
                guard inFlight.load(ordering: .relaxed) < maxInFlight else {
                    result.skipped += 1
                    continue
                }
                let link = cluster.links[next % cluster.links.count]
                next += 1
                let name = "churn-" + UUID4.make()
                let promise = cluster.loop.makePromise(of: Void.self)
                inFlight.wrappingIncrement(ordering: .relaxed)
                let t0 = now()
                promise.futureResult.whenComplete { outcome in
                    let t = now()
                    shared.withLockedValue { s in
                        switch outcome {
                        case .success:
                            s.histogram.record(t - t0)
                            if t <= end { s.completed += 1 }
                        case .failure:
                            s.failed += 1
                        }
                    }
                    link.stopReceiving(channel: name)
                    inFlight.wrappingDecrement(ordering: .relaxed)
                }
                link.startReceiving(channel: name, whenBound: promise)
            }
            try await Task.sleep(nanoseconds: 2_000_000)
        }
        result.offered = issued
        let drainStart = now()
        while inFlight.load(ordering: .relaxed) > 0, Double(now() - drainStart) / 1e9 < drainLimit {
            try await Task.sleep(nanoseconds: 2_000_000)
        }
        result.drainSeconds = Double(now() - drainStart) / 1e9
        shared.withLockedValue { s in
            result.histogram = s.histogram
            result.completed = s.completed
            result.failed = s.failed
        }
        if inFlight.load(ordering: .relaxed) > 0 { throw BenchError("\(inFlight.load(ordering: .relaxed)) churn joins still waiting \(drainLimit) s after the phase") }
        return result
    }
}

struct BenchError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}
