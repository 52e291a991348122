import NIOCore
import NIOEmbedded
import NIOWebSocket
import StapsCluster
@testable import StapsNode
import Testing

@Suite struct PathTests {
    @Test func decodesAndStripsQuery() {
        #expect(PathDecoding.target(ofURI: "/a.b") == .success(.channel("a.b")))
        #expect(PathDecoding.target(ofURI: "/a%2Eb") == .success(.channel("a.b")))
        #expect(PathDecoding.target(ofURI: "/a%2eb?x=1&y") == .success(.channel("a.b")))
        #expect(PathDecoding.target(ofURI: "/room/%E2%9C%93") == .success(.channel("room/✓")))
        #expect(PathDecoding.target(ofURI: "/a+b") == .success(.channel("a+b")))
        #expect(PathDecoding.target(ofURI: "/") == .success(.root))
        #expect(PathDecoding.target(ofURI: "/?q") == .success(.root))
    }

    @Test func rejectsBadNames() {
        #expect(PathDecoding.target(ofURI: "/a%zz") == .failure(PathError(status: 400, reason: "bad percent-encoding in channel name")))
        #expect(PathDecoding.target(ofURI: "/a%4") == .failure(PathError(status: 400, reason: "bad percent-encoding in channel name")))
        #expect(PathDecoding.target(ofURI: "/a%00b") == .failure(PathError(status: 400, reason: "channel name contains a NUL byte")))
        #expect(PathDecoding.target(ofURI: "/%C3%28") == .failure(PathError(status: 400, reason: "channel name is not valid UTF-8")))
        #expect(PathDecoding.target(ofURI: "/%ED%A0%80") == .failure(PathError(status: 400, reason: "channel name is not valid UTF-8")))
        #expect(PathDecoding.target(ofURI: "a") == .failure(PathError(status: 400, reason: "request path must start with /")))
    }

    @Test func lengthLimitIs256DecodedBytes() {
        let ok = String(repeating: "x", count: 256)
        #expect(PathDecoding.target(ofURI: "/" + ok) == .success(.channel(ok)))
        #expect(PathDecoding.target(ofURI: "/" + ok + "x") == .failure(PathError(status: 414, reason: "channel name longer than 256 bytes")))
        // 256 bytes encoded as 768 characters is still fine; one more byte is not.
        let encoded = String(repeating: "%41", count: 256)
        #expect(PathDecoding.target(ofURI: "/" + encoded) == .success(.channel(String(repeating: "A", count: 256))))
        #expect(PathDecoding.target(ofURI: "/" + encoded + "%41") == .failure(PathError(status: 414, reason: "channel name longer than 256 bytes")))
        #expect(PathDecoding.target(ofURI: "/" + String(repeating: "y", count: 5000)) == .failure(PathError(status: 414, reason: "channel name longer than 256 bytes")))
    }

    @Test func encodeRoundTrips() {
        for name in ["a.b", "room/✓", "50% off", "x y#z?", "ü"] {
            #expect(PathDecoding.target(ofURI: "/" + PercentEncoding.encode(name)) == .success(.channel(name)))
        }
    }
}

@Suite struct PrimitiveTests {
    @Test func acceptKeyMatchesRFC6455Example() {
        #expect(WebSocketAccept.value(forKey: "dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    }

    @Test func uuid4HasVersionAndVariant() {
        let ids = (0..<100).map { _ in UUID4.make() }
        #expect(Set(ids).count == 100)
        for id in ids {
            let chars = Array(id)
            #expect(chars.count == 36)
            #expect(chars[14] == "4")
            #expect("89ab".contains(chars[19]))
            #expect(chars[8] == "-" && chars[13] == "-" && chars[18] == "-" && chars[23] == "-")
        }
    }

    @Test(arguments: [
        ([UInt8]("hello".utf8), true),
        ([UInt8]("κόσμε ✓ 😀".utf8), true),
        ([0xC3, 0x28], false),            // bad continuation
        ([0xC0, 0xAF], false),            // overlong
        ([0xED, 0xA0, 0x80], false),      // surrogate
        ([0xF4, 0x90, 0x80, 0x80], false),  // above U+10FFFF
        ([0xF0, 0x9F, 0x98], false),      // truncated
        ([0xFF], false),
        ([UInt8](repeating: 0x41, count: 17) + [0xE2, 0x82, 0xAC], true),
        ([UInt8](repeating: 0x41, count: 16) + [0x80], false),
    ])
    func utf8Validation(bytes: [UInt8], valid: Bool) {
        #expect(bytes.withUnsafeBytes { UTF8Validation.isValid($0) } == valid)
        #expect(bytes.withUnsafeBytes { UTF8Validation.isValid($0) } == (String(validating: bytes, as: UTF8.self) != nil))
    }

    @Test func unmaskMatchesNIOMaskingAtEveryPhaseAndLength() {
        let key: WebSocketMaskingKey = [0x12, 0x34, 0xAB, 0xCD]
        for length in [0, 1, 3, 7, 8, 9, 15, 16, 33, 1000] {
            for phase in 0..<4 {
                let plain = (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
                var reference = ByteBuffer(bytes: plain)
                reference.webSocketMask(key, indexOffset: phase)
                var ours = plain
                var word: UInt32 = 0  // the key's bytes in memory order, as the state machine reads them
                withUnsafeMutableBytes(of: &word) { $0.copyBytes(from: key) }
                ours.withUnsafeMutableBytes { Framing.unmask($0, key: word, phase: phase) }
                #expect(ours == Array(reference.readableBytesView), "length \(length) phase \(phase)")
            }
        }
    }

    @Test func framingHeaders() {
        for (length, header) in [(5, [0x81, 5]), (126, [0x81, 126, 0, 126]), (65535, [0x81, 126, 0xFF, 0xFF]), (65536, [0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0])] {
            var b = ByteBuffer()
            Framing.writeHeader(into: &b, opcode: .text, length: length)
            #expect(Array(b.readableBytesView) == header.map(UInt8.init))
            #expect(Framing.headerLength(payload: length) == header.count)
        }
    }

    @Test func closeFrameReasonIsCutOnACharacterBoundary() {
        let reason = String(repeating: "é", count: 100)  // 200 bytes
        let frame = Framing.closeFrame(code: .policyViolation, reason: reason, allocator: ByteBufferAllocator())
        let bytes = Array(frame.readableBytesView)
        #expect(bytes[0] == 0x88)
        #expect(Int(bytes[1]) <= 125)
        #expect(String(validating: bytes[4...], as: UTF8.self) != nil)
    }
}

/// Joining and leaving a staps channel through `Membership`, on an embedded event loop.
@Suite struct MembershipTests {
    /// A link that records what the directory asks of it.
    final class RecordingLink: ClusterLink, @unchecked Sendable {
        var report: ClusterLinkReport? { nil }
        // @unchecked: only touched on the test's thread (the embedded loop runs everything there).
        var subscribed: [String] = []
        var unsubscribed: [String] = []
        var isClustered: Bool { false }
        func start(receiver: any ClusterReceiver) {}
        func startReceiving(channel: String, whenBound promise: EventLoopPromise<Void>) {
            self.subscribed.append(channel)
            promise.succeed(())
        }
        func awaitBinding(channel: String, promise: EventLoopPromise<Void>) { promise.succeed(()) }
        func stopReceiving(channel: String) { self.unsubscribed.append(channel) }
        func publish(_ batch: [ClusterMessage]) {}
        func shutdown() async {}
        var statusDescription: String { "recording" }
    }

    @Test func leaveCountsOutOnceAndTheLastOneOutUnsubscribes() throws {
        let loop = EmbeddedEventLoop()
        let link = RecordingLink()
        let hub = Hub(eventLoops: [loop], link: link, framing: WebSocketMessageFraming(), counters: NodeCounters(), logger: testLogger())
        let (first, _) = hub.join("room", on: loop)
        let (second, ready) = hub.join("room", on: loop)
        try ready.wait()
        #expect(link.subscribed == ["room"])
        first.leave()
        first.leave()
        #expect(link.unsubscribed.isEmpty)
        #expect(hub.directory.lookup("room")?.1 == 1)
        second.leave()
        #expect(link.unsubscribed == ["room"])
        #expect(hub.directory.lookup("room") == nil)
    }

    @Test func anAttachedClientReceivesUntilItLeaves() throws {
        let loop = EmbeddedEventLoop()
        let hub = Hub(eventLoops: [loop], link: StandaloneLink(), framing: WebSocketMessageFraming(), counters: NodeCounters(), logger: testLogger())
        let (other, _) = hub.join("room", on: loop)
        let (membership, _) = hub.join("room", on: loop)
        let connection = EmbeddedChannel(loop: loop)
        try connection.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        let handler = WebSocketHandler(id: 1, membership: membership, limits: Limits(), counters: NodeCounters(), logger: testLogger())
        try connection.pipeline.syncOperations.addHandler(handler)  // attaches
        #expect(membership.channel.loopMask.load(ordering: .relaxed) == 1)

        #expect(hub.publish(channel: "room", payload: ByteBuffer(string: "hi"), isText: true, on: loop) == 2)
        loop.run()
        #expect(try connection.readOutbound(as: ByteBuffer.self).map { Array($0.readableBytesView) } == [0x81, 2] + Array("hi".utf8))

        // A failure path leaving first, then the handler's own leave on close: counted out once.
        membership.leave()
        #expect(membership.channel.loopMask.load(ordering: .relaxed) == 0)
        #expect(hub.directory.lookup("room")?.1 == 1)
        _ = try connection.finish()
        #expect(hub.directory.lookup("room")?.1 == 1)
        #expect(hub.publish(channel: "room", payload: ByteBuffer(string: "hi"), isText: true, on: loop) == 1)
        other.leave()
        #expect(hub.directory.lookup("room") == nil)
    }

    /// A receiver that records what the hub hands it.
    final class RecordingReceiver: ChannelReceiver {
        var received: [String] = []
        var flushes = 0
        func enqueue(_ message: FramedMessage) -> Bool {
            self.received.append(String(buffer: message.payload))
            return true
        }
        func flushQueued() { self.flushes += 1 }
    }

    @Test func receiversLeaveInAnyOrderAndTheRestStillReceiveButNotTheirOwn() throws {
        let loop = EmbeddedEventLoop()
        let hub = Hub(eventLoops: [loop], link: StandaloneLink(), framing: WebSocketMessageFraming(), counters: NodeCounters(), logger: testLogger())
        let clients = (0..<4).map { _ in (hub.join("room", on: loop).0, RecordingReceiver()) }
        for (membership, receiver) in clients { membership.attach(receiver) }
        clients[0].0.leave()  // the last moves into the first's place
        clients[3].0.leave()  // it leaves from there
        let message = WebSocketMessageFraming().frame(ByteBuffer(string: "m"), isText: true, allocator: ByteBufferAllocator())
        #expect(clients[1].0.publish(message, isText: true, connectionID: 1) == 3)  // itself and one other
        loop.run()
        #expect(clients.map(\.1.received) == [[], [], ["m"], []])
        #expect(clients.map(\.1.flushes) == [0, 0, 0, 0], "a receiver asks for its flush; this one never did")
        #expect(hub.publish(channel: "room", payload: ByteBuffer(string: "p"), isText: true, on: loop) == 2)
        #expect(clients.map(\.1.received) == [[], ["p"], ["m", "p"], []])
        for (membership, _) in clients { membership.leave() }
        #expect(hub.directory.lookup("room") == nil)
    }
}
