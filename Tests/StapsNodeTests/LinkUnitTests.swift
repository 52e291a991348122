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

@Suite struct TopologyTests {
    let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000)

    @Test func bindsArePipelinedAndSettleInOrder() throws {
        var t = Topology()
        #expect(t.bind("x", now: t0) == nil, "down: nothing is sent")
        t.connected()
        for i in 0..<100 { #expect(t.bind("c\(i)", now: t0) == Topology.Request(operation: .bind, key: "c\(i)")) }
        #expect(t.bind("c5", now: t0) == nil, "being bound already")
        #expect(t.requestsInFlight == 100 && t.isHeld("c5") && !t.isSettled("c5"))
        for i in 0..<100 {
            let answer = try t.answered(.bind, now: t0 + .milliseconds(Int64(i + 1)))
            #expect(answer.key == "c\(i)" && answer.settled && !answer.wasRebind)
        }
        #expect(t.bound.count == 100 && t.boundByGranularity == [100, 0, 0, 0])
        #expect(t.bind("c1", now: t0) == nil, "bound already")
        // The broker took 1 ms per bind while busy: that is the estimate a new request waits by.
        #expect(abs(t.serviceTime.nanoseconds - 1_000_000) < 100_000)
    }

    @Test func anUnbindInFlightIsUndoneByALaterBind() throws {
        var t = Topology()
        t.connected()
        _ = t.bind("c.a.*.*.*", now: t0)
        _ = try t.answered(.bind, now: t0)
        #expect(t.boundByGranularity == [0, 0, 0, 1])
        #expect(t.unbind("c.a.*.*.*", now: t0) == Topology.Request(operation: .unbind, key: "c.a.*.*.*"))
        #expect(!t.isHeld("c.a.*.*.*"))
        #expect(t.bind("c.a.*.*.*", now: t0) == Topology.Request(operation: .bind, key: "c.a.*.*.*"), "bound again after the unbind")
        #expect(try !t.answered(.unbind, now: t0).settled)
        #expect(try t.answered(.bind, now: t0).settled)
        #expect(t.unbind("nothing", now: t0) == nil)
    }

    @Test func answersOutOfOrderAreAnErrorAndALossForgetsEverything() throws {
        var t = Topology()
        t.connected()
        #expect(throws: Topology.OutOfOrder.self) { try t.answered(.bind, now: t0) }
        _ = t.bind("x", now: t0, rebind: true)
        #expect(throws: Topology.OutOfOrder.self) { try t.answered(.unbind, now: t0) }
        #expect(t.rebindsInFlight == 1)
        t.disconnected()
        #expect(t.requestsInFlight == 0 && t.rebindsInFlight == 0 && t.bound.isEmpty && !t.isUp)
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
    static func pipeline() -> BindingPipeline { BindingPipeline(.init(mode: .fixed(buckets: 16), linger: .seconds(2))) }

    @Test func joinsWaitForTheirBindWhileUpAndProceedWhileDown() throws {
        let loop = EmbeddedEventLoop()
        var pipeline = Self.pipeline()
        let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000)
        let a = ChannelKeys(channel: "a")
        let b = (0...).lazy.map { ChannelKeys(channel: "b\($0)") }.first { $0.key(.buckets16) != a.key(.buckets16) }!
        // Down: a join proceeds at once, nothing is queued.
        let early = loop.makePromise(of: Void.self)
        #expect(pipeline.handle([.firstChannel(a, early)], now: t0).ready.count == 1)
        #expect(pipeline.nextUnsent() == nil)
        // Up: the held key is rebound, and a new key's join waits for its bind.
        #expect(pipeline.connected(now: t0).ready.isEmpty)
        let join = loop.makePromise(of: Void.self)
        #expect(pipeline.handle([.firstChannel(b, join), .lastChannelGone("a")], now: t0 + .seconds(1)).ready.isEmpty)
        #expect(pipeline.nextUnsent()?.key == a.key(.buckets16))
        #expect(pipeline.nextUnsent()?.key == b.key(.buckets16))
        #expect(pipeline.nextUnsent() == nil)
        #expect(pipeline.inFlight == 2)
        // The answer timeout started with the first request; a later one does not restart it.
        #expect(pipeline.lastProgress == t0)
        let first = try pipeline.answered(.bind, now: t0 + .seconds(3))
        #expect(first.answer.key == a.key(.buckets16) && first.answer.wasRebind && first.effects.ready.isEmpty)
        let second = try pipeline.answered(.bind, now: t0 + .seconds(4))
        #expect(second.effects.ready.count == 1 && second.effects.markBound == [b.key(.buckets16)] && pipeline.lastProgress == t0 + .seconds(4))
        #expect(pipeline.boundCount == 2 && pipeline.inFlight == 0)
        // The linger of the channel that left ends: its key is retired, then unbound.
        _ = pipeline.tick(now: t0 + .seconds(4))
        let retiring = pipeline.retireCandidates()
        #expect(retiring == [a.key(.buckets16)])
        _ = pipeline.finishRetire(retiring, now: t0 + .seconds(4))
        #expect(pipeline.nextUnsent() == BindingPipeline.Request(operation: .unbind, key: a.key(.buckets16)))
        #expect(throws: Topology.OutOfOrder.self) { try pipeline.answered(.bind, now: t0 + .seconds(5)) }
        early.succeed(())
        join.succeed(())
    }

    @Test func aLostConnectionReturnsTheWaitingJoinsAndForgetsWhatWasNotSent() {
        let loop = EmbeddedEventLoop()
        var pipeline = Self.pipeline()
        _ = pipeline.connected(now: .now())
        let join = loop.makePromise(of: Void.self)
        #expect(pipeline.handle([.firstChannel(ChannelKeys(channel: "c"), join)], now: .now()).ready.isEmpty)
        let waiting = pipeline.disconnected().ready
        #expect(waiting.count == 1 && pipeline.nextUnsent() == nil && pipeline.inFlight == 0 && pipeline.boundCount == 0)
        join.succeed(())
    }
}
