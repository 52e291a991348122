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

struct Broker: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "broker",
        abstract: "The broker's bare publish->consume rate and latency (one publishing and one consuming rabbitmq-c connection)."
    )

    @Option(name: .long, help: "RabbitMQ URL (the publishing connection's, and the consuming one's unless --consume-amqp).") var amqp: String
    @Option(name: .long, help: "Another node of the same broker cluster to consume from (its queue lives there).") var consumeAmqp: String?
    @Option(name: .shortAndLong, help: "Messages.") var messages = 200_000
    @Option(name: .long, help: "Payload bytes (at least 8: each body starts with its send time).") var size = 64
    @Option(name: .long, help: "Messages per second (0: as fast as the socket takes them).") var rate = 0

    func run() async throws {
        guard size >= 8 else { throw ValidationError("--size must be at least 8") }
        guard rate >= 0 else { throw ValidationError("--rate must not be negative") }
        let result = try await BrokerBaseline.run(url: try AMQPURL(amqp), consumeURL: try consumeAmqp.map { try AMQPURL($0) }, messages: messages, size: size, rate: rate)
        print("broker: \(result.consumed)/\(result.published) messages of \(size) B in \(String(format2: result.seconds, 3)) s = \(Int(result.messagesPerSecond)) messages/s publish->consume, rate \(rate == 0 ? "max" : "\(rate)/s")")
        print("latency ms: p50 \(ms(result.latency.quantile(0.5)))  p99 \(ms(result.latency.quantile(0.99)))  max \(ms(result.latency.max))")
        if result.consumed != messages { throw ExitCode(2) }
    }
}

struct Binds: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "binds",
        abstract: "The broker's bare bind->unbind rate: one rabbitmq-c connection, pipelined, fresh keys (no staps)."
    )

    @Option(name: .long, help: "RabbitMQ URL.") var amqp: String
    @Option(name: .shortAndLong, help: "Bind->unbind cycles.") var cycles = 20_000
    @Option(name: .long, help: "Requests in flight at once.") var window = 256

    func run() async throws {
        let result = try BindBaseline.run(url: try AMQPURL(amqp), cycles: cycles, window: window)
        print("binds: \(result.cycles) bind->unbind cycles in \(String(format2: result.seconds, 3)) s = \(Int(result.cyclesPerSecond)) cycles/s (window \(window))")
    }
}
