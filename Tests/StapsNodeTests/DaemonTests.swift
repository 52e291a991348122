import Foundation
import NIOConcurrencyHelpers
import NIOCore
import StapsCluster
import StapsNode
import Testing
import WebSocketClient

#if canImport(Glibc)
import Glibc
#endif

/// staps as a service: `[daemon]` acting, the systemd notify protocol and watchdog, socket
/// activation, signals. The privilege drop needs root (CI runs as root): without it the test
/// fails saying so, never skips.
@Suite(.serialized) struct DaemonTests {
    /// Spawns the staps binary with `environment` added and `listenFD` (if any) as fd 3.
    static func spawn(_ args: [String], binary: String? = nil, environment: [String: String] = [:], listenFD: Int32? = nil, stderrPath: String) throws -> pid_t {
        let binary = try binary ?? stapsBinary()
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 2, stderrPath, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        var argv = [binary] + args
        var env = ProcessInfo.processInfo.environment.filter { !$0.key.hasPrefix("LISTEN_") && $0.key != "NOTIFY_SOCKET" && $0.key != "WATCHDOG_USEC" }
        for (k, v) in environment { env[k] = v }
        var shell: [String]? = nil
        if let fd = listenFD {
            posix_spawn_file_actions_adddup2(&actions, fd, 3)
            // LISTEN_PID must be the pid of the process that reads it: a shell that execs staps.
            let envPrefix = "LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=staps"
            shell = ["/bin/sh", "-c", "\(envPrefix) exec \"$0\" \"$@\""] + argv
        }
        if let shell { argv = shell }
        var cArgs = argv.map { strdup($0) } + [nil]
        var cEnv = env.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            for p in cArgs { free(p) }
            for p in cEnv { free(p) }
        }
        var pid: pid_t = 0
        let status = posix_spawn(&pid, argv[0], &actions, nil, &cArgs, &cEnv)
        guard status == 0 else { throw TestError.unexpected("posix_spawn \(argv[0]): \(String(cString: strerror(status)))") }
        return pid
    }

    static func waitExit(_ pid: pid_t, seconds: Double = 10) async throws -> Int32 {
        do {
            return try await eventually("staps (pid \(pid)) to exit", within: seconds) { () -> Int32? in
                var status: Int32 = 0
                return waitpid(pid, &status, WNOHANG) == 0 ? nil : (status >> 8) & 0xFF
            }
        } catch {
            kill(pid, SIGKILL)
            throw error
        }
    }

    static func waitForHTTP(_ endpoint: Endpoint, pid: pid_t, log: String) async throws {
        if await answersHTTP(endpoint, within: 5, while: { kill(pid, 0) == 0 }) { return }
        throw TestError.unexpected("staps did not come up on \(endpoint): \((try? String(contentsOfFile: log, encoding: .utf8)) ?? "")")
    }

    static func statusField(_ pid: pid_t, _ name: String) -> String {
        let text = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
        return text.split(separator: "\n").first { $0.hasPrefix(name + ":") }.map { $0.dropFirst(name.count + 1).trimmingCharacters(in: .whitespaces) } ?? ""
    }


    @Test func versionMatchesTheVersionFile() throws {
        let (status, output) = try run(try stapsBinary(), ["--version"])
        let version = try String(contentsOfFile: Broker.repositoryRoot + "/VERSION", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(status == 0 && output == "staps \(version)\n")
    }

    @Test func checkValidatesAndNamesTheBadSetting() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let good = dir.path + "/good.conf"
        try "[staps]\nsocket = \(dir.path)/s.sock\nport = 127.0.0.1:0\nauth_url = http://unix:/run/auth.sock:/check\n".write(toFile: good, atomically: true, encoding: .utf8)
        let (ok, text) = try run(try stapsBinary(), ["--config", good, "--check"])
        #expect(ok == 0 && text.contains("listen: unix:\(dir.path)/s.sock (mode 660)") && text.contains("configuration OK"), "\(text)")
        #expect(text.contains("auth: http://unix:/run/auth.sock:/check (timeout 5000 ms, at most 64 at once)\n"), "\(text)")
        #expect(!FileManager.default.fileExists(atPath: dir.path + "/s.sock"), "--check binds nothing")
        let bad = dir.path + "/bad.conf"
        try "[staps]\nsocket = \(dir.path)/s.sock\n\n[daemon]\nuser = stpas-no-such-user\n".write(toFile: bad, atomically: true, encoding: .utf8)
        for args in [["--check"], []] {
            let (status, output) = try run(try stapsBinary(), ["--config", bad] + args)
            #expect(status == 1)
            #expect(output.contains("\(bad):5: user: no such user 'stpas-no-such-user'"), "\(output)")
            #expect(!FileManager.default.fileExists(atPath: dir.path + "/s.sock"), "nothing bound before the error")
        }
    }

    @Test func privilegesAreDroppedAfterBindingAndThePidFileComesAndGoes() async throws {
        try requireRoot("the privilege-drop test")
        let dir = TempDir()
        defer { dir.cleanup() }
        chmod(dir.path, 0o755)  // the dropped user must reach run/ to remove its files on exit
        let run = dir.path + "/run"
        mkdir(run, 0o755)
        chown(run, 65534, 65534)
        let socket = run + "/staps.sock"
        let pidFile = run + "/staps.pid"
        let config = dir.path + "/staps.conf"
        let log = dir.path + "/stderr"
        try """
            [staps]
            socket = \(socket)
            mode = 0660
            [daemon]
            user = nobody
            group = nogroup
            dir = \(dir.path)
            umask = 0027
            pid_file = \(pidFile)
            """.write(toFile: config, atomically: true, encoding: .utf8)
        let pid = try Self.spawn(["--config", config], stderrPath: log)
        try await Self.waitForHTTP(.unix(path: socket), pid: pid, log: log)
        #expect(Self.statusField(pid, "Uid") == "65534\t65534\t65534\t65534")
        #expect(Self.statusField(pid, "Gid") == "65534\t65534\t65534\t65534")
        #expect(Self.statusField(pid, "Groups") == "65534")
        var st = stat()
        #expect(stat(socket, &st) == 0 && st.st_mode & 0o777 == 0o660 && st.st_gid == 65534, "socket mode and group")
        #expect(stat(pidFile, &st) == 0 && st.st_mode & 0o777 == 0o640, "the pid file carries the umask")
        #expect((try? String(contentsOfFile: pidFile, encoding: .utf8)) == "\(pid)\n")
        // A second start is refused: the pid file names a live staps.
        let (refused, why) = try StapsNodeTests.run(try stapsBinary(), ["--config", config])
        #expect(refused == 1 && why.contains("names a running staps"), "\(why)")
        // Still serving through the socket, as the unprivileged user.
        let a = try await TestClient.connect(.unix(path: socket), "/dropped")
        let b = try await TestClient.connect(.unix(path: socket), "/dropped")
        a.send("as nobody")
        #expect(try await b.nextText() == "as nobody")
        kill(pid, SIGTERM)
        #expect(try await Self.waitExit(pid) == 0)
        #expect(!FileManager.default.fileExists(atPath: pidFile), "pid file removed on exit")
        #expect(!FileManager.default.fileExists(atPath: socket))
        #expect((try? String(contentsOfFile: log, encoding: .utf8))?.contains("running as nobody") == true)
    }

    @Test func notifyAndWatchdogMessagesArriveInOrder() async throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        // An abstract socket name, as systemd may hand out.
        let name = "staps-test-notify-\(UUID4.make().prefix(8))"
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
        defer { close(fd) }
        // An abstract address (leading NUL, no trailing one), as systemd's notify socket may be:
        // NIO's SocketAddress cannot say it, so by hand.
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = [UInt8(0)] + Array(name.utf8)
        withUnsafeMutableBytes(of: &addr.sun_path) { dst in for (i, b) in bytes.enumerated() { dst[i] = b } }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count)
        #expect(withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } } == 0)
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let socketPath = dir.path + "/s.sock"
        let log = dir.path + "/stderr"
        let pid = try Self.spawn(["--config", "/dev/null", "--socket", socketPath], environment: ["NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "600000"], stderrPath: log)
        func next() -> String {
            var buffer = [UInt8](repeating: 0, count: 4096)
            let n = recv(fd, &buffer, buffer.count, 0)
            return n > 0 ? String(decoding: buffer[..<n], as: UTF8.self) : "(nothing within 5 s)"
        }
        let ready = next()
        #expect(ready.hasPrefix("READY=1\nSTATUS=connections 0, channels 0, broker none"), "\(ready)")
        // Reachable once ready.
        #expect((try? await httpRequest(.unix(path: socketPath), "GET", "/"))?.0 == 200)
        #expect(next() == "WATCHDOG=1")
        #expect(next() == "WATCHDOG=1")
        kill(pid, SIGTERM)
        var last = next()
        while last == "WATCHDOG=1" { last = next() }
        #expect(last.hasPrefix("STOPPING=1"), "\(last)")
        #expect(try await Self.waitExit(pid) == 0)
    }

    /// The listening socket belongs to the service manager (here the test): staps serves the
    /// one it inherits, and restarting staps refuses no connection (they wait in the backlog).
    @Test func socketActivationServesTheInheritedSocketAndRestartsRefuseNothing() async throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let path = dir.path + "/activated.sock"
        let listener = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(listener) }
        #expect(withUnixAddress(path, listener, bind) == 0)
        #expect(listen(listener, 512) == 0)
        let log = dir.path + "/stderr"
        // The configuration names another socket: an inherited one is served instead.
        let args = ["--config", "/dev/null", "--socket", dir.path + "/not-this-one.sock"]
        var pid = try Self.spawn(args, listenFD: listener, stderrPath: log)
        try await Self.waitForHTTP(.unix(path: path), pid: pid, log: log)
        #expect(!FileManager.default.fileExists(atPath: dir.path + "/not-this-one.sock"))
        // Clients keep connecting while staps restarts twice.
        let served = NIOLockedValueBox(0)
        let failures = NIOLockedValueBox<[String]>([])
        let stop = NIOLockedValueBox(false)
        let clients = Task {
            while !stop.withLockedValue({ $0 }) {
                do {
                    let (status, _, _) = try await httpRequest(.unix(path: path), "GET", "/")
                    if status == 200 { served.withLockedValue { $0 += 1 } } else { failures.withLockedValue { $0.append("status \(status)") } }
                } catch {
                    failures.withLockedValue { $0.append("\(error)") }
                }
            }
        }
        // Each node in turn serves a few requests before it is stopped, the last one too.
        func serveMore(_ more: Int) async throws {
            let target = served.withLockedValue { $0 } + more
            try await eventually("\(more) more requests served", within: 5) { served.withLockedValue { $0 } >= target }
        }
        for _ in 0..<2 {
            try await serveMore(5)
            kill(pid, SIGTERM)
            #expect(try await Self.waitExit(pid) == 0)
            pid = try Self.spawn(args, listenFD: listener, stderrPath: log)
        }
        try await serveMore(5)
        stop.withLockedValue { $0 = true }
        _ = await clients.value
        kill(pid, SIGTERM)
        #expect(try await Self.waitExit(pid) == 0)
        #expect(failures.withLockedValue { $0 }.isEmpty, "connections refused or failed across restarts: \(failures.withLockedValue { $0 })")
        #expect(served.withLockedValue { $0 } > 10)
        #expect(FileManager.default.fileExists(atPath: path), "staps never removes a socket it did not make")
    }

    /// Debian's `systemd-socket-activate` as the service manager: staps serves its socket.
    @Test func servesTheSocketSystemdSocketActivateHandsOver() async throws {
        let tool = "/usr/bin/systemd-socket-activate"
        guard access(tool, X_OK) == 0 else {
            throw TestError.unexpected("\(tool) is missing: scripts/install-deps test installs the systemd package")
        }
        let dir = TempDir()
        defer { dir.cleanup() }
        let path = dir.path + "/sa.sock"
        let process = Process()
        process.executableURL = URL(fileURLWithPath: tool)
        process.arguments = ["-l", path, "--fdname=staps", try stapsBinary(), "--config", "/dev/null", "--socket", dir.path + "/not-this-one.sock"]
        process.standardError = FileHandle.nullDevice
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        defer { if process.isRunning { process.terminate() } }
        try await eventually("the socket \(path) made", within: 3) { FileManager.default.fileExists(atPath: path) }
        let a = try await TestClient.connect(.unix(path: path), "/activated")
        let b = try await TestClient.connect(.unix(path: path), "/activated")
        a.send("through the inherited socket")
        #expect(try await b.nextText() == "through the inherited socket")
        #expect(!FileManager.default.fileExists(atPath: dir.path + "/not-this-one.sock"))
        process.terminate()
        process.waitUntilExit()
        #expect(process.terminationStatus == 0)
    }

    /// Under journald (stderr is `$JOURNAL_STREAM`): each line starts with its syslog priority
    /// and carries no timestamp of staps's own.
    @Test func journalLinesCarryTheirPriority() async throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let socketPath = dir.path + "/s.sock"
        let log = dir.path + "/journal"
        close(open(log, O_WRONLY | O_CREAT, 0o644))
        var st = stat()
        #expect(stat(log, &st) == 0)
        let pid = try Self.spawn(["--config", "/dev/null", "--socket", socketPath], environment: ["JOURNAL_STREAM": "\(st.st_dev):\(st.st_ino)"], stderrPath: log)
        try await Self.waitForHTTP(.unix(path: socketPath), pid: pid, log: log)
        kill(pid, SIGTERM)
        #expect(try await Self.waitExit(pid) == 0)
        let lines = ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").split(separator: "\n")
        #expect(!lines.isEmpty)
        #expect(lines.allSatisfy { $0.hasPrefix("<5>") || $0.hasPrefix("<4>") || $0.hasPrefix("<6>") || $0.hasPrefix("<7>") }, "\(lines)")
        #expect(lines.contains { $0.hasPrefix("<5>") && $0.contains("listening") })
        #expect(!lines.contains { $0.contains("+0000") }, "no timestamps of our own: \(lines)")
    }

    @Test func sighupIsLoggedAndReopensTheLogFile() async throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let socketPath = dir.path + "/s.sock"
        let logFile = dir.path + "/staps.log"
        let config = dir.path + "/staps.conf"
        try "[staps]\nsocket = \(socketPath)\nlog_file = \(logFile)\n".write(toFile: config, atomically: true, encoding: .utf8)
        let pid = try Self.spawn(["--config", config], stderrPath: dir.path + "/stderr")
        try await Self.waitForHTTP(.unix(path: socketPath), pid: pid, log: logFile)
        rename(logFile, logFile + ".1")  // as logrotate does
        kill(pid, SIGHUP)
        try await eventually("a new log file with the SIGHUP line") {
            ((try? String(contentsOfFile: logFile, encoding: .utf8)) ?? "").contains("signal=SIGHUP")
        }
        #expect((try? await httpRequest(.unix(path: socketPath), "GET", "/"))?.0 == 200, "still serving after SIGHUP")
        kill(pid, SIGTERM)
        #expect(try await Self.waitExit(pid) == 0)
        #expect(((try? String(contentsOfFile: logFile + ".1", encoding: .utf8)) ?? "").contains("listening"))
    }
}
