import CRabbit
import NIOCore
import RabbitClient
import StapsCluster

/// The topology: the exchange, this node's queue, and the pipelined binds and unbinds that the
/// `Topology` state machine asks for. Binds for an exclusive queue go on the connection that
/// declared it, on an AMQP channel of their own (`topologyChannel`), so their answers never
/// wait behind deliveries on channel 1.
extension LinkWorker {
    static let topologyChannel: amqp_channel_t = 2

    var queueName: String { self.queue.map { String(cString: $0.pointer) } ?? "" }

    func declareExchange(_ publisher: AMQPConnection) throws(BrokerError) {
        amqp_exchange_declare(publisher.state, 1, self.exchange.bytes, amqp_cstring_bytes("topic"), 0, 1, 0, 0, amqp_table_t(num_entries: 0, entries: nil))
        try publisher.check(amqp_get_rpc_reply(publisher.state), "declare topic exchange '\(self.settings.exchange)'")
    }

    /// A server-named, exclusive, auto-delete queue, bounded by `x-max-length` (drop-head) and `x-message-ttl`.
    func declareQueue(_ consumer: AMQPConnection) throws(BrokerError) {
        let maxLength = CString("x-max-length")
        let overflow = CString("x-overflow")
        let dropHead = CString("drop-head")
        let ttl = CString("x-message-ttl")
        var entries = [amqp_table_entry_t](repeating: amqp_table_entry_t(), count: 3)
        entries[0].key = maxLength.bytes
        entries[0].value.kind = UInt8(AMQP_FIELD_KIND_I64.rawValue)
        entries[0].value.value.i64 = Int64(self.settings.queueMaxLength)
        entries[1].key = overflow.bytes
        entries[1].value.kind = UInt8(AMQP_FIELD_KIND_UTF8.rawValue)
        entries[1].value.value.bytes = dropHead.bytes
        entries[2].key = ttl.bytes
        entries[2].value.kind = UInt8(AMQP_FIELD_KIND_I64.rawValue)
        entries[2].value.value.i64 = Int64(self.settings.queueMessageTTL.nanoseconds / 1_000_000)
        let ok = entries.withUnsafeMutableBufferPointer { buffer in
            withExtendedLifetime((maxLength, overflow, dropHead, ttl)) {
                amqp_queue_declare(consumer.state, 1, amqp_bytes_t(len: 0, bytes: nil), 0, 0, 1, 1, amqp_table_t(num_entries: 3, entries: buffer.baseAddress))
            }
        }
        try consumer.check(amqp_get_rpc_reply(consumer.state), "declare this node's queue")
        guard let ok else { throw BrokerError(operation: "declare this node's queue", reason: "no queue name in the reply") }
        self.queue = CString(AMQPConnection.string(ok.pointee.queue))
    }

    func consumeQueue(_ consumer: AMQPConnection) throws(BrokerError) {
        amqp_basic_consume(consumer.state, 1, self.queue!.bytes, amqp_bytes_t(len: 0, bytes: nil), 0, 1, 1, amqp_table_t(num_entries: 0, entries: nil))
        try consumer.check(amqp_get_rpc_reply(consumer.state), "consume queue")
    }

    /// The routing key of a channel's messages: computed once while the channel is held here
    /// (a POST to a channel without local clients hashes its name each time).
    func routingKey(_ channel: String) -> String {
        self.bindings.policy.routingKey(channel) ?? RoutingKey.forChannel(channel)
    }

    /// One round's binding work, with what `take` handed over (the retire candidates were
    /// unmarked in the same lock): the commands, then the unbinds of what is still unheld, then
    /// lingers and rebinds or refinements. Down, nothing is sent and joins proceed at once.
    func updateBindings(_ taken: LoopHandoff.Taken, unmarked: Set<String>, now: NIODeadline) {
        self.handle(taken, now: now)
        self.apply(self.bindings.finishRetire(unmarked, now: now))
        self.apply(self.bindings.tick(now: now))
    }

    /// Lets joins proceed and marks keys bound in the handoff.
    func apply(_ effects: BindingPipeline.Effects) {
        self.handoff.markBound(effects.markBound)
        for waiter in effects.ready { waiter?.succeed(()) }
    }

    /// True when `channel` has local clients. A channel not known here may have a join on its
    /// way in the handoff: only then (its join counter moved) are its commands taken early.
    func hasLocalClients(_ channel: String) -> Bool {
        if self.bindings.policy.hasLocalClients(channel) { return true }
        guard self.handoff.joins.load(ordering: .acquiring) != self.joinsSeen else { return false }
        self.handle(self.handoff.takeCommands(), now: .now())
        return self.bindings.policy.hasLocalClients(channel)
    }

    /// The joins and leaves the event loops handed over: to the bindings; a channel's last
    /// client gone also forgets where its senders' streams stood.
    private func handle(_ taken: LoopHandoff.Taken, now: NIODeadline) {
        self.joinsSeen = taken.joins
        for case .lastChannelGone(let channel) in taken.commands { self.gaps.forget(channel) }
        self.apply(self.bindings.handle(taken.commands, now: now))
    }

    /// Sends queued binds and unbinds while the socket takes them without waiting (rabbitmq-c
    /// writes with no deadline, and a frozen broker stops reading): 64 between checks.
    func flushBindings(_ consumer: AMQPConnection) throws(BrokerError) {
        var sent = 0
        while sent % 64 != 0 || consumer.canWrite, let request = self.bindings.nextUnsent() {
            sent += 1
            try consumer.sendTopology(request.operation, queue: self.queue!, exchange: self.exchange, key: CString(request.key), amqpChannel: Self.topologyChannel)
        }
    }

    /// The broker answered the oldest bind or unbind.
    func answered(_ operation: TopologyMethod) throws(BrokerError) {
        let answered: (answer: Topology.Answer, effects: BindingPipeline.Effects)
        do {
            answered = try self.bindings.answered(operation, now: .now())
        } catch {
            throw BrokerError(operation: "bind binding keys", reason: "\(error)")
        }
        if operation == .bind {
            self.counters.bindLatency.record(Int(answered.answer.latency.nanoseconds / 1000))
            self.counters.bindsDone[answered.answer.granularity.index].wrappingIncrement(ordering: .relaxed)
        }
        self.counters.update(from: self.bindings)
        self.apply(answered.effects)
    }
}
