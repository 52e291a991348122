import Atomics
import NIOCore
import StapsCluster

/// The receivers of every staps channel on one event loop, and what that loop has queued for
/// the other loops and for the cluster. Confined to that loop: every method runs on it.
final class LoopHub: @unchecked Sendable {
    // @unchecked: all mutable state is touched only on `eventLoop` (asserted in debug builds),
    // other loops reach it only through `eventLoop.execute`, and `hub` is set once by
    // `Hub.init` before any loop can reach this one.
    let eventLoop: EventLoop
    /// This loop's bit in `ActiveChannel.loopMask`.
    let loopBit: UInt64
    let allocator = ByteBufferAllocator()
    /// The hub that owns this loop hub (weak: the hub holds its loop hubs). Read once per
    /// `endTick`, never per message.
    weak var hub: Hub?
    /// Whether messages go to the cluster link: read per message, so kept here.
    let clustered: Bool

    /// What this loop counts per message (metrics).
    let counters = LoopCounters()

    /// Bytes other loops have queued for this one that it has not delivered yet.
    let backlogFromOtherLoops = ManagedAtomic<Int>(0)
    /// Per other loop: how many of this loop's batches wait there, not delivered yet.
    let batchesWaitingOnLoop: [ManagedAtomic<Int>]
    /// Batches of this loop's that another loop may have waiting before this loop's publishers
    /// pause reading: that loop's own clients would otherwise wait behind a flood's backlog.
    static let maxBatchesWaiting = 2

    /// This loop's receivers, by the identity of their `ActiveChannel`.
    private var receiversByChannel: [ObjectIdentifier: LocalReceivers] = [:]
    /// Receivers with writes queued this tick, flushed once at its end.
    private var receiversToFlush: [any ChannelReceiver] = []
    /// Per other loop: the messages for its receivers queued this tick, and their bytes.
    private var batchesForLoops: [[Delivery]]
    private var batchBytesForLoops: [Int]
    /// Messages from this loop's clients for the other nodes, handed to the link at the tick's end.
    private var messagesForCluster: [ClusterMessage] = []
    private var tickScheduled = false

    /// One message for the receivers of one channel on another loop.
    typealias Delivery = (channel: ActiveChannel, message: FramedMessage)

    init(eventLoop: EventLoop, index: Int, loopCount: Int, clustered: Bool) {
        self.eventLoop = eventLoop
        self.clustered = clustered
        self.loopBit = 1 << UInt64(index)
        self.batchesForLoops = Array(repeating: [], count: loopCount)
        self.batchBytesForLoops = Array(repeating: 0, count: loopCount)
        self.batchesWaitingOnLoop = (0..<loopCount).map { _ in ManagedAtomic<Int>(0) }
    }

    /// Adds `receiver` to the receivers of `channel` on this loop (for `Membership.attach(_:)`).
    /// From now on it receives every message; returns the list it is in.
    func add(_ receiver: any ChannelReceiver, of membership: Membership, to channel: ActiveChannel) -> LocalReceivers {
        self.eventLoop.assertInEventLoop()
        let key = ObjectIdentifier(channel)
        let local: LocalReceivers
        if let existing = self.receiversByChannel[key] {
            local = existing
        } else {
            local = LocalReceivers(channel: channel)
            self.receiversByChannel[key] = local
            _ = channel.loopMask.loadThenBitwiseOr(with: self.loopBit, ordering: .sequentiallyConsistent)
        }
        local.append(receiver, of: membership)
        channel.receivers.wrappingIncrement(ordering: .relaxed)
        LoopCounters.add(1, to: self.counters.websocketClients)
        return local
    }

    /// Removes `receiver` from `local` (for `Membership.leave()`); the loop's last receiver of
    /// the channel clears the loop's bit.
    func remove(_ membership: Membership, from local: LocalReceivers) {
        self.eventLoop.assertInEventLoop()
        local.remove(membership)
        local.channel.receivers.wrappingDecrement(ordering: .relaxed)
        LoopCounters.add(-1, to: self.counters.websocketClients)
        if local.receivers.isEmpty {
            self.receiversByChannel[ObjectIdentifier(local.channel)] = nil
            _ = local.channel.loopMask.loadThenBitwiseAnd(with: ~self.loopBit, ordering: .sequentiallyConsistent)
        }
    }

    /// The hot path: hands one framed message to every receiver on this loop but the sender's
    /// own (`sender`, when it is one), queues it once for every other loop with receivers, and
    /// once for the cluster (`connectionID` 0 for a POST).
    ///
    /// - Returns: the work it made here: one per local receiver and per other loop, plus one.
    @inline(__always) @discardableResult
    func publish(_ message: FramedMessage, to channel: ActiveChannel, isText: Bool, from sender: ObjectIdentifier?, connectionID: UInt64) -> Int {
        var work = 1
        // Receivers node-wide, the sender excluded when it is one (a publish-only client is
        // not; a POST has no sender).
        self.counters.fanout.record(channel.receivers.load(ordering: .relaxed) &- (sender == nil ? 0 : 1))
        if let local = self.receiversByChannel[ObjectIdentifier(channel)] {
            work &+= local.receivers.count
            var reached = 0
            for receiver in local.receivers where ObjectIdentifier(receiver) != sender {
                if receiver.enqueue(message) { reached &+= 1 }
            }
            LoopCounters.add(reached, to: self.counters.messagesDelivered)
            LoopCounters.add(reached &* message.payloadLength, to: self.counters.bytesDelivered)
        }
        var mask = channel.loopMask.load(ordering: .sequentiallyConsistent) & ~self.loopBit
        while mask != 0 {
            let i = mask.trailingZeroBitCount
            self.batchesForLoops[i].append((channel, message))
            self.batchBytesForLoops[i] &+= message.bytes.readableBytes
            mask &= mask - 1
            work &+= 1
        }
        if self.clustered {
            self.messagesForCluster.append(ClusterMessage(channel: channel.name, payload: message.payload, isText: isText, connectionID: connectionID))
        }
        self.scheduleTick()
        return work
    }

    func queueForCluster(_ message: ClusterMessage) {
        self.messagesForCluster.append(message)
        self.scheduleTick()
    }

    /// `receiver` has writes queued: it is flushed once at the end of this loop tick.
    @inline(__always)
    func flushAtEndOfTick(_ receiver: any ChannelReceiver) {
        self.receiversToFlush.append(receiver)
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
        self.flushReceivers()
        // Nil only once the node has let go of its hub: nobody is left to hand batches to.
        guard let hub = self.hub else { return self.discardBatches() }
        for i in self.batchesForLoops.indices where !self.batchesForLoops[i].isEmpty {
            let batch = self.batchesForLoops[i]
            let bytes = self.batchBytesForLoops[i]
            self.batchesForLoops[i].removeAll(keepingCapacity: true)
            self.batchBytesForLoops[i] = 0
            let target = hub.loops[i]
            if target.backlogFromOtherLoops.loadThenWrappingIncrement(by: bytes, ordering: .relaxed) > Hub.crossLoopBacklogLimit {
                target.backlogFromOtherLoops.wrappingDecrement(by: bytes, ordering: .relaxed)
                hub.droppedCrossLoopBatch(messages: batch.count)
                continue
            }
            let waiting = self.batchesWaitingOnLoop[i]
            waiting.wrappingIncrement(ordering: .relaxed)
            target.eventLoop.execute {
                target.deliver(batch, releasing: bytes, of: target.backlogFromOtherLoops)
                waiting.wrappingDecrement(ordering: .relaxed)
            }
        }
        if !self.messagesForCluster.isEmpty {
            let batch = self.messagesForCluster
            self.messagesForCluster.removeAll(keepingCapacity: true)
            hub.link.publish(batch)
        }
    }

    private func discardBatches() {
        for i in self.batchesForLoops.indices {
            self.batchesForLoops[i].removeAll(keepingCapacity: true)
            self.batchBytesForLoops[i] = 0
        }
        self.messagesForCluster.removeAll(keepingCapacity: true)
    }

    private func flushReceivers() {
        guard !self.receiversToFlush.isEmpty else { return }
        for receiver in self.receiversToFlush { receiver.flushQueued() }
        self.receiversToFlush.removeAll(keepingCapacity: true)
    }

    /// A batch from another loop or the cluster: deliver to this loop's receivers, flush once,
    /// and take the batch's `bytes` off the `backlog` they were counted in.
    func deliver(_ batch: [Delivery], releasing bytes: Int, of backlog: ManagedAtomic<Int>) {
        var reached = 0
        var payloadBytes = 0
        for (channel, message) in batch {
            guard let local = self.receiversByChannel[ObjectIdentifier(channel)] else { continue }
            var n = 0
            for receiver in local.receivers where receiver.enqueue(message) { n &+= 1 }
            reached &+= n
            payloadBytes &+= n &* message.payloadLength
        }
        LoopCounters.add(reached, to: self.counters.messagesDelivered)
        LoopCounters.add(payloadBytes, to: self.counters.bytesDelivered)
        backlog.wrappingDecrement(by: bytes, ordering: .relaxed)
        self.flushReceivers()
    }

    /// True while some other loop has more than `maxBatchesWaiting` of this loop's batches
    /// waiting: publishers here then wait (reading paused) until it catches up.
    var otherLoopsAreBehind: Bool {
        for counter in self.batchesWaitingOnLoop where counter.load(ordering: .relaxed) > Self.maxBatchesWaiting {
            return true
        }
        return false
    }
}
