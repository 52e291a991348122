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
        guard percentDecode(encoded, into: &decoded) else {
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

    /// Decodes `%XX` escapes; false on a `%` not followed by two hex digits. `+` stays `+`.
    static func percentDecode(_ input: [UInt8], into out: inout [UInt8]) -> Bool {
        var i = 0
        while i < input.count {
            let c = input[i]
            if c == UInt8(ascii: "%") {
                guard i + 2 < input.count, let hi = hexValue(input[i + 1]), let lo = hexValue(input[i + 2]) else { return false }
                out.append(hi << 4 | lo)
                i += 3
            } else {
                out.append(c)
                i += 1
            }
        }
        return true
    }

    private static func hexValue(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - UInt8(ascii: "A") + 10
        default: return nil
        }
    }

    /// Percent-encodes a channel name for use in a URL path (unreserved characters and `/` stay).
    public static func encode(_ name: String) -> String {
        var out = ""
        for b in name.utf8 {
            switch b {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"), UInt8(ascii: "/"):
                out.unicodeScalars.append(UnicodeScalar(b))
            default:
                let hex = Array("0123456789ABCDEF".utf8)
                out += "%"
                out.unicodeScalars.append(UnicodeScalar(hex[Int(b >> 4)]))
                out.unicodeScalars.append(UnicodeScalar(hex[Int(b & 0xF)]))
            }
        }
        return out
    }
}
