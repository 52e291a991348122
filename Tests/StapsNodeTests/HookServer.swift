import Atomics
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import StapsNode

/// The hook servers' own event loop, apart from the nodes' and the clients'.
let hookGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1)

/// A real authorization hook for the tests: an HTTP/1.1 server (NIO) on loopback TCP, and on
/// a unix socket when asked, that answers by the client's `Authorization` it is sent:
///
/// | `Authorization` | answer |
/// | --- | --- |
/// | `Bearer ok` | 204 |
/// | `Bearer sub` / `Bearer pub` / `Bearer both` | 204 / 200 with a body / 204, with `X-Staps-Allow: subscribe` / `publish` / `both` |
/// | `Bearer bad` | 204 with `X-Staps-Allow: everything` |
/// | `Bearer 403` / `Bearer 500` | 403 / 500 |
/// | `Bearer slow` | 204 after `slowDelay` |
/// | `Bearer never` | nothing, ever (the connection stays open) |
/// | anything else, or none | 401 with `WWW-Authenticate: Bearer realm="hook"` |
///
/// Every request head it receives is kept, in order.
final class HookServer: Sendable {
    let port: Int
    let unixPath: String?
    private let listeners: [Channel]
    private let received: NIOLockedValueBox<[HTTPRequestHead]>
    private let accepted: ManagedAtomic<Int>
    private let open: ManagedAtomic<Int>

    private init(port: Int, unixPath: String?, listeners: [Channel], received: NIOLockedValueBox<[HTTPRequestHead]>, accepted: ManagedAtomic<Int>, open: ManagedAtomic<Int>) {
        self.port = port
        self.unixPath = unixPath
        self.listeners = listeners
        self.received = received
        self.accepted = accepted
        self.open = open
    }

    static func start(slowDelay: TimeAmount = .milliseconds(1500), unixPath: String? = nil) async throws -> HookServer {
        let received = NIOLockedValueBox<[HTTPRequestHead]>([])
        let accepted = ManagedAtomic<Int>(0)
        let open = ManagedAtomic<Int>(0)
        let bootstrap = ServerBootstrap(group: hookGroup)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                accepted.wrappingIncrement(ordering: .relaxed)
                open.wrappingIncrement(ordering: .relaxed)
                channel.closeFuture.whenComplete { _ in open.wrappingDecrement(ordering: .relaxed) }
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(HookHandler(slowDelay: slowDelay, received: received))
                }
            }
        var listeners = [try await bootstrap.bind(host: "127.0.0.1", port: 0).get()]
        if let unixPath { listeners.append(try await bootstrap.bind(unixDomainSocketPath: unixPath, cleanupExistingSocketFile: true).get()) }
        return HookServer(port: listeners[0].localAddress!.port!, unixPath: unixPath, listeners: listeners, received: received, accepted: accepted, open: open)
    }

    /// Every request head received so far.
    var requests: [HTTPRequestHead] { self.received.withLockedValue { $0 } }
    /// Connections accepted so far, and open now.
    var connectionsAccepted: Int { self.accepted.load(ordering: .relaxed) }
    var connectionsOpen: Int { self.open.load(ordering: .relaxed) }

    /// The `HookSettings` of a node that asks this hook over TCP (`/check?scope=staps`).
    func settings(timeout: TimeAmount = .milliseconds(500), concurrency: Int = 64) -> HookSettings {
        HookSettings(url: HookURL(target: .tcp(host: "127.0.0.1", port: self.port), uri: "/check?scope=staps"), timeout: timeout, concurrency: concurrency)
    }

    /// Waits until `count` requests with this `Authorization` have arrived.
    func waitForRequests(authorization: String, count: Int, timeout: Double = 5) async throws {
        try await eventually("hook: \(count) requests with \(authorization)", within: timeout) {
            self.requests.filter { $0.headers.first(name: "authorization") == authorization }.count >= count
        }
    }

    func stop() async {
        for listener in self.listeners { try? await listener.close() }
    }
}

private final class HookHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let slowDelay: TimeAmount
    private let received: NIOLockedValueBox<[HTTPRequestHead]>
    private var head: HTTPRequestHead?

    init(slowDelay: TimeAmount, received: NIOLockedValueBox<[HTTPRequestHead]>) {
        self.slowDelay = slowDelay
        self.received = received
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch self.unwrapInboundIn(data) {
        case .head(let head):
            self.head = head
            self.received.withLockedValue { $0.append(head) }
        case .body:
            break
        case .end:
            guard let head = self.head else { return }
            self.head = nil
            switch head.headers.first(name: "authorization") ?? "" {
            case "Bearer ok": self.respond(context, .noContent)
            case "Bearer sub": self.respond(context, .noContent, [("X-Staps-Allow", "subscribe")])
            case "Bearer pub": self.respond(context, .ok, [("X-Staps-Allow", "publish")], body: "publish only\n")
            case "Bearer both": self.respond(context, .noContent, [("X-Staps-Allow", "both")])
            case "Bearer bad": self.respond(context, .noContent, [("X-Staps-Allow", "everything")])
            case "Bearer 403": self.respond(context, .forbidden, body: "no\n")
            case "Bearer 500": self.respond(context, .internalServerError, body: "oops\n")
            case "Bearer never": break
            case "Bearer slow":
                context.eventLoop.assumeIsolated().scheduleTask(in: self.slowDelay) { [self] in
                    if context.channel.isActive { self.respond(context, .noContent) }
                }
            default: self.respond(context, .unauthorized, [("WWW-Authenticate", "Bearer realm=\"hook\"")], body: "who are you?\n")
            }
        }
    }

    private func respond(_ context: ChannelHandlerContext, _ status: HTTPResponseStatus, _ extra: [(String, String)] = [], body: String = "") {
        var headers = HTTPHeaders(extra)
        if status != .noContent { headers.add(name: "Content-Length", value: "\(body.utf8.count)") }
        context.write(self.wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))), promise: nil)
        if !body.isEmpty { context.write(self.wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil) }
        context.writeAndFlush(self.wrapOutboundOut(.end(nil)), promise: nil)
    }
}
