import Logging
import NIOCore
import NIOHTTP1

/// The handlers every accepted connection starts with: HTTP/1 in front of the in-house
/// websocket upgrade. One place, so the node, the in-memory tests and the fuzz targets drive
/// the very same pipeline.
enum ConnectionPipeline {
    /// Adds the HTTP handlers to a new connection's pipeline (synchronously, on its loop).
    static func configure(_ connection: Channel, shared: HTTPHandler.Shared, overConnectionLimit: Bool, logger: Logger) throws {
        let encoder = HTTPResponseEncoder()
        let decoder = ByteToMessageHandler(HTTPRequestDecoder(leftOverBytesStrategy: .forwardBytes))
        let ops = connection.pipeline.syncOperations
        try ops.addHandler(encoder)
        try ops.addHandler(decoder)
        try ops.addHandler(HTTPServerProtocolErrorHandler())
        try ops.addHandler(HTTPHandler(shared: shared, overConnectionLimit: overConnectionLimit, encoder: encoder, decoder: decoder, logger: logger))
    }
}
