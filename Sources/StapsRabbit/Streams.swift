import StapsCluster

/// The sending side of loss accounting: numbers every message the node hands to its link on a
/// channel it holds (`StreamPosition`), before anything can drop it, so that every loss from
/// here to a receiving node shows as a gap there. A plain value: `LoopHandoff` holds it in its
/// locked state, so a channel's numbers follow the order the event loops handed messages over.
///
/// A stream opens when the node starts holding a channel (its first local client) with a
/// fresh random id, and closes when the last one leaves; a message for a channel not held (a
/// POST with no client here) is unnumbered.
struct StreamNumbering {
    private struct Stream {
        let id: UInt64
        var next: UInt32
    }

    private var streams: [String: Stream] = [:]

    /// Streams open now (one per channel held).
    var count: Int { self.streams.count }

    /// The node started holding `channel`: a new stream, numbered from 1.
    mutating func open(_ channel: String) {
        self.streams[channel] = Stream(id: UInt64.random(in: .min ... .max), next: 1)
    }

    /// The node's last client on `channel` left.
    mutating func close(_ channel: String) {
        self.streams[channel] = nil
    }

    /// The next number on `channel`'s stream (taken: each call is one message); nil when the
    /// node does not hold the channel.
    mutating func next(on channel: String) -> StreamPosition? {
        guard let i = self.streams.index(forKey: channel) else { return nil }
        let stream = self.streams.values[i]
        self.streams.values[i].next = stream.next &+ 1
        return StreamPosition(stream: stream.id, sequence: stream.next)
    }

    /// Takes a number for each message, for messages that will never be sent: their numbers
    /// are the gaps that tell the receivers.
    mutating func skip(_ messages: [ClusterMessage]) {
        for message in messages { _ = self.next(on: message.channel) }
    }
}

/// The receiving side of loss accounting: per channel with local clients, the last number seen
/// on each sender's stream, and what a body's numbers say against it. A plain value, owned by
/// the link's thread; tested in memory.
///
/// A body carries the number of its first message; its others follow it. The first body seen
/// on a stream sets where it stands (what came before was not owed to this node, or cannot be
/// told apart from what was not). Numbers past the next expected one are that many messages
/// missed; numbers at or before the last one seen are out of order (reordered or duplicated).
/// Numbers are compared modulo 2^32 (RFC 1982): a stream may wrap.
///
/// Bounded: at most `streamsPerChannel` streams per channel (the one seen least recently goes,
/// and is a new stream if it comes back), and only channels with local clients (`forget` when
/// the last one leaves).
struct StreamGaps {
    static let streamsPerChannel = 16

    /// What one body's numbers say.
    struct Outcome: Equatable {
        /// Messages of the stream skipped before this body.
        var missed = 0
        /// Of the body's messages, those numbered at or before the last one seen.
        var outOfOrder = 0
    }

    private struct Stream {
        let id: UInt64
        var last: UInt32
        /// When it was last seen (`clock`), for eviction.
        var seen: UInt64
    }

    private var channels: [String: [Stream]] = [:]
    private var clock: UInt64 = 0

    /// Channels with streams recorded.
    var channelCount: Int { self.channels.count }

    /// Streams recorded for `channel`.
    func streams(on channel: String) -> Int { self.channels[channel]?.count ?? 0 }

    /// A body of `count` messages on `channel`, the first at `position`.
    mutating func receive(channel: String, at position: StreamPosition, count: Int) -> Outcome {
        precondition(count > 0 && count <= Int(Int32.max), "a body carries at least one message")
        self.clock &+= 1
        // In place (the dictionary's modify accessor): no copy of the channel's streams.
        return Self.receive(at: position, count: count, now: self.clock, in: &self.channels[channel, default: []])
    }

    private static func receive(at position: StreamPosition, count: Int, now: UInt64, in streams: inout [Stream]) -> Outcome {
        let end = position.sequence &+ UInt32(count - 1)
        guard let i = streams.firstIndex(where: { $0.id == position.stream }) else {
            if streams.count >= Self.streamsPerChannel, let oldest = streams.indices.min(by: { streams[$0].seen < streams[$1].seen }) {
                streams.remove(at: oldest)
            }
            streams.append(Stream(id: position.stream, last: end, seen: now))
            return Outcome()
        }
        streams[i].seen = now
        let expected = streams[i].last &+ 1
        let ahead = position.sequence &- expected
        if ahead < 1 << 31 {
            streams[i].last = end
            return Outcome(missed: Int(ahead))
        }
        // The body starts at or before the last number seen: those are out of order; any
        // after it are new.
        let behind = Int(expected &- position.sequence)
        if behind >= count { return Outcome(outOfOrder: count) }
        streams[i].last = end
        return Outcome(outOfOrder: behind)
    }

    /// The channel's last local client left: what it knew of the channel's streams goes.
    mutating func forget(_ channel: String) {
        self.channels[channel] = nil
    }
}
