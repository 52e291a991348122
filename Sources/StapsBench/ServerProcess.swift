#if canImport(Glibc)
import Glibc
#endif

/// The server under measurement, read from /proc: a process and its descendants (nginx's master
/// and its workers; staps is one process), so that the same figures mean the same for both.
struct ServerProcess {
    let pid: Int32

    init(_ pid: Int32) { self.pid = pid }

    /// The process and its descendants alive now.
    func tree() -> [Int32] {
        var out: [Int32] = []
        var next = [pid]
        while let p = next.popLast() {
            out.append(p)
            // A child is listed under the thread that forked it: read every thread's list.
            for task in Self.directory("/proc/\(p)/task") {
                guard let text = try? readSmallFile("/proc/\(p)/task/\(task)/children") else { continue }
                next += text.split(whereSeparator: { $0 == " " || $0 == "\n" }).compactMap { Int32($0) }
            }
        }
        return out
    }

    /// utime + stime of the tree, children that were waited for included (cutime + cstime), in
    /// seconds (clock-tick resolution: 10 ms at 100 Hz).
    func cpuSeconds() throws -> Double {
        var ticks = 0.0
        for p in tree() {
            guard let text = try read("/proc/\(p)/stat", of: p) else { continue }
            // Fields after the command (which may hold spaces) in parentheses: state is field 3.
            guard let close = text.lastIndex(of: ")") else { throw BenchError("/proc/\(p)/stat: no command field") }
            let fields = text[text.index(after: close)...].split(separator: " ")
            guard fields.count > 14, let utime = Double(fields[11]), let stime = Double(fields[12]),
                  let cutime = Double(fields[13]), let cstime = Double(fields[14]) else { throw BenchError("/proc/\(p)/stat: unexpected format") }
            ticks += utime + stime + cutime + cstime
        }
        return ticks / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    /// VmRSS of the tree, in bytes (pages shared between processes count once per process, as
    /// `ps` shows them).
    func rss() throws -> Int {
        var total = 0
        for p in tree() {
            guard let text = try read("/proc/\(p)/status", of: p) else { continue }
            guard let line = text.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }),
                  let kb = line.split(separator: " ").compactMap({ Int($0) }).first else {
                // A zombie (a crashed worker not yet reaped) has no VmRSS: it holds no memory.
                if p != pid { continue }
                throw BenchError("no VmRSS for pid \(p)")
            }
            total += kb * 1024
        }
        return total
    }

    /// A line for the end of a run: CPU seconds spent since `cpu0`, per `unit` over `count`, and
    /// RSS from `rss0` to now. bench/compare reads it.
    func report(since cpu0: Double, rss0: Int, count: Int, unit: String) throws -> String {
        let cpu = try cpuSeconds() - cpu0
        let per = count > 0 ? String(format2: cpu / Double(count) * 1e6, 2) : "-"
        return "server: cpu \(String(format2: cpu, 2)) s = \(per) µs per \(unit), rss \(rss0 / 1024) KiB -> \(try rss() / 1024) KiB"
    }

    /// A file of process `p`; nil when `p`, a descendant, ended since the tree was listed (a
    /// crashed nginx worker: its CPU time reaches its parent's cutime once reaped).
    private func read(_ path: String, of p: Int32) throws -> String? {
        do {
            return try readSmallFile(path)
        } catch where p != pid {
            return nil
        }
    }

    private static func directory(_ path: String) -> [String] {
        guard let dir = opendir(path) else { return [] }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }
}
