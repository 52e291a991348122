import NIOCore
import NIOWebSocket

/// Server-side RFC 6455 framing: a message is framed once into one buffer that every receiver shares.
/// Opcodes and close codes are NIOWebSocket's `WebSocketOpcode` and `WebSocketErrorCode`.
public enum Framing {
    /// Bytes of the header of an unmasked server frame carrying `length` payload bytes.
    @inlinable
    public static func headerLength(payload length: Int) -> Int {
        length < 126 ? 2 : (length <= 0xFFFF ? 4 : 10)
    }

    /// Writes a FIN frame header (no mask) for `opcode` and `length` payload bytes.
    @inlinable
    public static func writeHeader(into buffer: inout ByteBuffer, opcode: WebSocketOpcode, length: Int) {
        let first = 0x80 | UInt8(webSocketOpcode: opcode)
        if length < 126 {
            buffer.writeMultipleIntegers(first, UInt8(length))
        } else if length <= 0xFFFF {
            buffer.writeMultipleIntegers(first, UInt8(126), UInt16(length))
        } else {
            buffer.writeMultipleIntegers(first, UInt8(127), UInt64(length))
        }
    }

    /// The payload length of a complete unmasked frame made by `frame(opcode:payload:allocator:)`.
    @inline(__always)
    static func payloadLength(ofServerFrame frame: ByteBuffer) -> Int {
        let second = frame.getInteger(at: frame.readerIndex + 1, as: UInt8.self) ?? 0
        let header = second < 126 ? 2 : (second == 126 ? 4 : 10)
        return frame.readableBytes - header
    }

    /// The code of a close frame made here (1005 when it has none), and whether it carries a
    /// reason (the node's answer to a broken close does).
    static func closeCode(ofServerFrame frame: ByteBuffer) -> (WebSocketErrorCode, hasReason: Bool) {
        let length = payloadLength(ofServerFrame: frame)
        guard length >= 2, let code = frame.getWebSocketErrorCode(at: frame.readerIndex + 2) else { return (.noStatusReceived, false) }
        return (code, length > 2)
    }

    /// A complete frame holding `payload` as it is.
    public static func frame(opcode: WebSocketOpcode, payload: ByteBuffer, allocator: ByteBufferAllocator) -> ByteBuffer {
        var out = allocator.buffer(capacity: headerLength(payload: payload.readableBytes) + payload.readableBytes)
        writeHeader(into: &out, opcode: opcode, length: payload.readableBytes)
        out.writeImmutableBuffer(payload)
        return out
    }

    /// A close frame with `code` and a UTF-8 `reason` (cut to fit 125 bytes).
    public static func closeFrame(code: WebSocketErrorCode, reason: String, allocator: ByteBufferAllocator) -> ByteBuffer {
        var reasonBytes = Array(reason.utf8.prefix(123))
        while !reasonBytes.isEmpty, String(validating: reasonBytes, as: UTF8.self) == nil { reasonBytes.removeLast() }
        var out = allocator.buffer(capacity: 4 + reasonBytes.count)
        writeHeader(into: &out, opcode: .connectionClose, length: 2 + reasonBytes.count)
        out.write(webSocketErrorCode: code)
        out.writeBytes(reasonBytes)
        return out
    }

    /// XORs the bytes at `pointer` with the 4-byte client mask, starting at mask offset `phase`.
    @inlinable
    public static func unmask(_ pointer: UnsafeMutableRawBufferPointer, key: UInt32, phase: Int) {
        // `key` holds the mask bytes in memory order; rotate so byte 0 lines up with `phase`.
        let shift = UInt32((phase & 3) * 8)
        let rotated = shift == 0 ? key : (key >> shift | key << (32 - shift))
        let word = UInt64(rotated) | UInt64(rotated) << 32
        let count = pointer.count
        guard count > 0, let base = pointer.baseAddress else { return }
        var i = 0
        while i + 8 <= count {
            let v = base.loadUnaligned(fromByteOffset: i, as: UInt64.self)
            base.storeBytes(of: v ^ word, toByteOffset: i, as: UInt64.self)
            i += 8
        }
        while i < count {
            pointer[i] ^= UInt8(truncatingIfNeeded: rotated >> UInt32((i & 3) * 8))
            i += 1
        }
    }
}

extension WebSocketErrorCode {
    /// 1005 and 1006 (RFC 6455 §7.4.1) are never sent, only counted: NIO has no case for them.
    static var noStatusReceived: WebSocketErrorCode { .unknown(1005) }
    static var abnormalClosure: WebSocketErrorCode { .unknown(1006) }
}

/// How the hub frames the messages that arrive unframed (POST bodies, other nodes' messages):
/// as one text or binary websocket frame.
struct WebSocketMessageFraming: MessageFraming {
    func frame(_ payload: ByteBuffer, isText: Bool, allocator: ByteBufferAllocator) -> FramedMessage {
        let bytes = Framing.frame(opcode: isText ? .text : .binary, payload: payload, allocator: allocator)
        return FramedMessage(bytes: bytes, headerLength: bytes.readableBytes &- payload.readableBytes)
    }
}
