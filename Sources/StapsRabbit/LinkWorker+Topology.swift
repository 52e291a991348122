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

    func key(_ name: String) -> CString {
        if let k = self.keys[name] { return k }
        if self.keys.count > 10_000 { self.keys.removeAll() }
        let k = CString(RoutingKey.forChannel(name))
        self.keys[name] = k
        return k
    }

    /// A binding key's first channel came, or its last one went (see `LoopHandoff`). Connected:
    /// a waiting join proceeds on the key's `bind-ok`. Down (`consumer` nil): at once (local
    /// service); bound on reconnection.
    func handle(_ commands: [LoopHandoff.Command], on consumer: AMQPConnection?) throws(BrokerError) {
        for waiter in self.bindings.handle(commands, now: .now()) { waiter?.succeed(()) }
        if let consumer { try self.flushBindings(consumer) }
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
        let answer: (key: String, settled: Bool, waiters: [BindingPipeline.Waiter])
        do {
            answer = try self.bindings.answered(operation, now: .now())
        } catch {
            throw BrokerError(operation: "bind binding keys", reason: "\(error)")
        }
        if answer.settled { self.handoff.markBound(answer.key) }
        self.counters.bindingKeysBound.store(self.bindings.boundCount, ordering: .relaxed)
        for waiter in answer.waiters { waiter?.succeed(()) }
    }
}
