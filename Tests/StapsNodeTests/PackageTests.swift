import Foundation
import Testing
import WebSocketClient

#if canImport(Glibc)
import Glibc
#endif

/// The Debian package as an administrator gets it: `scripts/package` builds it, apt installs
/// it on this machine, then it is checked and purged. Needs root (it installs a package and
/// creates a system user): never skipped, a test run without root fails here.
@Suite(.serialized) struct PackageTests {
    static let units = ["staps.service", "staps.socket", "staps@.service", "staps@.socket"].map { "/lib/systemd/system/" + $0 }
    static let installedFiles = [
        "/usr/bin/staps",
        "/etc/staps/staps.conf",
        "/usr/share/doc/staps/examples/nginx-staps.conf",
        "/usr/share/doc/staps/examples/apache-staps.conf",
        "/usr/share/doc/staps/examples/haproxy-staps.cfg",
        "/usr/share/doc/staps/README.md.gz",
        "/usr/share/doc/staps/copyright",
        "/usr/share/doc/staps/changelog.gz",
        "/usr/share/man/man8/staps.8.gz",
        "/usr/share/man/man5/staps.conf.5.gz",
    ] + units

    /// The number in `→ Overall exposure level for staps.service: 2.6 OK`.
    static func exposure(_ output: String) -> Double? {
        guard let line = output.split(separator: "\n").last(where: { $0.contains("Overall exposure level") }),
              let colon = line.lastIndex(of: ":") else { return nil }
        return line[line.index(after: colon)...].split(separator: " ").first.flatMap { Double($0) }
    }

    @Test func packageInstallsVerifiesAndPurgesCleanly() async throws {
        try requireRoot("PackageTests (they install and purge the staps package and its system user)")
        let root = Broker.repositoryRoot
        let version = try String(contentsOfFile: root + "/VERSION", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)

        let (built, buildOutput) = try run(root + "/scripts/package", [])
        try #require(built == 0, "scripts/package failed:\n\(buildOutput.suffix(6000))")
        let deb = String(buildOutput.split(separator: "\n").last ?? "")
        try #require(deb.hasSuffix("/staps_\(version)_\(try dpkgArchitecture()).deb") && FileManager.default.fileExists(atPath: deb), "scripts/package printed no .deb path: \(buildOutput.suffix(2000))")

        let (lintStatus, lint) = try run("/usr/bin/lintian", ["--fail-on", "error", deb])
        #expect(lintStatus == 0, "lintian reports errors:\n\(lint)")

        // Whatever fails below, the machine is left without the package.
        defer { _ = try? run("/usr/bin/dpkg", ["--purge", "staps"]) }
        let (installed, installOutput) = try run("/usr/bin/env", ["DEBIAN_FRONTEND=noninteractive", "/usr/bin/apt-get", "install", "-y", "--no-install-recommends", deb])
        try #require(installed == 0, "apt-get install failed:\n\(installOutput.suffix(4000))")

        for path in Self.installedFiles {
            #expect(FileManager.default.fileExists(atPath: path), "\(path) is not installed")
        }
        let (_, conffiles) = try run("/usr/bin/dpkg-query", ["-W", "-f=${Conffiles}", "staps"])
        #expect(conffiles.contains("/etc/staps/staps.conf"), "staps.conf is not a conffile: \(conffiles)")

        // The system user: no home, no login shell.
        let (hasUser, passwd) = try run("/usr/bin/getent", ["passwd", "staps"])
        try #require(hasUser == 0, "postinst created no user staps")
        let fields = passwd.trimmingCharacters(in: .whitespacesAndNewlines).split(separator: ":", omittingEmptySubsequences: false).map(String.init)
        try #require(fields.count == 7, "getent passwd staps: \(passwd)")
        #expect(fields[5] == "/nonexistent" && !FileManager.default.fileExists(atPath: fields[5]), "home of staps: \(fields[5])")
        #expect(fields[6] == "/usr/sbin/nologin", "shell of staps: \(fields[6])")
        #expect(try run("/usr/bin/getent", ["group", "staps"]).0 == 0, "postinst created no group staps")

        let (versionStatus, versionOutput) = try run("/usr/bin/staps", ["--version"])
        #expect(versionStatus == 0 && versionOutput.hasPrefix("staps "), "staps --version: \(versionOutput)")
        #expect(versionOutput.trimmingCharacters(in: .whitespacesAndNewlines) == "staps \(version)", "staps --version does not print VERSION (\(version)): \(versionOutput)")
        let (checkStatus, checkOutput) = try run("/usr/bin/staps", ["--check", "--config", "/etc/staps/staps.conf"])
        #expect(checkStatus == 0, "staps --check rejects the packaged configuration: \(checkOutput)")

        // The installed units, as systemd reads them (templates through an instance).
        let (verified, verifyOutput) = try run("/usr/bin/systemd-analyze", ["verify", Self.units[0], Self.units[1], "staps@1.service", "staps@1.socket"])
        #expect(verified == 0 && verifyOutput.isEmpty, "systemd-analyze verify:\n\(verifyOutput)")
        for unit in ["staps.service", "staps@1.service"] {
            let (_, security) = try run("/usr/bin/systemd-analyze", ["security", "--offline=true", unit])
            let score = try #require(Self.exposure(security), "no exposure level in:\n\(security)")
            #expect(score <= 3.0, "\(unit): exposure \(score) > 3.0")
        }

        // The installed binary, started as root the way staps.service starts it, becomes staps.
        let dir = TempDir()
        defer { dir.cleanup() }
        chmod(dir.path, 0o755)
        let socket = dir.path + "/staps.sock"
        let log = dir.path + "/stderr"
        let pid = try DaemonTests.spawn(["--config", "/etc/staps/staps.conf", "--socket", socket, "--port", "127.0.0.1:0"], binary: "/usr/bin/staps", stderrPath: log)
        try await DaemonTests.waitForHTTP(.unix(path: socket), pid: pid, log: log)
        let uid = try run("/usr/bin/id", ["-u", "staps"]).1.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(DaemonTests.statusField(pid, "Uid") == [uid, uid, uid, uid].joined(separator: "\t"), "the installed staps runs as staps")
        var st = stat()
        #expect(stat(socket, &st) == 0 && st.st_mode & 0o777 == 0o660, "socket mode")
        let a = try await TestClient.connect(.unix(path: socket), "/installed")
        let b = try await TestClient.connect(.unix(path: socket), "/installed")
        a.send("from the package")
        #expect(try await b.nextText() == "from the package")
        kill(pid, SIGTERM)
        #expect(try await DaemonTests.waitExit(pid) == 0)

        let (purged, purgeOutput) = try run("/usr/bin/dpkg", ["--purge", "staps"])
        try #require(purged == 0, "dpkg --purge failed:\n\(purgeOutput)")
        for path in ["/usr/bin/staps", "/etc/staps", "/var/lib/staps"] + Self.units {
            #expect(!FileManager.default.fileExists(atPath: path), "\(path) is still there after purge")
        }
        #expect(try run("/usr/bin/getent", ["passwd", "staps"]).0 != 0, "user staps is still there after purge")
        #expect(try run("/usr/bin/getent", ["group", "staps"]).0 != 0, "group staps is still there after purge")
    }

    private func dpkgArchitecture() throws -> String {
        let (status, output) = try run("/usr/bin/dpkg", ["--print-architecture"])
        guard status == 0 else { throw TestError.unexpected("dpkg --print-architecture: \(output)") }
        return output.trimmingCharacters(in: .whitespacesAndNewlines)
    }
}
