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
/// A node binds the exact key (one binding per channel) or a bucket of it: `c.H.*.*.*` (16
/// buckets), `c.H.H.*.*` (256) or `c.H.H.H.*` (4096), one binding shared by every channel of
/// the bucket; its bindings may mix all four (`BindingGranularity`). Every key has the same
/// shape whatever a node binds, so nodes with different settings still reach each other. The exact name also travels in the message
/// body and a node delivers only to that exact name, so a bucket (or a hash collision) can
/// bring a node a message it then ignores, never a message for the wrong channel.
///
/// **Version.** The leading word `c` is the format's version: every node of a cluster must
/// publish and bind keys of one format. A change to the words, the hash, the escaping or the
/// bucket prefixes must take a new leading word (and nodes that bind both for a rolling
/// upgrade); `RoutingKeyTests` pins today's keys so such a change cannot go unnoticed.
public enum RoutingKey {
    /// Bucket counts a node may bind at: 0 (exact), 16, 256, 4096.
    public static let bucketChoices = BindingGranularity.allCases.map(\.rawValue)

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
        ChannelKeys(channel: name).key(BindingGranularity(rawValue: buckets) ?? .exact)
    }

    /// The bucket key of `granularity` for a routing key made by `forChannel` (its prefix).
    static func bucket(of key: String, _ granularity: BindingGranularity) -> String {
        let digits = granularity.digits
        guard digits > 0 else { return key }
        // "c." then `digits` words of one hex digit, then a `*` for each word left.
        var out = Array(key.utf8.prefix(2 + 2 * digits))
        for _ in digits..<3 { out.append(contentsOf: "*.".utf8) }
        out.append(UInt8(ascii: "*"))
        return String(decoding: out, as: UTF8.self)
    }
}

/// A channel's routing key and the four binding keys that cover it, computed once (SHA-1 and
/// escaping) when the channel gets its first local client.
public struct ChannelKeys: Sendable, Hashable {
    public let channel: String
    /// Exact, 4096, 256, 16 (`BindingGranularity` order, finest first).
    public let all: [String]

    public init(channel: String) {
        self.channel = channel
        let exact = RoutingKey.forChannel(channel)
        self.all = [exact, RoutingKey.bucket(of: exact, .buckets4096), RoutingKey.bucket(of: exact, .buckets256), RoutingKey.bucket(of: exact, .buckets16)]
    }

    /// The routing key messages on the channel are published with (its exact binding key).
    public var routingKey: String { self.all[0] }

    public func key(_ granularity: BindingGranularity) -> String {
        switch granularity {
        case .exact: return self.all[0]
        case .buckets4096: return self.all[1]
        case .buckets256: return self.all[2]
        case .buckets16: return self.all[3]
        }
    }
}
