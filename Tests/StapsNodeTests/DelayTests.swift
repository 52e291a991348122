import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import StapsCluster
import StapsNode
import StapsRabbit
import Testing
import WebSocketClient

/// Issue 15's mix, shorter, on the private broker: three real nodes, real websocket clients.
/// Light channels, a busy channel and churn load nodes 2 and 3; node 1 carries only the probe's
/// sender, so its counters are the probe's alone; the probe's receiver is on node 2. Midway the
/// broker's memory alarm blocks every publisher for longer than the bound, as a broker far
/// behind would, whatever this machine's speed: the test prints the probe's delays and checks
/// what the bound promises (every message confirmed or counted; none the node held delivered
/// late), not how fast anything went.
@Suite(.serialized) struct DelayUnderLoadTests {
    static let maxAge = TimeAmount.seconds(1)
    /// What a message may take beyond the node's bound: the link's window (a round trip and
    /// 100 ms of the broker's work), the broker, the receiving node, a busy machine.
    static let margin = TimeAmount.milliseconds(1500)

    @Test func noMessageIsDeliveredLaterThanTheBoundAndEveryOneIsCounted() async throws {
        let url = try await Broker.require()
        let exchange = Broker.freshExchange()
        let logs = (0..<3).map { _ in LogCapture() }
        var nodes: [(TestNode, RabbitLink)] = []
        for log in logs {
            let settings = ClusterSettings(exchange: exchange, maxAge: Self.maxAge)
            let link = RabbitLink(configuration: RabbitConfiguration(url: try AMQPURL(url), settings: settings), logger: log.logger)
            nodes.append((try await TestNode.start(link: link), link))
        }
        let loadGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let probeGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        var alarmed = false
        defer { if alarmed { try? Broker.control("set-memory-watermark", "0.4") } }
        try await eventually("broker links up", within: 10) { nodes.allSatisfy { $0.1.isConnected } }
        let endpoints = nodes.map { $0.0.unix }
        let node: @Sendable (Int) -> Endpoint = { endpoints[$0] }
        let deliveries = Deliveries()
        let stopping = NIOLockedValueBox(false)

        // The probe: node 1 -> node 2, every 100 ms, on a client thread of its own.
        _ = try await WebSocketClient.connect(to: node(1), path: "/probe", group: probeGroup) { event in
            if case .message(_, let buffer) = event { deliveries.received(buffer, probe: true) }
        }
        let probe = try await WebSocketClient.connect(to: node(0), path: "/probe", group: probeGroup) { _ in }
        // The busy channel: 300 msg/s from node 3 to 10 receivers on nodes 2 and 3.
        for r in 0..<10 {
            _ = try await WebSocketClient.connect(to: node(1 + r % 2), path: "/busy", group: loadGroup) { event in
                if case .message(_, let buffer) = event { deliveries.received(buffer, probe: false) }
            }
        }
        let busy = try await WebSocketClient.connect(to: node(2), path: "/busy", group: loadGroup) { _ in }
        // 150 light channels, one client on each node, the publisher (2 msg/s) on node 2 or 3.
        var lightPublishers: [WebSocketClient] = []
        for c in 0..<150 {
            for j in 0..<3 where j != 1 + c % 2 {
                _ = try await WebSocketClient.connect(to: node(j), path: "/light-\(c)", group: loadGroup) { event in
                    if case .message(_, let buffer) = event { deliveries.received(buffer, probe: false) }
                }
            }
            lightPublishers.append(try await WebSocketClient.connect(to: node(1 + c % 2), path: "/light-\(c)", group: loadGroup) { _ in })
        }

        let probeSent = NIOLockedValueBox(0)
        let probeTask = probe.connection.eventLoop.scheduleRepeatedTask(initialDelay: .zero, delay: .milliseconds(100)) { task in
            guard !stopping.withLockedValue({ $0 }) else { return task.cancel() }
            let seq = probeSent.withLockedValue { n in defer { n += 1 }; return n }
            probe.send(opcode: .binary, Deliveries.payload(seq: seq, allocator: probe.connection.allocator))
        }
        let busyTask = busy.connection.eventLoop.scheduleRepeatedTask(initialDelay: .zero, delay: .milliseconds(10)) { task in
            guard !stopping.withLockedValue({ $0 }) else { return task.cancel() }
            for _ in 0..<3 { busy.send(opcode: .binary, Deliveries.payload(seq: 0, allocator: busy.connection.allocator), flush: false) }
            busy.connection.flush()
        }
        let lightTasks = lightPublishers.map { client in
            client.connection.eventLoop.scheduleRepeatedTask(initialDelay: .milliseconds(Int64.random(in: 0..<500)), delay: .milliseconds(500)) { task in
                guard !stopping.withLockedValue({ $0 }) else { return task.cancel() }
                client.send(opcode: .binary, Deliveries.payload(seq: 0, allocator: client.connection.allocator))
            }
        }
        // Churn on nodes 2 and 3: a fresh channel, one message, a close; two at a time.
        let churn = (0..<2).map { w in
            Task {
                var cycles = 0
                while !stopping.withLockedValue({ $0 }) {
                    guard let client = try? await WebSocketClient.connect(to: node(1 + w), path: "/churn-\(UUID4.make())", group: loadGroup, onEvent: { _ in }) else { continue }
                    client.send(opcode: .binary, Deliveries.payload(seq: 0, allocator: client.connection.allocator))
                    client.close()
                    try? await client.connection.closeFuture.get()
                    cycles += 1
                }
                return cycles
            }
        }

        // Four seconds of the mix, then every publisher blocked for four more (the bound is
        // one), then six seconds of the mix again.
        // What the probe's node wrote between the alarm and its hearing of it waits with the
        // broker, out of any bound's reach (README): those messages are reported, not checked.
        try await Task.sleep(for: .seconds(4))
        let writtenBeforeTheAlarm = probeSent.withLockedValue { $0 }
        try Broker.control("set-memory-watermark", "0.0001")
        alarmed = true
        try await eventually("node 1 is blocked", within: 10) { logs[0].text.contains("broker blocked publishing") }
        let heldFromTheAlarm = probeSent.withLockedValue { $0 }
        try await eventually("every node is blocked", within: 10) { logs.allSatisfy { $0.text.contains("broker blocked publishing") } }
        try await Task.sleep(for: .seconds(4))
        try Broker.control("set-memory-watermark", "0.4")
        alarmed = false
        try await eventually("every node is unblocked", within: 10) { logs.allSatisfy { $0.text.contains("broker unblocked publishing") } }
        try await Task.sleep(for: .seconds(6))
        stopping.withLockedValue { $0 = true }
        probeTask.cancel()
        busyTask.cancel()
        for task in lightTasks { task.cancel() }
        var cycles = 0
        for task in churn { cycles += await task.value }

        // Every message a node's clients sent was confirmed by the broker or counted as dropped.
        func ledger(_ i: Int) -> (sent: Int, published: Int, dropped: Int, expired: Int) {
            let scrape = Scrape(String(decoding: nodes[i].0.node.metrics.render(), as: UTF8.self))
            let c = nodes[i].1.counters
            let dropped = [c.droppedWhileDown, c.droppedBufferFull, c.droppedExpired, c.rejected].reduce(0) { $0 + $1.load(ordering: .relaxed) }
            return (Int(scrape[#"staps_messages_received_total{source="websocket"}"#]), c.published.load(ordering: .relaxed), dropped, c.droppedExpired.load(ordering: .relaxed))
        }
        try await eventually("every node's messages are confirmed or counted as dropped", within: 20, every: .milliseconds(100)) {
            (0..<3).allSatisfy { let l = ledger($0); return l.sent == l.published + l.dropped }
        }
        // What the probe's node published reaches the receiver, or expired in its queue (the
        // broker drops that without telling anyone): wait for it.
        let sent = probeSent.withLockedValue { $0 }
        let probeNode = ledger(0)
        try? await eventually("the probe's published messages arrive", within: 5) { deliveries.probeCount >= probeNode.published }

        let delays = deliveries.probeDelays
        let caught = writtenBeforeTheAlarm..<heldFromTheAlarm
        print("DelayUnderLoadTests: amqp_max_age \(Self.maxAge.nanoseconds / 1_000_000) ms, publishers blocked for 4 s from 4 s on; churn \(cycles) cycles")
        print("window   probe sent  arrived  max ms   p99 ms")
        for w in 0..<(sent + 19) / 20 {
            let inside = (w * 20..<min(sent, (w + 1) * 20))
            let arrived = inside.compactMap { delays[$0] }.sorted()
            let p99 = arrived.isEmpty ? 0 : arrived[min(arrived.count - 1, Int((Double(arrived.count) * 0.99).rounded(.up)) - 1)]
            print("\(w * 2)-\(w * 2 + 2) s".padding(toLength: 9, withPad: " ", startingAt: 0) + "\(inside.count)".padding(toLength: 12, withPad: " ", startingAt: 0)
                  + "\(arrived.count)".padding(toLength: 9, withPad: " ", startingAt: 0) + "\((arrived.last ?? 0) / 1_000_000)".padding(toLength: 9, withPad: " ", startingAt: 0) + "\(p99 / 1_000_000)")
        }
        print("probe: \(sent) sent, \(probeNode.published) published, \(probeNode.expired) expired in node 1, \(deliveries.probeCount) arrived; every message: \(deliveries.count) delivered, the oldest \(deliveries.oldest / 1_000_000) ms")
        print("probe messages sent between the alarm and node 1's hearing of it (#\(caught.lowerBound)-#\(caught.upperBound - 1)): " + caught.map { delays[$0].map { "\($0 / 1_000_000) ms" } ?? "-" }.joined(separator: ", "))
        for i in 0..<3 { print("node \(i + 1): \(ledger(i))") }

        #expect(probeNode.sent == sent, "node 1 carries the probe alone")
        #expect(probeNode.expired > 0, "the probe's messages that waited longer than the bound were dropped and counted")
        #expect(deliveries.probeCount <= probeNode.published, "nothing arrives that was not published")
        #expect(deliveries.probeCount > 0 && deliveries.count > 0)
        let late = delays.filter { !caught.contains($0.key) && $0.value > UInt64((Self.maxAge + Self.margin).nanoseconds) }
        #expect(late.isEmpty, "no probe message the node held is delivered older than the bound and a margin: \(late.sorted { $0.key < $1.key }.map { "#\($0.key): \($0.value / 1_000_000) ms" })")
        try await loadGroup.shutdownGracefully()
        try await probeGroup.shutdownGracefully()
        await stopAll(nodes)
    }
}

/// What the receivers got: the probe's delay per message, and the oldest of all.
final class Deliveries: Sendable {
    private let state = NIOLockedValueBox((probe: [Int: UInt64](), count: 0, oldest: UInt64(0)))

    /// A timestamped payload: the send time (this process's monotonic clock) and a number.
    static func payload(seq: Int, allocator: ByteBufferAllocator) -> ByteBuffer {
        var buffer = allocator.buffer(capacity: 64)
        buffer.writeMultipleIntegers(NIODeadline.now().uptimeNanoseconds, UInt64(seq))
        buffer.writeRepeatingByte(0x2A, count: 48)
        return buffer
    }

    func received(_ buffer: ByteBuffer, probe: Bool) {
        let now = NIODeadline.now().uptimeNanoseconds
        guard let (sent, seq) = buffer.getMultipleIntegers(at: buffer.readerIndex, as: (UInt64, UInt64).self) else { return }
        let delay = now - sent
        self.state.withLockedValue { s in
            if probe { s.probe[Int(seq)] = delay }
            s.count += 1
            s.oldest = max(s.oldest, delay)
        }
    }

    var probeDelays: [Int: UInt64] { self.state.withLockedValue { $0.probe } }
    var probeCount: Int { self.state.withLockedValue { $0.probe.count } }
    var count: Int { self.state.withLockedValue { $0.count } }
    var oldest: UInt64 { self.state.withLockedValue { $0.oldest } }
}
