import ArgumentParser
import Dispatch
import Logging
import ServiceLifecycle
import StapsCluster
import StapsHook
import StapsNode
import StapsRabbit

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

@main
struct Staps: ParsableCommand {
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

    @Option(name: .long, help: ArgumentHelp("Octal file mode for created unix sockets; replaces the file's mode (default: 0660).", valueName: "mode"))
    var mode: String?

    @Option(name: .long, help: ArgumentHelp("TCP host:port to listen on (repeatable); a bare port means 127.0.0.1.", valueName: "host:port"))
    var port: [String] = []

    @Option(name: .long, help: ArgumentHelp("RabbitMQ URL amqp://user:pass@host:port/vhost (or amqps://), or several separated by commas; empty for standalone.", valueName: "url"))
    var amqp: String?

    @Option(name: .long, help: ArgumentHelp("Serve /metrics, /healthz and /readyz on this host:port or unix socket path (off by default).", valueName: "host:port|path"))
    var metrics: String?

    @Option(name: .long, help: ArgumentHelp("Configuration file to read instead of the default locations.", valueName: "path"))
    var config: String?

    // ArgumentParser adds "(default: notice)" itself, from the property's value.
    @Option(name: .long, help: ArgumentHelp("trace, debug, info, notice, warning, error or critical.", valueName: "level"))
    var logLevel: String = "notice"

    @Flag(name: .long, help: "Print the version and exit.")
    var version = false

    @Flag(name: .long, help: "Read and validate the configuration (and [daemon] user/group), print what would be listened on, exit 0 or with the error.")
    var check = false

    /// Runs the node on the cooperative pool while the main thread waits here. The main thread
    /// must stay alive: dropping privileges applies to every live thread, and a process whose
    /// main thread has exited (as an async `main` leaves it) keeps showing root in /proc.
    func run() throws {
        let done = DispatchSemaphore(value: 0)
        let command = self
        Task {
            await command.serve()
            done.signal()
        }
        done.wait()
    }

    func serve() async {
        if self.version {
            print("staps \(stapsVersion)")
            return
        }
        signal(SIGPIPE, SIG_IGN)
        guard let level = Logger.Level(rawValue: self.logLevel) else {
            Self.exitWithError("--log-level: '\(self.logLevel)' is not one of trace, debug, info, notice, warning, error, critical")
        }
        let configuration: NodeConfiguration
        let plan: DaemonPlan
        do {
            configuration = try self.loadConfiguration()
            plan = try DaemonPlan.resolve(configuration)
        } catch {
            Self.exitWithError("\(error)")
        }
        if self.check {
            Self.printCheck(configuration, plan)
            return
        }
        let output: LogOutput
        do {
            output = try LogOutput(path: configuration.logFile, journal: Systemd.stderrIsJournal)
        } catch {
            Self.exitWithError("\(error)")
        }
        LoggingSystem.bootstrap { label in OutputLogHandler(label: label, output: output, logLevel: level) }
        let logger = Logger(label: "staps")

        // Everything [daemon] can get wrong fails here, before anything is bound.
        do {
            try plan.applyEarly()
            try plan.checkPidFile()
        } catch {
            Self.exitWithError("\(error)")
        }
        if configuration.sourceFile == nil && self.socket.isEmpty && self.port.isEmpty {
            logger.notice("no configuration file and no listener flags: listening on \(NodeConfiguration.defaultAddress), standalone")
        }
        let node = Self.makeNode(configuration, logger: logger)
        do {
            try await Self.runServices(node: node, plan: plan, output: output, logger: logger)
        } catch {
            Self.exitWithError("\(error)")
        }
    }

    /// The node, with its cluster link when `amqp` names brokers.
    static func makeNode(_ configuration: NodeConfiguration, logger: Logger) -> Node {
        let link: any ClusterLink
        let nodeID = RabbitConfiguration.makeNodeID()
        if configuration.amqpURL.isEmpty {
            link = StandaloneLink()
        } else {
            do {
                link = RabbitLink(configuration: RabbitConfiguration(urls: try AMQPURL.list(configuration.amqpURL), settings: configuration.cluster, nodeID: nodeID), logger: logger)
            } catch {
                Self.exitWithError("amqp: \(error)")
            }
        }
        return Node(configuration: configuration, link: link, logger: logger, nodeID: nodeID, hookTransport: HTTPHookTransport.factory)
    }

    /// Runs the node and its companions (Services.swift) until SIGTERM or SIGINT has shut them
    /// down gracefully, in the reverse of their order here; throws why the node could not start.
    static func runServices(node: Node, plan: DaemonPlan, output: LogOutput, logger: Logger) async throws {
        let (started, whenStarted) = AsyncStream.makeStream(of: Void.self)
        typealias Named = ServiceGroupConfiguration.ServiceConfiguration
        var services = [
            Named(service: LogReopening(output: output, logger: logger), serviceName: "log reopening"),
            Named(service: NodeService(node: node, plan: plan, inherited: Systemd.takeListeners(), logger: logger, started: whenStarted), serviceName: "node"),
        ]
        if Systemd.isNotifying { services.append(Named(service: SystemdNotifier(node: node, started: started), serviceName: "systemd notifier")) }
        var configuration = ServiceGroupConfiguration(services: services, gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
        // The keys of its debug lines, in the style of staps's own.
        configuration.logging.keys.signalKey = "signal"
        configuration.logging.keys.serviceKey = "service"
        configuration.logging.keys.servicesKey = "services"
        configuration.logging.keys.errorKey = "error"
        try await ServiceGroup(configuration: configuration).run()
    }

    static func printCheck(_ configuration: NodeConfiguration, _ plan: DaemonPlan) {
        print("configuration: \(configuration.sourceFile ?? "none (defaults)")")
        for address in configuration.addresses {
            if case .unixDomainSocket = address {
                print("listen: \(address) (mode \(String(configuration.socketMode, radix: 8)))")
            } else {
                print("listen: \(address)")
            }
        }
        let brokers = (try? AMQPURL.list(configuration.amqpURL))?.map(\.description) ?? []
        print("amqp: \(brokers.isEmpty ? "none (standalone)" : brokers.joined(separator: " "))")
        print("metrics: \(configuration.metricsAddress.map(\.description) ?? "off")")
        let hook = configuration.access.hook
        print("auth: \(hook.url.map { "\($0.logged) (timeout \(hook.timeout.nanoseconds / 1_000_000) ms, at most \(hook.concurrency) at once)" } ?? "none (no hook)")")
        if let user = plan.user { print("user: \(user.name) (uid \(user.uid))") }
        if let gid = plan.gid { print("group: gid \(gid)") }
        print("configuration OK")
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
        var metrics: BindAddress?
        if let text = self.metrics {
            do { metrics = try ValueParser.listenAddress(text) } catch { throw ConfigurationError(file: source, key: "--metrics", message: error.message) }
        }
        return fileSettings.withFlags(
            sockets: self.socket.isEmpty ? nil : self.socket,
            ports: ports.isEmpty ? nil : ports,
            mode: mode,
            amqp: self.amqp,
            metrics: metrics
        ).resolved(sourceFile: file)
    }

    static func exitWithError(_ message: String) -> Never {
        let line = Array("staps: \(message)\n".utf8)
        _ = line.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
        Glibc.exit(1)
    }
}
