import NIOHTTP1

/// The small HTML page served for a plain GET.
enum Page {
    static func html(target: RequestTarget, headers: HTTPHeaders) -> String {
        let proto = (headers.first(name: "x-forwarded-proto") ?? "").lowercased()
        let scheme = proto == "https" || proto == "wss" ? "wss" : "ws"
        let host = headers.first(name: "x-forwarded-host") ?? headers.first(name: "host") ?? "localhost"
        let base = "\(scheme)://\(host)"
        let fresh = "\(base)/\(UUID4.make())"
        var body = """
            <!DOCTYPE html>
            <html lang="en"><head><meta charset="utf-8"><title>staps</title></head>
            <body>
            <h1>staps: simple throw-away publish/subscribe</h1>
            <p>Connect a websocket to any path: the path is the channel. Every message one client sends
            reaches every other client on the same path, never the sender. Text stays text, binary stays
            binary, and nothing is stored. A channel exists while it has clients. An HTTP POST to a path
            publishes its body to that channel.</p>

            """
        if case .channel(let name) = target {
            body += "<p>This channel: <code>\(escape(base + "/" + PathDecoding.encode(name)))</code></p>\n"
        }
        body += """
            <p>A fresh channel: <a href="\(escape(fresh))"><code>\(escape(fresh))</code></a></p>
            </body></html>

            """
        return body
    }

    static func escape(_ s: String) -> String {
        var out = ""
        for c in s {
            switch c {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "\"": out += "&quot;"
            case "'": out += "&#39;"
            default: out.append(c)
            }
        }
        return out
    }

    static func jsonEscaped(_ s: String) -> String {
        var out = ""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20:
                let hex = String(scalar.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out
    }
}
