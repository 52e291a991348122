import Atomics
import CRabbit  // for eventfd(2): its shim includes <sys/eventfd.h>, which Glibc does not export
import NIOConcurrencyHelpers
import NIOCore
import StapsCluster

#if canImport(Glibc)
import Glibc
#endif

/// The queue the event loops write to and the link's thread takes from, and the binding keys
/// both sides must agree on.
///
/// Event loops only take a short lock to append, and write the eventfd only when the thread
/// sleeps (or is about to) and has something urgent: they never wait on the broker. Publishes
/// are bounded in bytes (`amqp_buffer`); beyond it they are dropped and counted. Once closed
/// (the link stopped), a join fails at once instead of waiting for a thread that is gone.
///
/// Channels map to binding keys (`RoutingKey.binding`: one per channel, or one per bucket).
/// The handoff counts the channels with local clients per key, and knows which keys the broker
/// has confirmed bound: a join on a bound key proceeds at once, without a round trip to the
/// link's thread. The thread hears of a key only when its first channel comes or its last one
/// goes, and releases a key (to unbind it) only under the same lock, only when no channel
/// wants it: so no join can proceed on a binding an unbind in flight is about to remove.
final class LoopHandoff: Sendable {
    /// About binding keys. A `firstChannel`'s promise is nil when its join already proceeded.
    enum Command {
        case firstChannel(String, EventLoopPromise<Void>?)
        /// A later client on a key with channels already: wait for the key's binding, count nothing.
        case awaitBinding(String, EventLoopPromise<Void>)
        case lastChannelGone(String)
    }

    private struct Binding {
        var channels = 0
        var bound = false
    }

    struct Taken {
        var commands: [Command] = []
        var publishes: [ClusterMessage] = []
        /// Publishes dropped for their age (`amqp_max_age`) since the last take.
        var expired = 0
    }

    private struct State {
        var commands: [Command] = []
        var publishes: PendingPublishes
        var closed = false
        var bindings: [String: Binding] = [:]
    }

    let wakeFD: Int32
    let buckets: Int
    /// True while the link's thread is (about to be) blocked in poll: only then is a wake-up
    /// write needed. A busy thread picks up new work on its next round without one.
    let sleeping = ManagedAtomic<Bool>(false)
    /// True while the link is connected (set by its thread). While it is not, joins proceed at
    /// once (local service; bound on reconnection) without waiting for a connect attempt.
    let connected = ManagedAtomic<Bool>(false)
    private let state: NIOLockedValueBox<State>

    init(capacity: Int, maxAge: TimeAmount, buckets: Int) {
        self.state = NIOLockedValueBox(State(publishes: PendingPublishes(capacity: capacity, maxAge: maxAge)))
        self.buckets = buckets
        self.wakeFD = eventfd(0, Int32(EFD_NONBLOCK | EFD_CLOEXEC))
    }

    deinit { Glibc.close(self.wakeFD) }

    /// A channel got its first local client: the promise succeeds at once when its binding key
    /// is bound, later (from the link's thread) otherwise, and fails when the link stopped.
    func startReceiving(channel: String, whenBound promise: EventLoopPromise<Void>) {
        let key = RoutingKey.binding(forChannel: channel, buckets: self.buckets)
        let down = !self.connected.load(ordering: .relaxed)
        let outcome = self.state.withLockedValue { state -> JoinOutcome in
            guard !state.closed else { return .stopped }
            var binding = state.bindings[key] ?? Binding()
            binding.channels += 1
            state.bindings[key] = binding
            if binding.bound || down {
                // The thread still learns that the key is wanted again; no hurry.
                if binding.channels == 1 { state.commands.append(.firstChannel(key, nil)) }
                return .ready
            }
            state.commands.append(.firstChannel(key, promise))
            return .waiting
        }
        self.complete(outcome, promise)
    }

    private enum JoinOutcome { case ready, waiting, stopped }

    /// Outside the lock: proceed, wake the thread that will answer, or refuse.
    private func complete(_ outcome: JoinOutcome, _ promise: EventLoopPromise<Void>) {
        switch outcome {
        case .ready: promise.succeed(())
        case .waiting: self.wake()
        case .stopped: promise.fail(LinkStopped())
        }
    }

    /// Another client joined a channel with local clients: the promise succeeds once the
    /// channel's binding key is bound (at once when it is, or while the link is down).
    func awaitBinding(channel: String, promise: EventLoopPromise<Void>) {
        let key = RoutingKey.binding(forChannel: channel, buckets: self.buckets)
        let down = !self.connected.load(ordering: .relaxed)
        let outcome = self.state.withLockedValue { state -> JoinOutcome in
            guard !state.closed else { return .stopped }
            if down || state.bindings[key]?.bound == true { return .ready }
            state.commands.append(.awaitBinding(key, promise))
            return .waiting
        }
        self.complete(outcome, promise)
    }

    /// A channel's last local client left. The thread hears of it (no hurry: the binding
    /// lingers) when it was the key's last channel.
    func stopReceiving(channel: String) {
        let key = RoutingKey.binding(forChannel: channel, buckets: self.buckets)
        self.state.withLockedValue { state in
            guard !state.closed, var binding = state.bindings[key] else { return }
            binding.channels -= 1
            state.bindings[key] = binding
            if binding.channels == 0 { state.commands.append(.lastChannelGone(key)) }
        }
    }

    /// The broker confirmed `key` bound (and nothing in flight undoes it): joins on it may
    /// proceed at once from now on.
    func markBound(_ key: String) {
        self.state.withLockedValue { state in
            if state.bindings[key] != nil { state.bindings[key]!.bound = true }
        }
    }

    /// The link's thread is about to unbind `key`: true (and joins on it wait again) when no
    /// channel wants it; false when one came back meanwhile (keep the binding).
    func release(_ key: String) -> Bool {
        self.state.withLockedValue { state in
            guard (state.bindings[key]?.channels ?? 0) == 0 else { return false }
            state.bindings[key] = nil
            return true
        }
    }

    /// The connection is gone: nothing is bound any more.
    func markAllUnbound() {
        self.state.withLockedValue { state in
            for key in state.bindings.keys { state.bindings[key]!.bound = false }
        }
    }

    /// Queues publishes, stamped with the time they arrived; false when they don't fit (the
    /// caller drops and counts them).
    func add(publishes batch: [ClusterMessage], bytes: Int) -> Bool {
        let now = NIODeadline.now()
        let accepted = self.state.withLockedValue { state -> Bool in
            !state.closed && state.publishes.add(batch, bytes: bytes, now: now)
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

    /// Takes every command, and publishes up to `publishBytes` bytes (whole messages, oldest
    /// first), counting `overhead` more per message for what the wire adds. The first message
    /// is taken even when it alone is over the limit only if `oversizeFirst`. Publishes older
    /// than `amqp_max_age` are dropped first, and counted in `expired`.
    func take(publishBytes limit: Int, overhead: Int = 0, oversizeFirst: Bool = true) -> Taken {
        let now = NIODeadline.now()
        return self.state.withLockedValue { state in
            var out = Taken()
            swap(&out.commands, &state.commands)
            let publishes = state.publishes.take(bytes: limit, overhead: overhead, oversizeFirst: oversizeFirst, now: now)
            (out.publishes, out.expired) = (publishes.messages, publishes.expired)
            return out
        }
    }

    /// Drops the publishes waiting (the broker is down); returns how many messages that was.
    func dropPublishes() -> Int {
        self.state.withLockedValue { $0.publishes.removeAll().count }
    }

    /// Closes the handoff for good; returns what was still in it.
    func close() -> Taken {
        self.state.withLockedValue { state in
            state.closed = true
            var out = Taken(commands: state.commands)
            out.expired = state.publishes.removeExpired(now: .now())
            out.publishes = state.publishes.removeAll()
            state.commands = []
            return out
        }
    }
}
