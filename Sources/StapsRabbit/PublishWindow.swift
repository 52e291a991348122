import NIOCore

#if canImport(Glibc)
import Glibc
#endif

/// How much the link may have written to the broker and not yet seen confirmed: what the
/// broker confirms in its round trip with nothing queued (the fastest confirm on the
/// connection) plus `target`, at least `floor`, at most `ceiling` (in bytes as the handoff
/// counts them). A pure value, fed the confirmed bytes now and then.
///
/// Without it, a broker that holds its publishers back (credit flow) leaves what the link
/// wrote in the broker's socket receive buffer, which its kernel acknowledges at once:
/// measured here (scripts/bench-delay), 2.7 to 3.5 MB per publishing connection, 7 s of the
/// broker's work, out of reach of `amqp_max_age`. With it, messages wait in the node, where
/// they are dropped and counted once too old, and what was written waits about `target` more
/// than a round trip.
///
/// The window follows the largest recent confirm rate (a sample raises it at once; it halves
/// every `target` without one as large): while the window itself is what limits the rate, a
/// round trip shorter than itself plus `target` widens it, so it grows until the broker, not
/// the window, is the limit.
struct PublishWindow {
    static let target: TimeAmount = .milliseconds(100)
    static let floor = 16 << 10
    static let ceiling = 16 << 20

    /// The most that may be written and not confirmed.
    private(set) var limit = PublishWindow.floor
    /// Bytes per second.
    private var rate = 0.0
    private var last: (settledBytes: Int, at: NIODeadline)?

    /// The connection's confirmed bytes so far and its fastest confirm (`Confirms`) at `now`.
    mutating func update(settledBytes: Int, fastestRoundTrip: TimeAmount?, now: NIODeadline) {
        defer { self.last = (settledBytes, now) }
        guard let last = self.last, now > last.at else { return }
        let seconds = Double((now - last.at).nanoseconds) / 1e9
        let target = Double(Self.target.nanoseconds) / 1e9
        let sample = Double(max(0, settledBytes - last.settledBytes)) / seconds
        self.rate = max(sample, self.rate * exp2(-seconds / target))
        let roundTrip = Double((fastestRoundTrip ?? .zero).nanoseconds) / 1e9
        self.limit = min(Self.ceiling, max(Self.floor, Int(self.rate * (roundTrip + target))))
    }
}
