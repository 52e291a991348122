import NIOCore

/// How a clustered node uses RabbitMQ (only read when `amqp` is set).
public struct ClusterSettings: Sendable, Equatable {
    /// The topic exchange every node publishes to.
    public var exchange: String
    /// Messages a node's queue holds before the oldest are dropped.
    public var queueMaxLength: Int
    /// How long a message may wait in a node's queue.
    public var queueMessageTTL: TimeAmount
    /// How long a channel stays bound after its last local client left.
    public var unbindLinger: TimeAmount
    /// Bytes of outbound messages that may wait for the broker before more are dropped.
    public var publishBuffer: Int
    /// How long a message may wait in the node for the broker before it is dropped (and
    /// counted) instead of sent late. Defaults to `queueMessageTTL`.
    public var maxAge: TimeAmount
    /// AMQP heartbeat interval.
    public var heartbeat: TimeAmount
    /// Publishes go out at most once per window, so busy channels share AMQP messages.
    public var publishWindow: TimeAmount
    /// How the node binds its channels (`amqp_binding_buckets`): adaptive (exact keys while the
    /// broker keeps up with the binds, buckets while binds back up), or always one key per
    /// channel (0) or per bucket of channels (16, 256, 4096): see `RoutingKey`. Buckets trade
    /// messages a node receives and ignores for far fewer binds.
    public var binding: BindingMode
    /// CA certificates (PEM) that an `amqps://` broker's certificate must be signed by;
    /// nil: the system bundle.
    public var tlsCAFile: String?

    public init(
        exchange: String = "staps",
        queueMaxLength: Int = 100_000,
        queueMessageTTL: TimeAmount = .seconds(10),
        unbindLinger: TimeAmount = .seconds(2),
        publishBuffer: Int = 64 << 20,
        maxAge: TimeAmount? = nil,
        heartbeat: TimeAmount = .seconds(10),
        publishWindow: TimeAmount = .milliseconds(5),
        binding: BindingMode = .adaptive,
        tlsCAFile: String? = nil
    ) {
        self.exchange = exchange
        self.queueMaxLength = queueMaxLength
        self.queueMessageTTL = queueMessageTTL
        self.unbindLinger = unbindLinger
        self.publishBuffer = publishBuffer
        self.maxAge = maxAge ?? queueMessageTTL
        self.heartbeat = heartbeat
        self.publishWindow = publishWindow
        self.binding = binding
        self.tlsCAFile = tlsCAFile
    }
}
