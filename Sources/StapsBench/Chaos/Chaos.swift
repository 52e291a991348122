import ArgumentParser
import Atomics
import Foundation
import NIOCore
import NIOPosix
import StapsCluster
import WebSocketClient

struct Chaos: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "chaos",
        abstract: "Clients that churn and talk through a cluster while faults happen; ends with a ledger of every message (sent, deliveries owed and made, missing) and what each fault cost.",
        discussion: """
            --channels channels live at once, each with --clients clients connected through the
            endpoints in turn (behind one round-robin proxy, they land on different nodes). Once
            all have their 101, each sends "ID:SEQ" --rate times a second (in turn, evenly spaced) for
            --lifetime seconds;
            then the channel waits (at most --settle seconds) until everyone has what was sent,
            its clients close, and a fresh channel takes its place, until --seconds are over.
            A connection that fails is retried; one that is cut (a close or reset we did not ask
            for) is written down with its reason, and its messages are left out of the account.

            The orchestrator appends a line `UNIX-MILLISECONDS LABEL` to the --faults file at each
            fault; the ledger reports, per fault, the cross-host deliveries of messages sent from
            it until the next fault that were lost or over a second late, and how long after the
            fault the last of them was sent. --key-values writes the figures for a test to read.
            """
    )

    @OptionGroup var endpoints: Endpoints
    @Option(name: .long, help: "Seconds new channels are started.") var seconds = 60.0
    @Option(name: .long, help: "Channels live at once.") var channels = 30
    @Option(name: .long, help: "Clients per channel.") var clients = 3
    @Option(name: .long, help: "Messages per second per client.") var rate = 5.0
    @Option(name: .long, help: "Seconds a channel talks before its clients leave.") var lifetime = 10.0
    @Option(name: .long, help: "Seconds a channel waits at most, after talking, for what is on its way.") var settle = 25.0
    @Option(name: .long, help: "The orchestrator's fault log, read at the end.") var faults: String?
    @Option(name: .long, help: "Write the ledger's figures here, `key value` per line.") var keyValues: String?
    @Option(name: .long, help: "Client event-loop threads.") var threads = 1
    @Option(name: .long, help: "A node (its X-Staps-Node id) whose deliveries each fault's report also leaves out: do the others notice?") var apart: String?

    func validate() throws {
        guard endpoints.unix.count + endpoints.tcp.count > 0 else { throw ValidationError("name at least one --unix or --tcp endpoint") }
        guard seconds > 0, channels > 0, clients >= 2, rate > 0, lifetime > 0, settle >= 0 else {
            throw ValidationError("--seconds, --channels, --rate and --lifetime must be positive, --clients at least 2")
        }
    }

    func run() async throws {
        let endpoints = try self.endpoints.list()
        let group = MultiThreadedEventLoopGroup(numberOfThreads: threads)
        let log = ChaosLog()
        let run = String(UUID4.make().prefix(8))
        let start = now()
        let wallStart = Date().timeIntervalSince1970
        let deadline = start + UInt64(seconds * 1e9)
        let turn = ManagedAtomic<Int>(0)
        let settings = ChaosChannel.Settings(clients: clients, rate: rate, lifetime: lifetime, settle: settle)
        await withTaskGroup(of: Void.self) { tasks in
            for slot in 0..<channels {
                tasks.addTask {
                    // Staggered, so that channels come and go steadily rather than all at once.
                    try? await Task.sleep(nanoseconds: UInt64(Double(slot) / Double(channels) * min(lifetime, seconds) * 1e9))
                    // A channel that has talked waits for what is on its way beside its successor,
                    // so that the load goes on while messages are held up.
                    await withTaskGroup(of: Void.self) { leaving in
                        var generation = 0
                        while now() < deadline {
                            let channel = ChaosChannel(path: "/chaos-\(run)-\(slot)-\(generation)", settings: settings, log: log, group: group, deadline: deadline)
                            let members = await channel.joinAndTalk { endpoints[turn.loadThenWrappingIncrement(ordering: .relaxed) % endpoints.count] }
                            leaving.addTask { await channel.settleAndLeave(members) }
                            generation += 1
                        }
                    }
                }
            }
        }
        let end = now()
        try? await group.shutdownGracefully()
        let faultList = try self.readFaults(wallStart: wallStart, start: start)
        let ledger = ChaosLedger(log.snapshot, start: start, end: end, faults: faultList, apart: apart)
        print(ledger.report)
        if let keyValues { try ledger.keyValues.write(toFile: keyValues, atomically: true, encoding: .utf8) }
    }

    private func readFaults(wallStart: Double, start: UInt64) throws -> [ChaosLedger.Fault] {
        guard let faults else { return [] }
        guard let text = try? String(contentsOfFile: faults, encoding: .utf8) else { return [] }
        return try text.split(separator: "\n").map { line in
            let parts = line.split(separator: " ", maxSplits: 1)
            guard parts.count == 2, let ms = Double(parts[0]) else { throw ValidationError("\(faults): a line is `UNIX-MILLISECONDS LABEL`, got \(line)") }
            let offset = ms / 1000 - wallStart
            return ChaosLedger.Fault(at: UInt64(max(0, Double(start) + offset * 1e9)), label: String(parts[1]))
        }
    }
}

/// One throw-away channel of a chaos run: its clients join, talk, wait for what is on its way,
/// and leave.
struct ChaosChannel: Sendable {
    struct Settings: Sendable {
        var clients: Int
        var rate: Double
        var lifetime: Double
        var settle: Double
    }

    let path: String
    let settings: Settings
    let log: ChaosLog
    let group: EventLoopGroup
    let deadline: UInt64

    typealias Member = (id: Int, client: WebSocketClient)

    /// Connects the clients, then has them talk for the channel's lifetime.
    func joinAndTalk(endpoint: @Sendable () -> Endpoint) async -> [Member] {
        let channel = self.log.newChannel(self.path)
        var members: [Member] = []
        for _ in 0..<self.settings.clients {
            let id = self.log.newClient(channel: channel)
            if let client = await self.connect(id, endpoint: endpoint) { members.append((id, client)) }
        }
        let interval = UInt64(1e9 / self.settings.rate)
        let talkUntil = min(now() + UInt64(self.settings.lifetime * 1e9), self.deadline + UInt64(self.settings.lifetime * 1e9))
        // In turn, evenly spaced: members on one node share its stream, and a member that sends
        // after it received the other's message (a local delivery takes well under the spacing)
        // shows the ledger which the node numbered first (`ChaosStreams`).
        let spacing = interval / UInt64(max(1, members.count))
        while now() < talkUntil && members.count >= 2 {
            for m in members {
                if !self.log.isCut(m.id) {
                    let seq = self.log.sending(m.id, at: now())
                    m.client.send(text: "\(m.id):\(seq)")
                }
                try? await Task.sleep(nanoseconds: spacing)
            }
        }
        return members
    }

    /// Waits (at most `settle` seconds) until every member has what the others sent; then leaves.
    func settleAndLeave(_ members: [Member]) async {
        let settleUntil = now() + UInt64(self.settings.settle * 1e9)
        while now() < settleUntil, !self.log.settled(members.map(\.id)) {
            try? await Task.sleep(nanoseconds: 50_000_000)
        }
        for m in members {
            self.log.leaving(m.id)
            m.client.close(code: 1000)
        }
        // The server answers the close and drops the connection; don't wait for a cut one.
        try? await Task.sleep(nanoseconds: 100_000_000)
        for m in members { await m.client.disconnect() }
    }

    /// A client on the next endpoint, retried (a node or the proxy may be down) for up to 10 s.
    private func connect(_ id: Int, endpoint: @Sendable () -> Endpoint) async -> WebSocketClient? {
        let log = self.log
        let giveUp = now() + 10_000_000_000
        while true {
            do {
                let client = try await WebSocketClient.connect(to: endpoint(), path: self.path, group: self.group) { event in
                    log.event(id, event, at: now())
                }
                log.connected(id, node: client.handshakeHeader("X-Staps-Node") ?? "?", at: now())
                return client
            } catch {
                log.connectFailed("\(error)")
                if now() > giveUp { return nil }
                try? await Task.sleep(nanoseconds: 200_000_000)
            }
        }
    }
}
