import Foundation
import StapsCluster
import StapsNode
import Testing

/// The page in a real browser: headless Chromium (Debian's chromium and chromium-driver) driven
/// by Selenium (`scripts/browser`, `scripts/browser-driver.py`) against a node in this process,
/// with a websocket client of ours on the same channel.
///
/// Two tabs on one channel page exchange a message each way and the client receives both; the
/// page's other parts (new channels, a close with its code and reason, `/`) and its
/// Content-Security-Policy (nothing the page does is blocked; what it must block, is) are
/// checked on what the browser showed. A screenshot of the page goes to
/// `.build/test-artifacts/page.png`. Without Chromium, chromedriver or the Selenium virtualenv
/// the test fails with the script's message saying how to get them (scripts/test makes the
/// virtualenv first).
@Suite(.serialized) struct BrowserTests {
    static let repository = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

    /// What `scripts/browser-driver.py` prints: what the browser showed.
    struct Report: Decodable {
        struct Tab: Decodable {
            let open: String?
            let received: [String]?
            let sent: [String]?
            let closed: String?
            let reopened: String?
        }
        struct Fresh: Decodable {
            let server: String
            let randomUUID: String
            let fallback: String
            let link: String
        }
        struct Root: Decodable {
            let fresh: String
            let opened: String
            let state: String
        }
        struct Violation: Decodable, CustomStringConvertible {
            let directive: String
            let blocked: String?
            var description: String { "\(directive) (\(blocked ?? "?"))" }
        }
        struct ConsoleEntry: Decodable {
            let level: String?
            let message: String?
        }
        struct Control: Decodable {
            let violations: [Violation]
            let injectedScriptRan: Bool
        }
        let checks: [String]
        let browser: String?
        let a: Tab?
        let b: Tab?
        let fresh: Fresh?
        let root: Root?
        let violations: [Violation]?
        let console: [ConsoleEntry]?
        let control: Control?
        let screenshot: String?
        let failure: String?
        let error: String?
    }

    static func isUUID4(_ s: String) -> Bool {
        s.wholeMatch(of: /[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}/) != nil
    }

    @Test func twoPagesAndAClientExchangeMessagesOnOneChannel() async throws {
        var limits = Limits()
        limits.maxMessageSize = 1 << 16  // the page's oversized message stays small
        let node = try await TestNode.start(limits: limits)
        guard case .tcp(let host, let port) = node.tcp else { fatalError("TestNode.tcp is TCP") }
        let tag = String(UUID4.make().prefix(8))
        let path = "/browser-\(tag)"
        // Markup and non-ASCII: the page must show them as text, byte for byte.
        let messageA = "<b>A</b> & é→ \(tag)"
        let messageB = "B says «hi» <i>\(tag)</i>"
        let listener = try await TestClient.connect(node.tcp, path)

        let artifacts = Self.repository + "/.build/test-artifacts"
        let screenshot = artifacts + "/page.png"
        try? FileManager.default.removeItem(atPath: screenshot)
        let stdout = artifacts + "/browser-driver.json"
        let stderr = artifacts + "/browser-driver.log"
        let chromedriverLog = artifacts + "/chromedriver.log"
        let started = Date()
        let status: Int32
        do {
            status = try await runRepositoryScript("scripts/browser", [
                "--url", "http://\(host):\(port)\(path)",
                "--message-a", messageA, "--message-b", messageB,
                "--oversize", "\(limits.maxMessageSize + 1)",
                "--screenshot", screenshot, "--chromedriver-log", chromedriverLog, "--timeout", "20",
            ], stdout: stdout, stderr: stderr, seconds: 180)
        } catch {
            await listener.close()
            await node.stop()
            throw error
        }
        let seconds = Date().timeIntervalSince(started)
        let log = (try? String(contentsOfFile: stderr, encoding: .utf8)) ?? ""
        let output = (try? Data(contentsOf: URL(fileURLWithPath: stdout))) ?? Data()
        let report = try? JSONDecoder().decode(Report.self, from: output)
        if let report, report.error == nil {
            print("Browser (Chromium \(report.browser ?? "?"), \(String(format: "%.1f", seconds)) s): \(report.checks.joined(separator: "; "))")
            if let path = report.screenshot { print("screenshot: \(path)") }
        }

        // The listener took both messages from the browsers, in order, and nothing else.
        var heard: [String] = []
        for _ in 0..<2 {
            guard let text = try? await listener.nextText(timeout: 5) else { break }
            heard.append(text)
        }
        let quiet = try await listener.isQuiet(for: 0.2)
        await listener.close()
        await node.stop()

        guard status == 0, let report else {
            Issue.record("scripts/browser exited \(status)\(report?.failure.map { ": \($0)" } ?? ""); its stderr (\(stderr)):\n\(tail(log, lines: 30))\nits report (\(stdout)):\n\(tail(String(decoding: output, as: UTF8.self), lines: 30))\nchromedriver's log: \(chromedriverLog)")
            return
        }
        #expect(heard == [messageA, messageB], "the websocket client on \(path) received \(heard)")
        #expect(quiet, "the websocket client received more than the two messages")

        // Both pages opened, and each showed what the other sent, as text.
        #expect(report.a?.open == "open" && report.b?.open == "open")
        #expect(report.a?.sent == [messageA] && report.b?.received == [messageA], "A sent \(report.a?.sent ?? []), B showed \(report.b?.received ?? [])")
        #expect(report.b?.sent == [messageB] && report.a?.received == [messageB], "B sent \(report.b?.sent ?? []), A showed \(report.a?.received ?? [])")
        // The node's close, with its code and reason, then open again.
        #expect(report.a?.closed == "closed (code 1009, message larger than \(limits.maxMessageSize) bytes)", "A showed \(report.a?.closed ?? "nothing")")
        #expect(report.a?.reopened == "open")

        // Fresh channels: the server's, then two made in the page; all different version 4 UUIDs.
        if let fresh = report.fresh {
            let urls = [fresh.server, fresh.randomUUID, fresh.fallback]
            let ids = urls.map { String($0.split(separator: "/").last ?? "") }
            for (url, id) in zip(urls, ids) {
                #expect(url == "ws://\(host):\(port)/\(id)" && Self.isUUID4(id), "\(url) is not a fresh channel URL")
            }
            #expect(Set(ids).count == 3, "\(urls)")
            #expect(fresh.link == "http://\(host):\(port)/\(ids[2])")
        } else {
            Issue.record("no fresh channels in the report")
        }
        if let root = report.root {
            let id = String(root.fresh.split(separator: "/").last ?? "")
            #expect(Self.isUUID4(id) && root.opened == "http://\(host):\(port)/\(id)" && root.state == "open", "/ offered \(root.fresh), opened \(root.opened) (\(root.state))")
        } else {
            Issue.record("no / page in the report")
        }

        // Nothing the page does is blocked; what it must block is.
        #expect(report.violations?.isEmpty == true, "CSP violations: \(report.violations ?? [])")
        let consoleErrors = (report.console ?? []).filter { $0.level == "SEVERE" || ($0.message ?? "").contains("Content Security Policy") }
        #expect(consoleErrors.isEmpty, "console: \(consoleErrors.map { $0.message ?? "" })")
        #expect(report.control?.violations.map(\.directive).sorted() == ["img-src", "script-src-elem"], "control: \(report.control?.violations ?? [])")
        #expect(report.control?.injectedScriptRan == false)

        let png = (try? Data(contentsOf: URL(fileURLWithPath: screenshot))) ?? Data()
        #expect(png.starts(with: [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]) && png.count > 10_000, "\(screenshot): \(png.count) bytes, not a screenshot")
        #expect(report.screenshot == screenshot)
    }
}
