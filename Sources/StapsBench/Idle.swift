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

struct Idle: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "idle",
        abstract: "Opens N idle websocket connections and reports the node's resident memory per connection."
    )

    @OptionGroup var endpoints: Endpoints
    @Option(name: [.customShort("n"), .long], help: "Connections to open.") var connections = 10_000
    @Option(name: .long, help: "Channels to spread them over.") var channels = 100
    @Option(name: .long, help: "PID of the server, to read its VmRSS from /proc (its child processes included: nginx's workers).") var pid: Int32

    func run() async throws {
        let endpoints = try self.endpoints.list()
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let server = ServerProcess(pid)
        let before = try server.rss()
        var clients: [WebSocketClient] = []
        for i in 0..<connections {
            clients.append(try await WebSocketClient.connect(to: endpoints[i % endpoints.count], path: "/idle-\(i % channels)", group: group) { _ in })
        }
        try await Task.sleep(nanoseconds: 1_000_000_000)
        let after = try server.rss()
        let per = Double(after - before) / Double(connections)
        print("idle: \(connections) connections over \(channels) channels: node RSS \(before / 1024) KiB -> \(after / 1024) KiB, \(Int(per)) bytes per connection")
        for c in clients { c.connection.close(promise: nil) }
        try await Task.sleep(nanoseconds: 200_000_000)
        try await group.shutdownGracefully()
    }
}
