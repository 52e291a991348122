import CRabbit
import StapsCluster

#if canImport(Glibc)
import Glibc
#endif

/// A broker problem, named by the operation that met it. Never holds the password.
public struct BrokerError: Error, CustomStringConvertible {
    public var operation: String
    public var reason: String
    /// The AMQP reply code when the broker closed the channel or connection (403, 404, 406, 530…).
    public var replyCode: UInt16?

    public init(operation: String, reason: String, replyCode: UInt16? = nil) {
        self.operation = operation
        self.reason = reason
        self.replyCode = replyCode
    }

    public var description: String {
        replyCode.map { "\(operation): broker replied \($0): \(reason)" } ?? "\(operation): \(reason)"
    }
}

/// The two topology methods the link pipelines: `queue.bind` and `queue.unbind`.
public enum TopologyMethod: Sendable, CustomStringConvertible {
    case bind
    case unbind

    public var description: String { self == .bind ? "bind" : "unbind" }
}

/// A C string that lives as long as this object: what `amqp_bytes_t` may point at.
public final class CString {
    public let pointer: UnsafeMutablePointer<CChar>
    public let count: Int

    public init(_ s: String) {
        self.pointer = strdup(s)!
        self.count = s.utf8.count
    }

    deinit { free(self.pointer) }

    public var bytes: amqp_bytes_t { amqp_bytes_t(len: self.count, bytes: UnsafeMutableRawPointer(self.pointer)) }
    public var rawBytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: self.pointer, count: self.count) }
}

/// What the broker told the link outside deliveries.
public enum BrokerEvent: Equatable {
    case bindOK
    case unbindOK
    case ack(tag: UInt64, multiple: Bool)
    case nack(tag: UInt64, multiple: Bool)
    /// The broker cancelled the consumer (its queue was deleted).
    case consumerCancelled
    /// A memory or disk alarm: the broker stops reading this connection's publishes.
    case blocked(reason: String)
    case unblocked
}

/// One rabbitmq-c connection with AMQP channel 1 open. Owned by one thread; closed explicitly.
public final class AMQPConnection {
    public let state: amqp_connection_state_t
    public private(set) var isOpen = true

    /// Opens, logs in and opens channel 1. A half-opened connection is destroyed before throwing:
    /// once `state` is stored the object is whole, so a throw runs `deinit`, which frees it.
    ///
    /// `amqps://` verifies the broker's certificate against `caFile` (by default the system
    /// bundle) and its host name against the URL's host; a mismatch is refused, never accepted.
    /// The login announces the capabilities the link relies on: `consumer_cancel_notify`
    /// (a deleted queue cancels the consumer instead of leaving it deaf) and `connection.blocked`
    /// (a broker alarm is told, not just felt as a write that hangs).
    public init(url: AMQPURL, heartbeatSeconds: Int32, connectTimeout: Int, caFile: String? = nil) throws(BrokerError) {
        guard let state = amqp_new_connection() else {
            throw BrokerError(operation: "connect", reason: "out of memory")
        }
        self.state = state
        let socket = url.tls ? amqp_ssl_socket_new(state) : amqp_tcp_socket_new(state)
        guard let socket else {
            throw BrokerError(operation: "connect", reason: "cannot create a \(url.tls ? "TLS" : "TCP") socket")
        }
        if url.tls {
            // rabbitmq-c verifies the peer and its host name by default but loads no CA certificates itself.
            let bundle = caFile ?? "/etc/ssl/certs/ca-certificates.crt"
            guard access(bundle, R_OK) == 0, amqp_ssl_socket_set_cacert(socket, bundle) == AMQP_STATUS_OK.rawValue else {
                throw BrokerError(operation: "connect to \(url.host):\(url.port)", reason: "cannot load CA certificates from \(bundle)")
            }
            amqp_ssl_socket_set_verify_peer(socket, 1)
            amqp_ssl_socket_set_verify_hostname(socket, 1)
        }
        var timeout = timeval(tv_sec: connectTimeout, tv_usec: 0)
        // No broker reply may hold the link's thread longer than this.
        _ = amqp_set_handshake_timeout(state, &timeout)
        _ = amqp_set_rpc_timeout(state, &timeout)
        let status = amqp_socket_open_noblock(socket, url.host, Int32(url.port), &timeout)
        guard status == AMQP_STATUS_OK.rawValue else {
            throw BrokerError(operation: "connect to \(url.host):\(url.port)", reason: Self.openFailure(status, tls: url.tls))
        }
        let capabilities = [CString("consumer_cancel_notify"), CString("connection.blocked")]
        let capabilitiesKey = CString("capabilities")
        var flags = capabilities.map { key -> amqp_table_entry_t in
            var entry = amqp_table_entry_t()
            entry.key = key.bytes
            entry.value.kind = UInt8(AMQP_FIELD_KIND_BOOLEAN.rawValue)
            entry.value.value.boolean = 1
            return entry
        }
        let reply = flags.withUnsafeMutableBufferPointer { flagBuffer -> amqp_rpc_reply_t in
            var entry = amqp_table_entry_t()
            entry.key = capabilitiesKey.bytes
            entry.value.kind = UInt8(AMQP_FIELD_KIND_TABLE.rawValue)
            entry.value.value.table = amqp_table_t(num_entries: Int32(flagBuffer.count), entries: flagBuffer.baseAddress)
            return withUnsafeMutablePointer(to: &entry) { entryPointer in
                var properties = amqp_table_t(num_entries: 1, entries: entryPointer)
                return withExtendedLifetime((capabilities, capabilitiesKey)) {
                    staps_amqp_login_plain_with_properties(state, url.vhost, 0, 131_072, heartbeatSeconds, &properties, url.user, url.password)
                }
            }
        }
        try Self.check(reply, "log in to vhost '\(url.vhost)' as '\(url.user)'", state: state)
        try self.openChannel(1)
        if url.tls {
            // rabbitmq-c writes TLS with no deadline, so the link writes only what fits in a
            // known send buffer (see `sendRoom`).
            self.sendBufferSize = max(0, staps_socket_set_send_buffer(amqp_get_sockfd(state), 4 << 20))
        }
    }

    /// The socket's send buffer, for TLS connections (0 otherwise: not fixed, not needed).
    public private(set) var sendBufferSize = 0

    /// Bytes a TLS connection's socket takes without blocking (its fixed send buffer less
    /// what the broker has not acknowledged).
    public var sendRoom: Int { max(0, self.sendBufferSize - self.unackedBytes) }

    /// Why opening the socket failed, in words an operator can act on.
    private static func openFailure(_ status: Int32, tls: Bool) -> String {
        let reason = String(cString: amqp_error_string2(status))
        switch status {
        case AMQP_STATUS_SSL_PEER_VERIFY_FAILED.rawValue:
            return "\(reason): the broker's certificate is not signed by a trusted CA (see amqp_tls_ca)"
        case AMQP_STATUS_SSL_HOSTNAME_VERIFY_FAILED.rawValue:
            return "\(reason): the broker's certificate does not name this host"
        case AMQP_STATUS_SSL_CONNECTION_FAILED.rawValue, AMQP_STATUS_SSL_ERROR.rawValue:
            return "\(reason): TLS handshake failed (is this a TLS listener, and is its certificate trusted?)"
        default:
            return reason
        }
    }

    /// Opens AMQP channel `number` (a blocking RPC: for connecting only).
    public func openChannel(_ number: amqp_channel_t) throws(BrokerError) {
        amqp_channel_open(self.state, number)
        try self.check(amqp_get_rpc_reply(self.state), "open AMQP channel \(number)")
    }

    public var fileDescriptor: Int32 { amqp_get_sockfd(self.state) }

    /// True when rabbitmq-c already holds bytes or frames we have not consumed (poll would miss them).
    public var hasBufferedInput: Bool {
        amqp_data_in_buffer(self.state) != 0 || amqp_frames_enqueued(self.state) != 0
    }

    public func check(_ reply: amqp_rpc_reply_t, _ operation: String) throws(BrokerError) {
        do {
            try Self.check(reply, operation, state: self.state)
        } catch {
            self.isOpen = false
            throw error
        }
    }

    /// The one place `amqp_rpc_reply_t` becomes an error naming the operation.
    public static func check(_ reply: amqp_rpc_reply_t, _ operation: String, state: amqp_connection_state_t) throws(BrokerError) {
        switch reply.reply_type {
        case AMQP_RESPONSE_NORMAL:
            return
        case AMQP_RESPONSE_LIBRARY_EXCEPTION:
            let reason = String(cString: amqp_error_string2(reply.library_error))
            if reply.library_error == AMQP_STATUS_CONNECTION_CLOSED.rawValue || reply.library_error == AMQP_STATUS_SOCKET_ERROR.rawValue {
                throw BrokerError(operation: operation, reason: reason + " (for a login: wrong user, password or vhost?)")
            }
            throw BrokerError(operation: operation, reason: reason)
        case AMQP_RESPONSE_SERVER_EXCEPTION:
            if reply.reply.id == staps_connection_close_method(), let decoded = reply.reply.decoded {
                let close = decoded.assumingMemoryBound(to: amqp_connection_close_t.self).pointee
                throw BrokerError(operation: operation, reason: Self.string(close.reply_text), replyCode: close.reply_code)
            }
            if reply.reply.id == staps_channel_close_method(), let decoded = reply.reply.decoded {
                let close = decoded.assumingMemoryBound(to: amqp_channel_close_t.self).pointee
                throw BrokerError(operation: operation, reason: Self.string(close.reply_text), replyCode: close.reply_code)
            }
            throw BrokerError(operation: operation, reason: "unexpected server method \(reply.reply.id)")
        default:
            throw BrokerError(operation: operation, reason: "no reply")
        }
    }

    public static func string(_ bytes: amqp_bytes_t) -> String {
        guard let p = bytes.bytes, bytes.len > 0 else { return "" }
        return String(decoding: UnsafeRawBufferPointer(start: p, count: bytes.len), as: UTF8.self)
    }

    /// Reads every frame already available, without blocking, and hands each method the link
    /// cares about to `handle`. Heartbeats are answered inside rabbitmq-c (it also sends ours
    /// when due); a close from the broker becomes an error. Returns how many frames were read.
    @discardableResult
    public func readEvents(_ operation: String, _ handle: (BrokerEvent) throws(BrokerError) -> Void) throws(BrokerError) -> Int {
        var frame = amqp_frame_t()
        var zero = timeval(tv_sec: 0, tv_usec: 0)
        var frames = 0
        while true {
            let status = amqp_simple_wait_frame_noblock(self.state, &frame, &zero)
            if status == AMQP_STATUS_TIMEOUT.rawValue { return frames }
            guard status == AMQP_STATUS_OK.rawValue else {
                self.isOpen = false
                throw BrokerError(operation: operation, reason: String(cString: amqp_error_string2(status)))
            }
            frames += 1
            guard frame.frame_type == UInt8(AMQP_FRAME_METHOD) else { continue }
            try self.dispatch(frame.payload.method, channel: frame.channel, operation, handle)
        }
    }

    /// One method frame read outside a consume, as an event (or an error for a close).
    public func dispatch(_ method: amqp_method_t, channel: amqp_channel_t, _ operation: String, _ handle: (BrokerEvent) throws(BrokerError) -> Void) throws(BrokerError) {
        let id = method.id
        switch id {
        case staps_connection_close_method(), staps_channel_close_method():
            self.isOpen = false
            var code: UInt16 = 0
            var text = ""
            if let decoded = method.decoded {
                if id == staps_connection_close_method() {
                    let c = decoded.assumingMemoryBound(to: amqp_connection_close_t.self).pointee
                    (code, text) = (c.reply_code, Self.string(c.reply_text))
                } else {
                    let c = decoded.assumingMemoryBound(to: amqp_channel_close_t.self).pointee
                    (code, text) = (c.reply_code, Self.string(c.reply_text))
                }
            }
            throw BrokerError(operation: operation, reason: "broker closed the \(id == staps_channel_close_method() ? "AMQP channel \(channel)" : "connection"): \(text)", replyCode: code)
        case staps_queue_bind_ok_method():
            try handle(.bindOK)
        case staps_queue_unbind_ok_method():
            try handle(.unbindOK)
        case staps_basic_ack_method():
            guard let decoded = method.decoded else { return }
            let ack = decoded.assumingMemoryBound(to: amqp_basic_ack_t.self).pointee
            try handle(.ack(tag: ack.delivery_tag, multiple: ack.multiple != 0))
        case staps_basic_nack_method():
            guard let decoded = method.decoded else { return }
            let nack = decoded.assumingMemoryBound(to: amqp_basic_nack_t.self).pointee
            try handle(.nack(tag: nack.delivery_tag, multiple: nack.multiple != 0))
        case staps_basic_cancel_method():
            try handle(.consumerCancelled)
        case staps_connection_blocked_method():
            var reason = ""
            if let decoded = method.decoded {
                reason = Self.string(decoded.assumingMemoryBound(to: amqp_connection_blocked_t.self).pointee.reason)
            }
            try handle(.blocked(reason: reason))
        case staps_connection_unblocked_method():
            try handle(.unblocked)
        default:
            break
        }
    }

    /// Sends `queue.bind` or `queue.unbind` on AMQP channel `amqpChannel` without waiting for the answer.
    public func sendTopology(_ operation: TopologyMethod, queue: CString, exchange: CString, key: CString, amqpChannel channel: amqp_channel_t) throws(BrokerError) {
        let empty = amqp_table_t(num_entries: 0, entries: nil)
        var status: Int32
        switch operation {
        case .bind:
            var method = amqp_queue_bind_t(ticket: 0, queue: queue.bytes, exchange: exchange.bytes, routing_key: key.bytes, nowait: 0, arguments: empty)
            status = amqp_send_method(self.state, channel, staps_queue_bind_method(), &method)
        case .unbind:
            var method = amqp_queue_unbind_t(ticket: 0, queue: queue.bytes, exchange: exchange.bytes, routing_key: key.bytes, arguments: empty)
            status = amqp_send_method(self.state, channel, staps_queue_unbind_method(), &method)
        }
        guard status == AMQP_STATUS_OK.rawValue else {
            self.isOpen = false
            throw BrokerError(operation: "send \(operation)", reason: String(cString: amqp_error_string2(status)))
        }
    }

    /// Sends a heartbeat frame (for a connection whose input the link is not reading).
    public func sendHeartbeat() throws(BrokerError) {
        var frame = amqp_frame_t()
        frame.frame_type = UInt8(AMQP_FRAME_HEARTBEAT)
        frame.channel = 0
        let status = amqp_send_frame(self.state, &frame)
        guard status == AMQP_STATUS_OK.rawValue else {
            self.isOpen = false
            throw BrokerError(operation: "send heartbeat", reason: String(cString: amqp_error_string2(status)))
        }
    }

    /// Bytes written to the socket that the broker has not acknowledged yet (0 when the kernel
    /// does not say): a live broker keeps this small, a frozen one lets it grow.
    public var unackedBytes: Int { max(0, staps_socket_unacked(self.fileDescriptor)) }

    /// True when a write of a few bytes would not block now (rabbitmq-c writes with no deadline).
    public var canWrite: Bool {
        var pfd = pollfd(fd: self.fileDescriptor, events: Int16(POLLOUT), revents: 0)
        return poll(&pfd, 1, 0) == 1 && pfd.revents & Int16(POLLOUT) != 0
    }

    /// True when the broker sent something not read yet (a heartbeat counts: rabbitmq-c
    /// consumes those itself and never returns them).
    public var hasInput: Bool {
        if self.hasBufferedInput { return true }
        var pfd = pollfd(fd: self.fileDescriptor, events: Int16(POLLIN), revents: 0)
        return poll(&pfd, 1, 0) == 1 && pfd.revents & Int16(POLLIN) != 0
    }

    /// A write failed or timed out part-way: nothing more may be written, not even a close.
    public func markBroken() { self.isOpen = false }

    /// Best-effort polite close (only when the socket takes it without waiting, and waiting at
    /// most a second for the broker's close-ok), then frees the connection.
    public func close() {
        if self.isOpen, self.canWrite {
            var second = timeval(tv_sec: 1, tv_usec: 0)
            _ = amqp_set_rpc_timeout(self.state, &second)
            _ = amqp_connection_close(self.state, Int32(AMQP_REPLY_SUCCESS))
        }
        self.isOpen = false
    }

    deinit {
        amqp_destroy_connection(self.state)
    }
}
