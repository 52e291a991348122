import Atomics
import Logging
import NIOCore
import NIOHTTP1

/// The handlers every accepted connection starts with: HTTP/1 in front of the in-house
/// websocket upgrade. One place, so the node, the in-memory tests and the fuzz targets drive
/// the very same pipeline.
enum ConnectionPipeline {
    /// The largest request head (request line and headers) read: a valid one is a few hundred
    /// bytes. Beyond it: 414 for the request line, 431 for the headers.
    static let maxHeadBytes = 8 << 10
    /// The most header fields a request may have (431 beyond).
    static let maxHeaderFields = 100

    /// Adds the HTTP handlers to a new connection's pipeline (synchronously, on its loop).
    /// `logger` is the node's: the handlers add the connection's metadata.
    static func configure(_ connection: Channel, shared: HTTPHandler.Shared, overConnectionLimit: Bool, logger: Logger) throws {
        var decoderLimits = NIOHTTPDecoderLimitConfiguration()
        decoderLimits.maxHeaderFieldSize = Self.maxHeadBytes
        decoderLimits.maxHeaderListSize = Self.maxHeadBytes
        decoderLimits.maxHeaderFieldCount = Self.maxHeaderFields
        let encoder = HTTPResponseEncoder()
        let decoder = ByteToMessageHandler(HTTPRequestDecoder(leftOverBytesStrategy: .forwardBytes, informationalResponseStrategy: .drop, limitConfiguration: decoderLimits))
        let ops = connection.pipeline.syncOperations
        try ops.addHandler(encoder)
        try ops.addHandler(RequestLineLimit(limit: Self.maxHeadBytes, nodeID: shared.nodeID))
        try ops.addHandler(decoder)
        try ops.addHandler(HTTPHandler(shared: shared, overConnectionLimit: overConnectionLimit, encoder: encoder, decoder: decoder, logger: logger))
    }
}

extension HTTPHandler {
    /// What every connection's HTTP handler is given: the node's parts and settings.
    struct Shared: Sendable {
        let hub: Hub
        let limits: Limits
        let counters: NodeCounters
        let connectionIDs: ManagedAtomic<UInt64>
        let nodeID: String
        var access = AccessSettings()
        /// Asks the authorization hook; nil when `auth_url` is not set.
        var authorizer: Authorizer? = nil
    }
}

/// Answers 414 when a connection's first request line runs past the head limit, and steps aside
/// at that line's end. Hand-written: NIO's decoder alone reports it as a header overflow (431).
final class RequestLineLimit: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundOut = HTTPServerResponsePart

    private let limit: Int
    private let nodeID: String
    private var seen = 0
    private var failed = false

    init(limit: Int, nodeID: String) {
        self.limit = limit
        self.nodeID = nodeID
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !self.failed else { return }
        let bytes = self.unwrapInboundIn(data)
        let view = bytes.readableBytesView
        if let end = view.firstIndex(of: UInt8(ascii: "\n")), self.seen + (end - view.startIndex) <= self.limit {
            context.fireChannelRead(data)
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
            return
        }
        self.seen += bytes.readableBytes
        guard self.seen > self.limit else { return context.fireChannelRead(data) }
        self.failed = true
        let body = "request line longer than \(self.limit) bytes\n"
        let headers = HTTPHeaders([
            ("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", "\(body.utf8.count)"),
            ("X-Staps-Node", self.nodeID), ("Connection", "close"),
        ])
        context.write(self.wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .uriTooLong, headers: headers))), promise: nil)
        context.write(self.wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
        // Written on the connection's loop, so its future completes there.
        context.writeAndFlush(self.wrapOutboundOut(.end(nil))).assumeIsolated().whenComplete { _ in context.close(promise: nil) }
    }
}
