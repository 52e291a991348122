/// What the receiving nodes can count of a chaos run's losses, worked out from the clients' log
/// the way the nodes count it (pure).
///
/// A node numbers what it hands its link per channel, in one stream for all its clients on the
/// channel (`StreamNumbering`); a receiving node counts, per stream, the numbers it did not get
/// between the first and the last it got (`StreamGaps`). The clients see their own sequence
/// numbers, not the stream's, so the ledger rebuilds each stream's order:
/// - one sender on its node: its own order, exactly;
/// - several (they share the stream): a message is certainly before another sender's when that
///   sender had received it (a local delivery, long before the next send: the chaos clients
///   send in turn) by the time it sent its own. Where neither had heard the other (a stalled
///   path, a cut client), the order is open and the count becomes a range.
/// Also open: a cut sender's last messages (they may never have reached its node), and what a
/// node received for a cut client after the cut (the client could not log it).
///
/// So the count is a range, `certain...possible`; in a run without cuts or stalls on shared
/// streams the two are equal. The nodes' `staps_cluster_missed_total` must fall in it.
struct ChaosStreams: Sendable {
    /// (message, receiving node) pairs every order consistent with the log counts.
    var certain = 0
    /// Pairs some order consistent with the log counts.
    var possible = 0
    /// Streams with more than one sender.
    var shared = 0

    private struct Message: Hashable {
        var sender: Int
        var seq: Int
    }

    /// Adds one channel's streams; `ids` are its members that got their 101.
    mutating func add(_ log: ChaosLog.State, channel ids: [Int]) {
        var byNode: [String: [Int]] = [:]
        for id in ids { byNode[log.clients[id].node ?? "?", default: []].append(id) }
        for (node, senders) in byNode {
            if senders.count > 1 { self.shared += 1 }
            let order = Order(log, senders)
            // Every message of the stream, and whether it certainly reached the node.
            var messages: [(Message, numbered: Bool)] = []
            for s in senders {
                let client = log.clients[s]
                // TCP keeps a connection's order: what came after a received message reached the
                // node before it. A cut sender's later messages may not have.
                let reached = client.cut == nil ? client.sent.count : Self.lastReceived(log, ids, from: s)
                for seq in client.sent.indices.map({ $0 + 1 }) {
                    messages.append((Message(sender: s, seq: seq), seq <= reached))
                }
            }
            for (receiving, receivers) in byNode where receiving != node {
                var got: Set<Message> = []
                for r in receivers {
                    for m in log.clients[r].received where senders.contains(m.sender) { got.insert(Message(sender: m.sender, seq: m.seq)) }
                }
                guard !got.isEmpty else { continue }
                let receiverCut = receivers.contains { log.clients[$0].cut != nil }
                for (m, numbered) in messages where !got.contains(m) {
                    if numbered, got.contains(where: { order.before($0, m) }), got.contains(where: { order.before(m, $0) }) {
                        self.certain += 1
                    }
                    // Possibly between: one received message that may precede it and another
                    // that may follow it; for a cut receiver, any that may precede it (its node
                    // may have got later ones the client could not log).
                    let mayPrecede = got.filter { !order.before(m, $0) }
                    let mayFollow = got.filter { !order.before($0, m) }
                    guard let p = mayPrecede.first else { continue }
                    let twoApart = mayPrecede.count > 1 ? !mayFollow.isEmpty : mayFollow.contains { $0 != p }
                    if twoApart || receiverCut { self.possible += 1 }
                }
            }
        }
    }

    /// The highest sequence number of `sender` any member received.
    private static func lastReceived(_ log: ChaosLog.State, _ ids: [Int], from sender: Int) -> Int {
        var last = 0
        for r in ids { for m in log.clients[r].received where m.sender == sender { last = max(last, m.seq) } }
        return last
    }

    /// The order the log proves among the messages of the senders on one node.
    private struct Order {
        /// Per sender, then per other sender: (time received, highest sequence received by then).
        private var heard: [Int: [Int: [(at: UInt64, seq: Int)]]] = [:]
        private var sentAt: [Int: [UInt64]] = [:]

        init(_ log: ChaosLog.State, _ senders: [Int]) {
            for s in senders {
                self.sentAt[s] = log.clients[s].sent
                var bySender: [Int: [(at: UInt64, seq: Int)]] = [:]
                for m in log.clients[s].received where senders.contains(m.sender) {
                    let highest = max(bySender[m.sender]?.last?.seq ?? 0, m.seq)
                    bySender[m.sender, default: []].append((m.at, highest))
                }
                self.heard[s] = bySender
            }
        }

        /// Whether `a` was certainly numbered before `b`.
        func before(_ a: Message, _ b: Message) -> Bool {
            if a.sender == b.sender { return a.seq < b.seq }
            guard let sent = self.sentAt[b.sender]?[b.seq - 1], let heard = self.heard[b.sender]?[a.sender] else { return false }
            // The highest of a's sender's messages b's sender had received when it sent b.
            var highest = 0
            for h in heard {
                guard h.at <= sent else { break }
                highest = h.seq
            }
            return a.seq <= highest
        }
    }
}
