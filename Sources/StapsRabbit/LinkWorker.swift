import CRabbit
import Logging
import NIOCore
import RabbitClient
import StapsCluster

#if canImport(Glibc)
import Glibc
#endif

/// The link's owner thread: the poll loop and the reconnect loop. Everything here is touched
/// only by that one thread; the event loops reach it through the `LoopHandoff`.
///
/// Each round it polls the handoff's eventfd and both sockets (waking at least every 100 ms, so
/// rabbitmq-c can send heartbeats), then sends what the event loops asked for: pipelined
/// binds and unbinds (`Topology`), publishes (paced by `amqp_publish_window`, never more than
/// the socket can take at once), and reads deliveries and the broker's answers.
///
/// A broker that goes silent is noticed by the link itself: no byte for two of its heartbeats
/// (it sends one every `heartbeat/2` when idle), or requests outstanding (binds, publishes to
/// confirm) with no answer for `answerTimeout`. Either drops the connections and reconnects.
// @unchecked: created on start() and from then on used only by the link's one thread.
final class LinkWorker: @unchecked Sendable {
    let link: RabbitLink
    let receiver: any ClusterReceiver
    let config: RabbitConfiguration
    let settings: ClusterSettings
    var logger: Logger
    let handoff: LoopHandoff
    let counters: RabbitCounters

    var publisher: AMQPConnection?
    var consumer: AMQPConnection?
    var queue: CString?
    let exchange: CString
    let nodeID: CString
    /// Which binding key covers each channel this node holds, and their binds and unbinds on
    /// the way to the broker.
    var bindings: BindingPipeline
    /// `LoopHandoff.joins` as of the commands handled so far.
    var joinsSeen = 0
    var confirms = Confirms()
    /// Where each other node's stream stands, per channel with local clients: kept across
    /// reconnections, so what was lost meanwhile is counted at the stream's next message.
    var gaps = StreamGaps()
    /// How much may be written and not confirmed yet (see `PublishWindow`).
    var window = PublishWindow()

    /// The broker URL in use (index into `config.urls`); starts at a random one.
    var brokerIndex: Int
    var broker: AMQPURL { self.config.urls[self.brokerIndex] }

    // Reconnection.
    var nextAttempt = NIODeadline.now()
    var backoff: TimeAmount = .milliseconds(100)
    var downSince: NIODeadline? = NIODeadline.now()
    var warnedThisOutage = false
    var droppedAtOutageStart = 0
    var connectedAt = NIODeadline.now()
    var rebindReported = true

    // Liveness of the current connections.
    var lastHeardPublisher = NIODeadline.now()
    var lastHeardConsumer = NIODeadline.now()
    var lastHeartbeatToConsumer = NIODeadline.now()
    var confirmProgress = NIODeadline.now()
    /// Set while the broker has blocked publishing (memory or disk alarm).
    var blockedReason: String?

    var nextHousekeeping = NIODeadline.now()
    var nextDropReport = NIODeadline.now()
    var reportedBufferDrops = 0
    var reportedExpired = 0
    var reportedMalformed = 0
    /// When the next publish may go out (see `ClusterSettings.publishWindow`).
    var nextPublish = NIODeadline.now()
    var body: [UInt8] = []
    /// The `message_id` of the AMQP message being written (empty: unnumbered).
    var messageID: [UInt8] = []
    var batch = PublishBatch(frameMax: 131_072)
    let allocator = ByteBufferAllocator()

    /// Stop reading from the broker while the event loops hold this much undelivered.
    let receiverBacklogLimit = 64 << 20
    /// Pause publishing while this many AMQP messages await their confirms.
    let maxUnconfirmed = 65_536
    /// Requests outstanding and not one answer for this long: the broker is not answering.
    var answerTimeout: TimeAmount { min(.seconds(2), self.settings.heartbeat) }
    /// Publish only while less than this is written and not acknowledged by the broker's TCP,
    /// at most `maxPublishBytes` at a time: a broker that stops reading (frozen, or blocked
    /// before it says so) stops the publishing, not the link's thread.
    let maxUnackedBytes = 1 << 20
    let maxPublishBytes = 1 << 20

    init(link: RabbitLink, receiver: any ClusterReceiver) {
        self.link = link
        self.receiver = receiver
        self.config = link.configuration
        self.settings = link.configuration.settings
        self.logger = link.logger
        self.handoff = link.handoff
        self.counters = link.counters
        self.exchange = CString(link.configuration.settings.exchange)
        self.nodeID = CString(link.configuration.nodeID)
        self.bindings = BindingPipeline(.init(mode: link.configuration.settings.binding, linger: link.configuration.settings.unbindLinger))
        self.brokerIndex = Int.random(in: 0..<link.configuration.urls.count)
        self.logger[metadataKey: "broker"] = "\(self.broker)"
    }

    func run() {
        while !self.link.stopped.load(ordering: .relaxed) {
            if self.consumer == nil {
                if NIODeadline.now() >= self.nextAttempt { self.connect() }
                if self.consumer == nil {
                    self.whileDown()
                    continue
                }
            }
            do {
                try self.step()
            } catch {
                self.lost(error)
            }
        }
        self.finish()
    }

    /// While down: joins proceed at once (local service, bound on reconnection), publishes are
    /// dropped and counted.
    private func whileDown() {
        self.counters.droppedWhileDown.wrappingIncrement(by: self.handoff.dropPublishes(), ordering: .relaxed)
        let retiring = self.bindings.retireCandidates()
        self.updateBindings(self.take(publishBytes: 0, unmark: retiring), unmarked: retiring, now: .now())
        self.sleepUntilWoken(timeoutMillis: Self.millisUntil(self.nextAttempt, cap: 100))
    }

    /// What the event loops handed over (`LoopHandoff.take`), counting the publishes it
    /// dropped for their age.
    func take(publishBytes: Int, overhead: Int = 0, oversizeFirst: Bool = true, unmark: Set<String> = []) -> LoopHandoff.Taken {
        let taken = self.handoff.take(publishBytes: publishBytes, overhead: overhead, oversizeFirst: oversizeFirst, unmark: unmark)
        self.counters.droppedExpired.wrappingIncrement(by: taken.expired, ordering: .relaxed)
        return taken
    }

    static func millisUntil(_ deadline: NIODeadline, cap: Int) -> Int {
        let ms = (deadline - NIODeadline.now()).nanoseconds / 1_000_000
        return max(0, min(cap, Int(ms)))
    }

    /// One round while connected: wait for work or input, then do all of it.
    private func step() throws(BrokerError) {
        guard let consumer = self.consumer, let publisher = self.publisher else { return }
        let reading = self.receiver.clusterBacklogBytes < self.receiverBacklogLimit && !self.link.holdingConsumer.load(ordering: .relaxed)
        let mayPublish = self.blockedReason == nil && self.confirms.outstanding < self.maxUnconfirmed
        var publishDue = mayPublish && NIODeadline.now() >= self.nextPublish
        var waitForRoom = false
        var budget = 0
        if publishDue {
            budget = self.publishBudget(publisher)
            if budget == 0 {
                publishDue = false
                waitForRoom = true
            }
        }
        try self.waitForWork(consumer, publisher, reading: reading, mayPublish: mayPublish, publishDue: publishDue, waitForRoom: waitForRoom)
        let now = NIODeadline.now()
        let tls = self.broker.tls
        let retiring = self.bindings.retireCandidates()
        let taken = self.take(publishBytes: publishDue ? budget : 0, overhead: tls ? Self.wireOverhead : 0,
                              oversizeFirst: !tls || publisher.unackedBytes == 0, unmark: retiring)
        do {
            self.updateBindings(taken, unmarked: retiring, now: now)
            try self.flushBindings(consumer)
        } catch {
            // Taken, never published: not lost without a count.
            self.counters.droppedWhileDown.wrappingIncrement(by: taken.publishes.count, ordering: .relaxed)
            throw error
        }
        if !taken.publishes.isEmpty {
            self.nextPublish = now + self.settings.publishWindow
            try self.publish(taken.publishes, on: publisher)
        }
        if reading {
            try self.consume(consumer)
        } else if now - self.lastHeartbeatToConsumer > .nanoseconds(self.settings.heartbeat.nanoseconds / 2), consumer.canWrite {
            // Not reading: rabbitmq-c sends no heartbeats for us, so the broker would drop us.
            try consumer.sendHeartbeat()
            self.lastHeartbeatToConsumer = now
            self.lastHeardConsumer = now  // its silence can't be judged while we don't read
        }
        if now >= self.nextHousekeeping {
            self.nextHousekeeping = now + .milliseconds(100)
            self.window.update(settledBytes: self.confirms.settledBytes, fastestRoundTrip: self.confirms.fastestRoundTrip, now: now)
            self.reportDrops(now: now)
            self.reportRebind(now: now)
            self.counters.update(from: self.bindings)
            // Lets rabbitmq-c send heartbeats on the quiet publish connection and notice a close.
            // Bytes waiting count as heard: rabbitmq-c swallows the broker's heartbeats.
            if publisher.hasInput { self.lastHeardPublisher = now }
            try self.readPublisher(publisher)
            try self.checkLiveness(now: now, reading: reading)
        }
    }

    /// Sleeps in poll until the handoff, a socket or a deadline has something, unless input is
    /// already buffered; reads the publish connection when it speaks.
    private func waitForWork(_ consumer: AMQPConnection, _ publisher: AMQPConnection, reading: Bool, mayPublish: Bool, publishDue: Bool, waitForRoom: Bool) throws(BrokerError) {
        if !(reading && consumer.hasBufferedInput) && !publisher.hasBufferedInput {
            // The publish connection carries confirms, heartbeats and rare notices: read every
            // 100 ms (housekeeping), not woken for each ack, which measured here cost the event
            // loops latency on two cores; woken only when many publishes await their confirms
            // (over half the window).
            let urgentAcks = self.confirms.outstanding > self.maxUnconfirmed / 2 || self.confirms.outstandingBytes > self.window.limit / 2
            var fds = [
                pollfd(fd: self.handoff.wakeFD, events: Int16(POLLIN), revents: 0),
                pollfd(fd: consumer.fileDescriptor, events: reading ? Int16(POLLIN) : 0, revents: 0),
                pollfd(fd: publisher.fileDescriptor, events: urgentAcks ? Int16(POLLIN) : 0, revents: 0),
            ]
            var timeout = reading ? Self.millisUntil(self.nextHousekeeping, cap: 100) + 1 : 5
            // Waiting for the broker to take what was written, or for the publish window.
            if mayPublish && !publishDue { timeout = min(timeout, waitForRoom ? 5 : Self.millisUntil(self.nextPublish, cap: 5) + 1) }
            self.handoff.sleeping.store(true, ordering: .sequentiallyConsistent)
            if self.handoff.hasWork(publishes: publishDue) {
                self.handoff.sleeping.store(false, ordering: .sequentiallyConsistent)
            } else {
                _ = poll(&fds, 3, Int32(timeout))
                self.handoff.sleeping.store(false, ordering: .sequentiallyConsistent)
                let now = NIODeadline.now()
                if fds[0].revents != 0 { self.handoff.drainWakeFD() }
                if fds[1].revents & Int16(POLLIN) != 0 { self.lastHeardConsumer = now }
                if fds[2].revents & Int16(POLLIN) != 0 {
                    self.lastHeardPublisher = now
                    try self.readPublisher(publisher)
                }
            }
        } else if publisher.hasBufferedInput {
            try self.readPublisher(publisher)
        }
    }

    /// What the wire adds to a message's payload and channel name at most (routing key, properties, frames).
    static let wireOverhead = 512

    /// Payload bytes this round may publish; 0 while the broker is not taking what was written.
    /// At most what the window leaves (`PublishWindow`: the broker confirms what was written
    /// within about 100 ms, so that messages wait here, where `amqp_max_age` bounds them).
    /// Plain TCP: up to `maxPublishBytes` while less than `maxUnackedBytes` is unacknowledged
    /// (a raw write waits at most `answerTimeout` for the rest). TLS: half of what the fixed
    /// send buffer can still take, since rabbitmq-c would wait for the rest without a deadline.
    func publishBudget(_ publisher: AMQPConnection) -> Int {
        let window = self.window.limit - self.confirms.outstandingBytes
        guard window > 0 else { return 0 }
        if self.broker.tls {
            let room = publisher.sendRoom / 2
            return room >= 16 << 10 ? min(room, self.maxPublishBytes, window) : 0
        }
        return publisher.unackedBytes < self.maxUnackedBytes ? min(self.maxPublishBytes, window) : 0
    }

    func readPublisher(_ publisher: AMQPConnection) throws(BrokerError) {
        amqp_maybe_release_buffers(publisher.state)
        if try publisher.readEvents("publish connection", { event throws(BrokerError) in try self.handle(event) }) > 0 {
            self.lastHeardPublisher = .now()
        }
    }

    /// A broker that stopped answering is as good as gone, even if its sockets are open.
    private func checkLiveness(now: NIODeadline, reading: Bool) throws(BrokerError) {
        let heartbeat = self.settings.heartbeat
        let silentPublisher = now - self.lastHeardPublisher
        let silentConsumer = reading ? now - self.lastHeardConsumer : .zero
        let silent = max(silentPublisher, silentConsumer)
        if silent > heartbeat {
            throw BrokerError(operation: "heartbeat", reason: "no data from the broker for \(Self.seconds(silent)) s (two heartbeats)")
        }
        if self.bindings.inFlight > 0, reading, now - self.bindings.lastProgress > self.answerTimeout, silentConsumer > self.answerTimeout {
            throw BrokerError(operation: "bind binding keys", reason: "the broker answered none of \(self.bindings.inFlight) binds for \(Self.seconds(now - self.bindings.lastProgress)) s")
        }
        if self.confirms.outstanding > 0, self.blockedReason == nil, now - self.confirmProgress > self.answerTimeout, silentPublisher > self.answerTimeout {
            throw BrokerError(operation: "publish", reason: "the broker confirmed none of \(self.confirms.outstanding) publishes for \(Self.seconds(now - self.confirmProgress)) s")
        }
    }

    static func seconds(_ t: TimeAmount) -> String { String(Double(t.nanoseconds / 100_000_000) / 10) }

    /// Something the broker told the publish connection.
    private func handle(_ event: BrokerEvent) throws(BrokerError) {
        switch event {
        case .ack(let tag, let multiple):
            self.counters.published.wrappingIncrement(by: self.confirms.settle(tag: tag, multiple: multiple, at: .now()), ordering: .relaxed)
            self.confirmProgress = .now()
        case .nack(let tag, let multiple):
            self.counters.rejected.wrappingIncrement(by: self.confirms.settle(tag: tag, multiple: multiple, at: .now()), ordering: .relaxed)
            self.confirmProgress = .now()
        case .blocked(let reason):
            self.blockedReason = reason
            self.logger.warning("broker blocked publishing (resource alarm); buffering up to amqp_buffer, then dropping", metadata: ["reason": "\(reason)"])
        case .unblocked:
            self.blockedReason = nil
            self.confirmProgress = .now()
            self.logger.notice("broker unblocked publishing")
        case .consumerCancelled:
            throw BrokerError(operation: "consume", reason: "the broker cancelled this node's consumer (its queue was deleted?)")
        case .bindOK, .unbindOK:
            throw BrokerError(operation: "publish connection", reason: "unexpected \(event)")
        }
    }

    private func sleepUntilWoken(timeoutMillis: Int) {
        var fds = [pollfd(fd: self.handoff.wakeFD, events: Int16(POLLIN), revents: 0)]
        self.handoff.sleeping.store(true, ordering: .sequentiallyConsistent)
        if !self.handoff.hasWork(publishes: true), poll(&fds, 1, Int32(timeoutMillis)) > 0 { self.handoff.drainWakeFD() }
        self.handoff.sleeping.store(false, ordering: .sequentiallyConsistent)
    }

    /// Messages dropped because the outbound buffer was full or they waited too long, or
    /// malformed bodies: one warning per 10 s at most.
    private func reportDrops(now: NIODeadline) {
        guard now >= self.nextDropReport else { return }
        let dropped = self.counters.droppedBufferFull.load(ordering: .relaxed)
        let expired = self.counters.droppedExpired.load(ordering: .relaxed)
        let malformed = self.counters.malformed.load(ordering: .relaxed)
        if dropped > self.reportedBufferDrops || expired > self.reportedExpired {
            self.logger.warning("broker slower than the clients: dropped messages for other nodes", metadata: [
                "dropped.buffer_full": "\(dropped - self.reportedBufferDrops)", "amqp_buffer": "\(self.settings.publishBuffer)",
                "dropped.expired": "\(expired - self.reportedExpired)", "amqp_max_age": "\(Self.seconds(self.settings.maxAge))s",
            ])
            (self.reportedBufferDrops, self.reportedExpired) = (dropped, expired)
            self.nextDropReport = now + .seconds(10)
        }
        if malformed > self.reportedMalformed {
            self.logger.warning("ignored malformed messages from the exchange (not from a staps node?)", metadata: ["count": "\(malformed - self.reportedMalformed)"])
            self.reportedMalformed = malformed
            self.nextDropReport = now + .seconds(10)
        }
    }
}
