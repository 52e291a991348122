import NIOCore
import NIOWebSocket

/// Server-side RFC 6455 framing: a message is framed once into one buffer that every receiver shares.
public enum Framing {
    public static let opContinuation: UInt8 = 0x0
    public static let opText: UInt8 = 0x1
    public static let opBinary: UInt8 = 0x2
    public static let opClose: UInt8 = 0x8
    public static let opPing: UInt8 = 0x9
    public static let opPong: UInt8 = 0xA

    /// Bytes of the header of an unmasked server frame carrying `length` payload bytes.
    @inlinable
    public static func headerLength(payload length: Int) -> Int {
        length < 126 ? 2 : (length <= 0xFFFF ? 4 : 10)
    }

    /// Writes a FIN frame header (no mask) for `opcode` and `length` payload bytes.
    @inlinable
    public static func writeHeader(into buffer: inout ByteBuffer, opcode: UInt8, length: Int) {
        if length < 126 {
            buffer.writeMultipleIntegers(0x80 | opcode, UInt8(length))
        } else if length <= 0xFFFF {
            buffer.writeMultipleIntegers(0x80 | opcode, UInt8(126), UInt16(length))
        } else {
            buffer.writeMultipleIntegers(0x80 | opcode, UInt8(127), UInt64(length))
        }
    }

    /// The payload length of a complete unmasked frame made by `frame(opcode:payload:allocator:)`.
    @inline(__always)
    static func payloadLength(ofServerFrame frame: ByteBuffer) -> Int {
        let second = frame.getInteger(at: frame.readerIndex + 1, as: UInt8.self) ?? 0
        let header = second < 126 ? 2 : (second == 126 ? 4 : 10)
        return frame.readableBytes - header
    }

    /// A complete frame holding `payload` as it is.
    public static func frame(opcode: UInt8, payload: ByteBuffer, allocator: ByteBufferAllocator) -> ByteBuffer {
        var out = allocator.buffer(capacity: headerLength(payload: payload.readableBytes) + payload.readableBytes)
        writeHeader(into: &out, opcode: opcode, length: payload.readableBytes)
        out.writeImmutableBuffer(payload)
        return out
    }

    /// A close frame with `code` and a UTF-8 `reason` (cut to fit 125 bytes).
    public static func closeFrame(code: UInt16, reason: String, allocator: ByteBufferAllocator) -> ByteBuffer {
        var reasonBytes = Array(reason.utf8.prefix(123))
        while !reasonBytes.isEmpty, String(validating: reasonBytes, as: UTF8.self) == nil { reasonBytes.removeLast() }
        var out = allocator.buffer(capacity: 4 + reasonBytes.count)
        writeHeader(into: &out, opcode: opClose, length: 2 + reasonBytes.count)
        out.writeInteger(code)
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

    /// The mask bytes of `key` loaded in memory order, for `unmask`.
    @inlinable
    public static func maskWord(_ key: WebSocketMaskingKey) -> UInt32 {
        var word: UInt32 = 0
        withUnsafeMutableBytes(of: &word) { w in
            for i in 0..<4 { w[i] = key[i] }
        }
        return word
    }
}

/// The `Sec-WebSocket-Accept` value for a client key (RFC 6455 §4.2.2).
public enum WebSocketAccept {
    public static func value(forKey key: String) -> String {
        let digest = SHA1.hash(Array((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").utf8))
        return base64(digest)
    }

    /// SHA-1 of `text` in lower-case hex (for keys, not for security).
    public static func sha1Hex(_ text: String) -> String {
        let hex = Array("0123456789abcdef".utf8)
        var out: [UInt8] = []
        for b in SHA1.hash(Array(text.utf8)) {
            out.append(hex[Int(b >> 4)])
            out.append(hex[Int(b & 0xF)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    static func base64(_ bytes: [UInt8]) -> String {
        let table = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)
        var out: [UInt8] = []
        var i = 0
        while i < bytes.count {
            let b0 = UInt32(bytes[i])
            let b1 = i + 1 < bytes.count ? UInt32(bytes[i + 1]) : 0
            let b2 = i + 2 < bytes.count ? UInt32(bytes[i + 2]) : 0
            let n = b0 << 16 | b1 << 8 | b2
            out.append(table[Int(n >> 18 & 63)])
            out.append(table[Int(n >> 12 & 63)])
            out.append(i + 1 < bytes.count ? table[Int(n >> 6 & 63)] : UInt8(ascii: "="))
            out.append(i + 2 < bytes.count ? table[Int(n & 63)] : UInt8(ascii: "="))
            i += 3
        }
        return String(decoding: out, as: UTF8.self)
    }
}

/// SHA-1, only for the handshake's accept key (not for security).
enum SHA1 {
    static func hash(_ message: [UInt8]) -> [UInt8] {
        var h: (UInt32, UInt32, UInt32, UInt32, UInt32) = (0x6745_2301, 0xEFCD_AB89, 0x98BA_DCFE, 0x1032_5476, 0xC3D2_E1F0)
        var data = message
        let bitLength = UInt64(message.count) * 8
        data.append(0x80)
        while data.count % 64 != 56 { data.append(0) }
        for shift in stride(from: 56, through: 0, by: -8) { data.append(UInt8(truncatingIfNeeded: bitLength >> UInt64(shift))) }
        var w = [UInt32](repeating: 0, count: 80)
        for chunk in stride(from: 0, to: data.count, by: 64) {
            for i in 0..<16 {
                w[i] = UInt32(data[chunk + 4 * i]) << 24 | UInt32(data[chunk + 4 * i + 1]) << 16
                    | UInt32(data[chunk + 4 * i + 2]) << 8 | UInt32(data[chunk + 4 * i + 3])
            }
            for i in 16..<80 {
                let x = w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]
                w[i] = x << 1 | x >> 31
            }
            var (a, b, c, d, e) = h
            for i in 0..<80 {
                let f: UInt32
                let k: UInt32
                switch i {
                case 0..<20: f = (b & c) | (~b & d); k = 0x5A82_7999
                case 20..<40: f = b ^ c ^ d; k = 0x6ED9_EBA1
                case 40..<60: f = (b & c) | (b & d) | (c & d); k = 0x8F1B_BCDC
                default: f = b ^ c ^ d; k = 0xCA62_C1D6
                }
                let t = (a << 5 | a >> 27) &+ f &+ e &+ k &+ w[i]
                e = d
                d = c
                c = b << 30 | b >> 2
                b = a
                a = t
            }
            h = (h.0 &+ a, h.1 &+ b, h.2 &+ c, h.3 &+ d, h.4 &+ e)
        }
        var out: [UInt8] = []
        for v in [h.0, h.1, h.2, h.3, h.4] {
            out += [UInt8(v >> 24), UInt8(v >> 16 & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)]
        }
        return out
    }
}

/// A random (version 4) UUID, lower-case.
public enum UUID4 {
    public static func make() -> String {
        var g = SystemRandomNumberGenerator()
        var bytes = (0..<16).map { _ in UInt8.random(in: 0...255, using: &g) }
        bytes[6] = bytes[6] & 0x0F | 0x40
        bytes[8] = bytes[8] & 0x3F | 0x80
        let hex = Array("0123456789abcdef".utf8)
        var out: [UInt8] = []
        for (i, b) in bytes.enumerated() {
            if i == 4 || i == 6 || i == 8 || i == 10 { out.append(UInt8(ascii: "-")) }
            out.append(hex[Int(b >> 4)])
            out.append(hex[Int(b & 0xF)])
        }
        return String(decoding: out, as: UTF8.self)
    }
}
