import Atomics
import Logging
import NIOCore
import StapsCluster

/// The staps channel tables of all event loops, plus the node-wide directory.
public final class Hub: Sendable, ClusterReceiver {
    let directory: ChannelDirectory
    let loops: [LoopHub]
    private let loopIndex: [ObjectIdentifier: Int]
    let link: any ClusterLink
    /// Frames what arrives unframed: POST bodies, messages from other nodes.
    private let framing: any MessageFraming
    let counters: NodeCounters
    let logger: Logger
    /// When the next cross-loop drop warning may be logged (uptime nanoseconds).
    private let nextDropWarning = ManagedAtomic<UInt64>(0)

    /// Bytes one event loop may have queued for another before further batches are dropped.
    static let crossLoopBacklogLimit = 256 << 20

    /// Sums of every loop's counters (for metrics, the memory trim and the shutdown line).
    var messagesReceived: (websocket: Int, post: Int) {
        self.loops.reduce((0, 0)) { ($0.0 + $1.counters.websocketMessages.load(ordering: .relaxed), $0.1 + $1.counters.postMessages.load(ordering: .relaxed)) }
    }

    /// Bytes from the cluster handed to the event loops and not yet delivered.
    private let backlogFromCluster = ManagedAtomic<Int>(0)
    public var clusterBacklogBytes: Int { self.backlogFromCluster.load(ordering: .relaxed) }

    init(eventLoops: [EventLoop], link: any ClusterLink, framing: any MessageFraming, counters: NodeCounters, logger: Logger) {
        precondition(eventLoops.count <= 64, "at most 64 event loops")
        self.link = link
        self.framing = framing
        self.counters = counters
        self.logger = logger
        self.directory = ChannelDirectory(link: link)
        var index: [ObjectIdentifier: Int] = [:]
        for (i, loop) in eventLoops.enumerated() { index[ObjectIdentifier(loop)] = i }
        self.loopIndex = index
        self.loops = eventLoops.enumerated().map {
            LoopHub(eventLoop: $1, index: $0, loopCount: eventLoops.count, clustered: link.isClustered)
        }
        for loop in self.loops { loop.hub = self }
    }

    /// Joins one client to the staps channel `name` on `eventLoop`, the client's event loop.
    ///
    /// The client is counted in the directory at once (the node's first client on `name` has
    /// the cluster link start receiving it); it receives messages only once
    /// `Membership.attach(_:)` runs. The future succeeds on `eventLoop` when the channel's
    /// messages from the whole cluster reach this node (at once when standalone). Whatever it completes with, the caller owns the membership and must
    /// `leave()` it on every path that ends the client.
    func join(_ name: String, on eventLoop: EventLoop) -> (Membership, EventLoopFuture<Void>) {
        let (channel, ready) = self.directory.join(name, on: eventLoop)
        return (Membership(channel: channel, loopHub: self.loopHub(for: eventLoop), directory: self.directory), ready)
    }

    /// A batch for a loop that is too far behind was dropped: count it, warn at most every 10 s.
    func droppedCrossLoopBatch(messages: Int) {
        let total = self.counters.crossLoopDropped.wrappingIncrementThenLoad(by: messages, ordering: .relaxed)
        let now = NIODeadline.now().uptimeNanoseconds
        let next = self.nextDropWarning.load(ordering: .relaxed)
        guard now >= next, self.nextDropWarning.compareExchange(expected: next, desired: now + 10_000_000_000, ordering: .relaxed).exchanged else { return }
        self.logger.warning("an event loop fell too far behind: dropped messages for it", metadata: [
            "dropped.total": "\(total)", "backlog.limit": "\(Hub.crossLoopBacklogLimit)",
        ])
    }

    func loopHub(for eventLoop: EventLoop) -> LoopHub {
        guard let i = self.loopIndex[ObjectIdentifier(eventLoop)] else {
            preconditionFailure("event loop \(eventLoop) is not one of the hub's")
        }
        return self.loops[i]
    }

    /// Publishes an HTTP POST body; returns how many local clients it was handed to.
    func publish(channel name: String, payload: ByteBuffer, isText: Bool, on eventLoop: EventLoop) -> Int {
        let loopHub = self.loopHub(for: eventLoop)
        LoopCounters.add(1, to: loopHub.counters.postMessages)
        LoopCounters.add(payload.readableBytes, to: loopHub.counters.bytesReceived)
        guard let (channel, clients) = self.directory.lookup(name) else {
            // Nobody here; other nodes may still have clients.
            if self.link.isClustered {
                loopHub.queueForCluster(ClusterMessage(channel: name, payload: payload, isText: isText, connectionID: 0))
            }
            loopHub.counters.fanout.record(0)
            return 0
        }
        let message = self.framing.frame(payload, isText: isText, allocator: loopHub.allocator)
        loopHub.publish(message, to: channel, isText: isText, from: nil, connectionID: 0)
        return clients
    }

    /// Messages from other nodes: frame each once, resolve channels under one lock, one task per loop.
    public func deliverFromCluster(_ batch: [ClusterMessage]) {
        guard !batch.isEmpty else { return }
        let channels = self.directory.channels(named: batch.lazy.map(\.channel))
        var batchesForLoops = [[LoopHub.Delivery]](repeating: [], count: self.loops.count)
        var batchBytesForLoops = [Int](repeating: 0, count: self.loops.count)
        let allocator = ByteBufferAllocator()
        var unmatched = 0
        defer { if unmatched > 0 { self.counters.clusterUnmatched.wrappingIncrement(by: unmatched, ordering: .relaxed) } }
        for (received, channel) in zip(batch, channels) {
            guard let channel else {
                unmatched += 1
                continue
            }
            var mask = channel.loopMask.load(ordering: .acquiring)
            guard mask != 0 else {
                unmatched += 1
                continue
            }
            self.counters.clusterFanout.record(channel.receivers.load(ordering: .relaxed))
            let message = self.framing.frame(received.payload, isText: received.isText, allocator: allocator)
            while mask != 0 {
                let i = mask.trailingZeroBitCount
                batchesForLoops[i].append((channel, message))
                batchBytesForLoops[i] += message.bytes.readableBytes
                mask &= mask - 1
            }
        }
        for (i, deliveries) in batchesForLoops.enumerated() where !deliveries.isEmpty {
            let target = self.loops[i]
            let bytes = batchBytesForLoops[i]
            let backlog = self.backlogFromCluster
            backlog.wrappingIncrement(by: bytes, ordering: .relaxed)
            target.eventLoop.execute { target.deliver(deliveries, releasing: bytes, of: backlog) }
        }
    }
}
