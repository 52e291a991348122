import Foundation
import NIOCore
import StapsCluster
import StapsNode
@testable import StapsRabbit
import Testing
import WebSocketClient

#if canImport(Glibc)
import Glibc
#endif

/// The link against a real broker doing what real brokers do: TLS, failover between broker
/// nodes, an operator deleting the queue, a resource alarm, a frozen broker, churn, restarts.
@Suite(.serialized) struct LinkFaultTests {
    static func link(_ urls: [String], _ settings: ClusterSettings, _ logger: LogCapture? = nil) throws -> RabbitLink {
        RabbitLink(configuration: RabbitConfiguration(urls: try urls.map { try AMQPURL($0) }, settings: settings), logger: logger?.logger ?? testLogger("link"))
    }

    // MARK: TLS

    @Test func amqpsWithTheRightCAConnectsAndRelays() async throws {
        _ = try await Broker.require()
        let (tlsURL, ca) = (try Broker.output("tls-url"), try Broker.output("tls-ca"))
        let settings = ClusterSettings(exchange: Broker.freshExchange(), tlsCAFile: ca)
        let a = try Self.link([tlsURL], settings)
        let b = try Self.link([tlsURL], settings)
        let nodeA = try await TestNode.start(link: a)
        let nodeB = try await TestNode.start(link: b)
        try await eventually("both links up over TLS", within: 10) { a.isConnected && b.isConnected }
        #expect(a.currentBroker?.tls == true)
        let x = try await TestClient.connect(nodeA.tcp, "/tls")
        let y = try await TestClient.connect(nodeB.tcp, "/tls")
        x.send("over tls")
        #expect(try await y.nextText() == "over tls")
        // Bigger than a frame: the body goes out in several TLS records and AMQP frames.
        let big = (0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        y.send(binary: big)
        let m = try await x.nextMessage(timeout: 10)
        #expect(!m.isText && m.bytes == big)
        try await eventually("the broker confirmed the publishes") { a.counters.published.load(ordering: .relaxed) >= 1 && b.counters.published.load(ordering: .relaxed) >= 1 }
        await nodeA.stop()
        await nodeB.stop()
    }

    @Test(arguments: ["wrong CA", "wrong host name"]) func amqpsRefusesAnUntrustedBroker(_ kind: String) async throws {
        _ = try await Broker.require()
        var url = try Broker.output("tls-url")
        var ca = try Broker.output("tls-ca")
        if kind == "wrong CA" { ca = try Broker.output("tls-other-ca") } else { url = url.replacingOccurrences(of: "@localhost:", with: "@127.0.0.1:") }
        let logged = LogCapture()
        let link = try Self.link([url], ClusterSettings(exchange: Broker.freshExchange(), tlsCAFile: ca), logged)
        let node = try await TestNode.start(link: link)
        try await eventually("a warning about the certificate", within: 5) { logged.text.contains("warning") }
        // Retried, never accepted.
        try await eventually("retried", within: 5) { logged.text.components(separatedBy: "broker still unreachable").count > 2 }
        #expect(!link.isConnected)
        let warning = logged.text.split(separator: "\n").first { $0.hasPrefix("warning") }.map(String.init) ?? ""
        let why = kind == "wrong CA" ? "not signed by a trusted CA" : "does not name this host"
        #expect(warning.contains(why), "names why: \(warning)")
        // Local service goes on.
        let p = try await TestClient.connect(node.tcp, "/untrusted")
        let q = try await TestClient.connect(node.tcp, "/untrusted")
        p.send("local")
        #expect(try await q.nextText() == "local")
        await node.stop()
    }

    // MARK: Several brokers

    @Test func failoverMovesToTheNextBrokerAndRebindsThere() async throws {
        let first = try await Broker.require()
        let second = try await Broker.requireSecond()
        let exchange = Broker.freshExchange()
        let logged = LogCapture()
        let link = try Self.link([first, second], ClusterSettings(exchange: exchange, binding: .fixed(buckets: 0)), logged)
        let node = try await TestNode.start(link: link)
        try await eventually("link up", within: 10) { link.isConnected }
        let client = try await TestClient.connect(node.tcp, "/failover")
        let startedOn = link.currentBroker!
        let (downEnv, other) = startedOn.port == (try AMQPURL(first)).port ? ([String: String](), second) : (Broker.secondEnvironment, first)
        #expect(logged.text.contains("broker link up") && logged.text.contains("broker=\(startedOn)"), "logs which broker it is on")
        try Broker.control(environment: downEnv, "stop-app")
        defer { try? Broker.control(environment: downEnv, "start-app") }
        try await eventually("moved to the other broker", within: 10) { link.isConnected && link.currentBroker != startedOn }
        #expect(link.currentBroker?.port == (try AMQPURL(other)).port)
        // Redeclared and rebound there: a node that only knows that broker reaches the client.
        let peers = try await startClusterNodes(1, exchange: exchange, binding: .fixed(buckets: 0), urls: [other])
        let peer = try await TestClient.connect(peers[0].0.tcp, "/failover")
        try await eventually("the channel is bound on the new broker", within: 5) { link.counters.bindingKeysBoundTotal == 1 }
        peer.send("via the second broker")
        #expect(try await client.nextText() == "via the second broker")
        client.send("back")
        #expect(try await peer.nextText() == "back")
        #expect(logged.text.contains("broker=\(link.currentBroker!)"))
        await stopAll(peers)
        await node.stop()
    }

    // MARK: What operators and alarms do

    @Test func aDeletedQueueCancelsTheConsumerAndTheLinkRecovers() async throws {
        let nodes = try await startClusterNodes(2)
        let (a, b) = (nodes[0], nodes[1])
        let x = try await TestClient.connect(a.0.tcp, "/deleted")
        let y = try await TestClient.connect(b.0.tcp, "/deleted")
        let queue = try #require(a.1.queueName)
        try Broker.control("delete-queue", queue)
        try await eventually("the link noticed and reconnected with a new queue", within: 5) {
            a.1.counters.reconnects.load(ordering: .relaxed) == 1 && a.1.isConnected && a.1.queueName != queue && a.1.counters.bindingKeysBoundTotal == 1
        }
        y.send("after delete_queue")
        #expect(try await x.nextText() == "after delete_queue")
        await stopAll(nodes)
    }

    @Test func aMemoryAlarmPausesPublishingAndItResumes() async throws {
        let logged = LogCapture()
        let url = try await Broker.require()
        let exchange = Broker.freshExchange()
        let link = try Self.link([url], ClusterSettings(exchange: exchange), logged)
        let node = try await TestNode.start(link: link)
        let others = try await startClusterNodes(1, exchange: exchange)
        try await eventually("link up") { link.isConnected }
        let sender = try await TestClient.connect(node.tcp, "/alarm")
        let local = try await TestClient.connect(node.unix, "/alarm")
        let remote = try await TestClient.connect(others[0].0.tcp, "/alarm")
        try Broker.control("set-memory-watermark", "0.0001")
        var restored = false
        defer { if !restored { try? Broker.control("set-memory-watermark", "0.4") } }
        var i = 0
        try await eventually("blocked is noticed", within: 10) {
            sender.send("during \(i)")
            i += 1
            return logged.text.contains("broker blocked publishing")
        }
        // Local delivery never waits for the broker.
        for n in 0..<i { #expect(try await local.nextText() == "during \(n)") }
        #expect(link.isConnected, "blocked is not lost: the link pauses, it does not reconnect")
        try Broker.control("set-memory-watermark", "0.4")
        restored = true
        try await eventually("unblocked is noticed", within: 10) { logged.text.contains("broker unblocked publishing") }
        sender.send("after the alarm")
        // What was buffered while blocked goes out first, in order; then the new message.
        var last = ""
        while last != "after the alarm" { last = try await remote.nextText(timeout: 10) }
        #expect(link.counters.reconnects.load(ordering: .relaxed) == 0)
        await stopAll(others)
        await node.stop()
    }

    @Test func aFrozenBrokerIsNoticedAndEveryMessageIsAccountedFor() async throws {
        let url = try await Broker.require()
        let logged = LogCapture()
        let link = try Self.link([url], ClusterSettings(exchange: Broker.freshExchange(), heartbeat: .seconds(4)), logged)
        let node = try await TestNode.start(link: link)
        try await eventually("link up") { link.isConnected }
        let sender = try await TestClient.connect(node.tcp, "/frozen")
        let local = try await TestClient.connect(node.tcp, "/frozen")
        let pid = try Broker.output("pid")
        var sent = 0
        func send(_ n: Int) async throws {
            for _ in 0..<n {
                sender.send("m\(sent)")
                sent += 1
                // Paced: the messages span the freeze and its detection (time is under test).
                try await Task.sleep(nanoseconds: 5_000_000)
            }
        }
        try await send(50)
        _ = try run("/bin/kill", ["-STOP", pid])
        var resumed = false
        defer { if !resumed { _ = try? run("/bin/kill", ["-CONT", pid]) } }
        let frozenAt = Date()
        try await send(100)
        try await eventually("the silent broker is noticed", within: 8) { !link.isConnected }
        let noticedAfter = Date().timeIntervalSince(frozenAt)
        #expect(noticedAfter < 4.5, "noticed after \(noticedAfter) s")
        // A new channel's join is answered while the broker is unreachable (local service).
        let joinStart = Date()
        let late = try await TestClient.connect(node.tcp, "/frozen-new")
        #expect(Date().timeIntervalSince(joinStart) < 1)
        await late.close()
        _ = try run("/bin/kill", ["-CONT", pid])
        resumed = true
        try await eventually("reconnected", within: 15) { link.isConnected }
        try await send(50)
        for n in 0..<sent { #expect(try await local.nextText() == "m\(n)") }
        // Every message reached the broker (confirmed) or is counted as not having reached it.
        let c = link.counters
        try await eventually("every message accounted for", within: 5) {
            c.published.load(ordering: .relaxed) + c.droppedWhileDown.load(ordering: .relaxed) + c.droppedBufferFull.load(ordering: .relaxed)
                + c.droppedExpired.load(ordering: .relaxed) + c.rejected.load(ordering: .relaxed) == sent
        }
        #expect(c.droppedWhileDown.load(ordering: .relaxed) > 0)
        #expect(logged.text.contains("broker did not") || logged.text.contains("confirmed none") || logged.text.contains("no data from the broker"), "says why: \(logged.text)")
        await node.stop()
    }

    /// rabbitmq-c swallows the broker's heartbeats; they must still count as hearing from it.
    @Test func anIdleLinkStaysUpPastItsHeartbeats() async throws {
        let url = try await Broker.require()
        let link = try Self.link([url], ClusterSettings(exchange: Broker.freshExchange(), heartbeat: .seconds(1)))
        let node = try await TestNode.start(link: link)
        try await eventually("link up") { link.isConnected }
        // Silence past three heartbeat periods is the behaviour under test.
        try await Task.sleep(nanoseconds: 3_500_000_000)
        #expect(link.isConnected && link.counters.reconnects.load(ordering: .relaxed) == 0, "three heartbeat periods of silence from the clients")
        await node.stop()
    }

    /// A "broker" that accepts TCP and never answers: the link's connect attempt waits for its
    /// timeout, and joins meanwhile are answered at once (local service), not after it.
    @Test func joinsDoNotWaitForAConnectAttempt() async throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
        listen(fd, 16)
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
        let port = Int(UInt16(bigEndian: addr.sin_port))
        let link = try Self.link(["amqp://guest:guest@127.0.0.1:\(port)/"], ClusterSettings(exchange: Broker.freshExchange()))
        let node = try await TestNode.start(link: link)
        // The link is inside its connect attempt once the mute broker has its connection queued.
        try await eventually("the link connecting to the mute broker") {
            var listening = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            return poll(&listening, 1, 0) == 1
        }
        let start = Date()
        let a = try await TestClient.connect(node.tcp, "/mute-broker")
        let b = try await TestClient.connect(node.tcp, "/mute-broker")
        #expect(Date().timeIntervalSince(start) < 1, "joined after \(Date().timeIntervalSince(start)) s")
        a.send("local")
        #expect(try await b.nextText() == "local")
        #expect(!link.isConnected)
        await node.stop()
    }

    // MARK: Life cycle

    /// Every client that got its 101 receives what is sent after it, whichever node it is on,
    /// while channels come and go as fast as the test can make them.
    @Test(arguments: [BindingMode.fixed(buckets: 0), .fixed(buckets: 256), .adaptive]) func joinGuaranteeUnderChurnAcrossThreeNodes(binding: BindingMode) async throws {
        let nodes = try await startClusterNodes(3, linger: .milliseconds(200), binding: binding)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for worker in 0..<4 {
                group.addTask {
                    for i in 0..<40 {
                        let channel = "/churn-\(UUID4.make())"
                        let first = nodes[(worker + i) % 3].0
                        let second = nodes[(worker + i + 1) % 3].0
                        let x = try await TestClient.connect(first.unix, channel)
                        let y = try await TestClient.connect(second.tcp, channel)
                        // Both sides send right after their own 101.
                        y.send("to x")
                        x.send("to y")
                        #expect(try await x.nextText() == "to x")
                        #expect(try await y.nextText() == "to y")
                        await x.close()
                        await y.close()
                    }
                }
            }
            try await group.waitForAll()
        }
        await stopAll(nodes)
    }

    /// After a broker restart every channel is rebound in the background (exact bindings: one
    /// bind each) while publishing resumes at once.
    @Test func everyChannelIsReboundAfterARestart() async throws {
        let nodes = try await startClusterNodes(2, binding: .fixed(buckets: 0))
        let (a, b) = (nodes[0], nodes[1])
        var pairs: [(TestClient, TestClient)] = []
        for i in 0..<300 {
            pairs.append((try await TestClient.connect(a.0.unix, "/rebind-\(i)"), try await TestClient.connect(b.0.unix, "/rebind-\(i)")))
        }
        #expect(a.1.counters.bindingKeysBoundTotal == 300)
        try Broker.control("restart-app")
        try await eventually("both nodes rebound every channel", within: 15) {
            nodes.allSatisfy { $0.1.isConnected && $0.1.counters.bindingKeysBoundTotal == 300 }
        }
        for (i, (x, _)) in pairs.enumerated() { x.send("after restart \(i)") }
        for (i, (_, y)) in pairs.enumerated() { #expect(try await y.nextText(timeout: 10) == "after restart \(i)") }
        await stopAll(nodes)
    }

    @Test func joinsWaitingWhenTheLinkStopsAreRefusedWith503() async throws {
        let url = try await Broker.require()
        let link = try Self.link([url], ClusterSettings(exchange: Broker.freshExchange()))
        let node = try await TestNode.start(link: link)
        try await eventually("link up") { link.isConnected }
        let pid = try Broker.output("pid")
        // Frozen broker: a join's bind is never answered.
        _ = try run("/bin/kill", ["-STOP", pid])
        defer { _ = try? run("/bin/kill", ["-CONT", pid]) }
        let waiting = Task { try await rawExchange(node.tcp, Array("GET /stopping HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".utf8), timeout: 5) }
        // The join is in the directory, waiting for its bind.
        try await eventually("the join waiting for its bind") { node.node.status.hasPrefix("connections 1, channels 1,") }
        await link.shutdown()
        let answer = String(decoding: try await waiting.value, as: UTF8.self)
        #expect(answer.hasPrefix("HTTP/1.1 503"), "\(answer.prefix(80))")
        // And a join after the stop is refused at once, never left hanging.
        let promise = clientGroup.next().makePromise(of: Void.self)
        link.startReceiving(channel: "after-stop", whenBound: promise)
        await #expect(throws: LinkStopped.self) { try await promise.futureResult.get() }
        await node.stop()
    }
}
