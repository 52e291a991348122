import NIOCore
import RabbitClient
import StapsCluster

/// Which binding key covers each staps channel this node holds, as a pure state machine beside
/// `Topology` (which sends the binds and unbinds it asks for): no I/O, so it is tested in memory.
///
/// A channel is *covered* when one of its four keys (`ChannelKeys`: exact, 4096, 256, 16
/// buckets) is settled on the broker; a join proceeds then, and not before. Each channel holds
/// one key, its *cover*, and a key is bound while a channel holds it (or lingers on it).
///
/// **Adaptive** (`BindingMode.adaptive`): a new channel gets its exact key while the broker keeps
/// up with the binds. When a bind sent now would wait longer than `budget` behind those in
/// flight (and for `calm` after that was last so), a new channel instead takes a bucket already
/// bound (finest first; it joins at once), or one being bound, or binds a new one: 4096 buckets,
/// then 256 and 16 once a few binds did not relieve the pressure: so joins stay fast whatever the churn,
/// and the broker is not kept busy binding keys for channels that live a few milliseconds.
/// Channels on buckets are *refined* in the background while there is no pressure: the exact
/// key is bound, and once the broker confirms it, the bucket is released; a bucket no channel
/// holds is unbound. After a reconnection every channel is covered at once with few buckets,
/// then refined.
///
/// **Fixed** (`BindingMode.fixed`): every channel holds its key at that one granularity.
///
/// **Unbinds and joins on the event loops.** The handoff lets a join proceed at once when one of
/// its keys is marked bound there (`Effects.markBound`). Before unbinding a key no channel holds,
/// the link unmarks it in the handoff and takes the commands queued before that in the same
/// lock (`retireCandidates`, then `finishRetire`): a join that proceeded on the key is then
/// known here, holds a key of its own, and its bind went out before the unbind (the broker
/// applies them in order), so no joined client misses a message.
struct BindingPolicy<Waiter> {
    struct Settings {
        var mode: BindingMode
        var linger: TimeAmount
        /// A join's bind should take about this at most: past it, new channels take buckets.
        var budget: TimeAmount = .milliseconds(5)
        /// Pressure lasts this long after the wait was last seen over the budget: exact keys
        /// come back only once the binds have kept up for a while, not between two bursts.
        var calm: TimeAmount = .seconds(1)
        /// New bucket binds at one granularity, in a spell of pressure, before the next ones
        /// go coarser (4096, 256, 16) if binds still back up.
        var escalateAfter = 8
        /// Keys to cover every channel with after a reconnection, at most (unless even the 16
        /// buckets are more).
        var maxCoverKeys = 256
        /// Rebinds in flight at most after a reconnection, so joins never queue behind them all.
        var rebindWindow = 2048
    }

    /// What the link must do after a call: joins to let proceed, requests to send, keys to mark
    /// bound in the handoff.
    struct Effects {
        var ready: [Waiter] = []
        var requests: [Topology.Request] = []
        var markBound: [String] = []
    }

    private struct Channel {
        let keys: ChannelKeys
        var cover: BindingGranularity
        /// Holds its exact key too while the broker has not confirmed it; then that is the cover.
        var refining = false
        var lingerUntil: NIODeadline?
        var waiters: [Waiter] = []
    }

    private struct Holding {
        var count = 0
        /// For an exact key: its channel.
        var channel: String?
    }

    let settings: Settings
    private(set) var topology = Topology()
    private var channels: [String: Channel] = [:]
    /// Binding key → how many channels hold it.
    private var holdings: [String: Holding] = [:]
    /// Channels with joins waiting for a binding.
    private var waiting: Set<String> = []
    /// Lingering channels in deadline order (the linger is constant, so append keeps the order).
    private var lingerQueue: [(channel: String, until: NIODeadline)] = []
    private var lingerHead = 0
    /// Keys to bind again after a reconnection.
    private var rebinding: [String] = []
    private var rebindingHead = 0
    /// Channels on buckets, to refine to exact keys when there is no pressure.
    private var refining: [String] = []
    private var refiningHead = 0
    /// Keys no channel holds any more, to unbind (see `finishRetire`).
    private var candidates: Set<String> = []
    private var effects = Effects()
    /// Pressure lasts until then (see `Settings.calm`).
    private var pressureUntil = NIODeadline.uptimeNanoseconds(0)
    /// The granularity new bucket binds take in the current spell of pressure (and the spells
    /// just before it), and how many were made at it.
    private var spellLevel = BindingGranularity.buckets4096
    private var spellBinds = 0

    init(_ settings: Settings) {
        self.settings = settings
    }

    /// Channels this node holds (with local clients or lingering).
    var channelCount: Int { self.channels.count }
    /// Channels queued for refinement (some may have left or been refined since).
    var refinementsQueued: Int { self.refining.count - self.refiningHead }
    /// Binding keys still to bind again after a reconnection (0 once all are back).
    var rebindsLeft: Int { self.rebinding.count - self.rebindingHead + self.topology.rebindsInFlight }
    /// True while binds back up: a bind sent now would wait longer than the budget, or did
    /// within the last `calm`. Notes the wait (so it is `mutating`).
    mutating func underPressure(now: NIODeadline) -> Bool {
        let wait = self.topology.expectedWait
        if wait > self.settings.budget {
            // A new spell, long enough after the last that its buckets have drained: it starts
            // again from the finest buckets. A spell soon after the last (steady churn above what
            // the broker binds) goes on at the coarseness the last one reached.
            if now >= self.pressureUntil + self.settings.linger { (self.spellLevel, self.spellBinds) = (.buckets4096, 0) }
            self.pressureUntil = now + self.settings.calm
        }
        return now < self.pressureUntil
    }

    /// True when `channel` has local clients (not only lingering): its deliveries are wanted.
    func hasLocalClients(_ channel: String) -> Bool {
        guard let entry = self.channels[channel] else { return false }
        return entry.lingerUntil == nil
    }

    /// The routing key of a channel this node holds, without hashing it again.
    func routingKey(_ channel: String) -> String? { self.channels[channel]?.keys.routingKey }

    /// Takes what the link must do now.
    mutating func takeEffects() -> Effects {
        defer { self.effects = Effects() }
        return self.effects
    }

    // MARK: - Joins and leaves

    /// A channel got its first local client (`waiter` nil: the join proceeded already).
    mutating func join(_ keys: ChannelKeys, _ waiter: Waiter?, now: NIODeadline) {
        let name = keys.channel
        if self.channels[name] == nil {
            let cover = self.chooseCover(keys, now: now)
            self.channels[name] = Channel(keys: keys, cover: cover)
            self.hold(keys.key(cover), of: name, now: now)
            if cover != .exact, self.settings.mode == .adaptive { self.queueRefinement(name) }
        } else {
            self.channels[name]!.lingerUntil = nil
        }
        if let waiter { self.wait(name, waiter) }
    }

    /// Another client joined a channel with local clients: it proceeds once the channel is covered.
    mutating func awaitBinding(_ channel: String, _ waiter: Waiter) {
        guard self.channels[channel] != nil else {
            self.effects.ready.append(waiter)  // not held here (cannot happen: its join came first)
            return
        }
        self.wait(channel, waiter)
    }

    /// A channel's last local client left: it keeps its key for the linger.
    mutating func leave(_ channel: String, now: NIODeadline) {
        guard self.channels[channel] != nil else { return }
        let until = now + self.settings.linger
        self.channels[channel]!.lingerUntil = until
        self.lingerQueue.append((channel, until))
    }

    private mutating func wait(_ channel: String, _ waiter: Waiter) {
        if self.isCovered(channel) {
            self.effects.ready.append(waiter)
        } else {
            self.channels[channel]!.waiters.append(waiter)
            self.waiting.insert(channel)
        }
    }

    /// While down everything is covered (local service); otherwise a settled key must cover it.
    private func isCovered(_ channel: String) -> Bool {
        guard self.topology.isUp else { return true }
        guard let entry = self.channels[channel] else { return false }
        return entry.keys.all.contains { self.topology.isSettled($0) }
    }

    /// The granularity a new channel holds.
    private mutating func chooseCover(_ keys: ChannelKeys, now: NIODeadline) -> BindingGranularity {
        if let fixed = self.settings.mode.fixedGranularity { return fixed }
        guard self.topology.isUp, self.underPressure(now: now), !self.topology.isHeld(keys.routingKey) else { return .exact }
        // Binds back up: a bucket already bound (the join proceeds at once), else one being
        // bound (it waits for that), finest first, costs no bind.
        let buckets = BindingGranularity.allCases.dropFirst()
        for g in buckets where self.topology.isSettled(keys.key(g)) { return g }
        for g in buckets where self.topology.isHeld(keys.key(g)) { return g }
        // A new bucket: coarser once a few at this granularity did not stop the binds backing up
        // (a bucket of 4096 is rarely shared by throw-away channels: one per channel would keep
        // the broker as busy as exact keys).
        if self.spellBinds >= self.settings.escalateAfter, self.spellLevel != .buckets16,
            self.topology.expectedWait > self.settings.budget
        {
            self.spellLevel = self.spellLevel == .buckets4096 ? .buckets256 : .buckets16
            self.spellBinds = 0
        }
        self.spellBinds += 1
        return self.spellLevel
    }

    // MARK: - Holding keys

    private mutating func hold(_ key: String, of channel: String, now: NIODeadline) {
        var holding = self.holdings[key] ?? Holding()
        holding.count += 1
        if key == self.channels[channel]?.keys.routingKey { holding.channel = channel }
        self.holdings[key] = holding
        if let request = self.topology.bind(key, now: now) { self.effects.requests.append(request) }
    }

    private mutating func release(_ key: String) {
        guard var holding = self.holdings[key] else { return }
        holding.count -= 1
        if holding.count > 0 {
            self.holdings[key] = holding
        } else {
            self.holdings[key] = nil
            self.candidates.insert(key)
        }
    }

    /// Keys no channel holds any more: the link unmarks them in the handoff, in the same lock as
    /// it takes the commands queued so far, then calls `finishRetire` once it handled those.
    mutating func retireCandidates() -> Set<String> {
        defer { self.candidates = [] }
        return self.candidates
    }

    /// Unbinds the retired keys that still no channel holds; a key held again (a join came
    /// meanwhile) is marked bound again when it is settled.
    mutating func finishRetire(_ keys: Set<String>, now: NIODeadline) {
        for key in keys {
            if self.holdings[key] != nil {
                if self.topology.isSettled(key) { self.effects.markBound.append(key) }
            } else if let request = self.topology.unbind(key, now: now) {
                self.effects.requests.append(request)
            }
        }
    }

    // MARK: - Time

    /// Ends lingers, then sends the next rebinds (after a reconnection) or refinements.
    mutating func tick(now: NIODeadline) {
        while self.lingerHead < self.lingerQueue.count, self.lingerQueue[self.lingerHead].until <= now {
            let (name, until) = self.lingerQueue[self.lingerHead]
            self.lingerHead += 1
            // Rejoined since, or lingering again with a later deadline: not yet.
            guard let entry = self.channels[name], entry.lingerUntil == until else { continue }
            self.remove(name)
        }
        if self.lingerHead > 1024, self.lingerHead * 2 > self.lingerQueue.count {
            self.lingerQueue.removeFirst(self.lingerHead)
            self.lingerHead = 0
        }
        guard self.topology.isUp else { return }
        self.nextRebinds(now: now)
        // Only joins note pressure: refinement's own binds are bounded by its window, and a
        // broker slower than the budget per bind must not keep the node on buckets for good.
        if self.settings.mode == .adaptive, self.rebindsLeft == 0, now >= self.pressureUntil { self.nextRefinements(now: now) }
    }

    private mutating func remove(_ name: String) {
        guard let entry = self.channels.removeValue(forKey: name) else { return }
        self.release(entry.keys.key(entry.cover))
        if entry.refining { self.release(entry.keys.routingKey) }
        if !entry.waiters.isEmpty {
            self.effects.ready.append(contentsOf: entry.waiters)
            self.waiting.remove(name)
        }
    }

    private mutating func nextRebinds(now: NIODeadline) {
        while self.topology.rebindsInFlight < self.settings.rebindWindow, self.rebindingHead < self.rebinding.count {
            let key = self.rebinding[self.rebindingHead]
            self.rebindingHead += 1
            // Released since, or a join bound it already.
            guard self.holdings[key] != nil, let request = self.topology.bind(key, now: now, rebind: true) else { continue }
            self.effects.requests.append(request)
        }
        if self.rebindingHead == self.rebinding.count, !self.rebinding.isEmpty {
            self.rebinding = []
            self.rebindingHead = 0
        }
    }

    /// Queues a channel on a bucket for refinement. While pressure lasts nothing is refined, and
    /// throw-away channels come and go: past twice the channels held, the queue keeps only the
    /// channels still on a bucket, so it stays bounded by what the node holds.
    private mutating func queueRefinement(_ name: String) {
        self.refining.append(name)
        let queued = self.refining.count - self.refiningHead
        guard queued > 2 * self.channels.count + 1024 else { return }
        self.refining = self.refining[self.refiningHead...].filter { self.channels[$0].map { $0.cover != .exact && !$0.refining } ?? false }
        self.refiningHead = 0
    }

    /// Binds exact keys for channels on buckets, a few at a time and only while no join would
    /// wait for them (at most half the budget of requests in flight).
    private mutating func nextRefinements(now: NIODeadline) {
        let service = max(1, self.topology.serviceTime.nanoseconds)
        let window = max(1, Int(self.settings.budget.nanoseconds / service / 2))
        while self.refiningHead < self.refining.count, self.topology.requestsInFlight < window {
            let name = self.refining[self.refiningHead]
            self.refiningHead += 1
            guard let entry = self.channels[name], entry.lingerUntil == nil, entry.cover != .exact, !entry.refining else { continue }
            self.channels[name]!.refining = true
            self.hold(entry.keys.routingKey, of: name, now: now)
            if self.topology.isSettled(entry.keys.routingKey) { self.refined(name) }
        }
        if self.refiningHead == self.refining.count, !self.refining.isEmpty {
            self.refining = []
            self.refiningHead = 0
        }
    }

    /// A channel's exact key is settled: it becomes its cover, and the bucket is released.
    private mutating func refined(_ name: String) {
        guard let entry = self.channels[name], entry.refining else { return }
        self.channels[name]!.refining = false
        self.channels[name]!.cover = .exact
        self.release(entry.keys.key(entry.cover))
    }

    // MARK: - The broker

    /// The broker answered the oldest bind or unbind.
    mutating func answered(_ operation: TopologyMethod, now: NIODeadline) throws(Topology.OutOfOrder) -> Topology.Answer {
        let answer = try self.topology.answered(operation, now: now)
        guard answer.settled else { return answer }
        let key = answer.key
        if self.holdings[key] != nil { self.effects.markBound.append(key) }
        if let channel = self.holdings[key]?.channel {
            self.refined(channel)
            self.release(waitersOf: channel)
        } else if answer.granularity != .exact, !self.waiting.isEmpty {
            for channel in self.waiting where self.channels[channel]?.keys.all.contains(key) == true {
                self.release(waitersOf: channel)
            }
        }
        return answer
    }

    private mutating func release(waitersOf channel: String) {
        guard self.waiting.remove(channel) != nil, let waiters = self.channels[channel]?.waiters else { return }
        self.channels[channel]!.waiters = []
        self.effects.ready.append(contentsOf: waiters)
    }

    /// A new connection is up: nothing is bound on it. Adaptive: every channel is covered with
    /// the finest granularity that needs at most `maxCoverKeys` binds, then refined. Fixed:
    /// every held key is bound again. Joins go before the rebinds.
    mutating func connected(now: NIODeadline) {
        self.topology.connected()
        if self.settings.mode == .adaptive {
            var level = BindingGranularity.buckets16
            for g in BindingGranularity.allCases {
                var keys = Set<String>()
                for entry in self.channels.values {
                    keys.insert(entry.keys.key(g))
                    if keys.count > self.settings.maxCoverKeys { break }
                }
                if keys.count <= self.settings.maxCoverKeys {
                    level = g
                    break
                }
            }
            self.holdings = [:]
            for (name, entry) in self.channels {
                self.channels[name]!.cover = level
                self.channels[name]!.refining = false
                var holding = self.holdings[entry.keys.key(level)] ?? Holding()
                holding.count += 1
                if level == .exact { holding.channel = name }
                self.holdings[entry.keys.key(level)] = holding
            }
            self.refining = level == .exact ? [] : Array(self.channels.keys)
            self.refiningHead = 0
        }
        self.candidates = []
        self.rebinding = Array(self.holdings.keys)
        self.rebindingHead = 0
        self.nextRebinds(now: now)
    }

    /// The connection is gone: nothing is bound or in flight. Every waiting join proceeds
    /// (local service; bound on reconnection) or, when the link stops, fails.
    mutating func disconnected() {
        self.topology.disconnected()
        for name in self.waiting {
            self.effects.ready.append(contentsOf: self.channels[name]?.waiters ?? [])
            self.channels[name]?.waiters = []
        }
        self.waiting = []
        for (name, entry) in self.channels where entry.refining {
            self.channels[name]!.refining = false
            self.release(entry.keys.routingKey)
        }
        self.candidates = []
        self.rebinding = []
        self.rebindingHead = 0
        self.refining = []
        self.refiningHead = 0
    }
}
