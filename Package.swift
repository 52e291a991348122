// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "staps",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "staps", targets: ["staps"]),
        .executable(name: "staps-bench", targets: ["StapsBench"]),
        .library(name: "StapsNode", targets: ["StapsNode"]),
        // For the fuzz package in Fuzz/ (its routing-key and wire-format targets).
        .library(name: "StapsRabbit", targets: ["StapsRabbit"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.3"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-atomics", from: "1.3.0"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
    ],
    targets: [
        // rabbitmq-c (Debian: librabbitmq-dev). Only StapsRabbit imports it.
        .systemLibrary(
            name: "CRabbit",
            pkgConfig: "librabbitmq",
            providers: [.apt(["librabbitmq-dev"])]
        ),
        // The cluster link over RabbitMQ: the ClusterLink the node uses when `amqp` is set.
        .target(
            name: "StapsRabbit",
            dependencies: [
                "CRabbit",
                "StapsNode",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Atomics", package: "swift-atomics"),
            ]
        ),
        // The node as a library: configuration, listeners, HTTP + websocket handlers, the hub.
        .target(
            name: "StapsNode",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Atomics", package: "swift-atomics"),
                // Metrics objects are swift-metrics'; the Prometheus text comes from swift-prometheus.
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ]
        ),
        // The authorization hook's HTTP client (`auth_url`) over NIO's HTTP codec.
        .target(
            name: "StapsHook",
            dependencies: [
                "StapsNode",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Atomics", package: "swift-atomics"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ]
        ),
        // A small NIO websocket client shared by the load generator and the tests.
        .target(
            name: "WebSocketClient",
            dependencies: [
                "StapsNode",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
            ]
        ),
        .executableTarget(
            name: "staps",
            dependencies: [
                "StapsNode",
                "StapsRabbit",
                "StapsHook",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Atomics", package: "swift-atomics"),
            ]
        ),
        .executableTarget(
            name: "StapsBench",
            dependencies: [
                "WebSocketClient",
                "StapsRabbit",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Atomics", package: "swift-atomics"),
            ]
        ),
        .testTarget(
            name: "StapsNodeTests",
            dependencies: [
                "StapsNode",
                "StapsRabbit",
                "StapsHook",
                "WebSocketClient",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Atomics", package: "swift-atomics"),
            ]
        ),
    ]
)
