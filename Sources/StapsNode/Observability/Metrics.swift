import Atomics
import CoreMetrics
import NIOConcurrencyHelpers
import Prometheus
import StapsCluster

/// A swift-metrics factory over one node's swift-prometheus registry that gives every metric
/// its help text (Prometheus's own factory leaves it empty, and `promtool` then refuses the
/// output). The node's histograms are not made here (see `HistogramExposition`).
struct HelpfulPrometheusFactory: MetricsFactory {
    let registry: PrometheusCollectorRegistry
    let help: @Sendable (String) -> String

    private func descriptor(_ label: String) -> MetricNameDescriptor {
        MetricNameDescriptor(metricName: label, unitName: "", helpText: self.help(label))
    }

    func makeCounter(label: String, dimensions: [(String, String)]) -> any CounterHandler {
        self.registry.makeCounter(descriptor: self.descriptor(label), labels: dimensions)
    }

    func makeFloatingPointCounter(label: String, dimensions: [(String, String)]) -> any FloatingPointCounterHandler {
        self.registry.makeCounter(descriptor: self.descriptor(label), labels: dimensions)
    }

    func makeRecorder(label: String, dimensions: [(String, String)], aggregate: Bool) -> any RecorderHandler {
        guard aggregate else { return self.registry.makeGauge(descriptor: self.descriptor(label), labels: dimensions) }
        return self.registry.makeValueHistogram(descriptor: self.descriptor(label), labels: dimensions, buckets: [])
    }

    func makeMeter(label: String, dimensions: [(String, String)]) -> any MeterHandler {
        self.registry.makeGauge(descriptor: self.descriptor(label), labels: dimensions)
    }

    func makeTimer(label: String, dimensions: [(String, String)]) -> any TimerHandler {
        self.registry.makeDurationHistogram(descriptor: self.descriptor(label), labels: dimensions, buckets: [])
    }

    func destroyCounter(_ handler: any CounterHandler) {
        if let counter = handler as? Prometheus.Counter { self.registry.unregisterCounter(counter) }
    }

    func destroyFloatingPointCounter(_ handler: any FloatingPointCounterHandler) {
        if let counter = handler as? Prometheus.Counter { self.registry.unregisterCounter(counter) }
    }

    func destroyRecorder(_ handler: any RecorderHandler) {
        if let gauge = handler as? Prometheus.Gauge { self.registry.unregisterGauge(gauge) }
        if let histogram = handler as? ValueHistogram { self.registry.unregisterValueHistogram(histogram) }
    }

    func destroyMeter(_ handler: any MeterHandler) {
        if let gauge = handler as? Prometheus.Gauge { self.registry.unregisterGauge(gauge) }
    }

    func destroyTimer(_ handler: any TimerHandler) {
        if let histogram = handler as? DurationHistogram { self.registry.unregisterDurationHistogram(histogram) }
    }
}

/// Every metric a node exports, with its help text. No label ever carries a channel name;
/// every label has a small fixed set of values.
enum MetricCatalog {
    static let help: [String: String] = [
        "staps_connections": "Open connections (HTTP and websocket), by listener kind (tcp, unix).",
        "staps_websocket_clients": "Websocket clients in a channel on this node.",
        "staps_channels": "Channels with at least one client on this node.",
        "staps_messages_received_total": "Messages received from local clients, by source (websocket, post).",
        "staps_messages_delivered_total": "Messages handed to local receivers: one per receiver reached.",
        "staps_message_bytes_received_total": "Payload bytes of the messages received from local clients (websocket and POST).",
        "staps_message_bytes_delivered_total": "Payload bytes handed to local receivers: one message's bytes per receiver reached.",
        "staps_messages_dropped_total": "Messages not delivered, by reason (cross_loop_backlog: an event loop too far behind; subscribe_only: the hook let the sender only receive).",
        "staps_auth_requests_total": "Handshakes and POSTs the authorization hook was asked about, by result (admitted, also a subscribe-only POST then refused 403; denied: its 401/403; else a 503: error_status, unreachable, timeout, over_concurrency, bad_answer: an invalid X-Staps-Allow, not HTTP, or closed unanswered).",
        "staps_fanout_receivers": "Receivers on this node per message relayed (from local clients, POSTs and other nodes).",
        "staps_websocket_closes_total": "Websocket closes by code (1006: no close handshake; application: 3000-4999) and by who started them (client, node).",
        "staps_http_responses_total": "HTTP responses by status (pages, POSTs and refusals; 101s are not counted).",
        "staps_handshakes_rejected_total": "Websocket upgrade requests refused, by HTTP status.",
        "staps_connections_refused_total": "Connections refused with 503 for being over max_connections.",
        "staps_slow_consumer_closes_total": "Receivers closed with 1008 for staying over their send buffer.",
        "staps_slow_consumer_dropped_bytes_total": "Bytes queued for slow consumers and dropped when they were closed.",
        "staps_cluster_unmatched_total": "Messages from other nodes the link handed over for a channel whose last client here left meanwhile (those for channels without a client are dropped on arrival: staps_broker_discarded_total).",
        "staps_cluster_missed_total": "Messages other nodes sent on a channel with a client here that never arrived, counted once per message at this node (not per client) when a later message of the same sender's stream on the channel skipped their numbers, whatever lost them (the sender's drops: staps_broker_dropped_total there; this node's queue bounds; a lost connection or broker node). Losses with no later message on their stream are not seen.",
        "staps_cluster_out_of_order_total": "Messages from other nodes that arrived numbered at or before one already received from the same sender on the channel (reordered or duplicated), delivered all the same.",
        "staps_memory_trims_total": "Times freed heap memory was returned to the system after a busy spell.",
        "staps_broker_up": "1 while the broker link is connected (publishing and consuming), else 0.",
        "staps_broker_reconnects_total": "Times the broker link connected again after losing its broker.",
        "staps_broker_published_total": "Messages the broker confirmed.",
        "staps_broker_consumed_total": "Messages consumed from the broker (published by other nodes).",
        "staps_broker_dropped_total": "Messages that did not get through the broker as the sender sees it, by reason (broker_down, also unconfirmed when the connection died: some may have arrived; buffer_full; expired: waited longer than amqp_max_age; rejected; malformed). What was lost, whatever lost it, is counted by the receivers: staps_cluster_missed_total.",
        "staps_broker_bindings": "Binding keys bound for this node's queue on the current broker connection, by granularity (exact: one channel; 4096, 256, 16: a bucket of channels).",
        "staps_broker_rebinds_pending": "Binding keys still to bind again after a reconnection.",
        "staps_broker_binds_waiting": "Binds and unbinds sent to the broker and not answered yet (past a few, new channels are covered by buckets).",
        "staps_broker_bind_latency_seconds": "Time from a bind's request to the broker's answer.",
        "staps_broker_discarded_total": "Messages consumed from the broker for channels without a client here, dropped on arrival (bucket bindings, lingering bindings).",
        "staps_broker_matched_total": "Messages consumed from the broker for channels with a client here.",
        "staps_broker_publish_batch_messages": "Messages per publish to the broker.",
    ]
}

/// A node's metrics: swift-metrics counters and gauges over a swift-prometheus registry, brought
/// up to date from the node's own counters whenever they are read, and the histograms printed
/// from their bucket counts. The hot path only ever touches those counters (per event loop, no
/// lock); everything here runs on the scrape's thread.
public final class NodeMetrics: Sendable {
    /// What the metrics are read from.
    struct Sources: Sendable {
        var hub: Hub
        var counters: NodeCounters
        var link: any ClusterLink
        var hooked: Bool
    }

    private let registry = PrometheusCollectorRegistry()
    private let sources: Sources
    private let feeds: NIOLockedValueBox<Feeds>

    init(_ sources: Sources) {
        self.sources = sources
        let factory = HelpfulPrometheusFactory(registry: self.registry, help: { MetricCatalog.help[$0] ?? "" })
        self.feeds = NIOLockedValueBox(Feeds(factory: factory, clustered: sources.link.isClustered, hooked: sources.hooked))
    }

    /// The Prometheus text exposition of every metric, current as of this call.
    public func render() -> [UInt8] {
        self.feeds.withLockedValue { $0.update(from: self.sources) }
        var text = self.registry.emitToBuffer()
        for (name, bounds, snapshots, unit) in self.histograms() {
            HistogramExposition.append(name, help: MetricCatalog.help[name] ?? "", bounds: bounds, snapshots: snapshots, unit: unit, to: &text)
        }
        return text
    }

    /// Each histogram's name, bounds and bucket counts (one snapshot per writer). A sum read
    /// just after its counts may already hold an observation they do not show yet.
    private func histograms() -> [(String, [Int], [CountHistogram.Snapshot], Double)] {
        let fanout = self.sources.hub.loops.map(\.counters.fanout.snapshot) + [self.sources.counters.clusterFanout.snapshot]
        var all = [("staps_fanout_receivers", CountHistogram.fanoutBounds, fanout, 1.0)]
        if self.sources.link.isClustered, let link = self.sources.link.report {
            all.append(("staps_broker_publish_batch_messages", link.publishBatch.bounds, [link.publishBatch.snapshot], 1))
            all.append(("staps_broker_bind_latency_seconds", link.bindLatency.bounds, [link.bindLatency.snapshot], 1e-6))
        }
        return all
    }
}

/// The swift-metrics counters and gauges, and the counter values they last saw.
private struct Feeds {
    let factory: HelpfulPrometheusFactory
    let clustered: Bool
    /// Whether `auth_url` is set (the hook's metrics exist only then).
    let hooked: Bool
    private var counters: [String: (counter: CoreMetrics.Counter, last: Int)] = [:]
    private var gauges: [String: CoreMetrics.Gauge] = [:]

    init(factory: HelpfulPrometheusFactory, clustered: Bool, hooked: Bool) {
        self.factory = factory
        self.clustered = clustered
        self.hooked = hooked
    }

    private static func key(_ name: String, _ labels: [(String, String)]) -> String {
        labels.isEmpty ? name : name + "{" + labels.map { "\($0.0)=\($0.1)" }.joined(separator: ",") + "}"
    }

    /// Sets a counter to `value` by adding what it grew by since the last update.
    mutating func count(_ name: String, _ value: Int) { self.count(name, [], value) }
    mutating func gauge(_ name: String, _ value: Int) { self.gauge(name, [], value) }

    mutating func count(_ name: String, _ labels: [(String, String)], _ value: Int) {
        let key = Self.key(name, labels)
        var feed = self.counters[key] ?? (CoreMetrics.Counter(label: name, dimensions: labels, factory: self.factory), 0)
        if value > feed.last { feed.counter.increment(by: value - feed.last) }
        feed.last = max(feed.last, value)
        self.counters[key] = feed
    }

    mutating func gauge(_ name: String, _ labels: [(String, String)], _ value: Int) {
        let key = Self.key(name, labels)
        let gauge = self.gauges[key] ?? CoreMetrics.Gauge(label: name, dimensions: labels, factory: self.factory)
        self.gauges[key] = gauge
        gauge.record(value)
    }

    mutating func update(from sources: NodeMetrics.Sources) {
        let hub = sources.hub
        let c = sources.counters
        let loops = hub.loops.map(\.counters)
        func sum(_ counter: KeyPath<LoopCounters, ManagedAtomic<Int>>) -> Int {
            loops.reduce(0) { $0 + $1[keyPath: counter].load(ordering: .relaxed) }
        }
        self.gauge("staps_connections", [("listener", "tcp")], c.tcpConnections.load(ordering: .relaxed))
        self.gauge("staps_connections", [("listener", "unix")], c.unixConnections.load(ordering: .relaxed))
        self.gauge("staps_websocket_clients", sum(\.websocketClients))
        self.gauge("staps_channels", hub.directory.count)
        self.count("staps_messages_received_total", [("source", "websocket")], sum(\.websocketMessages))
        self.count("staps_messages_received_total", [("source", "post")], sum(\.postMessages))
        self.count("staps_messages_delivered_total", sum(\.messagesDelivered))
        self.count("staps_message_bytes_received_total", sum(\.bytesReceived))
        self.count("staps_message_bytes_delivered_total", sum(\.bytesDelivered))
        self.count("staps_messages_dropped_total", [("reason", "cross_loop_backlog")], c.crossLoopDropped.load(ordering: .relaxed))
        self.count("staps_messages_dropped_total", [("reason", "subscribe_only")], sum(\.droppedSubscribeOnly))
        if self.hooked {
            for (result, counter) in [
                ("admitted", c.authAdmitted), ("denied", c.authDenied), ("error_status", c.authFailedStatus),
                ("unreachable", c.authFailedUnreachable), ("timeout", c.authFailedTimeout),
                ("over_concurrency", c.authFailedOverConcurrency), ("bad_answer", c.authFailedBadAnswer),
            ] {
                self.count("staps_auth_requests_total", [("result", result)], counter.load(ordering: .relaxed))
            }
        }
        for close in c.closes.all where close.count > 0 {
            self.count("staps_websocket_closes_total", [("code", close.code), ("by", close.by)], close.count)
        }
        for (status, n) in c.httpResponses.seen {
            self.count("staps_http_responses_total", [("status", String(status))], n)
        }
        for (status, n) in c.handshakesRejected.seen {
            self.count("staps_handshakes_rejected_total", [("status", String(status))], n)
        }
        self.count("staps_connections_refused_total", c.connectionsRefused.load(ordering: .relaxed))
        self.count("staps_slow_consumer_closes_total", c.slowConsumersClosed.load(ordering: .relaxed))
        self.count("staps_slow_consumer_dropped_bytes_total", c.slowConsumerDroppedBytes.load(ordering: .relaxed))
        self.count("staps_memory_trims_total", c.memoryTrims.load(ordering: .relaxed))
        guard self.clustered, let link = sources.link.report else { return }
        self.count("staps_cluster_unmatched_total", c.clusterUnmatched.load(ordering: .relaxed))
        self.count("staps_cluster_missed_total", link.missed)
        self.count("staps_cluster_out_of_order_total", link.outOfOrder)
        self.gauge("staps_broker_up", link.up ? 1 : 0)
        self.count("staps_broker_reconnects_total", link.reconnects)
        self.count("staps_broker_published_total", link.published)
        self.count("staps_broker_consumed_total", link.consumed)
        self.count("staps_broker_discarded_total", link.discarded)
        self.count("staps_broker_matched_total", link.consumed - link.discarded - c.clusterUnmatched.load(ordering: .relaxed))
        for (reason, n) in link.dropped {
            self.count("staps_broker_dropped_total", [("reason", reason)], n)
        }
        for (granularity, n) in link.bindings {
            self.gauge("staps_broker_bindings", [("granularity", granularity)], n)
        }
        self.gauge("staps_broker_rebinds_pending", link.rebindsPending)
        self.gauge("staps_broker_binds_waiting", link.bindsWaiting)
    }
}
