@testable import StapsNode
import Testing

@Suite struct AccessTests {
    @Test func originsMatchExactlyOrAsSubdomains() throws {
        let exact = try #require(OriginPattern("https://App.Example.com"))
        #expect(exact.matches("https://app.example.com"))
        #expect(exact.matches("https://app.example.com:443"))
        #expect(!exact.matches("http://app.example.com"))
        #expect(!exact.matches("https://app.example.com:8443"))
        #expect(!exact.matches("https://evil-app.example.com"))
        #expect(!exact.matches("https://app.example.com.evil.net"))
        #expect(!exact.matches("null"))
        let wild = try #require(OriginPattern("https://*.example.org"))
        #expect(wild.matches("https://a.example.org") && wild.matches("https://a.b.example.org"))
        #expect(!wild.matches("https://example.org"))
        #expect(!wild.matches("https://badexample.org"))
        #expect(!wild.matches("https://a.example.org.evil.net"))
        let port = try #require(OriginPattern("http://localhost:3000"))
        #expect(port.matches("http://localhost:3000") && !port.matches("http://localhost"))
        for bad in ["app.example.com", "ftp://a.example", "https://", "https://*.", "https://a/b", "https://a:0", "https://a b", "https://a.*.b"] {
            #expect(OriginPattern(bad) == nil, "\(bad)")
        }
    }

    @Test func refusalsNameTheReason() throws {
        let open = AccessSettings()
        #expect(open.refusal(origin: ["https://anything.example"]) == nil && open.refusal(origin: []) == nil)
        let list = AccessSettings(origins: [try #require(OriginPattern("https://app.example.com"))])
        #expect(list.refusal(origin: ["https://app.example.com"]) == nil)
        #expect(list.refusal(origin: []) == nil)  // non-browser clients pass
        #expect(list.refusal(origin: ["https://evil.example"]) == "origin https://evil.example is not allowed")
        #expect(list.refusal(origin: ["https://app.example.com", "https://app.example.com"]) == "more than one Origin header")
        var required = list
        required.originRequired = true
        #expect(required.refusal(origin: []) == "an Origin header is required")
    }

    @Test func thePostTokenIsABearerTokenComparedWhole() {
        let access = AccessSettings(postToken: "0123456789abcdef")
        #expect(access.admitsPost(authorization: ["Bearer 0123456789abcdef"]))
        #expect(access.admitsPost(authorization: ["bearer 0123456789abcdef"]))
        for bad in [[], ["Bearer 0123456789abcde"], ["Bearer 0123456789abcdefg"], ["Basic 0123456789abcdef"], ["0123456789abcdef"], ["Bearer "], ["Bearer 0123456789abcdef", "Bearer 0123456789abcdef"]] {
            #expect(!access.admitsPost(authorization: bad), "\(bad)")
        }
        #expect(AccessSettings().admitsPost(authorization: []))
        #expect(AccessSettings.constantTimeEqual(Array("abc".utf8), Array("abc".utf8)))
        #expect(!AccessSettings.constantTimeEqual(Array("abc".utf8), Array("abd".utf8)))
        #expect(!AccessSettings.constantTimeEqual([], Array("a".utf8)))
    }
}
