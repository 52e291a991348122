import NIOConcurrencyHelpers
import NIOCore
import StapsCluster

/// The node-wide table of active staps channels, under one lock: taken when a client joins or
/// leaves, once per HTTP POST (to find the channel) and once per batch from the cluster, never
/// per websocket message. It alone tells the cluster link which channels to receive; only
/// `Hub.join` and `Membership.leave()` count clients in and out.
final class ChannelDirectory: Sendable {
    private struct Listing {
        var channel: ActiveChannel
        var clients: Int
        /// Succeeds once the link receives the channel (the first client's join).
        var bound: EventLoopFuture<Void>
    }

    private let table = NIOLockedValueBox<[String: Listing]>([:])
    private let link: any ClusterLink

    init(link: any ClusterLink) { self.link = link }

    /// Counts one more client on `name` (for `Hub.join` only); the future succeeds when the
    /// channel is received cluster-wide (at once when standalone).
    func join(_ name: String, on eventLoop: EventLoop) -> (ActiveChannel, EventLoopFuture<Void>) {
        let (channel, bound) = self.table.withLockedValue { table -> (ActiveChannel, EventLoopFuture<Void>) in
            if var listing = table[name] {
                listing.clients += 1
                table[name] = listing
                guard self.link.isClustered else { return (listing.channel, listing.bound) }
                // Not the first client's future: the binding may have to be made again since.
                let promise = eventLoop.makePromise(of: Void.self)
                self.link.awaitBinding(channel: name, promise: promise)
                return (listing.channel, promise.futureResult)
            }
            let channel = ActiveChannel(name: name)
            let promise = eventLoop.makePromise(of: Void.self)
            table[name] = Listing(channel: channel, clients: 1, bound: promise.futureResult)
            // Under the lock, so the link sees start and stop for one name in order.
            self.link.startReceiving(channel: name, whenBound: promise)
            return (channel, promise.futureResult)
        }
        return (channel, bound.hop(to: eventLoop))
    }

    /// Counts one client less (for `Membership.leave()` only); the last one out forgets the
    /// channel and stops receiving it.
    func leave(_ channel: ActiveChannel) {
        self.table.withLockedValue { table in
            guard var listing = table[channel.name], listing.channel === channel else { return }
            listing.clients -= 1
            if listing.clients > 0 {
                table[channel.name] = listing
            } else {
                table[channel.name] = nil
                self.link.stopReceiving(channel: channel.name)
            }
        }
    }

    /// Channels with clients on this node.
    var count: Int { self.table.withLockedValue { $0.count } }

    /// Clients on `name` on this node, and the channel if it is active.
    func lookup(_ name: String) -> (ActiveChannel, Int)? {
        self.table.withLockedValue { table in table[name].map { ($0.channel, $0.clients) } }
    }

    /// Resolves many names under one lock acquisition (for batches from the cluster).
    func channels<S: Sequence>(named names: S) -> [ActiveChannel?] where S.Element == String {
        self.table.withLockedValue { table in names.map { table[$0]?.channel } }
    }
}
