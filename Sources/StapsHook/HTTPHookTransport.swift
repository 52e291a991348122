import AsyncHTTPClient
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import StapsNode

#if canImport(FoundationEssentials)
import struct FoundationEssentials.URL
#else
import struct Foundation.URL
#endif

/// The hook over HTTP/1.1 through AsyncHTTPClient: one `HTTPClient` per node, on the node's
/// event loops, keeping up to `auth_concurrency` connections to the hook alive between calls.
public final class HTTPHookTransport: HookTransport {
    private let client: HTTPClient
    private let request: HTTPClient.Request

    /// For `Node`'s `hookTransport`.
    public static let factory: HookTransportFactory = { url, settings, group in try HTTPHookTransport(url: url, settings: settings, group: group) }

    /// - Throws: `NodeStartError` when AsyncHTTPClient does not take the URL.
    public init(url: HookURL, settings: HookSettings, group: EventLoopGroup) throws {
        let target: URL?
        switch url.target {
        case .tcp(let host, let port):
            target = URL(string: "http://\(host.contains(":") ? "[\(host)]" : host):\(port)\(url.uri)")
        case .unix(let path):
            target = URL(httpURLWithSocketPath: path, uri: url.uri)
        }
        guard let target, let request = try? HTTPClient.Request(url: target, method: .GET) else {
            throw NodeStartError(message: "auth_url: \(url) cannot be used")
        }
        self.request = request
        var configuration = HTTPClient.Configuration()
        configuration.httpVersion = .http1Only
        configuration.redirectConfiguration = .disallow
        configuration.decompression = .disabled
        configuration.timeout = .init(connect: settings.timeout, read: settings.timeout)
        // One connection per call in flight, kept alive for the next ones.
        configuration.connectionPool = .init(idleTimeout: .seconds(30), concurrentHTTP1ConnectionsPerHostSoftLimit: settings.concurrency)
        // A hook that is not there is a 503 now, not retries until the deadline. The price: a
        // connect that fails fails every call then waiting for a connection, so a hook must
        // listen with a queue for a burst (the README's example asks for 1024).
        configuration.connectionPool.retryConnectionEstablishment = false
        self.client = HTTPClient(eventLoopGroupProvider: .shared(group), configuration: configuration)
    }

    public func call(headers: HTTPHeaders, timeout: TimeAmount, on eventLoop: EventLoop) -> (EventLoopFuture<HookDecision>, cancel: @Sendable () -> Void) {
        // The handler's own timer answers the client at this deadline; AsyncHTTPClient's
        // ends the call there too, so its connection is not held by a call nobody waits for.
        let deadline = NIODeadline.now() + timeout
        let promise = eventLoop.makePromise(of: HookDecision.self)
        let current = NIOLockedValueBox<(task: HTTPClient.Task<HTTPResponseHead>?, cancelled: Bool)>((nil, false))
        @Sendable func attempt(retry: Bool) {
            var request = self.request
            request.headers = headers
            let task = self.client.execute(request: request, delegate: HeadOnlyDelegate(), eventLoop: .delegate(on: eventLoop), deadline: deadline)
            let cancelled = current.withLockedValue { state -> Bool in
                state.task = task
                return state.cancelled
            }
            if cancelled { task.cancel() }
            task.futureResult.whenComplete { result in
                switch result {
                case .success(let head):
                    promise.succeed(HookDecision.decide(status: Int(head.status.code), headers: head.headers))
                case .failure(let error):
                    // A kept-alive connection the hook closed just as it was reused: once more.
                    if retry, (error as? HTTPClientError) == .remoteConnectionClosed, NIODeadline.now() < deadline,
                       !current.withLockedValue({ $0.cancelled }) {
                        return attempt(retry: false)
                    }
                    promise.succeed(.unavailable(Self.failure(error)))
                }
            }
        }
        attempt(retry: true)
        let cancel: @Sendable () -> Void = {
            let task = current.withLockedValue { state -> HTTPClient.Task<HTTPResponseHead>? in
                state.cancelled = true
                return state.task
            }
            task?.cancel()
        }
        return (promise.futureResult, cancel)
    }

    /// What an error of AsyncHTTPClient's means for the client.
    static func failure(_ error: Error) -> HookFailure {
        if let error = error as? HTTPClientError {
            if error == .deadlineExceeded || error == .readTimeout || error == .connectTimeout {
                return HookFailure(.timeout, "authorization hook did not answer in time")
            }
            if error == .remoteConnectionClosed || error == .bodyLengthMismatch {
                return HookFailure(.badAnswer, "authorization hook closed the connection without a complete answer")
            }
        }
        if error is HTTPParserError {
            return HookFailure(.badAnswer, "authorization hook's answer is not HTTP")
        }
        return HookFailure(.unreachable, "authorization hook unreachable")
    }

    public func shutdown() async {
        try? await self.client.shutdown()
    }
}

/// Keeps the response head; the body is read (so the connection can be kept) and dropped.
private final class HeadOnlyDelegate: HTTPClientResponseDelegate {
    typealias Response = HTTPResponseHead
    private let head = NIOLockedValueBox<HTTPResponseHead?>(nil)

    func didReceiveHead(task: HTTPClient.Task<HTTPResponseHead>, _ head: HTTPResponseHead) -> EventLoopFuture<Void> {
        self.head.withLockedValue { $0 = head }
        return task.eventLoop.makeSucceededVoidFuture()
    }

    func didFinishRequest(task: HTTPClient.Task<HTTPResponseHead>) throws -> HTTPResponseHead {
        guard let head = self.head.withLockedValue({ $0 }) else { throw HTTPClientError.remoteConnectionClosed }
        return head
    }
}
