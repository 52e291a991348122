import Atomics
import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import StapsNode
import Testing
import WebSocketClient

/// A refused websocket handshake over a fresh connection (the node closes after refusing):
/// its status, head and body, and how long the answer took.
func refusedHandshake(_ endpoint: Endpoint, _ path: String, authorization: String?, timeout: Double = 5) async throws -> (status: Int, head: String, body: String, seconds: Double) {
    let extra = authorization.map { "Authorization: \($0)\r\n" } ?? ""
    let started = Date()
    let bytes = try await rawExchange(endpoint, Array(upgradeRequest(path, extra: extra).utf8), timeout: timeout)
    let seconds = Date().timeIntervalSince(started)
    let text = String(decoding: bytes, as: UTF8.self)
    guard let split = text.range(of: "\r\n\r\n") else { throw TestError.unexpected("no HTTP response: \(text)") }
    let head = String(text[..<split.lowerBound])
    return (Int(head.split(separator: " ")[1]) ?? 0, head, String(text[split.upperBound...]), seconds)
}

/// The authorization hook end to end: real nodes, a real hook server (`HookServer`), real
/// websocket clients and raw HTTP.
@Suite(.serialized) struct AuthHookEndToEndTests {
    @Test func everyAnswerOfTheHookGetsItsDocumentedStatus() async throws {
        let hook = try await HookServer.start(slowDelay: .milliseconds(1500))
        let node = try await TestNode.start(access: AccessSettings(hook: hook.settings(timeout: .milliseconds(500))))
        let counters = node.node.counters

        // Admitted: the hook saw what the issue lists, on the path auth_url names.
        let admitted = try await TestClient.connect(node.tcp, "/r%C3%A4ume?x=1", headers: [
            ("Authorization", "Bearer ok"), ("Cookie", "session=1"), ("Origin", "https://app.example"), ("X-Forwarded-For", "203.0.113.7"),
        ])
        let asked = try #require(hook.requests.last)
        #expect(asked.method == .GET && asked.uri == "/check?scope=staps")
        #expect(asked.headers["Authorization"] == ["Bearer ok"] && asked.headers["Cookie"] == ["session=1"] && asked.headers["Origin"] == ["https://app.example"])
        #expect(asked.headers["X-Original-URI"] == ["/r%C3%A4ume?x=1"] && asked.headers["X-Original-Method"] == ["GET"])
        #expect(asked.headers["X-Staps-Channel"] == ["r%C3%A4ume"])
        #expect(asked.headers["X-Forwarded-For"] == ["203.0.113.7, 127.0.0.1"])
        #expect(!asked.headers.contains(name: "Sec-WebSocket-Key"))
        // A unix-socket client adds no address of its own.
        let local = try await TestClient.connect(node.unix, "/r%C3%A4ume", headers: [("Authorization", "Bearer both")])
        #expect(hook.requests.last?.headers.contains(name: "X-Forwarded-For") == false)
        local.send("hi")
        #expect(try await admitted.nextText() == "hi")

        let unauthorized = try await refusedHandshake(node.tcp, "/room", authorization: nil)
        #expect(unauthorized.status == 401 && unauthorized.head.contains("WWW-Authenticate: Bearer realm=\"hook\"\r\n"))
        #expect(unauthorized.body == "authorization required\n")
        #expect(try await refusedHandshake(node.tcp, "/room", authorization: "Bearer 403").status == 403)
        let error = try await refusedHandshake(node.tcp, "/room", authorization: "Bearer 500")
        #expect(error.status == 503 && error.body == "authorization hook answered 500\n")
        let bad = try await refusedHandshake(node.unix, "/room", authorization: "Bearer bad")
        #expect(bad.status == 503 && bad.body == "authorization hook answered X-Staps-Allow: everything, not subscribe, publish or both\n")
        // Connections are kept per event loop (a call goes out on its client's loop).
        #expect(hook.connectionsAccepted <= System.coreCount && hook.connectionsAccepted < hook.requests.count, "\(hook.connectionsAccepted) kept-alive connections to the hook served all \(hook.requests.count) calls")
        for authorization in ["Bearer slow", "Bearer never"] {
            let late = try await refusedHandshake(node.tcp, "/room", authorization: authorization)
            #expect(late.status == 503 && late.body.hasPrefix("authorization hook did not answer within 5"), "\(late.body)")
            #expect(late.seconds > 0.45 && late.seconds < 1.4, "\(authorization): answered after \(late.seconds) s")
        }
        #expect(counters.authAdmitted.load(ordering: .relaxed) == 2)
        #expect(counters.authDenied.load(ordering: .relaxed) == 2)
        #expect(counters.authFailedStatus.load(ordering: .relaxed) == 1)
        #expect(counters.authFailedBadAnswer.load(ordering: .relaxed) == 1)
        #expect(counters.authFailedTimeout.load(ordering: .relaxed) == 2)
        #expect(counters.authFailedUnreachable.load(ordering: .relaxed) == 0 && counters.authFailedOverConcurrency.load(ordering: .relaxed) == 0)
        #expect(counters.httpResponseTotal.load(ordering: .relaxed) == 6, "never a 500, never anything else")
        #expect(counters.httpResponses[503] == 4 && counters.httpResponses[401] == 1 && counters.httpResponses[403] == 1)
        let scrape = Scrape(String(decoding: node.node.metrics.render(), as: UTF8.self))
        #expect(scrape[#"staps_auth_requests_total{result="admitted"}"#] == 2)
        #expect(scrape[#"staps_auth_requests_total{result="timeout"}"#] == 2)
        #expect(scrape[#"staps_auth_requests_total{result="bad_answer"}"#] == 1)
        await admitted.close()
        await local.close()
        await node.stop()
        await hook.stop()
    }

    @Test func aHookOnAUnixSocketAndAHookThatIsNotThere() async throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let hook = try await HookServer.start(unixPath: dir.path + "/hook.sock")
        let overUnix = try await TestNode.start(access: AccessSettings(hook: HookSettings(url: try HookURL("http://unix:\(dir.path)/hook.sock:/auth"))))
        let client = try await TestClient.connect(overUnix.tcp, "/room", headers: [("Authorization", "Bearer ok")])
        #expect(hook.requests.last?.uri == "/auth")
        #expect(try await refusedHandshake(overUnix.tcp, "/room", authorization: "Bearer nobody").status == 401)
        await client.close()
        await overUnix.stop()
        await hook.stop()

        // Refused (the port was just let go of) and a socket path with nothing there: 503 at
        // once, not after auth_timeout.
        let closedPort = hook.port
        for url in ["http://127.0.0.1:\(closedPort)/check", "http://unix:\(dir.path)/nobody.sock:/check"] {
            let node = try await TestNode.start(access: AccessSettings(hook: HookSettings(url: try HookURL(url), timeout: .seconds(3))))
            let refused = try await refusedHandshake(node.tcp, "/room", authorization: "Bearer ok")
            #expect(refused.status == 503 && refused.body == "authorization hook unreachable\n", "\(url): \(refused.body)")
            #expect(refused.seconds < 1, "\(url): answered after \(refused.seconds) s")
            let post = try await httpRequest(node.unix, "POST", "/room", headers: [("Authorization", "Bearer ok")], body: Array("x".utf8))
            #expect(post.0 == 503)
            #expect(node.node.counters.authFailedUnreachable.load(ordering: .relaxed) == 2)
            #expect(node.node.counters.authAdmitted.load(ordering: .relaxed) == 0)
            await node.stop()
        }
    }

    @Test func aNodeWithAHookButNoClientDoesNotStart() async throws {
        var config = NodeConfiguration(addresses: [.hostname("127.0.0.1", port: 0)])
        config.access.hook.url = try HookURL("http://127.0.0.1:9/check")
        let node = Node(configuration: config, logger: testLogger())
        await #expect(throws: NodeStartError.self) { try await node.start() }
        #expect(node.boundAddresses.isEmpty, "nothing was bound")
        await node.shutdown()
    }

    @Test func subscribeOnlyAndPublishOnlyClientsAndPosts() async throws {
        let hook = try await HookServer.start()
        let node = try await TestNode.start(access: AccessSettings(hook: hook.settings()))
        let full = try await TestClient.connect(node.tcp, "/room", headers: [("Authorization", "Bearer ok")])
        let reader = try await TestClient.connect(node.unix, "/room", headers: [("Authorization", "Bearer sub")])
        let writer = try await TestClient.connect(node.tcp, "/room", headers: [("Authorization", "Bearer pub")])

        reader.send("from a reader")
        #expect(try await full.isQuiet(for: 0.2))
        #expect(try await writer.isQuiet(for: 0))
        #expect(Scrape(String(decoding: node.node.metrics.render(), as: UTF8.self))[#"staps_messages_dropped_total{reason="subscribe_only"}"#] == 1)
        full.send("to everyone")
        #expect(try await reader.nextText() == "to everyone")
        writer.send("from a writer")
        #expect(try await full.nextText() == "from a writer")
        #expect(try await reader.nextText() == "from a writer")
        #expect(try await writer.isQuiet(for: 0.2), "publish-only receives nothing")

        let post = try await httpRequest(node.tcp, "POST", "/room", headers: [("Authorization", "Bearer ok"), ("Content-Type", "text/plain")], body: Array("posted".utf8))
        #expect(post.0 == 202)
        #expect(try await full.nextText() == "posted")
        #expect(try await reader.nextText() == "posted")
        #expect(try await httpRequest(node.tcp, "POST", "/room", headers: [("Authorization", "Bearer pub")], body: [1]).0 == 202)
        let subscribeOnly = try await httpRequest(node.tcp, "POST", "/room", headers: [("Authorization", "Bearer sub")], body: [1])
        #expect(subscribeOnly.0 == 403 && subscribeOnly.2 == "this client may only subscribe (X-Staps-Allow: subscribe)\n")
        let anonymous = try await httpRequest(node.unix, "POST", "/room", body: [1])
        #expect(anonymous.0 == 401 && anonymous.1.contains("WWW-Authenticate: Bearer realm=\"hook\"\r\n"))
        #expect(try await httpRequest(node.tcp, "POST", "/room", headers: [("Authorization", "Bearer 500")], body: [1]).0 == 503)
        #expect(hook.requests.suffix(5).allSatisfy { $0.headers["X-Original-Method"] == ["POST"] })
        #expect(try await full.nextMessage().bytes == [1], "only the admitted POSTs were published")
        #expect(try await full.isQuiet(for: 0.2))
        let received = node.node.messagesReceived
        #expect(received.websocket == 2 && received.post == 2)
        await full.close()
        await reader.close()
        await writer.close()
        await node.stop()
        await hook.stop()
    }

    @Test func theConcurrencyBoundAndClientsThatLeaveWhileTheHookDecides() async throws {
        let hook = try await HookServer.start()
        let node = try await TestNode.start(access: AccessSettings(hook: hook.settings(timeout: .seconds(5), concurrency: 2)))
        let request = Array(upgradeRequest("/pending", extra: "Authorization: Bearer never\r\n").utf8)
        let waiting = try (0..<2).map { _ in try RawSocket(unix: node.socketPath) }
        for socket in waiting { #expect(socket.send(request)) }
        try await hook.waitForRequests(authorization: "Bearer never", count: 2)
        #expect(node.node.authorizationCallsInFlight == 2)
        #expect(node.node.status.hasPrefix("connections 2, channels 0"), "\(node.node.status)")

        let third = try await refusedHandshake(node.tcp, "/after", authorization: "Bearer ok")
        #expect(third.status == 503 && third.body == "too many authorization checks in flight, try again later\n")
        #expect(third.seconds < 0.3, "at once: \(third.seconds) s")
        #expect(hook.requests.count == 2, "the third was never sent to the hook")
        #expect(node.node.counters.authFailedOverConcurrency.load(ordering: .relaxed) == 1)

        // The two leave: their calls stop (the hook sees its connections closed), their slots
        // come back, and nothing joined.
        for socket in waiting { socket.close() }
        try? await eventually("the calls stop and their hook connections close", within: 2) {
            node.node.authorizationCallsInFlight == 0 && hook.connectionsOpen == 0
        }
        #expect(node.node.authorizationCallsInFlight == 0)
        #expect(hook.connectionsOpen == 0, "AsyncHTTPClient closed the calls nobody waits for")
        let after = try await TestClient.connect(node.tcp, "/after", headers: [("Authorization", "Bearer ok")])
        #expect(node.node.status.hasPrefix("connections 1, channels 1"), "\(node.node.status)")
        #expect(node.node.counters.authAdmitted.load(ordering: .relaxed) == 1)
        #expect(node.node.counters.authFailedTimeout.load(ordering: .relaxed) == 0, "a client that left is counted in no outcome")
        await after.close()
        await node.stop()
        await hook.stop()
    }

    /// Clients already connected never wait for the hook: a pair exchanges a message every
    /// 10 ms while 20 handshakes wait on a slow hook (10 answered late, 10 never).
    @Test func connectedClientsKeepExchangingWhileTheHookIsSlow() async throws {
        let hook = try await HookServer.start(slowDelay: .milliseconds(1500))
        let node = try await TestNode.start(access: AccessSettings(hook: hook.settings(timeout: .seconds(2))))
        let a = try await TestClient.connect(node.tcp, "/pair", headers: [("Authorization", "Bearer ok")])
        let b = try await TestClient.connect(node.unix, "/pair", headers: [("Authorization", "Bearer ok")])

        let waiting = Task {
            try await withThrowingTaskGroup(of: Int.self) { group in
                for i in 0..<20 {
                    group.addTask {
                        let extra = "Authorization: Bearer \(i % 2 == 0 ? "slow" : "never")\r\n"
                        let bytes = try await rawExchange(i % 4 < 2 ? node.tcp : node.unix, Array(upgradeRequest("/late", extra: extra).utf8), timeout: 3)
                        let text = String(decoding: bytes, as: UTF8.self)
                        return Int(text.split(separator: " ").dropFirst().first ?? "") ?? 0
                    }
                }
                var statuses: [Int] = []
                for try await status in group { statuses.append(status) }
                return statuses.sorted()
            }
        }
        try await hook.waitForRequests(authorization: "Bearer never", count: 10)

        let count = 150
        let started = Date()
        let receiving = Task {
            var latencies: [Double] = []
            while latencies.count < count {
                let parts = try await b.nextText(timeout: 3).split(separator: " ")
                #expect(Int(parts[0]) == latencies.count, "in order, none lost")
                latencies.append(Date().timeIntervalSince(started) - Double(parts[1])!)
            }
            return latencies
        }
        for i in 0..<count {
            a.send("\(i) \(Date().timeIntervalSince(started))")
            if i % 10 == 9 { b.send("back \(i)") }
            // A message every 10 ms, over the hook's 1.5 s delay: the pacing is under test.
            try await Task.sleep(nanoseconds: 10_000_000)
        }
        let latencies = try await receiving.value
        for i in stride(from: 9, to: count, by: 10) { #expect(try await a.nextText() == "back \(i)") }
        #expect(try await b.isQuiet(for: 0.05), "nothing twice")
        let sorted = latencies.sorted()
        let p99 = sorted[sorted.count * 99 / 100], worst = sorted.last!
        print("AuthHookEndToEndTests: \(count) messages while 20 handshakes waited on the hook: 0 lost, latency p50 \(String(format: "%.1f", sorted[count / 2] * 1000)) ms, p99 \(String(format: "%.1f", p99 * 1000)) ms, max \(String(format: "%.1f", worst * 1000)) ms")
        #expect(worst < 0.25, "a slow hook must not delay clients already connected (max \(worst) s)")

        let statuses = try await waiting.value
        #expect(statuses == Array(repeating: 101, count: 10) + Array(repeating: 503, count: 10), "\(statuses)")
        #expect(node.node.counters.authFailedTimeout.load(ordering: .relaxed) == 10)
        await a.close()
        await b.close()
        await node.stop()
        await hook.stop()
    }
}
