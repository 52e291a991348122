/// Channel name → topic routing key, and the binding key a node binds for it.
///
/// Topic keys are dot-separated words of at most 255 bytes, and `*` and `#` are wildcards in
/// binding keys. A channel's messages are published with `c.H.H.H.W`: three words of one hex
/// digit each (the first three of the SHA-1 of the name: its bucket), then the name as one
/// word `W`: bytes `A-Z a-z 0-9 - _` stay, every other byte (`.`, `*`, `#`, `%`, `/`, `~`,
/// non-ASCII, …) becomes `~XX` (hex). `W` holds no `.`, is never `*` or `#`, and `~` is itself
/// escaped, so the mapping is injective and no exact binding can match another channel's key.
/// A name whose escaped form would make the key longer than 255 bytes is `~~` + SHA-1 hex of
/// the name instead (`~~` never occurs in an escaped name).
///
/// A node binds either the exact key (`buckets` 0: one binding per channel) or its bucket:
/// `c.H.*.*.*` (16 buckets), `c.H.H.*.*` (256) or `c.H.H.H.*` (4096), one binding shared by
/// every channel of the bucket. Every key has the same shape whatever a node binds, so nodes
/// with different settings still reach each other. The exact name also travels in the message
/// body and a node delivers only to that exact name, so a bucket (or a hash collision) can
/// bring a node a message it then ignores, never a message for the wrong channel.
public enum RoutingKey {
    /// Bucket counts a node may bind at: 0 (exact), 16, 256, 4096.
    public static let bucketChoices = [0, 16, 256, 4096]

    public static func forChannel(_ name: String) -> String {
        let digest = SHA1.hex(name).utf8
        var out: [UInt8] = Array("c.".utf8)
        out.reserveCapacity(8 + name.utf8.count * 3)
        for d in digest.prefix(3) {
            out.append(d)
            out.append(UInt8(ascii: "."))
        }
        let start = out.count
        for b in name.utf8 {
            switch b {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"),
                UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "_"):
                out.append(b)
            default:
                out.append(UInt8(ascii: "~"))
                Hex.append(b, to: &out, uppercase: true)
            }
        }
        if out.count > 255 {
            out.removeSubrange(start...)
            out.append(contentsOf: "~~".utf8)
            out.append(contentsOf: digest)
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// What a node binds for `name`: the exact key (`buckets` 0) or the key of its bucket.
    public static func binding(forChannel name: String, buckets: Int) -> String {
        let key = Self.forChannel(name)
        let digits: Int
        switch buckets {
        case 16: digits = 1
        case 256: digits = 2
        case 4096: digits = 3
        default: return key
        }
        let words = key.split(separator: ".", maxSplits: 1 + digits, omittingEmptySubsequences: false)
        return (words.prefix(1 + digits) + Array(repeating: "*", count: 4 - digits)).joined(separator: ".")
    }
}
