import ChunkStore
import Foundation
import ObjectStore
import Synchronization
import SystemIO

/// A vault: recovery points of any number of machines, deduplicated together in one object store.
public final class Vault: Sendable {
    public let store: any ObjectStore
    public let config: VaultConfig
    /// The local chunk location caches this process found at odds with their vault and rebuilt.
    public static var rebuiltCaches: [String] { ChunkStore.rebuiltCaches.withLock { $0 } }
    public let chunks: ChunkStore
    public let stateDirectory: String

    private init(store: any ObjectStore, config: VaultConfig, stateDirectory: String) throws(VaultError) {
        self.store = store
        self.config = config
        self.stateDirectory = stateDirectory
        do {
            self.chunks = try ChunkStore(store: store, parameters: config.parameters,
                                         cacheDirectory: stateDirectory + "/cache/" + config.id)
        } catch { throw .chunks(error) }
    }

    /// Creates a new vault in `store`.
    public static func create(store: any ObjectStore, chunkSize: Int = Defaults.chunkSize,
                              compression: CompressionSetting = Defaults.compression,
                              stateDirectory: String = Defaults.stateDirectory) throws(VaultError) -> Vault {
        guard chunkSize >= 4096, chunkSize <= 8 << 20, chunkSize & (chunkSize - 1) == 0 else {
            throw .invalidArgument("chunk size must be a power of two from 4K to 8M, not \(chunkSize)")
        }
        let config = VaultConfig(
            format: VaultConfig.formatName, version: VaultConfig.currentVersion,
            id: (0..<16).map { _ in UInt8.random(in: 0...255) }.hex,
            chunkSize: chunkSize, compression: compression.description,
            chunkIDs: "sha256", encryption: "none", created: Timestamp.format(Date()))
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
        let bytes = Array((try? encoder.encode(config)) ?? Data())
        do {
            if try !store.list(prefix: "").isEmpty { throw VaultError.vaultExists(store.location) }
            guard try store.putIfAbsent(VaultConfig.objectName, bytes) else { throw VaultError.vaultExists(store.location) }
        } catch let error as VaultError {
            throw error
        } catch let error as ObjectStoreError {
            throw .store(error)
        } catch {
            throw .invalidArgument("\(error)")
        }
        return try Vault(store: store, config: config, stateDirectory: stateDirectory)
    }

    /// Opens an existing vault, checking that it is one.
    public static func open(store: any ObjectStore, stateDirectory: String = Defaults.stateDirectory) throws(VaultError) -> Vault {
        let bytes: [UInt8]
        do {
            bytes = try store.get(VaultConfig.objectName)
        } catch {
            if case .notFound = error {
                let empty = (try? store.list(prefix: "").isEmpty) ?? true
                if empty { throw .noVault(store.location) }
                throw .foreignVault(store.location, "it has no config object")
            }
            throw .store(error)
        }
        let config: VaultConfig
        do {
            config = try JSONDecoder().decode(VaultConfig.self, from: Data(bytes))
        } catch {
            throw .foreignVault(store.location, "its config object is not a Lifeboat configuration")
        }
        guard config.format == VaultConfig.formatName else {
            throw .foreignVault(store.location, "its config names format \(config.format)")
        }
        guard config.version == VaultConfig.currentVersion else { throw .unsupportedFormat(store.location, config.version) }
        guard config.chunkIDs == "sha256", config.encryption == "none", CompressionSetting(config.compression) != nil,
              config.chunkSize >= 4096, config.chunkSize <= 8 << 20, !config.id.isEmpty,
              config.id.allSatisfy({ $0.isHexDigit }) else {
            throw .badConfig(store.location, "unsupported parameters")
        }
        return try Vault(store: store, config: config, stateDirectory: stateDirectory)
    }

    /// Opens the local-directory vault at `path`.
    public static func open(path: String, stateDirectory: String = Defaults.stateDirectory) throws(VaultError) -> Vault {
        guard FileSystem.isDirectory(path) else {
            if FileSystem.exists(path) { throw .foreignVault(path, "it is not a directory") }
            throw .noVault(path)
        }
        return try open(store: LocalDirectoryStore(root: path), stateDirectory: stateDirectory)
    }

    // MARK: - Points

    /// Every recovery point, oldest first. Damaged manifests are reported through `damaged`.
    public func points(machine: String? = nil, damaged: ((String, VaultError) -> Void)? = nil) throws(VaultError) -> [RecoveryPoint] {
        let prefix = machine.map { RecoveryPoint.prefix + $0 + "/" } ?? RecoveryPoint.prefix
        let listing: [ObjectInfo]
        do {
            listing = try store.list(prefix: prefix)
        } catch { throw .store(error) }
        var points: [RecoveryPoint] = []
        for object in listing {
            do {
                let bytes = try store.get(object.name)
                points.append(try RecoveryPoint.decode(bytes, name: object.name))
            } catch let error as VaultError {
                damaged?(object.name, error)
            } catch let error as ObjectStoreError {
                if case .notFound = error { continue }  // removed since the listing
                damaged?(object.name, .store(error))
            } catch {}
        }
        return RecoveryPoint.chronological(points)
    }

    /// Resolves `MACHINE@latest`, `MACHINE@-N`, `MACHINE@<time or time prefix>`, `MACHINE@<id prefix>`;
    /// a bare `MACHINE` means its latest point.
    public func point(_ spec: String) throws(VaultError) -> RecoveryPoint {
        let parts = spec.split(separator: "@", maxSplits: 1, omittingEmptySubsequences: false)
        let machine = String(parts[0])
        let selector = parts.count > 1 ? String(parts[1]) : "latest"
        try validateName(machine, what: "machine")
        let all = try points(machine: machine)
        guard !all.isEmpty else { throw .unknownMachine(machine) }
        if selector == "latest" || selector.isEmpty { return all[all.count - 1] }
        if selector.hasPrefix("-"), let n = Int(selector.dropFirst()) {
            guard n < all.count else { throw .unknownPoint(spec, "machine \(machine) has only \(all.count) points") }
            return all[all.count - 1 - n]
        }
        let lower = selector.lowercased()
        if lower.count >= 4, lower.allSatisfy({ $0.isHexDigit }) {
            let matches = all.filter { $0.id.hasPrefix(lower) }
            if matches.count == 1 { return matches[0] }
            if matches.count > 1 { throw .ambiguousPoint(spec, matches.map(\.shortID)) }
        }
        if let date = Timestamp.parse(selector) {
            if let exact = all.last(where: { abs($0.date.timeIntervalSince(date)) < 1 }) { return exact }
        }
        let byTime = all.filter { $0.time.hasPrefix(selector) }
        if byTime.count == 1 { return byTime[0] }
        if byTime.count > 1 { throw .ambiguousPoint(spec, byTime.map { "\($0.time) (\($0.shortID))" }) }
        throw .unknownPoint(spec, "no point of \(machine) has that time or id")
    }

    public func reader(_ disk: PointDisk) -> DiskIndexReader {
        DiskIndexReader(disk: disk, chunks: chunks)
    }
}
