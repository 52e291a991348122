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
/// The handoff knows which binding keys the link marked bound (settled on the broker and held
/// by a channel), and whether the link is up, both under its lock: a join whose channel one of
/// its keys covers (`ChannelKeys`) proceeds at once, without a round trip to the link's thread;
/// so does a join while the link is down (local service; bound on reconnection). The link
/// unmarks a key under the same lock as it takes the commands queued so far, before it unbinds
/// the key (see `BindingPolicy`), so no join proceeds on a binding about to go.
final class LoopHandoff: Sendable {
    /// About channels. A `firstChannel`'s promise is nil when its join already proceeded.
    enum Command {
        case firstChannel(ChannelKeys, EventLoopPromise<Void>?)
        /// A later client on a channel with local clients already: wait for its binding.
        case awaitBinding(String, EventLoopPromise<Void>)
        case lastChannelGone(String)
    }

    struct Taken {
        var commands: [Command] = []
        var publishes: [ClusterMessage] = []
        /// How many `firstChannel` commands were handed over so far, these included.
        var joins = 0
        /// Publishes dropped for their age (`amqp_max_age`) since the last take.
        var expired = 0
    }

    private struct State {
        var commands: [Command] = []
        var publishes: PendingPublishes
        var closed = false
        /// Set by the link's thread while it is connected (`linkUp`, `linkDown`).
        var connected = false
        /// Binding keys the link marked bound on the current connection.
        var bound: Set<String> = []
        /// The stream of each channel held, which numbers the publishes as they come in.
        var numbering = StreamNumbering()

        func covers(_ keys: ChannelKeys) -> Bool {
            !self.connected || keys.all.contains { self.bound.contains($0) }
        }
    }

    let wakeFD: Int32
    /// True while the link's thread is (about to be) blocked in poll: only then is a wake-up
    /// write needed. A busy thread picks up new work on its next round without one.
    let sleeping = ManagedAtomic<Bool>(false)
    /// Counts `firstChannel` commands (written under the lock): a link that reads a message for
    /// a channel it does not know checks it to learn whether a join is still on its way.
    let joins = ManagedAtomic<Int>(0)
    private let state: NIOLockedValueBox<State>

    init(capacity: Int, maxAge: TimeAmount) {
        self.state = NIOLockedValueBox(State(publishes: PendingPublishes(capacity: capacity, maxAge: maxAge)))
        self.wakeFD = eventfd(0, Int32(EFD_NONBLOCK | EFD_CLOEXEC))
    }

    deinit { Glibc.close(self.wakeFD) }

    /// A channel got its first local client: the promise succeeds at once when one of its keys
    /// is bound (or the link is down), later (from the link's thread) otherwise, and fails when
    /// the link stopped.
    func startReceiving(channel: String, whenBound promise: EventLoopPromise<Void>) {
        let keys = ChannelKeys(channel: channel)
        let outcome = self.state.withLockedValue { state -> JoinOutcome in
            guard !state.closed else { return .stopped }
            self.joins.wrappingIncrement(ordering: .releasing)
            state.numbering.open(channel)
            if state.covers(keys) {
                // The thread still learns of the channel; no hurry.
                state.commands.append(.firstChannel(keys, nil))
                return .ready
            }
            state.commands.append(.firstChannel(keys, promise))
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
    /// channel is covered by a bound key (at once when it is, or while the link is down).
    func awaitBinding(channel: String, promise: EventLoopPromise<Void>) {
        let keys = ChannelKeys(channel: channel)
        let outcome = self.state.withLockedValue { state -> JoinOutcome in
            guard !state.closed else { return .stopped }
            if state.covers(keys) { return .ready }
            state.commands.append(.awaitBinding(channel, promise))
            return .waiting
        }
        self.complete(outcome, promise)
    }

    /// A channel's last local client left. The thread hears of it (no hurry: the binding lingers).
    func stopReceiving(channel: String) {
        self.state.withLockedValue { state in
            guard !state.closed else { return }
            state.numbering.close(channel)
            state.commands.append(.lastChannelGone(channel))
        }
    }

    /// The broker confirmed these keys bound (and a channel holds each): joins they cover may
    /// proceed at once from now on.
    func markBound(_ keys: [String]) {
        guard !keys.isEmpty else { return }
        self.state.withLockedValue { state in
            guard state.connected else { return }
            state.bound.formUnion(keys)
        }
    }

    /// The link is connected: from now on a join waits until a bound key covers its channel.
    func linkUp() {
        self.state.withLockedValue { state in
            state.connected = true
            state.bound = []
        }
    }

    /// The connection is gone: nothing is bound, and joins proceed at once (local service).
    func linkDown() {
        self.state.withLockedValue { state in
            state.connected = false
            state.bound = []
        }
    }

    /// Queues publishes, stamped with the time they arrived and numbered on their channels'
    /// streams; false when they don't fit (the caller drops and counts them; they took their
    /// numbers all the same).
    func add(publishes batch: [ClusterMessage], bytes: Int) -> Bool {
        let now = NIODeadline.now()
        let accepted = self.state.withLockedValue { state -> Bool in
            !state.closed && state.publishes.add(batch, bytes: bytes, now: now, numbering: &state.numbering)
        }
        if accepted { self.wake() }
        return accepted
    }

    /// Publishes dropped before they could be queued (the link is down): they take their
    /// numbers, so receivers count them missed once the stream's next message arrives.
    func skip(publishes batch: [ClusterMessage]) {
        self.state.withLockedValue { $0.numbering.skip(batch) }
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

    /// Takes the commands only (see `joins`).
    func takeCommands() -> Taken {
        self.state.withLockedValue { state in
            var out = Taken()
            swap(&out.commands, &state.commands)
            out.joins = self.joins.load(ordering: .relaxed)
            return out
        }
    }

    func hasWork(publishes: Bool) -> Bool {
        self.state.withLockedValue { !$0.commands.isEmpty || (publishes && !$0.publishes.isEmpty) }
    }

    /// Unmarks `unmark` (keys the link is about to unbind, see `BindingPolicy`), takes every
    /// command, and publishes up to `publishBytes` bytes (whole messages, oldest first),
    /// counting `overhead` more per message for what the wire adds. The first message is
    /// taken even when it alone is over the limit only if `oversizeFirst`. Publishes older
    /// than `amqp_max_age` are dropped first, and counted in `expired`. `joins` is the
    /// generation of `firstChannel` commands taken so far.
    func take(publishBytes limit: Int, overhead: Int = 0, oversizeFirst: Bool = true, unmark: Set<String> = []) -> Taken {
        let now = NIODeadline.now()
        return self.state.withLockedValue { state in
            if !unmark.isEmpty { state.bound.subtract(unmark) }
            var out = Taken()
            swap(&out.commands, &state.commands)
            out.joins = self.joins.load(ordering: .relaxed)
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
