import NIOCore

/// UTF-8 validation (RFC 3629: no overlongs, no surrogates, nothing above U+10FFFF), whole or
/// incremental: a text message is checked as its bytes arrive, so an invalid one fails at the
/// first bad byte even when the code point that holds it is split across frames or reads.
public struct UTF8Validator: Sendable {
    /// Continuation bytes the current code point still needs, and the range the next one may take.
    private var needed: UInt8 = 0
    private var lower: UInt8 = 0x80
    private var upper: UInt8 = 0xBF

    public init() {}

    /// True when the bytes so far end on a code point boundary.
    public var isComplete: Bool { self.needed == 0 }

    /// Feeds the next bytes; false as soon as they cannot be (the start of) valid UTF-8.
    public mutating func feed(_ bytes: UnsafeRawBufferPointer) -> Bool {
        let count = bytes.count
        guard count > 0, let base = bytes.baseAddress else { return true }
        var needed = self.needed
        var lower = self.lower
        var upper = self.upper
        var i = 0
        while i < count {
            if needed == 0 {
                // ASCII fast path, 8 bytes at a time.
                while i + 8 <= count, base.loadUnaligned(fromByteOffset: i, as: UInt64.self) & 0x8080_8080_8080_8080 == 0 {
                    i += 8
                }
                guard i < count else { break }
                let b = bytes[i]
                i += 1
                switch b {
                case 0x00...0x7F: continue
                case 0xC2...0xDF: needed = 1; lower = 0x80; upper = 0xBF
                case 0xE0: needed = 2; lower = 0xA0; upper = 0xBF
                case 0xED: needed = 2; lower = 0x80; upper = 0x9F
                case 0xE1...0xEF: needed = 2; lower = 0x80; upper = 0xBF
                case 0xF0: needed = 3; lower = 0x90; upper = 0xBF
                case 0xF1...0xF3: needed = 3; lower = 0x80; upper = 0xBF
                case 0xF4: needed = 3; lower = 0x80; upper = 0x8F
                default: return false
                }
            } else {
                let b = bytes[i]
                i += 1
                guard b >= lower, b <= upper else { return false }
                needed -= 1
                lower = 0x80
                upper = 0xBF
            }
        }
        self.needed = needed
        self.lower = lower
        self.upper = upper
        return true
    }

    public mutating func feed(_ buffer: ByteBuffer) -> Bool {
        buffer.withUnsafeReadableBytes { self.feed($0) }
    }
}

/// Whole-buffer UTF-8 validation.
public enum UTF8Validation {
    public static func isValid(_ buffer: ByteBuffer) -> Bool {
        buffer.withUnsafeReadableBytes { isValid($0) }
    }

    public static func isValid(_ bytes: UnsafeRawBufferPointer) -> Bool {
        var validator = UTF8Validator()
        return validator.feed(bytes) && validator.isComplete
    }
}
