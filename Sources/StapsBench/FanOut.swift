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
    @Flag(name: .long, help: "The server sends a client's messages back to it (Nchan): count them apart, as echoed, and do not fail on them.") var echoes = false
    @Option(name: .long, help: "PID of the server: report its CPU time while the messages flow and its RSS, from /proc (child processes included).") var pid: Int32?

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

        let server = pid.map(ServerProcess.init)
        let cpu0 = try server?.cpuSeconds() ?? 0
        let rss0 = try server?.rss() ?? 0
        let start = now()
        let finished = ManagedAtomic<Int>(0)
        for (client, id) in publisherClients {
            let pump = Publisher(client: client, id: id, count: messages, size: size, rate: rate, finished: finished)
            client.connection.eventLoop.execute { pump.start() }
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
        let serverLine = try server?.report(since: cpu0, rss0: rss0, count: delivered.load(ordering: .relaxed), unit: "delivery")
        // Stopping the client threads orders their writes before the reads below.
        for (client, _) in publisherClients { client.connection.close(promise: nil) }
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
        if let serverLine { print(serverLine) }
        if received != expected || duplicated != 0 || (echoed != 0 && !echoes) { throw ExitCode(2) }
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
        if rate > 0 {
            // Publishers at a rate start at random points of their first interval, so that
            // thousands of slow ones do not all send in the same instant.
            let interval = UInt64(1e9 / Double(rate))
            startTime = now() + UInt64.random(in: 0..<max(interval, 1))
            client.connection.eventLoop.scheduleTask(deadline: NIODeadline.uptimeNanoseconds(startTime)) { self.pump() }
        } else {
            startTime = now()
            pump()
        }
    }

    func pump() {
        let connection = client.connection
        let allowed: Int
        if rate > 0 {
            let t = now()
            let due = Int(Double(t > startTime ? t - startTime : 0) / 1e9 * Double(rate)) + 1
            allowed = min(due, count) - sent
        } else {
            allowed = count - sent
        }
        var burst = 0
        while burst < min(allowed, 64), connection.isWritable {
            var payload = connection.allocator.buffer(capacity: size)
            payload.writeMultipleIntegers(id, Int32(sent), now())
            payload.writeRepeatingByte(0x2A, count: size - 16)
            client.send(opcode: .binary, payload, flush: false)
            sent += 1
            burst += 1
        }
        connection.flush()
        if sent >= count {
            finished.wrappingIncrement(ordering: .relaxed)
            return
        }
        guard connection.isActive else { return }
        if rate > 0 && burst == allowed {
            // At the next message's time, 500 µs from now at the soonest (a slow publisher wakes
            // when it has something to send, not 2,000 times a second).
            let due = startTime + UInt64(Double(sent) / Double(rate) * 1e9)
            connection.eventLoop.scheduleTask(deadline: NIODeadline.uptimeNanoseconds(max(due, now() + 500_000))) { self.pump() }
        } else if connection.isWritable {
            connection.eventLoop.execute { self.pump() }
        } else {
            connection.eventLoop.scheduleTask(in: .microseconds(200)) { self.pump() }
        }
    }
}
