import ArgumentParser
import Atomics
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import StapsCluster
import StapsNode
import StapsRabbit
import WebSocketClient

#if canImport(Glibc)
import Glibc
#endif

@main
struct StapsBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "staps-bench",
        abstract: "Load generator for staps: fan-out throughput and latency, and memory per idle connection.",
        subcommands: [FanOut.self, Idle.self, Broker.self, Binds.self, Churn.self, Rebind.self]
    )
}

struct Endpoints: ParsableArguments {
    @Option(name: .long, help: "Unix socket of a node (repeatable; clients are spread round-robin over all endpoints).")
    var unix: [String] = []

    @Option(name: .long, help: "TCP host:port of a node (repeatable).")
    var tcp: [String] = []

    func list() throws -> [Endpoint] {
        var out = unix.map { Endpoint.unix(path: $0) }
        for t in tcp {
            guard let colon = t.lastIndex(of: ":"), let port = Int(t[t.index(after: colon)...]) else {
                throw ValidationError("--tcp wants host:port, got \(t)")
            }
            out.append(.tcp(host: String(t[..<colon]), port: port))
        }
        guard !out.isEmpty else { throw ValidationError("name at least one --unix or --tcp endpoint") }
        return out
    }
}

func now() -> UInt64 { NIODeadline.now().uptimeNanoseconds }

func ms(_ nanos: UInt64) -> String {
    let v = Double(nanos) / 1e6
    return v < 10 ? String(format2: v, 3) : String(format2: v, 1)
}

extension String {
    init(format2 value: Double, _ digits: Int) {
        var p = 1.0
        for _ in 0..<digits { p *= 10 }
        let r = (value * p).rounded() / p
        var s = "\(r)"
        if let dot = s.firstIndex(of: ".") {
            let decimals = s.distance(from: dot, to: s.endIndex) - 1
            if decimals < digits { s += String(repeating: "0", count: digits - decimals) }
        }
        self = s
    }
}

/// What one receiving client saw. Touched only on its channel's event loop until the end.
final class ReceiverStats: @unchecked Sendable {
    // @unchecked: mutated only on the client's event loop; read after the run, through that loop.
    let ownPublisher: Int32
    var received = 0
    var duplicated = 0
    var echoed = 0
    var lastSeq: [Int32: Int64] = [:]
    var histogram = Histogram()
    var closeCode: UInt16?

    /// Shared by all receivers: progress while the run goes on.
    let delivered: ManagedAtomic<Int>

    init(ownPublisher: Int32, delivered: ManagedAtomic<Int>) {
        self.ownPublisher = ownPublisher
        self.delivered = delivered
    }

    func record(_ buffer: ByteBuffer, at time: UInt64) {
        guard let (publisher, seq, sent) = buffer.getMultipleIntegers(at: buffer.readerIndex, as: (Int32, Int32, UInt64).self) else { return }
        if publisher == ownPublisher { echoed += 1; return }
        let last = lastSeq[publisher] ?? -1
        if Int64(seq) <= last { duplicated += 1; return }
        lastSeq[publisher] = Int64(seq)
        received += 1
        delivered.wrappingIncrement(ordering: .relaxed)
        histogram.record(time &- sent)
    }
}

struct FanOut: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fanout",
        abstract: "C channels x S subscribers x P publishers x M messages; reports deliveries/s, lost, duplicated, echoed, latency."
    )

    @OptionGroup var endpoints: Endpoints
    @Option(name: .shortAndLong, help: "Channels.") var channels = 10
    @Option(name: .shortAndLong, help: "Subscribers per channel.") var subscribers = 10
    @Option(name: .shortAndLong, help: "Publishers per channel (they also receive each other's messages).") var publishers = 1
    @Option(name: .shortAndLong, help: "Messages per publisher.") var messages = 10_000
    @Option(name: .long, help: "Payload bytes (at least 16).") var size = 64
    @Option(name: .long, help: "Messages per second per publisher (0: as fast as the socket takes them).") var rate = 0
    @Option(name: .long, help: "Client event-loop threads.") var threads = 1
    @Option(name: .long, help: "Give up waiting for deliveries after this many seconds.") var timeout = 60.0

    func run() async throws {
        let endpoints = try self.endpoints.list()
        guard size >= 16 else { throw ValidationError("--size must be at least 16") }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: threads)
        let runID = UInt64.random(in: 0...UInt64.max)
        var stats: [ReceiverStats] = []
        var publisherClients: [(WebSocketClient, Int32)] = []
        var connected = 0
        let delivered = ManagedAtomic<Int>(0)
        // Subscribers first, then publishers: everyone is joined before the first message.
        for c in 0..<channels {
            let path = "/bench-\(runID)-\(c)"
            for i in 0..<(subscribers + publishers) {
                let isPublisher = i >= subscribers
                let publisherID = isPublisher ? Int32(c * publishers + (i - subscribers)) : -1
                let stat = ReceiverStats(ownPublisher: publisherID, delivered: delivered)
                let client = try await WebSocketClient.connect(to: endpoints[connected % endpoints.count], path: path, group: group) { event in
                    switch event {
                    case .message(_, let buffer): stat.record(buffer, at: now())
                    case .close(let code, _): stat.closeCode = code
                    case .disconnected: break
                    }
                }
                connected += 1
                stats.append(stat)
                if isPublisher { publisherClients.append((client, publisherID)) }
            }
        }
        let expectedPerMessage = subscribers + publishers - 1
        let expected = channels * publishers * messages * expectedPerMessage
        print("fanout: \(channels) channels x \(subscribers) subscribers x \(publishers) publishers x \(messages) messages, \(size) B, rate \(rate == 0 ? "max" : "\(rate)/s"), endpoints \(endpoints.map(\.description).joined(separator: " "))")

        let start = now()
        let finished = ManagedAtomic<Int>(0)
        for (client, id) in publisherClients {
            let pump = Publisher(client: client, id: id, count: messages, size: size, rate: rate, finished: finished)
            client.channel.eventLoop.execute { pump.start() }
        }
        // Wait for every delivery, or for progress to stop.
        var lastTotal = -1
        var lastProgress = now()
        var end = start
        while true {
            try await Task.sleep(nanoseconds: 20_000_000)
            let total = delivered.load(ordering: .relaxed)
            if total >= expected && finished.load(ordering: .relaxed) == publisherClients.count { end = now(); break }
            if total != lastTotal { lastTotal = total; lastProgress = now(); end = now() }
            if Double(now() - lastProgress) / 1e9 > min(timeout, 5) || Double(now() - start) / 1e9 > timeout { break }
        }
        // Stopping the client threads orders their writes before the reads below.
        for (client, _) in publisherClients { client.channel.close(promise: nil) }
        try await group.shutdownGracefully()
        var histogram = Histogram()
        var received = 0, duplicated = 0, echoed = 0, closed = 0
        for s in stats {
            received += s.received
            duplicated += s.duplicated
            echoed += s.echoed
            if s.closeCode != nil { closed += 1 }
            histogram.merge(s.histogram)
        }
        let seconds = Double(end - start) / 1e9
        let rate = Double(received) / seconds
        print("deliveries: \(received)/\(expected) in \(String(format2: seconds, 3)) s = \(Int(rate)) deliveries/s (\(Int(Double(channels * publishers * messages) / seconds)) messages/s in)")
        print("lost: \(expected - received)  duplicated: \(duplicated)  echoed: \(echoed)  closed by server: \(closed)")
        print("latency ms: p50 \(ms(histogram.quantile(0.5)))  p99 \(ms(histogram.quantile(0.99)))  max \(ms(histogram.max))")
        if received != expected || duplicated != 0 || echoed != 0 { throw ExitCode(2) }
    }

}

/// Sends a publisher's messages on its event loop: bursts while the socket is writable,
/// paced by a timer when a rate is set. Bounded: it never queues more than one burst.
final class Publisher: @unchecked Sendable {
    // @unchecked: every method runs on the client's event loop.
    let client: WebSocketClient
    let id: Int32
    let count: Int
    let size: Int
    let rate: Int
    let finished: ManagedAtomic<Int>
    var sent = 0
    var startTime: UInt64 = 0

    init(client: WebSocketClient, id: Int32, count: Int, size: Int, rate: Int, finished: ManagedAtomic<Int>) {
        self.client = client
        self.id = id
        self.count = count
        self.size = size
        self.rate = rate
        self.finished = finished
    }

    func start() {
        startTime = now()
        pump()
    }

    func pump() {
        let channel = client.channel
        let allowed: Int
        if rate > 0 {
            let due = Int(Double(now() - startTime) / 1e9 * Double(rate)) + 1
            allowed = min(due, count) - sent
        } else {
            allowed = count - sent
        }
        var burst = 0
        while burst < min(allowed, 64), channel.isWritable {
            var payload = channel.allocator.buffer(capacity: size)
            payload.writeMultipleIntegers(id, Int32(sent), now())
            payload.writeRepeatingByte(0x2A, count: size - 16)
            client.send(opcode: .binary, payload, flush: false)
            sent += 1
            burst += 1
        }
        channel.flush()
        if sent >= count {
            finished.wrappingIncrement(ordering: .relaxed)
            return
        }
        guard channel.isActive else { return }
        if rate > 0 && burst == allowed {
            channel.eventLoop.scheduleTask(in: .microseconds(500)) { self.pump() }
        } else if channel.isWritable {
            channel.eventLoop.execute { self.pump() }
        } else {
            channel.eventLoop.scheduleTask(in: .microseconds(200)) { self.pump() }
        }
    }
}

struct Idle: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "idle",
        abstract: "Opens N idle websocket connections and reports the node's resident memory per connection."
    )

    @OptionGroup var endpoints: Endpoints
    @Option(name: [.customShort("n"), .long], help: "Connections to open.") var connections = 10_000
    @Option(name: .long, help: "Channels to spread them over.") var channels = 100
    @Option(name: .long, help: "PID of the node, to read its VmRSS from /proc.") var pid: Int32

    func run() async throws {
        let endpoints = try self.endpoints.list()
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let before = try Self.rss(pid)
        var clients: [WebSocketClient] = []
        for i in 0..<connections {
            clients.append(try await WebSocketClient.connect(to: endpoints[i % endpoints.count], path: "/idle-\(i % channels)", group: group) { _ in })
        }
        try await Task.sleep(nanoseconds: 1_000_000_000)
        let after = try Self.rss(pid)
        let per = Double(after - before) / Double(connections)
        print("idle: \(connections) connections over \(channels) channels: node RSS \(before / 1024) KiB -> \(after / 1024) KiB, \(Int(per)) bytes per connection")
        for c in clients { c.channel.close(promise: nil) }
        try await Task.sleep(nanoseconds: 200_000_000)
        try await group.shutdownGracefully()
    }

    static func rss(_ pid: Int32) throws -> Int {
        guard let f = fopen("/proc/\(pid)/status", "r") else { throw ValidationError("cannot read /proc/\(pid)/status") }
        defer { fclose(f) }
        var line = [CChar](repeating: 0, count: 512)
        while fgets(&line, Int32(line.count), f) != nil {
            let s = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            if s.hasPrefix("VmRSS:") {
                let digits = s.split(separator: " ").compactMap { Int($0) }
                if let kb = digits.first { return kb * 1024 }
            }
        }
        throw ValidationError("no VmRSS for pid \(pid)")
    }
}

struct Broker: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "broker",
        abstract: "The broker's bare publish->consume rate (one publishing and one consuming rabbitmq-c connection)."
    )

    @Option(name: .long, help: "RabbitMQ URL.") var amqp: String
    @Option(name: .shortAndLong, help: "Messages.") var messages = 200_000
    @Option(name: .long, help: "Payload bytes.") var size = 64

    func run() async throws {
        let result = try await BrokerBaseline.run(url: try AMQPURL(amqp), messages: messages, size: size)
        print("broker: \(result.consumed)/\(result.published) messages of \(size) B in \(String(format2: result.seconds, 3)) s = \(Int(result.messagesPerSecond)) messages/s publish->consume")
        if result.consumed != messages { throw ExitCode(2) }
    }
}

struct Binds: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "binds",
        abstract: "The broker's bare bind->unbind rate: one rabbitmq-c connection, pipelined, fresh keys (no staps)."
    )

    @Option(name: .long, help: "RabbitMQ URL.") var amqp: String
    @Option(name: .shortAndLong, help: "Bind->unbind cycles.") var cycles = 20_000
    @Option(name: .long, help: "Requests in flight at once.") var window = 256

    func run() async throws {
        let result = try BindBaseline.run(url: try AMQPURL(amqp), cycles: cycles, window: window)
        print("binds: \(result.cycles) bind->unbind cycles in \(String(format2: result.seconds, 3)) s = \(Int(result.cyclesPerSecond)) cycles/s (window \(window))")
    }
}

struct Churn: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "churn",
        abstract: "Throw-away channels: W workers each connect to a fresh random channel, send one message, close; reports cycles/s and connect latency.",
        discussion: """
            Each worker is a thread with plain blocking sockets (no event loop, nothing per cycle but
            the syscalls), so the load generator costs the shared cores as little as it can.
            """
    )

    @OptionGroup var endpoints: Endpoints
    @Option(name: .shortAndLong, help: "Workers, each running one cycle at a time.") var workers = 4
    @Option(name: .long, help: "Seconds to run.") var seconds = 10.0

    func run() async throws {
        let endpoints = try self.endpoints.list()
        let pool = NIOThreadPool(numberOfThreads: workers)
        pool.start()
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let deadline = now() + UInt64(seconds * 1e9)
        let start = now()
        var futures: [EventLoopFuture<ChurnWorker.Result>] = []
        for w in 0..<workers {
            let worker = ChurnWorker(endpoints: endpoints, first: w, step: workers, deadline: deadline)
            futures.append(pool.runIfActive(eventLoop: group.next()) { worker.run() })
        }
        var histogram = Histogram()
        var cycles = 0
        var failures: [String] = []
        for f in futures {
            let r = try await f.get()
            cycles += r.cycles
            failures += r.failures
            histogram.merge(r.histogram)
        }
        let elapsed = Double(now() - start) / 1e9
        try await pool.shutdownGracefully()
        try await group.shutdownGracefully()
        print("churn: \(workers) workers, \(endpoints.count) endpoint(s), \(String(format2: elapsed, 1)) s: \(cycles) cycles = \(Int(Double(cycles) / elapsed)) cycles/s, \(failures.count) failed\(failures.first.map { " (first: \($0))" } ?? "")")
        print("connect ms (connect to 101): p50 \(ms(histogram.quantile(0.5)))  p99 \(ms(histogram.quantile(0.99)))  max \(ms(histogram.max))")
        if !failures.isEmpty { throw ExitCode(2) }
    }
}

/// One churn worker: connect, handshake, one masked binary message, close, wait for the server
/// to drop the connection; over and over until the deadline, with blocking syscalls.
struct ChurnWorker: Sendable {
    struct Result: Sendable {
        var cycles = 0
        var failures: [String] = []
        var histogram = Histogram()
    }

    let endpoints: [Endpoint]
    let first: Int
    let step: Int
    let deadline: UInt64

    func run() -> Result {
        var result = Result()
        var i = first
        var buffer = [UInt8](repeating: 0, count: 4096)
        // A masked 16-byte binary frame, then a masked close 1000 (mask key 0: payload as is).
        let frames: [UInt8] = [0x82, 0x90, 0, 0, 0, 0] + [UInt8](repeating: 0x2A, count: 16) + [0x88, 0x82, 0, 0, 0, 0, 0x03, 0xE8]
        while now() < deadline {
            let endpoint = endpoints[i % endpoints.count]
            i += step
            let t0 = now()
            let fd = Self.connect(endpoint)
            guard fd >= 0 else { result.failures.append("connect: \(String(cString: strerror(errno)))"); continue }
            defer { close(fd) }
            let request = "GET /\(UUID4.make()) HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            guard Self.writeAll(fd, Array(request.utf8)) else { result.failures.append("write request"); continue }
            // Read the response head.
            var head: [UInt8] = []
            var complete = false
            while !complete {
                let n = read(fd, &buffer, buffer.count)
                guard n > 0 else { break }
                head += buffer[0..<n]
                complete = Self.hasHeadEnd(head, from: max(0, head.count - n - 3))
            }
            guard complete, head.starts(with: Array("HTTP/1.1 101".utf8)) else {
                result.failures.append("handshake: " + String(decoding: head.prefix(40), as: UTF8.self))
                continue
            }
            result.histogram.record(now() - t0)
            guard Self.writeAll(fd, frames) else { result.failures.append("write frames"); continue }
            // The server answers the close and drops the connection.
            while read(fd, &buffer, buffer.count) > 0 {}
            result.cycles += 1
        }
        return result
    }

    static func hasHeadEnd(_ bytes: [UInt8], from start: Int) -> Bool {
        guard bytes.count >= 4 else { return false }
        for i in start...(bytes.count - 4) where bytes[i] == 13 && bytes[i + 1] == 10 && bytes[i + 2] == 13 && bytes[i + 3] == 10 { return true }
        return false
    }

    static func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        var at = 0
        while at < bytes.count {
            let n = bytes[at...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            guard n > 0 else { return false }
            at += n
        }
        return true
    }

    /// A blocking socket connected to `endpoint` (TCP_NODELAY over TCP), or -1.
    static func connect(_ endpoint: Endpoint) -> Int32 {
        let address: SocketAddress
        let fd: Int32
        switch endpoint {
        case .unix(let path):
            guard let a = try? SocketAddress(unixDomainSocketPath: path) else { return -1 }
            (address, fd) = (a, socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0))
        case .tcp(let host, let port):
            guard let a = try? SocketAddress(ipAddress: host, port: port) else { return -1 }
            (address, fd) = (a, socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0))
            var one: Int32 = 1
            setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        }
        guard fd >= 0 else { return -1 }
        guard address.withSockAddr({ Glibc.connect(fd, $0, socklen_t($1)) }) == 0 else {
            close(fd)
            return -1
        }
        return fd
    }
}

struct Rebind: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rebind",
        abstract: "Holds N channels on K cluster links, restarts the broker, and times until every link has rebound them all.",
        discussion: """
            The links are staps's own RabbitMQ links (StapsRabbit), one per simulated node, in this
            process, against the real broker: a channel is held by subscribing it as a node does
            for its first local client, without a websocket per channel (100,000 sockets would
            exceed the file limits of most machines, and sockets are not what is measured).
            Probe channels (published from one link, consumed by the next) send a numbered
            message every 20 ms throughout, so the run also shows when messages flow again.
            """
    )

    @Option(name: .long, help: "RabbitMQ URL.") var amqp: String
    @Option(name: .long, help: "Cluster links (nodes).") var nodes = 3
    @Option(name: [.customShort("n"), .long], help: "Channels to hold, spread over the links.") var channels = 100_000
    @Option(name: .long, help: "amqp_binding_buckets of the links (0: a binding per channel).") var buckets = ClusterSettings().bindingBuckets
    @Option(name: .long, help: "Probe channels.") var probes = 30
    @Option(name: .long, help: "Shell command that restarts the broker and returns once it accepts connections again.") var restart: String
    @Option(name: .long, help: "Give up after this many seconds.") var timeout = 60.0

    func run() async throws {
        guard nodes >= 2 else { throw ValidationError("probes need at least two links") }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let settings = ClusterSettings(exchange: "staps-rebind-" + String(UUID4.make().prefix(8)), bindingBuckets: buckets)
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
        // Hold: every channel subscribed as a node's first client would, confirmed by the broker.
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
        let bindings = links.map { $0.counters.bindingKeysBound.load(ordering: .relaxed) }
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
            print("link \(i + 1): publishing again \(up), every binding back \(done) after the broker was back (\(links[i].counters.bindingKeysBound.load(ordering: .relaxed)) bindings)")
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
