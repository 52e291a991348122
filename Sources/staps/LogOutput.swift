import Logging
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// Where log lines go: stderr, or a `log_file` that SIGHUP reopens (for logrotate). Under
/// journald (stderr is `$JOURNAL_STREAM`) lines carry no timestamp of their own and start with
/// their syslog priority (`<4>` …), so `journalctl -p warning` works.
final class LogOutput: Sendable {
    let path: String?
    let journal: Bool
    private let fd: NIOLockedValueBox<Int32>

    init(path: String?, journal: Bool) throws {
        self.path = path
        self.journal = journal && path == nil
        self.fd = NIOLockedValueBox(path == nil ? 2 : try Self.open(path!))
    }

    private static func open(_ path: String) throws -> Int32 {
        let fd = Glibc.open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o640)
        guard fd >= 0 else { throw LogFileError(message: "log_file: cannot open \(path): \(String(cString: strerror(errno)))") }
        return fd
    }

    struct LogFileError: Error, CustomStringConvertible { var message: String; var description: String { message } }

    /// Reopens the log file (after logrotate moved it); false when it could not be opened
    /// (logging goes on to the old file).
    func reopen() -> Bool {
        guard let path = self.path, let new = try? Self.open(path) else { return self.path == nil }
        let old = self.fd.withLockedValue { fd -> Int32 in
            let old = fd
            fd = new
            return old
        }
        close(old)
        return true
    }

    func write(_ line: String) {
        let bytes = Array(line.utf8)
        self.fd.withLockedValue { fd in
            _ = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        }
    }

    static func priority(_ level: Logger.Level) -> Int {
        switch level {
        case .trace, .debug: return 7
        case .info: return 6
        case .notice: return 5
        case .warning: return 4
        case .error: return 3
        case .critical: return 2
        }
    }
}

struct OutputLogHandler: LogHandler {
    let label: String
    let output: LogOutput
    var logLevel: Logger.Level
    var metadata: Logger.Metadata = [:]

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { self.metadata[key] }
        set { self.metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        let all = self.metadata.merging(event.metadata ?? [:]) { $1 }
        let fields = all.isEmpty ? "" : " " + all.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        if self.output.journal {
            self.output.write("<\(LogOutput.priority(event.level))>\(event.level): \(event.message)\(fields) [\(event.source)]\n")
        } else {
            self.output.write("\(Self.timestamp()) \(event.level) \(self.label):\(fields) [\(event.source)] \(event.message)\n")
        }
    }

    static func timestamp() -> String {
        var now = time(nil)
        var parts = tm()
        gmtime_r(&now, &parts)
        var buffer = [CChar](repeating: 0, count: 32)
        strftime(&buffer, buffer.count, "%Y-%m-%dT%H:%M:%S+0000", &parts)
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
