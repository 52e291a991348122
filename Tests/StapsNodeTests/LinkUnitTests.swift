import NIOCore
import NIOEmbedded
import StapsCluster
import StapsNode
@testable import StapsRabbit
import Testing

/// The link's pure parts, in memory: the wire format, the topology state machine, confirms.
@Suite struct WireFormatTests {
    static func body(_ name: String, _ payloads: [String]) -> [UInt8] {
        var body: [UInt8] = []
        WireFormat.beginBody(channel: name, into: &body)
        for p in payloads { WireFormat.append(payload: ByteBuffer(string: p), into: &body) }
        return body
    }

    static func decode(_ bytes: [UInt8]) throws -> (String, [String]) {
        let result = try bytes.withUnsafeBytes { raw in try WireFormat.decode(raw) }
        return (result.channel, result.payloads.map { String(decoding: bytes[$0], as: UTF8.self) })
    }

    @Test func roundTrip() throws {
        let bytes = Self.body("room.ü", ["a", "bc", String(repeating: "x", count: 70_000)])
        #expect(bytes.count == wireFormatSize(name: "room.ü", payloadBytes: 70_003, count: 3))
        let (name, payloads) = try Self.decode(bytes)
        #expect(name == "room.ü")
        #expect(payloads == ["a", "bc", String(repeating: "x", count: 70_000)])
    }

    @Test func malformedBodiesAreRefusedWhole() {
        let good = Self.body("r", ["hello", "world"])
        #expect(throws: WireFormat.Malformed.tooShort) { try Self.decode([]) }
        #expect(throws: WireFormat.Malformed.tooShort) { try Self.decode([0]) }
        #expect(throws: WireFormat.Malformed.nameTruncated) { try Self.decode([0, 5, 0x61]) }
        #expect(throws: WireFormat.Malformed.badName) { try Self.decode([0, 0, 0, 0, 0, 1, 0x61]) }
        #expect(throws: WireFormat.Malformed.badName) { try Self.decode([0, 1, 0xFF, 0, 0, 0, 1, 0x61]) }
        #expect(throws: WireFormat.Malformed.badName) { try Self.decode([0, 2, 0x61, 0, 0, 0, 0, 1, 0x61]) }
        #expect(throws: WireFormat.Malformed.noMessages) { try Self.decode([0, 1, 0x61]) }
        // Cut anywhere inside the second message: nothing is delivered, not even the first.
        for cut in (good.count - 8)..<good.count {
            #expect(throws: WireFormat.Malformed.self) { try Self.decode(Array(good[..<cut])) }
        }
        #expect(throws: WireFormat.Malformed.payloadTruncated(at: 3)) { try Self.decode([0, 1, 0x61, 0xFF, 0xFF, 0xFF, 0xFF, 0x61]) }
        #expect(throws: WireFormat.Malformed.emptyPayload(at: 3)) { try Self.decode([0, 1, 0x61, 0, 0, 0, 0]) }
    }

    @Test func groupsKeepPerSenderOrderAndSplitOnTypeAndSize() {
        func m(_ channel: String, _ connection: UInt64, _ text: Bool, _ size: Int = 1) -> ClusterMessage {
            ClusterMessage(channel: channel, payload: ByteBuffer(repeating: 0x61, count: size), isText: text, connectionID: connection)
        }
        let groups = PublishGroups.make([m("a", 1, true), m("b", 1, true), m("a", 1, true), m("a", 2, true), m("a", 1, false), m("a", 1, true)])
        #expect(groups.map(\.indices) == [[0, 2], [1], [3], [4], [5]])
        let big = PublishGroups.make([m("a", 1, false, 200 << 10), m("a", 1, false, 100 << 10)])
        #expect(big.map(\.indices) == [[0], [1]])
    }
}

/// The publishes waiting for the link's thread.
@Suite struct PendingPublishesTests {
    /// On TLS a take must fit the socket's room, wire and all: every message's overhead counts.
    @Test func theWireOverheadCountsForEveryMessage() {
        var p = PendingPublishes(capacity: 1 << 20)
        let batch = (0..<4).map { i in ClusterMessage(channel: "c", payload: ByteBuffer(string: "m\(i)xxxxxxx"), isText: true, connectionID: 1) }
        let added = p.add(batch, bytes: 40)
        #expect(added)
        // 10 bytes each and 5 of overhead: 3 fit in 45, not 4.
        let taken = p.take(bytes: 45, overhead: 5, oversizeFirst: true)
        #expect(taken.map { String(buffer: $0.payload) } == ["m0xxxxxxx", "m1xxxxxxx", "m2xxxxxxx"])
        #expect(p.bytes == 10)
    }
}

@Suite struct TopologyTests {
    typealias T = Topology<Int>
    let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000)

    @Test func joinsWaitForTheirOwnBindOKAndArePipelined() throws {
        var t = T(linger: .seconds(2))
        t.connected()
        var sends: [T.Request] = []
        for i in 0..<100 {
            let (ready, send) = t.want("c\(i)", i)
            #expect(ready == nil)
            sends.append(send!)
        }
        // A second join of a channel being bound waits for the same bind-ok.
        let again = t.want("c5", 1005)
        #expect(again.ready == nil && again.send == nil)
        #expect(t.requestsInFlight == 100)
        #expect(sends.allSatisfy { $0.operation == .bind })
        for i in 0..<100 {
            let (channel, ready) = try t.answered(.bind)
            #expect(channel == "c\(i)" && ready == (i == 5 ? [5, 1005] : [i]))
        }
        #expect(t.bound.count == 100)
        // Bound: a join proceeds at once.
        #expect(t.want("c1", 7).ready == 7)
    }

    @Test func downMeansJoinsProceedAndRebindAfterwards() throws {
        var t = T(linger: .seconds(2), rebindWindow: 3)
        #expect(t.want("early", 1).ready == 1)
        t.connected()
        _ = t.want("a", 2)
        _ = t.want("b", 3)
        // Lost with binds in flight: their joins proceed (local service).
        #expect(Set(t.disconnected()) == [2, 3])
        #expect(t.bound.isEmpty && t.requestsInFlight == 0)
        t.connected()
        var rebinds = t.nextRebinds()
        #expect(rebinds.count == 3 && Set(rebinds.map(\.key)) == ["early", "a", "b"])
        #expect(t.nextRebinds().isEmpty, "window of 3 is full")
        // A join during the rebind is sent at once, not behind the window.
        let join = t.want("new", 4)
        #expect(join.send == T.Request(operation: .bind, key: "new"))
        for _ in 0..<3 { #expect(try t.answered(.bind).waiters.isEmpty) }
        #expect(try t.answered(.bind).waiters == [4])
        rebinds = t.nextRebinds()
        #expect(rebinds.isEmpty && t.rebindsLeft == 0 && t.bound.count == 4)
    }

    @Test func lingerUnbindsOnlyWhatIsStillUnwanted() throws {
        var t = T(linger: .seconds(2))
        t.connected()
        _ = t.want("x", 1)
        _ = try t.answered(.bind)
        #expect(t.isSettled("x"))
        t.linger("x", now: t0)
        #expect(t.expire(now: t0 + .seconds(1)).isEmpty)
        // Rejoined within the linger: never unbound.
        #expect(t.want("x", 2).ready == 2)
        #expect(t.expire(now: t0 + .seconds(3)).isEmpty)
        t.linger("x", now: t0 + .seconds(3))
        #expect(t.expire(now: t0 + .seconds(5)) == [T.Request(operation: .unbind, key: "x")])
        #expect(t.wanted["x"] == nil)
        // A join while the unbind is in flight binds again after it, and waits for that bind.
        let join = t.want("x", 3)
        #expect(join.ready == nil && join.send == T.Request(operation: .bind, key: "x"))
        #expect(try t.answered(.unbind).waiters.isEmpty)
        #expect(!t.bound.contains("x"))
        #expect(try t.answered(.bind).waiters == [3])
        #expect(t.bound.contains("x"))
        // Asked to keep it at the deadline (a channel came back meanwhile): active, not unbound.
        t.linger("x", now: t0 + .seconds(10))
        #expect(t.expire(now: t0 + .seconds(13)) { $0 == "x" }.isEmpty)
        #expect(t.wanted["x"] == .active)
    }

    @Test func answersOutOfOrderAreAnError() {
        var t = T(linger: .seconds(2))
        t.connected()
        #expect(throws: T.OutOfOrder.self) { try t.answered(.bind) }
        _ = t.want("x", 1)
        #expect(throws: T.OutOfOrder.self) { try t.answered(.unbind) }
    }
}

@Suite struct ConfirmsTests {
    @Test func acksSettleInOrderAndLossCountsTheRest() {
        var c = Confirms()
        for n in 1...5 { c.published(messages: n) }
        #expect(c.messages == 15 && c.outstanding == 5)
        #expect(c.settle(tag: 2, multiple: true) == 3)
        #expect(c.settle(tag: 4, multiple: false) == 4)
        #expect(c.settle(tag: 4, multiple: false) == 0, "settled once")
        #expect(c.outstanding == 2, "tags 3 and 5")
        #expect(c.settle(tag: 3, multiple: false) == 3)
        #expect(c.reset() == 5, "tag 5 was written and never confirmed")
        #expect(c.nextTag == 1 && c.messages == 0)
    }

    @Test func aLaterTagAckedFirstLeavesNothingOutstanding() {
        var c = Confirms()
        c.published(messages: 1)
        c.published(messages: 2)
        #expect(c.settle(tag: 2, multiple: false) == 2)
        #expect(c.outstanding == 1)
        #expect(c.settle(tag: 1, multiple: true) == 1)
        #expect(c.outstanding == 0 && c.messages == 0, "the hole tag 2 left is skipped")
    }
}

/// The binds on their way to the broker: what proceeds at once, what is queued, in what order,
/// when the answer timeout starts, and what a lost connection leaves.
@Suite struct BindingPipelineTests {
    @Test func joinsWaitForTheirBindWhileUpAndProceedWhileDown() throws {
        let loop = EmbeddedEventLoop()
        var pipeline = BindingPipeline(linger: .seconds(2))
        let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000)
        // Down: a join proceeds at once, nothing is queued.
        let early = loop.makePromise(of: Void.self)
        #expect(pipeline.handle([.firstChannel("c.a.*.*.*", early)], now: t0).count == 1)
        #expect(pipeline.nextUnsent() == nil)
        // Up: the wanted key is rebound, and a new key's join waits for its bind.
        pipeline.connected(now: t0)
        pipeline.expireAndRebind(now: t0) { _ in false }
        let join = loop.makePromise(of: Void.self)
        #expect(pipeline.handle([.firstChannel("c.b.*.*.*", join), .lastChannelGone("c.a.*.*.*")], now: t0 + .seconds(1)).isEmpty)
        #expect(pipeline.nextUnsent()?.key == "c.a.*.*.*")
        #expect(pipeline.nextUnsent()?.key == "c.b.*.*.*")
        #expect(pipeline.nextUnsent() == nil)
        #expect(pipeline.inFlight == 2)
        // The answer timeout started with the first request; a later one does not restart it.
        #expect(pipeline.lastProgress == t0)
        let first = try pipeline.answered(.bind, now: t0 + .seconds(3))
        #expect(first.key == "c.a.*.*.*" && first.settled && first.waiters.isEmpty)  // a rebind: no join waits on it
        let second = try pipeline.answered(.bind, now: t0 + .seconds(4))
        #expect(second.key == "c.b.*.*.*" && second.settled && second.waiters.count == 1 && pipeline.lastProgress == t0 + .seconds(4))
        #expect(pipeline.boundCount == 2 && pipeline.inFlight == 0)
        // The linger of the key that lost its last channel ends: its unbind is queued.
        pipeline.expireAndRebind(now: t0 + .seconds(4)) { _ in false }
        #expect(pipeline.nextUnsent() == BindingPipeline.Request(operation: .unbind, key: "c.a.*.*.*"))
        #expect(throws: Topology<BindingPipeline.Waiter>.OutOfOrder.self) { try pipeline.answered(.bind, now: t0 + .seconds(5)) }
        early.succeed(())
        join.succeed(())
    }

    @Test func aLostConnectionReturnsTheWaitingJoinsAndForgetsWhatWasNotSent() {
        let loop = EmbeddedEventLoop()
        var pipeline = BindingPipeline(linger: .seconds(2))
        pipeline.connected(now: .now())
        let join = loop.makePromise(of: Void.self)
        #expect(pipeline.handle([.firstChannel("c.c.*.*.*", join)], now: .now()).isEmpty)
        let waiting = pipeline.disconnected()
        #expect(waiting.count == 1 && pipeline.nextUnsent() == nil && pipeline.inFlight == 0 && pipeline.boundCount == 0)
        join.succeed(())
    }
}
