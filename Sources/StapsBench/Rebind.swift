import ArgumentParser
import Atomics
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import StapsCluster
import StapsRabbit
import WebSocketClient

#if canImport(Glibc)
import Glibc
#endif

struct Rebind: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rebind",
        abstract: "Holds N channels on K cluster links, restarts the broker, and times until every link has rebound them all.",
        discussion: """
            The links are staps's own RabbitMQ links (StapsRabbit), one per simulated node, in this
            process, against the real broker: a channel is held by having the link receive it as a node does
            for its first local client, without a websocket per channel (100,000 sockets would
            exceed the file limits of most machines, and sockets are not what is measured).
            Probe channels (published from one link, consumed by the next) send a numbered
            message every 20 ms throughout, so the run also shows when messages flow again.
            """
    )

    @Option(name: .long, help: "RabbitMQ URL.") var amqp: String
    @Option(name: .long, help: "Cluster links (nodes).") var nodes = 3
    @Option(name: [.customShort("n"), .long], help: "Channels to hold, spread over the links.") var channels = 100_000
    @Option(name: .long, help: "amqp_binding_buckets of the links: adaptive, or 0 (a binding per channel), 16, 256, 4096.") var buckets = ClusterSettings().binding.configValue
    @Option(name: .long, help: "Probe channels.") var probes = 30
    @Option(name: .long, help: "Shell command that restarts the broker and returns once it accepts connections again.") var restart: String
    @Option(name: .long, help: "Give up after this many seconds.") var timeout = 60.0

    func run() async throws {
        guard nodes >= 2 else { throw ValidationError("probes need at least two links") }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        guard let mode = BindingMode(configValue: buckets) else { throw ValidationError("--buckets: '\(buckets)' is not one of adaptive, 0, 16, 256, 4096") }
        let settings = ClusterSettings(exchange: "staps-rebind-" + String(UUID4.make().prefix(8)), binding: mode)
        var logger = Logger(label: "rebind")
        logger.logLevel = .critical
        let links = try (0..<nodes).map { _ in RabbitLink(configuration: RabbitConfiguration(url: try AMQPURL(amqp), settings: settings), logger: logger) }
        let receivers = (0..<nodes).map { _ in ProbeReceiver() }
        for (link, receiver) in zip(links, receivers) { link.start(receiver: receiver) }
        let start = now()
        while !links.allSatisfy(\.isConnected) {
            guard Double(now() - start) / 1e9 < 10 else { throw ValidationError("the links did not come up") }
            try await Task.sleep(nanoseconds: 10_000_000)
        }
        // Hold: every channel received as a node's first client would have it, confirmed by the broker.
        let t0 = now()
        var futures: [EventLoopFuture<Void>] = []
        for i in 0..<channels {
            let promise = group.next().makePromise(of: Void.self)
            links[i % nodes].startReceiving(channel: "hold-\(i)", whenBound: promise)
            futures.append(promise.futureResult)
        }
        for j in 0..<probes {
            let promise = group.next().makePromise(of: Void.self)
            links[j % nodes].startReceiving(channel: "probe-\(j)", whenBound: promise)
            futures.append(promise.futureResult)
        }
        for f in futures { try await f.get() }
        let bindings = links.map(\.counters.bindingKeysBoundTotal)
        print("rebind: \(channels) channels held on \(nodes) links (bound in \(String(format2: Double(now() - t0) / 1e9, 2)) s: \(bindings.map(String.init).joined(separator: "/")) bindings, amqp_binding_buckets \(buckets)), \(probes) probe channels")
        // Probes: probe-j is published by link j+1 and consumed by link j, every 20 ms.
        let stop = ManagedAtomic<Bool>(false)
        let sendTimes = NIOLockedValueBox<[UInt64]>([])
        let pump = Task {
            var seq: Int64 = 0
            let allocator = ByteBufferAllocator()
            while !stop.load(ordering: .relaxed) {
                sendTimes.withLockedValue { $0.append(now()) }
                for j in 0..<probes {
                    var b = allocator.buffer(capacity: 8)
                    b.writeInteger(seq)
                    links[(j + 1) % nodes].publish([ClusterMessage(channel: "probe-\(j)", payload: b, isText: false, connectionID: 1)])
                }
                seq += 1
                try await Task.sleep(nanoseconds: 20_000_000)
            }
        }
        try await Task.sleep(nanoseconds: 1_000_000_000)
        let restartStart = now()
        guard system(restart) == 0 else { throw ValidationError("the restart command failed: \(restart)") }
        let back = now()
        print("broker restarted (the restart command took \(String(format2: Double(back - restartStart) / 1e9, 2)) s)")
        var upAt: [Int: UInt64] = [:]
        var reboundAt: [Int: UInt64] = [:]
        while reboundAt.count < nodes, Double(now() - back) / 1e9 < timeout {
            for (i, link) in links.enumerated() where reboundAt[i] == nil && link.isConnected && link.counters.reconnects.load(ordering: .relaxed) > 0 {
                if upAt[i] == nil { upAt[i] = now() }
                if link.counters.rebindsLeft.load(ordering: .relaxed) == 0 { reboundAt[i] = now() }
            }
            try await Task.sleep(nanoseconds: 2_000_000)
        }
        try await Task.sleep(nanoseconds: 1_000_000_000)
        stop.store(true, ordering: .relaxed)
        _ = try? await pump.value
        try await Task.sleep(nanoseconds: 500_000_000)
        for i in 0..<nodes {
            let up = upAt[i].map { String(format2: Double($0 - back) / 1e9, 3) + " s" } ?? "-"
            let done = reboundAt[i].map { String(format2: Double($0 - back) / 1e9, 3) + " s" } ?? "not within \(timeout) s"
            print("link \(i + 1): publishing again \(up), every binding back \(done) after the broker was back (\(links[i].counters.bindingKeysBoundTotal) bindings)")
        }
        let sent = sendTimes.withLockedValue { $0 }
        var flowAgain: [Double] = []
        var lostAfter = 0
        for j in 0..<probes {
            let seen = receivers[j % nodes].arrivals(of: "probe-\(j)")
            guard let first = sent.indices.first(where: { sent[$0] >= back && seen[$0] != nil }) else { flowAgain.append(.infinity); continue }
            flowAgain.append(Double(seen[first]! - back) / 1e9)
            lostAfter += (first..<sent.count).filter { seen[$0] == nil }.count
        }
        flowAgain.sort()
        print("probes: messages flow again \(String(format2: flowAgain[flowAgain.count / 2], 3)) s (median), \(String(format2: flowAgain.last!, 3)) s (last) after the broker was back; \(lostAfter) lost after that")
        let worst = reboundAt.values.max().map { Double($0 - back) / 1e9 }
        print("\(channels) channels rebound on every link within \(worst.map { String(format2: $0, 3) + " s" } ?? "-") of the broker's return")
        for link in links { await link.shutdown() }
        try await group.shutdownGracefully()
        if reboundAt.count < nodes { throw ExitCode(2) }
    }
}

/// Where a benchmark link delivers: arrival times of numbered probe messages, per channel.
final class ProbeReceiver: ClusterReceiver {
    private let seen = NIOLockedValueBox<[String: [Int: UInt64]]>([:])
    var clusterBacklogBytes: Int { 0 }

    func deliverFromCluster(_ batch: [ClusterMessage]) {
        let t = now()
        self.seen.withLockedValue { seen in
            for m in batch {
                guard let seq = m.payload.getInteger(at: m.payload.readerIndex, as: Int64.self) else { continue }
                seen[m.channel, default: [:]][Int(seq)] = t
            }
        }
    }

    func arrivals(of channel: String) -> [Int: UInt64] { self.seen.withLockedValue { $0[channel] ?? [:] } }
}
