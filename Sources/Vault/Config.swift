import ChunkStore
import Foundation

/// The vault's `config` object (docs/FORMAT.md, "Config"): written once by `init`, never changed.
public struct VaultConfig: Codable, Sendable {
    public var format: String
    public var version: Int
    public var id: String
    public var chunkSize: Int
    public var compression: String
    public var chunkIDs: String
    public var encryption: String
    public var created: String

    public static let formatName = "lifeboat-vault"
    public static let currentVersion = 1
    public static let objectName = "config"

    public var parameters: ChunkParameters {
        ChunkParameters(chunkSize: chunkSize, compression: CompressionSetting(compression) ?? .zstd(level: 3))
    }
}

/// Where things live when the operator does not say.
public enum Defaults {
    /// LIFEBOAT_VAULT, else /var/lib/lifeboat/vault for root, else ~/.local/share/lifeboat/vault.
    public static var vaultPath: String {
        let env = ProcessInfo.processInfo.environment
        if let path = env["LIFEBOAT_VAULT"], !path.isEmpty { return path }
        if getuid() == 0 { return "/var/lib/lifeboat/vault" }
        let data = env["XDG_DATA_HOME"] ?? ((env["HOME"] ?? "/tmp") + "/.local/share")
        return data + "/lifeboat/vault"
    }

    /// LIFEBOAT_STATE, else /var/lib/lifeboat/state for root, else ~/.local/state/lifeboat.
    /// Sandboxes, sync journals and caches; never inside the vault.
    public static var stateDirectory: String {
        let env = ProcessInfo.processInfo.environment
        if let path = env["LIFEBOAT_STATE"], !path.isEmpty { return path }
        if getuid() == 0 { return "/var/lib/lifeboat/state" }
        let state = env["XDG_STATE_HOME"] ?? ((env["HOME"] ?? "/tmp") + "/.local/state")
        return state + "/lifeboat"
    }

    public static let chunkSize = 64 << 10
    public static let compression = CompressionSetting.zstd(level: 1)
}

/// ISO 8601 in UTC with seconds, the only time format in manifests.
public enum Timestamp {
    /// `YYYY-MM-DDTHH:MM:SSZ`, the form manifests use, without a formatter (listing hundreds of
    /// points parses as many times; a formatter costs more than the rest of the listing).
    static func parseUTC(_ text: String) -> Date? {
        let b = Array(text.utf8)
        guard b.count == 20, b[4] == 45, b[7] == 45, b[10] == 84, b[13] == 58, b[16] == 58, b[19] == 90 else { return nil }
        func number(_ from: Int, _ count: Int) -> Int? {
            var value = 0
            for i in from..<(from + count) {
                guard b[i] >= 48 && b[i] <= 57 else { return nil }
                value = value * 10 + Int(b[i] - 48)
            }
            return value
        }
        guard let year = number(0, 4), let month = number(5, 2), let day = number(8, 2),
              let hour = number(11, 2), let minute = number(14, 2), let second = number(17, 2),
              (1...12).contains(month), (1...31).contains(day), hour < 24, minute < 60, second < 61 else { return nil }
        // Days from the civil date (Howard Hinnant's algorithm).
        let y = month <= 2 ? year - 1 : year
        let era = (y >= 0 ? y : y - 399) / 400
        let yoe = y - era * 400
        let mp = (month + 9) % 12
        let doy = (153 * mp + 2) / 5 + day - 1
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
        let days = era * 146097 + doe - 719468
        return Date(timeIntervalSince1970: Double(days * 86400 + hour * 3600 + minute * 60 + second))
    }

    /// `YYYY-MM-DDTHH:MM:SSZ` without a formatter (a formatter loads ICU's time zone data, which
    /// cost a cold backup 30-40 ms before it read a byte). Like Foundation's: the time rounded
    /// to the millisecond, then down to the second.
    public static func format(_ date: Date) -> String {
        var milliseconds = Int64((date.timeIntervalSince1970 * 1000).rounded())
        if milliseconds < 0 { milliseconds -= 999 }
        let t = milliseconds / 1000
        var days = t / 86400, seconds = t % 86400
        if seconds < 0 { seconds += 86400; days -= 1 }
        // The civil date from days (Howard Hinnant's algorithm).
        let z = days + 719468
        let era = (z >= 0 ? z : z - 146096) / 146097
        let doe = z - era * 146097
        let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        let day = doy - (153 * mp + 2) / 5 + 1
        let month = mp < 10 ? mp + 3 : mp - 9
        let year = yoe + era * 400 + (month <= 2 ? 1 : 0)
        func digits(_ value: Int64, _ count: Int) -> String {
            let text = String(value)
            return text.count >= count ? text : String(repeating: "0", count: count - text.count) + text
        }
        return digits(year, 4) + "-" + digits(month, 2) + "-" + digits(day, 2) + "T" + digits(seconds / 3600, 2) + ":"
            + digits(seconds / 60 % 60, 2) + ":" + digits(seconds % 60, 2) + "Z"
    }

    public static func parse(_ text: String) -> Date? {
        if let date = parseUTC(text) { return date }
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime]
        if let date = formatter.date(from: text) { return date }
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        if let date = formatter.date(from: text) { return date }
        formatter.formatOptions = [.withFullDate]
        return formatter.date(from: text)
    }
}
