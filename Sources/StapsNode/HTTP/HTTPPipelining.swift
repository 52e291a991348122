import NIOCore
import NIOHTTP1

/// The order of one connection's requests and responses, as a pure state machine: a request
/// is handled once the response before it is written; what a read brings meanwhile is held, at
/// most `depth` requests (past that, the rest is dropped unread and the connection closes once
/// those held are answered); nothing is read or answered after a response that closes.
///
/// Hand-written, not NIO's `HTTPServerPipelineHandler`: that one holds every request a read
/// brought (no count bound), reads again as soon as a response is queued rather than written
/// (a client that never reads would grow the outbound buffer), and on `ChannelShouldQuiesceEvent`
/// closes a connection that has not sent its first request (this node answers it).
struct HTTPPipelining {
    static let depth = 16

    private var held = CircularBuffer<HTTPServerRequestPart>()
    private var heldRequests = 0
    /// More than `depth` requests came: nothing more is held.
    private var overflowed = false
    /// A keep-alive response is being written: nothing more is handled until it is.
    private var responding = false
    /// A response with `Connection: close` is under way: nothing more is read or answered.
    private var closing = false
    /// The node is stopping: responses close.
    private(set) var shuttingDown = false
    /// Responses on this connection: one that has none yet is answered (with `Connection:
    /// close`) even when shutdown begins, so a restart drops no request already accepted.
    private var responses = 0
    /// The request is one after which NIO's parser stops (an upgrade it does not become, or
    /// CONNECT): its answer must close the connection.
    private var lastRequestEndsParsing = false

    /// A response is being written.
    var isAnswering: Bool { self.responding || self.closing }

    /// A part just read: returned when it is to be handled now, held otherwise. `waiting`: the
    /// request handler waits for something else (the authorization hook).
    mutating func received(_ part: HTTPServerRequestPart, waiting: Bool) -> HTTPServerRequestPart? {
        guard !self.closing else { return nil }
        guard self.responding || waiting || !self.held.isEmpty else { return part }
        if case .head = part, !self.overflowed {
            self.heldRequests += 1
            // Answer what is held, then close: the rest is not read.
            self.overflowed = self.heldRequests > Self.depth
        }
        if !self.overflowed { self.held.append(part) }
        return nil
    }

    /// The next held part to handle now, if any.
    mutating func nextHeld(waiting: Bool) -> HTTPServerRequestPart? {
        guard !self.responding, !self.closing, !waiting, let part = self.held.popFirst() else { return nil }
        if case .head = part { self.heldRequests -= 1 }
        return part
    }

    /// Whether the connection is done: everything held was answered after too many came.
    func isDrained(waiting: Bool) -> Bool {
        self.overflowed && self.held.isEmpty && !self.responding && !waiting
    }

    mutating func requestStarted(_ head: HTTPRequestHead) {
        self.lastRequestEndsParsing = head.method == .CONNECT
            || (head.headers[canonicalForm: "connection"].contains { $0.lowercased() == "upgrade" } && head.headers.contains(name: "upgrade"))
    }

    /// A response starts: whether it keeps the connection open (`keepAlive`, what the request
    /// and the answer allow, unless the node is stopping or the parser stops after it).
    mutating func responseStarted(keepAlive: Bool) -> Bool {
        self.responses += 1
        let keepAlive = keepAlive && !self.shuttingDown && !self.lastRequestEndsParsing
        if keepAlive { self.responding = true } else { self.closing = true }
        return keepAlive
    }

    /// A keep-alive response was written: whether the connection now closes (the node is
    /// stopping and nothing is under way) rather than reading on. `idle`: no request is open.
    mutating func responseWritten(idle: Bool) -> Bool {
        self.responding = false
        return self.shuttingDown && idle && self.held.isEmpty
    }

    /// The node begins to stop: whether to close at once (idle between keep-alive requests;
    /// a connection not asked anything yet waits for its request).
    mutating func quiesce(idle: Bool) -> Bool {
        self.shuttingDown = true
        return idle && self.responses > 0 && !self.responding && self.held.isEmpty
    }
}
