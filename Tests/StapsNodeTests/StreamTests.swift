import NIOCore
import NIOEmbedded
import StapsCluster
@testable import StapsRabbit
import Testing

/// Loss accounting's pure parts, in memory: how a stream position travels, how a sender
/// numbers what it hands to its link, and what a receiver makes of the numbers.
@Suite struct StreamPositionTests {
    static func parse(_ text: String) -> StreamPosition? {
        Array(text.utf8).withUnsafeBytes { StreamPosition(messageID: $0) }
    }

    @Test func aPositionTravelsAsTwentyFiveBytesOfHex() {
        let p = StreamPosition(stream: 0x0123_4567_89AB_CDEF, sequence: 42)
        #expect(String(decoding: p.messageID, as: UTF8.self) == "0123456789abcdef-0000002a")
        #expect(p.messageID.count == StreamPosition.messageIDLength)
        for q in [p, StreamPosition(stream: 0, sequence: 0), StreamPosition(stream: .max, sequence: .max)] {
            #expect(q.messageID.withUnsafeBytes { StreamPosition(messageID: $0) } == q)
        }
        var reused: [UInt8] = Array("left over from before, longer than an id".utf8)
        p.writeMessageID(into: &reused)
        #expect(reused == p.messageID)
    }

    @Test func anythingElseIsUnnumbered() {
        for text in ["", "0123456789abcdef-0000002", "0123456789abcdef-0000002a0", "0123456789ABCDEF-0000002a", "0123456789abcdef+0000002a",
                     "0123456789abcdeg-0000002a", "0123456789abcdef-0000 02a", "some-client-set-message-id"] {
            #expect(Self.parse(text) == nil, "\(text)")
        }
    }
}

@Suite struct StreamNumberingTests {
    static func message(_ channel: String, _ text: String = "m") -> ClusterMessage {
        ClusterMessage(channel: channel, payload: ByteBuffer(string: text), isText: true, connectionID: 1)
    }

    @Test func aHeldChannelIsNumberedFromOneAndANewIncarnationIsANewStream() throws {
        var numbering = StreamNumbering()
        #expect(numbering.next(on: "room") == nil, "not held: unnumbered")
        numbering.open("room")
        numbering.open("hall")
        let firstTaken = numbering.next(on: "room")
        let first = try #require(firstTaken)
        #expect(first.sequence == 1)
        #expect(numbering.next(on: "room") == StreamPosition(stream: first.stream, sequence: 2))
        #expect(numbering.next(on: "hall")?.sequence == 1, "each channel its own stream")
        numbering.skip([Self.message("room"), Self.message("room"), Self.message("elsewhere")])
        #expect(numbering.next(on: "room")?.sequence == 5, "skipped messages take their numbers")
        numbering.close("room")
        #expect(numbering.next(on: "room") == nil)
        numbering.open("room")
        let againTaken = numbering.next(on: "room")
        let again = try #require(againTaken)
        #expect(again.sequence == 1 && again.stream != first.stream)
        #expect(numbering.count == 2)
    }

    /// The handoff numbers in the order the event loops hand over, whatever then happens to
    /// the messages: refused for want of room or dropped while down, they leave gaps.
    @Test func theHandoffNumbersEveryMessageHandedOverEvenThoseItDrops() throws {
        let loop = EmbeddedEventLoop()
        let handoff = LoopHandoff(capacity: 40, maxAge: .seconds(10))
        handoff.startReceiving(channel: "room", whenBound: loop.makePromise())
        #expect(handoff.add(publishes: [Self.message("room", "a"), Self.message("nobody", "p"), Self.message("room", "b")], bytes: 15))
        #expect(!handoff.add(publishes: [Self.message("room", String(repeating: "x", count: 40))], bytes: 44), "does not fit")
        handoff.skip(publishes: [Self.message("room", "c")])  // the link was down
        #expect(handoff.add(publishes: [Self.message("room", "d")], bytes: 5))
        let taken = handoff.take(publishBytes: 1 << 20).publishes
        #expect(taken.map { String(buffer: $0.payload) } == ["a", "p", "b", "d"])
        #expect(taken.map { $0.position?.sequence } == [1, nil, 2, 5])
        let stream = try #require(taken[0].position?.stream)
        #expect(taken.compactMap { $0.position?.stream }.allSatisfy { $0 == stream })
        handoff.stopReceiving(channel: "room")
        #expect(handoff.add(publishes: [Self.message("room", "e")], bytes: 5))
        #expect(handoff.take(publishBytes: 1 << 20).publishes.map(\.position) == [nil], "no longer held: unnumbered")
        try loop.syncShutdownGracefully()
    }
}

@Suite struct StreamGapsTests {
    static func at(_ sequence: UInt32, _ stream: UInt64 = 1) -> StreamPosition { StreamPosition(stream: stream, sequence: sequence) }

    @Test func theFirstBodySetsWhereTheStreamStandsAndSkippedNumbersAreMissed() {
        var gaps = StreamGaps()
        #expect(gaps.receive(channel: "c", at: Self.at(5), count: 3) == .init(), "what came before was not owed to this node")
        #expect(gaps.receive(channel: "c", at: Self.at(8), count: 1) == .init())
        #expect(gaps.receive(channel: "c", at: Self.at(12), count: 2) == .init(missed: 3))
        #expect(gaps.receive(channel: "c", at: Self.at(14), count: 1) == .init(), "a body of 2 covered 12 and 13")
        // Another sender on the channel, and the same stream id on another channel, are their own.
        #expect(gaps.receive(channel: "c", at: Self.at(100, 2), count: 1) == .init())
        #expect(gaps.receive(channel: "d", at: Self.at(100), count: 1) == .init())
        #expect(gaps.receive(channel: "c", at: Self.at(102, 2), count: 1) == .init(missed: 1))
        #expect(gaps.receive(channel: "c", at: Self.at(16), count: 1) == .init(missed: 1))
    }

    @Test func numbersAtOrBeforeTheLastOneAreOutOfOrder() {
        var gaps = StreamGaps()
        _ = gaps.receive(channel: "c", at: Self.at(1), count: 1)
        #expect(gaps.receive(channel: "c", at: Self.at(5), count: 1) == .init(missed: 3))
        #expect(gaps.receive(channel: "c", at: Self.at(3), count: 1) == .init(outOfOrder: 1), "late, after its gap was counted")
        #expect(gaps.receive(channel: "c", at: Self.at(5), count: 1) == .init(outOfOrder: 1), "a duplicate")
        #expect(gaps.receive(channel: "c", at: Self.at(4), count: 4) == .init(outOfOrder: 2), "4 and 5 again, then 6 and 7 new")
        #expect(gaps.receive(channel: "c", at: Self.at(8), count: 1) == .init(), "the stream stands at 7")
    }

    @Test func numbersWrap() {
        var gaps = StreamGaps()
        _ = gaps.receive(channel: "c", at: Self.at(.max - 1), count: 1)
        #expect(gaps.receive(channel: "c", at: Self.at(.max), count: 3) == .init(), "max, 0, 1")
        #expect(gaps.receive(channel: "c", at: Self.at(4), count: 1) == .init(missed: 2))
        #expect(gaps.receive(channel: "c", at: Self.at(.max), count: 1) == .init(outOfOrder: 1), "behind, across the wrap")
        #expect(gaps.receive(channel: "c", at: Self.at(5), count: 1) == .init())
    }

    @Test func atMostSixteenStreamsPerChannelTheLeastRecentlySeenGoes() {
        var gaps = StreamGaps()
        for s in 0..<UInt64(StreamGaps.streamsPerChannel) { _ = gaps.receive(channel: "c", at: Self.at(1, s), count: 1) }
        _ = gaps.receive(channel: "c", at: Self.at(2, 0), count: 1)  // stream 0 seen again: stream 1 is now the oldest
        #expect(gaps.receive(channel: "c", at: Self.at(1, 99), count: 1) == .init())
        #expect(gaps.streams(on: "c") == StreamGaps.streamsPerChannel)
        #expect(gaps.receive(channel: "c", at: Self.at(10, 0), count: 1) == .init(missed: 7), "stream 0 was kept")
        #expect(gaps.receive(channel: "c", at: Self.at(10, 1), count: 1) == .init(), "stream 1 went: it starts over")
        #expect(gaps.streams(on: "c") == StreamGaps.streamsPerChannel)
    }

    @Test func aChannelsLastClientLeavingForgetsItsStreams() {
        var gaps = StreamGaps()
        _ = gaps.receive(channel: "c", at: Self.at(1), count: 1)
        _ = gaps.receive(channel: "d", at: Self.at(1), count: 1)
        gaps.forget("c")
        #expect(gaps.channelCount == 1 && gaps.streams(on: "c") == 0)
        #expect(gaps.receive(channel: "c", at: Self.at(9), count: 1) == .init(), "no client was here for 2...8")
        #expect(gaps.receive(channel: "d", at: Self.at(9), count: 1) == .init(missed: 7))
    }
}
