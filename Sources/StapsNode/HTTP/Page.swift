import NIOHTTP1
import StapsCluster

/// The page a plain `GET` (or `HEAD`) gets: the channel's websocket URL, a fresh UUID4 channel
/// URL, and a small client that joins the channel, sends text and shows what arrives.
///
/// Everything is inline, so the Content-Security-Policy that goes with it allows nothing but
/// this response's one `<script>` and one `<style>` (by a nonce made for the response) and a
/// websocket to the channel's own origin. Values from the request reach the HTML escaped and the
/// script only through `data-` attributes, never spliced into script text.
struct Page {
    /// The HTML document.
    let html: String
    /// The headers that go with this very document: its Content-Security-Policy (with its
    /// nonce), `X-Content-Type-Options` and `Referrer-Policy`.
    let headers: [(String, String)]

    init(target: RequestTarget, requestHeaders: HTTPHeaders, nonce: String = Page.makeNonce()) {
        let proto = (requestHeaders.first(name: "x-forwarded-proto") ?? "").lowercased()
        let scheme = proto == "https" || proto == "wss" ? "wss" : "ws"
        let host = requestHeaders.first(name: "x-forwarded-host") ?? requestHeaders.first(name: "host") ?? "localhost"
        let base = "\(scheme)://\(host)"
        let fresh = UUID4.make()
        var channelURL: String?
        var title = "staps"
        if case .channel(let name) = target {
            channelURL = base + "/" + PercentEncoding.encode(name)
            title = "staps: " + name
        }

        var policy = ["default-src 'none'", "script-src 'nonce-\(nonce)'", "style-src 'nonce-\(nonce)'"]
        if channelURL != nil {
            // Only the channel's websocket, by its exact origin ('self' would allow fetches to
            // the page's origin too). A host that could break out of the header or widen it is
            // not named: then 'self', which CSP 3 browsers (Chromium: checked) match against
            // ws: and wss: on the page's own host and port.
            policy.append("connect-src " + (Self.isHost(host) ? base : "'self'"))
        }
        policy += ["img-src 'none'", "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'"]
        self.headers = [
            ("Content-Security-Policy", policy.joined(separator: "; ")),
            ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer"),
        ]

        var body = """
            <!DOCTYPE html>
            <html lang="en">
            <head>
            <meta charset="utf-8">
            <meta name="viewport" content="width=device-width, initial-scale=1">
            <title>\(Self.escape(title))</title>
            <style nonce="\(nonce)">\(Self.style)</style>
            </head>
            <body>
            <main id="staps" data-base="\(Self.escape(base))"\(channelURL.map { " data-channel-url=\"\(Self.escape($0))\"" } ?? "")>
            <h1>staps: simple throw-away publish/subscribe</h1>

            """
        if let channelURL {
            body += """
                <section aria-labelledby="this-channel">
                <h2 id="this-channel">This channel</h2>
                <p><code id="channel-url">\(Self.escape(channelURL))</code></p>
                <p>Connection: <output id="state" data-state="connecting">connecting</output>
                <button id="reconnect" type="button" disabled>Reconnect</button></p>
                <form id="send">
                <label for="message">Message</label>
                <input id="message" type="text" autocomplete="off" required>
                <button id="send-button" type="submit" disabled>Send</button>
                </form>
                <h3 id="messages">Messages</h3>
                <ol id="log" aria-labelledby="messages" aria-live="polite"></ol>
                </section>

                """
        } else {
            body += "<p><code>/</code> alone is not a channel: open a fresh one, or any path you like.</p>\n"
        }
        body += """
            <section aria-labelledby="fresh-channel">
            <h2 id="fresh-channel">A fresh channel</h2>
            <p><code id="fresh-url">\(Self.escape(base + "/" + fresh))</code></p>
            <p><a id="fresh-link" href="/\(fresh)">Open its page</a>
            <button id="new-channel" type="button">New channel</button></p>
            </section>
            <section aria-labelledby="how">
            <h2 id="how">How it works</h2>
            <p>Connect a websocket to any path: the path is the channel. Every message one client sends
            reaches every other client on the same path, never the sender. Text stays text, binary stays
            binary, and nothing is stored. A channel exists while it has clients. An HTTP POST to a path
            publishes its body to that channel.</p>
            </section>
            </main>
            <script nonce="\(nonce)">\(Self.script)</script>
            </body>
            </html>

            """
        self.html = body
    }

    /// 16 random bytes in base64: a fresh nonce for each response.
    static func makeNonce() -> String {
        var g = SystemRandomNumberGenerator()
        return WebSocketAccept.base64((0..<16).map { _ in UInt8.random(in: 0...255, using: &g) })
    }

    /// `host` or `host:port` as an authority a CSP source may name: a registered name or IPv4
    /// address (letters, digits, `-`, `.`), or an IPv6 literal in brackets, then an optional port.
    static func isHost(_ authority: String) -> Bool {
        func isDigit(_ b: UInt8) -> Bool { b >= 0x30 && b <= 0x39 }
        func isLetter(_ b: UInt8) -> Bool { (b | 0x20) >= 0x61 && (b | 0x20) <= 0x7A }
        func isHex(_ b: UInt8) -> Bool { isDigit(b) || ((b | 0x20) >= 0x61 && (b | 0x20) <= 0x66) }
        let bytes = Array(authority.utf8)
        let hostEnd: Int
        if bytes.first == UInt8(ascii: "[") {
            guard let close = bytes.firstIndex(of: UInt8(ascii: "]")), close > 1,
                  bytes[1..<close].allSatisfy({ isHex($0) || $0 == UInt8(ascii: ":") || $0 == UInt8(ascii: ".") })
            else { return false }
            hostEnd = close + 1
        } else {
            hostEnd = bytes.firstIndex(of: UInt8(ascii: ":")) ?? bytes.count
            guard (1...253).contains(hostEnd),
                  bytes[..<hostEnd].allSatisfy({ isLetter($0) || isDigit($0) || $0 == UInt8(ascii: "-") || $0 == UInt8(ascii: ".") })
            else { return false }
        }
        guard hostEnd < bytes.count else { return true }
        let port = bytes[(hostEnd + 1)...]
        return bytes[hostEnd] == UInt8(ascii: ":") && (1...5).contains(port.count) && port.allSatisfy(isDigit)
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

    static let style = """

        :root { color-scheme: light dark; font-family: system-ui, sans-serif; line-height: 1.5; }
        body { margin: 0 auto; max-width: 46rem; padding: 1rem; }
        h1 { font-size: 1.4rem; }
        h2 { font-size: 1.15rem; margin-top: 1.5rem; }
        h3 { font-size: 1rem; }
        code { overflow-wrap: anywhere; }
        button, input { font: inherit; padding: 0.25rem 0.6rem; }
        form { display: flex; flex-wrap: wrap; gap: 0.5rem; align-items: center; }
        input { flex: 1; min-width: 12rem; }
        output { font-weight: bold; }
        output[data-state="open"] { color: #1a7f37; }
        output[data-state="closed"] { color: #b42318; }
        #log { list-style: none; margin: 0; padding: 0; min-height: 3rem; max-height: 20rem; overflow-y: auto;
               border: 1px solid #8886; border-radius: 4px; }
        #log li { padding: 0.2rem 0.5rem; border-bottom: 1px solid #8883; overflow-wrap: anywhere; }
        #log .who { display: inline-block; min-width: 5em; font-size: 0.8em; opacity: 0.7; }
        #log .out .text { opacity: 0.75; }
        @media (prefers-color-scheme: dark) {
          output[data-state="open"] { color: #4ac26b; }
          output[data-state="closed"] { color: #ff7b72; }
        }

        """

    /// The client. It reads the server's values from `#staps`'s data attributes; the websocket
    /// is the page's own channel (none on `/`); the next fresh channels are made here.
    static let script = """

        "use strict";
        (() => {
          const $ = (id) => document.getElementById(id);
          const root = $("staps");

          // A fresh channel: the server made the first, the button makes the next ones.
          // crypto.randomUUID exists only in secure contexts (https, localhost): elsewhere the
          // same version 4 UUID from 16 random bytes.
          function uuid4() {
            if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
            const b = crypto.getRandomValues(new Uint8Array(16));
            b[6] = (b[6] & 0x0f) | 0x40;
            b[8] = (b[8] & 0x3f) | 0x80;
            const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
            return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
          }
          $("new-channel").addEventListener("click", () => {
            const id = uuid4();
            $("fresh-url").textContent = `${root.dataset.base}/${id}`;
            $("fresh-link").href = `/${id}`;
          });

          const url = root.dataset.channelUrl;
          if (!url) return;  // "/" is not a channel
          const state = $("state"), log = $("log"), input = $("message");
          const send = $("send-button"), reconnect = $("reconnect");
          let socket = null;

          function show(name, text) {
            state.dataset.state = name;
            state.textContent = text;
            send.disabled = name !== "open";
            reconnect.disabled = name !== "closed";
          }
          function append(direction, text) {
            const item = document.createElement("li");
            item.className = direction;
            const who = document.createElement("span");
            who.className = "who";
            who.textContent = direction === "in" ? "received" : "sent";
            const body = document.createElement("span");
            body.className = "text";
            body.textContent = text;
            item.append(who, body);
            log.append(item);
            while (log.children.length > 500) log.firstElementChild.remove();
            log.scrollTop = log.scrollHeight;
          }
          function connect() {
            show("connecting", "connecting");
            try {
              socket = new WebSocket(url);
            } catch (error) {
              return show("closed", `closed (${error.message})`);
            }
            socket.binaryType = "arraybuffer";
            socket.onopen = () => show("open", "open");
            socket.onmessage = (event) => append("in",
              typeof event.data === "string" ? event.data : `(binary, ${event.data.byteLength} bytes)`);
            socket.onclose = (event) =>
              show("closed", `closed (code ${event.code}${event.reason ? `, ${event.reason}` : ""})`);
          }
          $("send").addEventListener("submit", (event) => {
            event.preventDefault();
            if (!socket || socket.readyState !== WebSocket.OPEN || input.value === "") return;
            socket.send(input.value);
            append("out", input.value);
            input.value = "";
            input.focus();
          });
          reconnect.addEventListener("click", connect);
          connect();
        })();

        """
}
