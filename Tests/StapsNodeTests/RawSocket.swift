import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A client socket driven by hand (blocking, on the caller's thread), for the clients no
/// library would be: half-sent, trickling, never reading, vanishing without a close.
final class RawSocket {
    private(set) var fd: Int32

    init(unix path: String) throws {
        self.fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard self.fd >= 0 else { throw TestError.unexpected("socket: \(String(cString: strerror(errno)))") }
        let ok = withUnixAddress(path, self.fd, connect)
        guard ok == 0 else {
            let reason = String(cString: strerror(errno))
            Glibc.close(self.fd)
            throw TestError.unexpected("connect \(path): \(reason)")
        }
    }

    deinit { self.close() }

    /// Writes all of `bytes` (blocking); false once the server has closed.
    @discardableResult
    func send(_ bytes: [UInt8]) -> Bool {
        var offset = 0
        while offset < bytes.count {
            let n = bytes[offset...].withUnsafeBytes { Glibc.send(self.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n < 0, errno == EINTR { continue }
            guard n > 0 else { return false }
            offset += n
        }
        return true
    }

    func send(_ text: String) -> Bool { self.send(Array(text.utf8)) }

    /// Writes what the socket takes now without blocking: bytes written, 0 when full, nil once closed.
    func sendSome(_ bytes: [UInt8]) -> Int? {
        let n = bytes.withUnsafeBytes { Glibc.send(self.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
        if n >= 0 { return n }
        return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? 0 : nil
    }

    /// Reads until the server closes or `timeout` seconds pass: (bytes, whether it closed).
    func readToEnd(timeout: Double) -> (bytes: [UInt8], closed: Bool) {
        var out: [UInt8] = []
        let deadline = Date().addingTimeInterval(timeout)
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let left = Int32(max(0, deadline.timeIntervalSinceNow * 1000))
            var p = pollfd(fd: self.fd, events: Int16(POLLIN), revents: 0)
            let r = poll(&p, 1, left)
            if r < 0, errno == EINTR { continue }
            guard r > 0 else { return (out, false) }
            let n = buffer.withUnsafeMutableBytes { recv(self.fd, $0.baseAddress, $0.count, 0) }
            if n < 0, errno == EINTR { continue }
            guard n > 0 else { return (out, true) }
            out += buffer[..<n]
        }
    }

    /// Reads until `marker` has arrived (or the server closes, or `timeout` passes).
    func read(until marker: [UInt8], timeout: Double) -> [UInt8] {
        var out: [UInt8] = []
        let deadline = Date().addingTimeInterval(timeout)
        var byte = [UInt8](repeating: 0, count: 1)
        while !out.ends(with: marker) {
            let left = Int32(max(0, deadline.timeIntervalSinceNow * 1000))
            var p = pollfd(fd: self.fd, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, left) > 0 else { break }
            guard recv(self.fd, &byte, 1, 0) == 1 else { break }
            out.append(byte[0])
        }
        return out
    }

    /// Drops the connection with a reset: no close frame, no FIN.
    func abort() {
        var linger = linger(l_onoff: 1, l_linger: 0)
        setsockopt(self.fd, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<linger>.size))
        self.close()
    }

    func close() {
        if self.fd >= 0 {
            Glibc.close(self.fd)
            self.fd = -1
        }
    }
}

extension Array where Element: Equatable {
    func ends(with suffix: [Element]) -> Bool {
        self.count >= suffix.count && Array(self[(self.count - suffix.count)...]) == suffix
    }
}

/// Runs blocking work on a thread of its own, so it never holds one of the few threads of the
/// Swift concurrency pool (2 here) that the clients and the latency probe run on.
func onThread<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        let thread = Thread {
            do { continuation.resume(returning: try body()) } catch { continuation.resume(throwing: error) }
        }
        thread.stackSize = 1 << 20
        thread.start()
    }
}

/// A process's resident memory (KiB: all, and its anonymous part, the heap and stacks without
/// the mapped binary's pages) and open descriptors, from /proc.
func processFootprint(_ pid: Int32) -> (rssKiB: Int, anonKiB: Int, fds: Int) {
    let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
    func field(_ name: String) -> Int {
        status.split(separator: "\n").first { $0.hasPrefix(name + ":") }
            .flatMap { Int($0.split(separator: " ").dropFirst().first ?? "") } ?? 0
    }
    let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd").count) ?? 0
    return (field("VmRSS"), field("RssAnon"), fds)
}

/// Raises this process's open-file limit to its hard limit (children inherit it).
func raiseFileLimit() {
    var limit = rlimit()
    getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
    limit.rlim_cur = limit.rlim_max
    setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
}
