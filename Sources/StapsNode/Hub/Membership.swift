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
        case attached(LoopHub.LocalReceivers, receiver: ObjectIdentifier)
        case left
    }
    private var state = State.joined

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
            let local = self.loopHub.add(receiver, to: self.channel)
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
        case .attached(let local, let receiver):
            self.loopHub.remove(receiver, from: local)
        case .joined:
            break
        }
        self.state = .left
        self.directory.leave(self.channel)
    }
}
