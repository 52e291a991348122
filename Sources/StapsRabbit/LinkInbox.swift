import Atomics
import CRabbit
import NIOConcurrencyHelpers
import NIOCore
import StapsNode

#if canImport(Glibc)
import Glibc
#endif

/// The queue the event loops write to and the link's thread takes from.
///
/// Event loops only take a short lock to append, and write the eventfd only when the thread
/// sleeps (or is about to): they never wait on the broker. Publishes are bounded in bytes
/// (`amqp_buffer`); beyond it they are dropped and counted. Once closed (the link stopped),
/// a subscription fails at once instead of waiting for a thread that is gone.
final class LinkInbox: Sendable {
    enum Command {
        case subscribe(String, EventLoopPromise<Void>)
        case unsubscribe(String)
    }

    struct Taken {
        var commands: [Command] = []
        var publishes: [ClusterMessage] = []
    }

    private struct State {
        var commands: [Command] = []
        var publishes: [ClusterMessage] = []
        var publishBytes = 0
        var closed = false
    }

    let wakeFD: Int32
    let capacity: Int
    /// True while the link's thread is (about to be) blocked in poll: only then is a wake-up
    /// write needed. A busy thread picks up new work on its next round without one.
    let sleeping = ManagedAtomic<Bool>(false)
    private let state = NIOLockedValueBox(State())

    init(capacity: Int) {
        self.capacity = capacity
        self.wakeFD = eventfd(0, Int32(EFD_NONBLOCK | EFD_CLOEXEC))
    }

    deinit { Glibc.close(self.wakeFD) }

    static func bytes(of message: ClusterMessage) -> Int { message.payload.readableBytes + message.channel.utf8.count }

    /// Queues a command; false when the inbox is closed (the caller fails the promise).
    func add(_ command: Command) -> Bool {
        let added = self.state.withLockedValue { state -> Bool in
            guard !state.closed else { return false }
            state.commands.append(command)
            return true
        }
        if added { self.wake() }
        return added
    }

    /// Queues publishes; false when they don't fit (the caller drops and counts them).
    func add(publishes batch: [ClusterMessage], bytes: Int) -> Bool {
        let accepted = self.state.withLockedValue { state -> Bool in
            guard !state.closed, state.publishBytes + bytes <= self.capacity else { return false }
            state.publishes.append(contentsOf: batch)
            state.publishBytes += bytes
            return true
        }
        if accepted { self.wake() }
        return accepted
    }

    func wake() {
        guard self.sleeping.exchange(false, ordering: .sequentiallyConsistent) else { return }
        var one: UInt64 = 1
        _ = write(self.wakeFD, &one, 8)
    }

    func drainWakeFD() {
        var value: UInt64 = 0
        _ = read(self.wakeFD, &value, 8)
    }

    func hasWork(publishes: Bool) -> Bool {
        self.state.withLockedValue { !$0.commands.isEmpty || (publishes && !$0.publishes.isEmpty) }
    }

    /// Takes every command, and publishes up to `publishBytes` bytes (whole messages, oldest first).
    func take(publishBytes limit: Int) -> Taken {
        self.state.withLockedValue { state in
            var out = Taken()
            swap(&out.commands, &state.commands)
            guard limit > 0, !state.publishes.isEmpty else { return out }
            if state.publishBytes <= limit {
                swap(&out.publishes, &state.publishes)
                state.publishBytes = 0
                return out
            }
            var bytes = 0
            var n = 0
            while n < state.publishes.count, bytes < limit {
                bytes += Self.bytes(of: state.publishes[n])
                n += 1
            }
            out.publishes = Array(state.publishes[..<n])
            state.publishes.removeFirst(n)
            state.publishBytes -= bytes
            return out
        }
    }

    /// Drops the publishes waiting (the broker is down); returns how many messages that was.
    func dropPublishes() -> Int {
        self.state.withLockedValue { state in
            let n = state.publishes.count
            state.publishes = []
            state.publishBytes = 0
            return n
        }
    }

    /// Closes the inbox for good; returns what was still in it.
    func close() -> Taken {
        self.state.withLockedValue { state in
            state.closed = true
            let out = Taken(commands: state.commands, publishes: state.publishes)
            state.commands = []
            state.publishes = []
            state.publishBytes = 0
            return out
        }
    }
}
