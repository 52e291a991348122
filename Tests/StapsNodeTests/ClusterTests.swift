import Foundation
import NIOCore
import StapsCluster
import StapsNode
@testable import StapsRabbit
import Testing
import WebSocketClient

@Suite struct RoutingKeyTests {
    static let names = [
        "a", "a.b", "a.*", "a.#", "#", "*", "a*", "*.a", "#.#", "a..b", ".", "..", "a%2Eb", "a%b", "a/b", "a~2Eb", "a~b",
        "ü", "ü.ü", "日本", "a b", String(repeating: "x", count: 256), String(repeating: "x", count: 255) + "y",
        String(repeating: ".", count: 256), String(repeating: "#", count: 84), String(repeating: "ü", count: 128),
    ]

    @Test func keysAreInjectiveWordsWithoutWildcards() {
        let keys = Self.names.map(RoutingKey.forChannel)
        #expect(Set(keys).count == Self.names.count)
        for key in keys {
            #expect(key.utf8.count <= 255)
            let words = key.split(separator: ".", omittingEmptySubsequences: false)
            #expect(words.count == 5, "a prefix word, three bucket digits and one name word: \(key)")
            #expect(words[0] == "c" && words[1...3].allSatisfy { $0.count == 1 && $0.allSatisfy(\.isHexDigit) })
            #expect(!words[4].isEmpty && !words[4].contains("*") && !words[4].contains("#"))
        }
        #expect(RoutingKey.forChannel("a.b").hasSuffix(".a~2Eb"))
        #expect(RoutingKey.forChannel("a~2Eb").hasSuffix(".a~7E2Eb"))
        #expect(RoutingKey.forChannel(String(repeating: "#", count: 84)).split(separator: ".")[4].hasPrefix("~~"), "too long: hashed")
    }

    /// The key format is version `c`: these exact keys are what every node of a cluster
    /// publishes and binds. If this test has to change, so must the leading word (and a
    /// rolling upgrade needs nodes that bind both formats): see `RoutingKey`.
    @Test func theKeyFormatIsPinnedToItsVersion() {
        #expect(RoutingKey.forChannel("room") == "c.2.7.a.room")
        #expect(RoutingKey.forChannel("a.b") == "c.6.9.f.a~2Eb")
        #expect(RoutingKey.forChannel("日本") == "c.4.4.d.~E6~97~A5~E6~9C~AC")
        let keys = ChannelKeys(channel: "room")
        #expect(keys.all == ["c.2.7.a.room", "c.2.7.a.*", "c.2.7.*.*", "c.2.*.*.*"])
        #expect(BindingGranularity.allCases.map { BindingGranularity(ofKey: keys.key($0)) } == BindingGranularity.allCases)
        #expect(BindingGranularity.allCases.map(\.index) == [0, 1, 2, 3])
        #expect(BindingGranularity(ofKey: "c.2.7.a.x*") == .exact, "a star inside a name word is not a bucket")
        #expect(BindingMode(configValue: "adaptive") == .adaptive && BindingMode(configValue: "256") == .fixed(buckets: 256))
        #expect(BindingMode(configValue: "100") == nil && BindingMode(configValue: "") == nil)
    }

    /// Topic matching for keys without `#`: `*` is exactly one word.
    static func matches(_ binding: String, _ key: String) -> Bool {
        let b = binding.split(separator: ".", omittingEmptySubsequences: false)
        let k = key.split(separator: ".", omittingEmptySubsequences: false)
        return b.count == k.count && zip(b, k).allSatisfy { $0 == "*" || $0 == $1 }
    }

    @Test func bindingKeysMatchTheirOwnChannelsOnly() {
        let keys = Self.names.map(RoutingKey.forChannel)
        for buckets in RoutingKey.bucketChoices {
            for (i, name) in Self.names.enumerated() {
                let binding = RoutingKey.binding(forChannel: name, buckets: buckets)
                #expect(Self.matches(binding, keys[i]), "\(binding) must match its own channel's key \(keys[i])")
                if buckets == 0 {
                    #expect(binding == keys[i])
                    #expect(keys.indices.filter { Self.matches(binding, keys[$0]) } == [i], "an exact binding matches no other channel")
                } else {
                    #expect(binding.split(separator: ".").filter { $0 == "*" }.count == 4 - [16: 1, 256: 2, 4096: 3][buckets]!)
                }
            }
        }
    }
}

/// Real RabbitMQ (the private one scripts/test starts), real nodes, real websocket clients.
@Suite(.serialized) struct ClusterTests {
    @Test func joinedMeansSubscribedClusterWide() async throws {
        let nodes = try await startClusterNodes(2)
        let (a, b) = (nodes[0].0, nodes[1].0)
        for i in 0..<100 {
            let channel = "/join-\(i)"
            // Alternate which node holds the first client; the second one's open completing
            // must mean messages published anywhere from then on reach it.
            let (first, second) = i % 2 == 0 ? (a, b) : (b, a)
            let x = try await TestClient.connect(first.tcp, channel)
            let y = try await TestClient.connect(second.unix, channel)
            x.send("to y \(i)")
            y.send("to x \(i)")
            #expect(try await y.nextText(timeout: 5) == "to y \(i)")
            #expect(try await x.nextText(timeout: 5) == "to x \(i)")
            await x.close()
            await y.close()
        }
        await stopAll(nodes)
    }

    @Test func threeNodesEveryoneGetsEverythingOnceInOrderWithoutEcho() async throws {
        let nodes = try await startClusterNodes(3)
        var clients: [TestClient] = []
        for i in 0..<9 {
            let node = nodes[i % 3].0
            clients.append(try await TestClient.connect(i % 2 == 0 ? node.tcp : node.unix, "/everyone"))
        }
        try await expectEveryoneHearsEveryoneOnceInOrder(clients, perSender: 200)
        await stopAll(nodes)
    }

    /// Exact bindings, and buckets that put many of these channels on one binding: either way
    /// a node delivers only to the exact channel named in the body.
    @Test(arguments: [0, 16]) func wildcardAndInjectionNamesNeverCrossChannels(buckets: Int) async throws {
        let nodes = try await startClusterNodes(2, binding: .fixed(buckets: buckets))
        let names = RoutingKeyTests.names
        var receivers: [TestClient] = []
        var senders: [TestClient] = []
        for name in names {
            let path = "/" + PercentEncoding.encode(name)
            receivers.append(try await TestClient.connect(nodes[0].0.tcp, path))
            senders.append(try await TestClient.connect(nodes[1].0.tcp, path))
        }
        for (i, s) in senders.enumerated() { s.send("for #\(i)") }
        for (i, r) in receivers.enumerated() {
            #expect(try await r.nextText() == "for #\(i)", "channel \(names[i])")
        }
        for r in receivers { #expect(try await r.isQuiet(for: 0.02)) }
        await stopAll(nodes)
    }

    @Test func messagesLargerThanOneAMQPFrameCrossIntact() async throws {
        let nodes = try await startClusterNodes(2)
        let sender = try await TestClient.connect(nodes[0].0.tcp, "/big")
        let receiver = try await TestClient.connect(nodes[1].0.unix, "/big")
        // Over frame_max (128 KiB), so the body spans several frames; up to the 1 MiB limit.
        let big = (0..<((1 << 20) - 10)).map { UInt8(truncatingIfNeeded: $0 &* 2_654_435_761 >> 13) }
        sender.send(binary: big)
        let text = String(repeating: "ü", count: 100_000)
        sender.send(text)
        let m1 = try await receiver.nextMessage(timeout: 10)
        #expect(!m1.isText && m1.bytes == big)
        let m2 = try await receiver.nextMessage(timeout: 10)
        #expect(m2.isText && m2.bytes == Array(text.utf8))
        await stopAll(nodes)
    }

    @Test func postOnOneNodeReachesClientsOnAnother() async throws {
        let nodes = try await startClusterNodes(2)
        let remote = try await TestClient.connect(nodes[1].0.tcp, "/posted")
        let (status, _, body) = try await httpRequest(nodes[0].0.tcp, "POST", "/posted", headers: [("Content-Type", "text/plain")], body: Array("via broker".utf8))
        #expect(status == 202 && body.contains("\"receivers\":0"))
        #expect(try await remote.nextText() == "via broker")
        await stopAll(nodes)
    }

    @Test func brokerRestartWhilePublishing() async throws {
        let nodes = try await startClusterNodes(2)
        let (a, b) = (nodes[0], nodes[1])
        let sender = try await TestClient.connect(a.0.tcp, "/restart")
        let local = try await TestClient.connect(a.0.unix, "/restart")
        let remote = try await TestClient.connect(b.0.tcp, "/restart")
        let publishing = Task {
            for i in 0..<1500 {
                sender.send("\(i)")
                // Paced over the restart (about 6 s): the time is what is under test.
                try await Task.sleep(nanoseconds: 4_000_000)
            }
        }
        try await eventually("the broker confirmed publishes before its restart") { a.1.counters.published.load(ordering: .relaxed) >= 10 }
        try Broker.control("restart-app")
        let backAt = Date()
        // Cluster delivery is back within 2 s of the broker becoming reachable.
        var lastRemote = -1
        while true {
            let n = Int(try await remote.nextText(timeout: 5))!
            #expect(n > lastRemote, "remote order")
            lastRemote = n
            if Date().timeIntervalSince(backAt) > 0, a.1.isConnected, b.1.isConnected, a.1.counters.reconnects.load(ordering: .relaxed) > 0 {
                // A message received after both links reconnected.
                break
            }
        }
        let recovery = Date().timeIntervalSince(backAt)
        #expect(recovery < 2.0, "cluster delivery resumed \(recovery) s after the broker came back")
        try await publishing.value
        // Local delivery was never interrupted: every message, in order.
        for i in 0..<1500 { #expect(try await local.nextText() == "\(i)") }
        // The sending node counted what it dropped while the broker was away.
        #expect(a.1.counters.droppedWhileDown.load(ordering: .relaxed) > 0)
        #expect(a.1.counters.reconnects.load(ordering: .relaxed) == 1)
        await stopAll(nodes)
    }

    @Test func connectionClosedByTheBrokerIsRecovered() async throws {
        let nodes = try await startClusterNodes(2)
        let x = try await TestClient.connect(nodes[0].0.tcp, "/closed")
        let y = try await TestClient.connect(nodes[1].0.tcp, "/closed")
        try Broker.control("close-connections")
        try await eventually("links reconnected", within: 5) {
            nodes.allSatisfy { $0.1.counters.reconnects.load(ordering: .relaxed) >= 1 && $0.1.isConnected }
        }
        // Bindings are back: messages cross again.
        x.send("after close_connection")
        #expect(try await y.nextText() == "after close_connection")
        await stopAll(nodes)
    }

    @Test func unreachableBrokerAtStartServesLocallyThenJoins() async throws {
        let url = try await Broker.require()
        let exchange = Broker.freshExchange()
        try Broker.control("stop-app")
        let logged = LogCapture()
        let late = RabbitLink(configuration: RabbitConfiguration(url: try AMQPURL(url), settings: ClusterSettings(exchange: exchange)), logger: logged.logger)
        let node = try await TestNode.start(link: late)
        // The node starts and serves locally while the broker is away.
        let p = try await TestClient.connect(node.tcp, "/late")
        let q = try await TestClient.connect(node.tcp, "/late")
        p.send("local works")
        #expect(try await q.nextText() == "local works")
        #expect(!late.isConnected)
        try Broker.control("start-app")
        let back = Date()
        try await eventually("the link comes up once the broker is back", within: 5) { late.isConnected }
        #expect(Date().timeIntervalSince(back) < 2.0)
        // It bound the channel its clients were already on: a node started now reaches them.
        let others = try await startClusterNodes(1, exchange: exchange)
        let r = try await TestClient.connect(others[0].0.tcp, "/late")
        r.send("from the other node")
        #expect(try await p.nextText() == "from the other node")
        #expect(try await q.nextText() == "from the other node")
        let warnings = logged.text.split(separator: "\n").filter { $0.hasPrefix("warning") }
        #expect(warnings.count == 2, "one warning for the outage, one for the recovery: \(warnings)")
        await stopAll(others)
        await node.stop()
    }

    @Test func wrongCredentialsAreAClearErrorAndRetried() async throws {
        let url = try await Broker.require()
        let logged = LogCapture()
        let bad = RabbitLink(configuration: RabbitConfiguration(url: try AMQPURL(url.replacingOccurrences(of: "guest:guest", with: "guest:wrong-secret"))), logger: logged.logger)
        let node = try await TestNode.start(link: bad)
        try await eventually("a warning about the login", within: 5) { logged.text.contains("warning") }
        try await eventually("retried twice", within: 5) { logged.text.components(separatedBy: "broker still unreachable").count > 2 }
        let text = logged.text
        #expect(text.contains("ACCESS_REFUSED") || text.contains("log in"), "names the cause: \(text)")
        #expect(!text.contains("wrong-secret"), "never the password")
        #expect(text.components(separatedBy: "warning").count - 1 == 1, "one warning per outage, not one per retry: \(text)")
        await node.stop()
    }

    @Test func aFullBrokerBufferDropsAndCountsWhileLocalDeliveryGoesOn() async throws {
        let url = try await Broker.require()
        let logged = LogCapture()
        // A 4 KiB buffer that is emptied only every 2 s: most cluster-bound messages must drop.
        let settings = ClusterSettings(exchange: Broker.freshExchange(), publishBuffer: 4096, publishWindow: .seconds(2))
        let link = RabbitLink(configuration: RabbitConfiguration(url: try AMQPURL(url), settings: settings), logger: logged.logger)
        let node = try await TestNode.start(link: link)
        try await eventually("link up") { link.isConnected }
        let sender = try await TestClient.connect(node.tcp, "/full")
        let local = try await TestClient.connect(node.unix, "/full")
        sender.send("first")  // goes out at once: the link was idle
        #expect(try await local.nextText() == "first")
        for i in 0..<2000 { sender.send("message \(i) " + String(repeating: "x", count: 100)) }
        for i in 0..<2000 { #expect(try await local.nextText().hasPrefix("message \(i) ")) }
        try await eventually("the drops are counted and reported", within: 5) {
            link.counters.droppedBufferFull.load(ordering: .relaxed) > 1000 && logged.text.contains("broker slower than the clients")
        }
        await node.stop()
    }

    @Test func wrongVhostIsAClearError() async throws {
        let url = try await Broker.require()
        let logged = LogCapture()
        let bad = RabbitLink(configuration: RabbitConfiguration(url: try AMQPURL(url + "no-such-vhost")), logger: logged.logger)
        let node = try await TestNode.start(link: bad)
        try await eventually("a warning about the vhost", within: 5) { logged.text.contains("warning") }
        #expect(logged.text.contains("no-such-vhost"), "names the vhost: \(logged.text)")
        #expect(!bad.isConnected)
        await node.stop()
    }

    /// The routing keys bound from `exchange` on the broker right now.
    static func bindings(of exchange: String) throws -> [String] {
        let (status, output) = try run(Broker.repositoryRoot + "/scripts/rabbitmq", ["ctl", "list_bindings", "-q", "--no-table-headers", "source_name", "routing_key"])
        guard status == 0 else { throw TestError.unexpected("list_bindings failed: \(output)") }
        return output.split(separator: "\n").compactMap { line in
            let fields = line.split(separator: "\t")
            return fields.count == 2 && fields[0] == exchange ? String(fields[1]) : nil
        }
    }

    @Test func channelsAreUnboundAfterTheLinger() async throws {
        let exchange = Broker.freshExchange()
        // rabbitmqctl needs about 0.6 s per call, so the linger is long enough to look inside it.
        let nodes = try await startClusterNodes(1, exchange: exchange, linger: .seconds(3))
        let key = RoutingKey.forChannel("linger.room")  // adaptive, and no bind waits: its exact key
        let first = try await TestClient.connect(nodes[0].0.tcp, "/linger.room")
        let bound = try Self.bindings(of: exchange)
        #expect(bound == [key], "bound before the handshake completed: \(bound)")
        await first.close()
        // Reconnecting within the linger keeps the binding (no churn)...
        #expect(try Self.bindings(of: exchange) == [key])
        let second = try await TestClient.connect(nodes[0].0.tcp, "/linger.room")
        // Past the linger (time is what is under test): nothing unbinds while a client is on it.
        try await Task.sleep(nanoseconds: 3_500_000_000)
        #expect(try Self.bindings(of: exchange) == [key], "still bound while a client is on it")
        // ...and the last client leaving unbinds once the linger has passed.
        await second.close()
        try await eventually("the binding is gone after the linger", within: 6) { try Self.bindings(of: exchange).isEmpty }
        await stopAll(nodes)
    }

    @Test func exchangeOfAnotherTypeIsAClearError() async throws {
        let url = try await Broker.require()
        let exchange = Broker.freshExchange()
        try Broker.control("ctl", "eval", "rabbit_exchange:declare({resource, <<\"/\">>, exchange, <<\"\(exchange)\">>}, fanout, false, true, false, [], <<\"test\">>).")
        let logged = LogCapture()
        let link = RabbitLink(configuration: RabbitConfiguration(url: try AMQPURL(url), settings: ClusterSettings(exchange: exchange)), logger: logged.logger)
        let node = try await TestNode.start(link: link)
        try await eventually("a warning about the exchange", within: 5) { logged.text.contains("warning") }
        #expect(logged.text.contains("406") && logged.text.contains("declare topic exchange"), "\(logged.text)")
        #expect(!link.isConnected)
        await node.stop()
    }
}
