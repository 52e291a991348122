import NIOCore
import StapsCluster

/// Where a node listens.
public enum BindAddress: Sendable, Hashable, CustomStringConvertible {
    /// A TCP listener on `host:port`.
    case hostname(String, port: Int)
    /// A unix domain socket at `path`, created with the configured file mode.
    case unixDomainSocket(path: String)

    public var description: String {
        switch self {
        case .hostname(let host, let port):
            return host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        case .unixDomainSocket(let path):
            return "unix:\(path)"
        }
    }
}

/// Limits that keep one client (or the broker) from growing memory without bound.
///
/// The `init` defaults are the documented defaults (see `staps.conf`).
public struct Limits: Sendable, Equatable {
    /// Largest message (after reassembling fragments) a client may send, and largest POST body.
    public var maxMessageSize: Int
    /// Bytes that may wait in one connection's outbound buffer. A receiver that stays above it
    /// for `slowConsumerGrace` (or reaches twice it) is closed with 1008 "slow consumer".
    public var sendBuffer: Int
    /// How long a receiver may stay above `sendBuffer` before it is closed.
    public var slowConsumerGrace: TimeAmount
    /// Connections (websocket and plain HTTP) served at once; the next one gets HTTP 503.
    public var maxConnections: Int
    /// Time a connection has, from accept or its previous response, until its request (head
    /// and body) is complete and answered (then 408); also the keep-alive idle limit.
    public var handshakeTimeout: TimeAmount
    /// A websocket that has been silent this long is sent a ping.
    public var pingInterval: TimeAmount
    /// Time a pinged websocket has to answer before it is closed.
    public var pongTimeout: TimeAmount
    /// Time shutdown waits for clients to answer the 1001 close before dropping them.
    public var shutdownTimeout: TimeAmount

    public init(
        maxMessageSize: Int = 1 << 20,
        sendBuffer: Int = 4 << 20,
        slowConsumerGrace: TimeAmount = .seconds(1),
        maxConnections: Int = 10_000,
        handshakeTimeout: TimeAmount = .seconds(10),
        pingInterval: TimeAmount = .seconds(30),
        pongTimeout: TimeAmount = .seconds(10),
        shutdownTimeout: TimeAmount = .seconds(5)
    ) {
        self.maxMessageSize = maxMessageSize
        self.sendBuffer = sendBuffer
        self.slowConsumerGrace = slowConsumerGrace
        self.maxConnections = maxConnections
        self.handshakeTimeout = handshakeTimeout
        self.pingInterval = pingInterval
        self.pongTimeout = pongTimeout
        self.shutdownTimeout = shutdownTimeout
    }
}

/// The `[daemon]` section: parsed and validated now, acted on by the daemon work.
public struct DaemonSettings: Sendable, Equatable {
    public var user: String?
    public var group: String?
    public var directory: String?
    public var pidFile: String?
    public var umask: UInt32?

    public init(user: String? = nil, group: String? = nil, directory: String? = nil, pidFile: String? = nil, umask: UInt32? = nil) {
        self.user = user
        self.group = group
        self.directory = directory
        self.pidFile = pidFile
        self.umask = umask
    }
}

/// Everything a node needs to run. The `init` defaults are the documented defaults.
public struct NodeConfiguration: Sendable, Equatable {
    /// The default listener when neither the file nor the flags name one.
    public static let defaultAddress = BindAddress.hostname("127.0.0.1", port: 8080)

    public var addresses: [BindAddress]
    /// File mode of created unix sockets.
    public var socketMode: UInt32
    /// RabbitMQ URL, or several (nodes of one RabbitMQ cluster) separated by spaces or commas;
    /// empty means standalone.
    public var amqpURL: String
    public var limits: Limits
    public var access = AccessSettings()
    public var cluster: ClusterSettings
    public var daemon: DaemonSettings
    /// The file the configuration came from, if any (for messages).
    public var sourceFile: String?
    /// Where each `section.key` of the file was set (its line), for errors found later.
    public var lines = SourceLines()
    /// Log to this file instead of stderr (reopened on SIGHUP); nil: stderr.
    public var logFile: String?
    /// Where `/metrics`, `/healthz` and `/readyz` are served; nil: nowhere (the default).
    public var metricsAddress: BindAddress?

    /// `file:line: key` of a setting, for an error about it.
    public func location(of section: String, _ key: String) -> String {
        guard let file = self.sourceFile, let line = self.lines.map["\(section).\(key)"] else { return key }
        return "\(file):\(line): \(key)"
    }

    public init(
        addresses: [BindAddress] = [NodeConfiguration.defaultAddress],
        socketMode: UInt32 = 0o660,
        amqpURL: String = "",
        limits: Limits = Limits(),
        cluster: ClusterSettings = ClusterSettings(),
        daemon: DaemonSettings = DaemonSettings(),
        sourceFile: String? = nil
    ) {
        self.addresses = addresses
        self.socketMode = socketMode
        self.amqpURL = amqpURL
        self.limits = limits
        self.cluster = cluster
        self.daemon = daemon
        self.sourceFile = sourceFile
    }
}

/// The line each `section.key` of a file was set on. Where a setting came from is not part of
/// what the configuration is: two configurations are equal whatever their lines.
public struct SourceLines: Sendable, Equatable {
    public var map: [String: Int]
    public init(_ map: [String: Int] = [:]) { self.map = map }
    public static func == (lhs: SourceLines, rhs: SourceLines) -> Bool { true }
}
