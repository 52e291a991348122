import Atomics
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOWebSocket
import StapsCluster

/// One staps channel (a pub/sub path), shared by every event loop that has clients on it.
///
/// Its identity (not its name) keys the per-loop tables, so a message queued for a channel that
/// has since emptied and been re-created never reaches the new one's clients by mistake.
final class ChannelEntry: Sendable {
    let name: String
    /// Bit `i` is set while event loop `i` has clients on this channel. Read per message
    /// (one atomic load); written only when a loop gains its first or loses its last client.
    let loopMask = ManagedAtomic<UInt64>(0)
    /// Clients receiving this channel's messages on this node, over all loops: read once per
    /// message for the fan-out histogram, written when a client attaches or leaves.
    let receivers = ManagedAtomic<Int>(0)

    init(name: String) { self.name = name }
}

/// The node-wide table of staps channels: touched only when clients join or leave (the cold
/// path), never per message. It alone talks to the cluster link about subscriptions; only
/// `Hub.join` and `Membership.leave()` count clients in and out.
final class ChannelDirectory: Sendable {
    private struct State {
        var entry: ChannelEntry
        var clients: Int
        var ready: EventLoopFuture<Void>
    }

    private let table = NIOLockedValueBox<[String: State]>([:])
    private let link: any ClusterLink

    init(link: any ClusterLink) { self.link = link }

    /// Counts one more client on `name`; the future succeeds when the channel is subscribed
    /// cluster-wide (at once when standalone).
    fileprivate func join(_ name: String, on eventLoop: EventLoop) -> (ChannelEntry, EventLoopFuture<Void>) {
        let (entry, ready) = self.table.withLockedValue { table -> (ChannelEntry, EventLoopFuture<Void>) in
            if var state = table[name] {
                state.clients += 1
                table[name] = state
                guard self.link.isClustered else { return (state.entry, state.ready) }
                // Not the first client's future: the binding may have to be made again since.
                let promise = eventLoop.makePromise(of: Void.self)
                self.link.awaitBinding(channel: name, promise: promise)
                return (state.entry, promise.futureResult)
            }
            let entry = ChannelEntry(name: name)
            let promise = eventLoop.makePromise(of: Void.self)
            table[name] = State(entry: entry, clients: 1, ready: promise.futureResult)
            // Under the lock, so the link sees subscribe/unsubscribe for one name in order.
            self.link.startReceiving(channel: name, whenBound: promise)
            return (entry, promise.futureResult)
        }
        return (entry, ready.hop(to: eventLoop))
    }

    /// Counts one client less; the last one out forgets the channel and unsubscribes it.
    fileprivate func leave(_ entry: ChannelEntry) {
        self.table.withLockedValue { table in
            guard var state = table[entry.name], state.entry === entry else { return }
            state.clients -= 1
            if state.clients > 0 {
                table[entry.name] = state
            } else {
                table[entry.name] = nil
                self.link.stopReceiving(channel: entry.name)
            }
        }
    }

    /// Channels with clients on this node.
    var count: Int { self.table.withLockedValue { $0.count } }

    /// Clients on `name` on this node, and the channel if it exists.
    func lookup(_ name: String) -> (ChannelEntry, Int)? {
        self.table.withLockedValue { table in table[name].map { ($0.entry, $0.clients) } }
    }

    /// Resolves many names under one lock acquisition (for batches from the cluster).
    func entries<S: Sequence>(for names: S) -> [ChannelEntry?] where S.Element == String {
        self.table.withLockedValue { table in names.map { table[$0]?.entry } }
    }
}

/// The staps channel tables of all event loops, plus the node-wide directory.
public final class Hub: Sendable, ClusterReceiver {
    let directory: ChannelDirectory
    let loops: [LoopHub]
    private let loopIndex: [ObjectIdentifier: Int]
    let link: any ClusterLink
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
    private let clusterBacklog = ManagedAtomic<Int>(0)
    public var clusterBacklogBytes: Int { self.clusterBacklog.load(ordering: .relaxed) }

    init(eventLoops: [EventLoop], link: any ClusterLink, counters: NodeCounters, logger: Logger) {
        precondition(eventLoops.count <= 64, "at most 64 event loops")
        self.link = link
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
    /// The client is counted in the directory at once (the node's first client on `name`
    /// subscribes it cluster-wide); it receives messages only once `Membership.attach(_:)` runs.
    /// The future succeeds on `eventLoop` when the channel is subscribed (at once when
    /// standalone). Whatever it completes with, the caller owns the membership and must
    /// `leave()` it on every path that ends the client.
    func join(_ name: String, on eventLoop: EventLoop) -> (Membership, EventLoopFuture<Void>) {
        let (entry, ready) = self.directory.join(name, on: eventLoop)
        return (Membership(entry: entry, loopHub: self.loopHub(for: eventLoop), directory: self.directory), ready)
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
        guard let (entry, clients) = self.directory.lookup(name) else {
            // Nobody here; other nodes may still have clients.
            if self.link.isClustered {
                loopHub.queueForCluster(ClusterMessage(channel: name, payload: payload, isText: isText, connectionID: 0))
            }
            loopHub.counters.fanout.record(0)
            return 0
        }
        let frame = Framing.frame(opcode: isText ? .text : .binary, payload: payload, allocator: loopHub.allocator)
        loopHub.publish(from: nil, entry: entry, frame: frame, headerLength: frame.readableBytes - payload.readableBytes, isText: isText)
        return clients
    }

    /// Messages from other nodes: frame each once, resolve channels under one lock, one task per loop.
    public func deliverFromCluster(_ batch: [ClusterMessage]) {
        guard !batch.isEmpty else { return }
        let entries = self.directory.entries(for: batch.lazy.map(\.channel))
        var perLoop = [[(ChannelEntry, ByteBuffer)]](repeating: [], count: self.loops.count)
        var perLoopBytes = [Int](repeating: 0, count: self.loops.count)
        let allocator = ByteBufferAllocator()
        var unmatched = 0
        defer { if unmatched > 0 { self.counters.clusterUnmatched.wrappingIncrement(by: unmatched, ordering: .relaxed) } }
        for (message, entry) in zip(batch, entries) {
            guard let entry else {
                unmatched += 1
                continue
            }
            var mask = entry.loopMask.load(ordering: .acquiring)
            guard mask != 0 else {
                unmatched += 1
                continue
            }
            self.counters.clusterFanout.record(entry.receivers.load(ordering: .relaxed))
            let frame = Framing.frame(opcode: message.isText ? .text : .binary, payload: message.payload, allocator: allocator)
            while mask != 0 {
                let i = mask.trailingZeroBitCount
                perLoop[i].append((entry, frame))
                perLoopBytes[i] += frame.readableBytes
                mask &= mask - 1
            }
        }
        for (i, deliveries) in perLoop.enumerated() where !deliveries.isEmpty {
            let target = self.loops[i]
            let bytes = perLoopBytes[i]
            let backlog = self.clusterBacklog
            backlog.wrappingIncrement(by: bytes, ordering: .relaxed)
            target.eventLoop.execute { target.deliver(deliveries, backlog: backlog, bytes: bytes) }
        }
    }
}

/// One client's membership in one staps channel, from `Hub.join` until `leave()`.
///
/// Joining counts the client in the node's directory; `attach(_:)` then makes its websocket
/// handler receive the channel's messages on its event loop (a publish-only client, as the
/// authorization hook may make one, is never attached: it stays counted, so its channel stays
/// subscribed cluster-wide while it is there, and receives nothing). `leave()` undoes whichever
/// of the two has happened, once: every path that ends the client (a failed upgrade, a close, an
/// inactive or removed handler) calls it, and only the first call does anything. The last
/// client out of the node unsubscribes the channel from the cluster link.
///
/// Confined to the client's event loop, like the websocket handler that holds it.
final class Membership {
    /// The staps channel joined.
    let entry: ChannelEntry
    /// The staps channel table of the client's event loop.
    let loopHub: LoopHub
    private let directory: ChannelDirectory

    private enum State {
        /// Counted in the directory, receiving nothing yet.
        case joined
        /// Counted, and a member of its channel on its loop.
        case attached(LoopHub.LocalChannel)
        case left
    }
    private var state = State.joined
    /// Where the member sits in its local channel's member list while attached (kept by the loop hub).
    var slot = 0  // set by LoopHub.remove when it moves a member

    fileprivate init(entry: ChannelEntry, loopHub: LoopHub, directory: ChannelDirectory) {
        self.entry = entry
        self.loopHub = loopHub
        self.directory = directory
    }

    /// Makes `member`, whose membership this is, receive every message on the channel from now
    /// on. After `leave()` it does nothing: a client that left receives nothing.
    func attach(_ member: WebSocketHandler) {
        self.loopHub.eventLoop.assertInEventLoop()
        assert(member.membership === self, "attach the handler that holds this membership")
        switch self.state {
        case .joined:
            let (local, slot) = self.loopHub.add(member, to: self.entry)
            self.slot = slot
            self.state = .attached(local)
        case .attached:
            assertionFailure("a membership is attached once")
        case .left:
            break
        }
    }

    /// Stops receiving (if attached) and counts the client out of the directory. Idempotent.
    func leave() {
        self.loopHub.eventLoop.assertInEventLoop()
        switch self.state {
        case .left:
            return
        case .attached(let local):
            self.loopHub.remove(slot: self.slot, from: local)
        case .joined:
            break
        }
        self.state = .left
        self.directory.leave(self.entry)
    }
}
