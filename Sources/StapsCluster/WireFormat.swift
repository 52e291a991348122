import NIOCore

/// The body of one AMQP message between nodes, as pure functions.
///
/// `u16` length of the channel name, the name (UTF-8), then per websocket message a `u32`
/// length and the payload. Several messages from one sender on one channel share a body; the
/// exact name travels here (not only in the routing key), so a node delivers only to it.
public enum WireFormat {
    /// Why a body was not accepted. Nothing of a malformed body is delivered.
    public enum Malformed: Error, Equatable, CustomStringConvertible {
        case tooShort
        case nameTruncated
        case badName
        case payloadTruncated(at: Int)
        case emptyPayload(at: Int)
        case noMessages

        public var description: String {
            switch self {
            case .tooShort: return "body shorter than its 2-byte name length"
            case .nameTruncated: return "channel name runs past the end of the body"
            case .badName: return "channel name is empty, not UTF-8 or contains NUL"
            case .payloadTruncated(let at): return "message at byte \(at) runs past the end of the body"
            case .emptyPayload(let at): return "empty message at byte \(at)"
            case .noMessages: return "no messages after the channel name"
            }
        }
    }

    /// Starts a body: the channel name.
    public static func beginBody(channel name: String, into body: inout [UInt8]) {
        let nameBytes = name.utf8
        body.append(UInt8(truncatingIfNeeded: nameBytes.count >> 8))
        body.append(UInt8(truncatingIfNeeded: nameBytes.count))
        body.append(contentsOf: nameBytes)
    }

    /// Appends one message to a body started with `beginBody`.
    public static func append(payload: ByteBuffer, into body: inout [UInt8]) {
        let n = UInt32(payload.readableBytes)
        body.append(UInt8(truncatingIfNeeded: n >> 24))
        body.append(UInt8(truncatingIfNeeded: n >> 16))
        body.append(UInt8(truncatingIfNeeded: n >> 8))
        body.append(UInt8(truncatingIfNeeded: n))
        payload.withUnsafeReadableBytes { body.append(contentsOf: $0) }
    }

    /// The channel name and the byte ranges of the messages in `body`, or why it is malformed.
    public static func decode(_ body: UnsafeRawBufferPointer) throws(Malformed) -> (channel: String, payloads: [Range<Int>]) {
        guard body.count >= 2 else { throw .tooShort }
        let nameLength = Int(body[0]) << 8 | Int(body[1])
        guard body.count >= 2 + nameLength else { throw .nameTruncated }
        let nameBytes = UnsafeRawBufferPointer(rebasing: body[2..<(2 + nameLength)])
        guard nameLength > 0, !nameBytes.contains(0), let name = String(validating: nameBytes, as: UTF8.self) else { throw .badName }
        var payloads: [Range<Int>] = []
        var at = 2 + nameLength
        while at < body.count {
            guard body.count - at >= 4 else { throw .payloadTruncated(at: at) }
            let n = Int(body[at]) << 24 | Int(body[at + 1]) << 16 | Int(body[at + 2]) << 8 | Int(body[at + 3])
            guard n <= body.count - at - 4 else { throw .payloadTruncated(at: at) }
            guard n > 0 else { throw .emptyPayload(at: at) }
            payloads.append((at + 4)..<(at + 4 + n))
            at += 4 + n
        }
        guard !payloads.isEmpty else { throw .noMessages }
        return (name, payloads)
    }
}
