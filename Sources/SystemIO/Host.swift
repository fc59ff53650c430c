#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// What tells this boot and this process's view of pids apart from others on the same host.
public enum Host {
    /// The kernel's boot id: device numbers, /dev names and pids mean something only within it.
    public static let bootID: String? = {
        guard let text = try? String(contentsOfFile: "/proc/sys/kernel/random/boot_id", encoding: .utf8) else { return nil }
        let id = text.trimmingCharacters(in: .whitespacesAndNewlines)
        return id.isEmpty ? nil : id
    }()

    /// When this boot began (btime in /proc/stat, seconds since 1970).
    public static let bootTime: Date? = {
        guard let text = try? String(contentsOfFile: "/proc/stat", encoding: .utf8) else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix("btime ") {
            guard let seconds = TimeInterval(line.dropFirst(6).trimmingCharacters(in: .whitespaces)) else { return nil }
            return Date(timeIntervalSince1970: seconds)
        }
        return nil
    }()

    /// This process's pid namespace (the /proc/self/ns/pid link): a container has its own pids.
    public static let pidNamespace: String? = {
        var buffer = [CChar](repeating: 0, count: 64)
        let n = readlink("/proc/self/ns/pid", &buffer, buffer.count - 1)
        guard n > 0 else { return nil }
        return String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }()
}
