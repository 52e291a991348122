import Dispatch
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The metrics listener: `/metrics`, `/healthz` and `/readyz` on an address of its own, apart
/// from the clients. It holds its listener, its connections (at most
/// `MetricsEndpoint.maxConnections`) and the queue the metrics are rendered on.
final class MetricsServer: Sendable {
    private let metrics: NodeMetrics
    private let group: EventLoopGroup
    /// Where `MetricsEndpoint` renders the metrics, off the event loops.
    private let queue = DispatchQueue(label: "staps.metrics")
    private let listener = NIOLockedValueBox<Listener?>(nil)
    private let connections = OpenConnections()

    init(metrics: NodeMetrics, group: EventLoopGroup) {
        self.metrics = metrics
        self.group = group
    }

    /// The address served (TCP port 0 resolved), while there is a listener.
    var address: BindAddress? { self.listener.withLockedValue { $0?.address } }

    /// Binds `address` (a unix socket file gets `mode` and `socketGroup`, as the client ones).
    ///
    /// - Parameter notReady: why the node should get no traffic now (nil when ready), for `/readyz`.
    func start(at address: BindAddress, mode: UInt32, socketGroup: gid_t?, notReady: @escaping @Sendable () -> String?) async throws {
        let endpoint = MetricsEndpoint(metrics: self.metrics, notReady: notReady, queue: self.queue)
        let listener = try await Listener.bind(address, mode: mode, socketGroup: socketGroup, what: "metrics") { _ in self.bootstrap(endpoint) }
        self.listener.withLockedValue { $0 = listener }
    }

    private func bootstrap(_ endpoint: MetricsEndpoint) -> ServerBootstrap {
        let connections = self.connections
        return ServerBootstrap(group: self.group)
            .serverChannelOption(.backlog, value: 64)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.maxMessagesPerRead, value: 4)
            .childChannelInitializer { connection in
                guard connections.add(connection) <= MetricsEndpoint.maxConnections else { return connection.close() }
                return connection.eventLoop.makeCompletedFuture {
                    try connection.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try connection.pipeline.syncOperations.addHandler(MetricsHTTPHandler(endpoint: endpoint))
                }
            }
    }

    /// Closes the listener and its connections, and lets a render under way finish (it
    /// answers only connections still open) before the event loops go.
    func close() async {
        guard let listener = self.listener.withLockedValue({ l -> Listener? in defer { l = nil }; return l }) else { return }
        await listener.close()
        await self.connections.closeAll()
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            self.queue.async { done.resume() }
        }
    }
}
