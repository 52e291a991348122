import CRabbit
import NIOCore
import NIOEmbedded
import RabbitClient
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

    @Test func groupsKeepOrderAndSplitOnTypeSizeAndNumbers() {
        func m(_ channel: String, _ connection: UInt64, _ text: Bool, _ size: Int = 1, at sequence: UInt32? = nil, stream: UInt64 = 7) -> ClusterMessage {
            ClusterMessage(channel: channel, payload: ByteBuffer(repeating: 0x61, count: size), isText: text, connectionID: connection,
                           position: sequence.map { StreamPosition(stream: stream, sequence: $0) })
        }
        // Unnumbered (POSTs to channels not held): one channel's messages share a body,
        // whoever sent them (the connection id is then 0).
        let groups = PublishGroups.make([m("a", 1, true), m("b", 1, true), m("a", 1, true), m("a", 2, true), m("a", 1, false), m("a", 1, true)])
        #expect(groups.map(\.indices) == [[0, 2, 3], [1], [4], [5]])
        #expect(groups.map(\.connectionID) == [0, 1, 1, 1])
        let big = PublishGroups.make([m("a", 1, false, 200 << 10), m("a", 1, false, 100 << 10)])
        #expect(big.map(\.indices) == [[0], [1]])
        // Numbered: consecutive numbers of one stream share a body that carries the first;
        // a skipped number (a message dropped before it was taken), another stream, or an
        // unnumbered message starts a new one. Numbers wrap.
        let numbered = PublishGroups.make([
            m("a", 1, true, at: 1), m("a", 2, true, at: 2), m("b", 1, true, at: 9, stream: 8), m("a", 1, true, at: 3),
            m("a", 1, true, at: 5), m("a", 1, true, at: 6), m("a", 1, true, at: 7, stream: 9), m("a", 1, true),
            m("c", 1, true, at: .max), m("c", 1, true, at: 0),
        ])
        #expect(numbered.map(\.indices) == [[0, 1, 3], [2], [4, 5], [6], [7], [8, 9]])
        #expect(numbered.map(\.first) == [StreamPosition(stream: 7, sequence: 1), StreamPosition(stream: 8, sequence: 9), StreamPosition(stream: 7, sequence: 5),
                                           StreamPosition(stream: 9, sequence: 7), nil, StreamPosition(stream: 7, sequence: .max)])
    }
}

/// The publishes waiting for the link's thread: bounded in bytes and in age, one arrival
/// stamp per batch, oldest first.
@Suite struct PendingPublishesTests {
    static let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000)

    /// Messages of 10 bytes each (9 of payload, the channel's 1): `a0`, `a1`, …
    static func batch(_ tag: String, _ n: Int, size: Int = 9) -> [ClusterMessage] {
        (0..<n).map { i in
            ClusterMessage(channel: "c", payload: ByteBuffer(string: "\(tag)\(i)" + String(repeating: "x", count: size - tag.count - String(i).count)),
                           isText: true, connectionID: 1)
        }
    }

    static func tags(_ messages: [ClusterMessage]) -> [String] { messages.map { String(buffer: $0.payload).filter { $0 != "x" } } }

    /// Adds `n` messages tagged `tag` that arrive `after` t0; whether they fit.
    static func add(_ p: inout PendingPublishes, _ tag: String, _ n: Int, after: TimeAmount, size: Int = 9) -> Bool {
        var numbering = StreamNumbering()
        return p.add(Self.batch(tag, n, size: size), bytes: n * (size + 1), now: Self.t0 + after, numbering: &numbering)
    }

    static func take(_ p: inout PendingPublishes, _ limit: Int = 1 << 20, overhead: Int = 0, oversizeFirst: Bool = true, after: TimeAmount) -> PendingPublishes.Taken {
        p.take(bytes: limit, overhead: overhead, oversizeFirst: oversizeFirst, now: Self.t0 + after)
    }

    @Test func whatWaitedLongerThanTheMaxAgeIsDroppedAndCountedNotSent() {
        var p = PendingPublishes(capacity: 1 << 20, maxAge: .seconds(2))
        #expect(Self.add(&p, "a", 3, after: .zero) && Self.add(&p, "b", 2, after: .seconds(1)) && Self.add(&p, "c", 1, after: .milliseconds(2500)))
        // Exactly the max age is not too old; a nanosecond more is.
        let nothing = Self.take(&p, 0, after: .seconds(2))
        #expect(nothing.messages.isEmpty && nothing.expired == 0 && p.bytes == 60)
        let taken = Self.take(&p, after: .seconds(2) + .nanoseconds(1))
        #expect(taken.expired == 3, "batch a, whole")
        #expect(Self.tags(taken.messages) == ["b0", "b1", "c0"])
        #expect(p.isEmpty && p.bytes == 0)
        #expect(Self.take(&p, after: .seconds(9)).expired == 0, "counted once")
    }

    @Test func aPartialTakeSplitsABatchWhoseRestKeepsItsStamp() {
        var p = PendingPublishes(capacity: 1 << 20, maxAge: .seconds(2))
        #expect(Self.add(&p, "a", 4, after: .zero) && Self.add(&p, "b", 2, after: .seconds(1)))
        // 10 bytes each and 5 of overhead for every message (on amqps a take must fit the
        // socket's room, wire and all): 3 fit in 45, not 4.
        let first = Self.take(&p, 45, overhead: 5, after: .milliseconds(100))
        #expect(Self.tags(first.messages) == ["a0", "a1", "a2"])
        #expect(p.bytes == 30)
        // The rest of batch a is as old as batch a.
        let second = Self.take(&p, after: .milliseconds(2001))
        #expect(second.expired == 1)
        #expect(Self.tags(second.messages) == ["b0", "b1"])
        // Over the limit alone: taken only when the first may be.
        #expect(Self.add(&p, "big", 1, after: .seconds(3), size: 100))
        #expect(Self.take(&p, 50, oversizeFirst: false, after: .seconds(3)).messages.isEmpty)
        #expect(Self.tags(Self.take(&p, 50, after: .seconds(3)).messages) == ["big0"])
    }

    @Test func aFullBufferMakesRoomByDroppingWhatIsTooOldBeforeRefusingFreshMessages() {
        var p = PendingPublishes(capacity: 50, maxAge: .seconds(2))
        #expect(Self.add(&p, "a", 3, after: .zero) && Self.add(&p, "b", 2, after: .seconds(1)))
        #expect(!Self.add(&p, "c", 1, after: .seconds(2)), "full, and nothing is too old yet")
        #expect(Self.add(&p, "d", 1, after: .seconds(3)), "batch a is too old: it makes room")
        #expect(!Self.add(&p, "e", 3, after: .seconds(3)), "batch b is not too old: no room")
        let taken = Self.take(&p, after: .seconds(3))
        #expect(taken.expired == 3, "what add dropped is reported by the next take")
        #expect(Self.tags(taken.messages) == ["b0", "b1", "d0"])
    }

    @Test func takingEverythingLeavesTheExpiredCountToReport() {
        var p = PendingPublishes(capacity: 1 << 20, maxAge: .seconds(1))
        #expect(Self.add(&p, "a", 2, after: .zero) && Self.add(&p, "b", 2, after: .seconds(2)))
        #expect(!Self.add(&p, "huge", 1, after: .seconds(2), size: 1 << 20), "makes room: a goes")
        #expect(Self.tags(p.removeAll()) == ["b0", "b1"])
        #expect(p.isEmpty && p.bytes == 0)
        #expect(p.removeExpired(now: Self.t0 + .seconds(2)) == 2)
        #expect(Self.add(&p, "c", 1, after: .seconds(3)))
        let later = Self.take(&p, after: .seconds(4))
        #expect(Self.tags(later.messages) == ["c0"] && later.expired == 0, "a fresh batch after taking everything keeps its own stamp")
    }
}

/// The publish frames the link writes by hand, read back by rabbitmq-c.
@Suite struct PublishBatchTests {
    /// The content header's properties of the `n`th publish in the batch, decoded by rabbitmq-c.
    static func properties(_ batch: PublishBatch, _ n: Int) throws -> (flags: amqp_flags_t, deliveryMode: UInt8, correlation: String, type: String, appID: String, messageID: String) {
        var bytes = batch.bytes[...]
        var headers: [ArraySlice<UInt8>] = []
        while bytes.count >= 8 {
            let size = bytes.dropFirst(3).prefix(4).reduce(0) { $0 << 8 | Int($1) }
            if bytes.first == 2 { headers.append(bytes.dropFirst(7).prefix(size)) }
            #expect(bytes[bytes.startIndex + 7 + size] == 0xCE, "frame end")
            bytes = bytes.dropFirst(8 + size)
        }
        guard n < headers.count else { throw TestError.unexpected("no publish #\(n)") }
        var pool = amqp_pool_t()
        init_amqp_pool(&pool, 4096)
        defer { empty_amqp_pool(&pool) }
        var encoded = Array(headers[n].dropFirst(12))  // class, weight, body size
        var decoded: UnsafeMutableRawPointer?
        let status = encoded.withUnsafeMutableBytes { raw in
            amqp_decode_properties(60, &pool, amqp_bytes_t(len: raw.count, bytes: raw.baseAddress), &decoded)
        }
        guard status == 0, let p = decoded?.assumingMemoryBound(to: amqp_basic_properties_t.self).pointee else {
            throw TestError.unexpected("rabbitmq-c could not decode the properties: \(status)")
        }
        return (p._flags, p.delivery_mode, AMQPConnection.string(p.correlation_id), AMQPConnection.string(p.type), AMQPConnection.string(p.app_id),
                p._flags & staps_basic_message_id_flag() == 0 ? "" : AMQPConnection.string(p.message_id))
    }

    @Test func aStreamPositionTravelsAsTheMessageID() throws {
        var batch = PublishBatch(frameMax: 131_072)
        let id = StreamPosition(stream: 0xFEED, sequence: 7).messageID
        for messageID in [id, nil] {
            Array("staps".utf8).withUnsafeBytes { exchange in
                Array("c.a.b.c.room".utf8).withUnsafeBytes { key in
                    Array("node-1".utf8).withUnsafeBytes { app in
                        Array("body".utf8).withUnsafeBytes { body in
                            if let messageID {
                                messageID.withUnsafeBytes { batch.append(exchange: exchange, routingKey: key, type: UInt8(ascii: "t"), appID: app, correlationID: 3, messageID: $0, body: body) }
                            } else {
                                batch.append(exchange: exchange, routingKey: key, type: UInt8(ascii: "t"), appID: app, correlationID: 3, body: body)
                            }
                        }
                    }
                }
            }
        }
        let numbered = try Self.properties(batch, 0)
        #expect(numbered.flags & staps_basic_message_id_flag() != 0 && numbered.messageID == "000000000000feed-00000007")
        #expect(numbered.correlation == "3" && numbered.type == "t" && numbered.appID == "node-1", "the properties around it read as before")
        #expect(try Self.properties(batch, 1).flags & staps_basic_message_id_flag() == 0)
    }

    @Test func thePropertiesReadAsTheBrokerReadsThem() throws {
        var batch = PublishBatch(frameMax: 131_072)
        let body: [UInt8] = Array("body".utf8)
        Array("staps".utf8).withUnsafeBytes { exchange in
            Array("c.a.b.c.room".utf8).withUnsafeBytes { key in
                Array("node-1".utf8).withUnsafeBytes { app in
                    body.withUnsafeBytes { body in
                        for id: UInt64 in [42, 0, 18_446_744_073_709_551_615] {
                            batch.append(exchange: exchange, routingKey: key, type: UInt8(ascii: id == 42 ? "t" : "b"), appID: app, correlationID: id, body: body)
                        }
                    }
                }
            }
        }
        let flags = staps_basic_delivery_mode_flag() | staps_basic_correlation_id_flag() | staps_basic_type_flag() | staps_basic_app_id_flag()
        for (n, (id, type)) in [("42", "t"), ("0", "b"), ("18446744073709551615", "b")].enumerated() {
            let p = try Self.properties(batch, n)
            #expect(p.flags == flags && p.deliveryMode == 1, "transient, and nothing else set")
            #expect(p.correlation == id && p.type == type && p.appID == "node-1")
        }
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
            #expect(answer.key == "c\(i)" && answer.settled && answer.granularity == .exact)
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
    static let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000)

    @Test func acksSettleInOrderAndLossCountsTheRest() {
        var c = Confirms()
        for n in 1...5 { c.published(messages: n, bytes: 10 * n, at: Self.t0) }
        #expect(c.messages == 15 && c.outstanding == 5)
        #expect(c.settle(tag: 2, multiple: true, at: Self.t0) == 3)
        #expect(c.settle(tag: 4, multiple: false, at: Self.t0) == 4)
        #expect(c.settle(tag: 4, multiple: false, at: Self.t0) == 0, "settled once")
        #expect(c.outstanding == 2, "tags 3 and 5")
        #expect(c.settle(tag: 3, multiple: false, at: Self.t0) == 3)
        #expect(c.reset() == 5, "tag 5 was written and never confirmed")
        #expect(c.nextTag == 1 && c.messages == 0)
    }

    @Test func aLaterTagAckedFirstLeavesNothingOutstanding() {
        var c = Confirms()
        c.published(messages: 1, bytes: 10, at: Self.t0)
        c.published(messages: 2, bytes: 20, at: Self.t0)
        #expect(c.settle(tag: 2, multiple: false, at: Self.t0) == 2)
        #expect(c.outstanding == 1)
        #expect(c.settle(tag: 1, multiple: true, at: Self.t0) == 1)
        #expect(c.outstanding == 0 && c.messages == 0, "the hole tag 2 left is skipped")
        #expect(c.outstandingBytes == 0 && c.settledBytes == 30, "each byte settled once")
    }

    @Test func bytesAreOutstandingUntilSettledWhicheverWay() {
        var c = Confirms()
        for n in 1...4 { c.published(messages: 1, bytes: 100 * n, at: Self.t0) }
        #expect(c.outstandingBytes == 1000 && c.settledBytes == 0)
        #expect(c.settle(tag: 3, multiple: false, at: Self.t0) == 1)
        #expect(c.outstandingBytes == 700 && c.settledBytes == 300)
        #expect(c.settle(tag: 3, multiple: true, at: Self.t0) == 2, "tags 1 and 2; 3 was settled")
        #expect(c.outstandingBytes == 400 && c.settledBytes == 600)
        #expect(c.reset() == 1)
        #expect(c.outstandingBytes == 0 && c.settledBytes == 0, "a new connection starts over")
    }

    /// The round trip with nothing queued: the newest write an ack settles, the fastest seen.
    @Test func theFastestRoundTripIsKept() {
        var c = Confirms()
        #expect(c.fastestRoundTrip == nil)
        c.published(messages: 1, bytes: 1, at: Self.t0)
        c.published(messages: 1, bytes: 1, at: Self.t0 + .milliseconds(30))
        c.published(messages: 1, bytes: 1, at: Self.t0 + .milliseconds(40))
        #expect(c.settle(tag: 2, multiple: true, at: Self.t0 + .milliseconds(50)) == 2)
        #expect(c.fastestRoundTrip == .milliseconds(20), "tag 2, written at 30 ms")
        #expect(c.settle(tag: 3, multiple: false, at: Self.t0 + .milliseconds(100)) == 1)
        #expect(c.fastestRoundTrip == .milliseconds(20), "60 ms is slower")
        _ = c.reset()
        #expect(c.fastestRoundTrip == nil, "a new connection, a new path")
    }
}

/// How much the link may have written and not had confirmed: what the broker confirms in a
/// round trip plus 100 ms, between 16 KiB and 16 MiB.
@Suite struct PublishWindowTests {
    let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000)

    @Test func theWindowIsWhatTheBrokerConfirmsInARoundTripAndATenthOfASecond() {
        var w = PublishWindow()
        #expect(w.limit == 16 << 10, "the floor, before anything is confirmed")
        w.update(settledBytes: 0, fastestRoundTrip: nil, now: t0)
        #expect(w.limit == 16 << 10)
        // 10 MB/s confirmed, a round trip of nothing: 1 MB may be under way.
        w.update(settledBytes: 1_000_000, fastestRoundTrip: .zero, now: t0 + .milliseconds(100))
        #expect(w.limit == 1_000_000)
        // A slower broker: the window halves every 100 ms down to what it confirms.
        w.update(settledBytes: 1_050_000, fastestRoundTrip: .zero, now: t0 + .milliseconds(200))
        #expect(w.limit == 500_000)
        w.update(settledBytes: 1_100_000, fastestRoundTrip: .zero, now: t0 + .milliseconds(300))
        #expect(w.limit == 250_000)
        // A broker 100 ms away: twice as much may be under way at the same rate.
        w.update(settledBytes: 1_150_000, fastestRoundTrip: .milliseconds(100), now: t0 + .milliseconds(400))
        #expect(w.limit == 250_000, "rate 1.25 MB/s over 200 ms")
        // Nothing confirmed for a second: the floor.
        w.update(settledBytes: 1_150_000, fastestRoundTrip: .zero, now: t0 + .milliseconds(1400))
        #expect(w.limit == 16 << 10)
        // Far faster: capped.
        w.update(settledBytes: 1_000_000_000, fastestRoundTrip: .zero, now: t0 + .milliseconds(1500))
        #expect(w.limit == 16 << 20)
        w.update(settledBytes: 1_000_000_000, fastestRoundTrip: .zero, now: t0 + .milliseconds(1500))
        #expect(w.limit == 16 << 20, "no time passed: no sample")
    }

    /// While the window is what limits the rate, a round trip shorter than 100 ms widens it;
    /// a broker far away does not shrink it.
    @Test(arguments: [0, 10, 200]) func aWindowThatLimitsAFastBrokerGrows(roundTripMillis: Int) {
        var w = PublishWindow()
        let roundTrip = TimeAmount.milliseconds(Int64(roundTripMillis))
        var settled = 0
        var now = t0
        w.update(settledBytes: settled, fastestRoundTrip: roundTrip, now: now)
        for _ in 0..<6 {
            // A full window confirmed every round trip (or every 10 ms), for 100 ms.
            let before = w.limit
            settled += before * 100 / max(10, roundTripMillis)
            now = now + .milliseconds(100)
            w.update(settledBytes: settled, fastestRoundTrip: roundTrip, now: now)
            #expect(w.limit > before || w.limit == 16 << 20, "\(before) -> \(w.limit)")
        }
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
        #expect(first.answer.key == a.key(.buckets16) && first.answer.granularity == .buckets16 && first.effects.ready.isEmpty)
        #expect(pipeline.rebindsLeft == 0, "that was the rebind")
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
