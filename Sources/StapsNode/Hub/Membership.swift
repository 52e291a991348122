/// One client's membership in one staps channel, from `Hub.join` until `leave()`.
///
/// Joining counts the client in the node's directory; `attach(_:)` then makes its receiver get
/// the channel's messages on its event loop (a publish-only client, as the authorization hook
/// may make one, is never attached: it stays counted, so its channel stays received
/// cluster-wide while it is there, and receives nothing). `leave()` undoes whichever of the two
/// has happened, once: every path that ends the client (a failed upgrade, a close, an inactive
/// or removed handler) calls it, and only the first call does anything. The last client out of
/// the node has the cluster link stop receiving the channel.
///
/// Confined to the client's event loop, like the websocket handler that holds it.
final class Membership {
    /// The staps channel joined.
    let channel: ActiveChannel
    /// The hub of the client's event loop.
    let loopHub: LoopHub
    private let directory: ChannelDirectory

    private enum State {
        /// Counted in the directory, receiving nothing yet.
        case joined
        /// Counted, and `receiver` is one of its channel's receivers on its loop.
        case attached(LocalReceivers, receiver: ObjectIdentifier)
        case left
    }
    private var state = State.joined
    /// Where its receiver sits in its channel's `LocalReceivers` while attached (kept by that list).
    fileprivate var position = 0

    /// For `Hub.join` only.
    init(channel: ActiveChannel, loopHub: LoopHub, directory: ChannelDirectory) {
        self.channel = channel
        self.loopHub = loopHub
        self.directory = directory
    }

    /// Makes `receiver`, the client's, get every message on the channel from now on. After
    /// `leave()` it does nothing: a client that left receives nothing.
    func attach(_ receiver: any ChannelReceiver) {
        self.loopHub.eventLoop.assertInEventLoop()
        switch self.state {
        case .joined:
            let local = self.loopHub.add(receiver, of: self, to: self.channel)
            self.state = .attached(local, receiver: ObjectIdentifier(receiver))
        case .attached:
            assertionFailure("a membership is attached once")
        case .left:
            break
        }
    }

    /// The hot path: publishes a message from this client to every receiver of the channel but
    /// its own. Returns the work it made (see `LoopHub.publish`).
    @inline(__always)
    func publish(_ message: FramedMessage, isText: Bool, connectionID: UInt64) -> Int {
        var sender: ObjectIdentifier?
        if case .attached(_, let receiver) = self.state { sender = receiver }
        return self.loopHub.publish(message, to: self.channel, isText: isText, from: sender, connectionID: connectionID)
    }

    /// Stops receiving (if attached) and counts the client out of the directory. Idempotent.
    func leave() {
        self.loopHub.eventLoop.assertInEventLoop()
        switch self.state {
        case .left:
            return
        case .attached(let local, _):
            self.loopHub.remove(self, from: local)
        case .joined:
            break
        }
        self.state = .left
        self.directory.leave(self.channel)
    }
}

/// The receivers of one staps channel on one event loop: the array the hot path walks, and
/// beside it their memberships, which remember where each sits, so that any of them leaves in
/// O(1) (the last moves into its place). Confined to that loop.
final class LocalReceivers {
    let channel: ActiveChannel
    private(set) var receivers: ContiguousArray<any ChannelReceiver> = []
    /// `members[i]` is the membership of `receivers[i]`.
    private var members: ContiguousArray<Membership> = []

    init(channel: ActiveChannel) { self.channel = channel }

    func append(_ receiver: any ChannelReceiver, of membership: Membership) {
        membership.position = self.receivers.count
        self.receivers.append(receiver)
        self.members.append(membership)
    }

    /// Removes `membership`'s receiver; the last one moves into its place.
    func remove(_ membership: Membership) {
        let position = membership.position
        guard position < self.members.count, self.members[position] === membership else { return }
        let lastReceiver = self.receivers.removeLast()
        let lastMember = self.members.removeLast()
        guard position < self.receivers.count else { return }
        self.receivers[position] = lastReceiver
        self.members[position] = lastMember
        lastMember.position = position
    }
}
