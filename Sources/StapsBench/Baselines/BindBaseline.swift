import CRabbit
import NIOCore
import RabbitClient
import StapsCluster

#if canImport(Glibc)
import Glibc
#endif

/// The broker's own ceiling for the channel life cycle: one rabbitmq-c connection binding and
/// unbinding fresh routing keys on an exclusive queue, pipelined the way the link does it
/// (`window` requests in flight, answers read as they come). No staps in the way: what a
/// cluster's churn rate is compared with, as `BrokerBaseline` is for messages.
enum BindBaseline {
    struct Result: Sendable {
        var cycles: Int
        var seconds: Double
        var cyclesPerSecond: Double { Double(cycles) / seconds }
    }

    static func run(url: AMQPURL, cycles: Int, window: Int) throws -> Result {
        let connection = try AMQPConnection(url: url, heartbeatSeconds: 0, connectTimeout: 5)
        // Not auto-delete: that would delete the exchange at the first unbind.
        let exchange = try connection.declareScratchExchange("staps-binds-", autoDelete: false)
        let queue = try connection.declareScratchQueue()
        try connection.openChannel(2)
        defer {
            amqp_exchange_delete(connection.state, 1, exchange.bytes, 0)
            connection.close()
        }
        // Request i (0..<2*cycles): bind of key i/2 when even, its unbind when odd.
        var keys: [CString] = []
        keys.reserveCapacity(cycles)
        for i in 0..<cycles { keys.append(CString(RoutingKey.forChannel(UUID4.make() + "-\(i)"))) }
        let total = 2 * cycles
        var sent = 0
        var answered = 0
        let start = NIODeadline.now()
        while answered < total {
            while sent < total, sent - answered < window {
                try connection.sendTopology(sent % 2 == 0 ? .bind : .unbind, queue: queue, exchange: exchange, key: keys[sent / 2], amqpChannel: 2)
                sent += 1
            }
            var pfd = pollfd(fd: connection.fileDescriptor, events: Int16(POLLIN), revents: 0)
            if !connection.hasBufferedInput, poll(&pfd, 1, 5000) == 0 {
                throw BrokerError(operation: "bind", reason: "no answer for 5 s after \(answered) of \(total)")
            }
            amqp_maybe_release_buffers(connection.state)
            try connection.readEvents("bind") { event throws(BrokerError) in
                let expected: BrokerEvent = answered % 2 == 0 ? .bindOK : .unbindOK
                guard event == expected else { throw BrokerError(operation: "bind", reason: "expected \(expected), got \(event)") }
                answered += 1
            }
        }
        let seconds = Double((NIODeadline.now() - start).nanoseconds) / 1e9
        return Result(cycles: cycles, seconds: seconds)
    }
}
