import Atomics
import NIOConcurrencyHelpers
import NIOCore

/// A listener's open connections, each kept from accept until it closes: counted (for a
/// limit, and the node's status line) and at hand, so that shutdown can tell each to finish
/// and close those that do not in time.
final class OpenConnections: Sendable {
    private let open = NIOLockedValueBox<[ObjectIdentifier: Channel]>([:])
    private let counted = ManagedAtomic<Int>(0)

    /// Connections open now.
    var count: Int { self.counted.load(ordering: .relaxed) }

    /// Every connection open now.
    var all: [Channel] { self.open.withLockedValue { Array($0.values) } }

    /// Keeps `connection` until it closes, counted here and in `gauge` (the listener's kind).
    /// Returns how many are open with it. One callback on the close future for both: a second
    /// one costs every open connection a callback list of its own.
    func add(_ connection: Channel, gauge: ManagedAtomic<Int>? = nil) -> Int {
        let key = ObjectIdentifier(connection)
        self.open.withLockedValue { $0[key] = connection }
        let count = self.counted.wrappingIncrementThenLoad(ordering: .relaxed)
        gauge?.wrappingIncrement(ordering: .relaxed)
        connection.closeFuture.whenComplete { _ in
            self.counted.wrappingDecrement(ordering: .relaxed)
            gauge?.wrappingDecrement(ordering: .relaxed)
            self.open.withLockedValue { $0[key] = nil }
        }
        return count
    }

    /// Waits until every connection open now has closed, or until `deadline`. Returns how many
    /// are still open.
    func waitUntilClosed(by deadline: NIODeadline, on loop: EventLoop) async -> Int {
        let open = self.all
        guard !open.isEmpty else { return 0 }
        let done = loop.makePromise(of: Void.self)
        EventLoopFuture.andAllComplete(open.map(\.closeFuture), on: loop).cascade(to: done)
        // Whichever comes first completes `done`; NIO ignores the second.
        let timeout = loop.scheduleTask(deadline: deadline) { done.succeed() }
        try? await done.futureResult.get()
        timeout.cancel()
        return self.count
    }

    /// Closes every connection open now.
    func closeAll() async {
        for connection in self.all { try? await connection.close() }
    }
}
