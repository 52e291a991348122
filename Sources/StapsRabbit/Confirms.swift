import NIOCore

/// Publishes written on the current connection and not yet confirmed by the broker
/// (publisher confirms), as a pure value: on `basic.ack` their messages reached the broker; on
/// `basic.nack` or when the connection dies first they did not, and are counted as lost.
struct Confirms {
    private var entries: [(tag: UInt64, messages: Int, bytes: Int, written: NIODeadline)] = []
    private var head = 0
    /// Delivery tag of the next publish on this connection (AMQP counts from 1).
    private(set) var nextTag: UInt64 = 1
    /// Messages (websocket messages, not AMQP messages) awaiting confirmation.
    private(set) var messages = 0

    /// AMQP messages not settled yet.
    private(set) var outstanding = 0
    /// Bytes (as the handoff counts them: payload and channel name) not settled yet, and
    /// settled so far on this connection: what `PublishWindow` paces by.
    private(set) var outstandingBytes = 0
    private(set) var settledBytes = 0
    /// The fastest confirm on this connection, from the write to the settling: the round trip
    /// with nothing queued before it (see `PublishWindow`).
    private(set) var fastestRoundTrip: TimeAmount?

    /// Records one AMQP message carrying `messages` websocket messages of `bytes`, written `at`.
    mutating func published(messages: Int, bytes: Int, at written: NIODeadline) {
        self.entries.append((self.nextTag, messages, bytes, written))
        self.nextTag += 1
        self.messages += messages
        self.outstanding += 1
        self.outstandingBytes += bytes
    }

    /// The broker settled `tag` (and every earlier one when `multiple`), as read `at`; returns
    /// how many websocket messages that settles.
    mutating func settle(tag: UInt64, multiple: Bool, at now: NIODeadline) -> Int {
        var settled = 0
        var bytes = 0
        var newest: NIODeadline?
        if multiple {
            while self.head < self.entries.count, self.entries[self.head].tag <= tag {
                if self.entries[self.head].messages > 0 {
                    self.outstanding -= 1
                    newest = self.entries[self.head].written
                }
                settled += self.entries[self.head].messages
                bytes += self.entries[self.head].bytes
                self.head += 1
            }
        } else if let i = self.entries[self.head...].firstIndex(where: { $0.tag == tag }), self.entries[i].messages > 0 {
            settled = self.entries[i].messages
            bytes = self.entries[i].bytes
            newest = self.entries[i].written
            self.entries[i].bytes = 0
            self.outstanding -= 1
            if i == self.head {
                self.head += 1
            } else {
                self.entries[i].messages = 0  // settled out of order: a hole the head skips later
            }
        }
        self.messages -= settled
        self.outstandingBytes -= bytes
        self.settledBytes += bytes
        if let newest { self.fastestRoundTrip = min(self.fastestRoundTrip ?? .hours(1), now - newest) }
        // Entries settled out of order ahead of the head are holes (0 messages): skip them.
        while self.head < self.entries.count, self.entries[self.head].messages == 0 { self.head += 1 }
        if self.head == self.entries.count {
            self.entries.removeAll(keepingCapacity: true)
            self.head = 0
        } else if self.head > 4096, self.head * 2 > self.entries.count {
            self.entries.removeFirst(self.head)
            self.head = 0
        }
        return settled
    }

    /// The connection is gone: returns the messages never confirmed, and starts over.
    mutating func reset() -> Int {
        let lost = self.messages
        self = Confirms()
        return lost
    }
}
