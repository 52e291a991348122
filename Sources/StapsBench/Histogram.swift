/// A log-linear latency histogram (about 3% precision), cheap to record into on a hot path.
struct Histogram {
    private static let subBuckets = 32
    private var counts = [Int](repeating: 0, count: 64 * Histogram.subBuckets)
    private(set) var total = 0
    private(set) var max: UInt64 = 0

    mutating func record(_ nanos: UInt64) {
        let v = nanos | 1
        let exponent = 63 - v.leadingZeroBitCount
        let index: Int
        if exponent < 5 {
            index = Int(v)
        } else {
            let mantissa = Int((v >> UInt64(exponent - 5)) & 31)
            index = exponent * Histogram.subBuckets + mantissa
        }
        counts[index] += 1
        total += 1
        if nanos > max { max = nanos }
    }

    mutating func merge(_ other: Histogram) {
        for i in counts.indices { counts[i] += other.counts[i] }
        total += other.total
        if other.max > max { max = other.max }
    }

    /// The value at quantile `q` (0...1), in nanoseconds (upper edge of its bucket).
    func quantile(_ q: Double) -> UInt64 {
        guard total > 0 else { return 0 }
        let target = Swift.max(1, Int((Double(total) * q).rounded(.up)))
        var seen = 0
        for (i, c) in counts.enumerated() where c > 0 {
            seen += c
            if seen >= target {
                if i < 32 { return UInt64(i) }
                let exponent = i / Histogram.subBuckets
                let mantissa = UInt64(i % Histogram.subBuckets)
                return (mantissa + 1) << UInt64(exponent - 5) + (1 << UInt64(exponent))
            }
        }
        return max
    }
}
