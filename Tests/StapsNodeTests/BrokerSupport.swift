import Foundation
import NIOCore
import StapsCluster
import StapsNode
import StapsRabbit
import Testing
import WebSocketClient

/// The private RabbitMQ that `scripts/test` starts (`scripts/rabbitmq start`).
enum Broker {
    static let repositoryRoot = "/" + #filePath.split(separator: "/").dropLast(3).joined(separator: "/")
    static let port = Int(ProcessInfo.processInfo.environment["STAPS_RABBITMQ_PORT"] ?? "") ?? 25673
    static var url: String { "amqp://guest:guest@127.0.0.1:\(port)/" }

    /// The broker URL, or an error saying how to start the broker. Never a silent skip.
    static func require() async throws -> String {
        do {
            _ = try await rawExchange(.tcp(host: "127.0.0.1", port: port), Array("AMQP\u{0}\u{0}\u{9}\u{1}".utf8), timeout: 0.3)
            return url
        } catch {
            let ci = ProcessInfo.processInfo.environment["CI"] == "true" ? " (CI=true: the broker is required)" : ""
            throw TestError.unexpected("RabbitMQ is not reachable on 127.0.0.1:\(port)\(ci). Start the private test broker with `scripts/rabbitmq start` (scripts/test does this), after `scripts/install-deps test`.")
        }
    }

    /// Runs `scripts/rabbitmq ARGS` (for the second broker with `secondEnvironment`).
    static func control(environment: [String: String] = [:], _ args: String...) throws {
        _ = try self.run(environment: environment, args)
    }

    /// What `scripts/rabbitmq ARGS` prints (a URL, a path, a pid), trimmed.
    static func output(_ args: String...) throws -> String {
        try self.run(environment: [:], args).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    private static func run(environment: [String: String], _ args: [String]) throws -> String {
        let env = environment.map { "\($0.key)=\($0.value)" }
        let (status, output) = try StapsNodeTests.run("/usr/bin/env", env + [repositoryRoot + "/scripts/rabbitmq"] + args)
        guard status == 0 else { throw TestError.unexpected("scripts/rabbitmq \(args.joined(separator: " ")) failed: \(output)") }
        return output
    }

    /// The second private broker (another RabbitMQ, as another node of a cluster would be),
    /// which `scripts/test` starts beside the first.
    /// `STAPS_RABBITMQ_SECOND_PORT` (as scripts/test reads it), so worktrees can test side by side.
    static let secondPort = Int(ProcessInfo.processInfo.environment["STAPS_RABBITMQ_SECOND_PORT"] ?? "") ?? 25683
    static var secondEnvironment: [String: String] {
        ["STAPS_RABBITMQ_PORT": "\(secondPort)", "STAPS_RABBITMQ_DIR": repositoryRoot + "/.build/rabbitmq-2"]
    }

    static func requireSecond() async throws -> String {
        do {
            _ = try await rawExchange(.tcp(host: "127.0.0.1", port: secondPort), Array("AMQP\u{0}\u{0}\u{9}\u{1}".utf8), timeout: 0.3)
            return "amqp://guest:guest@127.0.0.1:\(secondPort)/"
        } catch {
            let ci = ProcessInfo.processInfo.environment["CI"] == "true" ? " (CI=true: the broker is required)" : ""
            throw TestError.unexpected("The second RabbitMQ is not reachable on 127.0.0.1:\(secondPort)\(ci). Start it with `STAPS_RABBITMQ_PORT=\(secondPort) STAPS_RABBITMQ_DIR=.build/rabbitmq-2 scripts/rabbitmq start` (scripts/test does this).")
        }
    }

    /// A fresh exchange name, so tests never see each other's messages.
    static func freshExchange() -> String { "staps-test-" + String(UUID4.make().prefix(8)) }
}

/// In-process clustered nodes sharing one exchange.
func startClusterNodes(_ count: Int, exchange: String = Broker.freshExchange(), limits: Limits = Limits(), linger: TimeAmount = .seconds(2),
                       binding: BindingMode = ClusterSettings().binding, urls: [String]? = nil) async throws -> [(TestNode, RabbitLink)] {
    let brokers: [String]
    if let urls { brokers = urls } else { brokers = [try await Broker.require()] }
    var nodes: [(TestNode, RabbitLink)] = []
    for _ in 0..<count {
        let settings = ClusterSettings(exchange: exchange, unbindLinger: linger, binding: binding)
        let link = RabbitLink(configuration: RabbitConfiguration(urls: try brokers.map { try AMQPURL($0) }, settings: settings), logger: testLogger("link"))
        let node = try await TestNode.start(limits: limits, link: link)
        nodes.append((node, link))
    }
    // Every link is up before the test begins.
    try await eventually("broker links up", within: 10) { nodes.allSatisfy { $0.1.isConnected } }
    return nodes
}

func stopAll(_ nodes: [(TestNode, RabbitLink)]) async {
    for (node, _) in nodes { await node.stop() }
}

import Logging
import NIOConcurrencyHelpers

/// A logger whose lines (level, message, metadata) are kept for the test to read.
final class LogCapture: Sendable {
    private let lines = NIOLockedValueBox<[String]>([])

    var logger: Logger {
        let lines = self.lines
        var logger = Logger(label: "capture") { _ in CaptureHandler(lines: lines) }
        logger.logLevel = .debug
        return logger
    }

    var text: String { lines.withLockedValue { $0.joined(separator: "\n") } }

    struct CaptureHandler: LogHandler {
        let lines: NIOLockedValueBox<[String]>
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .debug
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(event: LogEvent) {
            let all = metadata.merging(event.metadata ?? [:]) { $1 }
            let line = "\(event.level) \(event.message) \(all.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " "))"
            lines.withLockedValue { $0.append(line) }
        }
    }
}
