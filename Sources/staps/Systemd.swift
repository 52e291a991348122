import NIOCore
import StapsNode

#if canImport(Glibc)
import Glibc
#endif

/// The parts of systemd's service protocol staps speaks itself (no libsystemd): readiness and
/// status on `$NOTIFY_SOCKET`, the watchdog, socket activation, and the journal's stream.
public enum Systemd {
    /// Sends `state` (`READY=1`, `STATUS=…`, `WATCHDOG=1`, `STOPPING=1`) as one datagram to
    /// `$NOTIFY_SOCKET` (a path, or an abstract name starting with `@`). False when not run by
    /// a service manager, or when sending failed.
    @discardableResult
    public static func notify(_ state: String) -> Bool {
        guard let target = getenv("NOTIFY_SOCKET").map({ String(cString: $0) }), !target.isEmpty else { return false }
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        // By hand, not NIO's SocketAddress: the address may be abstract (a leading NUL, and a
        // length that counts no trailing one), which SocketAddress(unixDomainSocketPath:) cannot say.
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        var path = Array(target.utf8)
        let abstract = path.first == UInt8(ascii: "@")
        if abstract { path[0] = 0 }
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        guard path.count < capacity else { return false }
        withUnsafeMutableBytes(of: &addr.sun_path) { dst in
            for (i, b) in path.enumerated() { dst[i] = b }
        }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + path.count + (abstract ? 0 : 1))
        let message = Array(state.utf8)
        let sent = withUnsafePointer(to: &addr) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                message.withUnsafeBytes { sendto(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL), sa, length) }
            }
        }
        return sent == message.count
    }

    /// True when run by a service manager that listens for notifications (`$NOTIFY_SOCKET`).
    public static var isNotifying: Bool { getenv("NOTIFY_SOCKET") != nil }

    /// How often to ping the watchdog (half its timeout), when `$WATCHDOG_USEC` asks for one
    /// (and `$WATCHDOG_PID`, if set, is this process).
    public static var watchdogInterval: TimeAmount? {
        guard let text = getenv("WATCHDOG_USEC").map({ String(cString: $0) }), let usec = Int64(text), usec > 0 else { return nil }
        if let pid = getenv("WATCHDOG_PID").map({ String(cString: $0) }), pid_t(pid) != getpid() { return nil }
        return .microseconds(usec / 2)
    }

    /// Listening sockets handed over by the service manager (`LISTEN_PID`, `LISTEN_FDS`,
    /// `LISTEN_FDNAMES`; they start at fd 3). The variables are cleared, so nothing started
    /// later takes them for its own; the sockets are marked close-on-exec.
    public static func takeListeners() -> [Node.InheritedListener] {
        defer {
            unsetenv("LISTEN_PID")
            unsetenv("LISTEN_FDS")
            unsetenv("LISTEN_FDNAMES")
        }
        guard let pidText = getenv("LISTEN_PID").map({ String(cString: $0) }), pid_t(pidText) == getpid(),
            let countText = getenv("LISTEN_FDS").map({ String(cString: $0) }), let count = Int32(countText), count > 0
        else { return [] }
        let names = getenv("LISTEN_FDNAMES").map { String(cString: $0).split(separator: ":", omittingEmptySubsequences: false).map(String.init) } ?? []
        return (0..<count).map { i in
            let fd = 3 + i
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            return Node.InheritedListener(fd: fd, name: Int(i) < names.count ? names[Int(i)] : "fd\(fd)")
        }
    }

    /// True when stderr is the journal's stream (`$JOURNAL_STREAM` is its `device:inode`).
    public static var stderrIsJournal: Bool {
        guard let text = getenv("JOURNAL_STREAM").map({ String(cString: $0) }) else { return false }
        let parts = text.split(separator: ":")
        guard parts.count == 2, let dev = UInt64(parts[0]), let ino = UInt64(parts[1]) else { return false }
        var st = stat()
        guard fstat(2, &st) == 0 else { return false }
        return UInt64(st.st_dev) == dev && UInt64(st.st_ino) == ino
    }
}
