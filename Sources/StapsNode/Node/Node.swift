import Atomics
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import StapsCluster

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Why a node could not start.
public struct NodeStartError: Error, CustomStringConvertible {
    public var message: String
    public init(message: String) { self.message = message }
    public var description: String { message }
}

/// A staps node: its listeners, the hub, and graceful shutdown.
///
/// `start` binds the listeners (`Listener`), `shutdown` stops accepting, asks every connection
/// to finish, and closes what is left. The metrics listener (`MetricsServer`) and the memory
/// trimmer (`MemoryTrimmer`) are the node's, started and stopped with it.
public final class Node: Sendable {
    public let configuration: NodeConfiguration
    /// This node's id: sent as `X-Staps-Node` on every response, and used by the cluster link.
    public let nodeID: String
    public let counters = NodeCounters()
    /// The node's metrics (served by the metrics listener when `metrics` is set).
    public let metrics: NodeMetrics
    /// Internal, not private: tests look into the channel directory.
    let hub: Hub
    private let logger: Logger
    private let group: MultiThreadedEventLoopGroup
    private let ownsGroup: Bool
    private let link: any ClusterLink
    private let listeners = Listeners()
    private let connections = OpenConnections()
    private let connectionIDs = ManagedAtomic<UInt64>(0)
    private let metricsServer: MetricsServer
    private let memoryTrimmer: MemoryTrimmer
    private let phase = ManagedAtomic<Phase>(.starting)
    /// The authorization hook's client: made by `start()` when `auth_url` is set, shut down
    /// by `shutdown()` once no connection can ask it any more.
    private let authorizer = NIOLockedValueBox<Authorizer?>(nil)
    private let hookTransport: HookTransportFactory?

    private enum Phase: UInt8, AtomicValue {
        /// Bound, or binding, without accepting yet.
        case starting
        case accepting
        case stopping
    }

    /// - Parameters:
    ///   - link: how to reach other nodes; `StandaloneLink()` when there is no broker.
    ///   - group: event loops to run on; by default one per core, owned by the node.
    ///   - hookTransport: makes the authorization hook's client at start when `auth_url` is
    ///     set (`HTTPHookTransport.factory`, module `StapsHook`); without it such a node does
    ///     not start.
    public init(configuration: NodeConfiguration, link: any ClusterLink = StandaloneLink(), logger: Logger, nodeID: String = String(UUID4.make().prefix(8)), group: MultiThreadedEventLoopGroup? = nil, hookTransport: HookTransportFactory? = nil) {
        self.configuration = configuration
        self.hookTransport = hookTransport
        self.nodeID = nodeID
        self.logger = logger
        self.link = link
        if let group {
            self.group = group
            self.ownsGroup = false
        } else {
            self.group = MultiThreadedEventLoopGroup(numberOfThreads: min(System.coreCount, 64))
            self.ownsGroup = true
        }
        self.hub = Hub(eventLoops: Array(self.group.makeIterator()), link: link, framing: WebSocketMessageFraming(), counters: self.counters, logger: logger)
        self.metrics = NodeMetrics(NodeMetrics.Sources(hub: self.hub, counters: self.counters, link: link, hooked: configuration.access.hook.url != nil))
        self.metricsServer = MetricsServer(metrics: self.metrics, group: self.group)
        self.memoryTrimmer = MemoryTrimmer(hub: self.hub, counters: self.counters, connections: self.connections)
    }

    /// Messages received from local clients so far (websocket messages relayed, POSTs).
    public var messagesReceived: (websocket: Int, post: Int) { self.hub.messagesReceived }

    /// The addresses actually bound (TCP port 0 resolved).
    public var boundAddresses: [BindAddress] { self.listeners.addresses }

    /// The metrics listener's address (TCP port 0 resolved), when there is one.
    public var metricsAddress: BindAddress? { self.metricsServer.address }

    /// Calls to the authorization hook in flight now (0 without a hook).
    public var authorizationCallsInFlight: Int {
        self.authorizer.withLockedValue { $0?.callsInFlight ?? 0 }
    }

    /// One line for the service manager: connections, channels, broker link.
    public var status: String {
        "connections \(self.connections.count), channels \(self.hub.directory.count), broker \(self.link.statusDescription)"
    }

    /// Why a load balancer should send this node nothing now, or nil when it is ready: every
    /// listener is up and accepting and, when clustered, the broker link is up and bound.
    public var notReady: String? {
        switch self.phase.load(ordering: .relaxed) {
        case .stopping: return "shutting down"
        case .starting: return "not accepting connections yet"
        case .accepting: return self.listeners.down ?? self.link.report?.notReady
        }
    }

    /// Binds every listener (or takes over `inherited` ones instead, as socket activation
    /// hands them over) and the metrics listener; on any failure, closes what was bound and
    /// throws.
    ///
    /// - Parameters:
    ///   - accepting: false to bind without accepting yet (to drop privileges first); then
    ///     `startAccepting()`.
    ///   - socketGroup: the group to give created socket files (they get `mode` too, and never
    ///     exist with a looser one: see `Listener.bind`).
    public func start(accepting: Bool = true, inherited: [InheritedListener] = [], socketGroup: gid_t? = nil) async throws {
        try self.startAuthorizer()
        self.link.start(receiver: self.hub)
        self.memoryTrimmer.start(on: self.group.next())
        do {
            try await self.bindListeners(accepting: accepting, inherited: inherited, socketGroup: socketGroup)
            if let address = self.configuration.metricsAddress {
                try await self.metricsServer.start(at: address, mode: self.configuration.socketMode, socketGroup: socketGroup) { [self] in self.notReady }
                self.logger.notice("serving metrics", metadata: ["address": "\(self.metricsServer.address ?? address)"])
            }
        } catch {
            await self.listeners.close(settle: self.drainEventLoops)
            await self.metricsServer.close()
            await self.shutdownAuthorizer()
            throw error
        }
        if accepting { self.phase.store(.accepting, ordering: .relaxed) }
    }

    private func bindListeners(accepting: Bool, inherited: [InheritedListener], socketGroup: gid_t?) async throws {
        guard inherited.isEmpty else {
            for socket in inherited {
                let listener = try await Listener.adopt(socket) { tcp in self.bootstrap(accepting: accepting, tcp: tcp) }
                self.listeners.add(listener)
                self.logger.notice("listening on an inherited socket", metadata: ["address": "\(listener.address)", "name": "\(socket.name)"])
            }
            return
        }
        for address in self.configuration.addresses {
            let listener = try await Listener.bind(address, mode: self.configuration.socketMode, socketGroup: socketGroup) { tcp in self.bootstrap(accepting: accepting, tcp: tcp) }
            self.listeners.add(listener)
            self.logger.notice("listening", metadata: ["address": "\(listener.address)"])
        }
    }

    /// Starts accepting on listeners bound with `accepting: false`.
    public func startAccepting() async throws {
        try await self.listeners.startAccepting()
        _ = self.phase.compareExchange(expected: .starting, desired: .accepting, ordering: .relaxed)
    }

    private func startAuthorizer() throws {
        guard let url = self.configuration.access.hook.url else { return }
        let settings = self.configuration.access.hook
        guard let makeTransport = self.hookTransport else {
            throw NodeStartError(message: "auth_url is set, but this node was made without a hook client")
        }
        let transport = try makeTransport(url, settings, self.group)
        self.authorizer.withLockedValue { $0 = Authorizer(settings: settings, transport: transport, counters: self.counters, logger: self.logger) }
        self.logger.notice("authorization hook", metadata: [
            "auth.url": "\(url.logged)", "auth.timeout_ms": "\(settings.timeout.nanoseconds / 1_000_000)", "auth.concurrency": "\(settings.concurrency)",
        ])
    }

    private func shutdownAuthorizer() async {
        let authorizer = self.authorizer.withLockedValue { a -> Authorizer? in
            defer { a = nil }
            return a
        }
        await authorizer?.shutdown()
    }

    /// Runs a no-op on every event loop in turn and calls `done` once all have run it: a
    /// watchdog that pings only then notices a wedged loop.
    public func pingEventLoops(_ done: @escaping @Sendable () -> Void) {
        Self.ping(Array(self.group.makeIterator())[...], then: done)
    }

    private static func ping(_ loops: ArraySlice<EventLoop>, then done: @escaping @Sendable () -> Void) {
        guard let first = loops.first else { return done() }
        first.execute { ping(loops.dropFirst(), then: done) }
    }

    /// How a connection's reads are sized. NIO keeps a connection's last receive buffer for its
    /// next read, for as long as the connection lives: NIO's default first buffer (2 KiB) was a
    /// third of an idle websocket's memory. A handshake (about 150–600 bytes) fits in 256 or
    /// takes a second read; a busy publisher's reads still double, per full read, up to 64 KiB.
    static let receiveBuffers = AdaptiveRecvByteBufferAllocator(minimum: 64, initial: 256, maximum: 64 << 10)

    /// The bootstrap of a client listener.
    ///
    /// - Parameter tcp: TCP listeners get `TCP_NODELAY` on their connections (an option unix
    ///   sockets refuse).
    private func bootstrap(accepting: Bool = true, tcp: Bool) -> ServerBootstrap {
        let shared = HTTPHandler.Shared(hub: self.hub, limits: self.configuration.limits, counters: self.counters, connectionIDs: self.connectionIDs, nodeID: self.nodeID, access: self.configuration.access, authorizer: self.authorizer.withLockedValue { $0 })
        let limits = self.configuration.limits
        let logger = self.logger
        let connections = self.connections
        let open = tcp ? self.counters.tcpConnections : self.counters.unixConnections
        let bootstrap = ServerBootstrap(group: self.group)
        if tcp { _ = bootstrap.childChannelOption(.tcpOption(.tcp_nodelay), value: 1) }
        return bootstrap
            .serverChannelOption(.backlog, value: Listener.backlog)
            .serverChannelOption(.autoRead, value: accepting)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.writeBufferWaterMark, value: .init(low: limits.sendBuffer / 2, high: limits.sendBuffer))
            .childChannelOption(.maxMessagesPerRead, value: 16)
            .childChannelOption(.recvAllocator, value: Self.receiveBuffers)
            .childChannelInitializer { connection in
                let count = connections.add(connection, gauge: open)
                return connection.eventLoop.makeCompletedFuture {
                    try ConnectionPipeline.configure(connection, shared: shared, overConnectionLimit: count > limits.maxConnections, logger: logger)
                }
            }
    }

    /// Lets every event loop run what is queued on it (twice: a connection's registration
    /// takes a task, then its initializer another).
    private func drainEventLoops() async {
        for _ in 0..<2 {
            for loop in self.group.makeIterator() {
                try? await loop.submit {}.get()
            }
        }
    }

    /// Graceful shutdown: stop accepting, close every websocket with 1001, wait up to the
    /// shutdown timeout for the clients to answer, drop the rest, remove socket files.
    public func shutdown() async {
        self.logger.notice("shutting down")
        self.phase.store(.stopping, ordering: .relaxed)
        self.memoryTrimmer.stop()
        await self.listeners.close(settle: self.drainEventLoops)
        // Connections accepted just before the listeners closed are set up by tasks already
        // queued on their event loops: once those ran, each is counted and told to finish
        // its request (an accepted request is answered, not dropped).
        await self.drainEventLoops()
        for connection in self.connections.all {
            connection.pipeline.fireUserInboundEventTriggered(ChannelShouldQuiesceEvent())
        }
        let deadline = NIODeadline.now() + self.configuration.limits.shutdownTimeout
        let left = await self.connections.waitUntilClosed(by: deadline, on: self.group.next())
        if left > 0 {
            self.logger.notice("dropping connections that did not close in time", metadata: ["count": "\(left)"])
            await self.connections.closeAll()
        }
        // No connection is left to wait for the hook: its pending calls, if any, are cancelled.
        await self.shutdownAuthorizer()
        await self.link.shutdown()
        // Last: /readyz says "shutting down" while connections drain.
        await self.metricsServer.close()
        if self.ownsGroup { try? await self.group.shutdownGracefully() }
        let received = self.hub.messagesReceived
        var totals: Logger.Metadata = ["messages.in": "\(received.websocket + received.post)"]
        if self.link.isClustered { totals["cluster.unmatched"] = "\(self.counters.clusterUnmatched.load(ordering: .relaxed))" }
        self.logger.notice("stopped", metadata: totals)
    }
}
