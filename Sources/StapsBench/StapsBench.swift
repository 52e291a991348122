import ArgumentParser
import Atomics
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import StapsCluster
import StapsRabbit
import WebSocketClient

#if canImport(Glibc)
import Glibc
#endif

@main
struct StapsBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "staps-bench",
        abstract: "Load generator for staps: fan-out throughput and latency, and memory per idle connection.",
        subcommands: [FanOut.self, Idle.self, Broker.self, Binds.self, Churn.self, Rebind.self, Precision.self, DiscardCost.self, Delay.self, Chaos.self]
    )
}

struct Endpoints: ParsableArguments {
    @Option(name: .long, help: "Unix socket of a node (repeatable; clients are spread round-robin over all endpoints).")
    var unix: [String] = []

    @Option(name: .long, help: "TCP host:port of a node (repeatable).")
    var tcp: [String] = []

    func list() throws -> [Endpoint] {
        var out = unix.map { Endpoint.unix(path: $0) }
        for t in tcp {
            guard let colon = t.lastIndex(of: ":"), let port = Int(t[t.index(after: colon)...]) else {
                throw ValidationError("--tcp wants host:port, got \(t)")
            }
            out.append(.tcp(host: String(t[..<colon]), port: port))
        }
        guard !out.isEmpty else { throw ValidationError("name at least one --unix or --tcp endpoint") }
        return out
    }
}

func now() -> UInt64 { NIODeadline.now().uptimeNanoseconds }

func ms(_ nanos: UInt64) -> String {
    let v = Double(nanos) / 1e6
    return v < 10 ? String(format2: v, 3) : String(format2: v, 1)
}

extension String {
    init(format2 value: Double, _ digits: Int) {
        var p = 1.0
        for _ in 0..<digits { p *= 10 }
        let r = (value * p).rounded() / p
        var s = "\(r)"
        if let dot = s.firstIndex(of: ".") {
            let decimals = s.distance(from: dot, to: s.endIndex) - 1
            if decimals < digits { s += String(repeating: "0", count: digits - decimals) }
        }
        self = s
    }
}
