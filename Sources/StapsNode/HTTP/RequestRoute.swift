import NIOCore
import NIOHTTP1

/// An error answer: its status, the one-line reason that is its body, and whether it closes
/// the connection at once (then the request's body, if any, is never read).
struct Refusal {
    var status: HTTPResponseStatus
    var reason: String
    var closes = false
    var extraHeaders: [(String, String)] = []
}

/// What a request head asks for, decided from the head alone (no I/O, no state): the page, a
/// POST, a websocket handshake, or an error answer.
enum RequestRoute {
    case page(Page)
    case post(channel: String)
    case upgrade(WebSocketUpgrade)
    case refuse(Refusal)

    static func of(_ head: HTTPRequestHead, access: AccessSettings, maxMessageSize: Int) -> RequestRoute {
        if head.version.major == 1, head.version.minor >= 1, head.headers["host"].count != 1 {
            return .refuse(Refusal(status: .badRequest, reason: head.headers["host"].isEmpty ? "missing Host header" : "more than one Host header", closes: true))
        }
        let target: RequestTarget
        switch PathDecoding.target(ofURI: head.uri) {
        case .success(let t): target = t
        case .failure(let error): return .refuse(Refusal(status: HTTPResponseStatus(statusCode: error.status), reason: error.reason))
        }
        if WebSocketUpgrade.isRequested(by: head.headers) {
            return WebSocketUpgrade.route(head, target: target, access: access)
        }
        switch head.method {
        case .GET, .HEAD:
            return .page(Page(target: target, requestHeaders: head.headers))
        case .POST:
            return Self.post(head, target: target, access: access, maxMessageSize: maxMessageSize)
        default:
            return .refuse(Refusal(status: .methodNotAllowed, reason: "method not allowed: use GET, POST or a websocket upgrade", extraHeaders: [("Allow", "GET, HEAD, POST")]))
        }
    }

    private static func post(_ head: HTTPRequestHead, target: RequestTarget, access: AccessSettings, maxMessageSize: Int) -> RequestRoute {
        guard case .channel(let name) = target else {
            return .refuse(Refusal(status: .badRequest, reason: "/ is not a channel: POST to /<channel>"))
        }
        if let reason = access.refusal(origin: head.headers["origin"]) {
            return .refuse(Refusal(status: .forbidden, reason: reason))
        }
        guard access.admitsPost(authorization: head.headers["authorization"]) else {
            return .refuse(Refusal(status: .unauthorized, reason: "POST needs Authorization: Bearer <post_token>", extraHeaders: [("WWW-Authenticate", "Bearer realm=\"staps\"")]))
        }
        if let length = head.headers.first(name: "content-length"), (Int(length) ?? .max) > maxMessageSize {
            return .refuse(Self.tooLarge(maxMessageSize))
        }
        return .post(channel: name)
    }

    /// How a POST's complete body is published: as text when its `Content-Type` is `text/*`
    /// (then it must be UTF-8), else binary; empty messages are not relayed.
    static func publication(of body: ByteBuffer, _ head: HTTPRequestHead) -> (isText: Bool, refusal: Refusal?) {
        let isText = head.headers.first(name: "content-type")?.lowercased().hasPrefix("text/") ?? false
        if isText, !UTF8Validation.isValid(body) {
            return (isText, Refusal(status: .badRequest, reason: "text/* body is not valid UTF-8"))
        }
        return (isText, body.readableBytes > 0 ? nil : Refusal(status: .badRequest, reason: "empty body: empty messages are not relayed"))
    }

    /// 413, as soon as it is known (`Content-Length`, or the chunk that passes the limit).
    static func tooLarge(_ maxMessageSize: Int) -> Refusal {
        Refusal(status: .payloadTooLarge, reason: "body larger than \(maxMessageSize) bytes", closes: true)
    }

    /// What a request the decoder cannot parse is answered; the connection closes, since
    /// nothing after it can be trusted.
    static func refusal(for error: HTTPParserError) -> Refusal {
        guard error == .headerOverflow else {
            return Refusal(status: .badRequest, reason: "malformed HTTP request (\(error))", closes: true)
        }
        return Refusal(status: .requestHeaderFieldsTooLarge, reason: "request head larger than \(ConnectionPipeline.maxHeadBytes) bytes or more than \(ConnectionPipeline.maxHeaderFields) header fields", closes: true)
    }

    static func hasBody(_ head: HTTPRequestHead) -> Bool {
        head.headers.contains(name: "transfer-encoding") || head.headers["content-length"].contains { $0 != "0" }
    }
}
