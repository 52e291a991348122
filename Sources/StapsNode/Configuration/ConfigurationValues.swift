import NIOCore
import StapsCluster

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Parsers for single values; each throws a short reason.
public enum ValueParser {
    public struct Failure: Error, Equatable {
        public var message: String
        init(_ message: String) { self.message = message }
    }

    public static func socketPath(_ s: String) throws(Failure) {
        guard s.hasPrefix("/") || s.hasPrefix(".") else { throw Failure("'\(s)' is not a path (use an absolute path)") }
        // sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
        guard s.utf8.count < 108 else { throw Failure("'\(s)' is longer than the 107 bytes a unix socket path may have") }
    }

    /// A unix socket path (starting with `/`) or a TCP `host:port` as `hostPort` reads it.
    public static func listenAddress(_ s: String) throws(Failure) -> BindAddress {
        if s.hasPrefix("/") {
            try socketPath(s)
            return .unixDomainSocket(path: s)
        }
        return try hostPort(s)
    }

    /// `8080` (127.0.0.1, since staps has no authentication), `host:port` or `[v6]:port`.
    public static func hostPort(_ s: String) throws(Failure) -> BindAddress {
        var host = "127.0.0.1"
        var portText = Substring(s)
        if s.hasPrefix("[") {
            guard let close = s.firstIndex(of: "]"), s[s.index(after: close)...].hasPrefix(":") else {
                throw Failure("'\(s)' is not [ipv6]:port")
            }
            host = String(s[s.index(after: s.startIndex)..<close])
            portText = s[s.index(close, offsetBy: 2)...]
        } else if let colon = s.lastIndex(of: ":") {
            host = String(s[..<colon])
            portText = s[s.index(after: colon)...]
            guard !host.isEmpty, !host.contains(":") else { throw Failure("'\(s)' is not host:port (write IPv6 as [addr]:port)") }
        }
        guard let port = Int(portText), (0...65535).contains(port) else {
            throw Failure("'\(s)' has no valid port (0-65535)")
        }
        return .hostname(host, port: port)
    }

    public static func octal(_ s: String, max: UInt32) throws(Failure) -> UInt32 {
        guard !s.isEmpty, s.count <= 5, let v = UInt32(s, radix: 8), v <= max else {
            throw Failure("'\(s)' is not an octal mode between 0 and \(String(max, radix: 8))")
        }
        return v
    }

    public static func integer(_ s: String, min: Int, max: Int) throws(Failure) -> Int {
        guard let v = Int(s), v >= min, v <= max else { throw Failure("'\(s)' is not a whole number from \(min) to \(max)") }
        return v
    }

    /// `1048576`, `64KiB`, `64K`, `1MiB`, `1M`, `1GiB` (binary multiples).
    public static func size(_ s: String, min: Int, max: Int) throws(Failure) -> Int {
        let units: [(String, Int)] = [("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30), ("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("B", 1)]
        var number = s
        var multiplier = 1
        for (suffix, m) in units where s.hasSuffix(suffix) {
            number = String(s.dropLast(suffix.count)).trimmingWhitespace()
            multiplier = m
            break
        }
        guard let v = Int(number), v >= 0, v <= max / multiplier, v * multiplier >= min else {
            throw Failure("'\(s)' is not a size from \(min) to \(max) bytes (e.g. 65536, 64KiB, 1MiB)")
        }
        return v * multiplier
    }

    /// `10s`, `500ms`, `2m`, or plain seconds.
    public static func duration(_ s: String, positive: Bool = false) throws(Failure) -> TimeAmount {
        let units: [(String, Int64)] = [("ms", 1_000_000), ("s", 1_000_000_000), ("m", 60_000_000_000), ("h", 3_600_000_000_000)]
        var number = s
        var nanos: Int64 = 1_000_000_000
        for (suffix, n) in units where s.hasSuffix(suffix) {
            number = String(s.dropLast(suffix.count))
            nanos = n
            break
        }
        guard let v = Int64(number), v >= (positive ? 1 : 0), v <= Int64.max / nanos / 2 else {
            throw Failure("'\(s)' is not a duration (e.g. 500ms, 10s, 2m)")
        }
        return .nanoseconds(v * nanos)
    }

    public static func absolutePath(_ s: String) throws(Failure) -> String {
        guard s.hasPrefix("/") else { throw Failure("'\(s)' is not an absolute path") }
        return s
    }

    /// A user or group name as `useradd` accepts it, or a numeric id.
    public static func accountName(_ s: String) throws(Failure) -> String {
        let ok = !s.isEmpty && s.utf8.count <= 32 && s.utf8.allSatisfy { c in
            (c >= 0x61 && c <= 0x7a) || (c >= 0x41 && c <= 0x5a) || (c >= 0x30 && c <= 0x39) || c == 0x5f || c == 0x2d || c == 0x2e
        } && !s.hasPrefix("-")
        guard ok else { throw Failure("'\(s)' is not a valid user or group name") }
        return s
    }

    /// One or more `amqp://user:pass@host:port/vhost` or `amqps://…` URLs (nodes of one
    /// RabbitMQ cluster), separated by spaces or commas; empty means standalone.
    public static func amqpURL(_ s: String) throws(Failure) {
        do { _ = try AMQPURL.list(s) } catch { throw Failure(error.message) }
    }
}
