import NIOCore

/// A message crossing between nodes: the payload of one websocket message on one channel.
public struct ClusterMessage: Sendable {
    /// The channel name (decoded path without the leading `/`).
    public var channel: String
    /// The message payload, unframed.
    public var payload: ByteBuffer
    /// Text (opcode 1) or binary (opcode 2).
    public var isText: Bool
    /// The sending connection's id on its node (0 for an HTTP POST).
    public var connectionID: UInt64
    /// Its place in the sending node's stream on the channel, given by the link when the node
    /// hands it over (nil: unnumbered, for a channel the node does not hold); see `StreamPosition`.
    public var position: StreamPosition?

    public init(channel: String, payload: ByteBuffer, isText: Bool, connectionID: UInt64, position: StreamPosition? = nil) {
        self.channel = channel
        self.payload = payload
        self.isText = isText
        self.connectionID = connectionID
        self.position = position
    }
}

/// Where messages from other nodes are handed in (the hub implements it).
public protocol ClusterReceiver: AnyObject, Sendable {
    /// Delivers a batch from other nodes to this node's local clients. Called from the link's own thread.
    func deliverFromCluster(_ batch: [ClusterMessage])

    /// Bytes handed in by `deliverFromCluster` that the event loops have not delivered yet.
    /// A link stops reading from its broker while this is high, so memory stays bounded
    /// (the broker's bounded queue drops instead).
    var clusterBacklogBytes: Int { get }
}

/// How a node shares channels with other nodes. The hub knows only this protocol: the
/// standalone implementation does nothing; the RabbitMQ one talks to a broker.
///
/// Every method is called on an event loop (or under the hub's directory lock) and must
/// never block: implementations queue work for their own thread.
public protocol ClusterLink: AnyObject, Sendable {
    /// False for standalone: the hub then skips collecting outbound batches at all.
    var isClustered: Bool { get }

    /// Starts the link; messages from other nodes go to `receiver`.
    func start(receiver: any ClusterReceiver)

    /// The channel got its first local client. Succeed `promise` once messages published
    /// anywhere in the cluster from now on reach this node (its binding is confirmed).
    func startReceiving(channel: String, whenBound promise: EventLoopPromise<Void>)

    /// Another client joined a channel that has local clients already: succeed `promise` once
    /// the channel's binding is confirmed on the current connection (at once when it is, or
    /// when the broker is unreachable). After a reconnection a channel is bound again only in
    /// the background, so a join must not take the first client's word for it.
    func awaitBinding(channel: String, promise: EventLoopPromise<Void>)

    /// The channel's last local client left.
    func stopReceiving(channel: String)

    /// Hands a batch of locally received messages to the other nodes. Never blocks; a link that
    /// can't keep up drops and counts.
    func publish(_ batch: [ClusterMessage])

    /// Stops the link and releases its resources.
    func shutdown() async

    /// A few words on the link's state, for the service manager's status line.
    var statusDescription: String { get }

    /// What the link counts, for metrics and `/readyz`; nil when standalone.
    var report: ClusterLinkReport? { get }
}

/// A cluster link's state and counters when asked.
public struct ClusterLinkReport: Sendable {
    /// Connected to a broker, consuming, publishing.
    public var up: Bool
    /// Why the node should not get traffic from the load balancer yet; nil when it should.
    public var notReady: String?
    public var reconnects: Int
    /// Messages the broker confirmed, and messages consumed from other nodes.
    public var published: Int
    public var consumed: Int
    /// Messages that never reached the broker or were not delivered, by reason (a fixed set).
    public var dropped: [(reason: String, count: Int)]
    /// Binding keys bound on the current connection by granularity (`exact`, `4096`, `256`,
    /// `16`: `BindingGranularity.description`), and those still to bind again.
    public var bindings: [(granularity: String, count: Int)]
    public var rebindsPending: Int
    /// Binds and unbinds sent and not answered yet: the pressure on the broker's bind rate.
    public var bindsWaiting: Int
    /// Of `consumed`, messages for channels without local clients, dropped on arrival.
    public var discarded: Int
    /// Messages of other nodes' streams on channels with local clients that never arrived:
    /// the numbers a later message of the same stream skipped (`StreamGaps`).
    public var missed: Int
    /// Messages that arrived numbered at or before one already received on their stream
    /// (reordered or duplicated); delivered all the same.
    public var outOfOrder: Int
    /// Messages per publish to the broker: the link's live histogram, not a copy.
    public var publishBatch: CountHistogram
    /// Microseconds from a bind's request to its answer: the link's live histogram.
    public var bindLatency: CountHistogram

    public init(up: Bool, notReady: String?, reconnects: Int, published: Int, consumed: Int, dropped: [(reason: String, count: Int)],
                bindings: [(granularity: String, count: Int)], rebindsPending: Int, bindsWaiting: Int, discarded: Int,
                missed: Int, outOfOrder: Int, publishBatch: CountHistogram, bindLatency: CountHistogram) {
        self.up = up
        self.notReady = notReady
        self.reconnects = reconnects
        self.published = published
        self.consumed = consumed
        self.dropped = dropped
        self.bindings = bindings
        self.rebindsPending = rebindsPending
        self.bindsWaiting = bindsWaiting
        self.discarded = discarded
        self.missed = missed
        self.outOfOrder = outOfOrder
        self.publishBatch = publishBatch
        self.bindLatency = bindLatency
    }
}

/// The link of a node without a broker: nothing leaves the node.
public final class StandaloneLink: ClusterLink {
    public init() {}
    public var isClustered: Bool { false }
    public func start(receiver: any ClusterReceiver) {}
    public func startReceiving(channel: String, whenBound promise: EventLoopPromise<Void>) { promise.succeed(()) }
    public func awaitBinding(channel: String, promise: EventLoopPromise<Void>) { promise.succeed(()) }
    public func stopReceiving(channel: String) {}
    public func publish(_ batch: [ClusterMessage]) {}
    public func shutdown() async {}
    public var statusDescription: String { "none (standalone)" }
    public var report: ClusterLinkReport? { nil }
}
