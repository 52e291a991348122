import Foundation
import NIOCore
import StapsNode
import Testing
import WebSocketClient

#if canImport(Glibc)
import Glibc
#endif

/// staps behind the proxies operators already run: Debian's Apache and HAProxy, each a private
/// instance on loopback running the configuration shipped in `deploy/`, in front of real staps
/// processes. (nginx: `ClusterProcessTests`.)
@Suite(.serialized) struct FrontTests {
    // MARK: Apache, deploy/apache/staps.conf: one node on its unix socket

    @Test func apacheRelaysWebsocketsAndPostsToTheUnixSocket() async throws {
        try await withApacheNode { node, front in
            let (a, b) = try await expectRelays(through: front, "/via-apache")
            #expect(a.client.handshakeHeader("X-Staps-Node") == node.id)
            #expect(b.client.handshakeHeader("X-Staps-Node") == node.id)
        }
    }

    @Test func apacheCarriesAStoppingNodesOwn1001() async throws {
        try await withApacheNode { node, front in
            let client = try await TestClient.connect(front, "/apache-drain")
            try await expectDrain(of: node, to: client)
        }
    }

    // MARK: HAProxy, deploy/haproxy/staps.cfg: round-robin over three nodes, checked by /readyz

    @Test func haproxyRelaysWebsocketsAndPostsAcrossNodes() async throws {
        try await withHAProxyCluster { cluster in
            let (a, b) = try await expectRelays(through: cluster.front, "/via-haproxy")
            let landed = [a, b].compactMap { $0.client.handshakeHeader("X-Staps-Node") }
            #expect(Set(landed).count == 2, "round-robin: one after the other, on two nodes: \(landed)")
        }
    }

    @Test func haproxyCarriesAStoppingNodesOwn1001() async throws {
        try await withHAProxyCluster { cluster in
            let (client, node) = try await cluster.connect(to: 2, "/haproxy-drain")
            let other = try await TestClient.connect(cluster.front, "/haproxy-drain")
            #expect(other.client.handshakeHeader("X-Staps-Node") != cluster.nodes[node].id)
            try await expectDrain(of: cluster.nodes[node], to: client)
            // Nobody else noticed.
            let late = try await TestClient.connect(cluster.front, "/haproxy-drain")
            late.send("after the stop")
            #expect(try await other.nextText() == "after the stop")
        }
    }

    @Test func haproxyTakesANodeOutOfRotationByItsReadinessAndBackWhenItReturns() async throws {
        try await withHAProxyCluster { cluster in
            let stopping = cluster.nodes[2]
            // A client that does not read holds node 3's drain open: staps waits for its answer
            // to the 1001 (up to shutdown_timeout) with /readyz at 503, its listener closed.
            let (held, _) = try await cluster.connect(to: 2, "/rotation", autoRead: false)
            stopping.process.terminate()
            let down = try await eventually("HAProxy takes node 3 out", within: 5) { try await cluster.haproxy.servers()["staps3"].flatMap { $0.isDown ? $0 : nil } }
            #expect(down.check == "L7STS 503", "out because its /readyz said 503 (not because it was gone): \(down)")
            #expect(stopping.process.isRunning, "still draining")
            try await cluster.expectNoClientLandsOnNode3(for: 1)
            #expect(stopping.process.isRunning, "HAProxy left the held websocket open: the node still waits for its answer")
            // The held client gets the 1001 once it reads, and the node exits.
            try await held.client.connection.setOption(.autoRead, value: true).get()
            let (code, _) = try await held.nextClose()
            #expect(code == 1001)
            #expect(try await stopping.waitForExit().status == 0)

            // A node on the same ports that accepts connections but is not ready (it cannot
            // reach its broker) gets none through HAProxy.
            let unreachable = try await freeLoopbackPort()
            let lost = try await cluster.startNode(2, amqp: "amqp://guest:guest@127.0.0.1:\(unreachable)/")
            cluster.nodes[2] = lost
            #expect(try await httpRequest(.tcp(host: "127.0.0.1", port: cluster.ports[2].client), "GET", "/").0 == 200, "it accepts")
            try await eventually("HAProxy's check reaches the new node", within: 5) { try await cluster.haproxy.servers()["staps3"]?.check == "L7STS 503" }
            // Two check intervals: were it ready, `rise 2` would have let it in by then.
            try await cluster.expectNoClientLandsOnNode3(for: 2)
            #expect(try await cluster.haproxy.servers()["staps3"]?.isDown == true)
            lost.process.terminate()
            #expect(try await lost.waitForExit().status == 0)

            // A node that comes back ready is used again, and its clients talk to the others'.
            let back = try await cluster.startNode(2)
            cluster.nodes[2] = back
            try await eventually("HAProxy puts node 3 back", within: 5) { try await cluster.haproxy.servers()["staps3"]?.status == "UP" }
            // Round-robin over the three, the new node included (HAProxy's round-robin is
            // weighted and dynamic: a server just back may come up in the turn a little later,
            // so up to 12 clients, not exactly 6).
            var clients: [TestClient] = []
            var landed: Set<String> = []
            while clients.count < 12, landed != Set(cluster.nodes.map(\.id)) {
                let client = try await TestClient.connect(cluster.front, "/rotation")
                clients.append(client)
                if let node = client.client.handshakeHeader("X-Staps-Node") { landed.insert(node) }
            }
            #expect(landed == Set(cluster.nodes.map(\.id)), "new clients reach every node again, the one back included: \(landed)")
            try await expectEveryoneHearsEveryoneOnceInOrder(clients, perSender: 5)
        }
    }
}

// MARK: What every front must do

/// Two clients through `front` on `path` hear each other (text one way, binary the other, one of
/// them larger than the proxies' buffers) and never themselves; a POST through it reaches both;
/// the page through it names the channel's websocket URL by the Host the client asked for, with
/// the scheme and host the front set (not what the client claimed).
@discardableResult
func expectRelays(through front: Endpoint, _ path: String) async throws -> (TestClient, TestClient) {
    let a = try await TestClient.connect(front, path)
    let b = try await TestClient.connect(front, path)
    a.send("hello from a")
    #expect(try await b.nextText() == "hello from a")
    let binary = (0..<100_000).map { UInt8(truncatingIfNeeded: $0 * 7) }
    b.send(binary: binary)
    let got = try await a.nextMessage()
    #expect(!got.isText && got.bytes == binary)
    let (status, _, body) = try await httpRequest(front, "POST", path, headers: [("Content-Type", "text/plain")], body: Array("posted".utf8))
    #expect(status == 202, "\(body)")
    #expect(try await a.nextText() == "posted")
    #expect(try await b.nextText() == "posted")
    #expect(try await a.isQuiet(for: 0.05), "nothing echoed, nothing twice")
    #expect(try await b.isQuiet(for: 0.05), "nothing echoed, nothing twice")
    let (pageStatus, _, page) = try await httpRequest(front, "GET", path, headers: [("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "evil.test")])
    #expect(pageStatus == 200)
    #expect(page.contains("ws://staps.test\(path)") && !page.contains("evil.test"), "the page's websocket URL: \(page.prefix(300))")
    return (a, b)
}

/// SIGTERMs `node` while `client` is on it through a front: the client sees staps' own close,
/// 1001 with its reason, then the end of the connection and nothing else; and the node heard
/// the client's answer through the front (it exits 0 without dropping a connection that did
/// not answer in time).
func expectDrain(of node: FrontNode, to client: TestClient) async throws {
    node.process.terminate()
    switch try await client.next() {
    case .close(let code, let reason):
        #expect(code == 1001 && reason == "server shutting down")
    case let other:
        Issue.record("the first thing after SIGTERM was \(other), not a 1001")
    }
    switch try await client.next() {
    case .disconnected: break
    case let other: Issue.record("after the close: \(other), not the end of the connection")
    }
    let (status, log) = try await node.waitForExit()
    #expect(status == 0, "\(log)")
    #expect(!log.contains("did not close in time"), "the client's answer to the 1001 reached the node: \(log)")
}

// MARK: The processes

/// A staps process behind a front: its process, its stderr, its node id (`X-Staps-Node`).
struct FrontNode {
    let process: Process
    let log: Pipe
    let id: String

    /// Starts staps with `args` and waits until `endpoint` (one of its listeners) answers.
    static func start(_ args: [String], waitFor endpoint: Endpoint) async throws -> FrontNode {
        let (process, log) = try await ProcessTests.launch(args, waitFor: endpoint)
        let (_, head, _) = try await httpRequest(endpoint, "GET", "/")
        guard let line = head.split(separator: "\r\n").first(where: { $0.lowercased().hasPrefix("x-staps-node:") }) else {
            process.terminate()
            throw TestError.unexpected("no X-Staps-Node in \(head)")
        }
        return FrontNode(process: process, log: log, id: line.dropFirst("x-staps-node:".count).trimmingCharacters(in: .whitespaces))
    }

    /// Waits for the process to end; its exit status and what it logged.
    func waitForExit() async throws -> (status: Int32, log: String) {
        let status = try await ProcessTests.waitForExit(process)
        return (status, String(decoding: log.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self))
    }

    /// Ends it (SIGTERM, then SIGKILL if it lingers), for the clean-up after a test.
    func kill() async {
        guard process.isRunning else { return }
        process.terminate()
        if (try? await ProcessTests.waitForExit(process, seconds: 3)) == nil { Glibc.kill(process.processIdentifier, SIGKILL) }
    }
}

/// One node on a unix socket (mode 0666: Apache's children are not the test's user when it is
/// root) and a private Apache in front of it; everything is stopped after `body`, whatever it
/// threw.
func withApacheNode(_ body: (FrontNode, Endpoint) async throws -> Void) async throws {
    let dir = TempDir()
    defer { dir.cleanup() }
    let socket = dir.path + "/staps.sock"
    let node = try await FrontNode.start(["--socket", socket, "--mode", "0666"], waitFor: .unix(path: socket))
    var apache: Apache?
    do {
        apache = try await Apache.start(socket: socket, dir: dir.path)
        try await body(node, .tcp(host: "127.0.0.1", port: apache!.port))
    } catch {
        await node.kill()
        await apache?.process.stop()
        throw error
    }
    // The node first: its websockets end with its 1001, and Apache has no tunnel left to wait for.
    await node.kill()
    await apache?.process.stop()
}

/// Three clustered nodes on loopback ports as `deploy/haproxy/staps.cfg` names three hosts,
/// each with its metrics listener, and a private HAProxy in front of them.
struct HAProxyCluster {
    let dir: TempDir
    let conf: String
    let ports: [(client: Int, metrics: Int)]
    var nodes: [FrontNode] = []
    var haproxy: HAProxy!
    var front: Endpoint { .tcp(host: "127.0.0.1", port: haproxy.port) }

    /// Starts (or starts again) node `index` on its ports; `amqp` overrides the file's broker.
    func startNode(_ index: Int, amqp: String? = nil) async throws -> FrontNode {
        let (client, metrics) = ports[index]
        let args = ["--config", conf, "--port", "127.0.0.1:\(client)", "--metrics", "127.0.0.1:\(metrics)"] + (amqp.map { ["--amqp", $0] } ?? [])
        return try await FrontNode.start(args, waitFor: .tcp(host: "127.0.0.1", port: client))
    }

    /// A client through HAProxy that landed on node `index` (round-robin: at most one turn of
    /// the three; the others are closed); with that index.
    func connect(to index: Int, _ path: String, autoRead: Bool = true) async throws -> (TestClient, Int) {
        for _ in 0..<nodes.count {
            let client = try await TestClient.connect(front, path, autoRead: autoRead)
            if client.client.handshakeHeader("X-Staps-Node") == nodes[index].id { return (client, index) }
            await client.close()
        }
        throw TestError.unexpected("no client through HAProxy landed on node \(index + 1) in one round")
    }

    /// For `seconds`, a client through HAProxy every 100 ms, each served, none by node 3; and
    /// HAProxy counts no session for node 3 meanwhile.
    func expectNoClientLandsOnNode3(for seconds: Double) async throws {
        let before = try #require(try await haproxy.servers()["staps3"]).sessions
        let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
        repeat {
            let client = try await TestClient.connect(front, "/rotation-probe")
            #expect(client.client.handshakeHeader("X-Staps-Node") != nodes[2].id)
            await client.close()
            try await Task.sleep(for: .milliseconds(100))
        } while ContinuousClock.now < deadline
        #expect(try await haproxy.servers()["staps3"]?.sessions == before, "HAProxy sent node 3 no session")
    }
}

/// Runs `body` with a fresh `HAProxyCluster` (nodes ready, HAProxy seeing all three up);
/// everything is stopped after it, whatever it threw.
func withHAProxyCluster(_ body: (inout HAProxyCluster) async throws -> Void) async throws {
    let url = try await Broker.require()
    let dir = TempDir()
    defer { dir.cleanup() }
    let conf = dir.path + "/staps.conf"
    // shutdown_timeout: long, so that a client that does not read holds a drain open for as
    // long as the test needs; a client that answers ends the drain at once.
    try "[staps]\namqp = \(url)\namqp_exchange = \(Broker.freshExchange())\nshutdown_timeout = 20s\n".write(toFile: conf, atomically: true, encoding: .utf8)
    var ports: [(client: Int, metrics: Int)] = []
    for _ in 0..<3 { ports.append((try await freeLoopbackPort(), try await freeLoopbackPort())) }
    var cluster = HAProxyCluster(dir: dir, conf: conf, ports: ports)
    do {
        for i in 0..<3 { cluster.nodes.append(try await cluster.startNode(i)) }
        for (_, metrics) in ports {
            try await eventually("node ready on its metrics port \(metrics)", within: 10) { (try? await httpRequest(.tcp(host: "127.0.0.1", port: metrics), "GET", "/readyz"))?.0 == 200 }
        }
        cluster.haproxy = try await HAProxy.start(servers: ports, dir: dir.path)
        try await eventually("HAProxy sees three nodes up", within: 5) { try await cluster.haproxy.servers().values.filter { $0.status == "UP" }.count == 3 }
        try await body(&cluster)
    } catch {
        for node in cluster.nodes { await node.kill() }
        await cluster.haproxy?.process.stop()
        throw error
    }
    for node in cluster.nodes { await node.kill() }
    await cluster.haproxy.process.stop()
}

/// A private Apache (Debian's apache2, in the foreground, its own ServerRoot, pid file and
/// logs) running `deploy/apache/staps.conf`, pointed at a test socket and a loopback port.
struct Apache {
    static let binary = "/usr/sbin/apache2"
    static let modules = "/usr/lib/apache2/modules"
    let process: Daemon
    let port: Int

    static func start(socket: String, dir: String) async throws -> Apache {
        guard FileManager.default.isExecutableFile(atPath: binary), FileManager.default.fileExists(atPath: modules + "/mod_proxy_http.so") else {
            throw TestError.unexpected("Apache is not installed (\(binary), \(modules)): run scripts/install-deps test")
        }
        let port = try await freeLoopbackPort()
        let site = try shipped("deploy/apache/staps.conf", replacing: [
            "\"unix:/run/staps/staps.sock|": "\"unix:\(socket)|",
            "<VirtualHost *:80>": "<VirtualHost 127.0.0.1:\(port)>",
        ])
        try site.write(toFile: dir + "/site.conf", atomically: true, encoding: .utf8)
        // As root, Apache serves from children that are www-data: they must reach the socket.
        var user = ""
        if getuid() == 0 {
            user = "User www-data\nGroup www-data"
            chmod(dir, 0o711)
        }
        let main = """
            ServerRoot \(dir)
            ServerName localhost
            PidFile \(dir)/apache2.pid
            DefaultRuntimeDir \(dir)
            ErrorLog \(dir)/apache-error.log
            LogLevel warn
            \(user)
            LoadModule mpm_event_module \(modules)/mod_mpm_event.so
            LoadModule authz_core_module \(modules)/mod_authz_core.so
            LoadModule headers_module \(modules)/mod_headers.so
            LoadModule proxy_module \(modules)/mod_proxy.so
            LoadModule proxy_http_module \(modules)/mod_proxy_http.so
            StartServers 1
            ServerLimit 1
            ThreadsPerChild 25
            MaxRequestWorkers 25
            MinSpareThreads 5
            MaxSpareThreads 50
            Listen 127.0.0.1:\(port)
            Include \(dir)/site.conf
            """
        try (main + "\n").write(toFile: dir + "/apache2.conf", atomically: true, encoding: .utf8)
        let process = try Daemon.spawn(binary, ["-f", dir + "/apache2.conf", "-DFOREGROUND"], output: dir + "/apache-stderr.log")
        if await answersHTTP(.tcp(host: "127.0.0.1", port: port), within: 5, while: { process.isRunning }) { return Apache(process: process, port: port) }
        await process.stop()
        throw TestError.unexpected("Apache did not come up on 127.0.0.1:\(port): \(logs(dir, "apache-stderr.log", "apache-error.log"))")
    }

}

/// A private HAProxy (Debian's haproxy, in the foreground) running `deploy/haproxy/staps.cfg`,
/// its three servers pointed at test nodes (client and metrics ports) on loopback, with a stats
/// socket to read what its checks found.
struct HAProxy {
    static let binary = "/usr/sbin/haproxy"
    let process: Daemon
    let port: Int
    let statsSocket: String

    /// One server as HAProxy's `show stat` has it.
    struct Server: CustomStringConvertible {
        var status: String
        /// The last check's status and code, e.g. `L7STS 503`, `L7OK 200`, `L4CON`.
        var check: String
        /// Sessions HAProxy has sent it, ever.
        var sessions: Int
        var isDown: Bool { status.hasPrefix("DOWN") }
        var description: String { "\(status), last check \(check), \(sessions) sessions" }
    }

    static func start(servers: [(client: Int, metrics: Int)], dir: String) async throws -> HAProxy {
        guard FileManager.default.isExecutableFile(atPath: binary) else {
            throw TestError.unexpected("HAProxy is not installed at \(binary): run scripts/install-deps test")
        }
        let port = try await freeLoopbackPort()
        var replacements = ["bind :80\n": "bind 127.0.0.1:\(port)\n"]
        for (i, server) in servers.enumerated() {
            replacements["server staps\(i + 1) 10.0.0.\(i + 1):8080 check port 9100\n"] = "server staps\(i + 1) 127.0.0.1:\(server.client) check port \(server.metrics)\n"
        }
        let site = try shipped("deploy/haproxy/staps.cfg", replacing: replacements)
        guard !site.contains("\n    server staps4 ") else { throw TestError.unexpected("deploy/haproxy/staps.cfg names more servers than the test started") }
        try site.write(toFile: dir + "/haproxy-staps.cfg", atomically: true, encoding: .utf8)
        // In place of Debian's global section: logs (state changes) to stderr, a stats socket.
        let statsSocket = dir + "/haproxy.sock"
        let global = """
            global
                log stderr format raw local0 notice
                stats socket \(statsSocket)
            """
        try (global + "\n").write(toFile: dir + "/haproxy-global.cfg", atomically: true, encoding: .utf8)
        let process = try Daemon.spawn(binary, ["-db", "-f", dir + "/haproxy-global.cfg", "-f", dir + "/haproxy-staps.cfg"], output: dir + "/haproxy.log")
        let haproxy = HAProxy(process: process, port: port, statsSocket: statsSocket)
        do {
            guard await answersHTTP(.tcp(host: "127.0.0.1", port: port), within: 5, while: { process.isRunning }) else {
                throw TestError.unexpected("HAProxy did not come up on 127.0.0.1:\(port)")
            }
            _ = try await haproxy.servers()
            return haproxy
        } catch {
            await process.stop()
            throw TestError.unexpected("\(error): \(logs(dir, "haproxy.log"))")
        }
    }

    /// Its servers by name, from `show stat` on the stats socket (CSV, named columns).
    func servers() async throws -> [String: Server] {
        let csv = String(decoding: try await rawExchange(.unix(path: statsSocket), Array("show stat\n".utf8)), as: UTF8.self)
        let lines = csv.split(separator: "\n")
        guard let header = lines.first, header.hasPrefix("# ") else { throw TestError.unexpected("show stat: \(csv)") }
        let names = header.dropFirst(2).split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        var servers: [String: Server] = [:]
        for line in lines.dropFirst() {
            let fields = line.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
            let row = Dictionary(zip(names, fields), uniquingKeysWith: { first, _ in first })
            guard row["pxname"] == "staps_nodes", let name = row["svname"], name != "BACKEND" else { continue }
            let check = [row["check_status"] ?? "", row["check_code"] ?? ""].filter { !$0.isEmpty }.joined(separator: " ")
            servers[name] = Server(status: row["status"] ?? "", check: check, sessions: Int(row["stot"] ?? "") ?? -1)
        }
        return servers
    }

}

/// A file of `deploy/` with each key of `replacements` (which it must hold) replaced by its
/// value: the shipped configuration, pointed at the test's sockets and ports.
private func shipped(_ path: String, replacing replacements: [String: String]) throws -> String {
    var text = try String(contentsOfFile: Broker.repositoryRoot + "/" + path, encoding: .utf8)
    for (old, new) in replacements {
        guard text.contains(old) else { throw TestError.unexpected("\(path) no longer has `\(old)`, which the test replaces") }
        text = text.replacingOccurrences(of: old, with: new)
    }
    return text
}

/// A proxy the test runs in the foreground. Spawned with no signal blocked and every signal at
/// its default, as a service manager starts one: Foundation's `Process` hands a child the mask of
/// the thread that starts it, a cooperative thread's, which blocks SIGTERM, and Apache (unlike
/// staps and nginx) never unblocks it, so it would not stop.
struct Daemon {
    let pid: pid_t

    /// Starts `binary` with `args`, its stdout and stderr in `output`.
    static func spawn(_ binary: String, _ args: [String], output: String) throws -> Daemon {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, output, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var none = sigset_t()
        sigemptyset(&none)
        posix_spawnattr_setsigmask(&attributes, &none)
        var all = sigset_t()
        sigfillset(&all)
        posix_spawnattr_setsigdefault(&attributes, &all)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        let argv = ([binary] + args).map { strdup($0) } + [nil]
        defer { for p in argv { free(p) } }
        var pid: pid_t = 0
        let status = posix_spawn(&pid, binary, &actions, &attributes, argv, environ)
        guard status == 0 else { throw TestError.unexpected("posix_spawn \(binary): \(String(cString: strerror(status)))") }
        return Daemon(pid: pid)
    }

    /// False once it has exited (and it is then reaped).
    var isRunning: Bool { waitpid(pid, nil, WNOHANG) == 0 }

    /// SIGTERM, then SIGKILL if it has not exited within 5 s.
    func stop() async {
        kill(pid, SIGTERM)
        if (try? await eventually("\(pid) to exit", within: 5) { !isRunning }) == nil {
            kill(pid, SIGKILL)
            waitpid(pid, nil, 0)
        }
    }
}

/// The ends of a front's log files in `dir`, for a failure message.
private func logs(_ dir: String, _ names: String...) -> String {
    names.map { "\($0): " + tail((try? String(contentsOfFile: dir + "/" + $0, encoding: .utf8)) ?? "(none)", lines: 20) }.joined(separator: "\n")
}
