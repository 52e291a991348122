import Atomics
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import StapsCluster

#if canImport(Glibc)
import Glibc
#endif

/// Settings of the RabbitMQ link: the broker URLs, the node's `ClusterSettings` (whose `init`
/// defaults are the documented defaults) and this node's id.
public struct RabbitConfiguration: Sendable {
    /// Nodes of one RabbitMQ cluster: the link starts at a random one and moves to the next on loss.
    public var urls: [AMQPURL]
    public var settings: ClusterSettings
    /// This node's id, carried in every message so a node skips its own.
    public var nodeID: String

    public init(urls: [AMQPURL], settings: ClusterSettings = ClusterSettings(), nodeID: String = RabbitConfiguration.makeNodeID()) {
        precondition(!urls.isEmpty, "at least one broker URL")
        self.urls = urls
        self.settings = settings
        self.nodeID = nodeID
    }

    public init(url: AMQPURL, settings: ClusterSettings = ClusterSettings(), nodeID: String = RabbitConfiguration.makeNodeID()) {
        self.init(urls: [url], settings: settings, nodeID: nodeID)
    }

    public static func makeNodeID() -> String {
        var name = [CChar](repeating: 0, count: 256)
        gethostname(&name, name.count - 1)
        let host = String(decoding: name.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return "\(host)-\(getpid())-\(UUID4.make().prefix(8))"
    }
}

/// What the link counts; read by tests, logs and metrics (through `ClusterLinkReport`).
public final class RabbitCounters: Sendable {
    /// Messages the broker confirmed (publisher confirms).
    public let published = ManagedAtomic<Int>(0)
    /// Messages from other nodes the broker delivered here (`discarded` included).
    public let received = ManagedAtomic<Int>(0)
    /// Of `received`, those for a channel without local clients (a bucket binding, or a
    /// binding lingering after the last client left), dropped before their payload was copied.
    public let discarded = ManagedAtomic<Int>(0)
    /// Messages that did not reach the broker because it was unreachable: handed in while down,
    /// waiting when the link was lost, or written to a connection that died before the broker
    /// confirmed them.
    public let droppedWhileDown = ManagedAtomic<Int>(0)
    /// Dropped because the outbound buffer was full (broker slower than the clients, or blocked).
    public let droppedBufferFull = ManagedAtomic<Int>(0)
    /// Dropped because they waited for the broker longer than `amqp_max_age` (broker slower
    /// than the clients, or blocked): not sent late.
    public let droppedExpired = ManagedAtomic<Int>(0)
    /// Refused by the broker (`basic.nack`).
    public let rejected = ManagedAtomic<Int>(0)
    /// Bodies from other nodes that were not in the wire format (nothing of them is delivered).
    public let malformed = ManagedAtomic<Int>(0)
    /// Messages of other nodes' streams on channels with local clients that never arrived:
    /// numbers a later message of the stream skipped (`StreamGaps`), whatever lost them
    /// (the sender's drops, the queue's bounds, a lost connection or broker node). Once per
    /// message and this node, not per client. Written by the link's thread only.
    public let missed = ManagedAtomic<Int>(0)
    /// Messages that arrived numbered at or before one already received on their stream.
    public let outOfOrder = ManagedAtomic<Int>(0)
    public let reconnects = ManagedAtomic<Int>(0)
    /// Binding keys bound for this node's queue on the current connection (`bind-ok`
    /// received), by granularity: exact, 4096, 256 and 16 buckets (`BindingGranularity` order).
    public let bindingKeysBound = [ManagedAtomic<Int>(0), ManagedAtomic<Int>(0), ManagedAtomic<Int>(0), ManagedAtomic<Int>(0)]
    /// Binding keys still to rebind after a reconnection (0 once all are back).
    public let rebindsLeft = ManagedAtomic<Int>(0)
    /// Binds the broker answered, by granularity (`BindingGranularity` order; written by the link's thread only).
    public let bindsDone = [ManagedAtomic<Int>(0), ManagedAtomic<Int>(0), ManagedAtomic<Int>(0), ManagedAtomic<Int>(0)]
    /// Binds and unbinds sent or queued and not answered yet.
    public let bindsWaiting = ManagedAtomic<Int>(0)
    /// Microseconds from a bind's request to the broker's `bind-ok` (written by the link's thread only).
    public let bindLatency = CountHistogram(bounds: RabbitCounters.latencyBounds)
    /// Histogram bounds in microseconds: 100 µs to 10 s.
    public static let latencyBounds = [100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100_000, 250_000, 1_000_000, 10_000_000]
    /// Messages per publish (written by the link's thread only).
    public let publishBatch = CountHistogram(bounds: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000])
    public init() {}

    /// Binding keys bound on the current connection, every granularity.
    public var bindingKeysBoundTotal: Int { self.bindingKeysBound.reduce(0) { $0 + $1.load(ordering: .relaxed) } }

    /// The gauges the link's thread keeps from its bindings.
    func update(from bindings: BindingPipeline) {
        for (gauge, n) in zip(self.bindingKeysBound, bindings.topology.boundByGranularity) { gauge.store(n, ordering: .relaxed) }
        self.rebindsLeft.store(bindings.rebindsLeft, ordering: .relaxed)
        self.bindsWaiting.store(bindings.inFlight, ordering: .relaxed)
    }
}

/// Why a join could not wait for its binding: the link stopped.
public struct LinkStopped: Error, CustomStringConvertible {
    public var description: String { "the broker link is stopping" }
}

/// The RabbitMQ cluster link.
///
/// rabbitmq-c is blocking and a connection is not thread-safe, so one owner thread does all
/// broker work (`LinkWorker`): it owns a publish connection and a consume connection and polls
/// their sockets plus the handoff's eventfd. The event loops only append to the `LoopHandoff`; they
/// never wait on the broker.
public final class RabbitLink: ClusterLink, Sendable {
    public let configuration: RabbitConfiguration
    public let counters = RabbitCounters()
    let logger: Logger
    let handoff: LoopHandoff
    private let thread = NIOThreadPool(numberOfThreads: 1)
    /// True while connected (set by the link's thread): publishes are dropped at once while not.
    /// Joins do not read it: the handoff keeps its own, under its lock.
    let connectedFlag = ManagedAtomic<Bool>(false)
    /// Called on the link's thread just after a connection counts as up in the handoff (tests).
    let afterLinkUp: (@Sendable () -> Void)?
    /// Tests: while true the link reads nothing from its consume connection (as while the event
    /// loops are behind), so the broker holds this node's messages in its queue and its bounds
    /// drop them.
    let holdingConsumer = ManagedAtomic<Bool>(false)
    /// The broker and queue of the current connection (nil while down), set by the worker.
    let status = NIOLockedValueBox<(broker: AMQPURL, queue: String)?>(nil)
    let stopped = ManagedAtomic<Bool>(false)
    private let started = ManagedAtomic<Bool>(false)
    private let finished: EventLoopPromise<Void>
    private let finishLoop = MultiThreadedEventLoopGroup(numberOfThreads: 1)

    public convenience init(configuration: RabbitConfiguration, logger: Logger) {
        self.init(configuration: configuration, logger: logger, afterLinkUp: nil)
    }

    init(configuration: RabbitConfiguration, logger: Logger, afterLinkUp: (@Sendable () -> Void)?) {
        self.configuration = configuration
        self.logger = logger
        self.afterLinkUp = afterLinkUp
        let settings = configuration.settings
        self.handoff = LoopHandoff(capacity: settings.publishBuffer, maxAge: settings.maxAge)
        self.finished = self.finishLoop.next().makePromise()
    }

    /// True while both connections are up and the queue is consumed (publishing works; binding
    /// keys may still be bound again after a reconnection).
    public var isConnected: Bool { self.connectedFlag.load(ordering: .relaxed) }

    public var isClustered: Bool { true }

    public var statusDescription: String {
        if let broker = self.currentBroker { return "connected to \(broker)" }
        return "unreachable (serving local clients)"
    }

    public var report: ClusterLinkReport? {
        let c = self.counters
        let up = self.isConnected
        let rebinds = c.rebindsLeft.load(ordering: .relaxed)
        let notReady: String?
        if self.stopped.load(ordering: .relaxed) {
            notReady = "the broker link is stopping"
        } else if !up {
            notReady = "the broker is unreachable (reconnecting; local clients are served)"
        } else if rebinds > 0 {
            notReady = "binding \(rebinds) binding keys again after reconnecting to the broker"
        } else {
            notReady = nil
        }
        return ClusterLinkReport(
            up: up, notReady: notReady,
            reconnects: c.reconnects.load(ordering: .relaxed),
            published: c.published.load(ordering: .relaxed),
            consumed: c.received.load(ordering: .relaxed),
            dropped: [
                ("broker_down", c.droppedWhileDown.load(ordering: .relaxed)),
                ("buffer_full", c.droppedBufferFull.load(ordering: .relaxed)),
                ("expired", c.droppedExpired.load(ordering: .relaxed)),
                ("rejected", c.rejected.load(ordering: .relaxed)),
                ("malformed", c.malformed.load(ordering: .relaxed)),
            ],
            bindings: zip(BindingGranularity.allCases, c.bindingKeysBound).map { ($0.description, $1.load(ordering: .relaxed)) },
            rebindsPending: rebinds,
            bindsWaiting: c.bindsWaiting.load(ordering: .relaxed),
            discarded: c.discarded.load(ordering: .relaxed),
            missed: c.missed.load(ordering: .relaxed),
            outOfOrder: c.outOfOrder.load(ordering: .relaxed),
            publishBatch: c.publishBatch,
            bindLatency: c.bindLatency
        )
    }

    /// The broker this node is on, while connected.
    public var currentBroker: AMQPURL? { self.status.withLockedValue { $0?.broker } }

    /// This node's queue on the broker, while connected.
    public var queueName: String? { self.status.withLockedValue { $0?.queue } }

    public func start(receiver: any ClusterReceiver) {
        guard !self.started.exchange(true, ordering: .relaxed) else { return }
        self.thread.start()
        let worker = LinkWorker(link: self, receiver: receiver)
        self.thread.submit { _ in
            worker.run()
            self.finished.succeed(())
        }
    }

    public func startReceiving(channel: String, whenBound promise: EventLoopPromise<Void>) {
        self.handoff.startReceiving(channel: channel, whenBound: promise)
    }

    public func awaitBinding(channel: String, promise: EventLoopPromise<Void>) {
        self.handoff.awaitBinding(channel: channel, promise: promise)
    }

    public func stopReceiving(channel: String) {
        self.handoff.stopReceiving(channel: channel)
    }

    public func publish(_ batch: [ClusterMessage]) {
        guard self.connectedFlag.load(ordering: .relaxed) else {
            self.handoff.skip(publishes: batch)
            self.counters.droppedWhileDown.wrappingIncrement(by: batch.count, ordering: .relaxed)
            return
        }
        let bytes = batch.reduce(0) { $0 + PendingPublishes.bytes(of: $1) }
        if !self.handoff.add(publishes: batch, bytes: bytes) {
            self.counters.droppedBufferFull.wrappingIncrement(by: batch.count, ordering: .relaxed)
        }
    }

    /// Stops the worker: joins still waiting for a binding fail (their handshakes get 503), and
    /// so does every later one. Safe to call more than once.
    public func shutdown() async {
        guard !self.stopped.exchange(true, ordering: .relaxed) else { return }
        self.handoff.sleeping.store(true, ordering: .sequentiallyConsistent)
        self.handoff.wake()
        if self.started.load(ordering: .relaxed) {
            try? await self.finished.futureResult.get()
        } else {
            LinkWorker.failAll(self.handoff.close(), counters: self.counters)
        }
        try? await self.thread.shutdownGracefully()
        try? await self.finishLoop.shutdownGracefully()
    }
}
