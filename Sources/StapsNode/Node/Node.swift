import Atomics
import Dispatch
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
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

/// A staps node: listeners, the hub, and graceful shutdown.
public final class Node: Sendable {
    public let configuration: NodeConfiguration
    /// This node's id: sent as `X-Staps-Node` on every response, and used by the cluster link.
    public let nodeID: String
    public let counters = NodeCounters()
    let logger: Logger
    let group: MultiThreadedEventLoopGroup
    private let ownsGroup: Bool
    let hub: Hub
    let link: any ClusterLink
    let connectionCount = ManagedAtomic<Int>(0)
    private let connectionIDs = ManagedAtomic<UInt64>(0)
    private let openConnections = NIOLockedValueBox<[ObjectIdentifier: Channel]>([:])

    struct Listener: Sendable {
        var serverChannel: Channel
        var address: BindAddress
        /// The socket file's inode, so shutdown removes only the file this node made.
        var inode: UInt64?
    }
    let listeners = NIOLockedValueBox<[Listener]>([])
    let metricsListener = NIOLockedValueBox<Listener?>(nil)
    let metricsConnections = NIOLockedValueBox<[ObjectIdentifier: Channel]>([:])
    let metricsRefresh = NIOLockedValueBox<RepeatedTask?>(nil)
    let metricsQueue = DispatchQueue(label: "staps.metrics")
    let memoryTrim = NIOLockedValueBox<RepeatedTask?>(nil)
    let accepting = ManagedAtomic<Bool>(false)
    let stopping = ManagedAtomic<Bool>(false)
    /// The node's metrics (served by the metrics listener when `metrics` is set).
    public let metrics: NodeMetrics
    /// The authorization hook's client: made by `start()` when `auth_url` is set, shut down
    /// by `shutdown()` once no connection can ask it any more.
    private let authorizer = NIOLockedValueBox<Authorizer?>(nil)
    private let hookTransport: HookTransportFactory?

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
    }

    /// Connections a listener's kernel queue holds before they are accepted (capped by
    /// net.core.somaxconn; systemd's own default for socket units).
    static let backlog: Int32 = 4096

    /// Messages received from local clients so far (websocket messages relayed, POSTs).
    public var messagesReceived: (websocket: Int, post: Int) { self.hub.messagesReceived }

    /// The addresses actually bound (TCP port 0 resolved).
    public var boundAddresses: [BindAddress] {
        self.listeners.withLockedValue { $0.map(\.address) }
    }

    /// A listening socket handed over by the service manager (socket activation).
    public struct InheritedListener: Sendable {
        public var fd: Int32
        public var name: String
        public init(fd: Int32, name: String) {
            self.fd = fd
            self.name = name
        }
    }

    /// Binds every listener (or takes over `inherited` ones instead, as socket activation
    /// hands them over); on any failure, closes what was bound and throws.
    ///
    /// - Parameters:
    ///   - accepting: false to bind without accepting yet (to drop privileges first); then
    ///     `startAccepting()`.
    ///   - socketGroup: the group to give created socket files (they get `mode` too, and never
    ///     exist with a looser one: each socket is made 0600 before it is bound, see
    ///     `UnixSocketFile.bindPrivately(at:backlog:)`).
    public func start(accepting: Bool = true, inherited: [InheritedListener] = [], socketGroup: gid_t? = nil) async throws {
        if let url = self.configuration.access.hook.url {
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
        self.link.start(receiver: self.hub)
        self.startMemoryTrim()
        do {
            if inherited.isEmpty {
                for address in self.configuration.addresses {
                    let listener = try await self.bind(address, socketGroup: socketGroup) { tcp in self.bootstrap(accepting: accepting, tcp: tcp) }
                    self.listeners.withLockedValue { $0.append(listener) }
                    self.logger.notice("listening", metadata: ["address": "\(listener.address)"])
                }
            } else {
                for socket in inherited {
                    let serverChannel: Channel
                    do {
                        serverChannel = try await self.bootstrap(accepting: accepting, tcp: UnixSocketFile.isTCP(socket.fd)).withBoundSocket(socket.fd).get()
                    } catch {
                        throw NodeStartError(message: "cannot serve the inherited socket \(socket.name) (fd \(socket.fd)): \(error)")
                    }
                    // NIO listens again with a backlog of 128 when it takes a socket over.
                    _ = listen(socket.fd, Self.backlog)
                    let address: BindAddress
                    switch serverChannel.localAddress {
                    case .some(.unixDomainSocket): address = .unixDomainSocket(path: serverChannel.localAddress?.pathname ?? socket.name)
                    case .some(let a): address = .hostname(a.ipAddress ?? "?", port: a.port ?? 0)
                    case .none: address = .unixDomainSocket(path: socket.name)
                    }
                    // inode nil: the service manager owns the file; it is never removed here.
                    self.listeners.withLockedValue { $0.append(Listener(serverChannel: serverChannel, address: address, inode: nil)) }
                    self.logger.notice("listening on an inherited socket", metadata: ["address": "\(address)", "name": "\(socket.name)"])
                }
            }
            if let address = self.configuration.metricsAddress {
                let listener = try await self.bind(address, socketGroup: socketGroup, what: "metrics") { _ in self.metricsBootstrap() }
                self.metricsListener.withLockedValue { $0 = listener }
                self.startMetricsRefresh()
                self.logger.notice("serving metrics", metadata: ["address": "\(listener.address)"])
            }
        } catch {
            await self.closeListeners()
            await self.closeMetricsListener()
            await self.shutdownAuthorizer()
            throw error
        }
        if accepting { self.accepting.store(true, ordering: .relaxed) }
    }

    private func shutdownAuthorizer() async {
        let authorizer = self.authorizer.withLockedValue { a -> Authorizer? in
            defer { a = nil }
            return a
        }
        await authorizer?.shutdown()
    }

    /// Calls to the authorization hook in flight now (0 without a hook).
    public var authorizationCallsInFlight: Int {
        self.authorizer.withLockedValue { $0?.callsInFlight ?? 0 }
    }

    /// Starts accepting on listeners bound with `accepting: false`.
    public func startAccepting() async throws {
        for listener in self.listeners.withLockedValue({ $0 }) {
            try await listener.serverChannel.setOption(.autoRead, value: true).get()
        }
        self.accepting.store(true, ordering: .relaxed)
    }

    /// One line for the service manager: connections, channels, broker link.
    public var status: String {
        "connections \(self.connectionCount.load(ordering: .relaxed)), channels \(self.hub.directory.count), broker \(self.link.statusDescription)"
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

    /// - Parameter tcp: TCP listeners get `TCP_NODELAY` on their connections (an option unix
    ///   sockets refuse).
    private func bootstrap(accepting: Bool = true, tcp: Bool) -> ServerBootstrap {
        let shared = HTTPHandler.Shared(hub: self.hub, limits: self.configuration.limits, counters: self.counters, connectionIDs: self.connectionIDs, nodeID: self.nodeID, access: self.configuration.access, authorizer: self.authorizer.withLockedValue { $0 })
        let limits = self.configuration.limits
        let logger = self.logger
        let bootstrap = ServerBootstrap(group: self.group)
        if tcp { _ = bootstrap.childChannelOption(.tcpOption(.tcp_nodelay), value: 1) }
        return bootstrap
            .serverChannelOption(.backlog, value: Self.backlog)
            .serverChannelOption(.autoRead, value: accepting)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.writeBufferWaterMark, value: .init(low: limits.sendBuffer / 2, high: limits.sendBuffer))
            .childChannelOption(.maxMessagesPerRead, value: 16)
            .childChannelInitializer { [self] connection in
                let count = self.connectionCount.wrappingIncrementThenLoad(ordering: .relaxed)
                let open = tcp ? self.counters.tcpConnections : self.counters.unixConnections
                open.wrappingIncrement(ordering: .relaxed)
                let key = ObjectIdentifier(connection)
                self.openConnections.withLockedValue { $0[key] = connection }
                connection.closeFuture.whenComplete { _ in
                    self.connectionCount.wrappingDecrement(ordering: .relaxed)
                    open.wrappingDecrement(ordering: .relaxed)
                    self.openConnections.withLockedValue { $0[key] = nil }
                }
                var connectionLogger = logger
                if let remote = connection.remoteAddress { connectionLogger[metadataKey: "remote"] = "\(remote)" }
                do {
                    try ConnectionPipeline.configure(connection, shared: shared, overConnectionLimit: count > limits.maxConnections, logger: connectionLogger)
                    return connection.eventLoop.makeSucceededVoidFuture()
                } catch {
                    return connection.eventLoop.makeFailedFuture(error)
                }
            }
    }

    /// - Parameter what: how to name the listener in errors ("metrics" for the metrics one).
    private func bind(_ address: BindAddress, socketGroup: gid_t?, what: String? = nil, bootstrap makeBootstrap: (_ tcp: Bool) -> ServerBootstrap) async throws -> Listener {
        let prefix = what.map { "\($0): " } ?? ""
        switch address {
        case .hostname(let host, let port):
            let serverChannel: Channel
            do {
                serverChannel = try await makeBootstrap(true).bind(host: host, port: port).get()
            } catch {
                throw NodeStartError(message: "\(prefix)cannot listen on \(address): \(error)")
            }
            let bound = serverChannel.localAddress?.port.map { BindAddress.hostname(host, port: $0) } ?? address
            return Listener(serverChannel: serverChannel, address: bound, inode: nil)
        case .unixDomainSocket(let path):
            try UnixSocketFile.prepare(path)
            let serverChannel: Channel
            // Created owner-only, then given its mode: never looser than `mode`, not for an instant.
            let fd: Int32
            do {
                fd = try UnixSocketFile.bindPrivately(at: path, backlog: Self.backlog)
            } catch {
                throw NodeStartError(message: "\(prefix)\(error)")
            }
            do {
                serverChannel = try await makeBootstrap(false).withBoundSocket(fd).get()
            } catch {
                // NIO closed the descriptor if it made a channel of it; closing it here again
                // could close another's. Only a failure before that leaks it, on a failed start.
                unlink(path)
                throw NodeStartError(message: "\(prefix)cannot listen on \(path): \(error)")
            }
            // NIO listens again with a backlog of 128 when it takes a socket over.
            _ = listen(fd, Self.backlog)
            func fail(_ message: String) async -> NodeStartError {
                let reason = String(cString: strerror(errno))
                try? await serverChannel.close()
                unlink(path)
                return NodeStartError(message: "\(prefix)\(message): \(reason)")
            }
            if let gid = socketGroup, chown(path, uid_t.max, gid) != 0 {
                throw await fail("cannot give \(path) to group \(gid)")
            }
            guard chmod(path, mode_t(self.configuration.socketMode)) == 0 else {
                throw await fail("cannot set mode \(String(self.configuration.socketMode, radix: 8)) on \(path)")
            }
            return Listener(serverChannel: serverChannel, address: address, inode: UnixSocketFile.inode(path))
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

    private func closeListeners() async {
        let listeners = self.listeners.withLockedValue { l -> [Listener] in
            let out = l
            l.removeAll()
            return out
        }
        // Stop accepting first, and let any accept already under way finish setting its
        // connections up: closing a listener in the middle of an accept batch drops the
        // connections of that batch unanswered. What waits in the kernel's backlog stays there
        // (for the next process, when the socket is inherited).
        for listener in listeners {
            try? await listener.serverChannel.setOption(.autoRead, value: false).get()
        }
        await self.drainEventLoops()
        for listener in listeners {
            try? await listener.serverChannel.close()
            UnixSocketFile.remove(listener)
        }
    }

    /// Graceful shutdown: stop accepting, close every websocket with 1001, wait up to the
    /// shutdown timeout for the clients to answer, drop the rest, remove socket files.
    public func shutdown() async {
        self.logger.notice("shutting down")
        self.stopping.store(true, ordering: .relaxed)
        self.memoryTrim.withLockedValue { $0?.cancel(); $0 = nil }
        await self.closeListeners()
        // Connections accepted just before the listeners closed are set up by tasks already
        // queued on their event loops: once those ran, each is counted and told to finish
        // its request (an accepted request is answered, not dropped).
        await self.drainEventLoops()
        for connection in self.openConnections.withLockedValue({ Array($0.values) }) {
            connection.pipeline.fireUserInboundEventTriggered(ShutdownEvent())
        }
        let deadline = NIODeadline.now() + self.configuration.limits.shutdownTimeout
        while self.connectionCount.load(ordering: .relaxed) > 0, NIODeadline.now() < deadline {
            try? await Task.sleep(nanoseconds: 10_000_000)
        }
        let remaining = self.openConnections.withLockedValue { Array($0.values) }
        if !remaining.isEmpty {
            self.logger.notice("dropping connections that did not close in time", metadata: ["count": "\(remaining.count)"])
            for connection in remaining { try? await connection.close() }
        }
        // No connection is left to wait for the hook: its pending calls, if any, are cancelled.
        await self.shutdownAuthorizer()
        await self.link.shutdown()
        // Last: /readyz says "shutting down" while connections drain.
        await self.closeMetricsListener()
        if self.ownsGroup { try? await self.group.shutdownGracefully() }
        let received = self.hub.messagesReceived
        var totals: Logger.Metadata = ["messages.in": "\(received.websocket + received.post)"]
        if self.link.isClustered { totals["cluster.unmatched"] = "\(self.counters.clusterUnmatched.load(ordering: .relaxed))" }
        self.logger.notice("stopped", metadata: totals)
    }
}

extension UnixSocketFile {
    /// Removes `listener`'s socket file if it is still the one this node made.
    static func remove(_ listener: Node.Listener) {
        guard case .unixDomainSocket(let path) = listener.address, let inode = listener.inode, Self.inode(path) == inode else { return }
        unlink(path)
    }
}
