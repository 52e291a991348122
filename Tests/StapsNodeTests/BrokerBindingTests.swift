import CRabbit
import Foundation
import NIOCore
import RabbitClient
import StapsCluster
import StapsRabbit
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// What the real broker does with the binding keys a node may hold: a link that changes its
/// binding granularity holds a channel's exact key and its bucket's key on one queue at once
/// while it moves between them, and must not receive the channel's messages twice.
@Suite(.serialized) struct BrokerBindingTests {
    /// One queue bound with a channel's exact key and its bucket key(s), a second queue bound
    /// with the bucket key only (the control: the bucket binding does match). A message for the
    /// channel, one for another channel of the same bucket and one for a channel of another
    /// bucket, published by a real link: each queue gets each matching message once.
    @Test(arguments: [[16], [256], [4096], [16, 256, 4096]])
    func aMessageMatchedByAnExactAndABucketBindingOfOneQueueArrivesOnce(buckets: [Int]) async throws {
        let url = try AMQPURL(try await Broker.require())
        let exchange = Broker.freshExchange()
        // The publisher is a link: the routing keys and the publish path a node uses.
        let publisher = RabbitLink(configuration: RabbitConfiguration(url: url, settings: ClusterSettings(exchange: exchange)), logger: testLogger("link"))
        publisher.start(receiver: DiscardingReceiver())
        try await eventually("the link is up (the exchange is declared)") { publisher.isConnected }

        let channel = "overlap-" + buckets.map(String.init).joined(separator: "-")
        let finest = buckets.max()!
        let bucketKey = RoutingKey.binding(forChannel: channel, buckets: finest)
        let sibling = (0...).lazy.map { "sibling-\($0)" }.first { RoutingKey.binding(forChannel: $0, buckets: finest) == bucketKey }!
        let coarsest = buckets.min()!
        let elsewhere = (0...).lazy.map { "elsewhere-\($0)" }
            .first { RoutingKey.binding(forChannel: $0, buckets: coarsest) != RoutingKey.binding(forChannel: channel, buckets: coarsest) }!

        let consumer = try RawConsumer(url: url, exchange: exchange)
        defer { consumer.close() }
        let both = try consumer.queue(boundWith: [RoutingKey.forChannel(channel)] + buckets.map { RoutingKey.binding(forChannel: channel, buckets: $0) })
        let bucketOnly = try consumer.queue(boundWith: [bucketKey])

        let names = [channel, sibling, elsewhere]
        publisher.publish(names.map { ClusterMessage(channel: $0, payload: ByteBuffer(string: "for \($0)"), isText: true, connectionID: 1) })
        try await eventually("the broker confirmed the three publishes") { publisher.counters.published.load(ordering: .relaxed) == 3 }
        // Every delivery the queues get, until none has come for 0.5 s (4 are expected).
        let got = try consumer.deliveries(quietFor: 0.5, atMost: 5)
        let expected = [both: [channel, sibling], bucketOnly: [channel, sibling]]
        #expect(Dictionary(grouping: got, by: \.queue).mapValues { $0.map(\.channel).sorted() } == expected.mapValues { $0.sorted() },
                "exact + \(buckets) on one queue: \(got)")
        await publisher.shutdown()
    }
}

/// A `ClusterReceiver` for a link that only publishes.
final class DiscardingReceiver: ClusterReceiver {
    func deliverFromCluster(_ batch: [ClusterMessage]) {}
    var clusterBacklogBytes: Int { 0 }
}

/// One rabbitmq-c connection with queues of its own on `exchange`, consumed without acks:
/// what the broker delivers to a queue, seen without a link in between.
final class RawConsumer {
    private let connection: AMQPConnection
    private let exchange: CString

    init(url: AMQPURL, exchange: String) throws {
        self.connection = try AMQPConnection(url: url, heartbeatSeconds: 0, connectTimeout: 5)
        self.exchange = CString(exchange)
    }

    /// A server-named exclusive queue bound with `keys` and consumed (consumer tag: the queue's name).
    func queue(boundWith keys: [String]) throws -> String {
        let empty = amqp_table_t(num_entries: 0, entries: nil)
        guard let ok = amqp_queue_declare(connection.state, 1, amqp_bytes_t(len: 0, bytes: nil), 0, 0, 1, 1, empty) else {
            try connection.check(amqp_get_rpc_reply(connection.state), "declare queue")
            throw BrokerError(operation: "declare queue", reason: "no reply")
        }
        let name = AMQPConnection.string(ok.pointee.queue)
        let queue = CString(name)
        for key in keys {
            let k = CString(key)
            amqp_queue_bind(connection.state, 1, queue.bytes, exchange.bytes, k.bytes, empty)
            try connection.check(amqp_get_rpc_reply(connection.state), "bind \(key)")
        }
        amqp_basic_consume(connection.state, 1, queue.bytes, queue.bytes, 0, 1, 1, empty)
        try connection.check(amqp_get_rpc_reply(connection.state), "consume \(name)")
        return name
    }

    /// Deliveries (queue, channel named in the body) until none came for `quiet` seconds, or 5 s.
    func deliveries(quietFor quiet: Double, atMost seconds: Double) throws -> [(queue: String, channel: String)] {
        var out: [(queue: String, channel: String)] = []
        let end = Date().addingTimeInterval(seconds)
        var last = Date()
        while Date() < end, Date().timeIntervalSince(last) < quiet {
            var envelope = amqp_envelope_t()
            var timeout = timeval(tv_sec: 0, tv_usec: 50_000)
            amqp_maybe_release_buffers(connection.state)
            let reply = amqp_consume_message(connection.state, &envelope, &timeout, 0)
            if reply.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION, reply.library_error == AMQP_STATUS_TIMEOUT.rawValue { continue }
            try connection.check(reply, "consume")
            defer { amqp_destroy_envelope(&envelope) }
            let body = UnsafeRawBufferPointer(start: envelope.message.body.bytes, count: envelope.message.body.len)
            out.append((AMQPConnection.string(envelope.consumer_tag), try WireFormat.decode(body).channel))
            last = Date()
        }
        return out
    }

    func close() { connection.close() }
}
