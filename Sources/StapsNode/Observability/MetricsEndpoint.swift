import Dispatch
import Logging
import NIOCore
import NIOHTTP1

/// What the metrics listener serves: the metrics, and the node's health and readiness.
struct MetricsEndpoint: Sendable {
    let metrics: NodeMetrics
    /// Why the node should get no traffic now (nil when ready), for `/readyz`.
    let notReady: @Sendable () -> String?
    /// Metrics are rendered here, never on an event loop: a scrape's work never delays a client.
    let queue: DispatchQueue

    /// Time a connection has to send a complete request, from accept or its previous answer
    /// (then it is closed); the answer itself is not timed.
    static let requestTimeout = TimeAmount.seconds(10)
    /// Connections the metrics listener serves at once; more are closed on accept.
    static let maxConnections = 64

    /// The answer to one request: status, content type and body.
    enum Answer {
        case now(HTTPResponseStatus, String, String, extra: [(String, String)] = [])
        /// The Prometheus text, rendered off the event loop.
        case metrics
    }

    static func route(method: HTTPMethod, uri: String) -> RouteResult {
        let path = uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? uri
        switch path {
        case "/metrics", "/healthz", "/readyz":
            guard method == .GET || method == .HEAD else { return .methodNotAllowed }
            return path == "/metrics" ? .metrics : (path == "/healthz" ? .health : .readiness)
        default:
            return .notFound
        }
    }

    enum RouteResult: Equatable { case metrics, health, readiness, notFound, methodNotAllowed }

    func answer(method: HTTPMethod, uri: String) -> Answer {
        let text = "text/plain; charset=utf-8"
        switch Self.route(method: method, uri: uri) {
        case .metrics: return .metrics
        case .health: return .now(.ok, text, "ok\n")
        case .readiness:
            if let reason = self.notReady() { return .now(.serviceUnavailable, text, "not ready: \(reason)\n") }
            return .now(.ok, text, "ready\n")
        case .notFound: return .now(.notFound, text, "not found: the metrics listener serves /metrics, /healthz and /readyz\n")
        case .methodNotAllowed: return .now(.methodNotAllowed, text, "method not allowed: use GET or HEAD\n", extra: [("Allow", "GET, HEAD")])
        }
    }
}

/// One connection to the metrics listener. NIO's server pipeline handler in front holds back a
/// pipelined request until the previous answer is written, so there is one request at a time.
final class MetricsHTTPHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let endpoint: MetricsEndpoint
    private var head: HTTPRequestHead?
    private var timer: Scheduled<Void>?

    init(endpoint: MetricsEndpoint) { self.endpoint = endpoint }

    func handlerAdded(context: ChannelHandlerContext) { self.armTimer(context: context) }
    func handlerRemoved(context: ChannelHandlerContext) { self.timer?.cancel() }

    private func armTimer(context: ChannelHandlerContext) {
        self.timer?.cancel()
        self.timer = context.eventLoop.assumeIsolated().scheduleTask(in: MetricsEndpoint.requestTimeout) {
            context.close(promise: nil)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch self.unwrapInboundIn(data) {
        case .head(let head):
            self.head = head
        case .body:
            break  // request bodies are ignored
        case .end:
            guard let head = self.head else { return }
            self.head = nil
            self.timer?.cancel()
            self.answer(head, context: context)
        }
    }

    private func answer(_ head: HTTPRequestHead, context: ChannelHandlerContext) {
        switch self.endpoint.answer(method: head.method, uri: head.uri) {
        case .now(let status, let type, let body, let extra):
            self.write(context: context, head: head, status: status, contentType: type, body: ByteBuffer(string: body), extra: extra)
        case .metrics:
            let loop = context.eventLoop
            let metrics = self.endpoint.metrics
            // Handler and context stay on their loop: the queue only carries them back to it.
            let here = NIOLoopBound((handler: self, context: context), eventLoop: loop)
            self.endpoint.queue.async {
                let text = metrics.render()
                loop.execute {
                    let (handler, context) = here.value
                    // The connection may be gone by now: then there is nothing to answer.
                    guard context.channel.isActive else { return }
                    handler.write(context: context, head: head, status: .ok, contentType: "text/plain; version=0.0.4; charset=utf-8", body: ByteBuffer(bytes: text), extra: [])
                }
            }
        }
    }

    private func write(context: ChannelHandlerContext, head: HTTPRequestHead, status: HTTPResponseStatus, contentType: String, body: ByteBuffer, extra: [(String, String)]) {
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: contentType)
        headers.add(name: "Content-Length", value: "\(body.readableBytes)")
        headers.add(name: "Cache-Control", value: "no-store")
        for (name, value) in extra { headers.add(name: name, value: value) }
        let keepAlive = head.isKeepAlive
        if !keepAlive { headers.add(name: "Connection", value: "close") }
        context.write(self.wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))), promise: nil)
        if head.method != .HEAD { context.write(self.wrapOutboundOut(.body(.byteBuffer(body))), promise: nil) }
        let done = context.writeAndFlush(self.wrapOutboundOut(.end(nil)))
        guard keepAlive else {
            done.assumeIsolated().whenComplete { _ in context.close(promise: nil) }
            return
        }
        self.armTimer(context: context)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }
}
