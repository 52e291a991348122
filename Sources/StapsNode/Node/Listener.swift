import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

extension Node {
    /// A listening socket handed over by the service manager (socket activation).
    public struct InheritedListener: Sendable {
        public var fd: Int32
        public var name: String
        public init(fd: Int32, name: String) {
            self.fd = fd
            self.name = name
        }
    }
}

/// One listening socket: its server channel, the address it serves, and, for a socket file made
/// here, the file's inode, so that closing it removes that file and never another's.
struct Listener: Sendable {
    let serverChannel: Channel
    let address: BindAddress
    private let inode: UInt64?

    /// Connections a listener's kernel queue holds before they are accepted (capped by
    /// net.core.somaxconn; systemd's own default for socket units).
    static let backlog: Int32 = 4096

    /// Makes the bootstrap for a listener; `tcp` is false for a unix socket.
    typealias Bootstrap = (_ tcp: Bool) -> ServerBootstrap

    /// Binds `address`. A unix socket file is made owner-only, then given `socketGroup` and
    /// `mode`: never looser than `mode`, not for an instant (see
    /// `UnixSocketFile.bindPrivately(at:backlog:)`).
    ///
    /// - Parameter what: how to name the listener in errors ("metrics" for the metrics one).
    static func bind(_ address: BindAddress, mode: UInt32, socketGroup: gid_t?, what: String? = nil, bootstrap: Bootstrap) async throws -> Listener {
        let prefix = what.map { "\($0): " } ?? ""
        switch address {
        case .hostname(let host, let port):
            let serverChannel: Channel
            do {
                serverChannel = try await bootstrap(true).bind(host: host, port: port).get()
            } catch {
                throw NodeStartError(message: "\(prefix)cannot listen on \(address): \(error)")
            }
            let bound = serverChannel.localAddress?.port.map { BindAddress.hostname(host, port: $0) } ?? address
            return Listener(serverChannel: serverChannel, address: bound, inode: nil)
        case .unixDomainSocket(let path):
            return try await Self.bindSocketFile(path, mode: mode, socketGroup: socketGroup, prefix: prefix, bootstrap: bootstrap)
        }
    }

    private static func bindSocketFile(_ path: String, mode: UInt32, socketGroup: gid_t?, prefix: String, bootstrap: Bootstrap) async throws -> Listener {
        try UnixSocketFile.prepare(path)
        let fd: Int32
        do {
            fd = try UnixSocketFile.bindPrivately(at: path, backlog: Self.backlog)
        } catch {
            throw NodeStartError(message: "\(prefix)\(error)")
        }
        let serverChannel: Channel
        do {
            serverChannel = try await bootstrap(false).withBoundSocket(fd).get()
        } catch {
            // NIO closed the descriptor if it made a channel of it; closing it here again
            // could close another's. Only a failure before that leaks it, on a failed start.
            unlink(path)
            throw NodeStartError(message: "\(prefix)cannot listen on \(path): \(error)")
        }
        // NIO listens again with a backlog of 128 when it takes a socket over.
        _ = listen(fd, Self.backlog)
        func fail(_ message: String) async -> NodeStartError {
            let reason = String(cString: strerror(errno))
            try? await serverChannel.close()
            unlink(path)
            return NodeStartError(message: "\(prefix)\(message): \(reason)")
        }
        if let gid = socketGroup, chown(path, uid_t.max, gid) != 0 {
            throw await fail("cannot give \(path) to group \(gid)")
        }
        guard chmod(path, mode_t(mode)) == 0 else {
            throw await fail("cannot set mode \(String(mode, radix: 8)) on \(path)")
        }
        return Listener(serverChannel: serverChannel, address: .unixDomainSocket(path: path), inode: UnixSocketFile.inode(path))
    }

    /// Serves a socket the service manager handed over. Its file, if it has one, stays the
    /// service manager's: closing the listener never removes it.
    static func adopt(_ socket: Node.InheritedListener, bootstrap: Bootstrap) async throws -> Listener {
        let serverChannel: Channel
        do {
            serverChannel = try await bootstrap(UnixSocketFile.isTCP(socket.fd)).withBoundSocket(socket.fd).get()
        } catch {
            throw NodeStartError(message: "cannot serve the inherited socket \(socket.name) (fd \(socket.fd)): \(error)")
        }
        // NIO listens again with a backlog of 128 when it takes a socket over.
        _ = listen(socket.fd, Self.backlog)
        let address: BindAddress
        switch serverChannel.localAddress {
        case .some(.unixDomainSocket): address = .unixDomainSocket(path: serverChannel.localAddress?.pathname ?? socket.name)
        case .some(let a): address = .hostname(a.ipAddress ?? "?", port: a.port ?? 0)
        case .none: address = .unixDomainSocket(path: socket.name)
        }
        return Listener(serverChannel: serverChannel, address: address, inode: nil)
    }

    /// Closes the socket and removes its file if that is still the one made here.
    func close() async {
        try? await self.serverChannel.close()
        guard case .unixDomainSocket(let path) = self.address, let inode = self.inode, UnixSocketFile.inode(path) == inode else { return }
        unlink(path)
    }
}

/// The node's client listeners: bound (or taken over) at start, closed at shutdown.
final class Listeners: Sendable {
    private let bound = NIOLockedValueBox<[Listener]>([])

    func add(_ listener: Listener) {
        self.bound.withLockedValue { $0.append(listener) }
    }

    /// The addresses served (TCP port 0 resolved).
    var addresses: [BindAddress] { self.bound.withLockedValue { $0.map(\.address) } }

    /// Why the listeners do not serve now, or nil when every one is up.
    var down: String? {
        let listeners = self.bound.withLockedValue { $0 }
        if listeners.isEmpty { return "no listener is up" }
        if let down = listeners.first(where: { !$0.serverChannel.isActive }) { return "listener \(down.address) is down" }
        return nil
    }

    /// Starts accepting on listeners bound without.
    func startAccepting() async throws {
        for listener in self.bound.withLockedValue({ $0 }) {
            try await listener.serverChannel.setOption(.autoRead, value: true).get()
        }
    }

    /// Stops accepting, lets any accept already under way finish setting its connections up
    /// (`settle`), then closes every listener and removes the socket files made here.
    /// Closing a listener in the middle of an accept batch would drop that batch's connections
    /// unanswered. What waits in the kernel's backlog stays there (for the next process, when
    /// the socket is inherited).
    func close(settle: () async -> Void) async {
        let listeners = self.bound.withLockedValue { bound -> [Listener] in
            defer { bound.removeAll() }
            return bound
        }
        for listener in listeners {
            try? await listener.serverChannel.setOption(.autoRead, value: false).get()
        }
        await settle()
        for listener in listeners { await listener.close() }
    }
}
