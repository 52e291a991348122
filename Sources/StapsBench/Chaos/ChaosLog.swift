import NIOConcurrencyHelpers
import NIOCore
import WebSocketClient

/// What happened to every chaos client, as it happened: who joined which channel through which
/// node, what each sent and received, and which connections were cut. Written from the clients'
/// event loops and the channel tasks under one lock (a few thousand events a second at most);
/// read once, at the end, by `ChaosLedger`.
final class ChaosLog: Sendable {
    struct Client: Sendable {
        var channel: Int
        /// The node that answered the 101 (`X-Staps-Node`), nil while not connected.
        var node: String?
        var connectedAt: UInt64?
        /// Why and when the connection ended other than by our own close, if it did.
        var cut: (reason: String, at: UInt64)?
        var leaving = false
        /// Send time of each message, by sequence number (1...).
        var sent: [UInt64] = []
        /// (sender, sequence number, time) per message received, in arrival order.
        var received: [(sender: Int, seq: Int, at: UInt64)] = []
        var echoes = 0
        var unreadable = 0
    }

    struct State: Sendable {
        var channels: [String] = []
        var clients: [Client] = []
        var connectFailures = 0
        var firstConnectFailure: String?
    }

    private let state = NIOLockedValueBox(State())

    func newChannel(_ path: String) -> Int {
        self.state.withLockedValue { $0.channels.append(path); return $0.channels.count - 1 }
    }

    func newClient(channel: Int) -> Int {
        self.state.withLockedValue { $0.clients.append(Client(channel: channel)); return $0.clients.count - 1 }
    }

    func connected(_ id: Int, node: String, at time: UInt64) {
        self.state.withLockedValue { $0.clients[id].node = node; $0.clients[id].connectedAt = time }
    }

    func connectFailed(_ error: String) {
        self.state.withLockedValue { s in
            s.connectFailures += 1
            if s.firstConnectFailure == nil { s.firstConnectFailure = error }
        }
    }

    /// Records message `seq` of client `id` as sent now; the caller sends it right after.
    func sending(_ id: Int, at time: UInt64) -> Int {
        self.state.withLockedValue { $0.clients[id].sent.append(time); return $0.clients[id].sent.count }
    }

    func isCut(_ id: Int) -> Bool { self.state.withLockedValue { $0.clients[id].cut != nil } }

    func leaving(_ id: Int) { self.state.withLockedValue { $0.clients[id].leaving = true } }

    /// True once every live member has received every other live member's messages up to the
    /// last each sent (or someone was cut: then there is nothing more to wait for from them).
    func settled(_ members: [Int]) -> Bool {
        self.state.withLockedValue { s in
            let live = members.filter { s.clients[$0].cut == nil && s.clients[$0].connectedAt != nil }
            for r in live {
                var last: [Int: Int] = [:]
                for m in s.clients[r].received { last[m.sender] = max(last[m.sender] ?? 0, m.seq) }
                for sender in live where sender != r && (last[sender] ?? 0) < s.clients[sender].sent.count { return false }
            }
            return true
        }
    }

    func event(_ id: Int, _ event: ClientEvent, at time: UInt64) {
        switch event {
        case .message(_, let buffer):
            let text = String(buffer: buffer)
            let parts = text.split(separator: ":")
            self.state.withLockedValue { s in
                guard parts.count == 2, let sender = Int(parts[0]), let seq = Int(parts[1]) else { s.clients[id].unreadable += 1; return }
                if sender == id { s.clients[id].echoes += 1 } else { s.clients[id].received.append((sender, seq, time)) }
            }
        case .close(let code, let reason):
            self.state.withLockedValue { s in
                if !s.clients[id].leaving, s.clients[id].cut == nil { s.clients[id].cut = ("close \(code.map(String.init) ?? "-") \(reason)", time) }
            }
        case .disconnected:
            self.state.withLockedValue { s in
                if !s.clients[id].leaving, s.clients[id].cut == nil { s.clients[id].cut = ("connection dropped", time) }
            }
        }
    }

    var snapshot: State { self.state.withLockedValue { $0 } }
}
