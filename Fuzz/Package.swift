// swift-tools-version:6.0
import PackageDescription

// libFuzzer targets for staps. Built only by `scripts/fuzz` (`swift build --sanitize=fuzzer
// --sanitize=address`): kept out of the root package so that `swift build` and `swift test`
// never need libFuzzer or sanitizer flags. The entry logic, `FuzzTargets`, is the test target's
// file Tests/StapsNodeTests/FuzzTargets.swift (linked here), so the fuzzers and the regression
// tests run the very same code.
let targets = ["ini", "path", "routing-key", "wire-format", "http", "websocket"]

let package = Package(
    name: "staps-fuzz",
    dependencies: [
        .package(name: "staps", path: ".."),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.3"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-atomics", from: "1.3.0"),
    ],
    targets: [
        .target(
            name: "FuzzTargets",
            dependencies: [
                .product(name: "StapsNode", package: "staps"),
                .product(name: "StapsCluster", package: "staps"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Atomics", package: "swift-atomics"),
            ]
        ),
    ] + targets.map { .executableTarget(name: "fuzz-\($0)", dependencies: ["FuzzTargets"]) }
)
