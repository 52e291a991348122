import NIOCore
import NIOHTTP1
import StapsCluster

// The authorization hook's pure parts: its settings, its URL, the headers it is sent and the
// reading of its answer. `Authorizer` bounds and counts the calls; `HTTPHookTransport`
// (module StapsHook) makes them.

/// The authorization hook (`auth_url`, `auth_timeout`, `auth_concurrency`): before a websocket
/// handshake or a POST is accepted, staps asks an HTTP service of the operator's, as nginx's
/// `auth_request` does.
///
/// The `init` defaults are the documented defaults (see `staps.conf`).
public struct HookSettings: Sendable, Equatable {
    /// Where to ask; nil: no hook, every request that passes the other checks is admitted.
    public var url: HookURL?
    /// How long the hook has to answer (bounded also by the request's own deadline).
    public var timeout: TimeAmount
    /// Calls to the hook in flight at once, node-wide; one more gets 503 at once.
    public var concurrency: Int

    public init(url: HookURL? = nil, timeout: TimeAmount = .seconds(5), concurrency: Int = 64) {
        self.url = url
        self.timeout = timeout
        self.concurrency = concurrency
    }
}

/// `auth_url`: `http://host[:port][/path][?query]`, or a unix socket in nginx's spelling,
/// `http://unix:/path/to.sock[:/path[?query]]` (the socket path ends at the first `:`).
/// No credentials, no fragment, no https (run the hook on loopback or a unix socket).
public struct HookURL: Sendable, Equatable, CustomStringConvertible {
    public enum Target: Sendable, Equatable {
        case tcp(host: String, port: Int)
        case unix(path: String)
    }

    public let target: Target
    /// The request target sent to the hook: a path (at least `/`) and any query.
    public let uri: String

    public var description: String {
        switch self.target {
        case .tcp(let host, let port):
            let shown = host.contains(":") ? "[\(host)]" : host
            return "http://\(shown)\(port == 80 ? "" : ":\(port)")\(self.uri)"
        case .unix(let path):
            return "http://unix:\(path):\(self.uri)"
        }
    }

    /// The URL for logs: its query (which may hold a key) left out.
    public var logged: String {
        guard let query = self.uri.firstIndex(of: "?") else { return self.description }
        return HookURL(target: self.target, uri: String(self.uri[..<query]) + "?...").description
    }

    public init(target: Target, uri: String = "/") {
        self.target = target
        self.uri = uri
    }

    /// Parses `auth_url`; the failure says what is wrong in one line.
    public init(_ text: String) throws(ValueParser.Failure) {
        let usage = "'\(text)' is not http://host[:port]/path or http://unix:/path/to.sock:/path"
        guard !text.utf8.contains(where: { $0 <= 0x20 || $0 >= 0x7F }), !text.contains("#") else {
            throw ValueParser.Failure("\(usage) (no spaces, controls or #)")
        }
        let lower = text.lowercased()
        if lower.hasPrefix("https://") {
            throw ValueParser.Failure("'\(text)': https is not supported; run the hook on loopback or a unix socket")
        }
        guard lower.hasPrefix("http://") else { throw ValueParser.Failure(usage) }
        let rest = text.dropFirst("http://".count)
        if rest.lowercased().hasPrefix("unix:") {
            let afterScheme = rest.dropFirst("unix:".count)
            let path: Substring
            var uri = "/"
            if let colon = afterScheme.firstIndex(of: ":") {
                path = afterScheme[..<colon]
                uri = String(afterScheme[afterScheme.index(after: colon)...])
                guard uri.hasPrefix("/") else { throw ValueParser.Failure("\(usage): the part after the socket path must start with /") }
            } else {
                path = afterScheme
            }
            guard path.hasPrefix("/") else { throw ValueParser.Failure("\(usage): the socket path must be absolute") }
            do { try ValueParser.socketPath(String(path)) } catch { throw ValueParser.Failure(error.message) }
            self.init(target: .unix(path: String(path)), uri: uri)
            return
        }
        let end = rest.firstIndex(where: { $0 == "/" || $0 == "?" }) ?? rest.endIndex
        let authority = rest[..<end]
        var uri = String(rest[end...])
        if uri.isEmpty { uri = "/" } else if uri.hasPrefix("?") { uri = "/" + uri }
        guard !authority.contains("@") else {
            throw ValueParser.Failure("'\(text)': no user or password in auth_url (the hook is sent the client's Authorization)")
        }
        var host = authority
        var port = 80
        if authority.hasPrefix("[") {
            guard let close = authority.firstIndex(of: "]") else { throw ValueParser.Failure(usage) }
            host = authority[authority.index(after: authority.startIndex)..<close]
            let after = authority[authority.index(after: close)...]
            if !after.isEmpty {
                guard after.hasPrefix(":"), let p = Int(after.dropFirst()), (1...65535).contains(p) else { throw ValueParser.Failure("\(usage): bad port") }
                port = p
            }
        } else if let colon = authority.lastIndex(of: ":") {
            host = authority[..<colon]
            guard let p = Int(authority[authority.index(after: colon)...]), (1...65535).contains(p) else { throw ValueParser.Failure("\(usage): bad port") }
            port = p
        }
        guard !host.isEmpty, !host.contains("["), !host.contains("]"), host.contains(":") == authority.hasPrefix("[") else {
            throw ValueParser.Failure(usage)
        }
        self.init(target: .tcp(host: String(host), port: port), uri: uri)
    }
}

/// What the hook's answer lets a client do: `X-Staps-Allow`.
public enum Permission: String, Sendable, Equatable {
    /// Send and receive (the default, when the header is absent).
    case both
    /// Receive only: what it sends is dropped and counted; a POST is refused with 403.
    case subscribe
    /// Send only: it receives nothing from the channel.
    case publish

    /// Whether the client's messages (or its POST) are relayed.
    public var mayPublish: Bool { self != .subscribe }
    /// Whether the client receives the channel's messages.
    public var mayReceive: Bool { self != .publish }
}

/// Why the hook could not decide: the client gets 503 with `message`, never admission.
public struct HookFailure: Sendable, Equatable, CustomStringConvertible {
    /// Each reason has its counter in `NodeCounters`.
    public enum Reason: String, Sendable, Equatable, CaseIterable {
        /// The hook answered a status other than 2xx, 401 or 403.
        case errorStatus = "error_status"
        /// Nothing listens, the connection was reset, the socket path does not exist.
        case unreachable
        /// No answer within `auth_timeout` (or the request's deadline, if earlier).
        case timeout
        /// `auth_concurrency` calls were already in flight.
        case overConcurrency = "over_concurrency"
        /// A 2xx with an invalid `X-Staps-Allow`, or a response that is not HTTP.
        case badAnswer = "bad_answer"
    }

    public var reason: Reason
    /// One line for the 503's body; never the hook's address.
    public var message: String

    public init(_ reason: Reason, _ message: String) {
        self.reason = reason
        self.message = message
    }

    public var description: String { "\(self.reason.rawValue): \(self.message)" }
}

/// What the hook's answer means for the client.
public enum HookDecision: Sendable, Equatable {
    /// Admitted, with what it may do.
    case admit(Permission)
    /// 401 or 403 for the client, with the hook's `WWW-Authenticate` values.
    case passOn(status: Int, wwwAuthenticate: [String])
    /// 503: the hook failed to decide.
    case unavailable(HookFailure)

    /// Reads the hook's status and headers: 2xx admits (narrowed by `X-Staps-Allow`), 401
    /// and 403 are passed on, anything else is a failure.
    public static func decide(status: Int, headers: HTTPHeaders) -> HookDecision {
        switch status {
        case 200..<300:
            let values = headers["x-staps-allow"]
            guard values.count <= 1 else {
                return .unavailable(HookFailure(.badAnswer, "authorization hook answered more than one X-Staps-Allow"))
            }
            guard let value = values.first else { return .admit(.both) }
            guard let permission = Permission(rawValue: value.trimmingWhitespace().lowercased()) else {
                return .unavailable(HookFailure(.badAnswer, "authorization hook answered X-Staps-Allow: \(value.prefix(40)), not subscribe, publish or both"))
            }
            return .admit(permission)
        case 401, 403:
            return .passOn(status: status, wwwAuthenticate: headers["www-authenticate"])
        default:
            return .unavailable(HookFailure(.errorStatus, "authorization hook answered \(status)"))
        }
    }
}

/// The request sent to the hook.
public enum HookRequest {
    /// The headers of the hook's `GET`: the client's `Authorization`, `Cookie` and `Origin`
    /// (each value as sent, when present), `X-Original-URI` (the request target),
    /// `X-Original-Method`, `X-Staps-Channel` (the decoded channel name, percent-encoded as in
    /// a path) and `X-Forwarded-For` (the client's own, then the TCP peer's address; a unix
    /// socket peer adds none, so without either the header is left out). A control character
    /// in a client's value (other than HTAB) is sent as a space, as RFC 9110 §5.5 allows.
    ///
    /// - Parameter peerIP: the TCP peer's address, nil for a unix socket peer.
    public static func headers(for head: HTTPRequestHead, channel: String, peerIP: String?) -> HTTPHeaders {
        var headers = HTTPHeaders()
        for name in ["Authorization", "Cookie", "Origin"] {
            for value in head.headers[name] { headers.add(name: name, value: Self.clean(value)) }
        }
        headers.add(name: "X-Original-URI", value: Self.clean(head.uri))
        headers.add(name: "X-Original-Method", value: head.method.rawValue)
        headers.add(name: "X-Staps-Channel", value: PercentEncoding.encode(channel))
        var forwarded = head.headers["x-forwarded-for"].map { Self.clean($0).trimmingWhitespace() }.filter { !$0.isEmpty }
        if let peerIP { forwarded.append(peerIP) }
        if !forwarded.isEmpty { headers.add(name: "X-Forwarded-For", value: forwarded.joined(separator: ", ")) }
        return headers
    }

    /// `value` with each control character but HTAB replaced by a space.
    static func clean(_ value: String) -> String {
        guard value.utf8.contains(where: { ($0 < 0x20 && $0 != 0x09) || $0 == 0x7F }) else { return value }
        return String(decoding: value.utf8.map { ($0 < 0x20 && $0 != 0x09) || $0 == 0x7F ? 0x20 : $0 }, as: UTF8.self)
    }
}
