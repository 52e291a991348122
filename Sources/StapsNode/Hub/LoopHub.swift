import Atomics
import Logging
import NIOConcurrencyHelpers
import NIOCore
import StapsCluster

/// The staps channel table of one event loop. Confined to that loop: every method runs on it.
final class LoopHub: @unchecked Sendable {
    // @unchecked: all mutable state is touched only on `eventLoop` (asserted in debug builds),
    // other loops reach it only through `eventLoop.execute`, and `hub` is set once by
    // `Hub.init` before any loop can reach this one.
    let eventLoop: EventLoop
    let bit: UInt64
    let allocator = ByteBufferAllocator()
    /// The hub that owns this loop hub (weak: the hub holds its loop hubs). Read once per
    /// `endTick`, never per message.
    weak var hub: Hub?
    /// Whether messages go to the cluster link: read per message, so kept here.
    let clustered: Bool

    /// What this loop counts per message (metrics).
    let counters = LoopCounters()

    /// Bytes other loops have queued for this one and it has not delivered yet.
    let backlog = ManagedAtomic<Int>(0)
    /// Per other loop: the batches this loop handed it that it has not delivered yet.
    let undelivered: [ManagedAtomic<Int>]
    /// Batches of this loop's that another loop may have waiting before this loop's publishers
    /// pause reading: that loop's own clients would otherwise wait behind a flood's backlog.
    static let batchesAhead = 2

    private var channels: [ObjectIdentifier: LocalChannel] = [:]
    private var dirty: [WebSocketHandler] = []
    private var outgoing: [[(ChannelEntry, ByteBuffer)]]
    private var outgoingBytes: [Int]
    private var clusterOutgoing: [ClusterMessage] = []
    private var tickScheduled = false

    final class LocalChannel {
        let entry: ChannelEntry
        var members: ContiguousArray<WebSocketHandler> = []
        init(entry: ChannelEntry) { self.entry = entry }
    }

    init(eventLoop: EventLoop, index: Int, loopCount: Int, clustered: Bool) {
        self.eventLoop = eventLoop
        self.clustered = clustered
        self.bit = 1 << UInt64(index)
        self.outgoing = Array(repeating: [], count: loopCount)
        self.outgoingBytes = Array(repeating: 0, count: loopCount)
        self.undelivered = (0..<loopCount).map { _ in ManagedAtomic<Int>(0) }
    }

    /// Adds `member` to the members of `entry` on this loop (for `Membership.attach(_:)`).
    /// From now on it receives every message; returns its list and its slot in it.
    func add(_ member: WebSocketHandler, to entry: ChannelEntry) -> (LocalChannel, slot: Int) {
        self.eventLoop.assertInEventLoop()
        let key = ObjectIdentifier(entry)
        let local: LocalChannel
        if let existing = self.channels[key] {
            local = existing
        } else {
            local = LocalChannel(entry: entry)
            self.channels[key] = local
            _ = entry.loopMask.loadThenBitwiseOr(with: self.bit, ordering: .sequentiallyConsistent)
        }
        local.members.append(member)
        entry.receivers.wrappingIncrement(ordering: .relaxed)
        LoopCounters.add(1, to: self.counters.websocketClients)
        return (local, local.members.count - 1)
    }

    /// Removes the member at `slot` of `local` (for `Membership.leave()`): the last member
    /// moves into its place, and the loop's last member clears the loop's bit.
    func remove(slot: Int, from local: LocalChannel) {
        self.eventLoop.assertInEventLoop()
        let last = local.members.count - 1
        if slot != last {
            let moved = local.members[last]
            local.members[slot] = moved
            moved.membership.slot = slot
        }
        local.members.removeLast()
        local.entry.receivers.wrappingDecrement(ordering: .relaxed)
        LoopCounters.add(-1, to: self.counters.websocketClients)
        if local.members.isEmpty {
            self.channels[ObjectIdentifier(local.entry)] = nil
            _ = local.entry.loopMask.loadThenBitwiseAnd(with: ~self.bit, ordering: .sequentiallyConsistent)
        }
    }

    /// The hot path: hands one framed message to every receiver on this loop but the sender,
    /// queues it once for every other loop with receivers, and once for the cluster.
    ///
    /// - Returns: the work it made here: one per local receiver and per other loop, plus one.
    @inline(__always) @discardableResult
    func publish(from sender: WebSocketHandler?, entry: ChannelEntry, frame: ByteBuffer, headerLength: Int, isText: Bool) -> Int {
        var work = 1
        // Receivers node-wide, the sender excluded when it is one (a publish-only client is
        // not; a POST has no sender).
        let receivers = entry.receivers.load(ordering: .relaxed) &- (sender?.receives == true ? 1 : 0)
        self.counters.fanout.record(receivers)
        if let local = self.channels[ObjectIdentifier(entry)] {
            work &+= local.members.count
            var reached = 0
            for member in local.members where member !== sender {
                if member.enqueue(frame) { reached &+= 1 }
            }
            LoopCounters.add(reached, to: self.counters.messagesDelivered)
            LoopCounters.add(reached &* (frame.readableBytes &- headerLength), to: self.counters.bytesDelivered)
        }
        var mask = entry.loopMask.load(ordering: .sequentiallyConsistent) & ~self.bit
        while mask != 0 {
            let i = mask.trailingZeroBitCount
            self.outgoing[i].append((entry, frame))
            self.outgoingBytes[i] &+= frame.readableBytes
            mask &= mask - 1
            work &+= 1
        }
        if self.clustered {
            let payload = frame.getSlice(at: frame.readerIndex + headerLength, length: frame.readableBytes - headerLength)!
            self.clusterOutgoing.append(ClusterMessage(channel: entry.name, payload: payload, isText: isText, connectionID: sender?.id ?? 0))
        }
        self.scheduleTick()
        return work
    }

    func queueForCluster(_ message: ClusterMessage) {
        self.clusterOutgoing.append(message)
        self.scheduleTick()
    }

    /// Marks a connection as having unflushed writes; flushed once at the end of this loop tick.
    @inline(__always)
    func markDirty(_ connection: WebSocketHandler) {
        self.dirty.append(connection)
        self.scheduleTick()
    }

    @inline(__always)
    private func scheduleTick() {
        guard !self.tickScheduled else { return }
        self.tickScheduled = true
        self.eventLoop.execute { self.endTick() }
    }

    /// Runs once per loop iteration that produced work: one flush per receiver, one task per
    /// other loop, one batch for the cluster.
    private func endTick() {
        self.tickScheduled = false
        self.flushDirty()
        // Nil only once the node has let go of its hub: nobody is left to hand batches to.
        guard let hub = self.hub else { return self.discardOutgoing() }
        for i in self.outgoing.indices where !self.outgoing[i].isEmpty {
            let batch = self.outgoing[i]
            let bytes = self.outgoingBytes[i]
            self.outgoing[i].removeAll(keepingCapacity: true)
            self.outgoingBytes[i] = 0
            let target = hub.loops[i]
            if target.backlog.loadThenWrappingIncrement(by: bytes, ordering: .relaxed) > Hub.crossLoopBacklogLimit {
                target.backlog.wrappingDecrement(by: bytes, ordering: .relaxed)
                hub.droppedCrossLoopBatch(messages: batch.count)
                continue
            }
            let undelivered = self.undelivered[i]
            undelivered.wrappingIncrement(ordering: .relaxed)
            target.eventLoop.execute {
                target.deliver(batch, backlog: target.backlog, bytes: bytes)
                undelivered.wrappingDecrement(ordering: .relaxed)
            }
        }
        if !self.clusterOutgoing.isEmpty {
            let batch = self.clusterOutgoing
            self.clusterOutgoing.removeAll(keepingCapacity: true)
            hub.link.publish(batch)
        }
    }

    private func discardOutgoing() {
        for i in self.outgoing.indices {
            self.outgoing[i].removeAll(keepingCapacity: true)
            self.outgoingBytes[i] = 0
        }
        self.clusterOutgoing.removeAll(keepingCapacity: true)
    }

    private func flushDirty() {
        guard !self.dirty.isEmpty else { return }
        for connection in self.dirty { connection.flushPending() }
        self.dirty.removeAll(keepingCapacity: true)
    }

    /// A batch from another loop or the cluster: deliver to this loop's members, flush once.
    func deliver(_ batch: [(ChannelEntry, ByteBuffer)], backlog: ManagedAtomic<Int>, bytes: Int) {
        var reached = 0
        var payloadBytes = 0
        for (entry, frame) in batch {
            guard let local = self.channels[ObjectIdentifier(entry)] else { continue }
            var n = 0
            for member in local.members where member.enqueue(frame) { n &+= 1 }
            reached &+= n
            payloadBytes &+= n &* Framing.payloadLength(ofServerFrame: frame)
        }
        LoopCounters.add(reached, to: self.counters.messagesDelivered)
        LoopCounters.add(payloadBytes, to: self.counters.bytesDelivered)
        backlog.wrappingDecrement(by: bytes, ordering: .relaxed)
        self.flushDirty()
    }

    /// True while some other loop has more than `batchesAhead` of this loop's batches
    /// waiting: publishers here then wait (reading paused) until it catches up.
    var othersAreBehind: Bool {
        for counter in self.undelivered where counter.load(ordering: .relaxed) > Self.batchesAhead {
            return true
        }
        return false
    }
}
