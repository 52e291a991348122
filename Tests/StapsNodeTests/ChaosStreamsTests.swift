import Testing

@testable import StapsBench

/// The chaos ledger's count of what the nodes can see, on logs written by hand: one sender per
/// node (exact), senders sharing a node (ordered by what each had heard), cut clients (a range).
@Suite struct ChaosStreamsTests {
    /// A log of one channel; `clients` are (node, send times, cut).
    private func log(_ clients: [(node: String, sent: [UInt64], cut: Bool)]) -> ChaosLog.State {
        var state = ChaosLog.State()
        state.channels = ["/c"]
        for c in clients {
            var client = ChaosLog.Client(channel: 0)
            client.node = c.node
            client.connectedAt = 0
            client.sent = c.sent
            if c.cut { client.cut = ("connection dropped", 1_000) }
            state.clients.append(client)
        }
        return state
    }

    private func count(_ state: ChaosLog.State) -> ChaosStreams {
        var streams = ChaosStreams()
        streams.add(state, channel: Array(state.clients.indices))
        return streams
    }

    @Test func aLoneSendersGapsBetweenTwoReceivedAreCountedExactly() {
        var state = log([("a", [10, 20, 30, 40, 50], false), ("b", [], false)])
        // b got 1, 3, 5: 2 and 4 are gaps. Lost at the end (none here) would not count.
        state.clients[1].received = [(0, 1, 11), (0, 3, 31), (0, 5, 51)]
        let streams = count(state)
        #expect(streams.certain == 2 && streams.possible == 2 && streams.shared == 0)
    }

    @Test func lossesAtAStreamsStartOrEndAreNotCountable() {
        var state = log([("a", [10, 20, 30, 40, 50], false), ("b", [], false)])
        state.clients[1].received = [(0, 2, 21), (0, 3, 31)]
        let streams = count(state)
        #expect(streams.certain == 0 && streams.possible == 0)
    }

    @Test func sendersSharingANodeAreOrderedByWhatEachHadHeard() {
        // a and b on node x send in turn; each heard the other's last message before its next.
        var state = log([("x", [10, 30, 50], false), ("x", [20, 40, 60], false), ("y", [], false)])
        state.clients[0].received = [(1, 1, 21), (1, 2, 41), (1, 3, 61)]
        state.clients[1].received = [(0, 1, 11), (0, 2, 31), (0, 3, 51)]
        // y got a1 and b3; between them in x's stream: b1 a2 b2 a3 (4), all certain.
        state.clients[2].received = [(0, 1, 12), (1, 3, 62)]
        let streams = count(state)
        #expect(streams.certain == 4 && streams.possible == 4 && streams.shared == 1)
    }

    @Test func anOrderTheLogLeavesOpenMakesARange() {
        // Nobody on x heard the other: b1 may have come before a1 or after a2.
        var state = log([("x", [10, 30], false), ("x", [20], false), ("y", [], false)])
        state.clients[2].received = [(0, 1, 12), (0, 2, 32)]
        let streams = count(state)
        #expect(streams.certain == 0 && streams.possible == 1)
    }

    @Test func aCutReceiversNodeMayHaveCountedPastWhatItLogged() {
        var state = log([("a", [10, 20, 30], false), ("b", [], true)])
        state.clients[1].received = [(0, 1, 11)]
        let streams = count(state)
        #expect(streams.certain == 0 && streams.possible == 2)
    }

    @Test func aCutSendersUnreceivedTailMayNeverHaveReachedItsNode() {
        var state = log([("a", [10, 20, 30, 40], true), ("b", [], false), ("c", [], false)])
        // b got 1 and 3 (so 2 certainly reached a's node), c got 1 and 4... but 4 reached,
        // so everything before it did: c's gaps 2 and 3 are certain too.
        state.clients[1].received = [(0, 1, 11), (0, 3, 31)]
        state.clients[2].received = [(0, 1, 11), (0, 4, 41)]
        let streams = count(state)
        #expect(streams.certain == 3 && streams.possible == 3)
    }
}
