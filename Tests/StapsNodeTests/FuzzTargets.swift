// The fuzz targets' entry logic, shared by the libFuzzer executables in Fuzz/ (which link this
// very file as Fuzz/Sources/FuzzTargets/FuzzTargets.swift) and by FuzzRegressionTests, which
// runs every committed corpus and regression input through it. Each target takes arbitrary
// bytes, must not crash, and throws `FuzzFailure` when an invariant breaks; the fuzzer turns
// that into a crash (so libFuzzer saves the input), the test into a failure naming the file.
import Atomics
import Logging
import NIOCore
import NIOEmbedded
import StapsCluster
@testable import StapsNode

/// An invariant a fuzz target checks did not hold for one input.
public struct FuzzFailure: Error, CustomStringConvertible {
    public var description: String
    init(_ description: String) { self.description = description }
}

public enum FuzzTargets {
    /// The targets by name: the name is the executable's suffix (`fuzz-ini`) and the corpus
    /// folder (`Fuzz/corpus/ini`, `Fuzz/regressions/ini`).
    public static let all: [(name: String, run: @Sendable (UnsafeRawBufferPointer) throws(FuzzFailure) -> Void)] = [
        ("ini", ini),
        ("path", path),
        ("routing-key", routingKey),
        ("wire-format", wireFormat),
        ("http", http),
        ("websocket", webSocket),
    ]

    /// libFuzzer's `LLVMFuzzerTestOneInput`, for one target: a broken invariant is a crash.
    public static func libFuzzerEntry(_ name: String, _ start: UnsafeRawPointer?, _ count: Int) -> CInt {
        guard let target = all.first(where: { $0.name == name }) else { fatalError("no fuzz target \(name)") }
        do {
            try target.run(UnsafeRawBufferPointer(start: count > 0 ? start : nil, count: count))
        } catch {
            fatalError("fuzz target \(name): \(error)")
        }
        return 0
    }

    // MARK: INI configuration

    /// `ConfigurationOverrides.parse`: errors name the file and a line that exists; entries
    /// written back as `key = value` read the same; CRLF line ends read as LF ones do.
    static func ini(_ data: UnsafeRawBufferPointer) throws(FuzzFailure) {
        let text = String(decoding: data, as: UTF8.self)
        let file = "fuzz.conf"
        let lineCount = data.reduce(1) { $0 + ($1 == 0x0A ? 1 : 0) }
        let result = Result { () throws(ConfigurationError) in try ConfigurationOverrides.parse(text, file: file) }
        switch result {
        case .success(let overrides):
            _ = overrides.resolved(sourceFile: file)
        case .failure(let error):
            guard error.file == file, error.description.hasPrefix(file) else { throw FuzzFailure("error names another file: \(error)") }
            if let line = error.line, !(1...lineCount).contains(line) {
                throw FuzzFailure("error on line \(line) of a \(lineCount)-line file: \(error)")
            }
        }

        let crlf = String(decoding: data.flatMap { $0 == 0x0A ? [0x0D, 0x0A] : [$0] }, as: UTF8.self)
        let crlfResult = Result { () throws(ConfigurationError) in try ConfigurationOverrides.parse(crlf, file: file) }
        guard crlfResult == result else { throw FuzzFailure("CRLF line ends read differently: \(crlfResult) vs \(result)") }

        let sections: Set<String> = ["staps", "daemon"]
        guard let entries = try? INI.parse(text, file: file, sections: sections) else { return }
        var previousLine = 0
        for entry in entries {
            guard entry.line > previousLine, entry.line <= lineCount else { throw FuzzFailure("entry line \(entry.line) after \(previousLine) of \(lineCount)") }
            previousLine = entry.line
            guard !entry.key.isEmpty, !entry.key.contains("="), entry.key == trimmed(entry.key), entry.value == trimmed(entry.value) else {
                throw FuzzFailure("entry not trimmed or key holds '=': \(entry)")
            }
        }
        // Tabs around `=`: a tab is a grapheme of its own, so nothing it touches changes.
        var written = ""
        var section: String? = nil
        for entry in entries {
            if entry.section != section {
                written += "[\(entry.section)]\n"
                section = entry.section
            }
            written += "\(entry.key)\t=\t\(entry.value)\n"
        }
        let reread: [INIEntry]
        do { reread = try INI.parse(written, file: file, sections: sections) } catch { throw FuzzFailure("entries written back do not parse: \(error)") }
        guard reread.map({ [$0.section, $0.key, $0.value] }) == entries.map({ [$0.section, $0.key, $0.value] }) else {
            throw FuzzFailure("entries written back read differently: \(reread) vs \(entries)")
        }
    }

    private static func trimmed(_ s: String) -> String {
        let isSpace: (Character) -> Bool = { $0 == " " || $0 == "\t" || $0 == "\r" }
        guard let start = s.firstIndex(where: { !isSpace($0) }), let end = s.lastIndex(where: { !isSpace($0) }) else { return "" }
        return String(s[start...end])
    }

    // MARK: Path → channel name

    /// `PathDecoding.target(ofURI:)`: a channel name is 1–256 bytes without NUL and survives
    /// `encode` and decoding again; and the input taken as a name does too (or is refused the
    /// way the rules say).
    static func path(_ data: UnsafeRawBufferPointer) throws(FuzzFailure) {
        let uri = String(decoding: data, as: UTF8.self)
        switch PathDecoding.target(ofURI: uri) {
        case .success(.root):
            let path = uri.prefix(while: { $0 != "?" && $0 != "#" })
            guard path == "/" else { throw FuzzFailure("\(uri.debugDescription) is the root") }
        case .success(.channel(let name)):
            try checkRoundTrip(name)
        case .failure(let error):
            guard error.status == 400 || error.status == 414, !error.reason.isEmpty else { throw FuzzFailure("unexpected answer \(error)") }
        }

        let name = String(decoding: data, as: UTF8.self)
        let bytes = name.utf8.count
        if bytes >= 1, bytes <= PathDecoding.maxChannelBytes, !name.utf8.contains(0) {
            try checkRoundTrip(name)
        } else if bytes > PathDecoding.maxChannelBytes {
            guard case .failure(let error) = PathDecoding.target(ofURI: "/" + PercentEncoding.encode(name)), error.status == 414 else {
                throw FuzzFailure("a \(bytes)-byte name is not refused with 414")
            }
        } else if bytes > 0 {
            guard case .failure(let error) = PathDecoding.target(ofURI: "/" + PercentEncoding.encode(name)), error.status == 400 else {
                throw FuzzFailure("a name with NUL is not refused with 400")
            }
        }
    }

    private static func checkRoundTrip(_ name: String) throws(FuzzFailure) {
        guard (1...PathDecoding.maxChannelBytes).contains(name.utf8.count), !name.utf8.contains(0) else {
            throw FuzzFailure("decoded name \(name.debugDescription) breaks the name rules")
        }
        let encoded = PercentEncoding.encode(name)
        let allowed = encoded.utf8.allSatisfy { c in
            (c >= 0x61 && c <= 0x7A) || (c >= 0x41 && c <= 0x5A) || (c >= 0x30 && c <= 0x39) || "-._~/%".utf8.contains(c)
        }
        guard allowed else { throw FuzzFailure("encode(\(name.debugDescription)) = \(encoded) holds characters a path must escape") }
        for uri in ["/" + encoded, "/" + encoded + "?q=1", "/" + encoded + "#f"] {
            guard PathDecoding.target(ofURI: uri) == .success(.channel(name)) else {
                throw FuzzFailure("\(uri) does not decode to \(name.debugDescription): \(PathDecoding.target(ofURI: uri))")
            }
        }
    }

    // MARK: Channel name → routing key

    /// `RoutingKey`: keys are at most 255 bytes, `c.H.H.H.W` with hex digits from the name's
    /// SHA-1 and `W` the escaped name (or `~~` + SHA-1 when too long), never a wildcard; every
    /// binding matches its own key; two names (split at the first NUL) never share or match a key.
    static func routingKey(_ data: UnsafeRawBufferPointer) throws(FuzzFailure) {
        let parts = data.split(separator: 0, maxSplits: 1, omittingEmptySubsequences: false)
        let names = parts.map { String(decoding: $0, as: UTF8.self) }.filter { !$0.isEmpty }
        for name in names { try checkKey(name) }
        if names.count == 2, names[0] != names[1] {
            let (a, b) = (RoutingKey.forChannel(names[0]), RoutingKey.forChannel(names[1]))
            guard a != b else { throw FuzzFailure("\(names[0].debugDescription) and \(names[1].debugDescription) share the key \(a)") }
            guard !topicMatches(pattern: a, key: b), !topicMatches(pattern: b, key: a) else {
                throw FuzzFailure("the exact bindings of \(a) and \(b) match each other")
            }
        }
    }

    private static func checkKey(_ name: String) throws(FuzzFailure) {
        let key = RoutingKey.forChannel(name)
        let digest = Array(SHA1.hex(name).utf8)
        guard key.utf8.count <= 255 else { throw FuzzFailure("key of \(key.utf8.count) bytes") }
        let words = key.split(separator: ".", omittingEmptySubsequences: false).map { Array($0.utf8) }
        guard words.count == 5, words[0] == Array("c".utf8), (1...3).allSatisfy({ words[$0] == [digest[$0 - 1]] }) else {
            throw FuzzFailure("key \(key) is not c.H.H.H.W with the name's hash digits")
        }
        let word = words[4]
        let isHex: (UInt8) -> Bool = { ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x41 && $0 <= 0x46) }
        let isSafe: (UInt8) -> Bool = { c in
            (c >= 0x61 && c <= 0x7A) || (c >= 0x41 && c <= 0x5A) || (c >= 0x30 && c <= 0x39) || c == 0x2D || c == 0x5F
        }
        if word.starts(with: Array("~~".utf8)) {
            guard word == Array("~~".utf8) + digest else { throw FuzzFailure("hashed word \(key) is not ~~ + SHA-1") }
            let escaped = name.utf8.reduce(0) { $0 + (isSafe($1) ? 1 : 3) }
            guard 8 + escaped > 255 else { throw FuzzFailure("\(key) is hashed though its escaped form fits") }
        } else {
            // The escaped form, read back, is the name: so the mapping is injective.
            var decoded: [UInt8] = []
            var i = 0
            while i < word.count {
                if word[i] == UInt8(ascii: "~") {
                    guard i + 2 < word.count, isHex(word[i + 1]), isHex(word[i + 2]),
                        let byte = UInt8(String(decoding: word[(i + 1)...(i + 2)], as: UTF8.self), radix: 16), !isSafe(byte)
                    else { throw FuzzFailure("\(key): '~' not followed by the hex of a byte that needs escaping") }
                    decoded.append(byte)
                    i += 3
                } else {
                    guard isSafe(word[i]) else { throw FuzzFailure("\(key) holds \(word[i]) unescaped") }
                    decoded.append(word[i])
                    i += 1
                }
            }
            guard decoded == Array(name.utf8) else { throw FuzzFailure("\(key) does not read back as \(name.debugDescription)") }
        }
        for buckets in RoutingKey.bucketChoices {
            let binding = RoutingKey.binding(forChannel: name, buckets: buckets)
            guard topicMatches(pattern: binding, key: key) else { throw FuzzFailure("binding \(binding) (buckets \(buckets)) misses its key \(key)") }
            let expected: String
            switch buckets {
            case 16: expected = words[0...1].map { String(decoding: $0, as: UTF8.self) }.joined(separator: ".") + ".*.*.*"
            case 256: expected = words[0...2].map { String(decoding: $0, as: UTF8.self) }.joined(separator: ".") + ".*.*"
            case 4096: expected = words[0...3].map { String(decoding: $0, as: UTF8.self) }.joined(separator: ".") + ".*"
            default: expected = key
            }
            guard binding == expected else { throw FuzzFailure("binding \(binding) for \(buckets) buckets, expected \(expected)") }
        }
    }

    /// AMQP topic matching: `*` is exactly one word, `#` zero or more.
    static func topicMatches(pattern: String, key: String) -> Bool {
        func match(_ p: ArraySlice<Substring>, _ k: ArraySlice<Substring>) -> Bool {
            guard let first = p.first else { return k.isEmpty }
            if first == "#" {
                return (0...k.count).contains { match(p.dropFirst(), k.dropFirst($0)) }
            }
            guard let word = k.first, first == "*" || first == word else { return false }
            return match(p.dropFirst(), k.dropFirst())
        }
        let p = pattern.split(separator: ".", omittingEmptySubsequences: false)
        let k = key.split(separator: ".", omittingEmptySubsequences: false)
        return match(p[...], k[...])
    }

    // MARK: Cluster wire format

    /// `WireFormat.decode` on arbitrary bytes: a body it accepts is exactly what encoding its
    /// result gives back; and (name, payloads) built from the input round-trip through
    /// `beginBody`/`append` and `decode`.
    static func wireFormat(_ data: UnsafeRawBufferPointer) throws(FuzzFailure) {
        if let (name, payloads) = try? WireFormat.decode(data) {
            guard !name.isEmpty, !name.utf8.contains(0), !payloads.isEmpty, payloads.allSatisfy({ !$0.isEmpty }) else {
                throw FuzzFailure("decode accepted an empty name or message")
            }
            var body: [UInt8] = []
            WireFormat.beginBody(channel: name, into: &body)
            for range in payloads {
                guard range.lowerBound >= 0, range.upperBound <= data.count else { throw FuzzFailure("payload \(range) outside a \(data.count)-byte body") }
                WireFormat.append(payload: ByteBuffer(bytes: data[range]), into: &body)
            }
            guard body.elementsEqual(data) else { throw FuzzFailure("decoded body does not encode back to itself") }
            guard wireFormatSize(name: name, payloadBytes: payloads.reduce(0) { $0 + $1.count }, count: payloads.count) == data.count else {
                throw FuzzFailure("size() disagrees with the body")
            }
        }

        // Input as (name, payloads): a length byte and the name, then length byte + 1 bytes each.
        var rest = data[...]
        let nameLength = Int(rest.popFirst() ?? 0)
        var name = String(decoding: rest.prefix(nameLength).map { $0 == 0 ? UInt8(ascii: "?") : $0 }, as: UTF8.self)
        if name.isEmpty { name = "x" }
        rest = rest.dropFirst(nameLength)
        var messages: [[UInt8]] = []
        while let length = rest.popFirst() {
            let message = Array(rest.prefix(Int(length) + 1))
            guard !message.isEmpty else { break }
            messages.append(message)
            rest = rest.dropFirst(message.count)
        }
        if messages.isEmpty { messages = [[0x42]] }
        var body: [UInt8] = []
        WireFormat.beginBody(channel: name, into: &body)
        for message in messages { WireFormat.append(payload: ByteBuffer(bytes: message), into: &body) }
        guard body.count == wireFormatSize(name: name, payloadBytes: messages.reduce(0) { $0 + $1.count }, count: messages.count) else {
            throw FuzzFailure("size() disagrees with the encoded body")
        }
        let decoded = body.withUnsafeBytes { bytes in Result { () throws(WireFormat.Malformed) in try WireFormat.decode(bytes) } }
        guard case .success(let decoded) = decoded else { throw FuzzFailure("encoded body does not decode: \(decoded)") }
        guard decoded.channel == name, decoded.payloads.map({ Array(body[$0]) }) == messages else {
            throw FuzzFailure("encode → decode changed the name or the messages")
        }
    }

    // MARK: The connection pipeline

    /// Small limits, so that inputs under 1 KiB reach 413, 1009 and the slow-consumer cap
    /// (twice the send buffer; an embedded channel reports nothing buffered).
    static let limits = Limits(maxMessageSize: 256, sendBuffer: 100, slowConsumerGrace: .seconds(1), handshakeTimeout: .seconds(10), pingInterval: .seconds(30), pongTimeout: .seconds(10), shutdownTimeout: .seconds(5))
    static let logger = Logger(label: "fuzz", factory: { _ in SwiftLogNoOpLogHandler() })

    /// One node on an embedded event loop: a standalone hub and the shared handler state.
    struct Node {
        let loop = EmbeddedEventLoop()
        let hub: Hub
        let shared: HTTPHandler.Shared

        init() {
            let counters = NodeCounters()
            self.hub = Hub(eventLoops: [self.loop], link: StandaloneLink(), framing: WebSocketMessageFraming(), counters: counters, logger: FuzzTargets.logger)
            self.shared = HTTPHandler.Shared(hub: self.hub, limits: FuzzTargets.limits, counters: counters, connectionIDs: ManagedAtomic(0), nodeID: "fuzz")
        }

        /// An accepted connection with the node's pipeline, as `Node` sets it up.
        func connect(overConnectionLimit: Bool = false) -> EmbeddedChannel {
            let connection = EmbeddedChannel(loop: self.loop)
            try! ConnectionPipeline.configure(connection, shared: self.shared, overConnectionLimit: overConnectionLimit, logger: FuzzTargets.logger)
            try! connection.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
            return connection
        }

        /// Closes the connections, then checks that no channel membership outlived them.
        func finish(_ connections: [EmbeddedChannel]) throws(FuzzFailure) {
            for connection in connections {
                connection.close(promise: nil)
                self.loop.run()
            }
            let left = self.hub.directory.count
            for connection in connections { _ = try? connection.finish(acceptAlreadyClosed: true) }
            try? self.loop.syncShutdownGracefully()
            guard left == 0 else { throw FuzzFailure("\(left) staps channel(s) still have members after every connection closed") }
        }
    }

    /// The first byte (the flags) and the rest in 1–3 chunks: `1 + (flags & 3) % 3` of them,
    /// each but the last as long as the byte before it says. Empty chunks are dropped (a socket
    /// never reads zero bytes).
    static func chunks(_ data: UnsafeRawBufferPointer) -> (flags: UInt8, chunks: [[UInt8]]) {
        var rest = data[...]
        guard let flags = rest.popFirst() else { return (0, []) }
        let count = 1 + Int(flags & 3) % 3
        var out: [[UInt8]] = []
        for _ in 1..<count {
            guard let length = rest.popFirst() else { break }
            out.append(Array(rest.prefix(Int(length))))
            rest = rest.dropFirst(Int(length))
        }
        out.append(Array(rest))
        return (flags, out.filter { !$0.isEmpty })
    }

    /// Everything the connection wrote since the last call.
    static func drain(_ connection: EmbeddedChannel, into out: inout [UInt8]) {
        while let data = try? connection.readOutbound(as: IOData.self) {
            if case .byteBuffer(let buffer) = data { out.append(contentsOf: buffer.readableBytesView) }
        }
    }

    /// The HTTP side: arbitrary bytes as one connection's requests (flags: bits 0–1 the chunks,
    /// bit 2 lets 61 s pass afterwards, bits 3–5 all set make it a connection over the limit).
    /// It must not crash or hang; what it writes is HTTP responses; nothing stays joined.
    static func http(_ data: UnsafeRawBufferPointer) throws(FuzzFailure) {
        let (flags, chunks) = Self.chunks(data)
        let node = Node()
        let connection = node.connect(overConnectionLimit: flags & 0x38 == 0x38)
        var out: [UInt8] = []
        for chunk in chunks where connection.isActive {
            _ = try? connection.writeInbound(ByteBuffer(bytes: chunk))
            node.loop.run()
            drain(connection, into: &out)
        }
        if flags & 4 != 0 {
            node.loop.advanceTime(by: .seconds(61))
            drain(connection, into: &out)
        }
        guard out.isEmpty || out.starts(with: Array("HTTP/".utf8)) else {
            throw FuzzFailure("the connection wrote something other than an HTTP response first: \(out.prefix(32))")
        }
        try node.finish([connection])
    }

    // MARK: Websocket frames

    static let upgradeRequest = Array((
        "GET /fuzz HTTP/1.1\r\nHost: fuzz\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    ).utf8)

    /// The websocket side: two clients upgrade to `/fuzz`; the input (after its flags byte) is
    /// what the second sends, as raw websocket bytes. Flags: bits 0–1 the chunks, bit 2 lets
    /// 61 s pass afterwards (pings, pong and close timeouts), bit 3 makes the receiver
    /// unwritable (slow-consumer path), bit 4 sends the upgrade request and the first chunk in
    /// one read.
    ///
    /// Checked: both get a 101; everything the node writes is well-formed server frames; the
    /// sender never gets its own messages back, and pongs that echo its pings in order (at
    /// least the last one while open); the receiver gets exactly the messages a reference
    /// reading of the input finds complete and valid (a prefix of them once the node closed
    /// either client); and nothing stays joined after both close.
    static func webSocket(_ data: UnsafeRawBufferPointer) throws(FuzzFailure) {
        let (flags, chunks) = Self.chunks(data)
        let node = Node()
        let receiver = node.connect()
        var receiverOut: [UInt8] = []
        _ = try? receiver.writeInbound(ByteBuffer(bytes: upgradeRequest))
        node.loop.run()
        drain(receiver, into: &receiverOut)
        if flags & 8 != 0 { receiver.isWritable = false }

        let sender = node.connect()
        var senderOut: [UInt8] = []
        var pending = chunks
        if flags & 16 != 0, !pending.isEmpty {
            pending[0] = upgradeRequest + pending[0]
        } else {
            pending.insert(upgradeRequest, at: 0)
        }
        for chunk in pending where sender.isActive {
            _ = try? sender.writeInbound(ByteBuffer(bytes: chunk))
            node.loop.run()
            drain(sender, into: &senderOut)
            drain(receiver, into: &receiverOut)
        }

        let expected = ReferenceClient.read(chunks.flatMap { $0 }, maxMessageSize: limits.maxMessageSize)
        let senderFrames = try ServerOutput.parse(senderOut, who: "sender")
        let receiverFrames = try ServerOutput.parse(receiverOut, who: "receiver")
        let closed = senderFrames.closed || receiverFrames.closed || !sender.isActive || !receiver.isActive || flags & 8 != 0
        try check(expected: expected, sender: senderFrames, receiver: receiverFrames, exact: !closed)

        if flags & 4 != 0 {
            node.loop.advanceTime(by: .seconds(61))
            drain(sender, into: &senderOut)
            drain(receiver, into: &receiverOut)
            try check(expected: expected, sender: ServerOutput.parse(senderOut, who: "sender"), receiver: ServerOutput.parse(receiverOut, who: "receiver"), exact: false)
        }
        try node.finish([sender, receiver])
    }

    private static func check(expected: ReferenceClient, sender: ServerOutput, receiver: ServerOutput, exact: Bool) throws(FuzzFailure) {
        guard sender.messages.isEmpty else { throw FuzzFailure("the sender got \(sender.messages.count) message(s) back") }
        guard receiver.messages.count <= expected.messages.count, receiver.messages.elementsEqual(expected.messages[..<receiver.messages.count], by: ==) else {
            throw FuzzFailure("the receiver got messages the sender did not send: \(receiver.messages.map(\.description)) vs \(expected.messages.map(\.description))")
        }
        // RFC 6455 §5.5.3: pongs echo pings in order, but one may answer only the latest of several.
        var pings = expected.pings[...]
        for pong in sender.pongs {
            guard let i = pings.firstIndex(of: pong) else { throw FuzzFailure("pongs \(sender.pongs) do not answer pings \(expected.pings) in order") }
            pings = pings[(i + 1)...]
        }
        guard !exact || receiver.messages.count == expected.messages.count else {
            throw FuzzFailure("nobody was closed, yet the receiver got \(receiver.messages.count) of \(expected.messages.count) messages")
        }
        guard !exact || expected.pings.isEmpty || sender.pongs.last == expected.pings.last else {
            throw FuzzFailure("nobody was closed, yet the last of \(expected.pings.count) pings got no pong (pongs: \(sender.pongs.count))")
        }
    }

    struct Message: Equatable, CustomStringConvertible {
        var isText: Bool
        var payload: [UInt8]
        var description: String { "\(isText ? "text" : "binary")(\(payload.count))" }
    }

    /// What a node must make of a client's bytes (RFC 6455 and the README): the complete, valid,
    /// non-empty messages and the pings, up to the first frame that is incomplete or that the
    /// node must close the client for. Lenient where a node may be (length encodings).
    struct ReferenceClient {
        var messages: [Message] = []
        var pings: [[UInt8]] = []

        static func read(_ bytes: [UInt8], maxMessageSize: Int) -> ReferenceClient {
            var out = ReferenceClient()
            var at = 0
            var fragments: Message? = nil
            while bytes.count - at >= 2 {
                let (b0, b1) = (bytes[at], bytes[at + 1])
                let fin = b0 & 0x80 != 0
                let opcode = b0 & 0x0F
                guard b0 & 0x70 == 0, b1 & 0x80 != 0 else { break }  // reserved bits; unmasked
                var length = Int(b1 & 0x7F)
                var header = 2
                if length == 126 {
                    guard bytes.count - at >= 4 else { break }
                    length = Int(bytes[at + 2]) << 8 | Int(bytes[at + 3])
                    header = 4
                } else if length == 127 {
                    guard bytes.count - at >= 10 else { break }
                    var l: UInt64 = 0
                    for i in 2..<10 { l = l << 8 | UInt64(bytes[at + i]) }
                    guard l <= UInt64(maxMessageSize) else { break }
                    length = Int(l)
                    header = 10
                }
                guard length <= maxMessageSize else { break }
                if opcode >= 8 { guard fin, length <= 125 else { break } }
                guard bytes.count - at >= header + 4 + length else { break }
                let key = bytes[(at + header)..<(at + header + 4)].map { $0 }
                let payload = (0..<length).map { bytes[at + header + 4 + $0] ^ key[$0 & 3] }
                at += header + 4 + length
                switch opcode {
                case 1, 2:
                    guard fragments == nil else { return out }
                    let message = Message(isText: opcode == 1, payload: payload)
                    if fin {
                        guard out.complete(message) else { return out }
                    } else {
                        fragments = message
                    }
                case 0:
                    guard var message = fragments, message.payload.count + length <= maxMessageSize else { return out }
                    message.payload += payload
                    if fin {
                        fragments = nil
                        guard out.complete(message) else { return out }
                    } else {
                        fragments = message
                    }
                case 9:
                    out.pings.append(payload)
                case 10:
                    break
                default:  // close, or an unknown opcode
                    return out
                }
            }
            return out
        }

        /// False when the message ends the connection (a text message that is not UTF-8).
        mutating func complete(_ message: Message) -> Bool {
            if message.isText, String(validating: message.payload, as: UTF8.self) == nil { return false }
            if !message.payload.isEmpty { self.messages.append(message) }
            return true
        }
    }

    /// What a node wrote to one client: a 101, then whole, unmasked server frames only.
    struct ServerOutput {
        var messages: [Message] = []
        var pongs: [[UInt8]] = []
        var closed = false

        static func parse(_ bytes: [UInt8], who: String) throws(FuzzFailure) -> ServerOutput {
            let head = Array("HTTP/1.1 101 ".utf8)
            guard bytes.starts(with: head), let end = (0..<max(0, bytes.count - 3)).first(where: { bytes[$0..<($0 + 4)].elementsEqual([13, 10, 13, 10]) }) else {
                throw FuzzFailure("the \(who)'s valid upgrade was not answered with 101: \(String(decoding: bytes.prefix(64), as: UTF8.self).debugDescription)")
            }
            var out = ServerOutput()
            var at = end + 4
            while at < bytes.count {
                guard !out.closed else { throw FuzzFailure("the \(who) got a frame after the close frame") }
                guard bytes.count - at >= 2 else { throw FuzzFailure("the \(who) got half a frame header") }
                let (b0, b1) = (bytes[at], bytes[at + 1])
                let opcode = b0 & 0x0F
                guard b0 & 0xF0 == 0x80, b1 & 0x80 == 0, [1, 2, 8, 9, 10].contains(opcode) else {
                    throw FuzzFailure("the \(who) got a frame a server must not send: \(b0), \(b1)")
                }
                var length = Int(b1 & 0x7F)
                var header = 2
                if length == 126 {
                    guard bytes.count - at >= 4 else { throw FuzzFailure("the \(who) got half a frame header") }
                    length = Int(bytes[at + 2]) << 8 | Int(bytes[at + 3])
                    header = 4
                    guard length >= 126 else { throw FuzzFailure("non-minimal length to the \(who)") }
                } else if length == 127 {
                    guard bytes.count - at >= 10 else { throw FuzzFailure("the \(who) got half a frame header") }
                    var l: UInt64 = 0
                    for i in 2..<10 { l = l << 8 | UInt64(bytes[at + i]) }
                    guard l > 0xFFFF, l <= UInt64(bytes.count) else { throw FuzzFailure("bad 64-bit length to the \(who)") }
                    length = Int(l)
                    header = 10
                }
                guard bytes.count - at - header >= length else { throw FuzzFailure("the \(who) got a truncated frame") }
                let payload = Array(bytes[(at + header)..<(at + header + length)])
                at += header + length
                switch opcode {
                case 1, 2:
                    guard !payload.isEmpty, payload.count <= limits.maxMessageSize else { throw FuzzFailure("the \(who) got a message of \(payload.count) bytes") }
                    guard opcode == 2 || String(validating: payload, as: UTF8.self) != nil else { throw FuzzFailure("the \(who) got a text message that is not UTF-8") }
                    out.messages.append(Message(isText: opcode == 1, payload: payload))
                case 8:
                    guard payload.count <= 125, payload.count != 1 else { throw FuzzFailure("the \(who) got a close frame of \(payload.count) bytes") }
                    if payload.count >= 2 {
                        let code = UInt16(payload[0]) << 8 | UInt16(payload[1])
                        guard (1000...1003).contains(code) || (1007...1011).contains(code) || (3000...4999).contains(code), String(validating: payload[2...], as: UTF8.self) != nil else {
                            throw FuzzFailure("the \(who) got close code \(code) or a reason that is not UTF-8")
                        }
                    }
                    out.closed = true
                case 9:
                    guard payload.count <= 125 else { throw FuzzFailure("the \(who) got a long ping") }
                case 10:
                    guard payload.count <= 125 else { throw FuzzFailure("the \(who) got a long pong") }
                    out.pongs.append(payload)
                default:
                    break
                }
            }
            return out
        }
    }
}

/// Bytes a message body needs for `name` and `count` payloads of `payloadBytes` in all (what
/// `WireFormat` writes: a 2-byte name length, the name, then a 4-byte length per payload).
func wireFormatSize(name: String, payloadBytes: Int, count: Int) -> Int {
    2 + name.utf8.count + payloadBytes + 4 * count
}
