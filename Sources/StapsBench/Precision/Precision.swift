import ArgumentParser
import NIOCore
import StapsCluster
import StapsRabbit

struct Precision: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "precision",
        abstract: "Binding precision against churn: per binding setting, deliveries per message, the unmatched share, churn cycles/s and connect times, on 3 links holding C idle channels each.",
        discussion: """
            Per setting, three of staps's RabbitMQ links in this process (the nodes; see `rebind`)
            on a fresh exchange. Traffic flows on channels held on links 1 and 2 (each published by
            one of the two, wanted by the other); each link holds C idle channels, for each C given
            (topped up in turn, then left to settle: until no bind waits and the bindings by
            granularity stay the same for 1 s); a steady churn (hold a fresh channel, release it
            once bound) runs at a rate under the broker's bind ceiling, measured first in the same
            run (`binds`). Then, at the largest C, a burst of churn far above the ceiling, and the
            steady churn again, sampled every --sample seconds (does adaptive return to exact keys?).

            Deliveries per message: messages the broker delivered to the links other than the
            publisher / messages published (1.0 is what the traffic needs), of which unwanted: those
            to a link with no client on the channel (which it drops; the third link, for traffic, so
            at most 1.0: the share of another node's traffic that reaches a node without clients for
            it). Unmatched share: unwanted / all deliveries (so at most 50% with this traffic).
            """
    )

    @Option(name: .long, help: "RabbitMQ URL.") var amqp: String
    @Option(name: .long, help: "Binding settings, comma-separated: exact (or 0), 16, 256, 4096, adaptive.") var settings = "exact,4096,256,adaptive"
    @Option(name: .long, help: "Idle channels per link, comma-separated, ascending.") var idle = "100,1000,10000"
    @Option(name: .long, help: "Traffic channels (held on links 1 and 2).") var trafficChannels = 30
    @Option(name: .long, help: "Traffic messages per second, all channels together.") var trafficRate = 300.0
    @Option(name: .long, help: "Steady churn, cycles/s (default: --churn-share of the measured bind ceiling).") var churnRate: Double?
    @Option(name: .long, help: "Steady churn as a share of the bind ceiling, when --churn-rate is not given.") var churnShare = 0.25
    @Option(name: .long, help: "Seconds of steady churn per idle count.") var steady = 10.0
    @Option(name: .long, help: "Seconds of burst.") var burst = 10.0
    @Option(name: .long, help: "Burst churn, cycles/s offered (default: 10x the bind ceiling).") var burstRate: Double?
    @Option(name: .long, help: "Joins waiting at once during the burst, at most (beyond: skipped and counted).") var burstInFlight = 2048
    @Option(name: .long, help: "Joins waiting at once during steady churn, at most.") var steadyInFlight = 256
    @Option(name: .long, help: "Seconds watched after the burst, adaptive settings.") var afterBurst = 120.0
    @Option(name: .long, help: "Seconds watched after the burst, fixed settings (their bindings cannot change).") var afterBurstFixed = 20.0
    @Option(name: .long, help: "Seconds per sample after the burst.") var sample = 10.0
    @Option(name: .long, help: "Seconds at most to wait for the bindings to settle after topping up the idle channels.") var settleLimit = 90.0
    @Option(name: .long, help: "Bind->unbind cycles of the bind-ceiling baseline.") var ceilingCycles = 5000

    struct SteadyRow {
        var setting: String
        var idle: Int
        var window: ClusterSnapshot
        var churn: ChurnLoad.Result
        var settle: String
    }

    struct BurstRow {
        var setting: String
        var idle: Int
        var window: ClusterSnapshot
        var churn: ChurnLoad.Result
        /// After the burst: (seconds after its end, the sample).
        var after: [(Double, ClusterSnapshot)]
    }

    func run() async throws {
        print("$ " + CommandLine.arguments.map { $0.contains(" ") ? "'\($0)'" : $0 }.joined(separator: " "))
        let url = try AMQPURL(amqp)
        let modes: [(name: String, mode: BindingMode)] = try settings.split(separator: ",").map { raw in
            let value = raw == "exact" ? "0" : String(raw)
            guard let mode = BindingMode(configValue: value) else { throw ValidationError("--settings: '\(raw)' is not one of exact, 0, 16, 256, 4096, adaptive") }
            return (raw == "0" ? "exact" : String(raw), mode)
        }
        let idleCounts = try idle.split(separator: ",").map { raw -> Int in
            guard let n = Int(raw), n >= 0 else { throw ValidationError("--idle: '\(raw)' is not a count") }
            return n
        }
        guard !idleCounts.isEmpty, idleCounts == idleCounts.sorted() else { throw ValidationError("--idle: give counts in ascending order") }

        let ceiling = try BindBaseline.run(url: url, cycles: ceilingCycles, window: 256)
        let steadyRate = churnRate ?? (churnShare * ceiling.cyclesPerSecond).rounded()
        let burstRate = self.burstRate ?? (10 * ceiling.cyclesPerSecond).rounded()
        print("bind ceiling (bare broker, pipelined bind->unbind, window 256): \(Int(ceiling.cyclesPerSecond)) cycles/s")
        print("steady churn \(Int(steadyRate)) cycles/s, burst \(Int(burstRate)) cycles/s offered for \(burst) s (at most \(burstInFlight) waiting); traffic \(Int(trafficRate)) messages/s on \(trafficChannels) channels held on links 1 and 2")

        var steadyRows: [SteadyRow] = []
        var burstRows: [BurstRow] = []
        for (name, mode) in modes {
            print("\n== \(name)")
            let cluster = LinkCluster(url: url, nodes: 3, binding: mode)
            try await cluster.start()
            let traffic = (0..<trafficChannels).map { "t-\($0)" }
            for f in cluster.hold(traffic, on: 0) + cluster.hold(traffic, on: 1) { try await f.get() }
            // The pump's own bound: every phase of this setting, with room to spare.
            let limit = Double(idleCounts.count) * (steady + settleLimit + 60) + burst + max(afterBurst, afterBurstFixed) + 120
            let pump = TrafficPump(cluster: cluster, channels: trafficChannels, rate: trafficRate, limit: limit)
            var held = 0
            for c in idleCounts {
                let t0 = now()
                var futures: [EventLoopFuture<Void>] = []
                for i in 0..<cluster.links.count { futures += cluster.hold((held..<c).lazy.map { "idle-\(i)-\($0)" }, on: i) }
                for f in futures { try await f.get() }
                held = c
                let bound = Double(now() - t0) / 1e9
                let settled = try await cluster.settle(limit: settleLimit)
                let settle = "held in \(String(format2: bound, 1)) s, settled " + (settled.map { "\(String(format2: $0, 1)) s later" } ?? "NOT within \(settleLimit) s")
                print("C = \(c) idle channels per link: \(settle); bindings \(cluster.snapshot().bindingsDescription)")
                let before = cluster.snapshot()
                let churn = try await ChurnLoad.run(on: cluster, rate: steadyRate, seconds: steady, maxInFlight: steadyInFlight)
                let window = cluster.snapshot().since(before)
                print("  steady: \(Self.describe(window, churn))")
                steadyRows.append(SteadyRow(setting: name, idle: c, window: window, churn: churn, settle: settle))
            }
            let before = cluster.snapshot()
            let churn = try await ChurnLoad.run(on: cluster, rate: burstRate, seconds: burst, maxInFlight: burstInFlight, drainLimit: 60)
            let burstEnd = now() - UInt64(churn.drainSeconds * 1e9)
            let window = cluster.snapshot().since(before)
            print("  burst: \(Self.describe(window, churn)), \(churn.skipped) of \(churn.offered) skipped (too many waiting), last join \(String(format2: churn.drainSeconds, 2)) s after the burst")
            var row = BurstRow(setting: name, idle: held, window: window, churn: churn, after: [])
            let watch = mode == .adaptive ? afterBurst : afterBurstFixed
            repeat {
                let before = cluster.snapshot()
                let churn = try await ChurnLoad.run(on: cluster, rate: steadyRate, seconds: sample, maxInFlight: steadyInFlight)
                let window = cluster.snapshot().since(before)
                let t = Double(now() - burstEnd) / 1e9
                print("  +\(String(format2: t, 0)) s: \(Self.describe(window, churn))")
                row.after.append((t, window))
            } while Double(now() - burstEnd) / 1e9 + sample <= watch + 0.5
            burstRows.append(row)
            await pump.stop()
            await cluster.shutdown()
        }
        Self.report(steadyRows, burstRows, ceiling: ceiling.cyclesPerSecond, steadyRate: steadyRate, burstRate: burstRate)
    }

    static func describe(_ w: ClusterSnapshot, _ churn: ChurnLoad.Result) -> String {
        "\(w.published) messages, \(fmt(w.deliveriesPerMessage, 2)) deliveries/message (\(fmt(w.neededPerMessage, 2)) wanted, \(fmt(w.unwantedPerMessage, 2)) unwanted), unmatched share \(percent(w.unmatchedShare)); churn \(Int(churn.cyclesPerSecond)) cycles/s, connect p50 \(ms(churn.histogram.quantile(0.5))) p99 \(ms(churn.histogram.quantile(0.99))) ms\(churn.failed > 0 ? ", \(churn.failed) failed" : ""); bindings \(w.bindingsDescription)"
    }

    static func report(_ steady: [SteadyRow], _ bursts: [BurstRow], ceiling: Double, steadyRate: Double, burstRate: Double) {
        print("\n== steady churn at \(Int(steadyRate)) cycles/s (bind ceiling \(Int(ceiling)) cycles/s)")
        print("| setting | C per link | deliveries/message | unwanted/message | unmatched share | churn cycles/s | connect p50 (ms) | connect p99 (ms) | bindings at the end |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for r in steady {
            print("| \(r.setting) | \(r.idle) | \(fmt(r.window.deliveriesPerMessage, 2)) | \(fmt(r.window.unwantedPerMessage, 2)) | \(percent(r.window.unmatchedShare)) | \(Int(r.churn.cyclesPerSecond)) | \(ms(r.churn.histogram.quantile(0.5))) | \(ms(r.churn.histogram.quantile(0.99))) | \(r.window.bindingsDescription) |")
        }
        print("\n== burst: \(Int(burstRate)) cycles/s offered, then the steady churn; unmatched share per sample after the burst")
        print("| setting | C per link | burst cycles/s | connect p50 (ms) | p99 (ms) | unmatched in the burst | after the burst (s: share) | bindings at the end |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |")
        for r in bursts {
            let after = r.after.map { "\(String(format2: $0.0, 0)): \(percent($0.1.unmatchedShare))" }.joined(separator: ", ")
            print("| \(r.setting) | \(r.idle) | \(Int(r.churn.cyclesPerSecond)) | \(ms(r.churn.histogram.quantile(0.5))) | \(ms(r.churn.histogram.quantile(0.99))) | \(percent(r.window.unmatchedShare)) | \(after) | \((r.after.last?.1 ?? r.window).bindingsDescription) |")
        }
        // The issue's targets, for the adaptive setting.
        let fixedBursts = bursts.filter { $0.setting != "adaptive" }
        guard let adaptive = bursts.first(where: { $0.setting == "adaptive" }) else { return }
        print("\n== adaptive against the targets")
        if let fastest = fixedBursts.max(by: { $0.churn.cyclesPerSecond < $1.churn.cyclesPerSecond }) {
            let ratio = adaptive.churn.cyclesPerSecond / fastest.churn.cyclesPerSecond
            print("burst churn: \(Int(adaptive.churn.cyclesPerSecond)) cycles/s = \(String(format2: ratio, 2))x the fastest fixed setting (\(fastest.setting): \(Int(fastest.churn.cyclesPerSecond))) (target >= 0.8x)")
        }
        let rows = steady.filter { $0.setting == "adaptive" }
        let p99 = rows.map { $0.churn.histogram.quantile(0.99) }.max() ?? 0
        print("steady connect p99, worst C: \(ms(p99)) ms (target < 10 ms)")
        let worst = rows.compactMap(\.window.unmatchedShare).max()
        print("steady unmatched share, worst C: \(percent(worst)) (target < 5%)")
        let back = adaptive.after.first { ($0.1.unmatchedShare ?? 0) < 0.05 }
        print("after the burst: " + (back.map { "under 5% in the sample ending \(String(format2: $0.0, 0)) s after it" } ?? "not under 5% within \(String(format2: adaptive.after.last?.0 ?? 0, 0)) s") + " (target: within 120 s)")
    }
}

func fmt(_ value: Double?, _ digits: Int) -> String { value.map { String(format2: $0, digits) } ?? "-" }
func percent(_ share: Double?) -> String { share.map { String(format2: 100 * $0, 1) + "%" } ?? "-" }
