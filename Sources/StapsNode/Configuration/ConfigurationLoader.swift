import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Finds and reads the configuration file: `--config PATH`, else `/etc/staps/staps.conf`,
/// else `~/.staps.conf`. A named file that can't be read is an error; absent default files are not.
public enum ConfigurationLoader {
    public static let systemPath = "/etc/staps/staps.conf"

    public static func defaultCandidates(home: String?) -> [String] {
        var paths = [systemPath]
        if let home, !home.isEmpty { paths.append(home + "/.staps.conf") }
        return paths
    }

    /// Returns the settings from the first file found (and its path), or empty settings.
    public static func load(explicitPath: String?, candidates: [String]) throws(ConfigurationError) -> (ConfigurationOverrides, String?) {
        if let explicitPath {
            let text = try readFile(explicitPath)
            return (try ConfigurationOverrides.parse(text, file: explicitPath), explicitPath)
        }
        for path in candidates where access(path, F_OK) == 0 {
            let text = try readFile(path)
            return (try ConfigurationOverrides.parse(text, file: path), path)
        }
        return (ConfigurationOverrides(), nil)
    }

    static func readFile(_ path: String) throws(ConfigurationError) -> String {
        guard let fp = fopen(path, "r") else {
            throw ConfigurationError(file: path, message: "cannot read: \(String(cString: strerror(errno)))")
        }
        defer { fclose(fp) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = fread(&chunk, 1, chunk.count, fp)
            if n > 0 { bytes.append(contentsOf: chunk[0..<n]) }
            if n < chunk.count {
                if ferror(fp) != 0 {
                    throw ConfigurationError(file: path, message: "cannot read: \(String(cString: strerror(errno)))")
                }
                break
            }
            if bytes.count > 1 << 20 { throw ConfigurationError(file: path, message: "file larger than 1 MiB") }
        }
        guard let text = String(validating: bytes, as: UTF8.self) else {
            throw ConfigurationError(file: path, message: "not valid UTF-8")
        }
        return text
    }
}
