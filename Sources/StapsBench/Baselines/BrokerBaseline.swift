import CRabbit
import NIOCore
import NIOPosix
import RabbitClient
import StapsCluster

#if canImport(Glibc)
import Glibc
#endif

/// The bare publish→consume rate of a broker: one connection publishing to a fresh topic
/// exchange, another consuming its bound queue (no-ack), each on its own thread. What a staps
/// cluster's broker leg is compared with. It publishes with the same `PublishBatch` writer as
/// the link (256 messages per write), so it measures the broker, not rabbitmq-c's three
/// `send` calls per `amqp_basic_publish`. Each body starts with its send time, so the consumer
/// measures publish→consume latency; at a `rate` (messages/s, 0: as fast as the socket takes
/// them) the publisher sends what is due every 0.5 ms. The consumer may be on another node of
/// a broker cluster (`consumeURL`): its queue lives there, so every message crosses between
/// the nodes, as it does between staps nodes connected to different broker nodes.
enum BrokerBaseline {
    struct Result: Sendable {
        var published: Int
        var consumed: Int
        var seconds: Double
        var latency: Histogram
        var messagesPerSecond: Double { Double(consumed) / seconds }
    }

    static func run(url: AMQPURL, consumeURL: AMQPURL? = nil, messages: Int, size: Int, rate: Int = 0) async throws -> Result {
        precondition(size >= 8, "a body carries its 8-byte send time")
        let key = CString("c.baseline")
        let consumer = try AMQPConnection(url: consumeURL ?? url, heartbeatSeconds: 0, connectTimeout: 5)
        let publisher = try AMQPConnection(url: url, heartbeatSeconds: 0, connectTimeout: 5)
        let empty = amqp_table_t(num_entries: 0, entries: nil)
        let exchange = try publisher.declareScratchExchange("staps-baseline-", autoDelete: true)
        let queue = try consumer.declareScratchQueue()
        amqp_queue_bind(consumer.state, 1, queue.bytes, exchange.bytes, key.bytes, empty)
        try consumer.check(amqp_get_rpc_reply(consumer.state), "bind")
        amqp_basic_consume(consumer.state, 1, queue.bytes, amqp_bytes_t(len: 0, bytes: nil), 0, 1, 1, empty)
        try consumer.check(amqp_get_rpc_reply(consumer.state), "consume")

        let pool = NIOThreadPool(numberOfThreads: 2)
        pool.start()
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let start = NIODeadline.now()
        // @unchecked boxes: each connection is used by exactly one of the two threads.
        let pub = Unchecked((publisher, exchange, key))
        let con = Unchecked(consumer)
        let published = pool.runIfActive(eventLoop: group.next()) { () throws -> Int in
            let (publisher, exchange, key) = pub.value
            var body = [UInt8](repeating: 0x2A, count: size)
            let appID = CString("baseline")
            var batch = PublishBatch(frameMax: Int(amqp_get_frame_max(publisher.state)))
            let started = now()
            var sent = 0
            while sent < messages {
                let due = rate > 0 ? min(messages, Int(Double(now() - started) / 1e9 * Double(rate)) + 1) : messages
                if due <= sent { usleep(500); continue }
                batch.removeAll()
                while batch.count < 256, sent < due {
                    body.withUnsafeMutableBytes { $0.storeBytes(of: now(), as: UInt64.self) }
                    body.withUnsafeBytes { batch.append(exchange: exchange.rawBytes, routingKey: key.rawBytes, type: UInt8(ascii: "b"), appID: appID.rawBytes, correlationID: 0, body: $0) }
                    sent += 1
                }
                try batch.write(to: publisher.fileDescriptor)
            }
            return sent
        }
        let consumed = pool.runIfActive(eventLoop: group.next()) { () -> (Int, Histogram) in
            var latency = Histogram()
            let count = Self.consume(con.value, messages: messages) { body in
                if body.count >= 8 { latency.record(now() &- body.loadUnaligned(as: UInt64.self)) }
            }
            return (count, latency)
        }
        let p = try await published.get()
        let (c, latency) = try await consumed.get()
        let seconds = Double((NIODeadline.now() - start).nanoseconds) / 1e9
        try await pool.shutdownGracefully()
        try await group.shutdownGracefully()
        amqp_exchange_delete(publisher.state, 1, exchange.bytes, 0)
        publisher.close()
        consumer.close()
        return Result(published: p, consumed: c, seconds: seconds, latency: latency)
    }
}

extension BrokerBaseline {
    /// Consumes up to `messages` deliveries of a queue the connection consumes without acks,
    /// destroying each envelope at once: what any consumer of a delivery pays, and no more
    /// (`body` sees each body before that). Stops early after 5 s without one. Returns how
    /// many came.
    static func consume(_ consumer: AMQPConnection, messages: Int, body: (UnsafeRawBufferPointer) -> Void = { _ in }) -> Int {
        var count = 0
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        while count < messages {
            amqp_maybe_release_buffers(consumer.state)
            var envelope = amqp_envelope_t()
            let reply = amqp_consume_message(consumer.state, &envelope, &timeout, 0)
            guard reply.reply_type == AMQP_RESPONSE_NORMAL else { break }
            body(UnsafeRawBufferPointer(start: envelope.message.body.bytes, count: envelope.message.body.len))
            amqp_destroy_envelope(&envelope)
            count += 1
        }
        return count
    }
}

struct Unchecked<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}

extension AMQPConnection {
    /// A fresh, non-durable topic exchange for a benchmark (auto-delete: gone with its last binding).
    func declareScratchExchange(_ prefix: String, autoDelete: Bool) throws(BrokerError) -> CString {
        let exchange = CString(prefix + String(UUID4.make().prefix(8)))
        amqp_exchange_declare(self.state, 1, exchange.bytes, amqp_cstring_bytes("topic"), 0, 0, autoDelete ? 1 : 0, 0, amqp_table_t(num_entries: 0, entries: nil))
        try self.check(amqp_get_rpc_reply(self.state), "declare exchange")
        return exchange
    }

    /// A server-named, exclusive, auto-delete queue for a benchmark.
    func declareScratchQueue() throws(BrokerError) -> CString {
        guard let ok = amqp_queue_declare(self.state, 1, amqp_bytes_t(len: 0, bytes: nil), 0, 0, 1, 1, amqp_table_t(num_entries: 0, entries: nil)) else {
            try self.check(amqp_get_rpc_reply(self.state), "declare queue")
            throw BrokerError(operation: "declare queue", reason: "no reply")
        }
        return CString(AMQPConnection.string(ok.pointee.queue))
    }
}
