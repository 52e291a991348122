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
/// `send` calls per `amqp_basic_publish`.
enum BrokerBaseline {
    struct Result: Sendable {
        var published: Int
        var consumed: Int
        var seconds: Double
        var messagesPerSecond: Double { Double(consumed) / seconds }
    }

    static func run(url: AMQPURL, messages: Int, size: Int) async throws -> Result {
        let key = CString("c.baseline")
        let consumer = try AMQPConnection(url: url, heartbeatSeconds: 0, connectTimeout: 5)
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
            let body = [UInt8](repeating: 0x2A, count: size)
            let appID = CString("baseline")
            var batch = PublishBatch(frameMax: Int(amqp_get_frame_max(publisher.state)))
            var sent = 0
            while sent < messages {
                batch.removeAll()
                while batch.count < 256, sent < messages {
                    body.withUnsafeBytes { batch.append(exchange: exchange.rawBytes, routingKey: key.rawBytes, type: UInt8(ascii: "b"), appID: appID.rawBytes, correlationID: 0, body: $0) }
                    sent += 1
                }
                try batch.write(to: publisher.fileDescriptor)
            }
            return sent
        }
        let consumed = pool.runIfActive(eventLoop: group.next()) { Self.consume(con.value, messages: messages) }
        let p = try await published.get()
        let c = try await consumed.get()
        let seconds = Double((NIODeadline.now() - start).nanoseconds) / 1e9
        try await pool.shutdownGracefully()
        try await group.shutdownGracefully()
        amqp_exchange_delete(publisher.state, 1, exchange.bytes, 0)
        publisher.close()
        consumer.close()
        return Result(published: p, consumed: c, seconds: seconds)
    }
}

extension BrokerBaseline {
    /// Consumes up to `messages` deliveries of a queue the connection consumes without acks,
    /// destroying each envelope at once: what any consumer of a delivery pays, and no more.
    /// Stops early after 5 s without one. Returns how many came.
    static func consume(_ consumer: AMQPConnection, messages: Int) -> Int {
        var count = 0
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        while count < messages {
            amqp_maybe_release_buffers(consumer.state)
            var envelope = amqp_envelope_t()
            let reply = amqp_consume_message(consumer.state, &envelope, &timeout, 0)
            guard reply.reply_type == AMQP_RESPONSE_NORMAL else { break }
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
