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
    public static func format(_ date: Date) -> String {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime]
        formatter.timeZone = TimeZone(identifier: "UTC")
        return formatter.string(from: date)
    }

    public static func parse(_ text: String) -> Date? {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime]
        if let date = formatter.date(from: text) { return date }
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        if let date = formatter.date(from: text) { return date }
        formatter.formatOptions = [.withFullDate]
        return formatter.date(from: text)
    }
}
