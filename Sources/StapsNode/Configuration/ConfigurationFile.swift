import NIOCore
import StapsCluster

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// A configuration problem, named by file, line and key: `file:line: key: what is wrong`.
public struct ConfigurationError: Error, CustomStringConvertible, Equatable {
    /// The file, or the flag source (`command line`).
    public var file: String
    /// 1-based line, or nil when the problem is not on one line (an unreadable file, a flag).
    public var line: Int?
    /// The key or section at fault, or nil.
    public var key: String?
    public var message: String

    public init(file: String, line: Int? = nil, key: String? = nil, message: String) {
        self.file = file
        self.line = line
        self.key = key
        self.message = message
    }

    public var description: String {
        var out = self.file
        if let line { out += ":\(line)" }
        if let key { out += ": \(key)" }
        return out + ": " + self.message
    }
}

/// One `key = value` line of an INI file.
public struct INIEntry: Sendable, Equatable {
    public var section: String
    public var key: String
    public var value: String
    public var line: Int
}

/// A small INI reader: `[section]` headers, `key = value`, `#` and `;` comment lines.
public enum INI {
    /// - Parameter sections: the section names allowed; any other header is an error on its line.
    public static func parse(_ text: String, file: String, sections: Set<String>) throws(ConfigurationError) -> [INIEntry] {
        var entries: [INIEntry] = []
        var section: String? = nil
        var lineNumber = 0
        // "\r\n" is one Character, so splitting on "\n" alone would read a CRLF file as one line.
        for rawLine in text.split(omittingEmptySubsequences: false, whereSeparator: { $0 == "\n" || $0 == "\r\n" }) {
            lineNumber += 1
            let line = rawLine.trimmingWhitespace()
            if line.isEmpty || line.hasPrefix("#") || line.hasPrefix(";") { continue }
            if line.hasPrefix("[") {
                guard line.hasSuffix("]"), line.count > 2 else {
                    throw ConfigurationError(file: file, line: lineNumber, key: String(line), message: "malformed section header, expected [name]")
                }
                let name = String(line.dropFirst().dropLast()).trimmingWhitespace()
                guard sections.contains(name) else {
                    let expected = sections.sorted().map { "[\($0)]" }.joined(separator: " or ")
                    throw ConfigurationError(file: file, line: lineNumber, key: "[\(name)]", message: "unknown section (expected \(expected))")
                }
                section = name
                continue
            }
            guard let eq = line.firstIndex(of: "=") else {
                throw ConfigurationError(file: file, line: lineNumber, key: String(line), message: "expected key = value")
            }
            let key = line[..<eq].trimmingWhitespace()
            let value = line[line.index(after: eq)...].trimmingWhitespace()
            guard !key.isEmpty else {
                throw ConfigurationError(file: file, line: lineNumber, message: "missing key before '='")
            }
            guard let section else {
                throw ConfigurationError(file: file, line: lineNumber, key: key, message: "key outside any section (start with [staps])")
            }
            entries.append(INIEntry(section: section, key: key, value: value, line: lineNumber))
        }
        return entries
    }
}

extension StringProtocol {
    func trimmingWhitespace() -> String {
        let isSpace: (Character) -> Bool = { $0 == " " || $0 == "\t" || $0 == "\r" }
        guard let start = self.firstIndex(where: { !isSpace($0) }) else { return "" }
        let end = self.lastIndex(where: { !isSpace($0) })!
        return String(self[start...end])
    }
}

/// Settings as given by a file or by flags, before defaults are applied.
/// Each field is nil when not given; `socket` and `port` may be given several times.
public struct ConfigurationOverrides: Sendable, Equatable {
    public var sockets: [String]?
    public var ports: [BindAddress]?
    public var mode: UInt32?
    public var amqp: String?
    public var logFile: String?
    /// Where the metrics listener is; nil: the file does not say (off).
    public var metrics: BindAddress?
    public var limits = LimitOverrides()
    public var origins: [OriginPattern]?
    public var originRequired: Bool?
    public var postToken: String?
    public var authURL: HookURL?
    public var authTimeout: TimeAmount?
    public var authConcurrency: Int?
    public var cluster = ClusterOverrides()
    public var daemon = DaemonSettings()
    /// The line each `section.key` was set on, for errors found after parsing (a user that
    /// does not exist, say).
    public var lines: [String: Int] = [:]

    public init() {}

    public struct LimitOverrides: Sendable, Equatable {
        public var maxMessageSize: Int?
        public var sendBuffer: Int?
        public var slowConsumerGrace: TimeAmount?
        public var maxConnections: Int?
        public var handshakeTimeout: TimeAmount?
        public var pingInterval: TimeAmount?
        public var pongTimeout: TimeAmount?
        public var shutdownTimeout: TimeAmount?
    }

    public struct ClusterOverrides: Sendable, Equatable {
        public var exchange: String?
        public var queueMaxLength: Int?
        public var queueMessageTTL: TimeAmount?
        public var unbindLinger: TimeAmount?
        public var publishBuffer: Int?
        public var maxAge: TimeAmount?
        public var heartbeat: TimeAmount?
        public var publishWindow: TimeAmount?
        public var tlsCAFile: String?
        public var binding: BindingMode?
    }

    /// Reads the settings of an INI text; every unknown section or key and every bad value is an error.
    public static func parse(_ text: String, file: String) throws(ConfigurationError) -> ConfigurationOverrides {
        var out = ConfigurationOverrides()
        var seen: [String: Int] = [:]
        for entry in try INI.parse(text, file: file, sections: ["staps", "daemon"]) {
            let name = "\(entry.section).\(entry.key)"
            let repeatable = name == "staps.socket" || name == "staps.port"
            if !repeatable, let first = seen[name] {
                throw ConfigurationError(file: file, line: entry.line, key: entry.key, message: "set twice (first on line \(first))")
            }
            seen[name] = entry.line
            out.lines[name] = entry.line
            do {
                switch entry.section {
                case "staps": try Self.apply(staps: entry.key, entry.value, to: &out)
                case "daemon": try Self.apply(daemon: entry.key, entry.value, to: &out)
                default: preconditionFailure("INI.parse admits only known sections")
                }
            } catch {
                throw ConfigurationError(file: file, line: entry.line, key: entry.key, message: error.message)
            }
        }
        return out
    }

    private static func fail(_ message: String) -> ValueParser.Failure { ValueParser.Failure(message) }

    /// One key of `[staps]`: the table of its keys, each with its parser.
    private static func apply(staps key: String, _ v: String, to out: inout ConfigurationOverrides) throws(ValueParser.Failure) {
        switch key {
        case "socket":
            let paths = v.split(whereSeparator: { $0 == " " || $0 == "," }).map(String.init)
            guard !paths.isEmpty else { throw fail("needs a path") }
            for path in paths {
                try ValueParser.socketPath(path)
            }
            out.sockets = (out.sockets ?? []) + paths
        case "port":
            let words = v.split(whereSeparator: { $0 == " " || $0 == "," }).map(String.init)
            guard !words.isEmpty else { throw fail("needs a port or host:port") }
            var addresses: [BindAddress] = []
            for word in words {
                addresses.append(try ValueParser.hostPort(word))
            }
            out.ports = (out.ports ?? []) + addresses
        case "mode":
            out.mode = try ValueParser.octal(v, max: 0o777)
        case "amqp":
            try ValueParser.amqpURL(v)
            out.amqp = v
        case "max_message_size":
            out.limits.maxMessageSize = try ValueParser.size(v, min: 1, max: 1 << 30)
        case "send_buffer":
            out.limits.sendBuffer = try ValueParser.size(v, min: 1024, max: 1 << 32)
        case "slow_consumer_grace":
            out.limits.slowConsumerGrace = try ValueParser.duration(v)
        case "max_connections":
            out.limits.maxConnections = try ValueParser.integer(v, min: 1, max: 10_000_000)
        case "handshake_timeout":
            out.limits.handshakeTimeout = try ValueParser.duration(v, positive: true)
        case "ping_interval":
            out.limits.pingInterval = try ValueParser.duration(v, positive: true)
        case "pong_timeout":
            out.limits.pongTimeout = try ValueParser.duration(v, positive: true)
        case "shutdown_timeout":
            out.limits.shutdownTimeout = try ValueParser.duration(v)
        case "amqp_exchange":
            guard !v.isEmpty, v.utf8.count <= 127, !v.hasPrefix("amq.") else {
                throw fail("'\(v)' is not a usable exchange name (1-127 bytes, not starting with amq.)")
            }
            out.cluster.exchange = v
        case "amqp_queue_max_length":
            out.cluster.queueMaxLength = try ValueParser.integer(v, min: 1, max: 100_000_000)
        case "amqp_queue_ttl":
            out.cluster.queueMessageTTL = try ValueParser.duration(v, positive: true)
        case "amqp_unbind_linger":
            out.cluster.unbindLinger = try ValueParser.duration(v)
        case "amqp_buffer":
            out.cluster.publishBuffer = try ValueParser.size(v, min: 1024, max: 1 << 34)
        case "amqp_max_age":
            out.cluster.maxAge = try ValueParser.duration(v, positive: true)
        case "amqp_publish_window":
            out.cluster.publishWindow = try ValueParser.duration(v)
        case "amqp_heartbeat":
            out.cluster.heartbeat = try ValueParser.duration(v, positive: true)
        case "metrics":
            out.metrics = try ValueParser.listenAddress(v)
        case "log_file":
            out.logFile = try ValueParser.absolutePath(v)
        case "amqp_binding_buckets":
            guard let mode = BindingMode(configValue: v) else {
                throw fail("'\(v)' is not one of adaptive, 0 (a binding per channel), 16, 256, 4096")
            }
            out.cluster.binding = mode
        case "amqp_tls_ca":
            out.cluster.tlsCAFile = try ValueParser.absolutePath(v)
        case "origin":
            var patterns: [OriginPattern] = []
            for item in v.split(whereSeparator: { $0 == " " || $0 == "," || $0 == "\t" }) {
                guard let pattern = OriginPattern(String(item)) else {
                    throw fail("'\(item)' is not an origin: scheme://host[:port], or scheme://*.domain for its subdomains (http or https)")
                }
                patterns.append(pattern)
            }
            guard !patterns.isEmpty else { throw fail("needs one or more origins") }
            out.origins = patterns
        case "origin_required":
            switch v.lowercased() {
            case "yes", "true", "on", "1": out.originRequired = true
            case "no", "false", "off", "0": out.originRequired = false
            default: throw fail("'\(v)' is not yes or no")
            }
        case "post_token":
            guard v.utf8.count >= 16, v.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F }) else {
                throw fail("needs at least 16 printable characters, no spaces")
            }
            out.postToken = v
        case "auth_url":
            do { out.authURL = try HookURL(v) } catch { throw fail(error.message) }
        case "auth_timeout":
            out.authTimeout = try ValueParser.duration(v, positive: true)
        case "auth_concurrency":
            out.authConcurrency = try ValueParser.integer(v, min: 1, max: 100_000)
        default:
            throw fail("unknown key in [staps]")
        }
    }

    /// One key of `[daemon]`.
    private static func apply(daemon key: String, _ v: String, to out: inout ConfigurationOverrides) throws(ValueParser.Failure) {
        switch key {
        case "user":
            out.daemon.user = try ValueParser.accountName(v)
        case "group":
            out.daemon.group = try ValueParser.accountName(v)
        case "dir":
            out.daemon.directory = try ValueParser.absolutePath(v)
        case "pid_file":
            out.daemon.pidFile = try ValueParser.absolutePath(v)
        case "umask":
            out.daemon.umask = try ValueParser.octal(v, max: 0o777)
        default:
            throw fail("unknown key in [daemon]")
        }
    }

    /// These settings with the command-line flags over them, key by key (`--socket` replaces the
    /// file's sockets but keeps its ports, and so on). Flags set only these five keys.
    public func withFlags(sockets: [String]?, ports: [BindAddress]?, mode: UInt32?, amqp: String?, metrics: BindAddress? = nil) -> ConfigurationOverrides {
        var out = self
        if let metrics { out.metrics = metrics }
        if let sockets { out.sockets = sockets }
        if let ports { out.ports = ports }
        if let mode { out.mode = mode }
        if let amqp { out.amqp = amqp }
        return out
    }

    /// The full configuration: these settings over the documented defaults.
    public func resolved(sourceFile: String?) -> NodeConfiguration {
        var config = NodeConfiguration(sourceFile: sourceFile)
        let listeners = (self.sockets ?? []).map { BindAddress.unixDomainSocket(path: $0) } + (self.ports ?? [])
        if !listeners.isEmpty { config.addresses = listeners }
        if let v = self.mode { config.socketMode = v }
        if let v = self.amqp { config.amqpURL = v }
        let l = self.limits
        if let v = l.maxMessageSize { config.limits.maxMessageSize = v }
        if let v = l.sendBuffer { config.limits.sendBuffer = v }
        if let v = l.slowConsumerGrace { config.limits.slowConsumerGrace = v }
        if let v = l.maxConnections { config.limits.maxConnections = v }
        if let v = l.handshakeTimeout { config.limits.handshakeTimeout = v }
        if let v = l.pingInterval { config.limits.pingInterval = v }
        if let v = l.pongTimeout { config.limits.pongTimeout = v }
        if let v = l.shutdownTimeout { config.limits.shutdownTimeout = v }
        let c = self.cluster
        if let v = c.exchange { config.cluster.exchange = v }
        if let v = c.queueMaxLength { config.cluster.queueMaxLength = v }
        if let v = c.queueMessageTTL { config.cluster.queueMessageTTL = v }
        config.cluster.maxAge = c.maxAge ?? config.cluster.queueMessageTTL
        if let v = c.unbindLinger { config.cluster.unbindLinger = v }
        if let v = c.publishBuffer { config.cluster.publishBuffer = v }
        if let v = c.heartbeat { config.cluster.heartbeat = v }
        if let v = c.publishWindow { config.cluster.publishWindow = v }
        if let v = c.tlsCAFile { config.cluster.tlsCAFile = v }
        if let v = c.binding { config.cluster.binding = v }
        if let v = self.logFile { config.logFile = v }
        if let v = self.metrics { config.metricsAddress = v }
        if let v = self.origins { config.access.origins = v }
        if let v = self.originRequired { config.access.originRequired = v }
        if let v = self.postToken { config.access.postToken = v }
        if let v = self.authURL { config.access.hook.url = v }
        if let v = self.authTimeout { config.access.hook.timeout = v }
        if let v = self.authConcurrency { config.access.hook.concurrency = v }
        config.daemon = self.daemon
        config.lines = SourceLines(self.lines)
        return config
    }
}
