/// What one binding of a node's queue covers: one channel (its exact routing key) or a bucket
/// of channels (a prefix of the key: 4096, 256 or 16 buckets). See `RoutingKey`.
public enum BindingGranularity: Int, Sendable, CaseIterable, Comparable, CustomStringConvertible {
    case exact = 0
    case buckets4096 = 4096
    case buckets256 = 256
    case buckets16 = 16

    /// Hex digits of the bucket in the key (0 for the exact key).
    public var digits: Int {
        switch self {
        case .exact: return 0
        case .buckets4096: return 3
        case .buckets256: return 2
        case .buckets16: return 1
        }
    }

    /// Finest first: exact, 4096, 256, 16.
    public static func < (a: Self, b: Self) -> Bool { a.index < b.index }

    /// The granularity of a binding key made by `RoutingKey`: its trailing `*` words say it
    /// (an exact key's last word is never `*`).
    public init(ofKey key: String) {
        var stars = 0
        var word = key.utf8.reversed().makeIterator()
        while stars < 3, word.next() == UInt8(ascii: "*"), word.next() == UInt8(ascii: ".") { stars += 1 }
        self = [.exact, .buckets4096, .buckets256, .buckets16][stars]
    }

    /// Its position in `allCases` (exact, 4096, 256, 16): the index of per-granularity counters.
    public var index: Int { self == .exact ? 0 : 4 - self.digits }

    /// Metric labels and config values: `exact`, `4096`, `256`, `16`.
    public var description: String { self == .exact ? "exact" : String(self.rawValue) }
}

/// How a node chooses its bindings (`amqp_binding_buckets`).
public enum BindingMode: Sendable, Equatable, CustomStringConvertible {
    /// Exact keys while the broker keeps up with the binds; buckets only while binds back up,
    /// refined back to exact keys in the background (`BindingPolicy`).
    case adaptive
    /// Always one granularity: 0 (exact), 16, 256 or 4096 buckets.
    case fixed(buckets: Int)

    /// `adaptive`, `0`, `16`, `256` or `4096`; nil for anything else.
    public init?(configValue: String) {
        if configValue == "adaptive" {
            self = .adaptive
        } else if let n = Int(configValue), BindingGranularity(rawValue: n) != nil {
            self = .fixed(buckets: n)
        } else {
            return nil
        }
    }

    /// The value as written in the configuration file.
    public var configValue: String {
        switch self {
        case .adaptive: return "adaptive"
        case .fixed(let buckets): return String(buckets)
        }
    }

    public var description: String { self.configValue }

    /// The one granularity of a fixed mode; nil when adaptive.
    public var fixedGranularity: BindingGranularity? {
        if case .fixed(let buckets) = self { return BindingGranularity(rawValue: buckets) ?? .exact }
        return nil
    }
}
