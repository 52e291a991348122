import CRabbit
import Logging
import NIOCore
import RabbitClient
import StapsCluster

#if canImport(Glibc)
import Glibc
#endif

/// The link's connection life cycle: connecting (declare, confirm mode, consume, then rebinding
/// in the background), losing the broker (count what did not reach it, let waiting joins
/// proceed, back off, move to the next broker URL), and stopping.
extension LinkWorker {
    func connect() {
        self.logger[metadataKey: "broker"] = "\(self.broker)"
        do {
            let heartbeat = Int32(max(1, self.settings.heartbeat.nanoseconds / 1_000_000_000))
            let publisher = try AMQPConnection(url: self.broker, heartbeatSeconds: heartbeat, connectTimeout: 5, caFile: self.settings.tlsCAFile)
            self.publisher = publisher
            self.batch = PublishBatch(frameMax: Int(amqp_get_frame_max(publisher.state)))
            try self.declareExchange(publisher)
            amqp_confirm_select(publisher.state, 1)
            try publisher.check(amqp_get_rpc_reply(publisher.state), "select publisher confirms")

            let consumer = try AMQPConnection(url: self.broker, heartbeatSeconds: heartbeat, connectTimeout: 5, caFile: self.settings.tlsCAFile)
            self.consumer = consumer
            try self.declareQueue(consumer)
            try consumer.openChannel(Self.topologyChannel)
            try self.consumeQueue(consumer)
        } catch {
            self.failedAttempt(error)
            return
        }
        let now = NIODeadline.now()
        // From here a join waits for a bound key (under the handoff's lock: none can take the
        // "broker down, proceed" path once the bindings count as up).
        self.handoff.linkUp()
        self.link.afterLinkUp?()
        self.apply(self.bindings.connected(now: now))
        (self.lastHeardPublisher, self.lastHeardConsumer, self.lastHeartbeatToConsumer) = (now, now, now)
        self.confirmProgress = now
        self.window = PublishWindow()
        self.blockedReason = nil
        self.counters.update(from: self.bindings)
        self.connectedAt = now
        self.rebindReported = false
        let status = (self.broker, self.queueName)
        self.link.status.withLockedValue { $0 = status }
        self.link.connectedFlag.store(true, ordering: .relaxed)
        self.backoff = .milliseconds(100)
        let dropped = self.counters.droppedWhileDown.load(ordering: .relaxed) - self.droppedAtOutageStart
        if self.warnedThisOutage, let since = self.downSince {
            self.logger.warning("broker link restored; publishing again, binding every binding key again", metadata: [
                "down.seconds": "\(Self.seconds(now - since))", "dropped.while_down": "\(dropped)", "bindings.to_rebind": "\(self.bindings.rebindsLeft)",
            ])
            self.counters.reconnects.wrappingIncrement(ordering: .relaxed)
        } else {
            self.logger.notice("broker link up", metadata: ["queue": "\(self.queueName)", "exchange": "\(self.settings.exchange)"])
        }
        self.downSince = nil
        self.warnedThisOutage = false
    }

    /// Once every wanted binding key is bound again after a reconnection: one line, with how long it took.
    func reportRebind(now: NIODeadline) {
        guard !self.rebindReported, self.bindings.rebindsLeft == 0 else { return }
        self.rebindReported = true
        guard self.counters.reconnects.load(ordering: .relaxed) > 0 else { return }
        self.logger.notice("binding keys bound again", metadata: [
            "bindings": "\(self.bindings.boundCount)", "seconds.since.link.up": "\(Double((now - self.connectedAt).nanoseconds / 1_000_000) / 1000)",
        ])
    }

    func failedAttempt(_ error: BrokerError) {
        self.disconnect(polite: false)
        self.scheduleRetry()
        if !self.warnedThisOutage {
            self.warnedThisOutage = true
            self.droppedAtOutageStart = self.counters.droppedWhileDown.load(ordering: .relaxed)
            self.logger.warning("broker unreachable; serving local clients only and retrying", metadata: ["error": "\(error)"])
        } else {
            self.logger.debug("broker still unreachable", metadata: ["error": "\(error)", "retry.in.ms": "\(self.backoff.nanoseconds / 1_000_000)"])
        }
        self.nextBroker()
    }

    /// Several broker URLs: try the next one.
    func nextBroker() {
        guard self.config.urls.count > 1 else { return }
        self.brokerIndex = (self.brokerIndex + 1) % self.config.urls.count
        self.logger[metadataKey: "broker"] = "\(self.broker)"
    }

    /// Jittered exponential backoff, capped at 1 s so a returning broker is used within 2 s.
    func scheduleRetry() {
        let jittered = Int64(Double(self.backoff.nanoseconds) * Double.random(in: 0.5...1.0))
        self.nextAttempt = NIODeadline.now() + .nanoseconds(jittered)
        self.backoff = min(self.backoff * 2, .seconds(1))
    }

    func lost(_ error: BrokerError) {
        self.downSince = NIODeadline.now()
        self.droppedAtOutageStart = self.counters.droppedWhileDown.load(ordering: .relaxed)
        self.warnedThisOutage = true
        self.logger.warning("broker link lost; serving local clients only and reconnecting", metadata: ["error": "\(error)"])
        self.disconnect(polite: false)
        self.backoff = .milliseconds(50)
        self.scheduleRetry()
        self.nextBroker()
    }

    /// Drops both connections. After a failure rabbitmq-c's state may be broken, so only a
    /// clean shutdown closes politely; otherwise the connections are just destroyed. Joins
    /// waiting for a bind proceed (local service; bound on reconnection); what waited for the
    /// broker, or was written but never confirmed, is counted as dropped.
    func disconnect(polite: Bool) {
        self.link.connectedFlag.store(false, ordering: .relaxed)
        self.link.status.withLockedValue { $0 = nil }
        if polite {
            self.publisher?.close()
            self.consumer?.close()
        }
        self.publisher = nil
        self.consumer = nil
        self.handoff.linkDown()
        self.apply(self.bindings.disconnected())
        self.counters.update(from: self.bindings)
        let lost = self.confirms.reset() + self.handoff.dropPublishes()
        self.counters.droppedWhileDown.wrappingIncrement(by: lost, ordering: .relaxed)
    }

    /// The link stops: what the event loops handed over still goes out and the broker gets up
    /// to two seconds to confirm it; then close politely, fail every join still waiting, and
    /// close the handoff.
    func finish() {
        if let publisher = self.publisher, self.consumer != nil {
            let deadline = NIODeadline.now() + .seconds(2)
            do {
                let tls = self.broker.tls
                let rest = self.take(publishBytes: tls ? self.publishBudget(publisher) : .max, overhead: tls ? Self.wireOverhead : 0, oversizeFirst: !tls)
                Self.failAll(LoopHandoff.Taken(commands: rest.commands), counters: self.counters)
                if self.blockedReason == nil {
                    try self.publish(rest.publishes, on: publisher)
                } else {
                    self.counters.droppedWhileDown.wrappingIncrement(by: rest.publishes.count, ordering: .relaxed)
                }
                while self.confirms.outstanding > 0, self.blockedReason == nil, NIODeadline.now() < deadline {
                    var pfd = pollfd(fd: publisher.fileDescriptor, events: Int16(POLLIN), revents: 0)
                    if !publisher.hasBufferedInput { _ = poll(&pfd, 1, 10) }
                    try self.readPublisher(publisher)
                }
            } catch {
                self.logger.debug("broker error while stopping", metadata: ["error": "\(error)"])
            }
        }
        self.link.connectedFlag.store(false, ordering: .relaxed)
        self.link.status.withLockedValue { $0 = nil }
        self.publisher?.close()
        self.consumer?.close()
        self.publisher = nil
        self.consumer = nil
        self.handoff.linkDown()
        for waiter in self.bindings.disconnected().ready { waiter?.fail(LinkStopped()) }
        self.counters.droppedWhileDown.wrappingIncrement(by: self.confirms.reset(), ordering: .relaxed)
        Self.failAll(self.handoff.close(), counters: self.counters)
        let c = self.counters
        self.logger.notice("broker link totals", metadata: [
            "published": "\(c.published.load(ordering: .relaxed))", "received": "\(c.received.load(ordering: .relaxed))", "discarded": "\(c.discarded.load(ordering: .relaxed))",
            "missed": "\(c.missed.load(ordering: .relaxed))", "out_of_order": "\(c.outOfOrder.load(ordering: .relaxed))",
            "dropped.while_down": "\(c.droppedWhileDown.load(ordering: .relaxed))", "dropped.buffer_full": "\(c.droppedBufferFull.load(ordering: .relaxed))",
            "dropped.expired": "\(c.droppedExpired.load(ordering: .relaxed))",
            "rejected": "\(c.rejected.load(ordering: .relaxed))", "malformed": "\(c.malformed.load(ordering: .relaxed))",
            "reconnects": "\(c.reconnects.load(ordering: .relaxed))",
            "binds": "\(zip(BindingGranularity.allCases, c.bindsDone).map { "\($0)=\($1.load(ordering: .relaxed))" }.joined(separator: ","))",
        ])
    }

    /// What the handoff still held when the link stopped: joins fail, publishes count as dropped.
    static func failAll(_ taken: LoopHandoff.Taken, counters: RabbitCounters) {
        for command in taken.commands {
            switch command {
            case .firstChannel(_, let promise): promise?.fail(LinkStopped())
            case .awaitBinding(_, let promise): promise.fail(LinkStopped())
            case .lastChannelGone: break
            }
        }
        counters.droppedWhileDown.wrappingIncrement(by: taken.publishes.count, ordering: .relaxed)
        counters.droppedExpired.wrappingIncrement(by: taken.expired, ordering: .relaxed)
    }
}
