import Atomics
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import StapsNode

/// The hook over HTTP/1.1 with NIO's own client pieces: a connection per call in flight, on the
/// asking connection's event loop, kept alive for the next call on that loop (at most
/// `auth_concurrency` idle, each closed after 30 s unused).
///
/// Not AsyncHTTPClient: a GET with a dozen headers whose answer is read from its head needs no
/// more than NIO's HTTP codec, while AsyncHTTPClient brings TLS (BoringSSL), HTTP/2 and
/// Foundation into the binary, and with them a copy of zlib that lintian rejects
/// (`embedded-library`): its release build was 63.7 MB against 25.6, and took minutes more.
public final class HTTPHookTransport: HookTransport {
    private let url: HookURL
    private let settings: HookSettings
    private let group: EventLoopGroup
    private let pool: NIOLockedValueBox<Pool>
    private let stopped = ManagedAtomic<Bool>(false)

    /// How long a kept-alive connection may wait unused for the next call.
    static let idleTimeout = TimeAmount.seconds(30)

    private struct Pool {
        /// Connections waiting for a call, with the task that closes them when unused.
        var idle: [(connection: Channel, expiry: Scheduled<Void>)] = []
        /// Every open connection, for shutdown.
        var open: [ObjectIdentifier: Channel] = [:]
    }

    /// For `Node`'s `hookTransport`.
    public static let factory: HookTransportFactory = { url, settings, group in HTTPHookTransport(url: url, settings: settings, group: group) }

    public init(url: HookURL, settings: HookSettings, group: EventLoopGroup) {
        self.url = url
        self.settings = settings
        self.group = group
        self.pool = NIOLockedValueBox(Pool())
    }

    /// Called on `eventLoop` (the asking connection's): its kept connections are used there.
    public func call(headers: HTTPHeaders, timeout: TimeAmount, on eventLoop: EventLoop) -> (EventLoopFuture<HookDecision>, cancel: @Sendable () -> Void) {
        eventLoop.preconditionInEventLoop()
        let call = HookCallState(eventLoop: eventLoop)
        let deadline = NIODeadline.now() + timeout
        var request = HTTPRequestHead(version: .http1_1, method: .GET, uri: self.url.uri, headers: headers)
        switch self.url.target {
        case .tcp(let host, let port):
            request.headers.replaceOrAdd(name: "Host", value: (host.contains(":") ? "[\(host)]" : host) + (port == 80 ? "" : ":\(port)"))
        case .unix:
            request.headers.replaceOrAdd(name: "Host", value: "localhost")
        }
        let timer = eventLoop.scheduleTask(deadline: deadline) {
            call.finish(.unavailable(HookFailure(.timeout, "authorization hook did not answer in time")))
        }
        call.future.whenComplete { _ in timer.cancel() }
        self.attempt(request, call: call, deadline: deadline, retry: true, reuse: true)
        return (call.future, { call.finish(.unavailable(HookFailure(.unreachable, "authorization check cancelled"))) })
    }

    /// Sends the request on a kept-alive connection of `call`'s loop (when `reuse`), or a new
    /// one. A reused connection the hook closed before answering is tried once more on a new one.
    private func attempt(_ request: HTTPRequestHead, call: HookCallState, deadline: NIODeadline, retry: Bool, reuse: Bool) {
        guard !self.stopped.load(ordering: .relaxed) else {
            call.finish(.unavailable(HookFailure(.unreachable, "authorization hook unreachable (the node is stopping)")))
            return
        }
        if reuse, let reused = self.takeIdle(on: call.eventLoop) {
            return self.send(request, on: reused, call: call, deadline: deadline, retry: retry)
        }
        let bootstrap = ClientBootstrap(group: call.eventLoop)
            .connectTimeout(max(deadline - .now(), .milliseconds(1)))
            .channelInitializer { connection in
                connection.eventLoop.makeCompletedFuture {
                    try connection.pipeline.syncOperations.addHTTPClientHandlers()
                    try connection.pipeline.syncOperations.addHandler(HookResponseHandler())
                }
            }
        let connecting: EventLoopFuture<Channel>
        switch self.url.target {
        case .tcp(let host, let port): connecting = bootstrap.connect(host: host, port: port)
        case .unix(let path): connecting = bootstrap.connect(unixDomainSocketPath: path)
        }
        connecting.whenComplete { result in
            switch result {
            case .success(let connection):
                guard self.track(connection) else {
                    // Connected as the node began to stop: shutdown has closed the others.
                    connection.close(promise: nil)
                    call.finish(.unavailable(HookFailure(.unreachable, "authorization hook unreachable (the node is stopping)")))
                    return
                }
                self.send(request, on: connection, call: call, deadline: deadline, retry: false)
            case .failure(let error):
                let timedOut = (error as? ChannelError).map { if case .connectTimeout = $0 { true } else { false } } ?? false
                call.finish(.unavailable(timedOut
                    ? HookFailure(.timeout, "authorization hook did not answer in time")
                    : HookFailure(.unreachable, "authorization hook unreachable")))
            }
        }
    }

    private func send(_ request: HTTPRequestHead, on connection: Channel, call: HookCallState, deadline: NIODeadline, retry: Bool) {
        // The call may have ended (cancel, deadline) while this connection was made: then it
        // carries nothing (and is closed with the call otherwise).
        guard call.onFinish({ connection.close(promise: nil) }) else {
            connection.close(promise: nil)
            return
        }
        let answered = connection.eventLoop.makePromise(of: HookResponseHandler.Outcome.self)
        connection.pipeline.handler(type: HookResponseHandler.self).assumeIsolated().whenComplete { result in
            guard connection.isActive, case .success(let handler) = result else {
                return answered.succeed(.closed(sawResponse: false))
            }
            handler.expect(answered)
            connection.write(HTTPClientRequestPart.head(request), promise: nil)
            // A request that cannot be written ends the connection: then `.closed`, not a wait.
            connection.writeAndFlush(HTTPClientRequestPart.end(nil)).whenFailure { _ in connection.close(promise: nil) }
        }
        answered.futureResult.whenSuccess { outcome in
            switch outcome {
            case .answered(let head, let keepAlive):
                // The connection is done with this call: kept for the next, unless this call
                // had already ended (deadline, cancel) or the hook asked to close.
                call.removeOnFinish()
                if call.finish(HookDecision.decide(status: Int(head.status.code), headers: head.headers)), keepAlive {
                    self.putIdle(connection)
                } else {
                    connection.close(promise: nil)
                }
            case .closed(let sawResponse):
                if retry, !sawResponse, NIODeadline.now() < deadline, !call.isFinished {
                    call.removeOnFinish()
                    return self.attempt(request, call: call, deadline: deadline, retry: false, reuse: false)
                }
                call.finish(.unavailable(HookFailure(.badAnswer, "authorization hook closed the connection without a complete answer")))
            case .notHTTP:
                connection.close(promise: nil)
                call.finish(.unavailable(HookFailure(.badAnswer, "authorization hook's answer is not HTTP, or was cut short")))
            }
        }
    }

    /// Counts `connection` in for shutdown; false when shutdown has begun.
    private func track(_ connection: Channel) -> Bool {
        let key = ObjectIdentifier(connection)
        let tracked = self.pool.withLockedValue { pool -> Bool in
            guard !self.stopped.load(ordering: .relaxed) else { return false }
            pool.open[key] = connection
            return true
        }
        guard tracked else { return false }
        connection.closeFuture.whenComplete { _ in
            self.pool.withLockedValue { pool in
                pool.open[key] = nil
                if let i = pool.idle.firstIndex(where: { $0.connection === connection }) {
                    pool.idle.remove(at: i).expiry.cancel()
                }
            }
        }
        return true
    }

    private func takeIdle(on eventLoop: EventLoop) -> Channel? {
        self.pool.withLockedValue { pool -> Channel? in
            guard let i = pool.idle.lastIndex(where: { $0.connection.eventLoop === eventLoop && $0.connection.isActive }) else { return nil }
            let entry = pool.idle.remove(at: i)
            entry.expiry.cancel()
            return entry.connection
        }
    }

    private func putIdle(_ connection: Channel) {
        let expiry = connection.eventLoop.scheduleTask(in: Self.idleTimeout) { connection.close(promise: nil) }
        let kept = self.pool.withLockedValue { pool -> Bool in
            guard !self.stopped.load(ordering: .relaxed), pool.idle.count < self.settings.concurrency else { return false }
            pool.idle.append((connection, expiry))
            return true
        }
        if !kept {
            expiry.cancel()
            connection.close(promise: nil)
        }
    }

    public func shutdown() async {
        let open = self.pool.withLockedValue { pool -> [Channel] in
            self.stopped.store(true, ordering: .relaxed)
            for entry in pool.idle { entry.expiry.cancel() }
            pool.idle.removeAll()
            return Array(pool.open.values)
        }
        for connection in open { try? await connection.close() }
    }
}

/// One call's outcome, decided once: by the answer, the deadline, a failure or a cancel,
/// whichever comes first, on the asking connection's event loop.
private final class HookCallState: Sendable {
    let eventLoop: EventLoop
    private let promise: EventLoopPromise<HookDecision>
    private let state = NIOLockedValueBox<(finished: Bool, onFinish: (@Sendable () -> Void)?)>((false, nil))

    init(eventLoop: EventLoop) {
        self.eventLoop = eventLoop
        self.promise = eventLoop.makePromise()
    }

    var future: EventLoopFuture<HookDecision> { self.promise.futureResult }
    var isFinished: Bool { self.state.withLockedValue { $0.finished } }

    /// Completes the call with `decision` unless it is complete; true if this did it.
    @discardableResult
    func finish(_ decision: HookDecision) -> Bool {
        let (first, cleanup) = self.state.withLockedValue { state -> (Bool, (@Sendable () -> Void)?) in
            guard !state.finished else { return (false, nil) }
            state.finished = true
            defer { state.onFinish = nil }
            return (true, state.onFinish)
        }
        guard first else { return false }
        self.promise.succeed(decision)
        cleanup?()
        return true
    }

    /// What to do if the call ends before its connection is done with (close it); false (and
    /// nothing kept) when the call has ended already.
    func onFinish(_ body: @escaping @Sendable () -> Void) -> Bool {
        self.state.withLockedValue { state -> Bool in
            guard !state.finished else { return false }
            state.onFinish = body
            return true
        }
    }

    /// The connection's part is over (it answered, or is given up for a retry).
    func removeOnFinish() {
        self.state.withLockedValue { $0.onFinish = nil }
    }
}

/// Reads one response per request: its head decides, its body is dropped as it arrives.
private final class HookResponseHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPClientResponsePart

    enum Outcome {
        case answered(HTTPResponseHead, keepAlive: Bool)
        /// The connection ended first; `sawResponse`: some of the answer had arrived.
        case closed(sawResponse: Bool)
        case notHTTP
    }

    private var waiting: EventLoopPromise<Outcome>?
    private var head: HTTPResponseHead?

    func expect(_ promise: EventLoopPromise<Outcome>) {
        self.waiting = promise
        self.head = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch self.unwrapInboundIn(data) {
        case .head(let head):
            // 1xx: informational, the answer follows.
            if head.status.code >= 200 { self.head = head }
        case .body:
            break
        case .end:
            guard let head = self.head, let waiting = self.waiting else { return }
            self.waiting = nil
            self.head = nil
            waiting.succeed(.answered(head, keepAlive: head.isKeepAlive))
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.waiting?.succeed(.closed(sawResponse: self.head != nil))
        self.waiting = nil
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.waiting?.succeed(.closed(sawResponse: self.head != nil))
        self.waiting = nil
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if error is HTTPParserError {
            self.waiting?.succeed(.notHTTP)
            self.waiting = nil
        }
        context.close(promise: nil)
    }
}
