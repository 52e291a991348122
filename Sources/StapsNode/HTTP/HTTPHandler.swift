import Atomics
import Logging
import NIOCore
import NIOHTTP1

/// Serves one connection's HTTP: the page, POST publishing, and the websocket upgrade.
///
/// The upgrade is done here rather than by NIO's upgrade handler so that attaching the client to
/// its staps channel, swapping the pipeline and writing the 101 happen in one event-loop step:
/// a client receives its channel's messages before it can see its handshake complete.
final class HTTPHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    struct Shared: Sendable {
        let hub: Hub
        let limits: Limits
        let counters: NodeCounters
        let connectionIDs: ManagedAtomic<UInt64>
        let nodeID: String
        var access = AccessSettings()
        /// Asks the authorization hook; nil when `auth_url` is not set.
        var authorizer: Authorizer? = nil
    }

    let shared: Shared
    let overConnectionLimit: Bool
    let encoder: HTTPResponseEncoder
    let decoder: ByteToMessageHandler<HTTPRequestDecoder>
    var logger: Logger

    enum State {
        case idle
        case receivingBody(HTTPRequestHead, String, ByteBuffer)
        /// A bodiless request that gets an error: answered at its `.end`.
        case rejecting(HTTPRequestHead, status: HTTPResponseStatus, reason: String, extraHeaders: [(String, String)])
        case ignoringBody
        /// A valid upgrade request whose `.end` has not arrived yet.
        case awaitingUpgradeEnd(HTTPRequestHead, channel: String, key: String)
        /// Waiting for the authorization hook, reading nothing: for an upgrade, after its
        /// `.end`; for a POST, before its body.
        case authorizing(HTTPRequestHead, channel: String, then: Authorized)
        case upgrading
    }
    /// What an admitted request goes on to.
    enum Authorized {
        case upgrade(key: String)
        case post
    }
    var state = State.idle
    /// One deadline from accept until the request is complete and answered (head, body and
    /// response, whatever the state of reading); re-armed for the next keep-alive request.
    var requestTimer: Scheduled<Void>?
    var requestDeadline = NIODeadline.now()
    /// The hook call the request in `.authorizing` waits for, its timer (when `auth_timeout`
    /// ends before the request's deadline, whose timer serves otherwise), and when it was asked.
    var hookCall: HookCall?
    var hookTimer: Scheduled<Void>?
    var hookAsked = NIODeadline.now()
    var shuttingDown = false
    /// Whether requests are asked about (`auth_url` is set): then a missing hook client refuses.
    var hooked: Bool { self.shared.access.hook.url != nil }
    /// The head of the request being answered, until its response is written.
    var currentHead: HTTPRequestHead?

    /// Requests pipelined behind the one being answered are read only after its response is
    /// written: what one read already brought is held here, at most `pipelineDepth` requests.
    static let pipelineDepth = 16
    var responding = false
    /// A response with `Connection: close` is under way: nothing more is read or answered.
    var closing = false
    /// The request is one after which NIO's parser stops (an upgrade it does not become, or
    /// CONNECT): its answer must close the connection.
    var lastRequestEndsParsing = false
    var held = CircularBuffer<HTTPServerRequestPart>()
    var heldRequests = 0
    var closeAfterHeld = false
    /// Responses written on this connection: one that has none yet is answered (with
    /// `Connection: close`) even when shutdown begins, so a restart drops no request that
    /// was already accepted.
    var responses = 0

    init(shared: Shared, overConnectionLimit: Bool, encoder: HTTPResponseEncoder, decoder: ByteToMessageHandler<HTTPRequestDecoder>, logger: Logger) {
        self.shared = shared
        self.overConnectionLimit = overConnectionLimit
        self.encoder = encoder
        self.decoder = decoder
        self.logger = logger
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.armRequestTimer(context: context)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.requestTimer?.cancel()
        self.abandonHookCall()
    }

    /// A client that leaves while its hook call is pending: the call stops, its slot is given
    /// back, and its answer (if any still comes) is ignored.
    func channelInactive(context: ChannelHandlerContext) {
        self.abandonHookCall()
        context.fireChannelInactive()
    }

    func armRequestTimer(context: ChannelHandlerContext) {
        self.requestTimer?.cancel()
        // The loop's clock (virtual on an EmbeddedEventLoop), like every deadline here.
        self.requestDeadline = context.eventLoop.now + self.shared.limits.handshakeTimeout
        self.requestTimer = context.eventLoop.assumeIsolated().scheduleTask(deadline: self.requestDeadline) { [self] in
            // Still waiting for the hook: the hook's failure (503), not the client's (408).
            if case .authorizing = self.state { return self.hookTimedOut(context: context) }
            // Mid-response or mid-upgrade there is nothing left to say.
            if self.responding || self.closing { return context.close(promise: nil) }
            if case .upgrading = self.state { return context.close(promise: nil) }
            self.state = .ignoringBody
            // The request's own head when it has arrived (an upgrade's 408 counts as a refused handshake).
            self.respond(context: context, head: self.currentHead ?? HTTPRequestHead(version: .http1_1, method: .GET, uri: "/"), status: .requestTimeout, text: "request not complete within \(self.shared.limits.handshakeTimeout.nanoseconds / 1_000_000) ms", close: true)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let part = self.unwrapInboundIn(data)
        guard !self.closing else { return }
        guard !self.responding, !self.isAuthorizing, self.held.isEmpty else { return self.hold(part, context: context) }
        self.handle(part, context: context)
    }

    var isAuthorizing: Bool {
        if case .authorizing = self.state { return true }
        return false
    }

    /// Keeps a part of a pipelined request until the response before it is written.
    func hold(_ part: HTTPServerRequestPart, context: ChannelHandlerContext) {
        guard !self.closeAfterHeld else { return }
        if case .head = part {
            self.heldRequests += 1
            if self.heldRequests > Self.pipelineDepth {
                // Answer what is held, then close: the rest is not read.
                self.closeAfterHeld = true
                return
            }
        }
        self.held.append(part)
    }

    /// Handles held parts until a response is in flight again.
    func releaseHeld(context: ChannelHandlerContext) {
        while !self.responding, !self.closing, !self.isAuthorizing, let part = self.held.popFirst() {
            if case .head = part { self.heldRequests -= 1 }
            self.handle(part, context: context)
        }
        if self.held.isEmpty, self.closeAfterHeld, !self.responding, !self.isAuthorizing, context.channel.isActive {
            context.close(promise: nil)
        }
    }

    func handle(_ part: HTTPServerRequestPart, context: ChannelHandlerContext) {
        switch part {
        case .head(let head):
            self.requestHead(head, context: context)
        case .body(let chunk):
            switch self.state {
            case .receivingBody(let head, let channel, var body):
                self.state = .idle  // so `body` is uniquely referenced while it grows
                if body.readableBytes + chunk.readableBytes > self.shared.limits.maxMessageSize {
                    // Known to be too large now: answer now, read no more of it.
                    self.reject(head, .payloadTooLarge, "body larger than \(self.shared.limits.maxMessageSize) bytes", close: true, context: context)
                } else {
                    body.writeImmutableBuffer(chunk)
                    self.state = .receivingBody(head, channel, body)
                }
            default:
                break
            }
        case .end:
            switch self.state {
            case .receivingBody(let head, let channel, let body):
                self.state = .idle
                self.post(head, channel: channel, body: body, context: context)
            case .rejecting(let head, let status, let reason, let extra):
                self.state = .idle
                self.respond(context: context, head: head, status: status, text: reason, extraHeaders: extra)
            case .ignoringBody:
                self.state = .idle
            case .awaitingUpgradeEnd(let head, let channel, let key):
                if self.shuttingDown {
                    // No websocket starts now: answer at once, without asking the hook.
                    self.state = .idle
                    self.respond(context: context, head: head, status: .serviceUnavailable, text: "server shutting down", close: true)
                } else if self.hooked {
                    self.authorize(head, channel: channel, then: .upgrade(key: key), context: context)
                } else {
                    self.join(head, channel: channel, key: key, permission: .both, context: context)
                }
            case .idle, .upgrading, .authorizing:
                break
            }
        }
    }

    func requestHead(_ head: HTTPRequestHead, context: ChannelHandlerContext) {
        self.currentHead = head
        self.lastRequestEndsParsing = head.method == .CONNECT
            || (head.headers[canonicalForm: "connection"].contains { $0.lowercased() == "upgrade" } && head.headers.contains(name: "upgrade"))
        if self.overConnectionLimit {
            self.shared.counters.connectionsRefused.wrappingIncrement(ordering: .relaxed)
            return self.reject(head, .serviceUnavailable, "too many connections, try again later", close: true, context: context)
        }
        if head.version.major == 1, head.version.minor >= 1, head.headers["host"].count != 1 {
            return self.reject(head, .badRequest, head.headers["host"].isEmpty ? "missing Host header" : "more than one Host header", close: true, context: context)
        }
        let target: RequestTarget
        switch PathDecoding.target(ofURI: head.uri) {
        case .success(let t): target = t
        case .failure(let error):
            return self.reject(head, HTTPResponseStatus(statusCode: error.status), error.reason, context: context)
        }
        if Self.isUpgradeToWebSocket(head.headers) {
            return self.upgradeRequest(head, target: target, context: context)
        }
        switch head.method {
        case .GET, .HEAD:
            let page = Page(target: target, requestHeaders: head.headers)
            self.state = .ignoringBody
            self.writeResponse(context: context, head: head, status: .ok, contentType: "text/html; charset=utf-8", body: page.html, keepAlive: head.isKeepAlive, omitBody: head.method == .HEAD, extraHeaders: page.headers)
        case .POST:
            guard case .channel(let name) = target else {
                return self.reject(head, .badRequest, "/ is not a channel: POST to /<channel>", context: context)
            }
            if let reason = self.shared.access.refusal(origin: head.headers["origin"]) {
                return self.reject(head, .forbidden, reason, context: context)
            }
            guard self.shared.access.admitsPost(authorization: head.headers["authorization"]) else {
                return self.reject(head, .unauthorized, "POST needs Authorization: Bearer <post_token>", extraHeaders: [("WWW-Authenticate", "Bearer realm=\"staps\"")], context: context)
            }
            if let length = head.headers.first(name: "content-length"), (Int(length) ?? .max) > self.shared.limits.maxMessageSize {
                return self.reject(head, .payloadTooLarge, "body larger than \(self.shared.limits.maxMessageSize) bytes", close: true, context: context)
            }
            if self.hooked {
                // Asked before the body is read: a refused body is never read.
                return self.authorize(head, channel: name, then: .post, context: context)
            }
            self.receiveBody(head, channel: name, context: context)
        default:
            self.reject(head, .methodNotAllowed, "method not allowed: use GET, POST or a websocket upgrade", extraHeaders: [("Allow", "GET, HEAD, POST")], context: context)
        }
    }

    func receiveBody(_ head: HTTPRequestHead, channel name: String, context: ChannelHandlerContext) {
        self.state = .receivingBody(head, name, context.channel.allocator.buffer(capacity: 0))
        if head.headers[canonicalForm: "expect"].contains(where: { $0.lowercased() == "100-continue" }) {
            context.writeAndFlush(self.wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: .continue))), promise: nil)
        }
    }

    /// Answers an error: at the request's `.end` when it has no body, else at once, closing
    /// the connection (a body nobody wants is never read).
    func reject(_ head: HTTPRequestHead, _ status: HTTPResponseStatus, _ reason: String, close: Bool = false, extraHeaders: [(String, String)] = [], context: ChannelHandlerContext) {
        if close || Self.hasBody(head) {
            self.state = .ignoringBody
            self.respond(context: context, head: head, status: status, text: reason, extraHeaders: extraHeaders, close: true)
        } else {
            self.state = .rejecting(head, status: status, reason: reason, extraHeaders: extraHeaders)
        }
    }

    static func hasBody(_ head: HTTPRequestHead) -> Bool {
        head.headers.contains(name: "transfer-encoding") || head.headers["content-length"].contains { $0 != "0" }
    }

    /// `Connection: upgrade` and `Upgrade: websocket`, each possibly among other tokens.
    static func isUpgradeToWebSocket(_ headers: HTTPHeaders) -> Bool {
        headers[canonicalForm: "connection"].contains { $0.lowercased() == "upgrade" }
            && headers[canonicalForm: "upgrade"].contains { $0.lowercased() == "websocket" }
    }

    /// A `Sec-WebSocket-Key` is the base64 of 16 bytes: 22 characters, the last of them
    /// carrying 2 zero bits, then `==` (RFC 6455 §4.1).
    static func isValidKey(_ key: String) -> Bool {
        let bytes = Array(key.utf8)
        guard bytes.count == 24, bytes[22] == UInt8(ascii: "="), bytes[23] == UInt8(ascii: "=") else { return false }
        func isBase64(_ b: UInt8) -> Bool {
            (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || (b >= 0x30 && b <= 0x39) || b == 0x2B || b == 0x2F
        }
        return bytes[..<22].allSatisfy(isBase64) && "AQgw".utf8.contains(bytes[21])
    }

    func post(_ head: HTTPRequestHead, channel: String, body: ByteBuffer, context: ChannelHandlerContext) {
        let contentType = head.headers.first(name: "content-type")?.lowercased() ?? ""
        let isText = contentType.hasPrefix("text/")
        if isText, !UTF8Validation.isValid(body) {
            return self.respond(context: context, head: head, status: .badRequest, text: "text/* body is not valid UTF-8")
        }
        guard body.readableBytes > 0 else {
            return self.respond(context: context, head: head, status: .badRequest, text: "empty body: empty messages are not relayed")
        }
        let receivers = self.shared.hub.publish(channel: channel, payload: body, isText: isText, on: context.eventLoop)
        let json = "{\"channel\":\"\(Page.jsonEscaped(channel))\",\"receivers\":\(receivers)}\n"
        self.writeResponse(context: context, head: head, status: .accepted, contentType: "application/json", body: json, keepAlive: head.isKeepAlive)
    }

    func respond(context: ChannelHandlerContext, head: HTTPRequestHead, status: HTTPResponseStatus, text: String, extraHeaders: [(String, String)] = [], close: Bool = false) {
        self.writeResponse(context: context, head: head, status: status, contentType: "text/plain; charset=utf-8", body: text + "\n", keepAlive: head.isKeepAlive && !close, extraHeaders: extraHeaders)
    }

    func writeResponse(context: ChannelHandlerContext, head: HTTPRequestHead, status: HTTPResponseStatus, contentType: String, body: String, keepAlive: Bool, omitBody: Bool = false, extraHeaders: [(String, String)] = []) {
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: contentType)
        headers.add(name: "Content-Length", value: "\(body.utf8.count)")
        headers.add(name: "Cache-Control", value: "no-store")
        headers.add(name: "X-Staps-Node", value: self.shared.nodeID)
        for (name, value) in extraHeaders { headers.add(name: name, value: value) }
        let keepAlive = keepAlive && !self.shuttingDown && !self.lastRequestEndsParsing
        self.responses += 1
        self.currentHead = nil
        self.shared.counters.httpResponses.increment(Int(status.code))
        self.shared.counters.httpResponseTotal.wrappingIncrement(ordering: .relaxed)
        if Self.isUpgradeToWebSocket(head.headers) { self.shared.counters.handshakesRejected.increment(Int(status.code)) }
        if !keepAlive { headers.add(name: "Connection", value: "close") }
        context.write(self.wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))), promise: nil)
        if !omitBody {
            context.write(self.wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
        }
        let done = context.writeAndFlush(self.wrapOutboundOut(.end(nil)))
        if !keepAlive {
            self.closing = true
            done.assumeIsolated().whenComplete { _ in context.close(promise: nil) }
            return
        }
        // Nothing more is read until this response is written.
        self.responding = true
        context.channel.setOption(ChannelOptions.autoRead, value: false).whenComplete { _ in }
        done.assumeIsolated().whenComplete { [self] result in
            self.responding = false
            guard case .success = result, context.channel.isActive else { return }
            self.armRequestTimer(context: context)
            if self.shuttingDown, case .idle = self.state, self.held.isEmpty { return context.close(promise: nil) }
            context.channel.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
            self.releaseHeld(context: context)
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is ChannelShouldQuiesceEvent {
            self.shuttingDown = true
            // Idle between keep-alive requests: done. Not asked anything yet: wait for the request.
            if case .idle = self.state, self.responses > 0, !self.responding, self.held.isEmpty { context.close(promise: nil) }
            // An upgrade waiting for the hook would be dropped once admitted (no websocket
            // starts during shutdown): drop it now, its call with it. A POST is still answered.
            if case .authorizing(let head, _, .upgrade) = self.state {
                self.abandonHookCall()
                self.state = .idle
                self.respond(context: context, head: head, status: .serviceUnavailable, text: "server shutting down", close: true)
            }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    /// A request the decoder cannot parse gets its status (when no response is under way), then
    /// the connection closes: nothing after it can be trusted.
    func errorCaught(context: ChannelHandlerContext, error: Error) {
        self.logger.debug("http error", metadata: ["error": "\(error)"])
        guard let parserError = error as? HTTPParserError, !self.responding, !self.closing, case .idle = self.state else {
            return context.close(promise: nil)
        }
        let head = HTTPRequestHead(version: .http1_1, method: .GET, uri: "/")
        self.state = .ignoringBody
        if parserError == .headerOverflow {
            self.respond(context: context, head: head, status: .requestHeaderFieldsTooLarge, text: "request head larger than \(ConnectionPipeline.maxHeadBytes) bytes or more than \(ConnectionPipeline.maxHeaderFields) header fields", close: true)
        } else {
            self.respond(context: context, head: head, status: .badRequest, text: "malformed HTTP request (\(parserError))", close: true)
        }
    }
}
