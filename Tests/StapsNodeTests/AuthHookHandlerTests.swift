import NIOConcurrencyHelpers
import NIOCore
import NIOEmbedded
import NIOHTTP1
@testable import StapsNode
import Testing

/// A hook the test answers by hand, on the in-memory node's loop.
final class ScriptedHook: HookTransport {
    struct Call {
        var headers: HTTPHeaders
        var timeout: TimeAmount
        var promise: EventLoopPromise<HookDecision>
        var cancelled = false
    }
    private let box = NIOLockedValueBox<[Call]>([])

    var calls: [Call] { self.box.withLockedValue { $0 } }

    func call(headers: HTTPHeaders, timeout: TimeAmount, on eventLoop: EventLoop) -> (EventLoopFuture<HookDecision>, cancel: @Sendable () -> Void) {
        let promise = eventLoop.makePromise(of: HookDecision.self)
        let index = self.box.withLockedValue { calls -> Int in
            calls.append(Call(headers: headers, timeout: timeout, promise: promise))
            return calls.count - 1
        }
        return (promise.futureResult, { [box] in
            // As AsyncHTTPClient does: a cancelled call still completes.
            box.withLockedValue { $0[index].cancelled = true }
            promise.succeed(.unavailable(HookFailure(.unreachable, "cancelled")))
        })
    }

    /// Answers call `index` (ignored if it was cancelled: its future is complete).
    func answer(_ index: Int, _ decision: HookDecision) {
        let call = self.box.withLockedValue { $0[index] }
        if !call.cancelled { call.promise.succeed(decision) }
    }

    func shutdown() async {}
}

/// The HTTP handler's side of the hook, in memory: what is read while it decides, what each
/// decision answers, and how its timeout and the request's deadline meet.
@Suite struct AuthHookHandlerTests {
    static func node(timeout: TimeAmount = .seconds(5), concurrency: Int = 64, limits: Limits = Limits()) -> (InMemoryNode, ScriptedHook) {
        let hook = ScriptedHook()
        let access = AccessSettings(hook: HookSettings(url: HookURL(target: .tcp(host: "127.0.0.1", port: 9), uri: "/check"), timeout: timeout, concurrency: concurrency))
        return (InMemoryNode(limits: limits, access: access, hook: hook), hook)
    }

    /// A websocket admitted by the hook with `permission`.
    static func websocket(_ node: InMemoryNode, _ hook: ScriptedHook, _ path: String, _ permission: Permission = .both) throws -> EmbeddedChannel {
        let c = try node.connect()
        try node.send(c, upgradeRequest(path))
        hook.answer(hook.calls.count - 1, .admit(permission))
        #expect(try node.output(c).hasPrefix("HTTP/1.1 101 Switching Protocols\r\n"))
        return c
    }

    @Test func theHookIsAskedAfterEveryOtherCheckAndGetsTheClientsHeaders() throws {
        let (node, hook) = Self.node()
        let refused = try node.connect()
        try node.send(refused, upgradeRequest("/room", key: "short"))
        #expect(statusLines(try node.output(refused)) == ["HTTP/1.1 400 Bad Request"])
        #expect(hook.calls.isEmpty, "a request refused anyway is not asked about")

        let c = try node.connect()
        try node.send(c, upgradeRequest("/r%C3%A4ume?x=1", extra: "Authorization: Bearer t\r\nCookie: s=1\r\nX-Forwarded-For: 203.0.113.9\r\n"))
        #expect(try node.output(c).isEmpty, "no answer before the hook's")
        let headers = try #require(hook.calls.first).headers
        #expect(headers["Authorization"] == ["Bearer t"] && headers["Cookie"] == ["s=1"])
        #expect(headers["X-Original-URI"] == ["/r%C3%A4ume?x=1"] && headers["X-Original-Method"] == ["GET"])
        #expect(headers["X-Staps-Channel"] == ["r%C3%A4ume"])
        #expect(headers["X-Forwarded-For"] == ["203.0.113.9, 127.0.0.1"])
        #expect(node.hub.directory.count == 0, "not joined while the hook decides")
        hook.answer(0, .admit(.both))
        #expect(try node.output(c).hasPrefix("HTTP/1.1 101"))
        #expect(node.hub.directory.lookup("räume")?.1 == 1)
        #expect(node.counters.authAdmitted.load(ordering: .relaxed) == 1)
    }

    @Test func refusalsAndFailuresGetTheirStatusesAndAreCounted() throws {
        let (node, hook) = Self.node()
        func refusedUpgrade(_ decision: HookDecision) throws -> String {
            let c = try node.connect()
            try node.send(c, upgradeRequest("/room"))
            hook.answer(hook.calls.count - 1, decision)
            let out = try node.output(c)
            #expect(!c.isActive, "a refused upgrade closes")
            return out
        }
        let unauthorized = try refusedUpgrade(.passOn(status: 401, wwwAuthenticate: ["Bearer realm=\"app\"", "Basic"]))
        #expect(statusLines(unauthorized) == ["HTTP/1.1 401 Unauthorized"])
        #expect(unauthorized.contains("WWW-Authenticate: Bearer realm=\"app\"\r\nWWW-Authenticate: Basic\r\n") && unauthorized.hasSuffix("authorization required\n"))
        #expect(statusLines(try refusedUpgrade(.passOn(status: 403, wwwAuthenticate: []))) == ["HTTP/1.1 403 Forbidden"])
        let failed = try refusedUpgrade(.unavailable(HookFailure(.errorStatus, "authorization hook answered 500")))
        #expect(statusLines(failed) == ["HTTP/1.1 503 Service Unavailable"] && failed.hasSuffix("\r\n\r\nauthorization hook answered 500\n"))
        #expect(node.counters.authDenied.load(ordering: .relaxed) == 2)
        #expect(node.counters.authFailedStatus.load(ordering: .relaxed) == 1)
        #expect(node.counters.authAdmitted.load(ordering: .relaxed) == 0)
        #expect(node.hub.directory.count == 0)
    }

    @Test func theHookTimeoutAnswers503AndALateAnswerIsIgnored() throws {
        let (node, hook) = Self.node(timeout: .milliseconds(500))
        let c = try node.connect()
        try node.send(c, upgradeRequest("/room"))
        #expect(hook.calls.first?.timeout == .milliseconds(500))
        node.loop.advanceTime(by: .milliseconds(499))
        #expect(try node.output(c).isEmpty && c.isActive)
        node.loop.advanceTime(by: .milliseconds(1))
        let out = try node.output(c)
        #expect(statusLines(out) == ["HTTP/1.1 503 Service Unavailable"] && out.hasSuffix("authorization hook did not answer within 500 ms\n"), "\(out)")
        #expect(!c.isActive)
        #expect(hook.calls.first?.cancelled == true)
        #expect(node.shared.authorizer?.callsInFlight == 0)
        #expect(node.counters.authFailedTimeout.load(ordering: .relaxed) == 1)
        hook.answer(0, .admit(.both))
        #expect(node.hub.directory.count == 0 && node.counters.authAdmitted.load(ordering: .relaxed) == 0)
    }

    /// The request's deadline (`handshake_timeout`, from accept) bounds the hook too: the hook
    /// gets what is left of it when that is less than `auth_timeout`, and the client gets 503
    /// (the hook's failure), not 408, when it passes.
    @Test func theRequestDeadlineStillBoundsAConnectionWaitingForTheHook() throws {
        var limits = Limits()
        limits.handshakeTimeout = .seconds(2)
        let (node, hook) = Self.node(timeout: .seconds(5), limits: limits)
        let c = try node.connect()
        node.loop.advanceTime(by: .milliseconds(500))
        try node.send(c, upgradeRequest("/room"))
        #expect(hook.calls.first?.timeout == .milliseconds(1500), "what is left of the request's deadline")
        node.loop.advanceTime(by: .milliseconds(1499))
        #expect(try node.output(c).isEmpty && c.isActive)
        node.loop.advanceTime(by: .milliseconds(1))
        let out = try node.output(c)
        #expect(statusLines(out) == ["HTTP/1.1 503 Service Unavailable"] && out.hasSuffix("authorization hook did not answer within 1500 ms\n"), "\(out)")
        #expect(!c.isActive && hook.calls.first?.cancelled == true)
        #expect(node.counters.authFailedTimeout.load(ordering: .relaxed) == 1)

        // An answer in time leaves the rest of the request under the same deadline: a POST
        // body that never completes is still cut off at it.
        let post = try node.connect()
        try node.send(post, "POST /room HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        node.loop.advanceTime(by: .milliseconds(300))
        hook.answer(1, .admit(.both))
        node.loop.advanceTime(by: .milliseconds(1699))
        #expect(post.isActive)
        node.loop.advanceTime(by: .milliseconds(1))
        #expect(statusLines(try node.output(post)) == ["HTTP/1.1 408 Request Timeout"] && !post.isActive)
    }

    @Test func nothingOfAPostIsUsedBeforeTheHookAdmitsIt() throws {
        let (node, hook) = Self.node()
        let receiver = try Self.websocket(node, hook, "/room")
        let c = try node.connect()
        try node.send(c, "POST /room HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhel")
        try node.send(c, "lo")
        #expect(try node.output(c).isEmpty)
        #expect(hook.calls.count == 2 && hook.calls[1].headers["X-Original-Method"] == ["POST"])
        hook.answer(1, .admit(.publish))
        let out = try node.output(c)
        #expect(statusLines(out) == ["HTTP/1.1 202 Accepted"] && out.hasSuffix("{\"channel\":\"room\",\"receivers\":1}\n"))
        #expect(try node.outputBytes(receiver) == [0x81, 5] + Array("hello".utf8))
        #expect(c.isActive, "keep-alive goes on after an admitted POST")
    }

    @Test func aRefusedPostsBodyIsNeverReadOrPublished() throws {
        let (node, hook) = Self.node()
        let receiver = try Self.websocket(node, hook, "/room")
        for (decision, status) in [
            (HookDecision.passOn(status: 401, wwwAuthenticate: ["Bearer"]), "HTTP/1.1 401 Unauthorized"),
            (.admit(.subscribe), "HTTP/1.1 403 Forbidden"),
            (.unavailable(HookFailure(.unreachable, "authorization hook unreachable")), "HTTP/1.1 503 Service Unavailable"),
        ] {
            let c = try node.connect()
            try node.send(c, "POST /room HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
            hook.answer(hook.calls.count - 1, decision)
            let out = try node.output(c)
            #expect(statusLines(out) == [status], "\(out)")
            #expect(out.contains("Connection: close\r\n") && !c.isActive, "a body that is not read closes the connection")
            if case .admit = decision { #expect(out.hasSuffix("this client may only subscribe (X-Staps-Allow: subscribe)\n")) }
        }
        #expect(try node.outputBytes(receiver).isEmpty)
        // A bodiless POST refused keeps its connection (it is answered at its end).
        let c = try node.connect()
        try node.send(c, "POST /room HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        hook.answer(hook.calls.count - 1, .passOn(status: 403, wwwAuthenticate: []))
        #expect(statusLines(try node.output(c)) == ["HTTP/1.1 403 Forbidden"] && c.isActive)
    }

    @Test func aClientThatLeavesGivesItsSlotBackAndJoinsNothing() throws {
        let (node, hook) = Self.node(concurrency: 1)
        let c = try node.connect()
        try node.send(c, upgradeRequest("/room"))
        #expect(node.shared.authorizer?.callsInFlight == 1)
        try c.close().wait()
        #expect(hook.calls.first?.cancelled == true)
        #expect(node.shared.authorizer?.callsInFlight == 0)
        hook.answer(0, .admit(.both))
        #expect(node.hub.directory.count == 0)
        #expect(node.counters.authAdmitted.load(ordering: .relaxed) == 0 && node.counters.authFailedTimeout.load(ordering: .relaxed) == 0)
        // The slot is free again.
        _ = try Self.websocket(node, hook, "/room")
    }

    @Test func atShutdownAPendingUpgradeGets503AndAPendingPostIsStillAnswered() throws {
        let (node, hook) = Self.node()
        let upgrade = try node.connect()
        try node.send(upgrade, upgradeRequest("/room"))
        let post = try node.connect()
        try node.send(post, "POST /room HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        for c in [upgrade, post] { c.pipeline.fireUserInboundEventTriggered(ChannelShouldQuiesceEvent()) }
        node.loop.run()
        let refused = try node.output(upgrade)
        #expect(statusLines(refused) == ["HTTP/1.1 503 Service Unavailable"] && refused.hasSuffix("server shutting down\n"), "\(refused)")
        #expect(!upgrade.isActive && hook.calls[0].cancelled && node.hub.directory.count == 0)
        #expect(post.isActive && !hook.calls[1].cancelled)
        hook.answer(1, .admit(.both))
        let out = try node.output(post)
        #expect(statusLines(out) == ["HTTP/1.1 202 Accepted"] && out.contains("Connection: close\r\n"), "\(out)")
        #expect(node.shared.authorizer?.callsInFlight == 0)
    }

    @Test func aHookURLWithoutAClientRefusesInsteadOfAdmitting() throws {
        let access = AccessSettings(hook: HookSettings(url: HookURL(target: .tcp(host: "127.0.0.1", port: 9), uri: "/check")))
        let node = InMemoryNode(access: access)
        let c = try node.connect()
        try node.send(c, upgradeRequest("/room"))
        let out = try node.output(c)
        #expect(statusLines(out) == ["HTTP/1.1 503 Service Unavailable"] && out.hasSuffix("authorization hook not available\n"), "\(out)")
        #expect(node.hub.directory.count == 0)
    }

    @Test func pastTheConcurrencyBoundIs503AtOnce() throws {
        let (node, hook) = Self.node(concurrency: 2)
        let pending = try (0..<2).map { _ in
            let c = try node.connect()
            try node.send(c, upgradeRequest("/room"))
            return c
        }
        let third = try node.connect()
        try node.send(third, upgradeRequest("/room"))
        let out = try node.output(third)
        #expect(statusLines(out) == ["HTTP/1.1 503 Service Unavailable"] && out.hasSuffix("too many authorization checks in flight, try again later\n"))
        #expect(hook.calls.count == 2, "the third never reached the hook")
        #expect(node.counters.authFailedOverConcurrency.load(ordering: .relaxed) == 1)
        hook.answer(0, .admit(.both))
        #expect(try node.output(pending[0]).hasPrefix("HTTP/1.1 101"))
        let fourth = try node.connect()
        try node.send(fourth, upgradeRequest("/room"))
        #expect(hook.calls.count == 3, "an answered call frees its slot")
    }

    @Test func subscribeOnlyMessagesAreDroppedAndCountedAndPublishOnlyReceivesNothing() throws {
        let (node, hook) = Self.node()
        let full = try Self.websocket(node, hook, "/room")
        let reader = try Self.websocket(node, hook, "/room", .subscribe)
        let writer = try Self.websocket(node, hook, "/room", .publish)
        try node.send(reader, clientFrame(.text, Array("from reader".utf8)))
        #expect(try node.outputBytes(full).isEmpty && node.outputBytes(writer).isEmpty)
        #expect(node.hub.loops[0].counters.droppedSubscribeOnly.load(ordering: .relaxed) == 1)
        #expect(reader.isActive, "the connection stays open")
        try node.send(writer, clientFrame(.text, Array("w".utf8)))
        #expect(try node.outputBytes(full) == [0x81, 1, 0x77] && node.outputBytes(reader) == [0x81, 1, 0x77])
        try node.send(full, clientFrame(.binary, [1, 2]))
        #expect(try node.outputBytes(reader) == [0x82, 2, 1, 2])
        #expect(try node.outputBytes(writer).isEmpty, "publish-only receives nothing")
        #expect(node.hub.directory.lookup("room")?.1 == 3, "all three are the channel's clients")
        #expect(node.hub.messagesReceived.websocket == 2)
        // The state machine still judges what a subscribe-only client sends.
        try node.send(reader, clientFrame(.text, [0xFF]))
        let closing = try node.outputBytes(reader)
        #expect(closing.count >= 4 && closing[0] == 0x88 && closing[2] == 0x03 && closing[3] == 0xEF, "1007")
    }
}
