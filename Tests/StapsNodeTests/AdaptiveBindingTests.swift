import Atomics
import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import StapsCluster
import StapsNode
@testable import StapsRabbit
import Testing

/// Adaptive binding on the real broker: a burst moves new channels onto buckets, which are
/// refined back to exact keys and unbound, and no client that got its 101 misses a message on
/// the way; a join just after a reconnection waits for its binding.
@Suite(.serialized) struct AdaptiveBindingTests {
    /// Collects what a link receives, per channel, in order.
    final class Collector: ClusterReceiver {
        let seen = NIOLockedValueBox<[String: [String]]>([:])
        var clusterBacklogBytes: Int { 0 }
        func deliverFromCluster(_ batch: [ClusterMessage]) {
            self.seen.withLockedValue { seen in
                for m in batch { seen[m.channel, default: []].append(String(buffer: m.payload)) }
            }
        }
        func messages(_ channel: String) -> [String] { self.seen.withLockedValue { $0[channel] ?? [] } }
    }

    static func text(_ s: String) -> ByteBuffer { ByteBuffer(string: s) }

    @Test func aJoinJustAfterAReconnectionWaitsForItsBinding() async throws {
        let url = try AMQPURL(try await Broker.require())
        let exchange = Broker.freshExchange()
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let settings = ClusterSettings(exchange: exchange)
        // In the window between the connection counting as up and anything bound on it, a join
        // comes: it must wait for its own bind, not proceed as if the broker were down.
        let linkBox = NIOLockedValueBox<RabbitLink?>(nil)
        let promise = group.next().makePromise(of: Void.self)
        let proceededEarly = ManagedAtomic<Bool>(false)
        let fired = ManagedAtomic<Bool>(false)
        let completed = ManagedAtomic<Bool>(false)
        promise.futureResult.whenComplete { _ in completed.store(true, ordering: .sequentiallyConsistent) }
        let receiver = Collector()
        let link = RabbitLink(configuration: RabbitConfiguration(url: url, settings: settings), logger: testLogger("link"), afterLinkUp: {
            guard !fired.exchange(true, ordering: .relaxed), let link = linkBox.withLockedValue({ $0 }) else { return }
            link.startReceiving(channel: "window", whenBound: promise)
            // The link's thread is held here, so nothing can bind: only the handoff could
            // have let the join through.
            usleep(200_000)
            proceededEarly.store(completed.load(ordering: .sequentiallyConsistent), ordering: .relaxed)
        })
        linkBox.withLockedValue { $0 = link }
        let publisher = RabbitLink(configuration: RabbitConfiguration(url: url, settings: settings), logger: testLogger("link"))
        link.start(receiver: receiver)
        publisher.start(receiver: Collector())
        try await promise.futureResult.get()
        let (didFire, early) = (fired.load(ordering: .relaxed), proceededEarly.load(ordering: .relaxed))
        #expect(didFire)
        #expect(!early, "a join after the link came up proceeded before its key was bound")
        // Bound when it proceeded: a message published now arrives.
        try await eventually("the publisher is up") { publisher.isConnected }
        publisher.publish([ClusterMessage(channel: "window", payload: Self.text("after"), isText: true, connectionID: 1)])
        try await eventually("the message arrives") { receiver.messages("window") == ["after"] }
        await link.shutdown()
        await publisher.shutdown()
        try await group.shutdownGracefully()
    }

    @Test func noClientMissesAMessageWhileItsChannelMovesFromABucketToItsExactKey() async throws {
        let nodes = try await startClusterNodes(2, linger: .milliseconds(300), binding: .adaptive)
        let (a, b) = (nodes[0], nodes[1])
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        // A burst of 2,000 new channels on node a backs its binds up...
        var burst: [EventLoopFuture<Void>] = []
        for i in 0..<2000 {
            let promise = group.next().makePromise(of: Void.self)
            a.1.startReceiving(channel: "burst-\(i)", whenBound: promise)
            burst.append(promise.futureResult)
        }
        // ...so the client joining now is covered by a bucket.
        let receiver = try await TestClient.connect(a.0.tcp, "/moving")
        let sender = try await TestClient.connect(b.0.tcp, "/moving")
        for f in burst { try await f.get() }
        let onBuckets = a.1.counters.bindingKeysBound[1...].reduce(0) { $0 + $1.load(ordering: .relaxed) }
        #expect(onBuckets > 0, "the burst was covered with buckets")
        // Messages flow the whole time the burst leaves and the buckets are refined and unbound.
        let stop = ManagedAtomic<Bool>(false)
        let sending = Task {
            var n = 0
            while !stop.load(ordering: .relaxed), n < 3000 {
                sender.send("m\(n)")
                n += 1
                try await Task.sleep(nanoseconds: 2_000_000)
            }
            return n
        }
        try await Task.sleep(nanoseconds: 200_000_000)
        for i in 0..<2000 { a.1.stopReceiving(channel: "burst-\(i)") }
        try await eventually("node a is back to exact keys only", within: 20) {
            let c = a.1.counters
            return c.bindingKeysBound[1...].allSatisfy { $0.load(ordering: .relaxed) == 0 } && c.bindingKeysBound[0].load(ordering: .relaxed) == 1
        }
        try await Task.sleep(nanoseconds: 300_000_000)
        stop.store(true, ordering: .relaxed)
        let sent = try await sending.value
        for i in 0..<sent {
            let got = try await receiver.nextText()
            if got != "m\(i)" {
                Issue.record("message \(i) of \(sent): got \(got)")
                break
            }
        }
        print("AdaptiveBindingTests: \(sent) messages across the move, \(onBuckets) buckets bound in the burst, none missed")
        await receiver.close()
        await sender.close()
        await stopAll(nodes)
        try await group.shutdownGracefully()
    }
}
