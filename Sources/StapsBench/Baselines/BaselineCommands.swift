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
        abstract: "The broker's bare publish->consume rate (one publishing and one consuming rabbitmq-c connection)."
    )

    @Option(name: .long, help: "RabbitMQ URL.") var amqp: String
    @Option(name: .shortAndLong, help: "Messages.") var messages = 200_000
    @Option(name: .long, help: "Payload bytes.") var size = 64

    func run() async throws {
        let result = try await BrokerBaseline.run(url: try AMQPURL(amqp), messages: messages, size: size)
        print("broker: \(result.consumed)/\(result.published) messages of \(size) B in \(String(format2: result.seconds, 3)) s = \(Int(result.messagesPerSecond)) messages/s publish->consume")
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
