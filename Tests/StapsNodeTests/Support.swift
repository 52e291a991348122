import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import StapsCluster
import StapsHook
import StapsNode
import Testing
import WebSocketClient

#if canImport(Glibc)
import Glibc
#endif

/// One event loop group for every test client.
let clientGroup = MultiThreadedEventLoopGroup(numberOfThreads: 2)
/// A separate loop for flooding senders, so their (debug-build, byte-at-a-time) masking
/// never starves the receivers the test is measuring.
let senderGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1)

enum TestError: Error, CustomStringConvertible {
    case timeout(String)
    case unexpected(String)
    var description: String {
        switch self {
        case .timeout(let s): return "timed out: \(s)"
        case .unexpected(let s): return s
        }
    }
}

/// The tests' one polling loop, for what has no event to await (a counter, a file, a process,
/// a port): `produce` every `interval` until it returns a value; fails naming `what` after
/// `seconds`. Anything that can be awaited (a websocket event, a future) is awaited instead.
@discardableResult
func eventually<T>(_ what: String, within seconds: Double = 5, every interval: Duration = .milliseconds(10),
                   _ produce: () async throws -> T?) async throws -> T {
    let deadline = ContinuousClock.now + .nanoseconds(Int64(seconds * 1e9))
    while true {
        if let value = try await produce() { return value }
        guard ContinuousClock.now < deadline else { throw TestError.timeout("\(what) (within \(seconds) s)") }
        try await Task.sleep(for: interval)
    }
}

/// Waits until `condition` holds (see the generic `eventually`).
func eventually(_ what: String, within seconds: Double = 5, every interval: Duration = .milliseconds(10),
                _ condition: () async throws -> Bool) async throws {
    try await eventually(what, within: seconds, every: interval) { try await condition() ? () : nil }
}

func testLogger(_ label: String = "test") -> Logger {
    var logger = Logger(label: label)
    logger.logLevel = ProcessInfo.processInfo.environment["STAPS_TEST_LOG"].flatMap(Logger.Level.init(rawValue:)) ?? .critical
    return logger
}

/// A temporary directory removed by `cleanup()`.
struct TempDir {
    let path: String
    init() {
        var template = Array("/tmp/staps-test-XXXXXX".utf8CString)
        let p = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        self.path = String(cString: p!)
    }
    func cleanup() { _ = try? run("/bin/rm", ["-rf", path]) }
}

/// A node running in this process, listening on TCP port 0 and a temporary unix socket.
final class TestNode: Sendable {
    let node: Node
    let tcp: Endpoint
    let unix: Endpoint
    let socketPath: String
    let dir: TempDir

    /// - Parameter metrics: where to serve `/metrics`, `/healthz` and `/readyz` (nil: nowhere).
    static func start(limits: Limits = Limits(), access: AccessSettings = AccessSettings(), link: any ClusterLink = StandaloneLink(), metrics: BindAddress? = nil) async throws -> TestNode {
        let dir = TempDir()
        let socketPath = dir.path + "/staps.sock"
        var config = NodeConfiguration(
            addresses: [.hostname("127.0.0.1", port: 0), .unixDomainSocket(path: socketPath)],
            limits: limits
        )
        config.access = access
        config.metricsAddress = metrics
        let node = Node(configuration: config, link: link, logger: testLogger("node"), hookTransport: HTTPHookTransport.factory)
        try await node.start()
        guard case .hostname(_, let port) = node.boundAddresses.first! else { fatalError("first listener is TCP") }
        return TestNode(node: node, tcp: .tcp(host: "127.0.0.1", port: port), unix: .unix(path: socketPath), socketPath: socketPath, dir: dir)
    }

    private init(node: Node, tcp: Endpoint, unix: Endpoint, socketPath: String, dir: TempDir) {
        self.node = node
        self.tcp = tcp
        self.unix = unix
        self.socketPath = socketPath
        self.dir = dir
    }

    func stop() async {
        await node.shutdown()
        dir.cleanup()
    }
}

/// A websocket client whose events queue up for the test to take in order.
final class TestClient: Sendable {
    let client: WebSocketClient
    private let inbox: ClientInbox

    private init(client: WebSocketClient, inbox: ClientInbox) {
        self.client = client
        self.inbox = inbox
    }

    static func connect(_ endpoint: Endpoint, _ path: String, headers: [(String, String)] = [], autoRead: Bool = true, group: EventLoopGroup = clientGroup) async throws -> TestClient {
        let inbox = ClientInbox(timeoutLoop: group.next())
        let client = try await WebSocketClient.connect(to: endpoint, path: path, headers: headers, group: group, autoRead: autoRead, onEvent: inbox.receive)
        return TestClient(client: client, inbox: inbox)
    }

    /// The next event, waiting up to `timeout` seconds.
    func next(timeout: Double = 5) async throws -> ClientEvent {
        guard let event = await inbox.next(timeout: .nanoseconds(Int64(timeout * 1e9))) else {
            throw TestError.timeout("no websocket event within \(timeout)s")
        }
        return event
    }

    /// The next message as (isText, bytes); fails on a close or disconnect.
    func nextMessage(timeout: Double = 5) async throws -> (isText: Bool, bytes: [UInt8]) {
        switch try await next(timeout: timeout) {
        case .message(let isText, let buffer): return (isText, Array(buffer.readableBytesView))
        case let other: throw TestError.unexpected("expected a message, got \(other)")
        }
    }

    func nextText(timeout: Double = 5) async throws -> String {
        let (isText, bytes) = try await nextMessage(timeout: timeout)
        guard isText else { throw TestError.unexpected("expected text, got binary") }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Waits for the server's close frame, skipping messages; returns its code and reason.
    func nextClose(timeout: Double = 5) async throws -> (UInt16?, String) {
        let deadline = NIODeadline.now() + .nanoseconds(Int64(timeout * 1e9))
        while true {
            switch try await next(timeout: Double((deadline - NIODeadline.now()).nanoseconds) / 1e9) {
            case .close(let code, let reason): return (code, reason)
            case .disconnected: throw TestError.unexpected("disconnected without a close frame")
            case .message: continue
            }
        }
    }

    /// True when nothing arrives within `seconds` (what arrives stays queued). An absence has
    /// no event to await: the time is what is asserted. Callers keep it short (0.02–0.2 s):
    /// what a node relays wrongly arrives within milliseconds, and a late one fails a later step.
    func isQuiet(for seconds: Double) async throws -> Bool {
        await !inbox.waitForEvent(timeout: .nanoseconds(Int64(seconds * 1e9)))
    }

    func send(_ text: String) { client.send(text: text) }
    func send(binary: [UInt8]) { client.send(binary: binary) }
    func close() async { await client.disconnect() }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then closed), for a
/// process the test starts with a port in its configuration.
func freeLoopbackPort() async throws -> Int {
    let channel = try await ServerBootstrap(group: clientGroup).bind(host: "127.0.0.1", port: 0).get()
    let port = channel.localAddress!.port!
    try await channel.close()
    return port
}

/// Waits until `endpoint` answers a GET; false when `isAlive` turns false first or `seconds` pass.
func answersHTTP(_ endpoint: Endpoint, within seconds: Double, while isAlive: () -> Bool) async -> Bool {
    let up = try? await eventually("\(endpoint) answering", within: seconds) { () async -> Bool? in
        if (try? await httpRequest(endpoint, "GET", "/")) != nil { return true }
        return isAlive() ? nil : false
    }
    return up == true
}

/// A raw HTTP/1.1 exchange over a fresh connection: `(status, head, body)`.
func httpRequest(_ endpoint: Endpoint, _ method: String, _ path: String, headers: [(String, String)] = [], body: [UInt8] = []) async throws -> (Int, String, String) {
    var request = "\(method) \(path) HTTP/1.1\r\nHost: staps.test\r\nConnection: close\r\n"
    for (n, v) in headers { request += "\(n): \(v)\r\n" }
    if !body.isEmpty || method == "POST" { request += "Content-Length: \(body.count)\r\n" }
    request += "\r\n"
    let bytes = Array(request.utf8) + body
    let response = try await rawExchange(endpoint, bytes)
    let text = String(decoding: response, as: UTF8.self)
    guard let split = text.range(of: "\r\n\r\n") else { throw TestError.unexpected("no HTTP response: \(text)") }
    let head = String(text[..<split.lowerBound])
    let status = Int(head.split(separator: " ")[1]) ?? 0
    return (status, head, String(text[split.upperBound...]))
}

/// Sends `bytes` and collects everything until the server closes (or 5 s pass).
func rawExchange(_ endpoint: Endpoint, _ bytes: [UInt8], timeout: Double = 5) async throws -> [UInt8] {
    let collected = NIOLockedValueBox<[UInt8]>([])
    let bootstrap = ClientBootstrap(group: clientGroup).channelInitializer { channel in
        channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(Collector(collected)) }
    }
    let channel: Channel
    switch endpoint {
    case .tcp(let h, let p): channel = try await bootstrap.connect(host: h, port: p).get()
    case .unix(let path): channel = try await bootstrap.connect(unixDomainSocketPath: path).get()
    }
    // Closed by the server, or by us at the timeout: awaited, not polled.
    let giveUp = channel.eventLoop.scheduleTask(in: .nanoseconds(Int64(timeout * 1e9))) { channel.close(promise: nil) }
    try await channel.writeAndFlush(channel.allocator.buffer(bytes: bytes)).get()
    try? await channel.closeFuture.get()
    giveUp.cancel()
    return collected.withLockedValue { $0 }
}

final class Collector: ChannelInboundHandler, Sendable {
    typealias InboundIn = ByteBuffer
    let box: NIOLockedValueBox<[UInt8]>
    init(_ box: NIOLockedValueBox<[UInt8]>) { self.box = box }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = self.unwrapInboundIn(data)
        box.withLockedValue { $0 += buffer.readableBytesView }
    }
}

/// Runs a program to completion; returns (exit status, stdout+stderr).
@discardableResult
func run(_ program: String, _ args: [String]) throws -> (Int32, String) {
    let command = ([program] + args).map { "'" + $0.replacingOccurrences(of: "'", with: "'\\''") + "'" }.joined(separator: " ") + " 2>&1"
    guard let pipe = popen(command, "r") else { throw TestError.unexpected("cannot run \(program)") }
    var output = [UInt8]()
    var buf = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = fread(&buf, 1, buf.count, pipe)
        if n <= 0 { break }
        output += buf[0..<n]
    }
    let status = pclose(pipe)
    return ((status >> 8) & 0xFF, String(decoding: output, as: UTF8.self))
}

/// The release build of `staps`, for the tests whose figures (latency under attack) mean
/// something only for the code users run: `STAPS_RELEASE_BIN` (scripts/test sets it to the
/// packaged binary, `scripts/package --binary`), else beside the debug build's folder.
func releaseStapsBinary() throws -> String {
    if let path = ProcessInfo.processInfo.environment["STAPS_RELEASE_BIN"] { return path }
    let debug = try stapsBinary()
    let path = URL(fileURLWithPath: debug).deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("release/staps").path
    guard access(path, X_OK) == 0 else {
        throw TestError.unexpected("no release staps at \(path): run `swift build -c release --product staps` first, or set STAPS_RELEASE_BIN (scripts/test does)")
    }
    return path
}

/// The `staps` executable built beside this test bundle.
func stapsBinary() throws -> String {
    if let path = ProcessInfo.processInfo.environment["STAPS_BIN"] { return path }
    return try builtProduct("staps")
}

/// An executable of this package from the build the tests run from (debug or release).
func builtProduct(_ name: String) throws -> String {
    var dir = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? ""
    while let slash = dir.lastIndex(of: "/"), !dir.hasSuffix("/debug") && !dir.hasSuffix("/release") && dir.count > 1 {
        dir = String(dir[..<slash])
    }
    let path = dir + "/" + name
    guard access(path, X_OK) == 0 else {
        throw TestError.unexpected("no \(name) executable at \(path): run `swift build` before `swift test` (scripts/test does)")
    }
    return path
}


/// Every client sends `perSender` numbered messages; each must receive every other client's
/// messages exactly once, in per-sender order, and never its own.
func expectEveryoneHearsEveryoneOnceInOrder(_ clients: [TestClient], perSender: Int) async throws {
    for round in 0..<perSender {
        for (i, c) in clients.enumerated() { c.send("\(i):\(round)") }
    }
    for (me, client) in clients.enumerated() {
        var next = [Int](repeating: 0, count: clients.count)
        for _ in 0..<(perSender * (clients.count - 1)) {
            let parts = try await client.nextText(timeout: 10).split(separator: ":").map { Int($0)! }
            #expect(parts[0] != me, "echo to \(me)")
            #expect(parts[1] == next[parts[0]], "client \(me): sender \(parts[0]) out of order or duplicated")
            next[parts[0]] = parts[1] + 1
        }
        #expect(try await client.isQuiet(for: 0.05), "nothing beyond one copy of each")
    }
}

/// Fails, saying how to run it, when a test that needs root runs without it (CI runs as root,
/// so under CI=true this is a failure of the set-up, never a skip).
func requireRoot(_ what: String) throws {
    guard geteuid() == 0 else {
        let ci = ProcessInfo.processInfo.environment["CI"] == "true" ? " (CI=true: CI runs as root, so this must run)" : ""
        throw TestError.unexpected("\(what): needs root\(ci); run scripts/test as root (sudo scripts/test)")
    }
}

/// Runs one of the repository's scripts (`scripts/…`, by bash, from the repository's root) with
/// its output in files (the same path for both: one log), killing it after `seconds`; its exit
/// status.
func runRepositoryScript(_ script: String, _ args: [String], stdout: String, stderr: String, seconds: Double) async throws -> Int32 {
    let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    var handles: [String: FileHandle] = [:]
    defer { for handle in handles.values { try? handle.close() } }
    for path in Set([stdout, stderr]) {
        try FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        guard FileManager.default.createFile(atPath: path, contents: nil), let handle = FileHandle(forWritingAtPath: path) else {
            throw TestError.unexpected("cannot write \(path)")
        }
        handles[path] = handle
    }
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/bin/bash")
    process.arguments = [repository.appendingPathComponent(script).path] + args
    process.currentDirectoryURL = repository
    process.standardInput = FileHandle.nullDevice
    process.standardOutput = handles[stdout]
    process.standardError = handles[stderr]
    try process.run()
    do {
        try await eventually("\(script) to finish (output: \(stdout))", within: seconds, every: .milliseconds(200)) { !process.isRunning }
    } catch {
        process.terminate()
        throw error
    }
    return process.terminationStatus
}

/// The last `lines` lines of `text`, for failure messages.
func tail(_ text: String, lines: Int) -> String {
    text.split(separator: "\n", omittingEmptySubsequences: false).suffix(lines).joined(separator: "\n")
}

/// `call` (connect or bind) with `fd` and the unix socket address of `path`, through NIO's
/// `SocketAddress`; -1 when the path does not fit.
func withUnixAddress(_ path: String, _ fd: Int32, _ call: (Int32, UnsafePointer<sockaddr>, socklen_t) -> Int32) -> Int32 {
    guard let address = try? SocketAddress(unixDomainSocketPath: path) else { return -1 }
    return address.withSockAddr { call(fd, $0, socklen_t($1)) }
}
