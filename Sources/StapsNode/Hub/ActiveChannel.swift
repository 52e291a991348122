import Atomics

/// One staps channel (a pub/sub path) while it has clients on this node, shared by every event
/// loop that has receivers on it.
///
/// Its identity (not its name) keys the per-loop tables, so a message queued for a channel that
/// has since emptied and been re-created never reaches the new one's receivers by mistake.
final class ActiveChannel: Sendable {
    let name: String
    /// Bit `i` is set while event loop `i` has receivers on this channel. Read per message
    /// (one atomic load); written only when a loop gains its first or loses its last receiver.
    let loopMask = ManagedAtomic<UInt64>(0)
    /// Receivers of this channel's messages on this node, over all loops: read once per
    /// message for the fan-out histogram, written when a receiver attaches or leaves.
    let receivers = ManagedAtomic<Int>(0)

    init(name: String) { self.name = name }
}
