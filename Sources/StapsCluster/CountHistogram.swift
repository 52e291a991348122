import Atomics

/// Counts of observations in fixed buckets (receivers per message, messages per broker
/// publish). Written by one thread only (a plain load and store, no
/// read-modify-write); read by any.
public final class CountHistogram: Sendable {
    /// Upper bounds (inclusive) of the buckets; one more bucket holds what is above the last.
    public let bounds: [Int]
    /// Observations per bucket (not cumulative), the last one above every bound, and the sum
    /// of each bucket's values.
    private let counts: [ManagedAtomic<Int>]
    private let sums: [ManagedAtomic<Int>]

    public static let fanoutBounds = [0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000]

    public init(bounds: [Int]) {
        self.bounds = bounds
        self.counts = (0...bounds.count).map { _ in ManagedAtomic<Int>(0) }
        self.sums = (0...bounds.count).map { _ in ManagedAtomic<Int>(0) }
    }

    @inline(__always)
    public func record(_ value: Int) {
        var i = 0
        let bounds = self.bounds
        while i < bounds.count, value > bounds[i] { i &+= 1 }
        // The sum first, the count released after it: a reader that sees the count sees at
        // least the sum of the observations it counts.
        let sum = self.sums[i]
        sum.store(sum.load(ordering: .relaxed) &+ value, ordering: .relaxed)
        let count = self.counts[i]
        count.store(count.load(ordering: .relaxed) &+ 1, ordering: .releasing)
    }

    public struct Snapshot: Sendable {
        public var counts: [Int]
        public var sums: [Int]

        public init(counts: [Int], sums: [Int]) {
            self.counts = counts
            self.sums = sums
        }
    }

    /// Counts, then sums: a sum may already hold observations its count does not show yet.
    public var snapshot: Snapshot {
        let counts = self.counts.map { $0.load(ordering: .acquiring) }
        return Snapshot(counts: counts, sums: self.sums.map { $0.load(ordering: .relaxed) })
    }
}
