import Foundation
import Testing

/// Every committed fuzz input, through the same entry logic the libFuzzer targets run
/// (`FuzzTargets.swift`): the seed corpus in `Fuzz/corpus/<target>/` and the inputs that once
/// crashed a target or broke an invariant in `Fuzz/regressions/<target>/`.
@Suite struct FuzzRegressionTests {
    static let fuzzDirectory = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fuzz")

    static func inputs(_ folder: String, _ target: String) -> [URL] {
        let directory = fuzzDirectory.appendingPathComponent(folder).appendingPathComponent(target)
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory.path)) ?? []
        return names.filter { !$0.hasPrefix(".") }.sorted().map { directory.appendingPathComponent($0) }
    }

    @Test(arguments: FuzzTargets.all.map(\.name))
    func committedInputsPass(target: String) throws {
        let run = try #require(FuzzTargets.all.first { $0.name == target }).run
        let corpus = Self.inputs("corpus", target)
        #expect(!corpus.isEmpty, "no seed corpus in Fuzz/corpus/\(target)")
        for file in corpus + Self.inputs("regressions", target) {
            let data = try Data(contentsOf: file)
            do {
                try data.withUnsafeBytes { bytes in try run(bytes) }
            } catch {
                Issue.record("\(file.path): \(error)")
            }
        }
    }
}
