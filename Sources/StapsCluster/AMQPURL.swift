/// A parsed `amqp://user:pass@host:port/vhost` (or `amqps://`) URL, with rabbitmq-c's defaults
/// (`guest`/`guest`, `localhost`, 5672 or 5671, vhost `/`).
public struct AMQPURL: Sendable, Equatable, CustomStringConvertible {
    public var tls: Bool
    public var user: String
    public var password: String
    public var host: String
    public var port: Int
    public var vhost: String

    public struct Failure: Error, Equatable {
        public var message: String
    }

    public init(_ url: String) throws(Failure) {
        var rest: Substring
        if url.hasPrefix("amqps://") {
            self.tls = true
            rest = url.dropFirst("amqps://".count)
        } else if url.hasPrefix("amqp://") {
            self.tls = false
            rest = url.dropFirst("amqp://".count)
        } else {
            throw Failure(message: "'\(AMQPURL.masked(url))' is not an amqp:// or amqps:// URL")
        }
        self.user = "guest"
        self.password = "guest"
        self.vhost = "/"
        self.port = self.tls ? 5671 : 5672
        if let slash = rest.firstIndex(of: "/") {
            let path = rest[rest.index(after: slash)...]
            if !path.isEmpty {
                guard let v = PercentEncoding.decoded(path) else { throw Failure(message: "bad percent-encoding in the vhost of '\(AMQPURL.masked(url))'") }
                self.vhost = v
            }
            rest = rest[..<slash]
        }
        if let at = rest.lastIndex(of: "@") {
            let userInfo = rest[..<at]
            rest = rest[rest.index(after: at)...]
            let (u, p): (Substring, Substring?) = {
                if let colon = userInfo.firstIndex(of: ":") {
                    return (userInfo[..<colon], userInfo[userInfo.index(after: colon)...])
                }
                return (userInfo, nil)
            }()
            guard let user = PercentEncoding.decoded(u) else { throw Failure(message: "bad percent-encoding in the user of '\(AMQPURL.masked(url))'") }
            self.user = user
            if let p {
                guard let password = PercentEncoding.decoded(p) else { throw Failure(message: "bad percent-encoding in the password of '\(AMQPURL.masked(url))'") }
                self.password = password
            }
        }
        var host = rest
        if rest.hasPrefix("[") {
            guard let close = rest.firstIndex(of: "]") else { throw Failure(message: "unterminated [ in host of '\(AMQPURL.masked(url))'") }
            host = rest[rest.index(after: rest.startIndex)..<close]
            let after = rest[rest.index(after: close)...]
            if after.hasPrefix(":") {
                guard let port = Int(after.dropFirst()), (1...65535).contains(port) else { throw Failure(message: "bad port in '\(AMQPURL.masked(url))'") }
                self.port = port
            }
        } else if let colon = rest.lastIndex(of: ":") {
            host = rest[..<colon]
            guard let port = Int(rest[rest.index(after: colon)...]), (1...65535).contains(port) else {
                throw Failure(message: "bad port in '\(AMQPURL.masked(url))'")
            }
            self.port = port
        }
        self.host = host.isEmpty ? "localhost" : String(host)
    }

    /// The URLs of a setting that lists one or more, separated by spaces or commas (empty: none).
    public static func list(_ setting: String) throws(Failure) -> [AMQPURL] {
        var out: [AMQPURL] = []
        for word in setting.split(whereSeparator: { $0 == " " || $0 == "," || $0 == "\t" }) {
            out.append(try AMQPURL(String(word)))
        }
        return out
    }

    /// The URL with its password replaced by `***`, for logs and errors.
    public static func masked(_ url: String) -> String {
        let utf8 = Array(url.utf8)
        guard let schemeEnd = (0..<max(utf8.count - 2, 0)).first(where: { utf8[$0] == 0x3A && utf8[$0 + 1] == 0x2F && utf8[$0 + 2] == 0x2F }) else { return url }
        let afterScheme = url.utf8.index(url.utf8.startIndex, offsetBy: schemeEnd + 3).samePosition(in: url).map { url[$0...] } ?? Substring(url)
        let authorityEnd = afterScheme.firstIndex(of: "/") ?? afterScheme.endIndex
        let authority = afterScheme[..<authorityEnd]
        guard let at = authority.lastIndex(of: "@"), let colon = authority[..<at].firstIndex(of: ":") else { return url }
        return String(url[..<authority.index(after: colon)]) + "***" + String(url[at...])
    }

    public var description: String {
        "\(tls ? "amqps" : "amqp")://\(user):***@\(host):\(port)/\(vhost == "/" ? "" : vhost)"
    }
}
