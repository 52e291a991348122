import NIOHTTP1
@testable import StapsNode
import Testing

/// The HTTP side's decisions as pure values, without a connection: the order of pipelined
/// requests, what a request head asks for, and what the hook's answer means for a request.
@Suite struct HTTPDecisionTests {
    static func head(_ method: HTTPMethod = .GET, _ uri: String = "/room", _ headers: [(String, String)] = [("Host", "x")]) -> HTTPRequestHead {
        HTTPRequestHead(version: .http1_1, method: method, uri: uri, headers: HTTPHeaders(headers))
    }

    @Test func pipelinedRequestsWaitForTheResponseAndPastTheDepthTheConnectionEnds() {
        var pipelining = HTTPPipelining()
        let head = HTTPServerRequestPart.head(Self.head())
        let first = pipelining.received(head, waiting: false)
        #expect(first != nil, "nothing under way: handled at once")
        pipelining.requestStarted(Self.head())
        let keptOpen = pipelining.responseStarted(keepAlive: true)
        var handledAtOnce = 0
        for _ in 0..<(HTTPPipelining.depth + 5) {
            if pipelining.received(head, waiting: false) != nil { handledAtOnce += 1 }
            if pipelining.received(.end(nil), waiting: false) != nil { handledAtOnce += 1 }
        }
        let early = pipelining.nextHeld(waiting: false)
        let closesAfterResponse = pipelining.responseWritten(idle: true)
        #expect(keptOpen && handledAtOnce == 0 && early == nil && !closesAfterResponse, "held until the response is written")
        var released = 0
        while let part = pipelining.nextHeld(waiting: false) {
            if case .head = part { released += 1 }
        }
        #expect(released == HTTPPipelining.depth)
        #expect(pipelining.isDrained(waiting: false))
    }

    @Test func whatClosesTheConnection() {
        var connect = HTTPPipelining()
        connect.requestStarted(Self.head(.CONNECT, "x:443"))
        let connectKeptOpen = connect.responseStarted(keepAlive: true)
        let readAfter = connect.received(.head(Self.head()), waiting: false)
        #expect(!connectKeptOpen && readAfter == nil, "NIO's parser stops after CONNECT: its answer closes, nothing is read after it")

        var fresh = HTTPPipelining()
        let freshClosed = fresh.quiesce(idle: true)
        let freshKeptOpen = fresh.responseStarted(keepAlive: true)
        #expect(!freshClosed && !freshKeptOpen, "a connection not asked anything yet at shutdown waits for its request, answered with Connection: close")

        var kept = HTTPPipelining()
        _ = kept.responseStarted(keepAlive: true)
        _ = kept.responseWritten(idle: true)
        let keptClosed = kept.quiesce(idle: true)
        #expect(keptClosed, "idle between keep-alive requests: closed at once")
    }

    @Test func aRequestHeadIsRoutedWithoutIO() {
        let access = AccessSettings()
        func route(_ head: HTTPRequestHead) -> RequestRoute { RequestRoute.of(head, access: access, maxMessageSize: 100) }
        let upgradeHeaders = [("Host", "x"), ("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")]
        guard case .upgrade(let upgrade) = route(Self.head(.GET, "/r%C3%A4ume", upgradeHeaders)) else { Issue.record("not an upgrade"); return }
        #expect(upgrade.channel == "räume")
        #expect(upgrade.response(nodeID: "n").headers["Sec-WebSocket-Accept"] == ["s3pPLMBiTxaQ9kYGzzhZRbK+xOo="])
        guard case .post(let channel) = route(Self.head(.POST)), channel == "room" else { Issue.record("not a POST to room"); return }
        guard case .refuse(let tooLarge) = route(Self.head(.POST, "/room", [("Host", "x"), ("Content-Length", "101")])) else { Issue.record("not refused"); return }
        #expect(tooLarge.status == .payloadTooLarge && tooLarge.closes)
        guard case .refuse(let noHost) = route(Self.head(.GET, "/room", [])) else { Issue.record("not refused"); return }
        #expect(noHost.status == .badRequest && noHost.closes)
        guard case .refuse(let method) = route(Self.head(.PUT)) else { Issue.record("not refused"); return }
        #expect(method.status == .methodNotAllowed && !method.closes && method.extraHeaders.contains { $0 == ("Allow", "GET, HEAD, POST") })
    }

    @Test func aRefusedUpgradeAlwaysClosesARefusedPostOnlyWhenTheHookFailed() {
        let upgrade = HookedRequest.upgrade(WebSocketUpgrade(channel: "room", key: "dGhlIHNhbXBsZSBub25jZQ==", version: .http1_1))
        func refusal(_ request: HookedRequest, _ decision: HookDecision) -> Refusal? {
            guard case .refuse(let refusal) = request.outcome(of: decision) else { return nil }
            return refusal
        }
        let denied = HookDecision.passOn(status: 401, wwwAuthenticate: ["Bearer"])
        #expect(refusal(upgrade, denied).map { $0.status == .unauthorized && $0.closes } == true)
        #expect(refusal(.post, denied).map { $0.status == .unauthorized && !$0.closes && $0.extraHeaders.count == 1 } == true)
        #expect(refusal(.post, .admit(.subscribe))?.status == .forbidden)
        #expect(refusal(.post, .unavailable(HookFailure(.timeout, "late"))).map { $0.status == .serviceUnavailable && $0.closes } == true)
        guard case .receiveBody = HookedRequest.post.outcome(of: .admit(.publish)) else { Issue.record("a publisher's POST is read"); return }
        guard case .upgrade(_, .subscribe) = upgrade.outcome(of: .admit(.subscribe)) else { Issue.record("admitted as subscriber"); return }
    }
}
