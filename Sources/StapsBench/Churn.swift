import ArgumentParser
import Atomics
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import StapsCluster
import StapsRabbit
import WebSocketClient

#if canImport(Glibc)
import Glibc
#endif

struct Churn: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "churn",
        abstract: "Throw-away channels: W workers each connect to a fresh random channel, send one message, close; reports cycles/s and connect latency.",
        discussion: """
            Each worker is a thread with plain blocking sockets (no event loop, nothing per cycle but
            the syscalls), so the load generator costs the shared cores as little as it can.
            """
    )

    @OptionGroup var endpoints: Endpoints
    @Option(name: .shortAndLong, help: "Workers, each running one cycle at a time.") var workers = 4
    @Option(name: .long, help: "Seconds to run.") var seconds = 10.0
    @Option(name: .long, help: "PID of the server: report its CPU time per cycle and its RSS, from /proc (child processes included).") var pid: Int32?

    func run() async throws {
        let endpoints = try self.endpoints.list()
        let pool = NIOThreadPool(numberOfThreads: workers)
        pool.start()
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let server = pid.map(ServerProcess.init)
        let cpu0 = try server?.cpuSeconds() ?? 0
        let rss0 = try server?.rss() ?? 0
        let deadline = now() + UInt64(seconds * 1e9)
        let start = now()
        var futures: [EventLoopFuture<ChurnWorker.Result>] = []
        for w in 0..<workers {
            let worker = ChurnWorker(endpoints: endpoints, first: w, step: workers, deadline: deadline)
            futures.append(pool.runIfActive(eventLoop: group.next()) { worker.run() })
        }
        var histogram = Histogram()
        var cycles = 0
        var failures: [String] = []
        for f in futures {
            let r = try await f.get()
            cycles += r.cycles
            failures += r.failures
            histogram.merge(r.histogram)
        }
        let elapsed = Double(now() - start) / 1e9
        let serverLine = try server?.report(since: cpu0, rss0: rss0, count: cycles, unit: "cycle")
        try await pool.shutdownGracefully()
        try await group.shutdownGracefully()
        print("churn: \(workers) workers, \(endpoints.count) endpoint(s), \(String(format2: elapsed, 1)) s: \(cycles) cycles = \(Int(Double(cycles) / elapsed)) cycles/s, \(failures.count) failed\(failures.first.map { " (first: \($0))" } ?? "")")
        print("connect ms (connect to 101): p50 \(ms(histogram.quantile(0.5)))  p99 \(ms(histogram.quantile(0.99)))  max \(ms(histogram.max))")
        if let serverLine { print(serverLine) }
        if !failures.isEmpty { throw ExitCode(2) }
    }
}

/// One churn worker: connect, handshake, one masked binary message, close, wait for the server
/// to drop the connection; over and over until the deadline, with blocking syscalls.
struct ChurnWorker: Sendable {
    struct Result: Sendable {
        var cycles = 0
        var failures: [String] = []
        var histogram = Histogram()
    }

    let endpoints: [Endpoint]
    let first: Int
    let step: Int
    let deadline: UInt64

    func run() -> Result {
        var result = Result()
        var i = first
        var buffer = [UInt8](repeating: 0, count: 4096)
        // A masked 16-byte binary frame, then a masked close 1000 (mask key 0: payload as is).
        let frames: [UInt8] = [0x82, 0x90, 0, 0, 0, 0] + [UInt8](repeating: 0x2A, count: 16) + [0x88, 0x82, 0, 0, 0, 0, 0x03, 0xE8]
        while now() < deadline {
            let endpoint = endpoints[i % endpoints.count]
            i += step
            let t0 = now()
            let fd = Self.connect(endpoint)
            guard fd >= 0 else { result.failures.append("connect: \(String(cString: strerror(errno)))"); continue }
            defer { close(fd) }
            guard let (head, complete) = Self.upgrade(fd, path: "/\(UUID4.make())", buffer: &buffer) else { result.failures.append("write request"); continue }
            guard complete, head.starts(with: Array("HTTP/1.1 101".utf8)) else {
                result.failures.append("handshake: " + String(decoding: head.prefix(40), as: UTF8.self))
                continue
            }
            result.histogram.record(now() - t0)
            guard Self.writeAll(fd, frames) else { result.failures.append("write frames"); continue }
            // The server answers the close and drops the connection.
            while read(fd, &buffer, buffer.count) > 0 {}
            result.cycles += 1
        }
        return result
    }

    /// Sends a websocket upgrade request for `path` and reads the response head: the bytes read
    /// and whether the head ended (false: the server closed first); nil when the write failed.
    static func upgrade(_ fd: Int32, path: String, buffer: inout [UInt8]) -> (head: [UInt8], complete: Bool)? {
        let request = "GET \(path) HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        guard Self.writeAll(fd, Array(request.utf8)) else { return nil }
        var head: [UInt8] = []
        var complete = false
        while !complete {
            let n = read(fd, &buffer, buffer.count)
            guard n > 0 else { break }
            head += buffer[0..<n]
            complete = Self.hasHeadEnd(head, from: max(0, head.count - n - 3))
        }
        return (head, complete)
    }

    /// Reads until the peer closes (or an error): everything it sent.
    static func readToEnd(_ fd: Int32) -> [UInt8] {
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 16384)
        while true {
            let n = read(fd, &buffer, buffer.count)
            guard n > 0 else { return bytes }
            bytes += buffer[0..<n]
        }
    }

    static func hasHeadEnd(_ bytes: [UInt8], from start: Int) -> Bool {
        guard bytes.count >= 4 else { return false }
        for i in start...(bytes.count - 4) where bytes[i] == 13 && bytes[i + 1] == 10 && bytes[i + 2] == 13 && bytes[i + 3] == 10 { return true }
        return false
    }

    static func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        var at = 0
        while at < bytes.count {
            let n = bytes[at...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            guard n > 0 else { return false }
            at += n
        }
        return true
    }

    /// A blocking socket connected to `endpoint` (TCP_NODELAY over TCP), or -1.
    static func connect(_ endpoint: Endpoint) -> Int32 {
        let address: SocketAddress
        let fd: Int32
        switch endpoint {
        case .unix(let path):
            guard let a = try? SocketAddress(unixDomainSocketPath: path) else { return -1 }
            (address, fd) = (a, socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0))
        case .tcp(let host, let port):
            guard let a = try? SocketAddress(ipAddress: host, port: port) else { return -1 }
            (address, fd) = (a, socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0))
            var one: Int32 = 1
            setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        }
        guard fd >= 0 else { return -1 }
        guard address.withSockAddr({ Glibc.connect(fd, $0, socklen_t($1)) }) == 0 else {
            close(fd)
            return -1
        }
        return fd
    }
}
