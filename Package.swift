// swift-tools-version:6.0
import PackageDescription

// The targets, from the bottom up (ARCHITECTURE.md draws how a message crosses them):
//   StapsCluster    what nodes say to each other and how a node talks to its link: the
//                   ClusterLink protocol, routing keys, the message body format, broker URLs
//   RabbitClient    rabbitmq-c wrapped: one AMQP connection, publish batches
//   StapsRabbit     the cluster link over RabbitMQ: its queue, its thread, its topology
//   StapsNode       the node: listeners, HTTP, access, websockets, the hub, observability
//   StapsHook       the authorization hook's HTTP client
//   staps           the executable: flags, daemon, systemd, logging, and the ServiceGroup
//                   (swift-service-lifecycle) that runs the node until SIGTERM or SIGINT
//   StapsBench      the load generator and the bare-broker baselines
// staps runs on Linux only (rabbitmq-c, glibc, systemd), so no platforms are declared.

let nio: [Target.Dependency] = [
    .product(name: "NIOCore", package: "swift-nio"),
    .product(name: "NIOPosix", package: "swift-nio"),
]
let atomics: Target.Dependency = .product(name: "Atomics", package: "swift-atomics")
let locks: Target.Dependency = .product(name: "NIOConcurrencyHelpers", package: "swift-nio")
let logging: Target.Dependency = .product(name: "Logging", package: "swift-log")

let package = Package(
    name: "staps",
    products: [
        .executable(name: "staps", targets: ["staps"]),
        .executable(name: "staps-bench", targets: ["StapsBench"]),
        .library(name: "StapsNode", targets: ["StapsNode"]),
        // For the fuzz package in Fuzz/ (its routing-key and wire-format targets).
        .library(name: "StapsCluster", targets: ["StapsCluster"]),
        .library(name: "StapsRabbit", targets: ["StapsRabbit"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.3"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-atomics", from: "1.3.0"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
    ],
    targets: [
        // rabbitmq-c (Debian: librabbitmq-dev): imported by RabbitClient, the link (StapsRabbit) and
        // the bare-broker baselines (StapsBench), never by the node.
        .systemLibrary(
            name: "CRabbit",
            pkgConfig: "librabbitmq",
            providers: [.apt(["librabbitmq-dev"])]
        ),
        .target(
            name: "StapsCluster",
            dependencies: [.product(name: "NIOCore", package: "swift-nio"), atomics]
        ),
        .target(
            name: "RabbitClient",
            dependencies: ["CRabbit", "StapsCluster"]
        ),
        .target(
            name: "StapsRabbit",
            dependencies: ["CRabbit", "RabbitClient", "StapsCluster", logging, atomics, locks] + nio
        ),
        .target(
            name: "StapsNode",
            dependencies: [
                "StapsCluster",
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
                logging, atomics, locks,
                // Metrics objects are swift-metrics'; the Prometheus text comes from swift-prometheus.
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ] + nio
        ),
        .target(
            name: "StapsHook",
            dependencies: ["StapsNode", .product(name: "NIOHTTP1", package: "swift-nio"), atomics, locks] + nio
        ),
        // A small NIO websocket client shared by the load generator and the tests.
        .target(
            name: "WebSocketClient",
            dependencies: ["StapsNode", .product(name: "NIOHTTP1", package: "swift-nio"), .product(name: "NIOWebSocket", package: "swift-nio"), locks] + nio
        ),
        .executableTarget(
            name: "staps",
            dependencies: [
                "StapsNode", "StapsCluster", "StapsRabbit", "StapsHook",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                // Signals and graceful shutdown: a ServiceGroup of the node and its companions.
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
                logging, atomics, locks,
                .product(name: "NIOCore", package: "swift-nio"),
            ]
        ),
        .executableTarget(
            name: "StapsBench",
            dependencies: [
                "WebSocketClient", "StapsCluster", "StapsRabbit", "RabbitClient", "CRabbit",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                logging, atomics, locks,
            ] + nio
        ),
        .testTarget(
            name: "StapsNodeTests",
            dependencies: [
                "StapsNode", "StapsCluster", "StapsRabbit", "StapsHook", "WebSocketClient",
                // rabbitmq-c itself: tests of what the broker does with bindings (no link in
                // between), and the publish frames written by hand read back with its own decoder.
                "RabbitClient", "CRabbit",
                // The chaos ledger's arithmetic, tested in memory.
                "StapsBench",
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
                logging, atomics, locks,
            ] + nio
        ),
    ]
)
