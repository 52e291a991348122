/// Publishes written on the current connection and not yet confirmed by the broker
/// (publisher confirms), as a pure value: on `basic.ack` their messages reached the broker; on
/// `basic.nack` or when the connection dies first they did not, and are counted as lost.
struct Confirms {
    private var entries: [(tag: UInt64, messages: Int)] = []
    private var head = 0
    /// Delivery tag of the next publish on this connection (AMQP counts from 1).
    private(set) var nextTag: UInt64 = 1
    /// Messages (websocket messages, not AMQP messages) awaiting confirmation.
    private(set) var messages = 0

    /// AMQP messages not settled yet.
    private(set) var outstanding = 0

    /// Records one AMQP message carrying `messages` websocket messages.
    mutating func published(messages: Int) {
        self.entries.append((self.nextTag, messages))
        self.nextTag += 1
        self.messages += messages
        self.outstanding += 1
    }

    /// The broker settled `tag` (and every earlier one when `multiple`); returns how many
    /// websocket messages that settles.
    mutating func settle(tag: UInt64, multiple: Bool) -> Int {
        var settled = 0
        if multiple {
            while self.head < self.entries.count, self.entries[self.head].tag <= tag {
                if self.entries[self.head].messages > 0 { self.outstanding -= 1 }
                settled += self.entries[self.head].messages
                self.head += 1
            }
        } else if let i = self.entries[self.head...].firstIndex(where: { $0.tag == tag }), self.entries[i].messages > 0 {
            settled = self.entries[i].messages
            self.outstanding -= 1
            if i == self.head {
                self.head += 1
            } else {
                self.entries[i].messages = 0  // settled out of order: a hole the head skips later
            }
        }
        self.messages -= settled
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
