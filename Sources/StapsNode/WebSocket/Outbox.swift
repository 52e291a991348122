import NIOCore

/// The frames a websocket connection has to send that NIO does not hold yet, whole frames
/// only: so a slow consumer's queue can be dropped without cutting a frame, and a flood of
/// tiny messages costs about its bytes, not a buffer each (small frames are copied together).
struct Outbox {
    /// Made for the first frame and kept from then on: most connections of a quiet node never
    /// get one, and an empty ring still holds storage for its capacity.
    private var frames: CircularBuffer<ByteBuffer>?
    /// Bytes of all queued frames.
    private(set) var bytes = 0
    /// Whether the last buffer is one this outbox made (so small frames may be appended to it).
    private var lastIsOwned = false

    /// Frames smaller than this are copied together; larger ones are queued as they are
    /// (one buffer shared by every receiver).
    static let smallFrame = 512
    /// A buffer of copied frames grows to at most this before the next one starts.
    static let coalescedCapacity = 16 * 1024

    var isEmpty: Bool { self.frames?.isEmpty ?? true }

    mutating func append(_ frame: ByteBuffer, allocator: ByteBufferAllocator) {
        let n = frame.readableBytes
        self.bytes += n
        if self.frames == nil { self.frames = CircularBuffer(initialCapacity: 4) }
        if n < Self.smallFrame, var last = self.frames!.last, last.readableBytes + n <= Self.coalescedCapacity, last.readableBytes < Self.smallFrame || self.lastIsOwned {
            self.frames!.removeLast()
            if !self.lastIsOwned {
                var owned = allocator.buffer(capacity: max(1024, 4 * (last.readableBytes + n)))
                owned.writeImmutableBuffer(last)
                last = owned
                self.lastIsOwned = true
            }
            last.writeImmutableBuffer(frame)
            self.frames!.append(last)
            return
        }
        self.frames!.append(frame)
        self.lastIsOwned = false
    }

    mutating func popFirst() -> ByteBuffer? {
        guard let first = self.frames?.popFirst() else { return nil }
        self.bytes -= first.readableBytes
        if self.frames!.isEmpty { self.lastIsOwned = false }
        return first
    }

    mutating func removeAll() {
        self.frames = nil
        self.bytes = 0
        self.lastIsOwned = false
    }
}
