import ArgumentParser
import Atomics
import CRabbit
import NIOCore
import NIOPosix
import RabbitClient
import StapsCluster
import WebSocketClient

#if canImport(Glibc)
import Glibc
#endif

struct DiscardCost: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "discard",
        abstract: "The CPU a staps node spends per message it receives from the broker for a channel without a local client, beside a bare rabbitmq-c consumer's for the same messages.",
        discussion: """
            The node (a running staps, --pid, clustered on --exchange with fixed bucket bindings)
            gets one websocket client on a channel, so it binds that channel's bucket. A bare
            publisher then sends N messages (the node's wire format, another node's id) to other
            channels of the bucket: the node receives each and drops it. Its CPU (utime + stime from
            /proc/PID/stat, less its idle rate measured just before) is divided by the messages its
            metrics listener says it received. A bare rabbitmq-c consumer in this process, its queue
            bound to the same bucket, consumes the same messages (no ack, envelope destroyed): its
            thread's CPU per message is the floor, what any consumer of the delivery pays.
            """
    )

    @Option(name: .long, help: "RabbitMQ URL.") var amqp: String
    @Option(name: .long, help: "The node's amqp_exchange.") var exchange: String
    @OptionGroup var endpoints: Endpoints
    @Option(name: .long, help: "The node's metrics listener: host:port or a unix socket path.") var metrics: String
    @Option(name: .long, help: "The node's process id.") var pid: Int32
    @Option(name: .long, help: "The node's amqp_binding_buckets (16, 256 or 4096).") var buckets = 256
    @Option(name: .shortAndLong, help: "Messages to publish.") var messages = 200_000
    @Option(name: .long, help: "Messages per second (0: as fast as the publisher goes).") var rate = 20_000
    @Option(name: .long, help: "Payload bytes.") var size = 16
    @Option(name: .long, help: "Other channels of the bucket the messages go to.") var channels = 100
    @Option(name: .long, help: "Seconds of the idle measurement before the run.") var idleSeconds = 2.0

    func run() async throws {
        print("$ " + CommandLine.arguments.joined(separator: " "))
        guard [16, 256, 4096].contains(buckets) else { throw ValidationError("--buckets: 16, 256 or 4096") }
        let url = try AMQPURL(amqp)
        let endpoint = try endpoints.list()[0]
        let metricsEndpoint: Endpoint
        if metrics.contains("/") {
            metricsEndpoint = .unix(path: metrics)
        } else {
            guard let colon = metrics.lastIndex(of: ":"), let port = Int(metrics[metrics.index(after: colon)...]) else { throw ValidationError("--metrics wants host:port or a path") }
            metricsEndpoint = .tcp(host: String(metrics[..<colon]), port: port)
        }
        // The node's one client: its channel's bucket is bound once the handshake completes.
        let home = "discard-home"
        let client = try WebSocketHold(endpoint, path: "/" + home)
        defer { client.close() }
        let bucket = RoutingKey.binding(forChannel: home, buckets: buckets)
        let others = Array((0...).lazy.map { "discard-other-\($0)" }.filter { RoutingKey.binding(forChannel: $0, buckets: buckets) == bucket }.prefix(channels))

        // The bare consumer's queue, bound to the same bucket before anything is published.
        let consumer = try AMQPConnection(url: url, heartbeatSeconds: 0, connectTimeout: 5)
        let queue = try consumer.declareScratchQueue()
        let exchangeName = CString(exchange)
        let bucketKey = CString(bucket)
        let empty = amqp_table_t(num_entries: 0, entries: nil)
        amqp_queue_bind(consumer.state, 1, queue.bytes, exchangeName.bytes, bucketKey.bytes, empty)
        try consumer.check(amqp_get_rpc_reply(consumer.state), "bind")
        amqp_basic_consume(consumer.state, 1, queue.bytes, amqp_bytes_t(len: 0, bytes: nil), 0, 1, 1, empty)
        try consumer.check(amqp_get_rpc_reply(consumer.state), "consume")

        // The node's idle rate (heartbeats, its link's wake-ups, timers), taken off its figure.
        let idle0 = try ServerProcess(pid).cpuSeconds()
        let idleStart = now()
        try await Task.sleep(nanoseconds: UInt64(idleSeconds * 1e9))
        let idleRate = (try ServerProcess(pid).cpuSeconds() - idle0) / (Double(now() - idleStart) / 1e9)

        let before = try Scrape(metricsEndpoint)
        let cpu0 = try ServerProcess(pid).cpuSeconds()
        let start = now()
        let pool = NIOThreadPool(numberOfThreads: 2)
        pool.start()
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        // @unchecked boxes: each connection is used by exactly one of the two threads.
        let con = Unchecked(consumer)
        let messages = self.messages
        let consumed = pool.runIfActive(eventLoop: group.next()) { () -> (count: Int, cpu: Double) in
            let cpu0 = Self.threadCPUSeconds()
            let count = BrokerBaseline.consume(con.value, messages: messages)
            return (count, Self.threadCPUSeconds() - cpu0)
        }
        let publisher = try AMQPConnection(url: url, heartbeatSeconds: 0, connectTimeout: 5)
        let pub = Unchecked((publisher, others))
        let (size, rate) = (self.size, self.rate)
        let exchange = self.exchange
        let published = pool.runIfActive(eventLoop: group.next()) { () throws -> Int in
            let (publisher, others) = pub.value
            let keys = others.map { CString(RoutingKey.forChannel($0)) }
            let exchange = CString(exchange)
            let bodies: [[UInt8]] = others.map { name in
                var body: [UInt8] = []
                WireFormat.beginBody(channel: name, into: &body)
                WireFormat.append(payload: ByteBuffer(repeating: 0x2A, count: size), into: &body)
                return body
            }
            let appID = CString("discard-bench")
            var batch = PublishBatch(frameMax: Int(amqp_get_frame_max(publisher.state)))
            let start = now()
            var sent = 0
            while sent < messages {
                if rate > 0 {
                    let due = min(messages, Int(Double(now() - start) / 1e9 * Double(rate)))
                    if due <= sent {
                        usleep(1000)
                        continue
                    }
                }
                batch.removeAll()
                let upTo = rate > 0 ? min(messages, Int(Double(now() - start) / 1e9 * Double(rate))) : messages
                while batch.count < 256, sent < upTo {
                    let i = sent % keys.count
                    bodies[i].withUnsafeBytes { batch.append(exchange: exchange.rawBytes, routingKey: keys[i].rawBytes, type: UInt8(ascii: "b"), appID: appID.rawBytes, correlationID: 1, body: $0) }
                    sent += 1
                }
                try batch.write(to: publisher.fileDescriptor)
            }
            return sent
        }
        let sent = try await published.get()
        let bare = try await consumed.get()
        // The node: until its count stops growing (or it has them all).
        var after = try Scrape(metricsEndpoint)
        var lastChange = now()
        while after.consumed - before.consumed < sent, Double(now() - lastChange) / 1e9 < 2 {
            try await Task.sleep(nanoseconds: 50_000_000)
            let s = try Scrape(metricsEndpoint)
            if s.consumed != after.consumed { lastChange = now() }
            after = s
        }
        let wall = Double(now() - start) / 1e9
        let nodeCPU = try ServerProcess(pid).cpuSeconds() - cpu0
        try await pool.shutdownGracefully()
        try await group.shutdownGracefully()
        amqp_queue_delete(consumer.state, 1, queue.bytes, 0, 0)
        publisher.close()
        consumer.close()

        let received = after.consumed - before.consumed
        let dropped = (after.discarded - before.discarded) + (after.unmatched - before.unmatched)
        let net = nodeCPU - idleRate * wall
        print("published \(sent) messages of \(size) B to \(others.count) other channels of the node's bucket \(bucket) in \(String(format2: wall, 2)) s (rate \(rate == 0 ? "max" : "\(rate)/s"))")
        print("node (pid \(pid)): received \(received), dropped as clientless \(dropped) (discarded by the link \(after.discarded - before.discarded), unmatched in the hub \(after.unmatched - before.unmatched)); CPU \(String(format2: nodeCPU, 3)) s, idle \(String(format2: idleRate * wall, 3)) s of it (\(String(format2: idleRate * 1000, 2)) ms/s)")
        if received > 0 {
            print("node: \(String(format2: net / Double(received) * 1e6, 2)) µs CPU per discarded message (\(String(format2: nodeCPU / Double(received) * 1e6, 2)) µs with its idle)")
        }
        if bare.count > 0 {
            print("bare rabbitmq-c consumer: \(bare.count) messages, \(String(format2: bare.cpu, 3)) s CPU = \(String(format2: bare.cpu / Double(bare.count) * 1e6, 2)) µs per message")
        }
        if received > 0, bare.count > 0 {
            print("discard cost: node \(String(format2: net / Double(received) * 1e6, 2)) µs vs bare consume \(String(format2: bare.cpu / Double(bare.count) * 1e6, 2)) µs per message (\(String(format2: (net / Double(received)) / (bare.cpu / Double(bare.count)), 1))x)")
        }
        if received < sent || bare.count < sent { throw ExitCode(2) }
    }

    static func threadCPUSeconds() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}

func readSmallFile(_ path: String) throws -> String {
    let fd = open(path, O_RDONLY)
    guard fd >= 0 else { throw BenchError("\(path): \(String(cString: strerror(errno)))") }
    defer { close(fd) }
    return String(decoding: ChurnWorker.readToEnd(fd), as: UTF8.self)
}

/// The broker counters of a node's `/metrics` (one blocking HTTP request).
struct Scrape {
    var consumed = 0
    var discarded = 0
    var unmatched = 0

    init(_ endpoint: Endpoint) throws {
        let fd = ChurnWorker.connect(endpoint)
        guard fd >= 0 else { throw BenchError("metrics: cannot connect: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        guard ChurnWorker.writeAll(fd, Array("GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".utf8)) else { throw BenchError("metrics: write failed") }
        for line in String(decoding: ChurnWorker.readToEnd(fd), as: UTF8.self).split(separator: "\n") {
            let parts = line.split(separator: " ")
            guard parts.count == 2, let value = Double(parts[1]) else { continue }
            switch parts[0] {
            case "staps_broker_consumed_total": self.consumed = Int(value)
            case "staps_broker_discarded_total": self.discarded = Int(value)
            case "staps_cluster_unmatched_total": self.unmatched = Int(value)
            default: break
            }
        }
    }
}

/// A websocket client that connected (101) and then only stays: it reads nothing, so it must
/// get no messages (its channel has none).
struct WebSocketHold {
    let fd: Int32

    init(_ endpoint: Endpoint, path: String) throws {
        let fd = ChurnWorker.connect(endpoint)
        guard fd >= 0 else { throw BenchError("websocket: cannot connect: \(String(cString: strerror(errno)))") }
        var buffer = [UInt8](repeating: 0, count: 1024)
        let answer = ChurnWorker.upgrade(fd, path: path, buffer: &buffer)
        guard let answer, answer.complete, answer.head.starts(with: Array("HTTP/1.1 101".utf8)) else {
            Glibc.close(fd)
            throw BenchError("websocket: no 101: " + String(decoding: (answer?.head ?? []).prefix(60), as: UTF8.self))
        }
        self.fd = fd
    }

    func close() { _ = Glibc.close(self.fd) }
}
