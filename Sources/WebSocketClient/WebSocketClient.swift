import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOWebSocket
import StapsNode

/// Where a staps node listens.
public enum Endpoint: Sendable, CustomStringConvertible {
    case tcp(host: String, port: Int)
    case unix(path: String)

    public var description: String {
        switch self {
        case .tcp(let host, let port): return "\(host):\(port)"
        case .unix(let path): return "unix:\(path)"
        }
    }
}

/// What a client connection reports, on its event loop.
public enum ClientEvent: Sendable {
    /// A whole message (fragments reassembled).
    case message(isText: Bool, ByteBuffer)
    /// The server's close frame (code nil when it carried none).
    case close(code: UInt16?, reason: String)
    /// The TCP connection ended.
    case disconnected
}

/// A connection's events in arrival order, for a reader that awaits them (the tests): pass
/// `receive` as `onEvent`, then await `next(timeout:)`. Nothing polls: a waiting reader is
/// resumed by the event itself, or by its timeout on `timeoutLoop`. One reader at a time. The
/// load generator does not use it: it counts in its own `onEvent`.
public final class ClientInbox: Sendable {
    private struct Waiter: Sendable {
        var continuation: CheckedContinuation<Void, Never>
        var timeout: Scheduled<Void>
        var id: UInt64
    }

    private struct State: Sendable {
        var events = CircularBuffer<ClientEvent>()
        var waiter: Waiter?
        var waits: UInt64 = 0
    }

    private let state = NIOLockedValueBox(State())
    private let timeoutLoop: EventLoop

    public init(timeoutLoop: EventLoop) {
        self.timeoutLoop = timeoutLoop
    }

    /// Queues `event` and wakes the reader waiting for one.
    public func receive(_ event: ClientEvent) {
        let waiter = self.state.withLockedValue { state -> Waiter? in
            state.events.append(event)
            defer { state.waiter = nil }
            return state.waiter
        }
        waiter?.timeout.cancel()
        waiter?.continuation.resume()
    }

    /// Takes the oldest event, waiting up to `timeout` for one; nil when none came.
    public func next(timeout: TimeAmount) async -> ClientEvent? {
        guard await self.waitForEvent(timeout: timeout) else { return nil }
        return self.state.withLockedValue { $0.events.popFirst() }
    }

    /// Waits up to `timeout` until an event is queued (it stays queued); whether one is.
    public func waitForEvent(timeout: TimeAmount) async -> Bool {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let waiting = self.state.withLockedValue { state -> Bool in
                guard state.events.isEmpty, timeout > .zero else { return false }
                precondition(state.waiter == nil, "ClientInbox: one reader at a time")
                state.waits &+= 1
                let id = state.waits
                let timer = self.timeoutLoop.scheduleTask(in: timeout) { self.timeOut(id) }
                state.waiter = Waiter(continuation: continuation, timeout: timer, id: id)
                return true
            }
            if !waiting { continuation.resume() }
        }
        return self.state.withLockedValue { !$0.events.isEmpty }
    }

    private func timeOut(_ id: UInt64) {
        let waiter = self.state.withLockedValue { state -> Waiter? in
            guard let waiter = state.waiter, waiter.id == id else { return nil }
            state.waiter = nil
            return waiter
        }
        waiter?.continuation.resume()
    }
}

/// The handshake did not end in 101.
public struct HandshakeError: Error, CustomStringConvertible {
    public var status: Int
    public var head: String
    public var body: String
    public var description: String { "websocket handshake failed with HTTP \(status): \(body)" }
}

/// A small websocket client on NIO (masking and framing by NIOWebSocket, independent of the
/// server's own framing code). Used by the tests and by `staps-bench`.
public final class WebSocketClient: Sendable {
    public let connection: Channel
    /// The 101 response head, as the server sent it.
    public let handshakeHead: String

    init(connection: Channel, handshakeHead: String) {
        self.connection = connection
        self.handshakeHead = handshakeHead
    }

    /// The value of a response header of the handshake (case-insensitive name).
    public func handshakeHeader(_ name: String) -> String? {
        let prefix = name.lowercased() + ":"
        for line in self.handshakeHead.split(separator: "\r\n") where line.lowercased().hasPrefix(prefix) {
            return String(line.dropFirst(prefix.count)).trimmingCharacters()
        }
        return nil
    }

    /// Connects and completes the opening handshake; `onEvent` runs on the channel's event loop.
    public static func connect(
        to endpoint: Endpoint,
        path: String,
        headers: [(String, String)] = [],
        group: EventLoopGroup,
        maxMessageSize: Int = 64 << 20,
        autoRead: Bool = true,
        onEvent: @escaping @Sendable (ClientEvent) -> Void
    ) async throws -> WebSocketClient {
        let key = NIOWebSocketClientUpgrader.randomRequestKey()
        let host: String
        switch endpoint {
        case .tcp(let h, let p): host = "\(h):\(p)"
        case .unix: host = "localhost"
        }
        var request = "GET \(path) HTTP/1.1\r\nHost: \(host)\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        request += "Sec-WebSocket-Key: \(key)\r\nSec-WebSocket-Version: 13\r\n"
        for (name, value) in headers { request += "\(name): \(value)\r\n" }
        request += "\r\n"
        let requestBytes = request
        let done = group.any().makePromise(of: String.self)
        var bootstrap = ClientBootstrap(group: group)
        if case .tcp = endpoint { bootstrap = bootstrap.channelOption(.tcpOption(.tcp_nodelay), value: 1) }
        bootstrap = bootstrap
            .channelOption(.autoRead, value: autoRead)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        HandshakeHandler(expectedAccept: acceptValue(key), maxMessageSize: maxMessageSize, done: done, onEvent: onEvent)
                    )
                }
            }
        let channel: Channel
        switch endpoint {
        case .tcp(let h, let p): channel = try await bootstrap.connect(host: h, port: p).get()
        case .unix(let path): channel = try await bootstrap.connect(unixDomainSocketPath: path).get()
        }
        try await channel.writeAndFlush(channel.allocator.buffer(string: requestBytes)).get()
        if !autoRead { channel.read() }
        let head: String
        do {
            head = try await done.futureResult.get()
        } catch {
            try? await channel.close()
            throw error
        }
        return WebSocketClient(connection: channel, handshakeHead: head)
    }

    /// Sends one masked frame (FIN unless `fin` is false); not flushed unless `flush`.
    public func send(opcode: WebSocketOpcode, _ payload: ByteBuffer, fin: Bool = true, flush: Bool = true) {
        let frame = WebSocketFrame(fin: fin, opcode: opcode, maskKey: .random(), data: payload)
        if flush {
            self.connection.writeAndFlush(frame, promise: nil)
        } else {
            self.connection.write(frame, promise: nil)
        }
    }

    public func send(text: String) {
        self.send(opcode: .text, self.connection.allocator.buffer(string: text))
    }

    public func send(binary: [UInt8]) {
        self.send(opcode: .binary, self.connection.allocator.buffer(bytes: binary))
    }

    /// Sends a close frame; the server answers and drops the connection.
    public func close(code: UInt16 = 1000, reason: String = "") {
        var payload = self.connection.allocator.buffer(capacity: 2 + reason.utf8.count)
        payload.writeInteger(code)
        payload.writeString(reason)
        self.send(opcode: .connectionClose, payload)
    }

    /// Drops the TCP connection without a closing handshake.
    public func disconnect() async {
        try? await self.connection.close()
    }
}

func acceptValue(_ key: String) -> String {
    WebSocketAccept.value(forKey: key)
}

/// Reads the 101 response, then turns the pipeline into a websocket one.
final class HandshakeHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer

    let done: EventLoopPromise<String>
    private let expectedAccept: String
    private let maxMessageSize: Int
    private let onEvent: @Sendable (ClientEvent) -> Void
    private var received: ByteBuffer?

    init(expectedAccept: String, maxMessageSize: Int, done: EventLoopPromise<String>, onEvent: @escaping @Sendable (ClientEvent) -> Void) {
        self.expectedAccept = expectedAccept
        self.maxMessageSize = maxMessageSize
        self.done = done
        self.onEvent = onEvent
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var chunk = self.unwrapInboundIn(data)
        var buffer = self.received ?? context.channel.allocator.buffer(capacity: 512)
        buffer.writeBuffer(&chunk)
        let bytes = Array(buffer.readableBytesView)
        guard let end = Self.headerEnd(bytes) else {
            self.received = buffer
            if bytes.count > 64 << 10 { self.fail(context, HandshakeError(status: 0, head: "", body: "response head too large")) }
            if !context.channel.isAutoReadOn { context.read() }
            return
        }
        let head = String(decoding: bytes[..<end], as: UTF8.self)
        let lines = head.split(separator: "\r\n", omittingEmptySubsequences: false)
        let statusParts = lines.first?.split(separator: " ") ?? []
        let status = statusParts.count >= 2 ? Int(statusParts[1]) ?? 0 : 0
        guard status == 101 else {
            // Read the rest of a short body for the error message.
            let body = String(decoding: bytes[(end + 4)...], as: UTF8.self)
            self.fail(context, HandshakeError(status: status, head: head, body: body.trimmingCharacters()))
            return
        }
        let accept = lines.dropFirst().first { $0.lowercased().hasPrefix("sec-websocket-accept:") }
            .map { String($0.dropFirst("sec-websocket-accept:".count)).trimmingCharacters() }
        guard accept == self.expectedAccept else {
            self.fail(context, HandshakeError(status: status, head: head, body: "bad Sec-WebSocket-Accept"))
            return
        }
        buffer.moveReaderIndex(forwardBy: end + 4)
        do {
            let ops = context.pipeline.syncOperations
            try ops.addHandler(WebSocketFrameEncoder(), position: .after(self))
            let encoder = try ops.handler(type: WebSocketFrameEncoder.self)
            try ops.addHandler(ByteToMessageHandler(WebSocketFrameDecoder(maxFrameSize: self.maxMessageSize)), position: .after(encoder))
            let decoder = try ops.handler(type: ByteToMessageHandler<WebSocketFrameDecoder>.self)
            try ops.addHandler(ClientFrameHandler(maxMessageSize: self.maxMessageSize, onEvent: self.onEvent), position: .after(decoder))
            ops.removeHandler(context: context, promise: nil)
            self.done.succeed(head)
            if buffer.readableBytes > 0 { context.fireChannelRead(NIOAny(buffer)) }
        } catch {
            self.fail(context, error)
        }
    }

    private func fail(_ context: ChannelHandlerContext, _ error: Error) {
        self.done.fail(error)
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.done.fail(HandshakeError(status: 0, head: "", body: "connection closed during the handshake"))
        context.fireChannelInactive()
    }

    static func headerEnd(_ bytes: [UInt8]) -> Int? {
        guard bytes.count >= 4 else { return nil }
        for i in 0...(bytes.count - 4) where bytes[i] == 13 && bytes[i + 1] == 10 && bytes[i + 2] == 13 && bytes[i + 3] == 10 {
            return i
        }
        return nil
    }
}

extension Channel {
    var isAutoReadOn: Bool { (try? self.syncOptions?.getOption(.autoRead)) ?? true }
}

/// Reassembles messages, answers pings, reports close frames.
final class ClientFrameHandler: ChannelInboundHandler {
    typealias InboundIn = WebSocketFrame
    typealias OutboundOut = WebSocketFrame

    private let maxMessageSize: Int
    private let onEvent: @Sendable (ClientEvent) -> Void
    private var fragments: ByteBuffer?
    private var fragmentsAreText = false
    private var closed = false

    init(maxMessageSize: Int, onEvent: @escaping @Sendable (ClientEvent) -> Void) {
        self.maxMessageSize = maxMessageSize
        self.onEvent = onEvent
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = self.unwrapInboundIn(data)
        switch frame.opcode {
        case .text, .binary:
            if frame.fin {
                self.onEvent(.message(isText: frame.opcode == .text, frame.unmaskedData))
            } else {
                self.fragments = frame.unmaskedData
                self.fragmentsAreText = frame.opcode == .text
            }
        case .continuation:
            guard var buffer = self.fragments else { return }
            var data = frame.unmaskedData
            buffer.writeBuffer(&data)
            if frame.fin {
                self.fragments = nil
                self.onEvent(.message(isText: self.fragmentsAreText, buffer))
            } else {
                self.fragments = buffer
            }
        case .ping:
            let pong = WebSocketFrame(fin: true, opcode: .pong, maskKey: .random(), data: frame.unmaskedData)
            context.writeAndFlush(self.wrapOutboundOut(pong), promise: nil)
        case .connectionClose:
            var data = frame.unmaskedData
            let code = data.readInteger(as: UInt16.self)
            let reason = data.readString(length: data.readableBytes) ?? ""
            if !self.closed {
                self.closed = true
                self.onEvent(.close(code: code, reason: reason))
                // Complete the closing handshake (RFC 6455 §5.5.1): echo the code.
                var echo = context.channel.allocator.buffer(capacity: 2)
                if let code { echo.writeInteger(code) }
                let reply = WebSocketFrame(fin: true, opcode: .connectionClose, maskKey: .random(), data: echo)
                context.writeAndFlush(self.wrapOutboundOut(reply), promise: nil)
            }
        default:
            break
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.onEvent(.disconnected)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }
}

extension String {
    func trimmingCharacters() -> String {
        var s = Substring(self)
        while let c = s.first, c == " " || c == "\r" || c == "\n" || c == "\t" { s = s.dropFirst() }
        while let c = s.last, c == " " || c == "\r" || c == "\n" || c == "\t" { s = s.dropLast() }
        return String(s)
    }
}
