import Foundation
import NIOCore
import NIOPosix
import StapsNode
import Testing
import WebSocketClient

/// Several `staps` processes on a real RabbitMQ, as `deploy/` runs them, with real nginx in front.
@Suite(.serialized) struct ClusterProcessTests {
    struct Cluster {
        let dir: TempDir
        var processes: [Process]
        let sockets: [String]

        /// Ends every node still running, without waiting: for `defer`, so that a test that
        /// fails halfway leaves no node behind (a failed CI run left three running).
        func terminate() {
            for p in processes where p.isRunning { p.terminate() }
        }

        func stop() async {
            for p in processes where p.isRunning { p.terminate() }
            for p in processes { _ = try? await ProcessTests.waitForExit(p) }
            dir.cleanup()
        }
    }

    /// Starts `count` nodes, each on its own unix socket (like staps@1..N), sharing a fresh exchange.
    static func startCluster(_ count: Int) async throws -> Cluster {
        let url = try await Broker.require()
        let dir = TempDir()
        let conf = dir.path + "/staps.conf"
        try "[staps]\namqp = \(url)\namqp_exchange = \(Broker.freshExchange())\nmode = 0666\n".write(toFile: conf, atomically: true, encoding: .utf8)
        var processes: [Process] = []
        var sockets: [String] = []
        var metrics: [String] = []
        for i in 1...count {
            let socket = dir.path + "/staps-\(i).sock"
            metrics.append(dir.path + "/metrics-\(i).sock")
            let (process, _) = try await ProcessTests.launch(["--config", conf, "--socket", socket, "--metrics", metrics[i - 1]], waitFor: socket)
            processes.append(process)
            sockets.append(socket)
        }
        // Every link is up (its queue declared and consumed) before the test begins.
        for socket in metrics {
            try await eventually("ready on \(socket)", within: 10) { (try? await httpRequest(.unix(path: socket), "GET", "/readyz"))?.0 == 200 }
        }
        return Cluster(dir: dir, processes: processes, sockets: sockets)
    }

    @Test func threeNodeProcessesDeliverEverythingOnceInOrder() async throws {
        let cluster = try await Self.startCluster(3)
        defer { cluster.terminate() }
        var clients: [TestClient] = []
        for i in 0..<6 { clients.append(try await TestClient.connect(.unix(path: cluster.sockets[i % 3]), "/procs")) }
        #expect(Set(clients.compactMap { $0.client.handshakeHeader("X-Staps-Node") }).count == 3)
        try await expectEveryoneHearsEveryoneOnceInOrder(clients, perSender: 300)
        await cluster.stop()
    }

    @Test func aKilledNodeCostsTheOthersNothing() async throws {
        var cluster = try await Self.startCluster(3)
        defer { cluster.terminate() }
        let a = try await TestClient.connect(.unix(path: cluster.sockets[0]), "/survive")
        let b = try await TestClient.connect(.unix(path: cluster.sockets[1]), "/survive")
        let c = try await TestClient.connect(.unix(path: cluster.sockets[2]), "/survive")
        a.send("before")
        #expect(try await b.nextText() == "before")
        #expect(try await c.nextText() == "before")
        kill(cluster.processes[2].processIdentifier, SIGKILL)
        _ = try await ProcessTests.waitForExit(cluster.processes[2])
        cluster.processes.removeLast()
        // The survivors go on: every message, in order, both ways.
        for i in 0..<200 {
            a.send("a\(i)")
            b.send("b\(i)")
        }
        for i in 0..<200 {
            #expect(try await b.nextText() == "a\(i)")
            #expect(try await a.nextText() == "b\(i)")
        }
        await cluster.stop()
    }

    @Test func throughNginxClientsLandOnDifferentNodesAndStillTalk() async throws {
        let cluster = try await Self.startCluster(3)
        defer { cluster.terminate() }
        let nginx = try await Nginx.start(sockets: cluster.sockets, dir: cluster.dir.path)
        var clients: [TestClient] = []
        for _ in 0..<6 { clients.append(try await TestClient.connect(.tcp(host: "127.0.0.1", port: nginx.port), "/via-nginx")) }
        let landed = clients.compactMap { $0.client.handshakeHeader("X-Staps-Node") }
        #expect(Set(landed).count == 3, "round-robin over three nodes: \(landed)")
        for (i, c) in clients.enumerated() { c.send("hello from \(i)") }
        for (me, client) in clients.enumerated() {
            var got: Set<String> = []
            for _ in 0..<(clients.count - 1) { got.insert(try await client.nextText()) }
            #expect(got == Set((0..<clients.count).filter { $0 != me }.map { "hello from \($0)" }))
        }
        // The page through nginx carries the forwarded scheme and host.
        let (status, _, page) = try await httpRequest(.tcp(host: "127.0.0.1", port: nginx.port), "GET", "/via-nginx")
        #expect(status == 200)
        #expect(page.contains("ws://staps.test/via-nginx"))
        // And a POST through nginx reaches the websocket clients on every node.
        let (postStatus, _, _) = try await httpRequest(.tcp(host: "127.0.0.1", port: nginx.port), "POST", "/via-nginx", headers: [("Content-Type", "text/plain")], body: Array("posted".utf8))
        #expect(postStatus == 202)
        for c in clients { #expect(try await c.nextText() == "posted") }
        nginx.stop()
        await cluster.stop()
    }
}

/// A real nginx running `deploy/nginx/staps.conf`, pointed at test sockets and a loopback port.
struct Nginx {
    let process: Process
    let port: Int

    static func start(sockets: [String], dir: String) async throws -> Nginx {
        let binary = "/usr/sbin/nginx"
        guard FileManager.default.isExecutableFile(atPath: binary) else {
            throw TestError.unexpected("nginx is not installed at \(binary): run scripts/install-deps test")
        }
        let port = try await freeLoopbackPort()
        var site = try String(contentsOfFile: Broker.repositoryRoot + "/deploy/nginx/staps.conf", encoding: .utf8)
        for (i, socket) in sockets.enumerated() {
            site = site.replacingOccurrences(of: "unix:/run/staps/staps-\(i + 1).sock", with: "unix:\(socket)")
        }
        site = site.replacingOccurrences(of: "listen 80;", with: "listen 127.0.0.1:\(port);")
        site = site.replacingOccurrences(of: "listen [::]:80;", with: "")
        guard !site.contains("/run/staps/") else { throw TestError.unexpected("deploy/nginx/staps.conf names more sockets than the test started") }
        return try await run(site: site, port: port, dir: dir)
    }

    /// Runs nginx with `site` (http-level blocks) in `dir`; `port` is the one `site` listens on.
    static func run(site: String, port: Int, dir: String) async throws -> Nginx {
        let binary = "/usr/sbin/nginx"
        try site.write(toFile: dir + "/site.conf", atomically: true, encoding: .utf8)
        let user = getuid() == 0 ? "user root;\n" : ""
        let main = """
            \(user)daemon off;
            worker_processes 1;
            pid \(dir)/nginx.pid;
            error_log \(dir)/nginx-error.log warn;
            events { worker_connections 1024; }
            http {
                access_log off;
                client_body_temp_path \(dir)/body;
                proxy_temp_path \(dir)/proxy;
                fastcgi_temp_path \(dir)/fastcgi;
                uwsgi_temp_path \(dir)/uwsgi;
                scgi_temp_path \(dir)/scgi;
                include \(dir)/site.conf;
            }
            """
        try main.write(toFile: dir + "/nginx.conf", atomically: true, encoding: .utf8)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = ["-c", dir + "/nginx.conf", "-p", dir]
        process.standardError = FileHandle.nullDevice
        try process.run()
        if await answersHTTP(.tcp(host: "127.0.0.1", port: port), within: 3, while: { process.isRunning }) { return Nginx(process: process, port: port) }
        process.terminate()
        let log = (try? String(contentsOfFile: dir + "/nginx-error.log", encoding: .utf8)) ?? ""
        throw TestError.unexpected("nginx did not come up on 127.0.0.1:\(port): \(log)")
    }

    func stop() {
        process.terminate()
        process.waitUntilExit()
    }
}
