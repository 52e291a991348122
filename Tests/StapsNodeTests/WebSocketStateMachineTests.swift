import NIOCore
import NIOWebSocket
@testable import StapsNode
import Testing

/// A client frame as the wire carries it (masked unless `mask` is nil).
func clientFrame(_ opcode: WebSocketOpcode, _ payload: [UInt8], fin: Bool = true, rsv: UInt8 = 0, mask: [UInt8]? = [0x37, 0xFA, 0x21, 0x3D], declaredLength: UInt64? = nil) -> [UInt8] {
    var out: [UInt8] = [(fin ? 0x80 : 0) | rsv | UInt8(webSocketOpcode: opcode)]
    let length = declaredLength ?? UInt64(payload.count)
    let maskBit: UInt8 = mask == nil ? 0 : 0x80
    if length < 126 {
        out.append(maskBit | UInt8(length))
    } else if length <= 0xFFFF {
        out.append(maskBit | 126)
        out += [UInt8(length >> 8), UInt8(length & 0xFF)]
    } else {
        out.append(maskBit | 127)
        for shift in stride(from: 56, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: length >> UInt64(shift))) }
    }
    if let mask {
        out += mask
        out += payload.enumerated().map { $0.element ^ mask[$0.offset % 4] }
    } else {
        out += payload
    }
    return out
}

/// Feeds `bytes` to `machine` in chunks of `chunk` bytes and collects every action but `.needMoreData`.
func actions(_ machine: inout WebSocketStateMachine, _ bytes: [UInt8], chunk: Int = .max) -> [WebSocketStateMachine.Action] {
    var out: [WebSocketStateMachine.Action] = []
    var unread = ByteBuffer()
    var i = 0
    repeat {
        let end = min(bytes.count, i + max(chunk, 1))
        unread.writeBytes(bytes[i..<end])
        i = end
        while true {
            let action = machine.next(&unread, allocator: ByteBufferAllocator())
            if action == .needMoreData { break }
            out.append(action)
        }
    } while i < bytes.count
    return out
}

func serverFrame(_ opcode: WebSocketOpcode, _ payload: [UInt8]) -> ByteBuffer {
    Framing.frame(opcode: opcode, payload: ByteBuffer(bytes: payload), allocator: ByteBufferAllocator())
}

func relayed(_ text: String) -> WebSocketStateMachine.Action {
    .relay(serverFrame(.text, Array(text.utf8)), headerLength: Framing.headerLength(payload: text.utf8.count), isText: true)
}

func closing(_ code: UInt16) -> (WebSocketStateMachine.Action) -> Bool {
    { if case .close(let c, _) = $0 { return UInt16(webSocketErrorCode: c) == code } else { return false } }
}

func closeReply(_ code: UInt16?) -> WebSocketStateMachine.Action {
    guard let code else { return .replyToClose(ByteBuffer(bytes: [0x88, 0])) }
    return .replyToClose(Framing.closeFrame(code: WebSocketErrorCode(codeNumber: Int(code)), reason: "", allocator: ByteBufferAllocator()))
}

@Suite struct WebSocketStateMachineTests {
    let max = 1 << 16

    @Test func aMessageIsRelayedFramedForReceiversWhateverTheReadsAre() {
        let text = String(repeating: "héllo wörld ✓ ", count: 20)
        let frames = clientFrame(.text, Array(text.utf8))
        for chunk in [1, 2, 3, 7, 64, .max] {
            var m = WebSocketStateMachine(maxMessageSize: max)
            #expect(actions(&m, frames, chunk: chunk) == [relayed(text)], "chunk \(chunk)")
        }
    }

    @Test func binaryStaysBinaryAndLengthsUseEveryHeaderForm() {
        for length in [1, 125, 126, 65535, 65536] {
            let payload = (0..<length).map { UInt8(truncatingIfNeeded: $0 * 7) }
            var m = WebSocketStateMachine(maxMessageSize: 1 << 20)
            let got = actions(&m, clientFrame(.binary, payload), chunk: 1000)
            #expect(got == [.relay(serverFrame(.binary, payload), headerLength: Framing.headerLength(payload: length), isText: false)])
        }
    }

    @Test func fragmentsAreReassembledAndPingsBetweenThemAnswered() {
        var m = WebSocketStateMachine(maxMessageSize: max)
        let bytes = clientFrame(.text, Array("Hel".utf8), fin: false)
            + clientFrame(.ping, Array("p!".utf8))
            + clientFrame(.continuation, [0xC3], fin: false)  // ü split across fragments
            + clientFrame(.continuation, [0xBC] + Array("lo".utf8))
        for chunk in [1, 5, .max] {
            var m2 = m
            #expect(actions(&m2, bytes, chunk: chunk) == [.pong(serverFrame(.pong, Array("p!".utf8))), relayed("Helülo")])
        }
        #expect(actions(&m, clientFrame(.pong, [1, 2])) == [])
    }

    @Test func invalidUTF8FailsAtTheFirstBadByteNotAtTheEnd() {
        // The frame's first bytes are already invalid: the close comes before the rest arrives.
        var m = WebSocketStateMachine(maxMessageSize: max)
        let frame = clientFrame(.text, [0x61, 0xC3, 0x28] + Array(repeating: 0x61, count: 1000))
        var unread = ByteBuffer(bytes: frame.prefix(2 + 4 + 3 + 120))  // header (126-form: 4) + mask + 3 + …
        let action = m.next(&unread, allocator: ByteBufferAllocator())
        #expect(closing(1007)(action))
        // In a fragmented message: the first fragment is bad, no fin needed.
        var f = WebSocketStateMachine(maxMessageSize: max)
        #expect(actions(&f, clientFrame(.text, [0xED, 0xA0, 0x80], fin: false)).map(closing(1007)) == [true])
        // A message that ends in the middle of a code point.
        var e = WebSocketStateMachine(maxMessageSize: max)
        #expect(actions(&e, clientFrame(.text, [0x61, 0xE2, 0x9C])).map(closing(1007)) == [true])
    }

    @Test func protocolViolationsClose1002() {
        let cases: [(String, [UInt8])] = [
            ("unmasked", clientFrame(.text, [0x61], mask: nil)),
            ("rsv1", clientFrame(.text, [0x61], rsv: 0x40)),
            ("rsv3", clientFrame(.binary, [0x61], rsv: 0x10)),
            ("opcode 3", clientFrame(WebSocketOpcode(encodedWebSocketOpcode: 3)!, [0x61])),
            ("opcode 11", clientFrame(WebSocketOpcode(encodedWebSocketOpcode: 11)!, [])),
            ("fragmented ping", clientFrame(.ping, [], fin: false)),
            ("long ping", clientFrame(.ping, Array(repeating: 1, count: 126))),
            ("continuation first", clientFrame(.continuation, [0x61])),
            ("new message inside a fragmented one", clientFrame(.text, [0x61], fin: false) + clientFrame(.text, [0x62])),
        ]
        for (name, bytes) in cases {
            var m = WebSocketStateMachine(maxMessageSize: max)
            let got = actions(&m, bytes)
            #expect(got.count == 1 && closing(1002)(got[0]), "\(name): \(got)")
        }
    }

    @Test func aBrokenCloseFrameIsTheLastWord() {
        var m = WebSocketStateMachine(maxMessageSize: 1024)
        let got = actions(&m, clientFrame(.connectionClose, [0x03, 0xE8] + Array(repeating: 0x61, count: 124)) + clientFrame(.text, [0x61]))
        #expect(got.count == 1 && closing(1002)(got[0]))
        #expect(!m.awaitsClose && !m.isOpen)
        var open = WebSocketStateMachine(maxMessageSize: 1024)
        _ = actions(&open, clientFrame(.binary, [1], mask: nil))
        #expect(open.awaitsClose)
    }

    @Test func anOversizeMessageGets1009AndTheClientsCloseStillCounts() {
        let size = 1 << 12
        // One frame declared too large: refused at its header, its payload skipped, then the close.
        var m = WebSocketStateMachine(maxMessageSize: size)
        let big = clientFrame(.binary, Array(repeating: 7, count: size + 1))
        let close = clientFrame(.connectionClose, [0x03, 0xE8])
        let got = actions(&m, big + clientFrame(.text, [0x61]) + close, chunk: 333)
        #expect(got.count == 2 && closing(1009)(got[0]) && got[1] == .closed, "\(got)")
        // Fragments that add up to too much: refused at the fragment that crosses the limit.
        var f = WebSocketStateMachine(maxMessageSize: size)
        let half = Array(repeating: UInt8(0x61), count: size / 2 + 1)
        let fragmented = clientFrame(.text, half, fin: false) + clientFrame(.continuation, half) + close
        let got2 = actions(&f, fragmented)
        #expect(got2.count == 2 && closing(1009)(got2[0]) && got2[1] == .closed, "\(got2)")
        // A continuation claiming Int.max bytes: 1009, no overflow.
        var o = WebSocketStateMachine(maxMessageSize: size)
        let huge = clientFrame(.text, [0x61], fin: false) + clientFrame(.continuation, [], declaredLength: UInt64(Int.max))
        #expect(actions(&o, huge).map(closing(1009)) == [true])
        // A length with its top bit set is a protocol error.
        var t = WebSocketStateMachine(maxMessageSize: size)
        #expect(actions(&t, clientFrame(.binary, [], declaredLength: 1 << 63)).map(closing(1002)) == [true])
    }

    @Test func aClientCloseIsAnsweredWithItsCodeOrTheReasonItIsInvalid() {
        func reply(_ payload: [UInt8]) -> WebSocketStateMachine.Action? {
            var m = WebSocketStateMachine(maxMessageSize: 1024)
            return actions(&m, clientFrame(.connectionClose, payload)).first
        }
        func code(_ c: UInt16) -> [UInt8] { [UInt8(c >> 8), UInt8(c & 0xFF)] }
        #expect(reply([]) == closeReply(nil))
        for valid: UInt16 in [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999] {
            #expect(reply(code(valid) + Array("bye".utf8)) == closeReply(valid), "\(valid)")
        }
        for invalid: UInt16 in [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
            guard case .replyToClose(var frame) = reply(code(invalid)) else { Issue.record("no reply to \(invalid)"); continue }
            frame.moveReaderIndex(forwardBy: 2)
            #expect(frame.readInteger(as: UInt16.self) == 1002, "\(invalid)")
        }
        guard case .replyToClose(var one) = reply([0x03]) else { Issue.record("no reply to a 1-byte close"); return }
        one.moveReaderIndex(forwardBy: 2)
        #expect(one.readInteger(as: UInt16.self) == 1002)
        guard case .replyToClose(var bad) = reply(code(1000) + [0xC3, 0x28]) else { Issue.record("no reply to a bad reason"); return }
        bad.moveReaderIndex(forwardBy: 2)
        #expect(bad.readInteger(as: UInt16.self) == 1007)
    }

    @Test func whileClosingOnlyTheClientsCloseMatters() {
        var m = WebSocketStateMachine(maxMessageSize: 1024)
        let first = m.startClosing()
        let second = m.startClosing()
        #expect(first && !second)
        let after = clientFrame(.text, [0x61]) + clientFrame(.ping, []) + clientFrame(.text, [0xFF]) + clientFrame(.connectionClose, [0x03, 0xE8])
        #expect(actions(&m, after) == [.closed])
        #expect(actions(&m, clientFrame(.text, [0x61])) == [])
    }

    @Test func emptyMessagesAreKeepalivesNotRelayed() {
        var m = WebSocketStateMachine(maxMessageSize: 1024)
        #expect(actions(&m, clientFrame(.text, []) + clientFrame(.binary, []) + clientFrame(.text, [], fin: false) + clientFrame(.continuation, [])) == [])
        #expect(actions(&m, clientFrame(.text, [0x61])) == [relayed("a")])
    }
}

@Suite struct OutboxTests {
    @Test func smallFramesAreCopiedTogetherInOrderLargeOnesQueuedAsTheyAre() {
        var outbox = Outbox()
        let allocator = ByteBufferAllocator()
        var expected: [UInt8] = []
        for i in 0..<100 {
            let frame = serverFrame(.text, Array(repeating: UInt8(i), count: i % 3 == 0 ? 1000 : 10))
            expected += Array(frame.readableBytesView)
            outbox.append(frame, allocator: allocator)
        }
        #expect(outbox.bytes == expected.count)
        var got: [UInt8] = []
        var buffers = 0
        while let b = outbox.popFirst() {
            got += Array(b.readableBytesView)
            buffers += 1
        }
        #expect(got == expected)
        #expect(buffers <= 67)  // 34 large frames, and the small ones between them in at most 33 buffers
        #expect(outbox.bytes == 0 && outbox.isEmpty)
        // 10,000 tiny frames take a few buffers, not 10,000.
        for _ in 0..<10_000 { outbox.append(serverFrame(.binary, [1]), allocator: allocator) }
        #expect(outbox.bytes == 30_000)
        buffers = 0
        while outbox.popFirst() != nil { buffers += 1 }
        #expect(buffers == 2)  // 30,000 bytes in buffers of at most 16 KiB
    }
}
