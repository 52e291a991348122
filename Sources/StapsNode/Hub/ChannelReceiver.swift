import NIOCore

/// What the hub needs of one receiver of a staps channel, on the receiver's event loop: take a
/// framed message, and be flushed once per loop tick. The hub knows nothing else of it (the
/// websocket handler is the one kind there is).
///
/// The hub hands each message to `enqueue(_:)`; a receiver that queued something asks its loop
/// hub for a flush (`LoopHub.flushAtEndOfTick(_:)`), and gets one `flushQueued()` at the end of
/// the tick, however many messages it took.
///
/// On the hot path the hub walks a channel's receivers as `any ChannelReceiver`. The protocol is
/// internal and `WebSocketHandler` its one conforming type, so the release build's whole-module
/// optimizer calls that type's `enqueue` directly and inlines it, as before the protocol (the
/// witness table's entries for both methods are deleted: no call goes through them). A second
/// conforming type in this module would cost one indirect call per receiver per message.
protocol ChannelReceiver: AnyObject {
    /// Queues `message` for the receiver's peer; false when it was not taken (the receiver is
    /// closing, or has just been closed for it as a slow consumer).
    func enqueue(_ message: FramedMessage) -> Bool
    /// Writes out what was queued since the last flush.
    func flushQueued()
}

/// A message framed once for all its receivers: bytes each of them writes as they are.
struct FramedMessage {
    /// The frame: `headerLength` bytes of framing, then the payload.
    var bytes: ByteBuffer
    var headerLength: Int

    /// Bytes of payload (what the delivery counters count).
    var payloadLength: Int { self.bytes.readableBytes &- self.headerLength }
    /// The payload alone, sharing the frame's storage (what goes to the cluster).
    var payload: ByteBuffer { self.bytes.getSlice(at: self.bytes.readerIndex &+ self.headerLength, length: self.payloadLength)! }
}

/// How the hub frames the messages that do not arrive framed (HTTP POST bodies, messages from
/// other nodes): given to it by the node, which knows its receivers' protocol.
protocol MessageFraming: Sendable {
    func frame(_ payload: ByteBuffer, isText: Bool, allocator: ByteBufferAllocator) -> FramedMessage
}
