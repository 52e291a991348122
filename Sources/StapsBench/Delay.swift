import ArgumentParser
import Atomics
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import WebSocketClient

#if canImport(Glibc)
import Glibc
#endif

struct Delay: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "delay",
        abstract: "The mix of issue 15 on a cluster: churn, many light channels connecting at once, a busy channel and a probe across two nodes; reports the probe's delay per window, the nodes' counters and the broker's flow control.",
        discussion: """
            Name the nodes' endpoints in order (node 1 first). The probe sends from node 1 to a
            receiver on node 2, and, as a control that never crosses the broker, from node 2 to
            node 2 (both pairs on a client thread of their own); the busy channel's publisher is on the last node, its receivers
            round-robin; each light channel has one client per node in turn, the first of which
            publishes once all of them are connected; churn workers connect round-robin. All light
            clients connect at once at the start. Every load stops by itself after --seconds; then
            the run waits (at most --drain seconds, less once nothing arrives for 5 s) for what
            is still on its way, and counts the rest as lost.

            Message delays are attributed to the window in which they were sent. With --metrics
            (each node's metrics listener, in the endpoints' order) it prints what the nodes
            counted per window; with --broker-samples, a file of lines `unix-ms
            publishing-connections-in-flow publishing-connections messages-in-queues` (what
            scripts/bench-delay has the broker write), the broker's flow control per window.
            """
    )

    @OptionGroup var endpoints: Endpoints
    @Option(name: .long, help: "A node's metrics listener, a unix socket path (repeatable, in the endpoints' order).") var metrics: [String] = []
    @Option(name: .long, help: "Seconds the load runs.") var seconds = 90.0
    @Option(name: .long, help: "Seconds per reported window.") var window = 10.0
    @Option(name: .long, help: "Light channels.") var lightChannels = 1000
    @Option(name: .long, help: "Clients per light channel (the first publishes).") var lightClients = 3
    @Option(name: .long, help: "Messages per second per light publisher.") var lightRate = 2.0
    @Option(name: .long, help: "Receivers on the busy channel.") var busyReceivers = 20
    @Option(name: .long, help: "Messages per second on the busy channel.") var busyRate = 500
    @Option(name: .long, help: "Churn workers (connect to a fresh channel, send one message, close).") var churnWorkers = 2
    @Option(name: .long, help: "Milliseconds between probe messages.") var probeInterval = 100
    @Option(name: .long, help: "Payload bytes (at least 16).") var size = 64
    @Option(name: .long, help: "Client event-loop threads.") var threads = 1
    @Option(name: .long, help: "Seconds to wait at most, after the load, for messages still on their way.") var drain = 30.0
    @Option(name: .long, help: "The broker's samples (see below), read at the end.") var brokerSamples: String?

    func validate() throws {
        guard size >= 16 else { throw ValidationError("--size must be at least 16") }
        guard seconds > 0, window > 0, probeInterval > 0, lightClients >= 2, lightRate > 0 else {
            throw ValidationError("--seconds, --window, --probe-interval and --light-rate must be positive, --light-clients at least 2")
        }
    }

    func run() async throws {
        let endpoints = try self.endpoints.list()
        let node: @Sendable (Int) -> Endpoint = { endpoints[$0 % endpoints.count] }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: threads)
        let run = "/delay-\(UInt64.random(in: 0...UInt64.max))"
        let stopping = ManagedAtomic<Bool>(false)
        let probe = ProbeLog()
        let light = DeliveryLog()
        let busy = DeliveryLog()

        // The probe, the busy channel and their receivers first: they must see the burst. The
        // probe pair has a thread of its own, so that it times the cluster, not the load's clients.
        let probeGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        _ = try await WebSocketClient.connect(to: node(1), path: run + "-probe", group: probeGroup) { event in
            if case .message(_, let buffer) = event { probe.received(buffer, at: now()) }
        }
        let probeSender = try await WebSocketClient.connect(to: node(0), path: run + "-probe", group: probeGroup) { _ in }
        // The control: a pair on node 2 alone, its messages never cross the broker.
        let local = ProbeLog()
        _ = try await WebSocketClient.connect(to: node(1), path: run + "-local", group: probeGroup) { event in
            if case .message(_, let buffer) = event { local.received(buffer, at: now()) }
        }
        let localSender = try await WebSocketClient.connect(to: node(1), path: run + "-local", group: probeGroup) { _ in }
        for r in 0..<busyReceivers {
            _ = try await WebSocketClient.connect(to: node(r), path: run + "-busy", group: group) { event in
                if case .message(_, let buffer) = event { busy.received(buffer, at: now()) }
            }
        }
        let busySender = try await WebSocketClient.connect(to: node(endpoints.count - 1), path: run + "-busy", group: group) { _ in }
        let scraper = MetricsScraper(paths: metrics)
        var snapshots = [scraper.scrape()]

        print("delay: \(endpoints.count) nodes; churn \(churnWorkers) workers; \(lightChannels) light channels x \(lightClients) clients (all connecting at once), \(lightRate) msg/s per publisher; busy channel \(busyRate) msg/s to \(busyReceivers) receivers; probe every \(probeInterval) ms, node 1 -> node 2; \(size) B; \(Int(seconds)) s in windows of \(Int(window)) s")
        let start = now()
        let wallStart = wallMillis()
        let end = start + UInt64(seconds * 1e9)

        let probeTask = probeSender.connection.eventLoop.scheduleRepeatedTask(initialDelay: .zero, delay: .milliseconds(Int64(probeInterval))) { task in
            guard !stopping.load(ordering: .relaxed) else { return task.cancel() }
            probeSender.send(opcode: .binary, probe.next(allocator: probeSender.connection.allocator, size: size, at: now()))
            localSender.send(opcode: .binary, local.next(allocator: localSender.connection.allocator, size: size, at: now()))
        }
        let busyPump = RatePump(client: busySender, source: -2, rate: Double(busyRate), size: size, stopping: stopping)
        busyPump.start(every: .milliseconds(10))

        let pool = NIOThreadPool(numberOfThreads: max(1, churnWorkers))
        pool.start()
        var churn: [EventLoopFuture<ChurnWorker.Result>] = []
        for w in 0..<churnWorkers {
            let worker = ChurnWorker(endpoints: endpoints, first: w, step: churnWorkers, deadline: end)
            churn.append(pool.runIfActive(eventLoop: group.next()) { worker.run() })
        }

        // Every light client at once; a channel's publisher starts once its channel is complete.
        let lightConnect = Task {
            await withTaskGroup(of: (RatePump?, Int).self) { tasks in
                for c in 0..<lightChannels {
                    tasks.addTask {
                        await Self.connectLight(channel: c, path: "\(run)-light-\(c)", clients: lightClients, node: node, group: group,
                                                rate: lightRate, size: size, log: light, stopping: stopping)
                    }
                }
                var pumps: [RatePump] = []
                var failed = 0
                for await (pump, failures) in tasks {
                    failed += failures
                    if let pump { pumps.append(pump) }
                }
                return (pumps, failed, Double(now() - start) / 1e9)
            }
        }

        // The windows: the nodes' counters at each boundary.
        var boundary = start
        while boundary < end {
            boundary = min(end, boundary + UInt64(window * 1e9))
            let wait = boundary > now() ? boundary - now() : 0
            try await Task.sleep(nanoseconds: wait)
            snapshots.append(scraper.scrape())
            let k = snapshots.count - 1
            let (sent, got, worst) = probe.progress(window: k - 1, start: start, length: window)
            print("  \(Int(Double(k - 1) * window))-\(Int(Double(k) * window)) s: probe \(got)/\(sent) arrived, worst \(ms(worst)) ms (on node 2 alone: \(ms(local.progress(window: k - 1, start: start, length: window).worst)) ms); published +\(Int(MetricsScraper.delta(snapshots, k, "staps_broker_published_total")))")
        }
        stopping.store(true, ordering: .relaxed)
        probeTask.cancel()
        let (pumps, lightFailures, connectSeconds) = await lightConnect.value
        var cycles = 0
        var churnFailures = 0
        for f in churn {
            let r = try await f.get()
            cycles += r.cycles
            churnFailures += r.failures.count
        }
        try await pool.shutdownGracefully()

        // What is still on its way: wait while it keeps coming.
        let lightSent = pumps.reduce(0) { $0 + $1.sent.load(ordering: .relaxed) }
        let expectedLight = lightSent * (lightClients - 1)
        let expectedBusy = busyPump.sent.load(ordering: .relaxed) * busyReceivers
        let drainStart = now()
        var last = -1
        var lastProgress = now()
        while Double(now() - drainStart) / 1e9 < drain {
            let total = probe.receivedCount + light.count + busy.count
            if probe.receivedCount == probe.sentCount && local.receivedCount == local.sentCount && light.count >= expectedLight && busy.count >= expectedBusy { break }
            if total != last { (last, lastProgress) = (total, now()) }
            if Double(now() - lastProgress) / 1e9 > 5 { break }
            try await Task.sleep(nanoseconds: 50_000_000)
        }
        snapshots.append(scraper.scrape())
        try await group.shutdownGracefully()
        try await probeGroup.shutdownGracefully()

        let flow = (try? BrokerSamples(path: brokerSamples)) ?? BrokerSamples()
        print("light clients: \(lightChannels * lightClients - lightFailures) of \(lightChannels * lightClients) connected in \(String(format2: connectSeconds, 1)) s; churn: \(cycles) cycles (\(Int(Double(cycles) / seconds))/s), \(churnFailures) failed")
        print("window      probe arrived  max ms     p99 ms   | node 2 alone: max ms | published   dropped by the nodes          | in flow   queued at most")
        for k in 0..<(snapshots.count - 2) {
            let delays = probe.delays(window: k, start: start, length: window)
            let from = wallStart + Int64(Double(k) * window * 1000)
            let counts = scraper.isEmpty ? "-" : String(Int(MetricsScraper.delta(snapshots, k + 1, "staps_broker_published_total")))
            let dropped = scraper.isEmpty ? "-" : MetricsScraper.droppedDeltas(snapshots, k + 1)
            print(Self.pad("\(Int(Double(k) * window))-\(Int(Double(k + 1) * window)) s", 12)
                  + Self.pad("\(delays.count)/\(probe.sent(window: k, start: start, length: window))", 15)
                  + Self.pad(ms(delays.last ?? 0), 11) + Self.pad(ms(Self.quantile(delays, 0.99)), 9) + "| "
                  + Self.pad(ms(local.delays(window: k, start: start, length: window).last ?? 0), 21) + "| "
                  + Self.pad(counts, 12) + Self.pad(dropped, 30) + "| "
                  + flow.summary(from: from, to: from + Int64(window * 1000)))
        }
        let all = probe.allDelays()
        print("probe: \(all.count) of \(probe.sentCount) arrived (\(probe.sentCount - all.count) lost); delay ms p50 \(ms(Self.quantile(all, 0.5)))  p99 \(ms(Self.quantile(all, 0.99)))  max \(ms(all.last ?? 0))")
        let alone = local.allDelays()
        print("on node 2 alone: \(alone.count) of \(local.sentCount) arrived; delay ms p50 \(ms(Self.quantile(alone, 0.5)))  p99 \(ms(Self.quantile(alone, 0.99)))  max \(ms(alone.last ?? 0))")
        print(light.report("light", expected: expectedLight))
        print(busy.report("busy", expected: expectedBusy))
        if !scraper.isEmpty {
            for (i, path) in metrics.enumerated() {
                print("node \(i + 1) (\(path)): \(MetricsScraper.totals(first: snapshots[0][i], last: snapshots[snapshots.count - 1][i]))")
            }
        }
    }

    /// One light channel's clients, connected at once; its first client's pump, started once
    /// all are connected (nil when one failed), and how many failed.
    static func connectLight(channel: Int, path: String, clients: Int, node: @escaping @Sendable (Int) -> Endpoint, group: EventLoopGroup,
                             rate: Double, size: Int, log: DeliveryLog, stopping: ManagedAtomic<Bool>) async -> (RatePump?, Int) {
        await withTaskGroup(of: (Int, WebSocketClient?).self) { tasks in
            for j in 0..<clients {
                tasks.addTask {
                    (j, try? await WebSocketClient.connect(to: node(channel + j), path: path, group: group) { event in
                        if j > 0, case .message(_, let buffer) = event { log.received(buffer, at: now()) }
                    })
                }
            }
            var publisher: WebSocketClient?
            var failed = 0
            for await (j, client) in tasks {
                if client == nil { failed += 1 }
                if j == 0 { publisher = client }
            }
            guard failed == 0, let publisher else { return (nil, failed) }
            let pump = RatePump(client: publisher, source: Int32(channel), rate: rate, size: size, stopping: stopping)
            let interval = Int64(1e9 / rate)
            pump.start(every: .nanoseconds(interval), initialDelay: .nanoseconds(Int64.random(in: 0..<interval)))
            return (pump, 0)
        }
    }

    static func quantile(_ sorted: [UInt64], _ q: Double) -> UInt64 {
        guard !sorted.isEmpty else { return 0 }
        return sorted[min(sorted.count - 1, max(0, Int((Double(sorted.count) * q).rounded(.up)) - 1))]
    }

    static func pad(_ s: String, _ width: Int) -> String { s.count >= width ? s + " " : s + String(repeating: " ", count: width - s.count) }
}

func wallMillis() -> Int64 {
    var t = timespec()
    clock_gettime(CLOCK_REALTIME, &t)
    return Int64(t.tv_sec) * 1000 + Int64(t.tv_nsec) / 1_000_000
}

/// Sends numbered, timestamped messages from one client at a rate, on its event loop, until
/// told to stop: every tick sends what is due since the first (at most 64 at a time).
final class RatePump: Sendable {
    let client: WebSocketClient
    let source: Int32
    let rate: Double
    let size: Int
    let stopping: ManagedAtomic<Bool>
    let sent = ManagedAtomic<Int>(0)
    private let started = ManagedAtomic<UInt64>(0)

    init(client: WebSocketClient, source: Int32, rate: Double, size: Int, stopping: ManagedAtomic<Bool>) {
        self.client = client
        self.source = source
        self.rate = rate
        self.size = size
        self.stopping = stopping
    }

    func start(every interval: TimeAmount, initialDelay: TimeAmount = .zero) {
        self.client.connection.eventLoop.scheduleRepeatedTask(initialDelay: initialDelay, delay: interval) { task in
            guard !self.stopping.load(ordering: .relaxed), self.client.connection.isActive else { return task.cancel() }
            let t = now()
            if self.started.load(ordering: .relaxed) == 0 { self.started.store(t, ordering: .relaxed) }
            let due = Int(Double(t - self.started.load(ordering: .relaxed)) / 1e9 * self.rate) + 1
            var seq = self.sent.load(ordering: .relaxed)
            let burst = min(64, due - seq)
            guard burst > 0 else { return }
            for _ in 0..<burst {
                self.client.send(opcode: .binary, timestamped(source: self.source, seq: seq, size: self.size, at: t, allocator: self.client.connection.allocator), flush: false)
                seq += 1
            }
            self.client.connection.flush()
            self.sent.store(seq, ordering: .relaxed)
        }
    }
}

/// A payload: who sent it, its number, when (this process's monotonic clock), then padding.
func timestamped(source: Int32, seq: Int, size: Int, at time: UInt64, allocator: ByteBufferAllocator) -> ByteBuffer {
    var payload = allocator.buffer(capacity: size)
    payload.writeMultipleIntegers(source, Int32(truncatingIfNeeded: seq), time)
    payload.writeRepeatingByte(0x2A, count: size - 16)
    return payload
}

/// What the receivers of one kind of channel got: how many, and their delays.
final class DeliveryLog: Sendable {
    private let state = NIOLockedValueBox((histogram: Histogram(), count: 0))

    func received(_ buffer: ByteBuffer, at time: UInt64) {
        guard let (_, _, sent) = buffer.getMultipleIntegers(at: buffer.readerIndex, as: (Int32, Int32, UInt64).self) else { return }
        self.state.withLockedValue {
            $0.histogram.record(time &- sent)
            $0.count += 1
        }
    }

    var count: Int { self.state.withLockedValue { $0.count } }

    func report(_ name: String, expected: Int) -> String {
        self.state.withLockedValue { s in
            "\(name): \(s.count) of \(expected) deliveries (\(expected - s.count) lost); delay ms p50 \(ms(s.histogram.quantile(0.5)))  p99 \(ms(s.histogram.quantile(0.99)))  max \(ms(s.histogram.max))"
        }
    }
}

/// The probe: when each message was sent, and the delay of each that arrived.
final class ProbeLog: Sendable {
    private let state = NIOLockedValueBox((sent: [UInt64](), delays: [UInt64?]()))

    /// The next probe message, sent at `time`.
    func next(allocator: ByteBufferAllocator, size: Int, at time: UInt64) -> ByteBuffer {
        let seq = self.state.withLockedValue { s in
            s.sent.append(time)
            s.delays.append(nil)
            return s.sent.count - 1
        }
        return timestamped(source: -1, seq: seq, size: size, at: time, allocator: allocator)
    }

    func received(_ buffer: ByteBuffer, at time: UInt64) {
        guard let (_, seq, sent) = buffer.getMultipleIntegers(at: buffer.readerIndex, as: (Int32, Int32, UInt64).self) else { return }
        self.state.withLockedValue { s in
            if Int(seq) < s.delays.count, s.delays[Int(seq)] == nil { s.delays[Int(seq)] = time &- sent }
        }
    }

    var sentCount: Int { self.state.withLockedValue { $0.sent.count } }
    var receivedCount: Int { self.state.withLockedValue { $0.delays.lazy.filter { $0 != nil }.count } }

    /// Sent in window `k`: how many, how many of those arrived, the worst delay among them.
    func progress(window k: Int, start: UInt64, length window: Double) -> (sent: Int, arrived: Int, worst: UInt64) {
        let delays = self.delays(window: k, start: start, length: window)
        return (self.sent(window: k, start: start, length: window), delays.count, delays.last ?? 0)
    }

    func sent(window k: Int, start: UInt64, length window: Double) -> Int {
        let (from, to) = Self.bounds(k, start, window)
        return self.state.withLockedValue { $0.sent.lazy.filter { $0 >= from && $0 < to }.count }
    }

    /// The delays of the messages sent in window `k` that arrived, sorted.
    func delays(window k: Int, start: UInt64, length window: Double) -> [UInt64] {
        let (from, to) = Self.bounds(k, start, window)
        return self.state.withLockedValue { s in
            s.sent.indices.compactMap { s.sent[$0] >= from && s.sent[$0] < to ? s.delays[$0] : nil }.sorted()
        }
    }

    func allDelays() -> [UInt64] { self.state.withLockedValue { $0.delays.compactMap { $0 }.sorted() } }

    private static func bounds(_ k: Int, _ start: UInt64, _ window: Double) -> (UInt64, UInt64) {
        (start + UInt64(Double(k) * window * 1e9), start + UInt64(Double(k + 1) * window * 1e9))
    }
}

/// The nodes' counters, from their metrics listeners (unix sockets), one snapshot per node.
struct MetricsScraper {
    let paths: [String]
    var isEmpty: Bool { self.paths.isEmpty }

    /// Every `staps_broker_*` and `staps_cluster_*` sample, and the node's own drops, by name with labels.
    func scrape() -> [[String: Double]] {
        self.paths.map { path in
            var values: [String: Double] = [:]
            let fd = ChurnWorker.connect(.unix(path: path))
            guard fd >= 0 else { return values }
            defer { close(fd) }
            var timeout = timeval(tv_sec: 5, tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            guard ChurnWorker.writeAll(fd, Array("GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".utf8)) else { return values }
            var bytes: [UInt8] = []
            var buffer = [UInt8](repeating: 0, count: 65536)
            while true {
                let n = read(fd, &buffer, buffer.count)
                guard n > 0 else { break }
                bytes += buffer[0..<n]
            }
            for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") {
                guard line.hasPrefix("staps_broker_") || line.hasPrefix("staps_cluster_") || line.hasPrefix("staps_messages_dropped_total"),
                      let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...]) else { continue }
                values[String(line[..<space])] = value
            }
            return values
        }
    }

    /// The change of `name`, summed over the nodes, from snapshot `k - 1` to `k`.
    static func delta(_ snapshots: [[[String: Double]]], _ k: Int, _ name: String) -> Double {
        zip(snapshots[k - 1], snapshots[k]).reduce(0) { $0 + ($1.1[name] ?? 0) - ($1.0[name] ?? 0) }
    }

    /// The drops that changed from snapshot `k - 1` to `k`, summed over the nodes: `reason:n ...`.
    static func droppedDeltas(_ snapshots: [[[String: Double]]], _ k: Int) -> String {
        let names = Set(snapshots[k].flatMap(\.keys)).filter { $0.contains("dropped_total{") }.sorted()
        let parts = names.compactMap { name -> String? in
            let d = Int(self.delta(snapshots, k, name))
            return d == 0 ? nil : "\(Self.reason(name)):\(d)"
        }
        return parts.isEmpty ? "0" : parts.joined(separator: " ")
    }

    /// One node's totals over the run.
    static func totals(first: [String: Double], last: [String: Double]) -> String {
        func d(_ name: String) -> Int { Int((last[name] ?? 0) - (first[name] ?? 0)) }
        let drops = last.keys.filter { $0.contains("dropped_total{") }.sorted().map { "\(Self.reason($0))=\(d($0))" }
        return "published \(d("staps_broker_published_total")), consumed \(d("staps_broker_consumed_total")), unmatched \(d("staps_cluster_unmatched_total")); dropped " + drops.joined(separator: " ")
    }

    /// `staps_broker_dropped_total{reason="expired"}` → `expired`.
    static func reason(_ name: String) -> String {
        let parts = name.split(separator: "\"")
        return parts.count == 3 ? String(parts[1]) : name
    }
}

/// The broker's own samples (written by the broker itself, see scripts/bench-delay): lines of
/// `unix-ms publishing-connections-in-flow publishing-connections messages-in-queues`.
struct BrokerSamples {
    private var samples: [(ms: Int64, flow: Int, publishers: Int, queued: Int)] = []

    init() {}

    init(path: String?) throws {
        guard let path, let f = fopen(path, "r") else { return }
        defer { fclose(f) }
        var line = [CChar](repeating: 0, count: 256)
        while fgets(&line, Int32(line.count), f) != nil {
            let fields = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self).split(separator: " ")
            let n = fields.compactMap { Int64($0.trimmingCharacters()) }
            guard n.count == 4 else { continue }
            self.samples.append((n[0], Int(n[1]), Int(n[2]), Int(n[3])))
        }
    }

    /// Between two wall-clock times: how many of the publishing connections were in flow (the
    /// mean of the samples), and the most messages the broker's queues held.
    func summary(from: Int64, to: Int64) -> String {
        let inside = self.samples.filter { $0.ms >= from && $0.ms < to }
        guard !inside.isEmpty else { return "-" }
        let flow = Double(inside.reduce(0) { $0 + $1.flow }) / Double(inside.count)
        return Delay.pad("\(String(format2: flow, 1)) of \(inside.map(\.publishers).max()!)", 10) + "\(inside.map(\.queued).max()!)"
    }
}

extension Substring {
    func trimmingCharacters() -> Substring {
        var s = self
        while let c = s.first, c == " " || c == "\n" || c == "\r" || c == "\t" { s.removeFirst() }
        while let c = s.last, c == " " || c == "\n" || c == "\r" || c == "\t" { s.removeLast() }
        return s
    }
}
