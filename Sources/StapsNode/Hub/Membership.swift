/// One client's membership in one staps channel, from `Hub.join` until `leave()`.
///
/// Joining counts the client in the node's directory; `attach(_:)` then makes its websocket
/// handler receive the channel's messages on its event loop (a publish-only client, as the
/// authorization hook may make one, is never attached: it stays counted, so its channel stays
/// received cluster-wide while it is there, and receives nothing). `leave()` undoes whichever
/// of the two has happened, once: every path that ends the client (a failed upgrade, a close, an
/// inactive or removed handler) calls it, and only the first call does anything. The last
/// client out of the node has the cluster link stop receiving the channel.
///
/// Confined to the client's event loop, like the websocket handler that holds it.
final class Membership {
    /// The staps channel joined.
    let channel: ActiveChannel
    /// The staps channel table of the client's event loop.
    let loopHub: LoopHub
    private let directory: ChannelDirectory

    private enum State {
        /// Counted in the directory, receiving nothing yet.
        case joined
        /// Counted, and a member of its channel on its loop.
        case attached(LoopHub.LocalReceivers)
        case left
    }
    private var state = State.joined
    /// Where the member sits in its local channel's member list while attached (kept by the loop hub).
    var slot = 0  // set by LoopHub.remove when it moves a member

    /// For `Hub.join` only.
    init(channel: ActiveChannel, loopHub: LoopHub, directory: ChannelDirectory) {
        self.channel = channel
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
            let (local, slot) = self.loopHub.add(member, to: self.channel)
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
        self.directory.leave(self.channel)
    }
}
