/// Where a message stands in its sender's stream, and how that travels: in the AMQP
/// `message_id` property, so that the body's layout (and a node of the previous version,
/// which ignores `message_id`) is untouched.
///
/// A *stream* is one node's messages on one channel while that node holds the channel (it
/// has a local client there): a random 64-bit id made when the node starts holding it, and
/// numbers from 1, one per websocket message, in the order the node handed them to its link
/// (after `UInt32.max` comes 0). A receiving node that sees a number skipped knows that many
/// messages of the stream were lost on the way, whatever lost them (see `StreamGaps`).
///
/// On the wire: 16 lower-case hex digits of the stream id, `-`, 8 hex digits of the number of
/// the body's first message (25 bytes); the body's other messages have the numbers after it.
/// A message without it (from a node of the previous version, or a POST to a channel the
/// sender does not hold) is unnumbered; so is one whose `message_id` is anything else.
public struct StreamPosition: Sendable, Hashable, CustomStringConvertible {
    public var stream: UInt64
    public var sequence: UInt32

    public init(stream: UInt64, sequence: UInt32) {
        self.stream = stream
        self.sequence = sequence
    }

    /// Bytes of `messageID`.
    public static let messageIDLength = 25

    /// The `message_id` that carries this position.
    public var messageID: [UInt8] {
        var out: [UInt8] = []
        self.writeMessageID(into: &out)
        return out
    }

    /// Replaces `out`'s bytes with the `message_id` (a buffer the caller keeps: no allocation).
    public func writeMessageID(into out: inout [UInt8]) {
        out.removeAll(keepingCapacity: true)
        out.reserveCapacity(Self.messageIDLength)
        Self.appendHex(self.stream, bytes: 8, to: &out)
        out.append(UInt8(ascii: "-"))
        Self.appendHex(UInt64(self.sequence), bytes: 4, to: &out)
    }

    /// The position a `message_id` carries; nil when it is not one (`messageID`'s exact form).
    public init?(messageID bytes: UnsafeRawBufferPointer) {
        guard bytes.count == Self.messageIDLength, bytes[16] == UInt8(ascii: "-"),
            let stream = Self.parseHex(UnsafeRawBufferPointer(rebasing: bytes[0..<16])),
            let sequence = Self.parseHex(UnsafeRawBufferPointer(rebasing: bytes[17..<25]))
        else { return nil }
        self.init(stream: stream, sequence: UInt32(sequence))
    }

    public var description: String { String(decoding: self.messageID, as: UTF8.self) }

    /// The low `count` bytes of `value`, most significant first, as lower-case hex.
    private static func appendHex(_ value: UInt64, bytes count: Int, to out: inout [UInt8]) {
        for shift in stride(from: (count - 1) * 8, through: 0, by: -8) {
            Hex.append(UInt8(truncatingIfNeeded: value >> UInt64(shift)), to: &out)
        }
    }

    /// Lower-case hex digits only (so each position has one spelling).
    private static func parseHex(_ bytes: UnsafeRawBufferPointer) -> UInt64? {
        var value: UInt64 = 0
        for byte in bytes {
            let digit: UInt8
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = byte - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = byte - UInt8(ascii: "a") + 10
            default: return nil
            }
            value = value << 4 | UInt64(digit)
        }
        return value
    }
}
