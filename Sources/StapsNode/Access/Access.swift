/// Who may use a node from where: the `Origin` allowlist, the POST token and the authorization
/// hook. staps has no authentication of its own; these keep a foreign web page from using a
/// visitor's browser against the service, keep publishing over HTTP to those who hold the
/// token, and let the operator's own service decide the rest (`HookSettings`).
public struct AccessSettings: Sendable, Equatable {
    /// Origins a websocket handshake or POST may come from; empty: any.
    public var origins: [OriginPattern]
    /// Refuse requests without an `Origin` header (non-browser clients send none).
    public var originRequired: Bool
    /// POST needs `Authorization: Bearer <postToken>`; nil: no token needed.
    public var postToken: String?
    /// The authorization hook, asked after the checks above.
    public var hook: HookSettings

    public init(origins: [OriginPattern] = [], originRequired: Bool = false, postToken: String? = nil, hook: HookSettings = HookSettings()) {
        self.origins = origins
        self.originRequired = originRequired
        self.postToken = postToken
        self.hook = hook
    }

    /// Why a request with these `Origin` header values is refused (403), or nil to admit it.
    public func refusal(origin values: [String]) -> String? {
        guard !self.origins.isEmpty || self.originRequired else { return nil }
        guard let value = values.first else {
            return self.originRequired ? "an Origin header is required" : nil
        }
        guard values.count == 1 else { return "more than one Origin header" }
        guard self.origins.contains(where: { $0.matches(value) }) else {
            return "origin \(value.prefix(200)) is not allowed"
        }
        return nil
    }

    /// Whether an `Authorization` header carries the POST token (compared in constant time).
    public func admitsPost(authorization values: [String]) -> Bool {
        guard let token = self.postToken else { return true }
        guard values.count == 1, let value = values.first else { return false }
        let prefix = "bearer "
        guard value.count > prefix.count, value.prefix(prefix.count).lowercased() == prefix else { return false }
        return Self.constantTimeEqual(Array(value.utf8.dropFirst(prefix.utf8.count)), Array(token.utf8))
    }

    /// Equal bytes, in a time that depends on the lengths only.
    static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        var difference = UInt8(truncatingIfNeeded: a.count ^ b.count)
        for i in 0..<max(a.count, b.count) {
            difference |= (i < a.count ? a[i] : 0) ^ (i < b.count ? b[i] : 0)
        }
        return difference == 0 && a.count == b.count
    }
}

/// One entry of `origin`: `scheme://host[:port]`, or `scheme://*.domain` for any subdomain of
/// `domain` (not `domain` itself). Schemes and hosts compare without case; a default port
/// (80 for http, 443 for https) may be written or left out.
public struct OriginPattern: Sendable, Equatable, CustomStringConvertible {
    public let scheme: String
    /// The host, or for a wildcard the domain after `*.`.
    public let host: String
    public let wildcard: Bool
    public let port: Int

    public var description: String { "\(scheme)://\(wildcard ? "*." : "")\(host)\(port == Self.defaultPort(scheme) ? "" : ":\(port)")" }

    /// Parses a pattern; nil when it is not `http(s)://host[:port]` or `http(s)://*.domain[:port]`.
    public init?(_ text: String) {
        guard let (scheme, host, port) = Self.split(text, allowWildcard: true) else { return nil }
        self.scheme = scheme
        self.wildcard = host.hasPrefix("*.")
        self.host = self.wildcard ? String(host.dropFirst(2)) : host
        self.port = port
        guard !self.host.isEmpty, !self.host.contains("*") else { return nil }
    }

    /// Whether an `Origin` header value is this origin (or, for a wildcard, a subdomain of it).
    public func matches(_ origin: String) -> Bool {
        guard let (scheme, host, port) = Self.split(origin, allowWildcard: false) else { return false }
        guard scheme == self.scheme, port == self.port else { return false }
        return self.wildcard ? host.hasSuffix("." + self.host) : host == self.host
    }

    static func defaultPort(_ scheme: String) -> Int { scheme == "https" ? 443 : 80 }

    /// (scheme, host, port) of `scheme://host[:port]`, lower-cased; nil for anything else.
    private static func split(_ text: String, allowWildcard: Bool) -> (String, String, Int)? {
        let lower = text.lowercased()
        let scheme: String
        if lower.hasPrefix("https://") {
            scheme = "https"
        } else if lower.hasPrefix("http://") {
            scheme = "http"
        } else {
            return nil
        }
        var authority = String(lower.dropFirst(scheme.count + 3))
        var port = defaultPort(scheme)
        if let colon = authority.lastIndex(of: ":"), !authority.hasSuffix("]") {
            guard let p = Int(authority[authority.index(after: colon)...]), (1...65535).contains(p) else { return nil }
            port = p
            authority = String(authority[..<colon])
        }
        let allowed = Set("abcdefghijklmnopqrstuvwxyz0123456789-.[]:".utf8)
        let bytes = allowWildcard && authority.hasPrefix("*.") ? Array(authority.utf8.dropFirst(2)) : Array(authority.utf8)
        guard !bytes.isEmpty, bytes.allSatisfy(allowed.contains) else { return nil }
        return (scheme, authority, port)
    }
}
