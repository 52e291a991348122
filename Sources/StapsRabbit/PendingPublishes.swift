import NIOCore
import StapsCluster

/// The publishes the event loops handed over and the link's thread has not taken yet, oldest
/// first, bounded in bytes (`amqp_buffer`). A plain value: `LoopHandoff` holds it inside its
/// locked state, so every method here runs under that lock.
struct PendingPublishes {
    private var messages: [ClusterMessage] = []
    /// What the messages held count against the capacity (see `bytes(of:)`).
    private(set) var bytes = 0
    let capacity: Int

    init(capacity: Int) {
        self.capacity = capacity
    }

    var isEmpty: Bool { self.messages.isEmpty }

    /// What a message counts against the capacity: its payload and its channel's name.
    static func bytes(of message: ClusterMessage) -> Int { message.payload.readableBytes + message.channel.utf8.count }

    /// Appends a batch of `bytes` (the sum of `bytes(of:)`); false, and nothing appended, when
    /// it does not fit.
    mutating func add(_ batch: [ClusterMessage], bytes: Int) -> Bool {
        guard self.bytes + bytes <= self.capacity else { return false }
        self.messages.append(contentsOf: batch)
        self.bytes += bytes
        return true
    }

    /// Takes messages, oldest first, up to `limit` bytes, counting `overhead` more per message
    /// for what the wire adds. The first message is taken even when it alone is over the limit
    /// only if `oversizeFirst`.
    mutating func take(bytes limit: Int, overhead: Int, oversizeFirst: Bool) -> [ClusterMessage] {
        guard limit > 0, !self.messages.isEmpty else { return [] }
        if overhead == 0, self.bytes <= limit { return self.removeAll() }
        var bytes = 0
        var wire = 0
        var n = 0
        while n < self.messages.count {
            let size = Self.bytes(of: self.messages[n])
            guard wire + size + overhead <= limit || (n == 0 && oversizeFirst) else { break }
            bytes += size
            wire += size + overhead
            n += 1
        }
        let out = Array(self.messages[..<n])
        self.messages.removeFirst(n)
        self.bytes -= bytes
        return out
    }

    /// Takes everything.
    mutating func removeAll() -> [ClusterMessage] {
        var out: [ClusterMessage] = []
        swap(&out, &self.messages)
        self.bytes = 0
        return out
    }
}
