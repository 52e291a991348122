import Foundation
import NIOCore
import NIOPosix
import StapsNode
import Testing
import WebSocketClient

/// The `staps` executable as users run it.
@Suite(.serialized) struct ProcessTests {
    /// Starts `staps` with `args` and waits until `socket` accepts connections.
    static func launch(_ args: [String], waitFor socket: String, binary: String? = nil) async throws -> (Process, Pipe) {
        try await launch(args, waitFor: .unix(path: socket), binary: binary)
    }

    /// Starts `staps` with `args` and waits until `endpoint` answers HTTP.
    static func launch(_ args: [String], waitFor endpoint: Endpoint, binary: String? = nil) async throws -> (Process, Pipe) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: try binary ?? stapsBinary())
        // Never a developer's ~/.staps.conf or /etc/staps/staps.conf: only what the test says.
        process.arguments = args.contains("--config") ? args : ["--config", "/dev/null"] + args
        let stderr = Pipe()
        process.standardError = stderr
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        if await answersHTTP(endpoint, within: 5, while: { process.isRunning }) { return (process, stderr) }
        process.terminate()
        let output = String(decoding: stderr.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        throw TestError.unexpected("staps did not come up on \(endpoint): \(output)")
    }

    static func waitForExit(_ process: Process, seconds: Double = 10) async throws -> Int32 {
        try await eventually("staps to exit", within: seconds) { !process.isRunning }
        return process.terminationStatus
    }

    @Test func sigtermClosesClientsWith1001AndRemovesTheSocket() async throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let socket = dir.path + "/staps.sock"
        let (process, _) = try await Self.launch(["--socket", socket, "--mode", "0600"], waitFor: socket)
        let attributes = try FileManager.default.attributesOfItem(atPath: socket)
        #expect((attributes[.posixPermissions] as? Int) == 0o600)
        let a = try await TestClient.connect(.unix(path: socket), "/bye")
        let b = try await TestClient.connect(.unix(path: socket), "/bye")
        a.send("before")
        #expect(try await b.nextText() == "before")
        process.terminate()  // SIGTERM
        let (codeA, _) = try await a.nextClose()
        let (codeB, _) = try await b.nextClose()
        #expect(codeA == 1001 && codeB == 1001)
        #expect(try await Self.waitForExit(process) == 0)
        #expect(!FileManager.default.fileExists(atPath: socket))
    }

    @Test func aLiveSocketIsNeverStolenAndAStaleOneIsReplaced() async throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let socket = dir.path + "/staps.sock"
        let (first, _) = try await Self.launch(["--socket", socket], waitFor: socket)
        // A second node on the same path refuses to start and leaves the first alone.
        let (status, output) = try run(try stapsBinary(), ["--config", "/dev/null", "--socket", socket])
        #expect(status != 0)
        #expect(output.contains("\(socket) is in use by another process"))
        let a = try await TestClient.connect(.unix(path: socket), "/still")
        let b = try await TestClient.connect(.unix(path: socket), "/still")
        a.send("first node still serving")
        #expect(try await b.nextText() == "first node still serving")
        // SIGKILL leaves a stale socket file behind; the next node replaces it.
        kill(first.processIdentifier, SIGKILL)
        _ = try await Self.waitForExit(first)
        #expect(FileManager.default.fileExists(atPath: socket))
        let (second, _) = try await Self.launch(["--socket", socket], waitFor: socket)
        let c = try await TestClient.connect(.unix(path: socket), "/again")
        #expect(c.client.connection.isActive)
        second.terminate()
        #expect(try await Self.waitForExit(second) == 0)
    }

    @Test func aRegularFileAtTheSocketPathIsNotReplaced() async throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let path = dir.path + "/not-a-socket"
        #expect(FileManager.default.createFile(atPath: path, contents: Data("keep me".utf8)))
        let (status, output) = try run(try stapsBinary(), ["--config", "/dev/null", "--socket", path])
        #expect(status != 0)
        #expect(output.contains("exists and is not a socket"))
        #expect(try String(contentsOfFile: path, encoding: .utf8) == "keep me")
    }

    @Test func configurationErrorsStopStartupNamingFileLineAndKey() async throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let conf = dir.path + "/bad.conf"
        try "[staps]\nport = 8080\nmax_message_size = huge\n".write(toFile: conf, atomically: true, encoding: .utf8)
        let (status, output) = try run(try stapsBinary(), ["--config", conf])
        #expect(status == 1)
        #expect(output.contains("\(conf):3: max_message_size: 'huge' is not a size"))
        let (status2, output2) = try run(try stapsBinary(), ["--config", "/dev/null", "--port", "nope:x"])
        #expect(status2 == 1)
        #expect(output2.contains("command line: --port: 'nope:x' has no valid port"))
        let (status3, output3) = try run(try stapsBinary(), ["--config", "/dev/null", "--log-level", "loud"])
        #expect(status3 == 1)
        #expect(output3.contains("--log-level"))
    }
}
