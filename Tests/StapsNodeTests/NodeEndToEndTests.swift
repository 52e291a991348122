import Foundation
import NIOCore
import StapsCluster
import StapsNode
import Testing
import WebSocketClient

/// A real node in this process, real websocket clients over real TCP and unix sockets.
@Suite(.serialized) struct NodeEndToEndTests {
    @Test(arguments: ["tcp", "unix"])
    func relaysToOthersNeverBackToTheSender(transport: String) async throws {
        let node = try await TestNode.start()
        let endpoint = transport == "tcp" ? node.tcp : node.unix
        let a = try await TestClient.connect(endpoint, "/room")
        let b = try await TestClient.connect(endpoint, "/room")
        let c = try await TestClient.connect(endpoint, "/room")
        a.send("from a")
        #expect(try await b.nextText() == "from a")
        #expect(try await c.nextText() == "from a")
        b.send("from b")
        #expect(try await a.nextText() == "from b")
        #expect(try await c.nextText() == "from b")
        #expect(try await a.isQuiet(for: 0.2))  // a never hears itself
        #expect(try await b.isQuiet(for: 0))
        await node.stop()
    }

    @Test func channelsAreIsolatedAndPercentDecoded() async throws {
        let node = try await TestNode.start()
        let dotted = try await TestClient.connect(node.tcp, "/a.b")
        let encoded = try await TestClient.connect(node.tcp, "/a%2Eb?ignored=query")
        let other = try await TestClient.connect(node.tcp, "/a")
        let prefix = try await TestClient.connect(node.tcp, "/a.b/c")
        dotted.send("same channel")
        #expect(try await encoded.nextText() == "same channel")
        #expect(try await other.isQuiet(for: 0.2))
        #expect(try await prefix.isQuiet(for: 0))
        await node.stop()
    }

    @Test func textAndBinaryArriveByteForByte() async throws {
        let node = try await TestNode.start()
        let sender = try await TestClient.connect(node.unix, "/bytes")
        let receiver = try await TestClient.connect(node.tcp, "/bytes")
        let binary = (0..<70_000).map { UInt8(truncatingIfNeeded: $0 &* 7919) }
        sender.send(binary: binary)
        let text = "κόσμε ✓ 😀 " + String(repeating: "z", count: 300)
        sender.send(text)
        sender.send(binary: [0, 255, 0x80])
        let m1 = try await receiver.nextMessage()
        #expect(m1.isText == false && m1.bytes == binary)
        let m2 = try await receiver.nextMessage()
        #expect(m2.isText && m2.bytes == Array(text.utf8))
        let m3 = try await receiver.nextMessage()
        #expect(!m3.isText && m3.bytes == [0, 255, 0x80])
        await node.stop()
    }

    @Test func fragmentedMessagesAreReassembled() async throws {
        let node = try await TestNode.start()
        let sender = try await TestClient.connect(node.tcp, "/frag")
        let receiver = try await TestClient.connect(node.tcp, "/frag")
        let allocator = ByteBufferAllocator()
        sender.client.send(opcode: .text, allocator.buffer(string: "hel"), fin: false)
        sender.client.send(opcode: .ping, allocator.buffer(string: "interleaved"))
        sender.client.send(opcode: .continuation, allocator.buffer(string: "lo "), fin: false)
        sender.client.send(opcode: .continuation, allocator.buffer(string: "world"), fin: true)
        #expect(try await receiver.nextText() == "hello world")
        await node.stop()
    }

    @Test func perSenderOrderAcrossEventLoops() async throws {
        let node = try await TestNode.start()
        // Enough receivers that both of the node's event loops hold some.
        var receivers: [TestClient] = []
        for _ in 0..<6 { receivers.append(try await TestClient.connect(node.tcp, "/order")) }
        let s1 = try await TestClient.connect(node.tcp, "/order")
        let s2 = try await TestClient.connect(node.unix, "/order")
        let count = 500
        for i in 0..<count {
            s1.send("1:\(i)")
            s2.send("2:\(i)")
        }
        for r in receivers {
            var next = ["1": 0, "2": 0]
            for _ in 0..<(2 * count) {
                let parts = try await r.nextText().split(separator: ":")
                let sender = String(parts[0])
                #expect(Int(parts[1]) == next[sender], "sender \(sender) out of order")
                next[sender]! += 1
            }
            #expect(next == ["1": count, "2": count])
        }
        // Each sender got exactly the other's messages.
        for (s, other) in [(s1, "2"), (s2, "1")] {
            for i in 0..<count { #expect(try await s.nextText() == "\(other):\(i)") }
            #expect(try await s.isQuiet(for: 0.1))
        }
        await node.stop()
    }

    @Test func emptyMessagesAreNotRelayed() async throws {
        let node = try await TestNode.start()
        let a = try await TestClient.connect(node.tcp, "/keepalive")
        let b = try await TestClient.connect(node.tcp, "/keepalive")
        a.send("")
        a.send(binary: [])
        a.send("after")
        #expect(try await b.nextText() == "after")
        #expect(try await b.isQuiet(for: 0.1))
        await node.stop()
    }

    @Test func joinedFromTheMomentTheHandshakeCompletes() async throws {
        let node = try await TestNode.start()
        let sender = try await TestClient.connect(node.tcp, "/join")
        for i in 0..<50 {
            let late = try await TestClient.connect(i % 2 == 0 ? node.tcp : node.unix, "/join")
            sender.send("m\(i)")
            #expect(try await late.nextText() == "m\(i)")
            await late.close()
        }
        await node.stop()
    }

    @Test func postPublishesToWebsocketClients() async throws {
        let node = try await TestNode.start()
        let a = try await TestClient.connect(node.tcp, "/news")
        let b = try await TestClient.connect(node.unix, "/news")
        let (status, _, body) = try await httpRequest(node.tcp, "POST", "/news", headers: [("Content-Type", "text/plain; charset=utf-8")], body: Array("headline".utf8))
        #expect(status == 202)
        #expect(body == "{\"channel\":\"news\",\"receivers\":2}\n")
        #expect(try await a.nextText() == "headline")
        #expect(try await b.nextText() == "headline")
        let (status2, _, _) = try await httpRequest(node.unix, "POST", "/news", headers: [("Content-Type", "application/octet-stream")], body: [1, 2, 3])
        #expect(status2 == 202)
        let m = try await a.nextMessage()
        #expect(!m.isText && m.bytes == [1, 2, 3])
        let (status3, _, body3) = try await httpRequest(node.tcp, "POST", "/nobody-here", body: [1])
        #expect(status3 == 202 && body3.contains("\"receivers\":0"))
        // curl sends Expect: 100-continue for larger bodies; it gets its 100 at once.
        let (status4, head4, _) = try await httpRequest(node.tcp, "POST", "/news", headers: [("Expect", "100-continue")], body: [7, 7])
        #expect(status4 == 100 && head4.hasPrefix("HTTP/1.1 100 Continue"))
        let m4 = try await a.nextMessage()
        #expect(m4.bytes == [7, 7])
        await node.stop()
    }

    @Test func getPageOffersAFreshUUID4URL() async throws {
        let node = try await TestNode.start()
        let uuid = try Regex("ws://staps\\.test/[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
        let (status, head, body) = try await httpRequest(node.tcp, "GET", "/some/channel")
        #expect(status == 200)
        #expect(head.lowercased().contains("content-type: text/html"))
        #expect(body.contains(uuid))
        #expect(body.contains("ws://staps.test/some/channel"))
        let (_, _, root) = try await httpRequest(node.unix, "GET", "/")
        #expect(root.contains(uuid))
        #expect(!root.contains("This channel"))
        let (_, _, proxied) = try await httpRequest(node.tcp, "GET", "/x", headers: [("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "pubsub.example")])
        #expect(proxied.contains("wss://pubsub.example/x"))
        await node.stop()
    }

    @Test func badRequestsGetClearStatuses() async throws {
        var limits = Limits()
        limits.maxMessageSize = 1000
        let node = try await TestNode.start(limits: limits)
        let (s400, _, b400) = try await httpRequest(node.tcp, "GET", "/bad%zz")
        #expect(s400 == 400 && b400 == "bad percent-encoding in channel name\n")
        let (s414, _, _) = try await httpRequest(node.tcp, "GET", "/" + String(repeating: "x", count: 257))
        #expect(s414 == 414)
        let (s405, h405, _) = try await httpRequest(node.tcp, "DELETE", "/x")
        #expect(s405 == 405 && h405.contains("Allow: GET, HEAD, POST"))
        let (s413, _, _) = try await httpRequest(node.tcp, "POST", "/x", body: [UInt8](repeating: 1, count: 1001))
        #expect(s413 == 413)
        let (s400root, _, _) = try await httpRequest(node.tcp, "POST", "/", body: [1])
        #expect(s400root == 400)
        // The same errors stop a websocket handshake before any upgrade.
        await #expect(throws: HandshakeError.self) { _ = try await TestClient.connect(node.tcp, "/bad%zz") }
        do {
            _ = try await TestClient.connect(node.tcp, "/" + String(repeating: "y", count: 300))
            Issue.record("expected 414")
        } catch let error as HandshakeError {
            #expect(error.status == 414)
        }
        do {
            _ = try await TestClient.connect(node.tcp, "/")
            Issue.record("expected 400")
        } catch let error as HandshakeError {
            #expect(error.status == 400)
        }
        // The node still serves everyone else.
        let a = try await TestClient.connect(node.tcp, "/fine")
        let b = try await TestClient.connect(node.tcp, "/fine")
        a.send("still here")
        #expect(try await b.nextText() == "still here")
        await node.stop()
    }

    @Test func overTheConnectionLimitGets503() async throws {
        var limits = Limits()
        limits.maxConnections = 2
        let node = try await TestNode.start(limits: limits)
        let a = try await TestClient.connect(node.tcp, "/full")
        let b = try await TestClient.connect(node.tcp, "/full")
        do {
            _ = try await TestClient.connect(node.tcp, "/full")
            Issue.record("expected 503")
        } catch let error as HandshakeError {
            #expect(error.status == 503)
        }
        #expect(node.node.counters.connectionsRefused.load(ordering: .relaxed) == 1)
        await b.close()
        // Room again once a client leaves (the node frees its slot when it sees the close).
        let c = try await eventually("a slot free again") { try? await TestClient.connect(node.tcp, "/full") }
        a.send("room again")
        #expect(try await c.nextText() == "room again")
        await node.stop()
    }

    @Test func oversizeMessageClosesWith1009() async throws {
        var limits = Limits()
        limits.maxMessageSize = 1024
        let node = try await TestNode.start(limits: limits)
        let big = try await TestClient.connect(node.tcp, "/size")
        let fragmented = try await TestClient.connect(node.tcp, "/size")
        let other = try await TestClient.connect(node.tcp, "/size")
        big.send(binary: [UInt8](repeating: 7, count: 1025))
        let (code, _) = try await big.nextClose()
        #expect(code == 1009)
        let allocator = ByteBufferAllocator()
        fragmented.client.send(opcode: .binary, allocator.buffer(bytes: [UInt8](repeating: 1, count: 600)), fin: false)
        fragmented.client.send(opcode: .continuation, allocator.buffer(bytes: [UInt8](repeating: 1, count: 600)), fin: true)
        let (code2, _) = try await fragmented.nextClose()
        #expect(code2 == 1009)
        #expect(try await other.isQuiet(for: 0.2))
        await node.stop()
    }

    @Test func invalidUTF8TextClosesWith1007AndReachesNoOne() async throws {
        let node = try await TestNode.start()
        let bad = try await TestClient.connect(node.tcp, "/utf8")
        let other = try await TestClient.connect(node.tcp, "/utf8")
        bad.client.send(opcode: .text, ByteBufferAllocator().buffer(bytes: [0x61, 0xC3, 0x28]))
        let (code, _) = try await bad.nextClose()
        #expect(code == 1007)
        #expect(try await other.isQuiet(for: 0.2))
        await node.stop()
    }

    @Test func slowReceiverIsClosedWith1008WhileAFastOneGetsEverything() async throws {
        var limits = Limits()
        limits.sendBuffer = 256 << 10
        limits.slowConsumerGrace = .milliseconds(200)
        limits.shutdownTimeout = .seconds(30)  // time for the slow client to read up to the close frame
        let node = try await TestNode.start(limits: limits)
        let slow = try await TestClient.connect(node.unix, "/firehose", autoRead: false)
        let fast = try await TestClient.connect(node.unix, "/firehose")
        let sender = try await TestClient.connect(node.unix, "/firehose", group: senderGroup)
        let payload = [UInt8](repeating: 0x5A, count: 16 << 10)
        let count = 1000  // 16 MiB: far beyond the socket buffers and the 256 KiB send buffer
        for i in 0..<count {
            var p = payload
            p[0] = UInt8(truncatingIfNeeded: i)
            p[1] = UInt8(truncatingIfNeeded: i >> 8)
            sender.send(binary: p)
            // Paced (about 16 MB/s, time is part of the set-up) so that a client that reads keeps
            // up even in a debug build, where the test clients' NIO masking runs a byte at a time.
            try await Task.sleep(nanoseconds: 1_000_000)
        }
        for i in 0..<count {
            let m = try await fast.nextMessage(timeout: 20)
            #expect(Int(m.bytes[0]) | Int(m.bytes[1]) << 8 == i & 0xFFFF)
            #expect(m.bytes.count == payload.count)
        }
        #expect(node.node.counters.slowConsumersClosed.load(ordering: .relaxed) == 1)
        // The slow client, once it reads, finds the 1008 after what was buffered for it.
        try await slow.client.connection.setOption(.autoRead, value: true).get()
        slow.client.connection.read()
        let (code, reason) = try await slow.nextClose(timeout: 20)
        #expect(code == 1008)
        #expect(reason == "slow consumer")
        await node.stop()
    }

    @Test func idleClientsArePingedAndKeptWhenTheyAnswer() async throws {
        var limits = Limits()
        limits.pingInterval = .milliseconds(100)
        limits.pongTimeout = .milliseconds(300)
        let node = try await TestNode.start(limits: limits)
        let a = try await TestClient.connect(node.tcp, "/idle")  // answers pings automatically
        let b = try await TestClient.connect(node.tcp, "/idle", autoRead: false)  // never reads: no pong
        let (code, _) = try await { () async throws -> (UInt16?, String) in
            // Silent past ping_interval + pong_timeout (0.4 s): the idle timeout is under test.
            try await Task.sleep(nanoseconds: 1_000_000_000)
            try await b.client.connection.setOption(.autoRead, value: true).get()
            b.client.connection.read()
            return try await b.nextClose()
        }()
        #expect(code == 1001)
        let c = try await TestClient.connect(node.tcp, "/idle")
        c.send("a is alive")
        #expect(try await a.nextText() == "a is alive")
        await node.stop()
    }

    @Test func foreignOriginsAndTokenlessPostsAreRefusedWhileOthersRelay() async throws {
        let access = AccessSettings(origins: [OriginPattern("https://app.example.com")!], postToken: "0123456789abcdef")
        let node = try await TestNode.start(access: access)
        let browser = try await TestClient.connect(node.tcp, "/guarded", headers: [("Origin", "https://app.example.com")])
        let program = try await TestClient.connect(node.unix, "/guarded")  // no Origin: not a browser
        let foreign = try await rawExchange(node.tcp, Array(upgradeRequest("/guarded", extra: "Origin: https://evil.example\r\n").utf8), timeout: 2)
        #expect(statusLine(foreign) == "HTTP/1.1 403 Forbidden")
        let (refused, head, _) = try await httpRequest(node.unix, "POST", "/guarded", headers: [("Content-Type", "text/plain")], body: Array("no token".utf8))
        #expect(refused == 401 && head.contains("WWW-Authenticate: Bearer"))
        let (accepted, _, _) = try await httpRequest(node.unix, "POST", "/guarded", headers: [("Content-Type", "text/plain"), ("Authorization", "Bearer 0123456789abcdef")], body: Array("with token".utf8))
        #expect(accepted == 202)
        #expect(try await browser.nextText() == "with token")
        #expect(try await program.nextText() == "with token")
        browser.send("from the page")
        #expect(try await program.nextText() == "from the page")
        await node.stop()
    }

    @Test func silentConnectionsHitTheHandshakeTimeout() async throws {
        var limits = Limits()
        limits.handshakeTimeout = .milliseconds(200)
        let node = try await TestNode.start(limits: limits)
        let start = NIODeadline.now()
        let response = try await rawExchange(node.tcp, [], timeout: 5)
        #expect(String(decoding: response, as: UTF8.self).hasPrefix("HTTP/1.1 408 Request Timeout\r\n"))
        #expect(NIODeadline.now() - start < .seconds(4), "the node closed the silent connection")
        await node.stop()
    }
}

/// The kernel queues of the unix listeners: NIO listens again with 128 when it takes over a
/// socket; the node's own backlog must win.
@Suite struct ListenBacklogTests {
    @Test func aPausedUnixListenerQueuesFarMoreThan128Connections() async throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let path = dir.path + "/backlog.sock"
        let node = Node(configuration: NodeConfiguration(addresses: [.unixDomainSocket(path: path)]), logger: testLogger("node"))
        try await node.start(accepting: false)
        var fds: [Int32] = []
        defer { for fd in fds { close(fd) } }
        var queued = 0
        for _ in 0..<600 {
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
            fds.append(fd)
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            let ok = withUnixAddress(path, fd, connect)
            if ok == 0 { queued += 1 } else { break }  // EAGAIN: the queue is full
        }
        // Linux queues backlog + 1; the node asks for 4096, capped by net.core.somaxconn.
        let somaxconn = Int((try? String(contentsOfFile: "/proc/sys/net/core/somaxconn", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "") ?? 4096
        #expect(queued >= min(600, somaxconn), "queued \(queued) connections while not accepting")
        try await node.startAccepting()
        // Gone before the node stops, so that it does not wait out its shutdown_timeout for them.
        for fd in fds { close(fd) }
        fds = []
        await node.shutdown()
    }

    /// Receivers that vanish (unix sockets closed with SO_LINGER 0, never having read) while
    /// messages are flushed to them: a flush that meets the closed socket closes the connection
    /// from inside the flush, and the handler must take that re-entry (it once held exclusive
    /// access to its outbound state across the call: Swift stops the process on such a second
    /// access). The node keeps serving the one that stays, every message in order.
    @Test func receiversVanishingMidFlushLeaveTheOthersServed() async throws {
        let node = try await TestNode.start()
        let sender = try await TestClient.connect(node.unix, "/vanish")
        let stays = try await TestClient.connect(node.unix, "/vanish")
        let key = "dGhlIHNhbXBsZSBub25jZQ=="
        let upgrade = "GET /vanish HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: \(key)\r\nSec-WebSocket-Version: 13\r\n\r\n"
        let path = node.socketPath
        // Blocking sockets on this task's thread: the node runs on its own event loops.
        let vanishing = try (0..<40).map { _ in
            let socket = try RawSocket(unix: path)
            _ = socket.send(upgrade)
            guard String(decoding: socket.read(until: Array("\r\n\r\n".utf8), timeout: 5), as: UTF8.self).hasPrefix("HTTP/1.1 101") else {
                throw TestError.unexpected("no 101 for a vanishing receiver")
            }
            return socket
        }
        let payload = String(repeating: "v", count: 1024)
        let messages = 400
        for i in 0..<messages {
            sender.send("\(i) \(payload)")
            if i % 10 == 9, !vanishing.isEmpty { vanishing[i / 10 % vanishing.count].abort() }
            if i % 50 == 49 { try await Task.sleep(for: .milliseconds(1)) }  // pacing: let flushes meet the closed sockets
        }
        for i in 0..<messages {
            #expect(try await stays.nextText() == "\(i) \(payload)")
        }
        let late = try await TestClient.connect(node.unix, "/vanish")
        sender.send("after")
        #expect(try await late.nextText() == "after")
        await node.stop()
    }

    /// The longest unix socket path Linux takes (107 bytes) is listened on and served: the
    /// configuration allows it, so the bind must too (NIO's SocketAddress stops at 103).
    @Test func theLongestUnixSocketPathIsServed() async throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let path = dir.path + "/" + String(repeating: "s", count: 107 - dir.path.utf8.count - 1)
        #expect(path.utf8.count == 107)
        let node = Node(configuration: NodeConfiguration(addresses: [.unixDomainSocket(path: path)]), logger: testLogger("node"))
        try await node.start()
        // Reached through a short symlink: clients made with NIO cannot name the long path either.
        let link = dir.path + "/l"
        #expect(symlink(path, link) == 0)
        let (status, _, _) = try await httpRequest(.unix(path: link), "POST", "/long", headers: [("Content-Type", "text/plain")], body: Array("hi".utf8))
        #expect(status == 202)
        await node.shutdown()
    }
}
