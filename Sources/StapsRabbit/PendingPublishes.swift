import NIOCore
import StapsCluster

/// The publishes the event loops handed over and the link's thread has not taken yet, oldest
/// first, bounded in bytes (`amqp_buffer`) and in age (`amqp_max_age`). A plain value:
/// `LoopHandoff` holds it inside its locked state, so every method here runs under that lock.
///
/// Each batch an event loop hands over is stamped once with its arrival, not each message.
/// Batches older than `maxAge` are dropped whole and counted (`expired`) when the link's thread
/// takes, and when a batch does not fit: a message that waited that long is not sent late, and
/// an old one never keeps a fresh one out.
struct PendingPublishes {
    private var messages = CircularBuffer<ClusterMessage>()
    /// The batches in `messages`, oldest first: how many of their messages are left, and when
    /// they arrived.
    private var batches = CircularBuffer<Batch>()
    /// What the messages held count against the capacity (see `bytes(of:)`).
    private(set) var bytes = 0
    /// Messages dropped for their age and not yet reported by `take`.
    private var expired = 0
    let capacity: Int
    let maxAge: TimeAmount

    /// Consecutive messages that arrived together.
    private struct Batch {
        var count: Int
        var arrived: NIODeadline
    }

    /// What `take` returns: messages, oldest first, and how many messages were dropped for
    /// their age since the last take.
    struct Taken {
        var messages: [ClusterMessage] = []
        var expired = 0
    }

    init(capacity: Int, maxAge: TimeAmount) {
        self.capacity = capacity
        self.maxAge = maxAge
    }

    var isEmpty: Bool { self.messages.isEmpty }

    /// What a message counts against the capacity: its payload and its channel's name.
    static func bytes(of message: ClusterMessage) -> Int { message.payload.readableBytes + message.channel.utf8.count }

    /// Appends a batch of `bytes` (the sum of `bytes(of:)`) that arrived `now`, numbered by
    /// `numbering`; false, and nothing appended, when it does not fit even once what is too
    /// old has gone (its messages still take their numbers: the gaps receivers count).
    mutating func add(_ batch: [ClusterMessage], bytes: Int, now: NIODeadline, numbering: inout StreamNumbering) -> Bool {
        guard !batch.isEmpty else { return true }
        if self.bytes + bytes > self.capacity { self.dropExpired(now: now) }
        guard self.bytes + bytes <= self.capacity else {
            numbering.skip(batch)
            return false
        }
        // Numbered as they are stored: one pass, one copy of each (appending copies anyway).
        for var message in batch {
            message.position = numbering.next(on: message.channel)
            self.messages.append(message)
        }
        self.batches.append(Batch(count: batch.count, arrived: now))
        self.bytes += bytes
        return true
    }

    /// Drops what is older than `maxAge` at `now`, then takes messages, oldest first, up to
    /// `limit` bytes, counting `overhead` more per message for what the wire adds. The first
    /// message is taken even when it alone is over the limit only if `oversizeFirst`.
    mutating func take(bytes limit: Int, overhead: Int, oversizeFirst: Bool, now: NIODeadline) -> Taken {
        var out = Taken()
        out.expired = self.removeExpired(now: now)
        guard limit > 0, !self.messages.isEmpty else { return out }
        var bytes = 0
        var n = 0
        if overhead == 0, self.bytes <= limit {
            (n, bytes) = (self.messages.count, self.bytes)
        } else {
            var wire = 0
            for message in self.messages {
                let size = Self.bytes(of: message)
                guard wire + size + overhead <= limit || (n == 0 && oversizeFirst) else { break }
                bytes += size
                wire += size + overhead
                n += 1
            }
        }
        out.messages = Array(self.messages.prefix(n))
        self.removeFirst(n)
        self.bytes -= bytes
        return out
    }

    /// Takes everything, whatever its age.
    mutating func removeAll() -> [ClusterMessage] {
        let out = Array(self.messages)
        self.messages.removeAll(keepingCapacity: true)
        self.batches.removeAll(keepingCapacity: true)
        self.bytes = 0
        return out
    }

    /// Drops what is older than `maxAge` at `now`; returns how many messages were dropped for
    /// their age since the last time this was asked (here or by `take`).
    mutating func removeExpired(now: NIODeadline) -> Int {
        self.dropExpired(now: now)
        defer { self.expired = 0 }
        return self.expired
    }

    /// Drops the batches that arrived more than `maxAge` before `now` (only ever from the
    /// front: batches arrive in order).
    private mutating func dropExpired(now: NIODeadline) {
        while let first = self.batches.first, now - first.arrived > self.maxAge {
            for message in self.messages.prefix(first.count) { self.bytes -= Self.bytes(of: message) }
            self.messages.removeFirst(first.count)
            self.batches.removeFirst()
            self.expired += first.count
        }
    }

    /// Removes the first `n` messages, and their batches' stamps (the rest of a batch taken in
    /// part keeps its stamp).
    private mutating func removeFirst(_ n: Int) {
        var left = n
        while left > 0, var first = self.batches.first {
            let k = min(left, first.count)
            left -= k
            if k == first.count {
                self.batches.removeFirst()
            } else {
                first.count -= k
                self.batches[self.batches.startIndex] = first
            }
        }
        self.messages.removeFirst(n)
    }
}
