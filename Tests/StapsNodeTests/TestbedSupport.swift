import Foundation
import Testing
import WebSocketClient

#if canImport(Glibc)
import Glibc
#endif

/// The test bed of network hosts that `scripts/testbed up` makes (scripts/test does, as root):
/// a 3-node RabbitMQ cluster on b1-b3, staps nodes on n1-n3, nginx on front, load clients on
/// client, each its own network namespace on 10.231.0.0/24.
enum Testbed {
    static let script = Broker.repositoryRoot + "/scripts/testbed"

    /// Fails, saying how to get one, unless the test bed is up. Never a silent skip.
    static func require() throws {
        guard getuid() == 0 else {
            throw TestError.unexpected("the test bed needs root (network namespaces): run the tests as root, after `scripts/testbed up` (scripts/test does both under CI)")
        }
        let (status, output) = try StapsNodeTests.run(script, ["broker", "1", "ctl", "eval", "rabbit:is_running()."])
        guard status == 0, output.contains("true") else {
            throw TestError.unexpected("the test bed is not up (broker b1 answers: \(output.trimmingCharacters(in: .whitespacesAndNewlines))): run `scripts/testbed up` as root (scripts/test does)")
        }
    }

    /// `scripts/testbed ARGS`, its output; throws when it fails.
    @discardableResult
    static func run(_ args: String...) throws -> String {
        try self.run(args)
    }

    @discardableResult
    static func run(_ args: [String]) throws -> String {
        // The staps nodes run the release build when scripts/test made one, else the debug one.
        let staps = try ProcessInfo.processInfo.environment["STAPS_RELEASE_BIN"] ?? stapsBinary()
        let (status, output) = try StapsNodeTests.run("/usr/bin/env", ["STAPS_BIN=\(staps)", script] + args)
        guard status == 0 else { throw TestError.unexpected("scripts/testbed \(args.joined(separator: " ")) failed: \(output)") }
        return output.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// A host's address, as scripts/testbed assigns it.
    static func address(_ host: String) throws -> String { try self.run("addr", host) }

    /// A healed broker cluster, fresh staps nodes on n1-n3 (the release build when scripts/test
    /// made one) and nginx on front; returns each host's node id (`X-Staps-Node`).
    static func freshCluster() async throws -> [String: String] {
        try self.require()
        for n in 1...3 { try self.run("staps", "stop", "\(n)") }
        try self.run("front", "stop")
        try self.run("heal")
        var ids: [String: String] = [:]
        for n in 1...3 {
            try self.run("staps", "start", "\(n)")
            let (status, head, _) = try await httpRequest(.tcp(host: try address("n\(n)"), port: 8080), "GET", "/")
            guard status == 200, let id = head.split(separator: "\r\n").first(where: { $0.lowercased().hasPrefix("x-staps-node:") })?.split(separator: ":").last else {
                throw TestError.unexpected("n\(n) answers \(status) without X-Staps-Node")
            }
            ids["n\(n)"] = id.trimmingCharacters(in: .whitespaces)
        }
        try self.run("front", "start")
        return ids
    }

    /// Every staps node stopped and the broker cluster healed, for the next test.
    static func cleanUp() {
        for n in 1...3 { _ = try? self.run("staps", "stop", "\(n)") }
        _ = try? self.run("front", "stop")
        for h in ["n1", "n2", "n3", "b1", "b2", "b3"] { _ = try? self.run("link", h, "up") }
        for n in 1...3 { _ = try? self.run("thaw", "\(n)") }
        _ = try? self.run("heal")
    }

    /// A node's counters from its metrics listener (`name{labels}` → value; labels as written).
    static func metrics(_ host: String) async throws -> [String: Double] {
        let (status, _, body) = try await httpRequest(.tcp(host: try address(host), port: 9090), "GET", "/metrics")
        guard status == 200 else { throw TestError.unexpected("\(host) /metrics answered \(status)") }
        var values: [String: Double] = [:]
        for line in body.split(separator: "\n") where !line.hasPrefix("#") {
            guard let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...]) else { continue }
            values[String(line[..<space])] = value
        }
        return values
    }

    /// What `staps-bench chaos` measured, by key, and its report.
    struct ChaosResult {
        var figures: [String: Double]
        var report: String
        subscript(_ key: String) -> Double { figures[key] ?? -1 }
    }

    /// A fault: what to do, when (seconds after the load starts), and its label in the ledger.
    struct Fault {
        var at: Double
        var label: String
        var action: () async throws -> Void
    }

    /// Runs `staps-bench chaos` from the client host through nginx on front (or the `endpoint`
    /// given, from `host`) while `faults` happen; returns its ledger.
    static func chaos(seconds: Double, channels: Int = 12, lifetime: Double = 2, rate: Double = 5, apart: String? = nil,
                      from host: String = "client", endpoint: String? = nil, faults: [Fault] = []) async throws -> ChaosResult {
        let dir = TempDir()
        defer { dir.cleanup() }
        let bench = try builtProduct("staps-bench")
        let faultLog = dir.path + "/faults.txt"
        _ = FileManager.default.createFile(atPath: faultLog, contents: nil)
        let endpoint = try endpoint ?? "\(address("front")):80"
        var args = ["exec", host, bench, "chaos", "--tcp", endpoint, "--seconds", "\(seconds)", "--channels", "\(channels)",
                    "--lifetime", "\(lifetime)", "--rate", "\(rate)", "--settle", "15", "--faults", faultLog, "--key-values", dir.path + "/figures.txt"]
        if let apart { args += ["--apart", apart] }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: script)
        process.arguments = args
        let output = dir.path + "/report.txt"
        _ = FileManager.default.createFile(atPath: output, contents: nil)
        process.standardOutput = FileHandle(forWritingAtPath: output)
        process.standardError = process.standardOutput
        try process.run()
        let start = Date()
        for fault in faults.sorted(by: { $0.at < $1.at }) {
            let wait = fault.at - Date().timeIntervalSince(start)
            if wait > 0 { try await Task.sleep(for: .milliseconds(Int(wait * 1000))) }
            let line = "\(Int64(Date().timeIntervalSince1970 * 1000)) \(fault.label)\n"
            let handle = FileHandle(forWritingAtPath: faultLog)!
            handle.seekToEndOfFile()
            handle.write(line.data(using: .utf8)!)
            try handle.close()
            try await fault.action()
        }
        _ = try await ProcessTests.waitForExit(process, seconds: seconds + 60)
        let report = (try? String(contentsOfFile: output, encoding: .utf8)) ?? ""
        print(report)
        guard process.terminationStatus == 0, let text = try? String(contentsOfFile: dir.path + "/figures.txt", encoding: .utf8) else {
            throw TestError.unexpected("staps-bench chaos failed (\(process.terminationStatus)): \(report)")
        }
        var figures: [String: Double] = [:]
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: " ")
            if parts.count == 2, let v = Double(parts[1]) { figures[String(parts[0])] = v }
        }
        return ChaosResult(figures: figures, report: report)
    }
}
