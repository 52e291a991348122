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

extension Node {
    /// Gives freed heap memory back to the system when a busy spell ends: glibc keeps what was
    /// freed in its arenas, so a node that once held thousands of connections or buffered a
    /// flood would keep that high-water mark. Every 2 s, activity (messages, HTTP responses,
    /// connections opened or closed) is compared with the busiest interval since the last trim;
    /// once it has fallen to an eighth of that, the heap is trimmed (on a background thread).
    func startMemoryTrim() {
        // glibc's malloc_trim(3), looked up at run time: no Swift module declares it.
        typealias MallocTrim = @convention(c) (Int) -> Int32
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "malloc_trim") else { return }
        let mallocTrim = unsafeBitCast(symbol, to: MallocTrim.self)
        let counters = self.counters
        let hub = self.hub
        let connections = self.connectionCount
        struct Spell { var messages = 0, responses = 0, connections = 0, peak = 0 }
        let spell = NIOLockedValueBox(Spell())
        let task = self.group.next().scheduleRepeatedTask(initialDelay: .seconds(2), delay: .seconds(2)) { _ in
            let trim = spell.withLockedValue { s -> Bool in
                let received = hub.messagesReceived
                let now = Spell(messages: received.websocket &+ received.post, responses: counters.httpResponseTotal.load(ordering: .relaxed), connections: connections.load(ordering: .relaxed))
                let activity = (now.messages &- s.messages) &+ (now.responses &- s.responses) &+ abs(now.connections &- s.connections)
                let peak = max(s.peak, activity)
                s = now
                s.peak = peak
                guard peak >= 1000, activity * 8 <= peak else { return false }
                s.peak = 0
                return true
            }
            if trim {
                // Off the event loop: trimming holds the allocator's locks for a while.
                DispatchQueue.global(qos: .utility).async {
                    _ = mallocTrim(0)
                    counters.memoryTrims.wrappingIncrement(ordering: .relaxed)
                }
            }
        }
        self.memoryTrim.withLockedValue { $0 = task }
    }
}
