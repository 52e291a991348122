import Logging
import NIOCore
import NIOEmbedded
import NIOHTTP1
import StapsCluster
@testable import StapsNode
import Testing

/// A node's connection pipeline in memory: the very handlers `Node` installs, over an
/// `EmbeddedEventLoop`, with a standalone hub.
final class InMemoryNode {
    let loop = EmbeddedEventLoop()
    let hub: Hub
    let shared: HTTPHandler.Shared
    let limits: Limits
    let counters = NodeCounters()

    /// - Parameter hook: the authorization hook's transport (with `access.hook`'s settings); nil: no hook.
    init(limits: Limits = Limits(), access: AccessSettings = AccessSettings(), hook: (any HookTransport)? = nil) {
        self.limits = limits
        self.hub = Hub(eventLoops: [self.loop], link: StandaloneLink(), framing: WebSocketMessageFraming(), counters: self.counters, logger: testLogger())
        let counters = self.counters
        let authorizer = hook.map { Authorizer(settings: access.hook, transport: $0, counters: counters, logger: testLogger()) }
        self.shared = HTTPHandler.Shared(hub: self.hub, limits: limits, counters: self.counters, connectionIDs: .init(0), nodeID: "test", access: access, authorizer: authorizer)
    }

    func connect() throws -> EmbeddedChannel {
        let channel = EmbeddedChannel(loop: self.loop)
        try ConnectionPipeline.configure(channel, shared: self.shared, overConnectionLimit: false, logger: testLogger())
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        return channel
    }

    /// A connection that has completed the websocket handshake on `path`.
    func websocket(_ path: String) throws -> EmbeddedChannel {
        let channel = try self.connect()
        try self.send(channel, upgradeRequest(path))
        let response = try self.output(channel)
        #expect(response.hasPrefix("HTTP/1.1 101 Switching Protocols\r\n"), "\(response)")
        return channel
    }

    func send(_ channel: EmbeddedChannel, _ text: String) throws {
        try self.send(channel, Array(text.utf8))
    }

    func send(_ channel: EmbeddedChannel, _ bytes: [UInt8]) throws {
        guard channel.isActive else { return }
        try channel.writeInbound(ByteBuffer(bytes: bytes))
        self.loop.run()
    }

    /// Everything written to the client so far.
    func outputBytes(_ channel: EmbeddedChannel) throws -> [UInt8] {
        self.loop.run()
        var out: [UInt8] = []
        while let part = try channel.readOutbound(as: IOData.self) {
            guard case .byteBuffer(let b) = part else { continue }
            out += b.readableBytesView
        }
        return out
    }

    func output(_ channel: EmbeddedChannel) throws -> String {
        String(decoding: try self.outputBytes(channel), as: UTF8.self)
    }
}

func upgradeRequest(_ path: String, version: String = "HTTP/1.1", extra: String = "", key: String = "dGhlIHNhbXBsZSBub25jZQ==") -> String {
    "GET \(path) \(version)\r\nHost: staps.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: \(key)\r\n\(extra)\r\n"
}

/// The status line of every response in `output`, in order.
func statusLines(_ output: String) -> [String] {
    // By bytes: in Swift, "\r\n" is one Character.
    output.utf8.split(separator: UInt8(ascii: "\n")).map { line in
        String(decoding: line.last == UInt8(ascii: "\r") ? line.dropLast() : line, as: UTF8.self)
    }.filter { $0.hasPrefix("HTTP/1.") }
}

@Suite struct HTTPHandlerTests {
    @Test func pipelinedRequestsAreAnsweredInOrderAndHEADHasNoBody() throws {
        let node = InMemoryNode()
        let c = try node.connect()
        try node.send(c, "GET /a HTTP/1.1\r\nHost: x\r\n\r\nHEAD /b HTTP/1.1\r\nHost: x\r\n\r\nGET /c HTTP/1.1\r\nHost: x\r\n\r\n")
        let out = try node.output(c)
        #expect(statusLines(out) == ["HTTP/1.1 200 OK", "HTTP/1.1 200 OK", "HTTP/1.1 200 OK"], "\(out)")
        let pages = out.components(separatedBy: "HTTP/1.1 200 OK")
        #expect(pages.count == 4 && pages[1].contains("<html") && !pages[2].contains("<html") && pages[3].contains("<html"))
        #expect(c.isActive)
    }

    @Test(arguments: [
        // (request, expected status line, closes)
        (upgradeRequest("/room"), "HTTP/1.1 101 Switching Protocols", false),
        (upgradeRequest("/room", extra: "X-Other: 1\r\n").replacingOccurrences(of: "Upgrade: websocket", with: "Upgrade: websocket, h2c")
            .replacingOccurrences(of: "Connection: Upgrade", with: "Connection: keep-alive, Upgrade"), "HTTP/1.1 101 Switching Protocols", false),
        (upgradeRequest("/room", version: "HTTP/1.0"), "HTTP/1.0 400 Bad Request", true),
        (upgradeRequest("/room").replacingOccurrences(of: "Host: staps.test\r\n", with: ""), "HTTP/1.1 400 Bad Request", true),
        (upgradeRequest("/room", extra: "Host: other\r\n"), "HTTP/1.1 400 Bad Request", true),
        // A refused upgrade closes: NIO's parser reads nothing after an upgrade request.
        (upgradeRequest("/room").replacingOccurrences(of: "Version: 13", with: "Version: 8"), "HTTP/1.1 426 Upgrade Required", true),
        (upgradeRequest("/room", extra: "Sec-WebSocket-Version: 13\r\n"), "HTTP/1.1 426 Upgrade Required", true),
        (upgradeRequest("/room", key: "dGhlIHNhbXBsZSBub25jZQ"), "HTTP/1.1 400 Bad Request", true),
        (upgradeRequest("/room", key: "dGhlIHNhbXBsZSBub25j!Q=="), "HTTP/1.1 400 Bad Request", true),
        (upgradeRequest("/room", key: "dGhlIHNhbXBsZSBub25jZR=="), "HTTP/1.1 400 Bad Request", true),  // padding bits set
        (upgradeRequest("/room", extra: "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n"), "HTTP/1.1 400 Bad Request", true),
        (upgradeRequest("/room", extra: "Content-Length: 5\r\n") + "hello", "HTTP/1.1 400 Bad Request", true),
        (upgradeRequest("/"), "HTTP/1.1 400 Bad Request", true),
        ("GET /room HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n", "HTTP/1.1 200 OK", true),
        ("CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 400 Bad Request", true),
        ("POST /room HTTP/1.1\r\nHost: x\r\nContent-Length: 9223372036854775808\r\n\r\n", "HTTP/1.1 413 Payload Too Large", true),
        ("POST /room HTTP/1.1\r\nHost: x\r\nContent-Length: 1048577\r\n\r\n", "HTTP/1.1 413 Payload Too Large", true),
        ("PUT /room HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 405 Method Not Allowed", false),
        ("PUT /room HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n", "HTTP/1.1 405 Method Not Allowed", true),
        ("GET /room HTTP/1.1\r\nHost: x\r\nX-Big: \(String(repeating: "a", count: 9000))\r\n\r\n", "HTTP/1.1 431 Request Header Fields Too Large", true),
        ("GET /room HTTP/1.1\r\nHost: x\r\n" + (0..<101).map { "X-\($0): 1\r\n" }.joined() + "\r\n", "HTTP/1.1 431 Request Header Fields Too Large", true),
        ("GET /room?\(String(repeating: "q", count: 9000)) HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 414 URI Too Long", true),
        ("\u{16}\u{03}\u{01}\u{02}\u{00}\u{01}\u{00}\u{01}\u{fc}\u{03}\u{03}\r\n\r\n", "HTTP/1.1 400 Bad Request", true),
    ])
    func everyBadRequestGetsItsStatus(request: String, status: String, closes: Bool) throws {
        let node = InMemoryNode()
        let c = try node.connect()
        try node.send(c, request)
        let out = try node.output(c)
        #expect(statusLines(out).first == status, "\(out.prefix(300))")
        #expect(c.isActive == !closes)
        if status.contains("426") { #expect(out.contains("Sec-WebSocket-Version: 13\r\n")) }
        if status.contains("405") { #expect(out.contains("Allow: GET, HEAD, POST\r\n")) }
    }

    @Test func nothingIsHandledAfterAResponseThatCloses() throws {
        let node = InMemoryNode()
        let receiver = try node.websocket("/room")
        let c = try node.connect()
        try node.send(c, "GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
            + "POST /room HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 3\r\n\r\none"
            + "POST /room HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\ntwo")
        let out = try node.output(c)
        #expect(statusLines(out) == ["HTTP/1.1 200 OK", "HTTP/1.1 202 Accepted"], "\(out)")
        #expect(try node.outputBytes(receiver) == [0x82, 3] + Array("one".utf8))
        #expect(!c.isActive)
    }

    @Test func originAndPostTokenAreChecked() throws {
        let access = AccessSettings(origins: [OriginPattern("https://app.example.com")!, OriginPattern("https://*.example.org")!], postToken: "0123456789abcdef")
        let node = InMemoryNode(access: access)
        func status(_ request: String) throws -> (String, String) {
            let c = try node.connect()
            try node.send(c, request)
            let out = try node.output(c)
            return (statusLines(out).first ?? "nothing", out)
        }
        #expect(try status(upgradeRequest("/room", extra: "Origin: https://app.example.com\r\n")).0 == "HTTP/1.1 101 Switching Protocols")
        #expect(try status(upgradeRequest("/room", extra: "Origin: https://x.example.org\r\n")).0 == "HTTP/1.1 101 Switching Protocols")
        #expect(try status(upgradeRequest("/room")).0 == "HTTP/1.1 101 Switching Protocols")  // no Origin: not a browser
        let (refused, body) = try status(upgradeRequest("/room", extra: "Origin: https://evil.example\r\n"))
        #expect(refused == "HTTP/1.1 403 Forbidden" && body.hasSuffix("origin https://evil.example is not allowed\n"))
        let post = "POST /room HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        let (unauthorized, head) = try status(post + "\r\nhi")
        #expect(unauthorized == "HTTP/1.1 401 Unauthorized" && head.contains("WWW-Authenticate: Bearer realm=\"staps\"\r\n"))
        #expect(try status(post + "Authorization: Bearer wrong-token-0000\r\n\r\nhi").0 == "HTTP/1.1 401 Unauthorized")
        #expect(try status(post + "Authorization: Bearer 0123456789abcdef\r\n\r\nhi").0 == "HTTP/1.1 202 Accepted")
        #expect(try status(post + "Origin: https://evil.example\r\nAuthorization: Bearer 0123456789abcdef\r\n\r\nhi").0 == "HTTP/1.1 403 Forbidden")
        var required = access
        required.originRequired = true
        let strict = InMemoryNode(access: required)
        let c = try strict.connect()
        try strict.send(c, upgradeRequest("/room"))
        #expect(statusLines(try strict.output(c)) == ["HTTP/1.1 403 Forbidden"])
    }

    /// A response's head as (name, value) pairs, and its body.
    static func headersAndBody(_ response: String) -> ([(String, String)], String) {
        guard let split = response.range(of: "\r\n\r\n") else { return ([], response) }
        let lines = response[..<split.lowerBound].components(separatedBy: "\r\n").dropFirst()
        let headers = lines.compactMap { line -> (String, String)? in
            guard let colon = line.firstIndex(of: ":") else { return nil }
            return (line[..<colon].lowercased(), line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces))
        }
        return (headers, String(response[split.upperBound...]))
    }

    @Test func thePageComesWithItsPolicyAndEscapesWhatTheRequestSays() throws {
        let node = InMemoryNode()
        func get(_ request: String) throws -> (status: String, headers: [String: String], body: String) {
            let c = try node.connect()
            try node.send(c, request)
            let out = try node.output(c)
            let (pairs, body) = Self.headersAndBody(out)
            return (statusLines(out).first ?? "nothing", Dictionary(pairs, uniquingKeysWith: { $0 + ", " + $1 }), body)
        }
        let page = try get("GET /room HTTP/1.1\r\nHost: staps.test:8080\r\n\r\n")
        #expect(page.status == "HTTP/1.1 200 OK")
        let csp = try #require(page.headers["content-security-policy"])
        let nonce = try #require(csp.firstMatch(of: /script-src 'nonce-([A-Za-z0-9+\/]{22}==)'/)?.1)
        #expect(csp == "default-src 'none'; script-src 'nonce-\(nonce)'; style-src 'nonce-\(nonce)'; connect-src ws://staps.test:8080; img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        #expect(page.headers["x-content-type-options"] == "nosniff")
        #expect(page.headers["referrer-policy"] == "no-referrer")
        // One script and one style, each with this response's nonce; nothing else runs or styles.
        #expect(page.body.components(separatedBy: "<script").count == 2 && page.body.contains("<script nonce=\"\(nonce)\">"))
        #expect(page.body.components(separatedBy: "<style").count == 2 && page.body.contains("<style nonce=\"\(nonce)\">"))
        #expect(!page.body.contains(" style=") && page.body.firstMatch(of: /\ on[a-z]+=/) == nil, "inline styles or handlers need 'unsafe-inline'")
        #expect(page.body.contains("data-channel-url=\"ws://staps.test:8080/room\""))

        // Every response its own nonce; HEAD gets the same headers and no body.
        let head = try get("HEAD /room HTTP/1.1\r\nHost: staps.test:8080\r\n\r\n")
        let headCSP = try #require(head.headers["content-security-policy"])
        #expect(headCSP != csp && headCSP.hasPrefix("default-src 'none'; script-src 'nonce-") && head.body.isEmpty)
        #expect(head.headers["x-content-type-options"] == "nosniff" && head.headers["referrer-policy"] == "no-referrer")
        // "/" opens no websocket: no connect-src at all.
        let root = try get("GET / HTTP/1.1\r\nHost: staps.test\r\n\r\n")
        #expect(root.headers["content-security-policy"].map { !$0.contains("connect-src") && $0.contains("frame-ancestors 'none'") } == true)
        #expect(!root.body.contains("data-channel-url"))
        // Behind a proxy: wss and the forwarded host, in the policy as in the page.
        let proxied = try get("GET /room HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: pubsub.example\r\n\r\n")
        #expect(proxied.headers["content-security-policy"]?.contains("; connect-src wss://pubsub.example; ") == true)
        #expect(proxied.body.contains("data-channel-url=\"wss://pubsub.example/room\""))

        // A hostile path, percent-encoded and raw: escaped in the title, percent-encoded in the URLs.
        for path in ["/%22%3E%3Cscript%3Ealert(1)%3C/script%3E'", "/\"><script>alert(1)</script>'"] {
            let hostile = try get("GET \(path) HTTP/1.1\r\nHost: staps.test\r\n\r\n")
            #expect(hostile.status == "HTTP/1.1 200 OK", "\(path)")
            #expect(hostile.body.components(separatedBy: "<script").count == 2, "\(path): \(hostile.body)")
            #expect(hostile.body.contains("<title>staps: &quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;&#39;</title>"), "\(path)")
            #expect(hostile.body.contains("data-channel-url=\"ws://staps.test/%22%3E%3Cscript%3Ealert%281%29%3C/script%3E%27\""), "\(path)")
        }
        // A hostile host: escaped in the page, and never in the policy (then 'self').
        for (header, value) in [("Host", "x\"><script>alert(1)</script>"), ("X-Forwarded-Host", "a.example; script-src *")] {
            let request = header == "Host" ? "GET /room HTTP/1.1\r\nHost: \(value)\r\n\r\n" : "GET /room HTTP/1.1\r\nHost: staps.test\r\n\(header): \(value)\r\n\r\n"
            let hostile = try get(request)
            let policy = try #require(hostile.headers["content-security-policy"])
            #expect(policy.contains("; connect-src 'self'; ") && policy.components(separatedBy: "script-src").count == 2, "\(policy)")
            #expect(hostile.body.components(separatedBy: "<script").count == 2, "\(value)")
            #expect(hostile.body.contains("data-base=\"ws://\(Page.escape(value))\""), "\(value)")
        }

        // The policy is the page's: other answers have none.
        let receiver = try node.websocket("/room")
        let post = try get("POST /room HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        let refused = try get("DELETE /room HTTP/1.1\r\nHost: x\r\n\r\n")
        #expect(post.status == "HTTP/1.1 202 Accepted" && refused.status == "HTTP/1.1 405 Method Not Allowed")
        #expect(post.headers["content-security-policy"] == nil && refused.headers["content-security-policy"] == nil)
        _ = try node.outputBytes(receiver)
    }

    @Test(arguments: [
        ("staps.test", true), ("127.0.0.1:8080", true), ("[::1]:26951", true), ("[2001:db8::1]", true),
        ("a-b.example:443", true), ("LOCALHOST", true),
        ("", false), (":80", false), ("a b", false), ("a;b", false), ("x\"", false), ("[::1", false), ("[]", false),
        ("[::1]x", false), ("host:", false), ("host:123456", false), ("host:8a", false), ("a.example; script-src *", false),
        ("évil.example", false), ("a,b", false), ("user@host", false), ("*.example", false),
    ])
    func onlyAPlainHostGoesIntoThePolicy(authority: String, valid: Bool) {
        #expect(Page.isHost(authority) == valid)
    }

    @Test func aChunkedBodyIsRefusedAsSoonAsItIsTooLarge() throws {
        var limits = Limits()
        limits.maxMessageSize = 1000
        let node = InMemoryNode(limits: limits)
        let c = try node.connect()
        try node.send(c, "POST /room HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        try node.send(c, "258\r\n" + String(repeating: "a", count: 600) + "\r\n")
        #expect(try node.output(c).isEmpty)
        try node.send(c, "258\r\n" + String(repeating: "a", count: 600) + "\r\n")  // no terminating chunk: not needed
        #expect(statusLines(try node.output(c)) == ["HTTP/1.1 413 Payload Too Large"])
        #expect(!c.isActive)
    }

    @Test func oneDeadlineCoversHeadBodyAndTheNextRequest() throws {
        let node = InMemoryNode()
        // A body that never completes: closed at the deadline although the head came at once.
        let stalled = try node.connect()
        try node.send(stalled, "POST /room HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        node.loop.advanceTime(by: node.limits.handshakeTimeout - .milliseconds(1))
        #expect(stalled.isActive)
        node.loop.advanceTime(by: .milliseconds(2))
        #expect(!stalled.isActive)
        // A keep-alive connection gets a fresh deadline after each response.
        let keepAlive = try node.connect()
        let timeout = node.limits.handshakeTimeout.nanoseconds
        node.loop.advanceTime(by: .nanoseconds(timeout / 2))
        try node.send(keepAlive, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        node.loop.advanceTime(by: .nanoseconds(timeout * 3 / 4))
        #expect(keepAlive.isActive)
        node.loop.advanceTime(by: .nanoseconds(timeout / 2))
        #expect(!keepAlive.isActive)
    }

    @Test func postPublishesAndAnswers202() throws {
        let node = InMemoryNode()
        let receiver = try node.websocket("/room")
        let c = try node.connect()
        try node.send(c, "POST /room HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello")
        let out = try node.output(c)
        #expect(statusLines(out) == ["HTTP/1.1 202 Accepted"])
        #expect(out.hasSuffix("{\"channel\":\"room\",\"receivers\":1}\n"))
        #expect(try node.outputBytes(receiver) == [0x81, 5] + Array("hello".utf8))
    }
}

@Suite struct WebSocketInMemoryTests {
    func closeCode(_ bytes: [UInt8]) -> UInt16? {
        guard bytes.count >= 4, bytes[0] == 0x88 else { return nil }
        return UInt16(bytes[2]) << 8 | UInt16(bytes[3])
    }

    @Test func framesSentWithTheUpgradeAreRelayed() throws {
        let node = InMemoryNode()
        let receiver = try node.websocket("/room")
        let sender = try node.connect()
        try node.send(sender, Array(upgradeRequest("/room").utf8) + clientFrame(.text, Array("early".utf8)))
        #expect(try node.output(sender).hasPrefix("HTTP/1.1 101"))
        #expect(try node.outputBytes(receiver) == [0x81, 5] + Array("early".utf8))
    }

    @Test func invalidUTF8FailsFastAndReachesNoOne() throws {
        let node = InMemoryNode()
        let receiver = try node.websocket("/room")
        let sender = try node.websocket("/room")
        // The first fragment is already invalid: 1007 before the message would end.
        try node.send(sender, clientFrame(.text, Array("ok".utf8) + [0xF5], fin: false))
        #expect(closeCode(try node.outputBytes(sender)) == 1007)
        #expect(try node.outputBytes(receiver).isEmpty)
        try node.send(sender, clientFrame(.connectionClose, [0x03, 0xEF]))
        #expect(!sender.isActive)
    }

    @Test func after1009TheClientsCloseCompletesTheHandshake() throws {
        var limits = Limits()
        limits.maxMessageSize = 100
        let node = InMemoryNode(limits: limits)
        let sender = try node.websocket("/room")
        let big = clientFrame(.binary, Array(repeating: 1, count: 150))
        try node.send(sender, Array(big.prefix(20)))
        #expect(closeCode(try node.outputBytes(sender)) == 1009)
        #expect(sender.isActive)
        try node.send(sender, Array(big.dropFirst(20)) + clientFrame(.connectionClose, [0x03, 0xF1]))
        #expect(!sender.isActive)
    }

    @Test func aClientCloseIsEchoedAndAPingAnswered() throws {
        let node = InMemoryNode()
        let c = try node.websocket("/room")
        try node.send(c, clientFrame(.ping, Array("abc".utf8)))
        #expect(try node.outputBytes(c) == [0x8A, 3] + Array("abc".utf8))
        try node.send(c, clientFrame(.connectionClose, [0x0F, 0xA0] + Array("bye".utf8)))  // 4000
        #expect(closeCode(try node.outputBytes(c)) == 4000)
        #expect(!c.isActive)
    }

    @Test func aSilentClientIsPingedAndClosedWhenItsPongDoesNotCome() throws {
        var limits = Limits()
        limits.pingInterval = .seconds(30)
        limits.pongTimeout = .seconds(10)
        let node = InMemoryNode(limits: limits)
        let c = try node.websocket("/room")
        node.loop.advanceTime(by: .seconds(29))
        try node.send(c, clientFrame(.text, Array("hi".utf8)))  // silent from here on
        node.loop.advanceTime(by: .seconds(29))
        #expect(try node.outputBytes(c).isEmpty)
        node.loop.advanceTime(by: .seconds(1))
        #expect(try node.outputBytes(c) == [0x89, 0])  // 30 s of silence: a ping
        try node.send(c, clientFrame(.pong, []))
        node.loop.advanceTime(by: .seconds(29))
        #expect(try node.outputBytes(c).isEmpty)  // answered: no close, and no ping yet
        node.loop.advanceTime(by: .seconds(1))
        #expect(try node.outputBytes(c) == [0x89, 0])
        node.loop.advanceTime(by: .seconds(9))
        #expect(try node.outputBytes(c).isEmpty)
        node.loop.advanceTime(by: .seconds(1))
        #expect(closeCode(try node.outputBytes(c)) == 1001)  // no pong within the pong timeout
    }

    @Test func aBrokenCloseFrameGets1002AndTheConnectionDropsAtOnce() throws {
        let node = InMemoryNode()
        let c = try node.websocket("/room")
        try node.send(c, clientFrame(.connectionClose, [0x03, 0xE8] + Array(repeating: 0x61, count: 124)))
        #expect(closeCode(try node.outputBytes(c)) == 1002)
        #expect(!c.isActive)
    }

    @Test func aCloseTheClientNeverAnswersIsDroppedAfterTheTimeout() throws {
        let node = InMemoryNode()
        let c = try node.websocket("/room")
        try node.send(c, clientFrame(.connectionClose, [], fin: false))  // fragmented control frame: 1002
        #expect(closeCode(try node.outputBytes(c)) == 1002)
        node.loop.advanceTime(by: node.limits.shutdownTimeout + .milliseconds(1))
        #expect(!c.isActive)
    }
}
