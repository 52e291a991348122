import Foundation
import NIOCore
import Prometheus
import StapsCluster
@testable import StapsNode
import StapsRabbit
import Testing
import WebSocketClient

/// Scraped metrics: every sample line, keyed by its name and labels as printed.
struct Scrape {
    let text: String
    let samples: [String: Double]

    init(_ text: String) {
        self.text = text
        var samples: [String: Double] = [:]
        for line in text.split(separator: "\n") where !line.hasPrefix("#") {
            guard let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...]) else { continue }
            samples[String(line[..<space])] = value
        }
        self.samples = samples
    }

    subscript(_ key: String) -> Double { self.samples[key] ?? 0 }
}

/// Tools the metrics tests run: the real `curl` and Prometheus's `promtool`.
enum MetricsTools {
    static func require() throws {
        for (tool, package) in [("/usr/bin/curl", "curl"), ("/usr/bin/promtool", "prometheus")] where access(tool, X_OK) != 0 {
            let ci = ProcessInfo.processInfo.environment["CI"] == "true" ? " (CI=true: it is required)" : ""
            throw TestError.unexpected("\(tool) is missing\(ci): install Debian's \(package) package with `scripts/install-deps test`")
        }
    }

    /// `curl` on a metrics listener: status and body.
    static func curl(_ address: BindAddress, _ path: String, method: String = "GET") throws -> (Int, String) {
        var args = ["-s", "-S", "-m", "10", "-X", method, "-w", "\n%{http_code}"]
        switch address {
        case .hostname(let host, let port): args.append("http://\(host):\(port)\(path)")
        case .unixDomainSocket(let socket): args += ["--unix-socket", socket, "http://staps\(path)"]
        }
        if method == "HEAD" { args.insert("-I", at: 0) }
        let (status, output) = try run("/usr/bin/curl", args)
        guard status == 0, let newline = output.lastIndex(of: "\n") else { throw TestError.unexpected("curl \(path) failed (\(status)): \(output)") }
        return (Int(output[output.index(after: newline)...]) ?? 0, String(output[..<newline]))
    }

    /// Scrapes `/metrics` with curl and has `promtool check metrics` validate the whole text.
    static func scrape(_ address: BindAddress) throws -> Scrape {
        let (status, body) = try curl(address, "/metrics")
        guard status == 200 else { throw TestError.unexpected("/metrics answered \(status): \(body)") }
        let file = NSTemporaryDirectory() + "staps-metrics-\(UUID4.make()).txt"
        try body.write(toFile: file, atomically: true, encoding: .utf8)
        defer { unlink(file) }
        let (lint, problems) = try run("/bin/sh", ["-c", "/usr/bin/promtool check metrics < '\(file)'"])
        #expect(lint == 0, "promtool check metrics: \(problems)")
        return Scrape(body)
    }
}

@Suite(.serialized) struct MetricsTests {
    @Test func scrapeAfterTrafficMovesByTheRightAmounts() async throws {
        try MetricsTools.require()
        var limits = Limits()
        limits.maxMessageSize = 1024
        let node = try await TestNode.start(limits: limits, metrics: .hostname("127.0.0.1", port: 0))
        defer { Task { await node.stop() } }
        let address = try #require(node.node.metricsAddress)
        let before = try MetricsTools.scrape(address)
        #expect(before["staps_channels"] == 0)

        let a = try await TestClient.connect(node.tcp, "/m")
        let b = try await TestClient.connect(node.tcp, "/m")
        let c = try await TestClient.connect(node.unix, "/m")
        let during = try MetricsTools.scrape(address)
        #expect(during[#"staps_connections{listener="tcp"}"#] == 2)
        #expect(during[#"staps_connections{listener="unix"}"#] == 1)
        #expect(during["staps_websocket_clients"] == 3)
        #expect(during["staps_channels"] == 1)

        // 5 messages of 7 bytes from a, each to b and c; one POST of 5 bytes to all three.
        for i in 0..<5 { a.send("hello \(i)") }
        for client in [b, c] {
            for i in 0..<5 { #expect(try await client.nextText() == "hello \(i)") }
        }
        let (status, _, _) = try await httpRequest(node.tcp, "POST", "/m", body: Array("howdy".utf8))
        #expect(status == 202)
        for client in [a, b, c] { #expect(try await client.nextMessage().bytes == Array("howdy".utf8)) }
        // A refused handshake (bad percent-encoding), a close by the client, one by the node.
        let refused = try await rawExchange(node.tcp, Array("GET /%zz HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".utf8))
        #expect(String(decoding: refused, as: UTF8.self).hasPrefix("HTTP/1.1 400"))
        b.client.close(code: 1000)
        #expect(try await b.nextClose().0 == 1000)
        c.send(String(repeating: "x", count: 2000))
        #expect(try await c.nextClose().0 == 1009)
        // A broken close (1004 may not be sent) is the node's 1002; a vanished client is 1006.
        let d = try await TestClient.connect(node.tcp, "/m2")
        d.client.close(code: 1004)
        #expect(try await d.nextClose().0 == 1002)
        let e = try await TestClient.connect(node.tcp, "/m2")
        await e.close()
        try await eventually("the other clients are gone") { node.node.status.hasPrefix("connections 1,") }

        let after = try MetricsTools.scrape(address)
        func moved(_ key: String) -> Double { after[key] - before[key] }
        #expect(moved(#"staps_messages_received_total{source="websocket"}"#) == 5)
        #expect(moved(#"staps_messages_received_total{source="post"}"#) == 1)
        #expect(moved("staps_messages_delivered_total") == 13)
        #expect(moved("staps_message_bytes_received_total") == 5 * 7 + 5)
        #expect(moved("staps_message_bytes_delivered_total") == 10 * 7 + 3 * 5)
        #expect(moved("staps_fanout_receivers_count") == 6)
        #expect(moved("staps_fanout_receivers_sum") == 13)
        #expect(moved(#"staps_fanout_receivers_bucket{le="1.0"}"#) == 0)
        #expect(moved(#"staps_fanout_receivers_bucket{le="2.0"}"#) == 5)
        #expect(moved(#"staps_fanout_receivers_bucket{le="5.0"}"#) == 6)
        #expect(moved(#"staps_handshakes_rejected_total{status="400"}"#) == 1)
        #expect(moved(#"staps_http_responses_total{status="400"}"#) == 1)
        #expect(moved(#"staps_http_responses_total{status="202"}"#) == 1)
        #expect(moved(#"staps_websocket_closes_total{code="1000",by="client"}"#) == 1)
        #expect(moved(#"staps_websocket_closes_total{code="1009",by="node"}"#) == 1)
        #expect(moved(#"staps_websocket_closes_total{code="1002",by="node"}"#) == 1)
        #expect(moved(#"staps_websocket_closes_total{code="1002",by="client"}"#) == 0)
        #expect(moved(#"staps_websocket_closes_total{code="1006",by="client"}"#) == 1)
        #expect(after["staps_websocket_clients"] == 1)
        #expect(after[#"staps_connections{listener="unix"}"#] == 0)
        // No channel name anywhere: not as a label, not in a value.
        #expect(!after.text.contains("\"m\""))
        #expect(!after.text.contains("staps_broker_"), "a standalone node has no broker metrics")
        await a.close()
    }

    @Test func healthReadinessAndTheListenersOwnAnswers() async throws {
        try MetricsTools.require()
        let dir = TempDir()
        defer { dir.cleanup() }
        var limits = Limits()
        limits.shutdownTimeout = .seconds(3)
        let socket = dir.path + "/metrics.sock"
        let node = try await TestNode.start(limits: limits, metrics: .unixDomainSocket(path: socket))
        let address = BindAddress.unixDomainSocket(path: socket)
        #expect(try MetricsTools.curl(address, "/healthz") == (200, "ok\n"))
        #expect(try MetricsTools.curl(address, "/readyz") == (200, "ready\n"))
        #expect(try MetricsTools.curl(address, "/metrics", method: "HEAD").0 == 200)
        #expect(try MetricsTools.curl(address, "/other").0 == 404)
        #expect(try MetricsTools.curl(address, "/metrics", method: "POST").0 == 405)
        // A client that never reads holds shutdown open (it never answers the 1001): readiness
        // turns 503 at once, health stays 200 while the node drains.
        let holder = try await TestClient.connect(node.tcp, "/hold", autoRead: false)
        let stopping = Task { await node.stop() }
        try await eventually("readiness turns to 503 while shutting down") {
            (try? MetricsTools.curl(address, "/readyz")) ?? (0, "") == (503, "not ready: shutting down\n")
        }
        #expect(try MetricsTools.curl(address, "/healthz") == (200, "ok\n"))
        await stopping.value
        #expect(access(socket, F_OK) != 0, "the metrics socket file is removed at shutdown")
        await holder.close()
    }

    @Test func aClusteredNodeReportsItsBrokerLink() async throws {
        try MetricsTools.require()
        let exchange = Broker.freshExchange()
        let brokerURL = try await Broker.require()
        var started: [(TestNode, RabbitLink)] = []
        for _ in 0..<2 {
            let link = RabbitLink(configuration: RabbitConfiguration(urls: [try AMQPURL(brokerURL)], settings: ClusterSettings(exchange: exchange)), logger: testLogger("link"))
            started.append((try await TestNode.start(link: link, metrics: .hostname("127.0.0.1", port: 0)), link))
        }
        let nodes = started
        defer { Task { await stopAll(nodes) } }
        try await eventually("both links are up") { nodes.allSatisfy { $0.1.isConnected } }
        let (a, b) = (nodes[0].0, nodes[1].0)
        let aMetrics = try #require(a.node.metricsAddress)
        let bMetrics = try #require(b.node.metricsAddress)
        let sender = try await TestClient.connect(a.tcp, "/c")
        let receiver = try await TestClient.connect(b.tcp, "/c")
        try await eventually("ready once bound") { try MetricsTools.curl(bMetrics, "/readyz").0 == 200 && MetricsTools.curl(aMetrics, "/readyz").0 == 200 }
        let before = (try MetricsTools.scrape(aMetrics), try MetricsTools.scrape(bMetrics))
        for i in 0..<20 { sender.send("m\(i)") }
        for i in 0..<20 { #expect(try await receiver.nextText() == "m\(i)") }
        try await eventually("the broker confirmed the publishes") { nodes[0].1.counters.published.load(ordering: .relaxed) >= 20 }
        let after = (try MetricsTools.scrape(aMetrics), try MetricsTools.scrape(bMetrics))
        #expect(after.0["staps_broker_up"] == 1 && after.1["staps_broker_up"] == 1)
        #expect(after.0["staps_broker_published_total"] - before.0["staps_broker_published_total"] == 20)
        #expect(after.1["staps_broker_consumed_total"] - before.1["staps_broker_consumed_total"] >= 1, "AMQP messages may carry several")
        #expect(after.1["staps_messages_delivered_total"] - before.1["staps_messages_delivered_total"] == 20)
        // Adaptive with the broker keeping up: channel c's own key, and b got every message for c.
        #expect(after.0[#"staps_broker_bindings{granularity="exact"}"#] == 1)
        #expect(after.0[#"staps_broker_bindings{granularity="256"}"#] == 0)
        #expect(after.0["staps_broker_rebinds_pending"] == 0 && after.0["staps_broker_binds_waiting"] == 0)
        #expect(after.0["staps_broker_bind_latency_seconds_count"] >= 1)
        #expect(after.1["staps_broker_matched_total"] - before.1["staps_broker_matched_total"] == after.1["staps_broker_consumed_total"] - before.1["staps_broker_consumed_total"])
        #expect(after.1["staps_broker_discarded_total"] == 0)
        #expect(after.0["staps_broker_publish_batch_messages_sum"] - before.0["staps_broker_publish_batch_messages_sum"] == 20)
        #expect(after.0["staps_broker_publish_batch_messages_count"] > before.0["staps_broker_publish_batch_messages_count"])
        #expect(after.0[#"staps_broker_dropped_total{reason="broker_down"}"#] == 0)
        // Nothing was lost on the way: exported, and zero.
        #expect(after.1.text.contains("\nstaps_cluster_missed_total 0\n") && after.1.text.contains("\nstaps_cluster_out_of_order_total 0\n"))
        await sender.close()
        await receiver.close()
    }

    @Test func aNodeWithoutItsBrokerIsNotReady() async throws {
        try MetricsTools.require()
        // Nothing listens on port 1: the link keeps trying, local clients are served.
        let link = RabbitLink(configuration: RabbitConfiguration(urls: [try AMQPURL("amqp://guest:guest@127.0.0.1:1/")], settings: ClusterSettings(exchange: Broker.freshExchange())), logger: testLogger("link"))
        let node = try await TestNode.start(link: link, metrics: .hostname("127.0.0.1", port: 0))
        defer { Task { await node.stop() } }
        let address = try #require(node.node.metricsAddress)
        let (status, body) = try MetricsTools.curl(address, "/readyz")
        #expect(status == 503)
        #expect(body.contains("broker is unreachable"), "\(body)")
        #expect(try MetricsTools.curl(address, "/healthz").0 == 200)
        let scrape = try MetricsTools.scrape(address)
        #expect(scrape["staps_broker_up"] == 0)
        let a = try await TestClient.connect(node.tcp, "/local")
        let b = try await TestClient.connect(node.tcp, "/local")
        a.send("still served")
        #expect(try await b.nextText() == "still served")
        try await eventually("the publish is counted as dropped while down") {
            (try MetricsTools.scrape(address))[#"staps_broker_dropped_total{reason="broker_down"}"#] >= 1
        }
        await a.close()
        await b.close()
    }

    @Test func theMetricsSettingIsReadAndChecked() throws {
        let ok = try ConfigurationOverrides.parse("[staps]\nmetrics = 127.0.0.1:9100\n", file: "f").resolved(sourceFile: "f")
        #expect(ok.metricsAddress == .hostname("127.0.0.1", port: 9100))
        let unix = try ConfigurationOverrides.parse("[staps]\nmetrics = /run/staps/metrics.sock\n", file: "f").resolved(sourceFile: "f")
        #expect(unix.metricsAddress == .unixDomainSocket(path: "/run/staps/metrics.sock"))
        #expect((try ConfigurationOverrides.parse("", file: "e")).resolved(sourceFile: nil).metricsAddress == nil, "off by default")
        #expect(throws: ConfigurationError.self) { try ConfigurationOverrides.parse("[staps]\n\nmetrics = nowhere:x\n", file: "f") }
        do {
            _ = try ConfigurationOverrides.parse("[staps]\n\nmetrics = nowhere:x\n", file: "f")
        } catch {
            #expect(error.description.hasPrefix("f:3: metrics: "), "\(error)")
        }
    }
}

/// The nginx example for the metrics listeners, run by real nginx.
@Suite(.serialized) struct MetricsBehindNginxTests {
    @Test func deployNginxExampleWantsAPasswordForMetricsButNotForHealth() async throws {
        try MetricsTools.require()
        let dir = TempDir()
        defer { dir.cleanup() }
        let node = try await TestNode.start(metrics: .hostname("127.0.0.1", port: 0))
        defer { Task { await node.stop() } }
        guard case .hostname(_, let metricsPort) = try #require(node.node.metricsAddress) else { throw TestError.unexpected("TCP metrics") }
        let port = try await freeLoopbackPort()
        var site = try String(contentsOfFile: Broker.repositoryRoot + "/deploy/nginx/staps-metrics.conf", encoding: .utf8)
        site = site.replacingOccurrences(of: "listen 127.0.0.1:9190;", with: "listen 127.0.0.1:\(port);")
        site = site.replacingOccurrences(of: "127.0.0.1:9101", with: "127.0.0.1:\(metricsPort)")
        site = site.replacingOccurrences(of: "/etc/nginx/staps-metrics.htpasswd", with: dir.path + "/htpasswd")
        let (hashed, hash) = try run("/usr/bin/openssl", ["passwd", "-apr1", "s3cret"])
        #expect(hashed == 0)
        try "prometheus:\(hash.trimmingCharacters(in: .whitespacesAndNewlines))\n".write(toFile: dir.path + "/htpasswd", atomically: true, encoding: .utf8)
        let nginx = try await Nginx.run(site: site, port: port, dir: dir.path)
        defer { nginx.stop() }
        func get(_ path: String, _ user: String? = nil) throws -> (Int, String) {
            var args = ["-s", "-m", "10", "-w", "\n%{http_code}", "http://127.0.0.1:\(port)\(path)"]
            if let user { args += ["-u", user] }
            let (_, output) = try StapsNodeTests.run("/usr/bin/curl", args)
            let newline = output.lastIndex(of: "\n")!
            return (Int(output[output.index(after: newline)...]) ?? 0, String(output[..<newline]))
        }
        #expect(try get("/1/metrics").0 == 401)
        #expect(try get("/1/metrics", "prometheus:wrong").0 == 401)
        let (status, body) = try get("/1/metrics", "prometheus:s3cret")
        #expect(status == 200)
        #expect(body.contains("# TYPE staps_messages_received_total counter"))
        #expect(try get("/1/readyz") == (200, "ready\n"))
        #expect(try get("/1/healthz") == (200, "ok\n"))
        #expect(try get("/metrics").0 == 404, "nothing else is proxied")
    }
}

/// The histograms a scrape prints from their bucket counts read exactly as swift-prometheus's own.
@Suite struct HistogramExpositionTests {
    @Test func linesAreSwiftPrometheusOwnForTheSameObservations() {
        let bounds = [0, 1, 2, 5, 10]
        let registry = PrometheusCollectorRegistry()
        let help = #"Some \ help."#  // swift-prometheus doubles a backslash
        let reference = registry.makeValueHistogram(descriptor: MetricNameDescriptor(metricName: "h", unitName: "", helpText: help), buckets: bounds.map(Double.init))
        // Two writers, as two event loops.
        let loops = [CountHistogram(bounds: bounds), CountHistogram(bounds: bounds)]
        for (i, value) in [0, 1, 1, 2, 3, 7, 7, 10, 12, 400].enumerated() {
            loops[i % 2].record(value)
            reference.record(Double(value))
        }
        var ours: [UInt8] = []
        HistogramExposition.append("h", help: help, bounds: bounds, snapshots: loops.map(\.snapshot), to: &ours)
        #expect(String(decoding: ours, as: UTF8.self) == registry.emitToString())
    }
}

/// When the memory trimmer trims: once a busy spell has ended, and never on a quiet node.
@Suite struct MemoryTrimmerTests {
    typealias Totals = MemoryTrimmer.Spell.Totals

    @Test func aBusySpellEndsWhenActivityFallsToAnEighth() {
        var spell = MemoryTrimmer.Spell()
        let seen = [
            Totals(messages: 10_000, responses: 0, connections: 0),  // busy: 10000
            Totals(messages: 11_300, responses: 0, connections: 0),  // 1300: more than an eighth
            Totals(messages: 11_600, responses: 200, connections: 500),  // 300 + 200 + 500 opened: an eighth
            Totals(messages: 11_600, responses: 200, connections: 0),  // 500 closed: not busy since the trim
        ].map { spell.endsWith($0) }
        #expect(seen == [false, false, true, false])
    }

    @Test func aQuietNodeIsNeverTrimmed() {
        var spell = MemoryTrimmer.Spell()
        let seen = (1...20).map { spell.endsWith(Totals(messages: $0 * 999, responses: 0, connections: 0)) }
        #expect(!seen.contains(true))
    }
}
