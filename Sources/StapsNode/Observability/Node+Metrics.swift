import Dispatch
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix

/// The metrics listener (`/metrics`, `/healthz`, `/readyz`) and readiness.
extension Node {
    /// The metrics listener's address (TCP port 0 resolved), when there is one.
    public var metricsAddress: BindAddress? { self.metricsListener.withLockedValue { $0?.address } }

    /// Why a load balancer should send this node nothing now, or nil when it is ready: every
    /// listener is up and accepting and, when clustered, the broker link is up and bound.
    public var notReady: String? {
        if self.stopping.load(ordering: .relaxed) { return "shutting down" }
        if !self.accepting.load(ordering: .relaxed) { return "not accepting connections yet" }
        let listeners = self.listeners.withLockedValue { $0 }
        if listeners.isEmpty { return "no listener is up" }
        if let down = listeners.first(where: { !$0.serverChannel.isActive }) { return "listener \(down.address) is down" }
        return self.link.report?.notReady
    }

    /// The metrics listener: `/metrics`, `/healthz`, `/readyz`, nothing else.
    func metricsBootstrap() -> ServerBootstrap {
        let endpoint = MetricsEndpoint(metrics: self.metrics, notReady: { [self] in self.notReady }, queue: self.metricsQueue)
        let connections = self.metricsConnections
        return ServerBootstrap(group: self.group)
            .serverChannelOption(.backlog, value: 64)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.maxMessagesPerRead, value: 4)
            .childChannelInitializer { connection in
                let key = ObjectIdentifier(connection)
                let admitted = connections.withLockedValue { open -> Bool in
                    guard open.count < MetricsEndpoint.maxConnections else { return false }
                    open[key] = connection
                    return true
                }
                guard admitted else { return connection.close() }
                connection.closeFuture.whenComplete { _ in connections.withLockedValue { $0[key] = nil } }
                return connection.eventLoop.makeCompletedFuture {
                    try connection.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try connection.pipeline.syncOperations.addHandler(MetricsHTTPHandler(endpoint: endpoint))
                }
            }
    }

    /// Closes the metrics listener and its connections, and lets a render under way finish
    /// (it answers only connections still open) before the event loops go.
    func closeMetricsListener() async {
        guard let listener = self.metricsListener.withLockedValue({ l -> Listener? in defer { l = nil }; return l }) else { return }
        try? await listener.serverChannel.close()
        UnixSocketFile.remove(listener)
        for connection in self.metricsConnections.withLockedValue({ Array($0.values) }) {
            try? await connection.close()
        }
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            self.metricsQueue.async { done.resume() }
        }
    }
}
