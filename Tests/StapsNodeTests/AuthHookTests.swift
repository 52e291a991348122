import NIOHTTP1
@testable import StapsNode
import Testing

/// The authorization hook's pure parts: its URL, the headers it is sent, and the reading of its answer.
@Suite struct AuthHookTests {
    @Test(arguments: [
        ("http://127.0.0.1:9000/check", HookURL.Target.tcp(host: "127.0.0.1", port: 9000), "/check", "http://127.0.0.1:9000/check"),
        ("HTTP://auth.internal/check?scope=staps", .tcp(host: "auth.internal", port: 80), "/check?scope=staps", "http://auth.internal/check?scope=staps"),
        ("http://localhost:8081", .tcp(host: "localhost", port: 8081), "/", "http://localhost:8081/"),
        ("http://localhost?x=1", .tcp(host: "localhost", port: 80), "/?x=1", "http://localhost/?x=1"),
        ("http://[::1]:9000/check", .tcp(host: "::1", port: 9000), "/check", "http://[::1]:9000/check"),
        ("http://unix:/run/staps/auth.sock:/check", .unix(path: "/run/staps/auth.sock"), "/check", "http://unix:/run/staps/auth.sock:/check"),
        ("http://unix:/run/staps/auth.sock", .unix(path: "/run/staps/auth.sock"), "/", "http://unix:/run/staps/auth.sock:/"),
    ])
    func urlsParse(text: String, target: HookURL.Target, uri: String, shown: String) throws {
        let url = try HookURL(text)
        #expect(url.target == target)
        #expect(url.uri == uri)
        #expect(url.description == shown)
        #expect(try HookURL(url.description) == url, "the description reads back")
        #expect(!url.logged.contains("scope"), "no query in logs")
    }

    @Test func badURLsAreRefused() {
        for bad in ["", "http://", "http:///check", "http://:80/", "http://a:b:c/", "http://[::1/", "http://h:99999/", "http://h: 1/",
                    "http://unix:", "http://unix::/check", "http://unix:/" + String(repeating: "a", count: 120) + ".sock:/check"] {
            #expect(throws: ValueParser.Failure.self, "\(bad)") { try HookURL(bad) }
        }
    }

    @Test(arguments: [
        (204, [], HookDecision.admit(.both)),
        (200, [("X-Staps-Allow", "subscribe")], .admit(.subscribe)),
        (204, [("x-staps-allow", " Publish ")], .admit(.publish)),
        (204, [("X-Staps-Allow", "both")], .admit(.both)),
        (204, [("X-Staps-Allow", "all")], .unavailable(HookFailure(.badAnswer, "authorization hook answered X-Staps-Allow: all, not subscribe, publish or both"))),
        (204, [("X-Staps-Allow", "subscribe"), ("X-Staps-Allow", "publish")], .unavailable(HookFailure(.badAnswer, "authorization hook answered more than one X-Staps-Allow"))),
        (401, [("WWW-Authenticate", "Bearer realm=\"app\""), ("WWW-Authenticate", "Basic")], .passOn(status: 401, wwwAuthenticate: ["Bearer realm=\"app\"", "Basic"])),
        (403, [("X-Staps-Allow", "both")], .passOn(status: 403, wwwAuthenticate: [])),
        (500, [], .unavailable(HookFailure(.errorStatus, "authorization hook answered 500"))),
        (302, [("Location", "/login")], .unavailable(HookFailure(.errorStatus, "authorization hook answered 302"))),
        (404, [], .unavailable(HookFailure(.errorStatus, "authorization hook answered 404"))),
        (429, [], .unavailable(HookFailure(.errorStatus, "authorization hook answered 429"))),
    ] as [(Int, [(String, String)], HookDecision)])
    func answersAreRead(status: Int, headers: [(String, String)], expected: HookDecision) {
        #expect(HookDecision.decide(status: status, headers: HTTPHeaders(headers)) == expected)
    }

    @Test func permissionsNarrowOneDirectionEach() {
        #expect(Permission.both.mayPublish && Permission.both.mayReceive)
        #expect(!Permission.subscribe.mayPublish && Permission.subscribe.mayReceive)
        #expect(Permission.publish.mayPublish && !Permission.publish.mayReceive)
    }

    @Test func theHookIsSentTheClientsCredentialsAndWhatItAskedFor() {
        let head = HTTPRequestHead(version: .http1_1, method: .GET, uri: "/r%C3%A4ume/1?token=x", headers: HTTPHeaders([
            ("Host", "staps.example"), ("Authorization", "Bearer abc"), ("Cookie", "a=1"), ("Cookie", "b=2"),
            ("Origin", "https://app.example"), ("X-Forwarded-For", "203.0.113.7, 10.0.0.2"), ("Sec-WebSocket-Key", "k"),
        ]))
        let headers = HookRequest.headers(for: head, channel: "räume/1", peerIP: "127.0.0.1")
        #expect(headers["Authorization"] == ["Bearer abc"])
        #expect(headers["Cookie"] == ["a=1", "b=2"])
        #expect(headers["Origin"] == ["https://app.example"])
        #expect(headers["X-Original-URI"] == ["/r%C3%A4ume/1?token=x"])
        #expect(headers["X-Original-Method"] == ["GET"])
        #expect(headers["X-Staps-Channel"] == ["r%C3%A4ume/1"])
        #expect(headers["X-Forwarded-For"] == ["203.0.113.7, 10.0.0.2, 127.0.0.1"])
        #expect(!headers.contains(name: "Host") && !headers.contains(name: "Sec-WebSocket-Key"), "nothing else of the client's")

        // A program on the unix socket, with nothing of its own: no X-Forwarded-For, no credentials.
        let bare = HookRequest.headers(for: HTTPRequestHead(version: .http1_1, method: .POST, uri: "/a b"), channel: "a b", peerIP: nil)
        #expect(bare.map(\.name) == ["X-Original-URI", "X-Original-Method", "X-Staps-Channel"])
        #expect(bare["X-Original-Method"] == ["POST"] && bare["X-Staps-Channel"] == ["a%20b"])
        // Behind nginx on the unix socket: nginx's X-Forwarded-For, as it came.
        let proxied = HTTPRequestHead(version: .http1_1, method: .GET, uri: "/a", headers: ["X-Forwarded-For": "198.51.100.1"])
        #expect(HookRequest.headers(for: proxied, channel: "a", peerIP: nil)["X-Forwarded-For"] == ["198.51.100.1"])
        // What AsyncHTTPClient would refuse to send is never sent.
        let odd = HTTPRequestHead(version: .http1_1, method: .GET, uri: "/a", headers: ["Cookie": "a=1\u{7F}\u{01}\tb"])
        #expect(HookRequest.headers(for: odd, channel: "a", peerIP: nil)["Cookie"] == ["a=1  \tb"])
    }
}
