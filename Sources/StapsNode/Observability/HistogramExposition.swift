import StapsCluster

/// A count histogram in the Prometheus text format, printed from its bucket counts as they are.
///
/// swift-metrics' `Recorder` and swift-prometheus's `Histogram` take one observation per call
/// and have no way to add many at once, so bringing them up to date cost one call per message
/// since the previous scrape. The lines are the ones swift-prometheus prints for a histogram
/// without labels: `# HELP`, `# TYPE … histogram`, a cumulative `_bucket{le="…"}` per bound
/// (bounds printed as `Double`s), `+Inf`, `_sum` (a `Double`) and `_count`.
enum HistogramExposition {
    /// Appends `name`'s lines to `buffer`; `snapshots` (one per writer) are added up. Bounds
    /// and the sum are printed times `unit` (1e-6 for microseconds counted, seconds printed).
    static func append(_ name: String, help: String, bounds: [Int], snapshots: [CountHistogram.Snapshot], unit: Double = 1, to buffer: inout [UInt8]) {
        var counts = [Int](repeating: 0, count: bounds.count + 1)
        var sum = 0
        for snapshot in snapshots {
            for i in counts.indices { counts[i] &+= snapshot.counts[i] }
            sum &+= snapshot.sums.reduce(0, &+)
        }
        if !help.isEmpty {
            // As swift-prometheus escapes help text: a backslash doubled (no line feeds here).
            buffer += Array("# HELP \(name) \(help.replacingBackslashes)\n".utf8)
        }
        buffer += Array("# TYPE \(name) histogram\n".utf8)
        var cumulative = 0
        for (bound, count) in zip(bounds, counts) {
            cumulative &+= count
            buffer += Array("\(name)_bucket{le=\"\((Double(bound) * unit).description)\"} \(cumulative)\n".utf8)
        }
        let total = counts.reduce(0, &+)
        buffer += Array("\(name)_bucket{le=\"+Inf\"} \(total)\n\(name)_sum \((Double(sum) * unit).description)\n\(name)_count \(total)\n".utf8)
    }
}

extension String {
    fileprivate var replacingBackslashes: String {
        self.contains("\\") ? self.split(separator: "\\", omittingEmptySubsequences: false).joined(separator: "\\\\") : self
    }
}
