/// The account of a chaos run, worked out from its `ChaosLog` alone (pure).
///
/// A message counts when its sender's connection was never cut (a cut sender's last messages may
/// never have reached its node, and nobody could count them). Each other member of its channel
/// that joined before it was sent and was never cut is owed one delivery. What is owed and not
/// made is *missing*; grouped by (message, the receiver's node) it is what the nodes should have
/// counted, since a node loses or gets a message for all its clients on a channel at once; of
/// those, `countable` are the ones a node can see (a gap in its stream).
struct ChaosLedger: Sendable {
    struct Fault: Sendable {
        var at: UInt64
        var label: String
    }

    /// What one fault cost the messages that crossed hosts, sent from it until the next fault.
    struct FaultReport: Sendable {
        var label: String
        var offset: Double
        /// Cross-host deliveries owed for messages sent in the window.
        var owed = 0
        var lost = 0
        /// Delivered, but over a second after they were sent.
        var late = 0
        /// Seconds from the fault to the sending of the last lost or late message (0: none).
        var disturbedFor = 0.0
        /// Of those, deliveries where neither sender nor receiver was on the node set apart.
        var owedApart = 0
        var lostApart = 0
        var lateApart = 0
        /// Clients that got their 101 after the fault (before the next), by node.
        var joined: [String: Int] = [:]
        /// Cross-host deliveries made within a second of messages sent after the last disturbed
        /// one: proof that delivery did resume (a run that ends during a fault has none).
        var healthyAfter = 0
        fileprivate var outcomes: [(sentAt: UInt64, healthy: Bool)] = []
    }

    var seconds = 0.0
    var channels = 0
    var clients = 0
    var connectFailures = 0
    var firstConnectFailure: String?
    var cutClients = 0
    var cutReasons: [String: Int] = [:]
    var sent = 0
    var excludedSent = 0
    var owed = 0
    var made = 0
    var missing = 0
    var missingCrossHost = 0
    var missingSameHost = 0
    var missingPairs = 0
    /// Missing (message, node) pairs by the receiving node.
    var missingPairsByNode: [String: Int] = [:]
    /// Of the missing (message, node) pairs, those a node can count (`staps_cluster_missed_total`):
    /// messages of a node's stream on a channel that a receiving node did not get, between two it
    /// did; a range where the log leaves the stream's order open (`ChaosStreams`). The rest were
    /// lost at the start or the end of a stream, where no receiver can see a gap.
    var countable = ChaosStreams()
    var duplicates = 0
    var echoes = 0
    var unreadable = 0
    var crossHostLatency = Histogram()
    var sameHostLatency = Histogram()
    var faults: [FaultReport] = []

    /// - Parameter apart: a node whose deliveries (to or from it) each fault's report also leaves out.
    init(_ log: ChaosLog.State, start: UInt64, end: UInt64, faults: [Fault], apart: String? = nil) {
        self.seconds = Double(end - start) / 1e9
        self.channels = log.channels.count
        self.clients = log.clients.count
        self.connectFailures = log.connectFailures
        self.firstConnectFailure = log.firstConnectFailure
        let faults = faults.sorted { $0.at < $1.at }
        self.faults = faults.map { FaultReport(label: $0.label, offset: Double(Int64($0.at) - Int64(start)) / 1e9) }
        var members: [Int: [Int]] = [:]
        for (id, c) in log.clients.enumerated() where c.connectedAt != nil { members[c.channel, default: []].append(id) }
        for c in log.clients {
            if let at = c.connectedAt, let w = faults.lastIndex(where: { $0.at <= at }) { self.faults[w].joined[c.node ?? "?", default: 0] += 1 }
            self.echoes += c.echoes
            self.unreadable += c.unreadable
            if let cut = c.cut {
                self.cutClients += 1
                self.cutReasons[cut.reason, default: 0] += 1
            }
        }
        for (_, ids) in members {
            self.countable.add(log, channel: ids)
            // What each receiver got: first arrival per (sender, seq).
            var arrivals: [Int: [Int: UInt64]] = [:]
            for r in ids {
                var got: [Int: UInt64] = [:]
                for m in log.clients[r].received {
                    let key = m.sender << 32 | m.seq
                    if got[key] != nil { self.duplicates += 1 } else { got[key] = m.at }
                }
                arrivals[r] = got
            }
            for s in ids {
                let sender = log.clients[s]
                guard sender.cut == nil else {
                    self.excludedSent += sender.sent.count
                    continue
                }
                self.sent += sender.sent.count
                for (index, sentAt) in sender.sent.enumerated() {
                    let seq = index + 1
                    var lostOnNodes: Set<String> = []
                    for r in ids where r != s {
                        let receiver = log.clients[r]
                        guard receiver.cut == nil, let joined = receiver.connectedAt, joined <= sentAt else { continue }
                        self.owed += 1
                        let crossHost = receiver.node != sender.node
                        let window = self.faultWindow(faults, sentAt)
                        let involvesApart = apart != nil && (receiver.node == apart || sender.node == apart)
                        if crossHost, let w = window {
                            self.faults[w].owed += 1
                            if !involvesApart { self.faults[w].owedApart += 1 }
                        }
                        if let at = arrivals[r]?[s << 32 | seq] {
                            self.made += 1
                            let latency = at >= sentAt ? at - sentAt : 0
                            if crossHost { self.crossHostLatency.record(latency) } else { self.sameHostLatency.record(latency) }
                            if crossHost, let w = window { self.faults[w].outcomes.append((sentAt, latency <= 1_000_000_000)) }
                            if crossHost, latency > 1_000_000_000, let w = window {
                                self.faults[w].late += 1
                                if !involvesApart { self.faults[w].lateApart += 1 }
                                self.faults[w].disturbedFor = max(self.faults[w].disturbedFor, Double(sentAt - faults[w].at) / 1e9)
                            }
                        } else {
                            self.missing += 1
                            if crossHost { self.missingCrossHost += 1 } else { self.missingSameHost += 1 }
                            if crossHost, let w = window {
                                self.faults[w].outcomes.append((sentAt, false))
                                self.faults[w].lost += 1
                                if !involvesApart { self.faults[w].lostApart += 1 }
                                self.faults[w].disturbedFor = max(self.faults[w].disturbedFor, Double(sentAt - faults[w].at) / 1e9)
                            }
                            let node = receiver.node ?? "?"
                            if lostOnNodes.insert(node).inserted {
                                self.missingPairs += 1
                                self.missingPairsByNode[node, default: 0] += 1
                            }
                        }
                    }
                }
            }
        }
        for (w, fault) in faults.enumerated() {
            let lastBad = fault.at + UInt64(self.faults[w].disturbedFor * 1e9)
            self.faults[w].healthyAfter = self.faults[w].outcomes.filter { $0.healthy && $0.sentAt > lastBad }.count
            self.faults[w].outcomes = []
        }
    }

    /// The index of the last fault at or before `time`.
    private func faultWindow(_ faults: [Fault], _ time: UInt64) -> Int? {
        faults.lastIndex { $0.at <= time }
    }

    private var countableRange: String {
        countable.certain == countable.possible ? "\(countable.certain)" : "\(countable.certain)...\(countable.possible)"
    }

    var report: String {
        var lines: [String] = []
        lines.append("chaos: \(String(format2: seconds, 1)) s, \(channels) channels, \(clients) clients; \(connectFailures) connection attempts failed\(firstConnectFailure.map { " (first: \($0))" } ?? ""); \(cutClients) connections cut \(cutReasons.sorted { $0.key < $1.key }.map { "\($0.value)× \($0.key)" })")
        lines.append("ledger: sent \(sent) (and \(excludedSent) by cut clients, not counted); deliveries owed \(owed), made \(made), missing \(missing) (cross-host \(missingCrossHost), same host \(missingSameHost)) = \(missingPairs) (message, node) pairs by node \(missingPairsByNode.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }), \(countableRange) between two received ones on the same node (what the nodes can count; \(countable.shared) streams had several senders); duplicates \(duplicates), echoes \(echoes), unreadable \(unreadable)")
        lines.append("latency ms: cross-host p50 \(ms(crossHostLatency.quantile(0.5))) p99 \(ms(crossHostLatency.quantile(0.99))) max \(ms(crossHostLatency.max)); same host p50 \(ms(sameHostLatency.quantile(0.5))) p99 \(ms(sameHostLatency.quantile(0.99))) max \(ms(sameHostLatency.max))")
        for f in faults {
            lines.append("fault \"\(f.label)\" at +\(String(format2: f.offset, 1)) s: cross-host deliveries owed \(f.owed), lost \(f.lost), late (>1 s) \(f.late); disturbed for \(String(format2: f.disturbedFor, 2)) s, then \(f.healthyAfter) on time; not involving the node set apart: owed \(f.owedApart), lost \(f.lostApart), late \(f.lateApart); clients joined after it by node \(f.joined.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" })")
        }
        return lines.joined(separator: "\n")
    }

    /// The figures the tests read, one `key value` per line (faults as `fault.N.key value`).
    var keyValues: String {
        var out = [
            "sent \(sent)", "excluded_sent \(excludedSent)", "owed \(owed)", "made \(made)", "missing \(missing)",
            "missing_cross_host \(missingCrossHost)", "missing_same_host \(missingSameHost)", "missing_pairs \(missingPairs)",
            "countable_pairs \(countable.certain)", "countable_pairs_max \(countable.possible)", "shared_streams \(countable.shared)", "duplicates \(duplicates)", "echoes \(echoes)", "unreadable \(unreadable)",
            "clients \(clients)", "channels \(channels)", "cut \(cutClients)", "connect_failures \(connectFailures)",
            "cross_host_p99_ms \(ms(crossHostLatency.quantile(0.99)))", "cross_host_max_ms \(ms(crossHostLatency.max))",
            "cross_host_deliveries \(crossHostLatency.total)",
        ]
        for (node, n) in missingPairsByNode.sorted(by: { $0.key < $1.key }) { out.append("missing_pairs_node.\(node) \(n)") }
        for (i, f) in faults.enumerated() {
            for (node, n) in f.joined.sorted(by: { $0.key < $1.key }) { out.append("fault.\(i).joined.\(node) \(n)") }
            out += ["fault.\(i).healthy_after \(f.healthyAfter)", "fault.\(i).owed_apart \(f.owedApart)", "fault.\(i).lost_apart \(f.lostApart)", "fault.\(i).late_apart \(f.lateApart)", "fault.\(i).owed \(f.owed)", "fault.\(i).lost \(f.lost)", "fault.\(i).late \(f.late)", "fault.\(i).disturbed_seconds \(String(format2: f.disturbedFor, 2))"]
        }
        return out.joined(separator: "\n") + "\n"
    }
}
