import CRabbit
import NIOCore
import RabbitClient
import StapsCluster

#if canImport(Glibc)
import Glibc
#endif

/// Messages through the broker: publishing what local clients sent, consuming what other nodes did.
extension LinkWorker {
    /// Packs the batch into AMQP messages and writes them: with one `send` on a plain TCP
    /// connection, through rabbitmq-c (so through TLS) on an `amqps` one.
    ///
    /// Messages of one channel with the same type and consecutive numbers on the channel's
    /// stream share one AMQP message (up to 256 KiB, `PublishGroups`): the broker's cost is per
    /// AMQP message, so this is what lets a busy channel go faster than the broker's message
    /// rate. Each AMQP message carries its node id, sender connection id, type and the stream
    /// position of its first message in its properties, and order is kept (a change of type
    /// starts a new group after the previous one). Each is tracked until the broker confirms it.
    func publish(_ messages: [ClusterMessage], on publisher: AMQPConnection) throws(BrokerError) {
        guard !messages.isEmpty else { return }
        self.counters.publishBatch.record(messages.count)
        let groups = PublishGroups.make(messages)
        self.batch.removeAll()
        let exchange = self.exchange.rawBytes
        let appID = self.nodeID.rawBytes
        let tls = self.broker.tls
        let now = NIODeadline.now()
        for (g, group) in groups.enumerated() {
            var routingKey = self.routingKey(group.channel)
            self.body.removeAll(keepingCapacity: true)
            WireFormat.beginBody(channel: group.channel, into: &self.body)
            var bytes = 0
            for i in group.indices {
                WireFormat.append(payload: messages[i].payload, into: &self.body)
                bytes += PendingPublishes.bytes(of: messages[i])
            }
            let isText = group.isText
            if let first = group.first {
                first.writeMessageID(into: &self.messageID)
            } else {
                self.messageID.removeAll(keepingCapacity: true)
            }
            if tls {
                do {
                    try self.publishThroughLibrary(publisher, routingKey: CString(routingKey), isText: isText, correlationID: group.connectionID)
                } catch {
                    // This group and the ones after it were never written: count them here
                    // (the ones before are in `confirms`, counted when the connection goes).
                    let unsent = groups[g...].reduce(0) { $0 + $1.indices.count }
                    self.counters.droppedWhileDown.wrappingIncrement(by: unsent, ordering: .relaxed)
                    publisher.markBroken()
                    throw error
                }
            } else {
                routingKey.withUTF8 { key in
                    self.body.withUnsafeBytes { body in
                        self.messageID.withUnsafeBytes { id in
                            self.batch.append(exchange: exchange, routingKey: UnsafeRawBufferPointer(key), type: isText ? UInt8(ascii: "t") : UInt8(ascii: "b"),
                                              appID: appID, correlationID: group.connectionID, messageID: id.isEmpty ? nil : id, body: body)
                        }
                    }
                }
            }
            self.confirms.published(messages: group.indices.count, bytes: bytes, at: now)
        }
        if self.confirms.outstanding == groups.count { self.confirmProgress = .now() }
        if !tls {
            do {
                try self.batch.write(to: publisher.fileDescriptor, timeoutMillis: Int32(self.answerTimeout.nanoseconds / 1_000_000))
            } catch {
                publisher.markBroken()  // a frame may be half written: nothing more on this socket
                throw error
            }
        }
    }

    /// One `basic.publish` through rabbitmq-c (TLS): the same frames `PublishBatch` writes.
    private func publishThroughLibrary(_ publisher: AMQPConnection, routingKey: CString, isText: Bool, correlationID: UInt64) throws(BrokerError) {
        var properties = amqp_basic_properties_t()
        properties._flags = staps_basic_delivery_mode_flag() | staps_basic_correlation_id_flag() | staps_basic_type_flag() | staps_basic_app_id_flag()
        properties.delivery_mode = 1
        let correlation = CString(String(correlationID))
        let type = CString(isText ? "t" : "b")
        properties.correlation_id = correlation.bytes
        properties.type = type.bytes
        properties.app_id = self.nodeID.bytes
        let status = self.messageID.withUnsafeMutableBytes { id in
            if !id.isEmpty {
                properties._flags |= staps_basic_message_id_flag()
                properties.message_id = amqp_bytes_t(len: id.count, bytes: id.baseAddress)
            }
            return self.body.withUnsafeMutableBytes { body in
                withExtendedLifetime((correlation, type)) {
                    amqp_basic_publish(publisher.state, 1, self.exchange.bytes, routingKey.bytes, 0, 0, &properties,
                                       amqp_bytes_t(len: body.count, bytes: body.baseAddress))
                }
            }
        }
        guard status == AMQP_STATUS_OK.rawValue else {
            throw BrokerError(operation: "publish", reason: String(cString: amqp_error_string2(status)))
        }
    }

    /// Reads every delivery and answer already available (without blocking) and hands the
    /// deliveries over in one batch.
    func consume(_ consumer: AMQPConnection) throws(BrokerError) {
        var batch: [ClusterMessage] = []
        var zero = timeval(tv_sec: 0, tv_usec: 0)
        var heard = false
        var discarded = 0
        defer {
            if heard { self.lastHeardConsumer = .now() }
            if discarded > 0 {
                self.counters.received.wrappingIncrement(by: discarded, ordering: .relaxed)
                self.counters.discarded.wrappingIncrement(by: discarded, ordering: .relaxed)
            }
            if !batch.isEmpty {
                self.counters.received.wrappingIncrement(by: batch.count, ordering: .relaxed)
                self.receiver.deliverFromCluster(batch)
            }
        }
        amqp_maybe_release_buffers(consumer.state)
        var frames = 0
        while batch.count < 1024, frames < 4096 {
            frames += 1
            var envelope = amqp_envelope_t()
            let reply = amqp_consume_message(consumer.state, &envelope, &zero, 0)
            if reply.reply_type == AMQP_RESPONSE_NORMAL {
                heard = true
                discarded += self.decode(envelope, into: &batch)
                amqp_destroy_envelope(&envelope)
                continue
            }
            if reply.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION {
                if reply.library_error == AMQP_STATUS_TIMEOUT.rawValue { return }
                if reply.library_error == AMQP_STATUS_UNEXPECTED_STATE.rawValue {
                    // A method other than a delivery (put back by rabbitmq-c): a bind-ok, a cancel, a close.
                    heard = true
                    try self.readOneEvent(consumer)
                    continue
                }
            }
            try consumer.check(reply, "consume")
        }
    }

    private func readOneEvent(_ consumer: AMQPConnection) throws(BrokerError) {
        var frame = amqp_frame_t()
        var zero = timeval(tv_sec: 0, tv_usec: 0)
        let status = amqp_simple_wait_frame_noblock(consumer.state, &frame, &zero)
        if status == AMQP_STATUS_TIMEOUT.rawValue { return }
        guard status == AMQP_STATUS_OK.rawValue else {
            throw BrokerError(operation: "consume connection", reason: String(cString: amqp_error_string2(status)))
        }
        guard frame.frame_type == UInt8(AMQP_FRAME_METHOD) else { return }
        try consumer.dispatch(frame.payload.method, channel: frame.channel, "consume connection") { event throws(BrokerError) in
            switch event {
            case .bindOK: try self.answered(.bind)
            case .unbindOK: try self.answered(.unbind)
            case .consumerCancelled:
                throw BrokerError(operation: "consume", reason: "the broker cancelled this node's consumer (its queue was deleted?)")
            default: break
            }
        }
    }

    /// Copies the messages out of a delivery (before its envelope is destroyed); nothing for this
    /// node's own messages, nothing of a malformed body (counted), and nothing for a channel
    /// without local clients (checked before a payload is copied): returns how many of those
    /// were discarded. For a channel with local clients, a numbered body's place in its
    /// stream counts what was missed before it (`StreamGaps`).
    private func decode(_ envelope: amqp_envelope_t, into batch: inout [ClusterMessage]) -> Int {
        let props = envelope.message.properties
        if props._flags & staps_basic_app_id_flag() != 0, props.app_id.len == self.nodeID.count,
            memcmp(props.app_id.bytes, self.nodeID.pointer, self.nodeID.count) == 0
        {
            return 0
        }
        var isText = false
        if props._flags & staps_basic_type_flag() != 0, props.type.len == 1, let t = props.type.bytes {
            isText = t.load(as: UInt8.self) == UInt8(ascii: "t")
        }
        let body = envelope.message.body
        let raw = UnsafeRawBufferPointer(start: body.bytes, count: body.bytes == nil ? 0 : body.len)
        do {
            let (channel, payloads) = try WireFormat.decode(raw)
            guard self.hasLocalClients(channel) else { return payloads.count }
            if props._flags & staps_basic_message_id_flag() != 0,
                let position = StreamPosition(messageID: UnsafeRawBufferPointer(start: props.message_id.bytes, count: props.message_id.len))
            {
                let seen = self.gaps.receive(channel: channel, at: position, count: payloads.count)
                if seen.missed > 0 { self.counters.missed.wrappingIncrement(by: seen.missed, ordering: .relaxed) }
                if seen.outOfOrder > 0 { self.counters.outOfOrder.wrappingIncrement(by: seen.outOfOrder, ordering: .relaxed) }
            }
            for range in payloads {
                var payload = self.allocator.buffer(capacity: range.count)
                payload.writeBytes(UnsafeRawBufferPointer(rebasing: raw[range]))
                batch.append(ClusterMessage(channel: channel, payload: payload, isText: isText, connectionID: 0))
            }
        } catch {
            self.counters.malformed.wrappingIncrement(ordering: .relaxed)
        }
        return 0
    }
}

/// Messages of one channel with the same type and consecutive numbers on the channel's stream
/// (or all unnumbered), grouped into one AMQP message each (up to 256 KiB of payload), in
/// order: a body carries only its first message's number, so a number skipped (a message
/// dropped before it was taken) starts a new group. Messages of several senders on the channel
/// share a group; its `connectionID` is then 0, as for a POST.
enum PublishGroups {
    struct Group: Equatable {
        var channel: String
        var connectionID: UInt64
        var isText: Bool
        var indices: [Int]
        var bytes: Int
        /// The stream position of the first message, and of the last (nil: unnumbered).
        var first: StreamPosition?
        var last: StreamPosition?

        func takes(_ message: ClusterMessage, size: Int) -> Bool {
            guard self.isText == message.isText, self.bytes + size <= PublishGroups.maxBytes else { return false }
            switch (self.last, message.position) {
            case (nil, nil): return true
            case (let last?, let next?): return next.stream == last.stream && next.sequence == last.sequence &+ 1
            default: return false
            }
        }
    }

    static let maxBytes = 256 << 10

    static func make(_ messages: [ClusterMessage]) -> [Group] {
        var open: [String: Int] = [:]
        var groups: [Group] = []
        for (i, message) in messages.enumerated() {
            let size = message.payload.readableBytes + 4
            if let g = open[message.channel], groups[g].takes(message, size: size) {
                groups[g].indices.append(i)
                groups[g].bytes += size
                groups[g].last = message.position
                if groups[g].connectionID != message.connectionID { groups[g].connectionID = 0 }
            } else {
                open[message.channel] = groups.count
                groups.append(Group(channel: message.channel, connectionID: message.connectionID, isText: message.isText, indices: [i], bytes: size,
                                    first: message.position, last: message.position))
            }
        }
        return groups
    }
}
