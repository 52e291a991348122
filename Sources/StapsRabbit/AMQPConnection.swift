import CRabbit
import StapsNode

#if canImport(Glibc)
import Glibc
#endif

/// A broker problem, named by the operation that met it. Never holds the password.
public struct BrokerError: Error, CustomStringConvertible {
    public var operation: String
    public var reason: String
    /// The AMQP reply code when the broker closed the channel or connection (403, 404, 406, 530…).
    public var replyCode: UInt16?

    public var description: String {
        replyCode.map { "\(operation): broker replied \($0): \(reason)" } ?? "\(operation): \(reason)"
    }
}

/// A C string that lives as long as this object: what `amqp_bytes_t` may point at.
final class CString {
    let pointer: UnsafeMutablePointer<CChar>
    let count: Int

    init(_ s: String) {
        self.pointer = strdup(s)!
        self.count = s.utf8.count
    }

    deinit { free(self.pointer) }

    var bytes: amqp_bytes_t { amqp_bytes_t(len: self.count, bytes: UnsafeMutableRawPointer(self.pointer)) }
    var rawBytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: self.pointer, count: self.count) }
}

/// One rabbitmq-c connection with channel 1 open. Owned by one thread; closed explicitly.
final class AMQPConnection {
    let state: amqp_connection_state_t
    private(set) var isOpen = true

    /// Opens, logs in and opens channel 1. A half-opened connection is destroyed before throwing:
    /// once `state` is stored the object is whole, so a throw runs `deinit`, which frees it.
    init(url: AMQPURL, heartbeatSeconds: Int32, connectTimeout: Int) throws(BrokerError) {
        guard let state = amqp_new_connection() else {
            throw BrokerError(operation: "connect", reason: "out of memory")
        }
        self.state = state
        let socket = url.tls ? amqp_ssl_socket_new(state) : amqp_tcp_socket_new(state)
        guard let socket else {
            throw BrokerError(operation: "connect", reason: "cannot create a \(url.tls ? "TLS" : "TCP") socket")
        }
        if url.tls {
            // rabbitmq-c verifies the peer by default but loads no CA certificates itself.
            let bundle = "/etc/ssl/certs/ca-certificates.crt"
            if access(bundle, R_OK) == 0, amqp_ssl_socket_set_cacert(socket, bundle) != AMQP_STATUS_OK.rawValue {
                throw BrokerError(operation: "connect", reason: "cannot load CA certificates from \(bundle)")
            }
        }
        var timeout = timeval(tv_sec: connectTimeout, tv_usec: 0)
        // No broker reply may hold the link's thread longer than this.
        _ = amqp_set_handshake_timeout(state, &timeout)
        _ = amqp_set_rpc_timeout(state, &timeout)
        let status = amqp_socket_open_noblock(socket, url.host, Int32(url.port), &timeout)
        guard status == AMQP_STATUS_OK.rawValue else {
            throw BrokerError(operation: "connect to \(url.host):\(url.port)", reason: String(cString: amqp_error_string2(status)))
        }
        try Self.check(staps_amqp_login_plain(state, url.vhost, 0, 131_072, heartbeatSeconds, url.user, url.password),
                       "log in to vhost '\(url.vhost)' as '\(url.user)'", state: state)
        amqp_channel_open(state, 1)
        try Self.check(amqp_get_rpc_reply(state), "open channel", state: state)
    }

    var fileDescriptor: Int32 { amqp_get_sockfd(self.state) }

    /// True when rabbitmq-c already holds bytes or frames we have not consumed (poll would miss them).
    var hasBufferedInput: Bool {
        amqp_data_in_buffer(self.state) != 0 || amqp_frames_enqueued(self.state) != 0
    }

    func check(_ reply: amqp_rpc_reply_t, _ operation: String) throws(BrokerError) {
        do {
            try Self.check(reply, operation, state: self.state)
        } catch {
            self.isOpen = false
            throw error
        }
    }

    /// The one place `amqp_rpc_reply_t` becomes an error naming the operation.
    static func check(_ reply: amqp_rpc_reply_t, _ operation: String, state: amqp_connection_state_t) throws(BrokerError) {
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

    static func string(_ bytes: amqp_bytes_t) -> String {
        guard let p = bytes.bytes, bytes.len > 0 else { return "" }
        return String(decoding: UnsafeRawBufferPointer(start: p, count: bytes.len), as: UTF8.self)
    }

    /// Reads and discards what the broker sent outside a consume (heartbeats are answered inside
    /// rabbitmq-c); a close from the broker becomes an error.
    func serviceWithoutBlocking(_ operation: String) throws(BrokerError) {
        var frame = amqp_frame_t()
        var zero = timeval(tv_sec: 0, tv_usec: 0)
        while true {
            let status = amqp_simple_wait_frame_noblock(self.state, &frame, &zero)
            if status == AMQP_STATUS_TIMEOUT.rawValue { return }
            guard status == AMQP_STATUS_OK.rawValue else {
                self.isOpen = false
                throw BrokerError(operation: operation, reason: String(cString: amqp_error_string2(status)))
            }
            if frame.frame_type == UInt8(AMQP_FRAME_METHOD) {
                let id = frame.payload.method.id
                if id == staps_connection_close_method() || id == staps_channel_close_method() {
                    self.isOpen = false
                    var code: UInt16 = 0
                    var text = ""
                    if let decoded = frame.payload.method.decoded {
                        if id == staps_connection_close_method() {
                            let c = decoded.assumingMemoryBound(to: amqp_connection_close_t.self).pointee
                            code = c.reply_code
                            text = Self.string(c.reply_text)
                        } else {
                            let c = decoded.assumingMemoryBound(to: amqp_channel_close_t.self).pointee
                            code = c.reply_code
                            text = Self.string(c.reply_text)
                        }
                    }
                    throw BrokerError(operation: operation, reason: text, replyCode: code)
                }
            }
        }
    }

    /// Best-effort polite close, then frees the connection.
    func close() {
        if self.isOpen {
            _ = amqp_channel_close(self.state, 1, Int32(AMQP_REPLY_SUCCESS))
            _ = amqp_connection_close(self.state, Int32(AMQP_REPLY_SUCCESS))
        }
        self.isOpen = false
    }

    deinit {
        amqp_destroy_connection(self.state)
    }
}
