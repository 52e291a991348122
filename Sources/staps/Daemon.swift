import StapsNode

#if canImport(Glibc)
import Glibc
#endif

/// What `[daemon]` asks of the process, resolved and checked before anything is bound, so a
/// mistake stops staps with `file:line: key: what is wrong` and nothing half done.
public struct DaemonPlan: Sendable {
    public struct Account: Sendable, Equatable {
        public var name: String
        public var uid: uid_t
        public var gid: gid_t
    }

    /// The user to become after binding (only when started as root).
    public var user: Account?
    /// The group to become (and give the socket files); by default the user's own.
    public var gid: gid_t?
    public var directory: String?
    public var umask: mode_t?
    public var pidFile: String?
    /// True when started as root with a user to become.
    public var dropsPrivileges: Bool { self.user != nil && geteuid() == 0 }

    public static func resolve(_ config: NodeConfiguration) throws(NodeStartError) -> DaemonPlan {
        let d = config.daemon
        var plan = DaemonPlan(user: nil, gid: nil, directory: d.directory, umask: d.umask.map { mode_t($0) }, pidFile: d.pidFile)
        if let name = d.user {
            guard let entry = Self.lookupUser(name) else {
                throw NodeStartError(message: "\(config.location(of: "daemon", "user")): no such user '\(name)'")
            }
            plan.user = entry
            if geteuid() != 0, getuid() != entry.uid {
                let me = Self.lookupUser(uid: getuid()) ?? "uid \(getuid())"
                throw NodeStartError(message: "\(config.location(of: "daemon", "user")): started as '\(me)', not root: cannot become '\(name)' (start staps as root or as '\(name)')")
            }
        }
        if let name = d.group {
            guard let gid = Self.lookupGroup(name) else {
                throw NodeStartError(message: "\(config.location(of: "daemon", "group")): no such group '\(name)'")
            }
            if geteuid() != 0, gid != getgid(), !Self.supplementaryGroups().contains(gid) {
                throw NodeStartError(message: "\(config.location(of: "daemon", "group")): not root and not a member of '\(name)'")
            }
            plan.gid = gid
        } else if let user = plan.user {
            plan.gid = user.gid
        }
        if let dir = d.directory {
            var st = stat()
            guard stat(dir, &st) == 0, (st.st_mode & S_IFMT) == S_IFDIR else {
                throw NodeStartError(message: "\(config.location(of: "daemon", "dir")): '\(dir)' is not a directory")
            }
        }
        return plan
    }

    /// `umask` and `dir`: at start, before anything is created.
    public func applyEarly() throws(NodeStartError) {
        if let mask = self.umask { Glibc.umask(mask) }
        if let dir = self.directory, chdir(dir) != 0 {
            throw NodeStartError(message: "dir: cannot change to '\(dir)': \(String(cString: strerror(errno)))")
        }
    }

    /// A pid file naming a live staps refuses the start; a stale one is left to be replaced.
    public func checkPidFile() throws(NodeStartError) {
        guard let path = self.pidFile, let pid = Self.readPid(path), pid != getpid() else { return }
        if kill(pid, 0) == 0 || errno == EPERM, Self.command(of: pid) == "staps" {
            throw NodeStartError(message: "pid_file: \(path) names a running staps (pid \(pid)); refusing to start")
        }
    }

    /// Written once listening (before dropping root), owned by the user it runs as.
    public func writePidFile() throws(NodeStartError) {
        guard let path = self.pidFile else { return }
        let tmp = path + ".tmp"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw NodeStartError(message: "pid_file: cannot write \(path): \(String(cString: strerror(errno)))") }
        let text = Array("\(getpid())\n".utf8)
        _ = text.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        close(fd)
        if self.dropsPrivileges, let user = self.user { _ = chown(tmp, user.uid, self.gid ?? user.gid) }
        guard rename(tmp, path) == 0 else { throw NodeStartError(message: "pid_file: cannot write \(path): \(String(cString: strerror(errno)))") }
    }

    /// Removed on exit (when its directory lets the process; a stale file is replaced next start).
    public func removePidFile() {
        guard let path = self.pidFile, Self.readPid(path) == getpid() else { return }
        unlink(path)
    }

    /// Becomes the configured user and group (supplementary groups as `initgroups` sets them),
    /// then checks that root cannot be regained.
    public func dropPrivileges() throws(NodeStartError) {
        guard self.dropsPrivileges, let user = self.user else { return }
        let gid = self.gid ?? user.gid
        guard initgroups(user.name, gid) == 0 else { throw NodeStartError(message: "user: initgroups(\(user.name)) failed: \(String(cString: strerror(errno)))") }
        guard setgid(gid) == 0 else { throw NodeStartError(message: "group: setgid(\(gid)) failed: \(String(cString: strerror(errno)))") }
        guard setuid(user.uid) == 0 else { throw NodeStartError(message: "user: setuid(\(user.uid)) failed: \(String(cString: strerror(errno)))") }
        if user.uid != 0 {
            guard setuid(0) != 0, geteuid() == user.uid, getuid() == user.uid, getegid() == gid else {
                throw NodeStartError(message: "user: root could be regained after switching to '\(user.name)'; refusing to run")
            }
        }
    }

    static func lookupUser(_ name: String) -> Account? {
        if let id = UInt32(name), let pw = getpwuid(id) { return Account(name: String(cString: pw.pointee.pw_name), uid: pw.pointee.pw_uid, gid: pw.pointee.pw_gid) }
        guard let pw = getpwnam(name) else { return nil }
        return Account(name: name, uid: pw.pointee.pw_uid, gid: pw.pointee.pw_gid)
    }

    static func lookupUser(uid: uid_t) -> String? {
        getpwuid(uid).map { String(cString: $0.pointee.pw_name) }
    }

    static func lookupGroup(_ name: String) -> gid_t? {
        if let id = UInt32(name), getgrgid(id) != nil { return id }
        return getgrnam(name)?.pointee.gr_gid
    }

    static func supplementaryGroups() -> [gid_t] {
        var groups = [gid_t](repeating: 0, count: 256)
        let n = getgroups(Int32(groups.count), &groups)
        return n > 0 ? Array(groups[..<Int(n)]) : []
    }

    static func readPid(_ path: String) -> pid_t? {
        guard let f = fopen(path, "r") else { return nil }
        defer { fclose(f) }
        var buffer = [CChar](repeating: 0, count: 32)
        guard fgets(&buffer, 32, f) != nil else { return nil }
        let text = String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return text.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\r" || $0 == "\n" }).first.flatMap { pid_t($0) }
    }

    static func command(of pid: pid_t) -> String? {
        guard let f = fopen("/proc/\(pid)/comm", "r") else { return nil }
        defer { fclose(f) }
        var buffer = [CChar](repeating: 0, count: 64)
        guard fgets(&buffer, 64, f) != nil else { return nil }
        return String(decoding: buffer.prefix { $0 != 0 && $0 != 10 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
