import Logging
import NIOCore
import NIOHTTP1

/// A websocket handshake that passed every check, and the switch of its connection from HTTP
/// to the websocket protocol.
///
/// Done here rather than by NIO's upgrade handler so that attaching the client to its staps
/// channel, swapping the pipeline and writing the 101 happen in one event-loop step: a client
/// receives its channel's messages before it can see its handshake complete.
struct WebSocketUpgrade {
    let channel: String
    let key: String
    let version: HTTPVersion

    /// `Connection: upgrade` and `Upgrade: websocket`, each possibly among other tokens.
    static func isRequested(by headers: HTTPHeaders) -> Bool {
        headers[canonicalForm: "connection"].contains { $0.lowercased() == "upgrade" }
            && headers[canonicalForm: "upgrade"].contains { $0.lowercased() == "websocket" }
    }

    /// The handshake's checks, in the order their answers are documented (pure).
    static func route(_ head: HTTPRequestHead, target: RequestTarget, access: AccessSettings) -> RequestRoute {
        guard head.method == .GET else {
            return .refuse(Refusal(status: .methodNotAllowed, reason: "websocket upgrade needs GET", extraHeaders: [("Allow", "GET")]))
        }
        guard case .channel(let name) = target else {
            return .refuse(Refusal(status: .badRequest, reason: "/ is not a channel: connect to /<channel>"))
        }
        if let reason = access.refusal(origin: head.headers["origin"]) {
            return .refuse(Refusal(status: .forbidden, reason: reason))
        }
        guard head.version.major > 1 || (head.version.major == 1 && head.version.minor >= 1) else {
            return .refuse(Refusal(status: .badRequest, reason: "websocket upgrade needs HTTP/1.1", closes: true))
        }
        guard !RequestRoute.hasBody(head) else {
            return .refuse(Refusal(status: .badRequest, reason: "a websocket upgrade request has no body", closes: true))
        }
        guard head.headers["sec-websocket-version"] == ["13"] else {
            return .refuse(Refusal(status: .upgradeRequired, reason: "unsupported websocket version: use 13", extraHeaders: [("Sec-WebSocket-Version", "13")]))
        }
        let keys = head.headers["sec-websocket-key"]
        guard keys.count == 1, let key = keys.first?.trimmingWhitespace(), Self.isValidKey(key) else {
            return .refuse(Refusal(status: .badRequest, reason: "missing, repeated or malformed Sec-WebSocket-Key (base64 of 16 bytes)"))
        }
        return .upgrade(WebSocketUpgrade(channel: name, key: key, version: head.version))
    }

    /// A `Sec-WebSocket-Key` is the base64 of 16 bytes: 22 characters, the last of them
    /// carrying 2 zero bits, then `==` (RFC 6455 §4.1).
    static func isValidKey(_ key: String) -> Bool {
        let bytes = Array(key.utf8)
        guard bytes.count == 24, bytes[22] == UInt8(ascii: "="), bytes[23] == UInt8(ascii: "=") else { return false }
        func isBase64(_ b: UInt8) -> Bool {
            (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || (b >= 0x30 && b <= 0x39) || b == 0x2B || b == 0x2F
        }
        return bytes[..<22].allSatisfy(isBase64) && "AQgw".utf8.contains(bytes[21])
    }

    /// The 101 (pure).
    func response(nodeID: String) -> HTTPResponseHead {
        var headers = HTTPHeaders()
        headers.add(name: "Upgrade", value: "websocket")
        headers.add(name: "Connection", value: "Upgrade")
        headers.add(name: "Sec-WebSocket-Accept", value: WebSocketAccept.value(forKey: self.key))
        headers.add(name: "X-Staps-Node", value: nodeID)
        return HTTPResponseHead(version: self.version, status: .switchingProtocols, headers: headers)
    }

    /// Attaches the client, answers 101 and leaves HTTP, all in this one event-loop step: adds
    /// the websocket handler (which keeps the connection alive itself) after `http` (the HTTP
    /// handler's context), writes the 101 through it, then removes it and `codec` (the HTTP
    /// decoder and encoder), so the websocket handler is the pipeline's only one. The request's
    /// `.end` has been read, so the decoder has nothing more to hand on. Should the pipeline
    /// refuse the handler, the client leaves its channel and the connection closes. `logger` is
    /// the node's (the websocket handler adds the connection's metadata to each line it logs).
    func switchProtocols(_ http: ChannelHandlerContext, codec: [RemovableChannelHandler], membership: Membership, id: UInt64, permission: Permission, shared: HTTPHandler.Shared, logger: Logger) {
        let ops = http.pipeline.syncOperations
        do {
            // The directory already counts this client; adding the handler attaches its
            // membership, so it receives from here on, and the handler leaves it when removed
            // (`leave()` is idempotent, so leaving it below too is safe).
            try ops.addHandler(WebSocketHandler(id: id, membership: membership, limits: shared.limits, counters: shared.counters, logger: logger, permission: permission), position: .after(http.handler))
        } catch {
            membership.leave()
            logger.warning("websocket upgrade failed", metadata: ["error": "\(error)", "connection.id": "\(id)", "channel": "\(self.channel)"])
            return http.close(promise: nil)
        }

        http.write(NIOAny(HTTPServerResponsePart.head(self.response(nodeID: shared.nodeID))), promise: nil)
        http.writeAndFlush(NIOAny(HTTPServerResponsePart.end(nil)), promise: nil)

        ops.removeHandler(context: http, promise: nil)
        for handler in codec { ops.removeHandler(handler, promise: nil) }
        // One read per event-loop turn: with the handler's per-turn message budget, one
        // flooding client cannot hold its loop.
        http.channel.setOption(ChannelOptions.maxMessagesPerRead, value: 1).whenComplete { _ in }
        http.channel.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
    }
}
