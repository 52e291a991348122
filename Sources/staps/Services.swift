import Atomics
import Logging
import NIOCore
import ServiceLifecycle
import StapsNode
import UnixSignals

#if canImport(Glibc)
import Glibc
#endif

/// What runs while staps runs, as services of one `ServiceGroup` (Staps.runServices): started
/// in this order, told to shut down gracefully in the reverse one.
///
///   LogReopening    SIGHUP reopens the log file, until the very end
///   NodeService     binds (as root), drops root, accepts; on shutdown drains and closes
///   SystemdNotifier READY once the node accepts, status and watchdog, STOPPING as shutdown begins

/// SIGHUP reopens `log_file` (for logrotate) and is logged; it never stops staps.
struct LogReopening: Service {
    let output: LogOutput
    let logger: Logger

    func run() async {
        for await signal in await UnixSignalsSequence(trapping: .sighup).cancelOnGracefulShutdown() {
            let reopened = self.output.reopen()
            let file = self.output.path.map { reopened ? "reopened \($0)" : "could not reopen \($0)" } ?? "none (stderr)"
            self.logger.notice("received signal", metadata: ["signal": "\(signal)", "log_file": "\(file)"])
        }
    }
}

/// The node, from binding to its last connection: binds its listeners (as root when started
/// so), writes the pid file, drops privileges, starts accepting and tells `started`; on graceful
/// shutdown, runs the node's own (`Node.shutdown()`) and removes the pid file.
struct NodeService: Service {
    let node: Node
    let plan: DaemonPlan
    let inherited: [Node.InheritedListener]
    let logger: Logger
    /// Yields once the node accepts connections; finished either way.
    let started: AsyncStream<Void>.Continuation

    func run() async throws {
        let dropping = self.plan.dropsPrivileges  // read before the drop: it asks geteuid()
        do {
            // Bound (or inherited) first, as root when started so; accepting only after the drop.
            try await self.node.start(accepting: false, inherited: self.inherited, socketGroup: self.plan.gid)
            try self.plan.writePidFile()
            try self.plan.dropPrivileges()
            try await self.node.startAccepting()
        } catch {
            self.started.finish()
            await self.node.shutdown()
            self.plan.removePidFile()
            throw error
        }
        if dropping, let user = self.plan.user {
            self.logger.notice("running as \(user.name)", metadata: ["uid": "\(getuid())", "gid": "\(getgid())"])
        }
        self.started.yield()
        self.started.finish()
        // Thrown only when the group is cancelled: the node is shut down all the same.
        try? await gracefulShutdown()
        await self.node.shutdown()
        self.plan.removePidFile()
    }
}

/// systemd's side, under a service manager (`$NOTIFY_SOCKET`): READY=1 once the node accepts,
/// then a status line every 5 s and the watchdog pinged only once every event loop has run a
/// task since the last ping (a wedged loop gets the node restarted); STOPPING=1 as soon as
/// shutdown begins, before the node drains (it is after the node in the group).
struct SystemdNotifier: Service {
    let node: Node
    /// The node's `started`.
    let started: AsyncStream<Void>

    func run() async {
        let started = self.started
        if await cancelWhenGracefulShutdown({ await started.first { _ in true } }) != nil {
            Systemd.notify("READY=1\nSTATUS=\(self.node.status)")
            let node = self.node
            await cancelWhenGracefulShutdown { await Self.ping(node) }
        }
        // Until shutdown begins (at once if it has). Cancelled instead when the node could not
        // start: staps then exits with its error.
        do { try await gracefulShutdown() } catch { return }
        Systemd.notify("STOPPING=1\nSTATUS=stopping")
    }

    /// Status and watchdog, until cancelled.
    private static func ping(_ node: Node) async {
        let interval = Systemd.watchdogInterval
        let allLoopsRan = ManagedAtomic<Bool>(false)
        if interval != nil { node.pingEventLoops { allLoopsRan.store(true, ordering: .relaxed) } }
        var nextStatus = NIODeadline.now() + .seconds(5)
        while !Task.isCancelled {
            let step = min(interval ?? .seconds(5), .seconds(5))
            try? await Task.sleep(nanoseconds: UInt64(step.nanoseconds))
            if Task.isCancelled { return }
            if interval != nil, allLoopsRan.exchange(false, ordering: .relaxed) {
                Systemd.notify("WATCHDOG=1")
                node.pingEventLoops { allLoopsRan.store(true, ordering: .relaxed) }
            }
            if NIODeadline.now() >= nextStatus {
                Systemd.notify("STATUS=\(node.status)")
                nextStatus = NIODeadline.now() + .seconds(5)
            }
        }
    }
}
