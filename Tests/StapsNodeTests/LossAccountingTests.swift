import Atomics
import Foundation
import NIOCore
import StapsCluster
import StapsNode
@testable import StapsRabbit
import Testing
import WebSocketClient

/// Nothing lost without a count (issue 16): on a real broker, what a receiving node's client got
/// plus what the node counted missed (`staps_cluster_missed_total`) is what the other node's
/// client sent, to the message, whoever lost the rest.
@Suite(.serialized) struct LossAccountingTests {
    /// A sender's messages after the warm-up: `<n> ` and padding, then `final`.
    static func message(_ n: Int, size: Int) -> String {
        let head = "\(n) "
        return head + String(repeating: "x", count: max(0, size - head.utf8.count))
    }

    /// What `client` received up to and including `final`: the numbers, in order, each once.
    static func receivedUntilFinal(_ client: TestClient, timeout: Double = 20) async throws -> [Int] {
        var numbers: [Int] = []
        while true {
            let text = try await client.nextText(timeout: timeout)
            if text == "final" { return numbers }
            let n = try #require(Int(text.prefix { $0 != " " }), "a numbered message: \(text.prefix(20))")
            #expect(numbers.last.map { $0 < n } ?? true, "in order, each once: \(n) after \(numbers.last ?? -1)")
            numbers.append(n)
        }
    }

    /// The broker drops from a node's bounded queue (`x-max-length`, drop-head) while that node
    /// does not read: no node can see those drops happen, and the receiving node counts each.
    @Test func whatTheBrokerDropsFromAQueueIsCountedByTheReceivingNode() async throws {
        try MetricsTools.require()
        let url = try AMQPURL(try await Broker.require())
        let exchange = Broker.freshExchange()
        let sendingLink = RabbitLink(configuration: RabbitConfiguration(url: url, settings: ClusterSettings(exchange: exchange)), logger: testLogger("link"))
        // Two AMQP messages at most in the receiving node's queue.
        let receivingLink = RabbitLink(configuration: RabbitConfiguration(url: url, settings: ClusterSettings(exchange: exchange, queueMaxLength: 2)), logger: testLogger("link"))
        let a = try await TestNode.start(link: sendingLink)
        // The receiver gets what the queue kept all at once: room for it.
        let b = try await TestNode.start(limits: Limits(sendBuffer: 64 << 20), link: receivingLink, metrics: .hostname("127.0.0.1", port: 0))
        try await eventually("both links up", within: 10) { sendingLink.isConnected && receivingLink.isConnected }
        let x = try await TestClient.connect(a.tcp, "/ledger")
        let y = try await TestClient.connect(b.tcp, "/ledger")
        // The stream's first message on the receiving node sets where it stands.
        x.send("warm-up")
        #expect(try await y.nextText() == "warm-up")

        receivingLink.holdingConsumer.store(true, ordering: .relaxed)
        // 16 MiB: more than the sockets between the broker and the held node can take, so the
        // queue fills and its head is dropped.
        let sent = 1024
        for i in 0..<sent { x.send(Self.message(i, size: 16 << 10)) }
        try await eventually("the broker confirmed every message", within: 20) { sendingLink.counters.published.load(ordering: .relaxed) >= sent + 1 }
        receivingLink.holdingConsumer.store(false, ordering: .relaxed)
        x.send("final")

        let received = try await Self.receivedUntilFinal(y)
        let missed = receivingLink.counters.missed.load(ordering: .relaxed)
        #expect(missed > 0, "the queue dropped some: \(received.count) of \(sent) arrived")
        #expect(received.count + missed == sent, "received \(received.count) + missed \(missed) == sent \(sent)")
        #expect(receivingLink.counters.outOfOrder.load(ordering: .relaxed) == 0)
        // Nothing was lost before the broker: the sender counted no drop, the gaps are the queue's.
        #expect(sendingLink.report?.dropped.allSatisfy { $0.count == 0 } == true, "\(String(describing: sendingLink.report?.dropped))")
        // Exported as it was counted.
        let metrics = try MetricsTools.scrape(try #require(b.node.metricsAddress))
        #expect(metrics["staps_cluster_missed_total"] == Double(missed))
        #expect(metrics["staps_cluster_out_of_order_total"] == 0)
        await x.close()
        await y.close()
        await a.stop()
        await b.stop()
    }

    /// Every broker connection closed while messages flow: what the sender dropped while down
    /// or had unconfirmed, what was in the receiving node's queue when it went, and what was
    /// published before the receiving node was bound again, are all counted, at the stream's
    /// next message, by the receiving node (whose counts outlive its reconnection).
    @Test func messagesLostWhenTheBrokerClosesTheConnectionsAreCountedAtTheNextOne() async throws {
        let nodes = try await startClusterNodes(2)
        let (a, b) = (nodes[0], nodes[1])
        let x = try await TestClient.connect(a.0.tcp, "/ledger-reconnect")
        let y = try await TestClient.connect(b.0.tcp, "/ledger-reconnect")
        x.send("warm-up")
        #expect(try await y.nextText() == "warm-up")

        let sending = ManagedAtomic<Bool>(true)
        let sender = Task {
            var n = 0
            while sending.load(ordering: .relaxed) {
                x.send(Self.message(n, size: 64))
                n += 1
                try await Task.sleep(for: .milliseconds(1))
            }
            return n
        }
        try await Task.sleep(for: .milliseconds(300))
        try Broker.control("close-connections")
        try await eventually("both links reconnected and bound again", within: 15) {
            nodes.allSatisfy { $0.1.counters.reconnects.load(ordering: .relaxed) >= 1 && $0.1.isConnected && $0.1.counters.rebindsLeft.load(ordering: .relaxed) == 0 }
        }
        try await Task.sleep(for: .milliseconds(300))
        sending.store(false, ordering: .relaxed)
        let sent = try await sender.value
        x.send("final")

        let received = try await Self.receivedUntilFinal(y)
        let missed = b.1.counters.missed.load(ordering: .relaxed)
        #expect(missed > 0, "some were lost: \(received.count) of \(sent) arrived")
        #expect(received.count + missed == sent, "received \(received.count) + missed \(missed) == sent \(sent)")
        #expect(b.1.counters.outOfOrder.load(ordering: .relaxed) == 0)
        await stopAll(nodes)
    }
}
