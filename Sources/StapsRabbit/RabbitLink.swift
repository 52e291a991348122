import Atomics
import CRabbit
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import StapsNode

#if canImport(Glibc)
import Glibc
#endif

/// Settings of the RabbitMQ link: the broker URL, the node's `ClusterSettings` (whose `init`
/// defaults are the documented defaults) and this node's id.
public struct RabbitConfiguration: Sendable {
    public var url: AMQPURL
    public var settings: ClusterSettings
    /// This node's id, carried in every message so a node skips its own.
    public var nodeID: String

    public init(url: AMQPURL, settings: ClusterSettings = ClusterSettings(), nodeID: String = RabbitConfiguration.makeNodeID()) {
        self.url = url
        self.settings = settings
        self.nodeID = nodeID
    }

    /// The link settings of a node's configuration (`amqp` must be set).
    public init(node: NodeConfiguration, nodeID: String = RabbitConfiguration.makeNodeID()) throws {
        self.init(url: try AMQPURL(node.amqpURL), settings: node.cluster, nodeID: nodeID)
    }

    public static func makeNodeID() -> String {
        var name = [CChar](repeating: 0, count: 256)
        gethostname(&name, name.count - 1)
        let host = String(decoding: name.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return "\(host)-\(getpid())-\(UUID4.make().prefix(8))"
    }
}

/// What the link counts; read by tests, logs and (later) metrics.
public final class RabbitCounters: Sendable {
    public let published = ManagedAtomic<Int>(0)
    public let received = ManagedAtomic<Int>(0)
    /// Dropped because the broker was unreachable.
    public let droppedWhileDown = ManagedAtomic<Int>(0)
    /// Dropped because the outbound buffer was full (broker slower than the clients).
    public let droppedBufferFull = ManagedAtomic<Int>(0)
    public let reconnects = ManagedAtomic<Int>(0)
    public init() {}
}

/// The RabbitMQ cluster link.
///
/// rabbitmq-c is blocking and a connection is not thread-safe, so one owner thread does all
/// broker work: it owns a publish connection and a consume connection, `poll`s their sockets
/// plus an eventfd that the event loops write to when they hand it work, and wakes at least
/// every 100 ms (well under heartbeat/2) so rabbitmq-c can service heartbeats. The event loops
/// only take a lock to append to a queue, and write the eventfd only when the thread sleeps;
/// they never wait on the broker.
public final class RabbitLink: ClusterLink, @unchecked Sendable {
    // @unchecked: `pending` is guarded by `lock`; everything in `Worker` is touched only by the
    // link's own thread; the rest is immutable or atomic.
    public let configuration: RabbitConfiguration
    public let counters = RabbitCounters()
    private let logger: Logger
    private let wakeFD: Int32
    private let thread = NIOThreadPool(numberOfThreads: 1)
    private let connected = ManagedAtomic<Bool>(false)
    /// True while the link's thread is (about to be) blocked in poll: only then is a wake-up
    /// write needed. A busy thread picks up new work on its next round without one.
    private let sleeping = ManagedAtomic<Bool>(false)
    private let stopped = ManagedAtomic<Bool>(false)
    private let finished: EventLoopPromise<Void>
    private let finishLoop = MultiThreadedEventLoopGroup(numberOfThreads: 1)

    private struct Pending {
        var commands: [Command] = []
        var publishes: [ClusterMessage] = []
        var publishBytes = 0
    }
    private enum Command {
        case subscribe(String, EventLoopPromise<Void>)
        case unsubscribe(String)
    }
    private let lock = NIOLock()
    private var pending = Pending()

    public init(configuration: RabbitConfiguration, logger: Logger) {
        self.configuration = configuration
        self.logger = logger
        self.wakeFD = eventfd(0, Int32(EFD_NONBLOCK | EFD_CLOEXEC))
        self.finished = self.finishLoop.next().makePromise()
    }

    /// True while both connections are up and the queue is consumed.
    public var isConnected: Bool { self.connected.load(ordering: .relaxed) }

    public var isClustered: Bool { true }

    public func start(inbound: any ClusterInbound) {
        self.thread.start()
        let worker = Worker(link: self, inbound: inbound)
        self.thread.submit { _ in
            worker.run()
            self.finished.succeed(())
        }
    }

    public func subscribe(channel: String, promise: EventLoopPromise<Void>) {
        self.lock.withLock { self.pending.commands.append(.subscribe(channel, promise)) }
        self.wake()
    }

    public func unsubscribe(channel: String) {
        self.lock.withLock { self.pending.commands.append(.unsubscribe(channel)) }
        self.wake()
    }

    public func publish(_ batch: [ClusterMessage]) {
        guard self.connected.load(ordering: .relaxed) else {
            self.counters.droppedWhileDown.wrappingIncrement(by: batch.count, ordering: .relaxed)
            return
        }
        let bytes = batch.reduce(0) { $0 + $1.payload.readableBytes + $1.channel.utf8.count }
        let accepted = self.lock.withLock { () -> Bool in
            guard self.pending.publishBytes + bytes <= self.configuration.settings.publishBuffer else { return false }
            self.pending.publishes.append(contentsOf: batch)
            self.pending.publishBytes += bytes
            return true
        }
        if accepted {
            self.wake()
        } else {
            self.counters.droppedBufferFull.wrappingIncrement(by: batch.count, ordering: .relaxed)
        }
    }

    public func shutdown() async {
        guard !self.stopped.exchange(true, ordering: .relaxed) else { return }
        self.sleeping.store(true, ordering: .sequentiallyConsistent)
        self.wake()
        try? await self.finished.futureResult.get()
        try? await self.thread.shutdownGracefully()
        close(self.wakeFD)
        try? await self.finishLoop.shutdownGracefully()
    }

    private func wake() {
        guard self.sleeping.exchange(false, ordering: .sequentiallyConsistent) else { return }
        var one: UInt64 = 1
        _ = write(self.wakeFD, &one, 8)
    }

    private var hasPending: Bool {
        self.lock.withLock { !self.pending.commands.isEmpty || !self.pending.publishes.isEmpty }
    }

    private var hasPendingCommands: Bool {
        self.lock.withLock { !self.pending.commands.isEmpty }
    }

    /// Takes the commands, and the publishes too when `publishes` is true.
    private func take(publishes: Bool) -> Pending {
        self.lock.withLock {
            var out = Pending()
            out.commands = self.pending.commands
            self.pending.commands = []
            if publishes {
                out.publishes = self.pending.publishes
                out.publishBytes = self.pending.publishBytes
                self.pending.publishes = []
                self.pending.publishBytes = 0
            }
            return out
        }
    }

    /// Drops what waits for the broker (it is down); returns how many messages that was.
    private func dropPublishes() -> Int {
        self.lock.withLock {
            let n = self.pending.publishes.count
            self.pending.publishes = []
            self.pending.publishBytes = 0
            return n
        }
    }

    /// Puts back commands that could not be carried out, ahead of newer ones.
    private func requeue(_ commands: ArraySlice<Command>) {
        self.lock.withLock { self.pending.commands = Array(commands) + self.pending.commands }
    }

    // MARK: - The owner thread

    /// Everything the link's thread owns.
    // @unchecked: created on start() and from then on used only by the link's one thread.
    private final class Worker: @unchecked Sendable {
        let link: RabbitLink
        let inbound: any ClusterInbound
        let config: RabbitConfiguration
        var logger: Logger

        var publisher: AMQPConnection?
        var consumer: AMQPConnection?
        var queue: CString?
        let exchange: CString
        let nodeID: CString
        var keys: [String: CString] = [:]

        enum Want { case active, lingering(NIODeadline) }
        /// Channels this node wants bound: active, or lingering after the last client left.
        var wanted: [String: Want] = [:]
        /// Channels bound on the current consume connection.
        var bound: Set<String> = []

        // Reconnection.
        var nextAttempt = NIODeadline.now()
        var backoff: TimeAmount = .milliseconds(100)
        var downSince: NIODeadline? = NIODeadline.now()
        var warnedThisOutage = false
        var droppedAtOutageStart = 0

        var nextHousekeeping = NIODeadline.now()
        var nextDropReport = NIODeadline.now()
        var reportedBufferDrops = 0
        /// When the next publish may go out (see `RabbitConfiguration.publishWindow`).
        var nextPublish = NIODeadline.now()
        var body: [UInt8] = []
        var batch = PublishBatch(frameMax: 131_072)
        let allocator = ByteBufferAllocator()
        /// Stop reading from the broker while the event loops hold this much undelivered.
        let inboundBacklogLimit = 64 << 20

        init(link: RabbitLink, inbound: any ClusterInbound) {
            self.link = link
            self.inbound = inbound
            self.config = link.configuration
            self.logger = link.logger
            self.exchange = CString(link.configuration.settings.exchange)
            self.nodeID = CString(link.configuration.nodeID)
            self.logger[metadataKey: "broker"] = "\(link.configuration.url)"
        }

        func run() {
            while !self.link.stopped.load(ordering: .relaxed) {
                if self.consumer == nil {
                    if NIODeadline.now() >= self.nextAttempt { self.connect() }
                    if self.consumer == nil {
                        // While down: subscriptions are answered at once (local service), publishes dropped.
                        self.link.counters.droppedWhileDown.wrappingIncrement(by: self.link.dropPublishes(), ordering: .relaxed)
                        try? self.handleCommands(self.link.take(publishes: false).commands)
                        try? self.unbindExpired()
                        self.sleepUntilWoken(timeoutMillis: self.millisUntil(self.nextAttempt, cap: 100))
                        continue
                    }
                }
                do {
                    try self.step()
                } catch {
                    self.lost(error)
                }
            }
            self.disconnect(polite: true)
        }

        private func millisUntil(_ deadline: NIODeadline, cap: Int) -> Int {
            let ms = (deadline - NIODeadline.now()).nanoseconds / 1_000_000
            return max(0, min(cap, Int(ms)))
        }

        /// One round while connected: wait for work or input, then do all of it.
        private func step() throws(BrokerError) {
            guard let consumer = self.consumer, let publisher = self.publisher else { return }
            let reading = self.inbound.clusterBacklogBytes < self.inboundBacklogLimit
            if !(reading && consumer.hasBufferedInput) {
                var fds = [
                    pollfd(fd: self.link.wakeFD, events: Int16(POLLIN), revents: 0),
                    pollfd(fd: consumer.fileDescriptor, events: reading ? Int16(POLLIN) : 0, revents: 0),
                    pollfd(fd: publisher.fileDescriptor, events: Int16(POLLIN), revents: 0),
                ]
                var timeout = reading ? self.pollTimeout() : 5
                let publishDue = NIODeadline.now() >= self.nextPublish
                if !publishDue { timeout = min(timeout, self.millisUntil(self.nextPublish, cap: 5) + 1) }
                self.link.sleeping.store(true, ordering: .sequentiallyConsistent)
                if publishDue ? self.link.hasPending : self.link.hasPendingCommands {
                    self.link.sleeping.store(false, ordering: .sequentiallyConsistent)
                } else {
                    _ = poll(&fds, 3, Int32(timeout))
                    self.link.sleeping.store(false, ordering: .sequentiallyConsistent)
                    if fds[0].revents != 0 { self.drainWakeFD() }
                    if fds[2].revents != 0 { try publisher.serviceWithoutBlocking("publish connection") }
                }
            }
            let now = NIODeadline.now()
            let pending = self.link.take(publishes: now >= self.nextPublish)
            try self.handleCommands(pending.commands)
            if !pending.publishes.isEmpty {
                self.nextPublish = now + self.config.settings.publishWindow
                try self.publish(pending.publishes)
            }
            if reading { try self.consume(consumer) }
            if now >= self.nextHousekeeping {
                self.nextHousekeeping = now + .milliseconds(100)
                self.reportBufferDrops(now: now)
                try self.unbindExpired()
                // Lets rabbitmq-c send heartbeats on the quiet publish connection and notice a close.
                try publisher.serviceWithoutBlocking("publish connection")
            }
        }

        /// Messages dropped because the outbound buffer was full: one warning per 10 s at most.
        private func reportBufferDrops(now: NIODeadline) {
            guard now >= self.nextDropReport else { return }
            let dropped = self.link.counters.droppedBufferFull.load(ordering: .relaxed)
            guard dropped > self.reportedBufferDrops else { return }
            self.logger.warning("broker slower than the clients: dropped messages for other nodes", metadata: [
                "dropped": "\(dropped - self.reportedBufferDrops)", "amqp_buffer": "\(self.config.settings.publishBuffer)",
            ])
            self.reportedBufferDrops = dropped
            self.nextDropReport = now + .seconds(10)
        }

        /// Housekeeping (unbinding lingering channels, heartbeats) runs every 100 ms.
        private func pollTimeout() -> Int {
            self.millisUntil(self.nextHousekeeping, cap: 100) + 1
        }

        private func drainWakeFD() {
            var value: UInt64 = 0
            _ = read(self.link.wakeFD, &value, 8)
        }

        private func sleepUntilWoken(timeoutMillis: Int) {
            var fds = [pollfd(fd: self.link.wakeFD, events: Int16(POLLIN), revents: 0)]
            self.link.sleeping.store(true, ordering: .sequentiallyConsistent)
            if !self.link.hasPending, poll(&fds, 1, Int32(timeoutMillis)) > 0 { self.drainWakeFD() }
            self.link.sleeping.store(false, ordering: .sequentiallyConsistent)
        }

        // MARK: Connecting

        private func connect() {
            do {
                let heartbeat = Int32(max(1, self.config.settings.heartbeat.nanoseconds / 1_000_000_000))
                let publisher = try AMQPConnection(url: self.config.url, heartbeatSeconds: heartbeat, connectTimeout: 5)
                self.publisher = publisher
                self.batch = PublishBatch(frameMax: Int(amqp_get_frame_max(publisher.state)))
                amqp_exchange_declare(publisher.state, 1, self.exchange.bytes, amqp_cstring_bytes("topic"), 0, 1, 0, 0, amqp_table_t(num_entries: 0, entries: nil))
                try publisher.check(amqp_get_rpc_reply(publisher.state), "declare topic exchange '\(self.config.settings.exchange)'")

                let consumer = try AMQPConnection(url: self.config.url, heartbeatSeconds: heartbeat, connectTimeout: 5)
                self.consumer = consumer
                try self.declareQueue(consumer)
                self.bound = []
                for name in self.wanted.keys { try self.bind(name, on: consumer) }
                amqp_basic_consume(consumer.state, 1, self.queue!.bytes, amqp_bytes_t(len: 0, bytes: nil), 0, 1, 1, amqp_table_t(num_entries: 0, entries: nil))
                try consumer.check(amqp_get_rpc_reply(consumer.state), "consume queue")
            } catch {
                self.failedAttempt(error)
                return
            }
            self.link.connected.store(true, ordering: .relaxed)
            self.backoff = .milliseconds(100)
            let dropped = self.link.counters.droppedWhileDown.load(ordering: .relaxed) - self.droppedAtOutageStart
            if self.warnedThisOutage, let since = self.downSince {
                let seconds = Double((NIODeadline.now() - since).nanoseconds) / 1e9
                self.logger.warning("broker link restored", metadata: [
                    "down.seconds": "\(Int(seconds * 10) / 10)", "dropped.while_down": "\(dropped)", "channels.bound": "\(self.bound.count)",
                ])
                self.link.counters.reconnects.wrappingIncrement(ordering: .relaxed)
            } else {
                self.logger.notice("broker link up", metadata: ["queue": "\(self.queueName)", "exchange": "\(self.config.settings.exchange)"])
            }
            self.downSince = nil
            self.warnedThisOutage = false
        }

        var queueName: String { self.queue.map { String(cString: $0.pointer) } ?? "" }

        private func declareQueue(_ consumer: AMQPConnection) throws(BrokerError) {
            let maxLength = CString("x-max-length")
            let overflow = CString("x-overflow")
            let dropHead = CString("drop-head")
            let ttl = CString("x-message-ttl")
            var entries = [amqp_table_entry_t](repeating: amqp_table_entry_t(), count: 3)
            entries[0].key = maxLength.bytes
            entries[0].value.kind = UInt8(AMQP_FIELD_KIND_I64.rawValue)
            entries[0].value.value.i64 = Int64(self.config.settings.queueMaxLength)
            entries[1].key = overflow.bytes
            entries[1].value.kind = UInt8(AMQP_FIELD_KIND_UTF8.rawValue)
            entries[1].value.value.bytes = dropHead.bytes
            entries[2].key = ttl.bytes
            entries[2].value.kind = UInt8(AMQP_FIELD_KIND_I64.rawValue)
            entries[2].value.value.i64 = Int64(self.config.settings.queueMessageTTL.nanoseconds / 1_000_000)
            let ok = entries.withUnsafeMutableBufferPointer { buffer in
                withExtendedLifetime((maxLength, overflow, dropHead, ttl)) {
                    amqp_queue_declare(consumer.state, 1, amqp_bytes_t(len: 0, bytes: nil), 0, 0, 1, 1, amqp_table_t(num_entries: 3, entries: buffer.baseAddress))
                }
            }
            try consumer.check(amqp_get_rpc_reply(consumer.state), "declare this node's queue")
            guard let ok else { throw BrokerError(operation: "declare this node's queue", reason: "no queue name in the reply") }
            self.queue = CString(AMQPConnection.string(ok.pointee.queue))
        }

        private func key(_ name: String) -> CString {
            if let k = self.keys[name] { return k }
            if self.keys.count > 10_000 { self.keys.removeAll() }
            let k = CString(RoutingKey.forChannel(name))
            self.keys[name] = k
            return k
        }

        private func bind(_ name: String, on consumer: AMQPConnection) throws(BrokerError) {
            amqp_queue_bind(consumer.state, 1, self.queue!.bytes, self.exchange.bytes, self.key(name).bytes, amqp_table_t(num_entries: 0, entries: nil))
            try consumer.check(amqp_get_rpc_reply(consumer.state), "bind channel")
            self.bound.insert(name)
        }

        private func failedAttempt(_ error: BrokerError) {
            self.disconnect(polite: false)
            self.scheduleRetry()
            if !self.warnedThisOutage {
                self.warnedThisOutage = true
                self.droppedAtOutageStart = self.link.counters.droppedWhileDown.load(ordering: .relaxed)
                self.logger.warning("broker unreachable; serving local clients only and retrying", metadata: ["error": "\(error)"])
            } else {
                self.logger.debug("broker still unreachable", metadata: ["error": "\(error)", "retry.in.ms": "\(self.backoff.nanoseconds / 1_000_000)"])
            }
        }

        /// Jittered exponential backoff, capped at 1 s so a returning broker is used within 2 s.
        private func scheduleRetry() {
            let jittered = Int64(Double(self.backoff.nanoseconds) * Double.random(in: 0.5...1.0))
            self.nextAttempt = NIODeadline.now() + .nanoseconds(jittered)
            self.backoff = min(self.backoff * 2, .seconds(1))
        }

        private func lost(_ error: BrokerError) {
            self.link.connected.store(false, ordering: .relaxed)
            self.downSince = NIODeadline.now()
            self.droppedAtOutageStart = self.link.counters.droppedWhileDown.load(ordering: .relaxed)
            self.warnedThisOutage = true
            self.logger.warning("broker link lost; serving local clients only and reconnecting", metadata: ["error": "\(error)"])
            self.disconnect(polite: false)
            self.backoff = .milliseconds(50)
            self.scheduleRetry()
        }

        /// Drops both connections. After a failure rabbitmq-c's state may be broken, so only a
        /// clean shutdown closes politely; otherwise the connections are just destroyed.
        private func disconnect(polite: Bool) {
            self.link.connected.store(false, ordering: .relaxed)
            if polite {
                self.publisher?.close()
                self.consumer?.close()
            }
            self.publisher = nil
            self.consumer = nil
            self.bound = []
            // What was waiting for the broker is dropped and counted.
            self.link.counters.droppedWhileDown.wrappingIncrement(by: self.link.dropPublishes(), ordering: .relaxed)
        }

        // MARK: Work from the event loops

        /// Subscriptions and unsubscriptions from the event loops. Connected: a new channel is
        /// bound before its promise succeeds (joined means subscribed cluster-wide). Down: the
        /// promise succeeds at once (local service) and the channel is bound on reconnection.
        /// A failed bind puts the rest back for after the reconnect and throws.
        private func handleCommands(_ commands: [Command]) throws(BrokerError) {
            for (i, command) in commands.enumerated() {
                switch command {
                case .subscribe(let name, let promise):
                    self.wanted[name] = .active
                    if let consumer = self.consumer, !self.bound.contains(name) {
                        do {
                            try self.bind(name, on: consumer)
                        } catch {
                            self.link.requeue(commands[i...])
                            throw error
                        }
                    }
                    promise.succeed(())
                case .unsubscribe(let name):
                    self.wanted[name] = .lingering(NIODeadline.now() + self.config.settings.unbindLinger)
                }
            }
        }

        /// Packs the batch into AMQP messages and writes them with one `send`.
        ///
        /// Consecutive messages from one sender on one channel with the same type share one AMQP
        /// message (up to 256 KiB): the broker's cost is per AMQP message, so this is what lets a
        /// busy channel go faster than the broker's message rate. Each AMQP message still carries
        /// its node id, sender connection id and type in its properties, and per-sender order is
        /// kept (a change of type starts a new group after the previous one).
        /// Body: u16 name length, the channel name, then per message a u32 length and the payload.
        private func publish(_ messages: [ClusterMessage]) throws(BrokerError) {
            guard let publisher = self.publisher else { return }
            struct GroupKey: Hashable { let channel: String; let connection: UInt64 }
            var open: [GroupKey: Int] = [:]
            var groups: [(key: GroupKey, isText: Bool, indices: [Int], bytes: Int)] = []
            for (i, message) in messages.enumerated() {
                let key = GroupKey(channel: message.channel, connection: message.connectionID)
                let size = message.payload.readableBytes + 4
                if let g = open[key], groups[g].isText == message.isText, groups[g].bytes + size <= 256 << 10 {
                    groups[g].indices.append(i)
                    groups[g].bytes += size
                } else {
                    open[key] = groups.count
                    groups.append((key, message.isText, [i], size))
                }
            }
            self.batch.removeAll()
            let exchange = self.exchange.rawBytes
            let appID = self.nodeID.rawBytes
            for group in groups {
                let routingKey = self.key(group.key.channel)
                let nameBytes = group.key.channel.utf8
                self.body.removeAll(keepingCapacity: true)
                self.body.append(UInt8(nameBytes.count >> 8))
                self.body.append(UInt8(nameBytes.count & 0xFF))
                self.body.append(contentsOf: nameBytes)
                for i in group.indices {
                    let payload = messages[i].payload
                    let n = UInt32(payload.readableBytes)
                    self.body.append(contentsOf: [UInt8(n >> 24), UInt8(n >> 16 & 0xFF), UInt8(n >> 8 & 0xFF), UInt8(n & 0xFF)])
                    payload.withUnsafeReadableBytes { self.body.append(contentsOf: $0) }
                }
                self.body.withUnsafeBytes { body in
                    self.batch.append(exchange: exchange, routingKey: routingKey.rawBytes, type: group.isText ? UInt8(ascii: "t") : UInt8(ascii: "b"),
                                      appID: appID, correlationID: group.key.connection, body: body)
                }
            }
            do {
                try self.batch.write(to: publisher.fileDescriptor)
            } catch {
                self.link.counters.droppedWhileDown.wrappingIncrement(by: messages.count, ordering: .relaxed)
                throw error
            }
            self.link.counters.published.wrappingIncrement(by: messages.count, ordering: .relaxed)
        }

        /// Reads every delivery already available (without blocking) and hands them over in one batch.
        private func consume(_ consumer: AMQPConnection) throws(BrokerError) {
            var batch: [ClusterMessage] = []
            var zero = timeval(tv_sec: 0, tv_usec: 0)
            defer {
                if !batch.isEmpty {
                    self.link.counters.received.wrappingIncrement(by: batch.count, ordering: .relaxed)
                    self.inbound.deliverFromCluster(batch)
                }
            }
            amqp_maybe_release_buffers(consumer.state)
            while batch.count < 1024 {
                var envelope = amqp_envelope_t()
                let reply = amqp_consume_message(consumer.state, &envelope, &zero, 0)
                if reply.reply_type == AMQP_RESPONSE_NORMAL {
                    self.decode(envelope, into: &batch)
                    amqp_destroy_envelope(&envelope)
                    continue
                }
                if reply.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION {
                    if reply.library_error == AMQP_STATUS_TIMEOUT.rawValue { return }
                    if reply.library_error == AMQP_STATUS_UNEXPECTED_STATE.rawValue {
                        // A method other than a delivery: a close, or something to skip.
                        try consumer.serviceWithoutBlocking("consume connection")
                        continue
                    }
                }
                try consumer.check(reply, "consume")
            }
        }

        /// Copies the messages out of a delivery (before its envelope is destroyed); nothing for this
        /// node's own messages or a malformed body.
        private func decode(_ envelope: amqp_envelope_t, into batch: inout [ClusterMessage]) {
            let props = envelope.message.properties
            if props._flags & staps_basic_app_id_flag() != 0, props.app_id.len == self.nodeID.count,
                memcmp(props.app_id.bytes, self.nodeID.pointer, self.nodeID.count) == 0
            {
                return
            }
            let body = envelope.message.body
            guard let base = body.bytes, body.len >= 2 else { return }
            let raw = UnsafeRawBufferPointer(start: base, count: body.len)
            let nameLength = Int(raw[0]) << 8 | Int(raw[1])
            guard body.len >= 2 + nameLength else { return }
            let name = String(decoding: raw[2..<(2 + nameLength)], as: UTF8.self)
            var isText = false
            if props._flags & staps_basic_type_flag() != 0, props.type.len == 1, let t = props.type.bytes {
                isText = t.load(as: UInt8.self) == UInt8(ascii: "t")
            }
            var at = 2 + nameLength
            while at + 4 <= body.len {
                let n = Int(raw[at]) << 24 | Int(raw[at + 1]) << 16 | Int(raw[at + 2]) << 8 | Int(raw[at + 3])
                at += 4
                guard n <= body.len - at else { return }
                var payload = self.allocator.buffer(capacity: n)
                payload.writeBytes(UnsafeRawBufferPointer(rebasing: raw[at..<(at + n)]))
                at += n
                batch.append(ClusterMessage(channel: name, payload: payload, isText: isText, connectionID: 0))
            }
        }

        /// Forgets channels whose linger has passed, unbinding those bound on this connection.
        private func unbindExpired() throws(BrokerError) {
            let now = NIODeadline.now()
            for (name, want) in self.wanted {
                guard case .lingering(let deadline) = want, deadline <= now else { continue }
                self.wanted[name] = nil
                if self.bound.remove(name) != nil, let consumer = self.consumer {
                    amqp_queue_unbind(consumer.state, 1, self.queue!.bytes, self.exchange.bytes, self.key(name).bytes, amqp_table_t(num_entries: 0, entries: nil))
                    try consumer.check(amqp_get_rpc_reply(consumer.state), "unbind channel")
                }
            }
        }
    }
}
