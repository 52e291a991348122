import NIOCore
import StapsCluster
import StapsNode
import Testing

@Suite struct ConfigurationTests {
    @Test func fullFileParses() throws {
        let text = """
            # comment
            ; another
            [staps]
            socket = /run/staps/a.sock
            socket = /run/staps/b.sock, /run/staps/c.sock
            mode = 0600
            port = 8081
            port = 0.0.0.0:9000 [::1]:9001
            amqp = amqp://u:p@broker:5673/v, amqps://u:p@broker2/v
            amqp_binding_buckets = 16
            amqp_tls_ca = /etc/staps/ca.pem
            amqp_exchange = pubsub
            amqp_queue_max_length = 500
            amqp_queue_ttl = 3s
            amqp_unbind_linger = 0
            amqp_buffer = 8MiB
            amqp_max_age = 1500ms
            amqp_publish_window = 0
            amqp_heartbeat = 30s
            max_message_size = 64KiB
            send_buffer = 2MiB
            slow_consumer_grace = 250ms
            max_connections = 12
            handshake_timeout = 3s
            ping_interval = 1m
            pong_timeout = 7
            shutdown_timeout = 0

            [daemon]
            user = staps
            group = www-data
            dir = /var/lib/staps
            pid_file = /run/staps/staps.pid
            umask = 027
            """
        let config = try ConfigurationOverrides.parse(text, file: "t.conf").resolved(sourceFile: "t.conf")
        #expect(config.addresses == [
            .unixDomainSocket(path: "/run/staps/a.sock"), .unixDomainSocket(path: "/run/staps/b.sock"), .unixDomainSocket(path: "/run/staps/c.sock"),
            .hostname("127.0.0.1", port: 8081), .hostname("0.0.0.0", port: 9000), .hostname("::1", port: 9001),
        ])
        #expect(config.socketMode == 0o600)
        #expect(config.amqpURL == "amqp://u:p@broker:5673/v, amqps://u:p@broker2/v")
        #expect(try AMQPURL.list(config.amqpURL).map(\.description) == ["amqp://u:***@broker:5673/v", "amqps://u:***@broker2:5671/v"])
        #expect(config.limits.maxMessageSize == 65536)
        #expect(config.limits.sendBuffer == 2 << 20)
        #expect(config.limits.slowConsumerGrace == .milliseconds(250))
        #expect(config.limits.maxConnections == 12)
        #expect(config.limits.handshakeTimeout == .seconds(3))
        #expect(config.limits.pingInterval == .seconds(60))
        #expect(config.limits.pongTimeout == .seconds(7))
        #expect(config.limits.shutdownTimeout == .seconds(0))
        #expect(config.cluster == ClusterSettings(exchange: "pubsub", queueMaxLength: 500, queueMessageTTL: .seconds(3), unbindLinger: .seconds(0),
                                                  publishBuffer: 8 << 20, maxAge: .milliseconds(1500), heartbeat: .seconds(30), publishWindow: .seconds(0),
                                                  binding: .fixed(buckets: 16), tlsCAFile: "/etc/staps/ca.pem"))
        #expect(config.daemon == DaemonSettings(user: "staps", group: "www-data", directory: "/var/lib/staps", pidFile: "/run/staps/staps.pid", umask: 0o027))
    }

    @Test func defaultsWithNothingGiven() throws {
        let config = try ConfigurationOverrides.parse("", file: "empty.conf").resolved(sourceFile: nil)
        #expect(config.addresses == [.hostname("127.0.0.1", port: 8080)])
        #expect(config.amqpURL == "")
        #expect(config.socketMode == 0o660)
        #expect(config.limits == Limits())
        #expect(config.limits.maxMessageSize == 1 << 20)
    }

    /// A message may wait for the broker as long as it may wait in a queue, unless told otherwise.
    @Test func maxAgeIsTheQueueTTLUnlessSet() throws {
        func maxAge(_ text: String) throws -> TimeAmount {
            try ConfigurationOverrides.parse(text, file: "t.conf").resolved(sourceFile: "t.conf").cluster.maxAge
        }
        #expect(try maxAge("") == .seconds(10))
        #expect(try maxAge("[staps]\namqp_queue_ttl = 3s\n") == .seconds(3))
        #expect(try maxAge("[staps]\namqp_max_age = 1s\namqp_queue_ttl = 3s\n") == .seconds(1))
        #expect(try maxAge("[staps]\namqp_max_age = 1m\n") == .seconds(60))
    }

    /// Found by the ini fuzz target: "\r\n" is one Swift Character, so a CRLF file read as one line.
    @Test func crlfLineEndsReadLikeLF() throws {
        let crlf = try ConfigurationOverrides.parse("[staps]\r\nport = 9000\r\n\r\n[daemon]\r\nuser = staps\r\n", file: "f")
        #expect(crlf == (try ConfigurationOverrides.parse("[staps]\nport = 9000\n\n[daemon]\nuser = staps\n", file: "f")))
        #expect(crlf.ports == [.hostname("127.0.0.1", port: 9000)])
        #expect(crlf.lines["daemon.user"] == 5)
        #expect(throws: ConfigurationError(file: "f", line: 2, key: "mode", message: "'9' is not an octal mode between 0 and 777")) {
            try ConfigurationOverrides.parse("[staps]\r\nmode = 9\r\n", file: "f")
        }
    }

    @Test func flagsOverrideTheFilePerKey() throws {
        let file = try ConfigurationOverrides.parse("[staps]\nsocket = /tmp/a.sock\nport = 9000\nmode = 0600\n", file: "f")
        let config = file.withFlags(sockets: nil, ports: [.hostname("127.0.0.1", port: 7000)], mode: nil, amqp: "amqp://h/").resolved(sourceFile: "f")
        #expect(config.amqpURL == "amqp://h/")
        #expect(config.addresses == [.unixDomainSocket(path: "/tmp/a.sock"), .hostname("127.0.0.1", port: 7000)])
        #expect(config.socketMode == 0o600)
    }

    @Test(arguments: [
        ("[stapz]\nsocket = /a\n", "t.conf:1: [stapz]: unknown section (expected [daemon] or [staps])"),
        ("[staps]\nsockets = /a\n", "t.conf:2: sockets: unknown key in [staps]"),
        ("[staps]\nmode = 0999\n", "t.conf:2: mode: '0999' is not an octal mode between 0 and 777"),
        ("[staps]\nport = 70000\n", "t.conf:2: port: '70000' has no valid port (0-65535)"),
        ("[staps]\nport = ::1:80\n", "t.conf:2: port: '::1:80' is not host:port (write IPv6 as [addr]:port)"),
        ("[staps]\nsocket = relative.sock\n", "t.conf:2: socket: 'relative.sock' is not a path (use an absolute path)"),
        ("[staps]\nmax_message_size = lots\n", "t.conf:2: max_message_size: 'lots' is not a size from 1 to 1073741824 bytes (e.g. 65536, 64KiB, 1MiB)"),
        ("[staps]\nping_interval = 0\n", "t.conf:2: ping_interval: '0' is not a duration (e.g. 500ms, 10s, 2m)"),
        ("[staps]\nmax_connections = -1\n", "t.conf:2: max_connections: '-1' is not a whole number from 1 to 10000000"),
        ("[staps]\nmode = 0600\n\nmode = 0660\n", "t.conf:4: mode: set twice (first on line 2)"),
        ("mode = 0600\n", "t.conf:1: mode: key outside any section (start with [staps])"),
        ("[staps\n", "t.conf:1: [staps: malformed section header, expected [name]"),
        ("[staps]\njust words\n", "t.conf:2: just words: expected key = value"),
        ("[staps]\namqp = http://x\n", "t.conf:2: amqp: 'http://x' is not an amqp:// or amqps:// URL"),
        ("[staps]\namqp = amqp://u:secret@h:99999/\n", "t.conf:2: amqp: bad port in 'amqp://u:***@h:99999/'"),
        ("[daemon]\nuser = bad user\n", "t.conf:2: user: 'bad user' is not a valid user or group name"),
        ("[daemon]\ndir = var/lib\n", "t.conf:2: dir: 'var/lib' is not an absolute path"),
        ("[daemon]\numask = 1000\n", "t.conf:2: umask: '1000' is not an octal mode between 0 and 777"),
        ("[daemon]\nshell = /bin/sh\n", "t.conf:2: shell: unknown key in [daemon]"),
        ("[staps]\namqp_exchange = amq.topic\n", "t.conf:2: amqp_exchange: 'amq.topic' is not a usable exchange name (1-127 bytes, not starting with amq.)"),
        ("[staps]\namqp_queue_ttl = 0\n", "t.conf:2: amqp_queue_ttl: '0' is not a duration (e.g. 500ms, 10s, 2m)"),
        ("[staps]\namqp_max_age = 0\n", "t.conf:2: amqp_max_age: '0' is not a duration (e.g. 500ms, 10s, 2m)"),
        ("[staps]\n\namqp_max_age = ten seconds\n", "t.conf:3: amqp_max_age: 'ten seconds' is not a duration (e.g. 500ms, 10s, 2m)"),
        ("[staps]\namqp = amqp://a/ amqp://u:secret@h:0/\n", "t.conf:2: amqp: bad port in 'amqp://u:***@h:0/'"),
        ("[staps]\namqp_binding_buckets = 100\n", "t.conf:2: amqp_binding_buckets: '100' is not one of adaptive, 0 (a binding per channel), 16, 256, 4096"),
        ("[staps]\namqp_binding_buckets = Adaptive\n", "t.conf:2: amqp_binding_buckets: 'Adaptive' is not one of adaptive, 0 (a binding per channel), 16, 256, 4096"),
        ("[staps]\namqp_tls_ca = ca.pem\n", "t.conf:2: amqp_tls_ca: 'ca.pem' is not an absolute path"),
        ("[staps]\nlog_file = staps.log\n", "t.conf:2: log_file: 'staps.log' is not an absolute path"),
        ("[staps]\norigin = https://a.example ftp://b.example\n", "t.conf:2: origin: 'ftp://b.example' is not an origin: scheme://host[:port], or scheme://*.domain for its subdomains (http or https)"),
        ("[staps]\norigin = https://a.example/path\n", "t.conf:2: origin: 'https://a.example/path' is not an origin: scheme://host[:port], or scheme://*.domain for its subdomains (http or https)"),
        ("[staps]\norigin = https://a.*.example\n", "t.conf:2: origin: 'https://a.*.example' is not an origin: scheme://host[:port], or scheme://*.domain for its subdomains (http or https)"),
        ("[staps]\norigin_required = maybe\n", "t.conf:2: origin_required: 'maybe' is not yes or no"),
        ("[staps]\npost_token = short\n", "t.conf:2: post_token: needs at least 16 printable characters, no spaces"),
        ("[staps]\nauth_url = https://hook.example/check\n", "t.conf:2: auth_url: 'https://hook.example/check': https is not supported; run the hook on loopback or a unix socket"),
        ("[staps]\nauth_url = hook.example/check\n", "t.conf:2: auth_url: 'hook.example/check' is not http://host[:port]/path or http://unix:/path/to.sock:/path"),
        ("[staps]\nauth_url = http://127.0.0.1:0/check\n", "t.conf:2: auth_url: 'http://127.0.0.1:0/check' is not http://host[:port]/path or http://unix:/path/to.sock:/path: bad port"),
        ("[staps]\nauth_url = http://u:p@127.0.0.1/check\n", "t.conf:2: auth_url: 'http://u:p@127.0.0.1/check': no user or password in auth_url (the hook is sent the client's Authorization)"),
        ("[staps]\nauth_url = http://unix:run/auth.sock:/check\n", "t.conf:2: auth_url: 'http://unix:run/auth.sock:/check' is not http://host[:port]/path or http://unix:/path/to.sock:/path: the socket path must be absolute"),
        ("[staps]\nauth_url = http://unix:/run/auth.sock:check\n", "t.conf:2: auth_url: 'http://unix:/run/auth.sock:check' is not http://host[:port]/path or http://unix:/path/to.sock:/path: the part after the socket path must start with /"),
        ("[staps]\nauth_url = http://127.0.0.1/check#x\n", "t.conf:2: auth_url: 'http://127.0.0.1/check#x' is not http://host[:port]/path or http://unix:/path/to.sock:/path (no spaces, controls or #)"),
        ("[staps]\nauth_timeout = 0\n", "t.conf:2: auth_timeout: '0' is not a duration (e.g. 500ms, 10s, 2m)"),
        ("[staps]\nauth_timeout = soon\n", "t.conf:2: auth_timeout: 'soon' is not a duration (e.g. 500ms, 10s, 2m)"),
        ("[staps]\nauth_concurrency = 0\n", "t.conf:2: auth_concurrency: '0' is not a whole number from 1 to 100000"),
    ])
    func errorsNameFileLineAndKey(text: String, expected: String) {
        #expect(throws: ConfigurationError.self) { try ConfigurationOverrides.parse(text, file: "t.conf") }
        do {
            _ = try ConfigurationOverrides.parse(text, file: "t.conf")
        } catch {
            #expect(error.description == expected)
        }
    }

    @Test func accessKeysParse() throws {
        let text = "[staps]\norigin = https://app.example.com, https://*.example.org:8443\norigin_required = yes\npost_token = 0123456789abcdef-token\n"
        let config = try ConfigurationOverrides.parse(text, file: "t.conf").resolved(sourceFile: "t.conf")
        #expect(config.access.origins.map(\.description) == ["https://app.example.com", "https://*.example.org:8443"])
        #expect(config.access.originRequired)
        #expect(config.access.postToken == "0123456789abcdef-token")
        #expect(NodeConfiguration().access == AccessSettings())
    }

    @Test func authKeysParse() throws {
        let text = "[staps]\nauth_url = http://unix:/run/staps/auth.sock:/check?v=1\nauth_timeout = 750ms\nauth_concurrency = 8\n"
        let config = try ConfigurationOverrides.parse(text, file: "t.conf").resolved(sourceFile: "t.conf")
        #expect(config.access.hook == HookSettings(url: HookURL(target: .unix(path: "/run/staps/auth.sock"), uri: "/check?v=1"), timeout: .milliseconds(750), concurrency: 8))
        let tcp = try ConfigurationOverrides.parse("[staps]\nauth_url = http://127.0.0.1:9000/check\n", file: "t.conf").resolved(sourceFile: nil)
        #expect(tcp.access.hook == HookSettings(url: HookURL(target: .tcp(host: "127.0.0.1", port: 9000), uri: "/check")))
        #expect(NodeConfiguration().access.hook == HookSettings(url: nil, timeout: .seconds(5), concurrency: 64))
    }

    @Test func passwordNeverAppearsInErrors() {
        do {
            _ = try ConfigurationOverrides.parse("[staps]\namqp = amqp://u:hunter2@h:0/\n", file: "t.conf")
            Issue.record("expected an error")
        } catch {
            #expect(!error.description.contains("hunter2"))
        }
    }

    @Test func unreadableExplicitFileIsAnError() {
        do {
            _ = try ConfigurationLoader.load(explicitPath: "/nonexistent/staps.conf", candidates: [])
            Issue.record("expected an error")
        } catch {
            #expect(error.description == "/nonexistent/staps.conf: cannot read: No such file or directory")
        }
    }

    @Test func missingDefaultFilesAreFine() throws {
        let (settings, file) = try ConfigurationLoader.load(explicitPath: nil, candidates: ["/nonexistent/a.conf", "/nonexistent/b.conf"])
        #expect(file == nil)
        #expect(settings == ConfigurationOverrides())
    }

    @Test func shippedStapsConfParses() throws {
        let path = #filePath.split(separator: "/").dropLast(3).joined(separator: "/")
        let (settings, file) = try ConfigurationLoader.load(explicitPath: "/" + path + "/staps.conf", candidates: [])
        #expect(file != nil)
        // The annotated default configuration must describe exactly the defaults.
        let config = settings.resolved(sourceFile: file)
        #expect(config == NodeConfiguration(sourceFile: file))
    }

    @Test func amqpURLParsesAndMasks() throws {
        let url = try AMQPURL("amqp://user:p%40ss@rabbit.local:5673/%2Fstaps")
        #expect(url.user == "user")
        #expect(url.password == "p@ss")
        #expect(url.host == "rabbit.local")
        #expect(url.port == 5673)
        #expect(url.vhost == "/staps")
        #expect(!url.description.contains("p@ss"))
        let defaults = try AMQPURL("amqp://")
        #expect(defaults == (try AMQPURL("amqp://guest:guest@localhost:5672/")))
        #expect(try AMQPURL("amqps://h").port == 5671)
        #expect(AMQPURL.masked("amqp://u:secret@h/v") == "amqp://u:***@h/v")
        #expect(AMQPURL.masked("amqp://h/v") == "amqp://h/v")
    }
}
