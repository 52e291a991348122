import Logging
import NIOCore
import NIOHTTP1

/// The websocket upgrade: checking the handshake, joining the channel, swapping the pipeline.
extension HTTPHandler {
    func upgradeRequest(_ head: HTTPRequestHead, target: RequestTarget, context: ChannelHandlerContext) {
        guard head.method == .GET else {
            return self.reject(head, .methodNotAllowed, "websocket upgrade needs GET", extraHeaders: [("Allow", "GET")], context: context)
        }
        guard case .channel(let name) = target else {
            return self.reject(head, .badRequest, "/ is not a channel: connect to /<channel>", context: context)
        }
        if let reason = self.shared.access.refusal(origin: head.headers["origin"]) {
            return self.reject(head, .forbidden, reason, context: context)
        }
        guard head.version.major > 1 || (head.version.major == 1 && head.version.minor >= 1) else {
            return self.reject(head, .badRequest, "websocket upgrade needs HTTP/1.1", close: true, context: context)
        }
        guard !Self.hasBody(head) else {
            return self.reject(head, .badRequest, "a websocket upgrade request has no body", close: true, context: context)
        }
        guard head.headers["sec-websocket-version"] == ["13"] else {
            return self.reject(head, .upgradeRequired, "unsupported websocket version: use 13", extraHeaders: [("Sec-WebSocket-Version", "13")], context: context)
        }
        let keys = head.headers["sec-websocket-key"]
        guard keys.count == 1, let key = keys.first?.trimmingWhitespace(), Self.isValidKey(key) else {
            return self.reject(head, .badRequest, "missing, repeated or malformed Sec-WebSocket-Key (base64 of 16 bytes)", context: context)
        }
        // Nothing more is read until the pipeline is a websocket one.
        context.channel.setOption(ChannelOptions.autoRead, value: false).whenComplete { _ in }
        self.state = .awaitingUpgradeEnd(head, channel: name, key: key)
    }

    /// Joins the staps channel (cluster-wide when clustered), then upgrades. Runs on the
    /// request's `.end`, so the HTTP decoder has nothing more to hand on when the pipeline changes.
    /// Until the websocket handler holds the membership, every path that gives up leaves it.
    func join(_ head: HTTPRequestHead, channel name: String, key: String, permission: Permission, context: ChannelHandlerContext) {
        self.state = .upgrading
        let (membership, ready) = self.shared.hub.join(name, on: context.eventLoop)
        let id = self.shared.connectionIDs.wrappingIncrementThenLoad(ordering: .relaxed)
        self.logger[metadataKey: "connection.id"] = "\(id)"
        self.logger[metadataKey: "channel"] = "\(name)"
        ready.assumeIsolated().whenComplete { result in
            switch result {
            case .success:
                guard context.channel.isActive else {
                    membership.leave()
                    context.close(promise: nil)
                    return
                }
                guard !self.shuttingDown else {
                    membership.leave()
                    self.state = .idle
                    self.respond(context: context, head: head, status: .serviceUnavailable, text: "server shutting down", close: true)
                    return
                }
                do {
                    try self.completeUpgrade(context: context, head: head, key: key, membership: membership, id: id, permission: permission)
                } catch {
                    membership.leave()
                    self.logger.warning("upgrade failed", metadata: ["error": "\(error)"])
                    context.close(promise: nil)
                }
            case .failure(let error):
                membership.leave()
                self.logger.warning("channel subscription failed", metadata: ["error": "\(error)"])
                self.state = .idle
                self.respond(context: context, head: head, status: .serviceUnavailable, text: "channel subscription failed: \(error)", close: true)
            }
        }
    }

    /// Attaches, swaps the pipeline and answers 101, all in this one event-loop step.
    func completeUpgrade(context: ChannelHandlerContext, head: HTTPRequestHead, key: String, membership: Membership, id: UInt64, permission: Permission) throws {
        let limits = self.shared.limits
        let ops = context.pipeline.syncOperations
        let websocket = WebSocketHandler(id: id, membership: membership, limits: limits, counters: self.shared.counters, logger: self.logger, permission: permission)
        try ops.addHandler(IdleStateHandler(readTimeout: limits.pingInterval), position: .after(self))
        let idle = try ops.context(handlerType: IdleStateHandler.self)
        // The directory already counts this client; adding the handler attaches its membership,
        // so it receives from here on, and the handler leaves it when removed (`leave()` is
        // idempotent, so the catch in `join` may leave it too).
        try ops.addHandler(websocket, position: .after(idle.handler))

        var headers = HTTPHeaders()
        headers.add(name: "Upgrade", value: "websocket")
        headers.add(name: "Connection", value: "Upgrade")
        headers.add(name: "Sec-WebSocket-Accept", value: WebSocketAccept.value(forKey: key))
        headers.add(name: "X-Staps-Node", value: self.shared.nodeID)
        context.write(self.wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: .switchingProtocols, headers: headers))), promise: nil)
        context.writeAndFlush(self.wrapOutboundOut(.end(nil)), promise: nil)

        ops.removeHandler(context: context, promise: nil)
        ops.removeHandler(self.decoder, promise: nil)
        ops.removeHandler(self.encoder, promise: nil)
        // One read per event-loop turn: with the handler's per-turn message budget, one
        // flooding client cannot hold its loop.
        context.channel.setOption(ChannelOptions.maxMessagesPerRead, value: 1).whenComplete { _ in }
        context.channel.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
    }
}
