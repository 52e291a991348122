import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Autobahn|Testsuite's fuzzing client against the real `staps` executable, through a relay
/// (`scripts/autobahn`, `scripts/autobahn-driver.py`): every case gets a fresh channel that a
/// relay client joins first and echoes on, so Autobahn sees its echo through staps.
///
/// Every case must come out OK or INFORMATIONAL with a clean close, and the permessage-deflate
/// chapters (12, 13) UNIMPLEMENTED with no extension in the 101, except the cases listed below,
/// each with the reason it cannot pass through a relay. Autobahn has no chapter 8 or 11.
/// The Python 2.7 virtualenv is made by `scripts/autobahn setup` (scripts/test runs it first);
/// when it cannot be made the test fails with the script's message saying how to get Python 2.7.
@Suite(.serialized) struct AutobahnTests {
    /// Cases whose message is empty. staps relays no empty message (clients use them as
    /// keepalives), so the echo Autobahn waits for never comes: any outcome is accepted.
    static let emptyMessageCases: [String: String] = [
        "1.1.1": "an empty text message",
        "1.2.1": "an empty binary message",
        "6.1.1": "an empty text message",
        "6.1.2": "a text message of three empty fragments",
        "9.7.1": "1000 empty text messages, each sent after the echo of the one before (times out after 60 s)",
        "9.8.1": "1000 empty binary messages, each sent after the echo of the one before (times out after 60 s)",
    ]

    /// Empty-message cases left out of the run (`scripts/autobahn --exclude`): their outcome is
    /// accepted anyway, and each would only wait out Autobahn's 60 s timeout for an echo that
    /// never comes. The other empty-message cases end at once and still run.
    static let excludedCases: Set<String> = ["9.7.1", "9.8.1"]

    /// Cases that send a valid message and, right behind it, a protocol violation, without
    /// waiting for the echo. An echo server answers the message before it reads the violation;
    /// through a relay the echo needs a round trip through the relay client, and a node that
    /// fails the connection at once (as it must) has closed the sender before the echo comes
    /// back. Autobahn grades a missing echo NON-STRICT here (these are exactly the cases whose
    /// NON-STRICT outcome is "no echo"), so OK or NON-STRICT is accepted, with a clean close
    /// with 1002. The octet-wise chopped ones are a race: the echo sometimes wins.
    static let relayOrderCases: [String: String] = [
        "3.2": "text message, then a frame with RSV = 2, then a ping",
        "3.3": "the same with RSV = 3, frame by frame",
        "3.4": "the same with RSV = 4, octet by octet",
        "4.1.3": "text message, then a frame with reserved opcode 5, then a ping",
        "4.1.4": "text message, then reserved opcode 6 with a payload, then a ping",
        "4.1.5": "text message, then reserved opcode 7 with a payload, then a ping, octet by octet",
        "4.2.3": "text message, then reserved control opcode 13, then a ping",
        "4.2.4": "text message, then reserved control opcode 14 with a payload, then a ping",
        "4.2.5": "text message, then reserved control opcode 15 with a payload, then a ping, octet by octet",
        "5.15": "a two-fragment message, then a continuation with nothing to continue",
    ]

    /// Cases per chapter in autobahntestsuite 25.10.1 (scripts/autobahn-requirements-py27.txt).
    static let casesPerChapter = ["1": 16, "2": 11, "3": 7, "4": 10, "5": 20, "6": 145, "7": 37, "9": 54, "10": 1, "12": 90, "13": 126]

    static let repository = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

    /// Chapters 1–7 and 10 (framing, pings, reserved bits, opcodes, fragmentation, UTF-8,
    /// close handling, auto-fragmentation) and 12–13 (permessage-deflate, declined: about 3 s)
    /// on a node with the default configuration. About 20 s.
    @Test func protocolChaptersOnTheDefaultConfiguration() async throws {
        try await Self.run(name: "protocol", port: 26901, configuration: nil,
                           chapters: ["1", "2", "3", "4", "5", "6", "7", "10", "12", "13"], timeout: 600)
    }

    /// Chapter 9 (messages up to 16 MiB, 1000-message round trips) on a node whose
    /// max_message_size is raised above 16 MiB, and whose send_buffer is raised above it too,
    /// so that one 16 MiB message waiting for a receiver is within its bound rather than a
    /// slow consumer. About 30 s without the `excludedCases`.
    @Test func limitsChapterWithMaxMessageSizeRaised() async throws {
        try await Self.run(name: "limits", port: 26909,
                           configuration: "max_message_size = 20MiB\nsend_buffer = 32MiB\n",
                           chapters: ["9"], timeout: 600)
    }

    // MARK: - Running

    static func run(name: String, port: Int, configuration: String?, chapters: [String], timeout: Int) async throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let socket = dir.path + "/staps.sock"
        var args = ["--socket", socket, "--port", "127.0.0.1:\(port)"]
        if let configuration {
            let path = dir.path + "/staps.conf"
            try "[staps]\n\(configuration)".write(toFile: path, atomically: true, encoding: .utf8)
            args = ["--config", path] + args
        }
        let (node, nodeStderr) = try await ProcessTests.launch(args, waitFor: socket)

        let out = repository + "/.build/autobahn/reports/" + name
        let logPath = out + ".log"
        let started = Date()
        let status: Int32
        do {
            let excludes = excludedCases.sorted(by: caseOrder).flatMap { ["--exclude", $0] }
            status = try await runScript(["--out", out, "--timeout", "\(timeout)"] + excludes + ["ws://127.0.0.1:\(port)"] + chapters,
                                         log: logPath, seconds: Double(timeout + 60))
        } catch {
            node.terminate()
            throw error
        }
        let seconds = Int(Date().timeIntervalSince(started))
        node.terminate()
        _ = try? await ProcessTests.waitForExit(node)
        let nodeLog = String(decoding: nodeStderr.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)

        let log = (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? ""
        // What a reader of the test output wants: the per-chapter counts and the cases not OK.
        print("Autobahn \(name) (chapters \(chapters.joined(separator: ", ")), \(seconds) s):")
        print(log.split(separator: "\n", omittingEmptySubsequences: false)
            .filter { !$0.hasPrefix("Running test case") && !$0.hasPrefix("Cases = ") }
            .joined(separator: "\n"))
        guard status == 0 else {
            Issue.record("scripts/autobahn exited \(status) (log: \(logPath)):\n\(tail(log, lines: 40))\nnode's stderr:\n\(tail(nodeLog, lines: 20))")
            return
        }
        let results = try loadResults(out)
        for problem in problems(results, chapters: chapters, detail: { loadDetail(out, $0) }) {
            Issue.record("\(problem) (reports: \(out)/index.html)")
        }
        for id in results.keys.sorted(by: caseOrder) where emptyMessageCases[id] != nil && results[id]!.isClean {
            print("note: \(id) is in emptyMessageCases but passed; remove it from the list")
        }
    }

    /// Runs scripts/autobahn with its output in `log`; its exit status.
    static func runScript(_ args: [String], log: String, seconds: Double) async throws -> Int32 {
        try await runRepositoryScript("scripts/autobahn", args, stdout: log, stderr: log, seconds: seconds)
    }

    // MARK: - Judging

    /// One case's line in Autobahn's index.json.
    struct CaseResult {
        var behavior: String
        var behaviorClose: String
        var remoteCloseCode: Int?
        var reportFile: String

        var isClean: Bool { ["OK", "INFORMATIONAL"].contains(behavior) && ["OK", "INFORMATIONAL"].contains(behaviorClose) }
    }

    /// What a case's own report adds: the texts, and the opening handshake.
    struct CaseDetail {
        var description = ""
        var result = ""
        var resultClose = ""
        var httpRequest = ""
        var httpResponse = ""
    }

    static func jsonObject(_ path: String) throws -> [String: Any] {
        guard var text = FileManager.default.contents(atPath: path).map({ String(decoding: $0, as: UTF8.self) }) else {
            throw TestError.unexpected("\(path) is missing")
        }
        // Python's json writes lone UTF-16 surrogates (\udcXX) for the invalid UTF-8 in the
        // UTF-8 cases' wire logs, which Foundation refuses; none of them is in a field read here.
        text = text.replacingOccurrences(of: #"\\u[dD][89a-fA-F][0-9a-fA-F]{2}"#, with: #"\\ufffd"#, options: .regularExpression)
        guard let object = try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any] else {
            throw TestError.unexpected("\(path) is not a JSON object")
        }
        return object
    }

    /// Autobahn's index.json, agent "staps".
    static func loadResults(_ out: String) throws -> [String: CaseResult] {
        guard let index = try jsonObject(out + "/index.json")["staps"] as? [String: [String: Any]] else {
            throw TestError.unexpected("\(out)/index.json has no results for agent staps")
        }
        return index.mapValues { entry in
            CaseResult(behavior: entry["behavior"] as? String ?? "?",
                       behaviorClose: entry["behaviorClose"] as? String ?? "?",
                       remoteCloseCode: entry["remoteCloseCode"] as? Int,
                       reportFile: entry["reportfile"] as? String ?? "?")
        }
    }

    static func loadDetail(_ out: String, _ result: CaseResult) -> CaseDetail {
        guard let detail = try? jsonObject(out + "/" + result.reportFile) else {
            return CaseDetail(description: "(\(result.reportFile) unreadable)")
        }
        return CaseDetail(description: stripTags(detail["description"] as? String ?? ""),
                          result: detail["result"] as? String ?? "",
                          resultClose: detail["resultClose"] as? String ?? "",
                          httpRequest: detail["httpRequest"] as? String ?? "",
                          httpResponse: detail["httpResponse"] as? String ?? "")
    }

    /// Everything that is not as it should be, one line per case; `detail` reads a case's report.
    static func problems(_ results: [String: CaseResult], chapters: [String], detail: (CaseResult) -> CaseDetail) -> [String] {
        func summary(_ r: CaseResult) -> String {
            let d = detail(r)
            return "\(r.behavior) / close \(r.behaviorClose) (code \(r.remoteCloseCode.map(String.init) ?? "none")): \(d.description) — \(d.result) \(d.resultClose)"
        }
        var problems = [String]()
        for chapter in chapters {
            let ran = results.keys.filter { $0.hasPrefix(chapter + ".") }.count
            let excluded = excludedCases.filter { $0.hasPrefix(chapter + ".") }.count
            if ran + excluded != casesPerChapter[chapter, default: 0] {
                problems.append("chapter \(chapter): \(ran) cases ran and \(excluded) left out, autobahntestsuite has \(casesPerChapter[chapter, default: 0])")
            }
        }
        for id in results.keys.sorted(by: caseOrder) {
            let r = results[id]!
            let chapter = String(id.prefix { $0 != "." })
            if emptyMessageCases[id] != nil {
                continue
            } else if relayOrderCases[id] != nil {
                if !["OK", "NON-STRICT"].contains(r.behavior) || r.behaviorClose != "OK" || r.remoteCloseCode != 1002 {
                    problems.append("\(id) (relay-order case: OK or NON-STRICT with a clean 1002 expected): \(summary(r))")
                }
            } else if chapter == "12" || chapter == "13" {
                if r.behavior != "UNIMPLEMENTED" || r.behaviorClose != "OK" {
                    problems.append("\(id) (permessage-deflate must be declined: UNIMPLEMENTED expected): \(summary(r))")
                }
                let d = detail(r)
                if !d.httpRequest.lowercased().contains("permessage-deflate") {
                    problems.append("\(id): Autobahn's request offered no permessage-deflate: \(d.httpRequest)")
                }
                if d.httpResponse.lowercased().contains("sec-websocket-extensions") {
                    problems.append("\(id): the 101 negotiated an extension: \(d.httpResponse)")
                }
            } else if !r.isClean {
                problems.append("\(id): \(summary(r))")
            }
        }
        return problems
    }

    static func caseOrder(_ a: String, _ b: String) -> Bool {
        let x = a.split(separator: ".").map { Int($0) ?? 0 }, y = b.split(separator: ".").map { Int($0) ?? 0 }
        return x.lexicographicallyPrecedes(y)
    }

    static func stripTags(_ html: String) -> String {
        var out = "", inTag = false
        for ch in html {
            if ch == "<" { inTag = true } else if ch == ">" { inTag = false } else if !inTag { out.append(ch) }
        }
        return out.split(whereSeparator: \.isWhitespace).joined(separator: " ")
    }
}
