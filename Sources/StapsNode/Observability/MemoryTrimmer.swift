import Atomics
import Dispatch
import NIOConcurrencyHelpers
import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Gives freed heap memory back to the system when a busy spell ends: glibc keeps what was
/// freed in its arenas, so a node that once held thousands of connections or buffered a flood
/// would keep that high-water mark. Every 2 s, activity (messages, HTTP responses, connections
/// opened or closed) is compared with the busiest interval since the last trim; once it has
/// fallen to an eighth of that, the heap is trimmed (on a background thread).
final class MemoryTrimmer: Sendable {
    private let hub: Hub
    private let counters: NodeCounters
    private let connections: OpenConnections
    private let task = NIOLockedValueBox<RepeatedTask?>(nil)

    init(hub: Hub, counters: NodeCounters, connections: OpenConnections) {
        self.hub = hub
        self.counters = counters
        self.connections = connections
    }

    /// Starts looking every 2 s, on `loop`. Without glibc's malloc_trim, does nothing.
    func start(on loop: EventLoop) {
        // glibc's malloc_trim(3), looked up at run time: no Swift module declares it.
        typealias MallocTrim = @convention(c) (Int) -> Int32
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "malloc_trim") else { return }
        let mallocTrim = unsafeBitCast(symbol, to: MallocTrim.self)
        let spell = NIOLockedValueBox(Spell())
        let task = loop.scheduleRepeatedTask(initialDelay: .seconds(2), delay: .seconds(2)) { [self] _ in
            let received = self.hub.messagesReceived
            let now = Spell.Totals(messages: received.websocket &+ received.post, responses: self.counters.httpResponseTotal.load(ordering: .relaxed), connections: self.connections.count)
            guard spell.withLockedValue({ $0.endsWith(now) }) else { return }
            // Off the event loop: trimming holds the allocator's locks for a while.
            DispatchQueue.global(qos: .utility).async {
                _ = mallocTrim(0)
                self.counters.memoryTrims.wrappingIncrement(ordering: .relaxed)
            }
        }
        self.task.withLockedValue { $0 = task }
    }

    func stop() {
        self.task.withLockedValue { $0?.cancel(); $0 = nil }
    }

    /// The activity seen so far in the current spell.
    struct Spell {
        struct Totals { var messages = 0, responses = 0, connections = 0 }
        private var last = Totals()
        /// The busiest interval since the last trim.
        private var peak = 0

        /// Takes the totals at the end of an interval: true when a busy spell (an interval of
        /// at least 1000) has ended (this interval saw an eighth of the busiest or less).
        mutating func endsWith(_ now: Totals) -> Bool {
            let activity = (now.messages &- self.last.messages) &+ (now.responses &- self.last.responses) &+ abs(now.connections &- self.last.connections)
            self.last = now
            self.peak = max(self.peak, activity)
            guard self.peak >= 1000, activity * 8 <= self.peak else { return false }
            self.peak = 0
            return true
        }
    }
}
