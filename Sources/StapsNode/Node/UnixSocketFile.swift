#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Unix socket files: never steal a live one, replace a stale one.
enum UnixSocketFile {
    /// Makes `path` free for binding: absent, or a stale socket (removed). A socket some
    /// process still accepts on, or a file that is not a socket, is an error.
    static func prepare(_ path: String) throws {
        var st = stat()
        guard lstat(path, &st) == 0 else {
            if errno == ENOENT { return }
            throw NodeStartError(message: "cannot use socket path \(path): \(String(cString: strerror(errno)))")
        }
        guard (st.st_mode & S_IFMT) == S_IFSOCK else {
            throw NodeStartError(message: "\(path) exists and is not a socket; refusing to replace it")
        }
        if isLive(path) {
            throw NodeStartError(message: "\(path) is in use by another process (it accepts connections); refusing to start")
        }
        guard unlink(path) == 0 || errno == ENOENT else {
            throw NodeStartError(message: "cannot remove stale socket \(path): \(String(cString: strerror(errno)))")
        }
    }

    /// True when some process accepts connections on the socket at `path`.
    static func isLive(_ path: String) -> Bool {
        guard let fd = try? makeSocket() else { return false }
        defer { close(fd) }
        let result = withAddress(path) { connect(fd, $0, $1) }
        // ECONNREFUSED: nobody listens (stale). EAGAIN: listening but the backlog is full (live).
        return result == 0 || errno == EAGAIN
    }

    /// A socket listening at `path` whose file is created owner-only (0600 less the umask),
    /// for the caller to give its group and mode. Linux only: elsewhere the file's mode at
    /// `bind` follows the umask alone. The socket's own inode is made 0600 before
    /// `bind` (Linux creates the file with that mode, less the umask), so the process umask,
    /// which every thread shares (a file another thread creates meanwhile would get it), is
    /// never touched.
    static func bindPrivately(at path: String, backlog: Int32) throws -> Int32 {
        let fd = try makeSocket()
        func fail(_ what: String) -> NodeStartError {
            let reason = String(cString: strerror(errno))
            close(fd)
            return NodeStartError(message: "cannot listen on \(path): \(what): \(reason)")
        }
        guard fchmod(fd, 0o600) == 0 else { throw fail("fchmod") }
        guard withAddress(path, { bind(fd, $0, $1) }) == 0 else { throw fail("bind") }
        guard listen(fd, backlog) == 0 else {
            let error = fail("listen")
            unlink(path)
            throw error
        }
        return fd
    }

    private static func makeSocket() throws -> Int32 {
        #if canImport(Darwin)
        let fd = socket(AF_UNIX, SOCK_STREAM, 0)
        #else
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        #endif
        guard fd >= 0 else { throw NodeStartError(message: "cannot make a unix socket: \(String(cString: strerror(errno)))") }
        return fd
    }

    /// Calls `body` with `path` as a `sockaddr_un` (-1 with ENAMETOOLONG when it does not fit).
    /// By hand, not NIO's `SocketAddress(unixDomainSocketPath:)`: that stops at 103 bytes (the
    /// macOS limit), and Linux takes the 107 that `socket` paths may have here.
    private static func withAddress(_ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) -> Int32) -> Int32 {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else {
            errno = ENAMETOOLONG
            return -1
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { dst in
            for (i, b) in bytes.enumerated() { dst[i] = b }
            dst[bytes.count] = 0
        }
        return withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
    }

    /// True when `fd` is an IPv4 or IPv6 socket.
    static func isTCP(_ fd: Int32) -> Bool {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let ok = withUnsafeMutablePointer(to: &storage) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } } == 0
        return ok && (Int32(storage.ss_family) == AF_INET || Int32(storage.ss_family) == AF_INET6)
    }

    static func inode(_ path: String) -> UInt64? {
        var st = stat()
        guard lstat(path, &st) == 0 else { return nil }
        return UInt64(st.st_ino)
    }
}
