import StapsCluster

/// Why a request path is not a channel; answered as an HTTP status before any upgrade.
public struct PathError: Error, Equatable, CustomStringConvertible {
    /// 400 or 414.
    public var status: Int
    /// A one-line reason for the response body.
    public var reason: String

    public var description: String { "\(status): \(reason)" }
}

/// What a request path names.
public enum RequestTarget: Equatable, Sendable {
    /// `/` alone: no channel, the index page.
    case root
    /// A channel: the path without its leading `/` and query, percent-decoded.
    case channel(String)
}

/// Turning request paths into channel names.
public enum PathDecoding {
    /// Channel names hold 1 to 256 bytes of valid UTF-8 after decoding.
    public static let maxChannelBytes = 256

    /// Parses the request URI (`/a%2Eb?x=1`). `/a%2Eb` and `/a.b` name the same channel.
    public static func target(ofURI uri: String) -> Result<RequestTarget, PathError> {
        var path = Substring(uri)
        if let q = path.firstIndex(where: { $0 == "?" || $0 == "#" }) { path = path[..<q] }
        guard path.hasPrefix("/") else {
            return .failure(PathError(status: 400, reason: "request path must start with /"))
        }
        let encoded = Array(path.utf8.dropFirst())
        if encoded.isEmpty { return .success(.root) }
        // Decoding never grows a path, so a path 3x over the limit is too long whatever it holds.
        if encoded.count > maxChannelBytes * 3 {
            return .failure(PathError(status: 414, reason: "channel name longer than \(maxChannelBytes) bytes"))
        }
        var decoded: [UInt8] = []
        decoded.reserveCapacity(encoded.count)
        guard PercentEncoding.decode(encoded, into: &decoded) else {
            return .failure(PathError(status: 400, reason: "bad percent-encoding in channel name"))
        }
        if decoded.count > maxChannelBytes {
            return .failure(PathError(status: 414, reason: "channel name longer than \(maxChannelBytes) bytes"))
        }
        if decoded.contains(0) {
            return .failure(PathError(status: 400, reason: "channel name contains a NUL byte"))
        }
        guard let name = String(validating: decoded, as: UTF8.self) else {
            return .failure(PathError(status: 400, reason: "channel name is not valid UTF-8"))
        }
        return .success(.channel(name))
    }
}
