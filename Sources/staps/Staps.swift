import ArgumentParser
import Dispatch
import Logging
import StapsNode
import StapsRabbit

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

@main
struct Staps: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "staps",
        abstract: "Simple Throw-Away Publish/Subscribe: websocket channels named by their path.",
        discussion: """
            Configuration comes from the first of --config PATH, /etc/staps/staps.conf and
            ~/.staps.conf (INI; see staps.conf in the source tree for every key and its default).
            Flags override the file. With neither, staps listens on 127.0.0.1:8080, standalone.
            """
    )

    @Option(name: .long, help: ArgumentHelp("Unix socket to listen on (repeatable); replaces the file's sockets.", valueName: "path"))
    var socket: [String] = []

    @Option(name: .long, help: ArgumentHelp("Octal file mode for created unix sockets (default 0660).", valueName: "mode"))
    var mode: String?

    @Option(name: .long, help: ArgumentHelp("TCP host:port to listen on (repeatable); a bare port means 127.0.0.1.", valueName: "host:port"))
    var port: [String] = []

    @Option(name: .long, help: ArgumentHelp("RabbitMQ URL amqp://user:pass@host:port/vhost (or amqps://), or several separated by commas; empty for standalone.", valueName: "url"))
    var amqp: String?

    @Option(name: .long, help: ArgumentHelp("Configuration file to read instead of the default locations.", valueName: "path"))
    var config: String?

    @Option(name: .long, help: ArgumentHelp("trace, debug, info, notice, warning, error or critical (default notice).", valueName: "level"))
    var logLevel: String = "notice"

    func run() async throws {
        guard let level = Logger.Level(rawValue: self.logLevel) else {
            Self.exitWithError("--log-level: '\(self.logLevel)' is not one of trace, debug, info, notice, warning, error, critical")
        }
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "staps")

        let configuration: NodeConfiguration
        do {
            configuration = try self.loadConfiguration()
        } catch {
            Self.exitWithError("\(error)")
        }
        if configuration.sourceFile == nil && self.socket.isEmpty && self.port.isEmpty {
            logger.notice("no configuration file and no listener flags: listening on \(NodeConfiguration.defaultAddress), standalone")
        }
        let link: any ClusterLink
        let nodeID = RabbitConfiguration.makeNodeID()
        if configuration.amqpURL.isEmpty {
            link = StandaloneLink()
        } else {
            do {
                link = RabbitLink(configuration: try RabbitConfiguration(node: configuration, nodeID: nodeID), logger: logger)
            } catch {
                Self.exitWithError("amqp: \(error)")
            }
        }
        let node = Node(configuration: configuration, link: link, logger: logger, nodeID: nodeID)
        do {
            try await node.start()
        } catch {
            await node.shutdown()
            Self.exitWithError("\(error)")
        }
        await Self.waitForTerminationSignal(logger: logger)
        await node.shutdown()
    }

    func loadConfiguration() throws -> NodeConfiguration {
        let home = getenv("HOME").map { String(cString: $0) }
        let (fileSettings, file) = try ConfigurationLoader.load(explicitPath: self.config, candidates: ConfigurationLoader.defaultCandidates(home: home))
        let source = "command line"
        for path in self.socket {
            do { try ValueParser.socketPath(path) } catch { throw ConfigurationError(file: source, key: "--socket", message: error.message) }
        }
        var ports: [BindAddress] = []
        for word in self.port {
            do { ports.append(try ValueParser.hostPort(word)) } catch { throw ConfigurationError(file: source, key: "--port", message: error.message) }
        }
        var mode: UInt32?
        if let text = self.mode {
            do { mode = try ValueParser.octal(text, max: 0o777) } catch { throw ConfigurationError(file: source, key: "--mode", message: error.message) }
        }
        if let amqp = self.amqp {
            do { try ValueParser.amqpURL(amqp) } catch { throw ConfigurationError(file: source, key: "--amqp", message: error.message) }
        }
        return fileSettings.withFlags(
            sockets: self.socket.isEmpty ? nil : self.socket,
            ports: ports.isEmpty ? nil : ports,
            mode: mode,
            amqp: self.amqp
        ).resolved(sourceFile: file)
    }

    static func exitWithError(_ message: String) -> Never {
        let line = Array("staps: \(message)\n".utf8)
        _ = line.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
        Glibc.exit(1)
    }

    /// Returns on the first SIGTERM or SIGINT.
    static func waitForTerminationSignal(logger: Logger) async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let queue = DispatchQueue(label: "staps.signals")
            nonisolated(unsafe) var sources: [DispatchSourceSignal] = []
            nonisolated(unsafe) var resumed = false
            for sig in [SIGTERM, SIGINT] {
                signal(sig, SIG_IGN)
                let source = DispatchSource.makeSignalSource(signal: sig, queue: queue)
                // Both handlers run on `queue`, a serial queue, so `resumed` is never raced.
                source.setEventHandler {
                    guard !resumed else { return }
                    resumed = true
                    logger.notice("received signal", metadata: ["signal": "\(sig == SIGTERM ? "SIGTERM" : "SIGINT")"])
                    for s in sources { s.cancel() }
                    continuation.resume()
                }
                sources.append(source)
                source.resume()
            }
        }
    }
}
