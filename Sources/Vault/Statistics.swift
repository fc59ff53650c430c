import ChunkStore
import Foundation
import ObjectStore
import SystemIO

public struct PointStatistics: Codable, Sendable {
    public var machine: String
    public var time: String
    public var point: String
    public var logicalBytes: UInt64
    /// Stored bytes of chunks no other point uses: what removing this point would free.
    public var uniqueStoredBytes: UInt64
}

public struct VaultStatistics: Codable, Sendable {
    public var points: Int
    /// Sum of the disks' sizes over the points.
    public var logicalBytes: UInt64
    /// Sum over the points of their non-hole slots' bytes.
    public var dataBytes: UInt64
    /// Plaintext of the distinct chunks the points use.
    public var uniqueBytes: UInt64
    /// What those chunks take in packs.
    public var storedBytes: UInt64
    /// All packs, including chunks no point uses any more (gc frees them).
    public var packBytes: UInt64
    /// dataBytes / uniqueBytes.
    public var deduplication: Double
    /// uniqueBytes / storedBytes.
    public var compression: Double
    public var perPoint: [PointStatistics]
}

extension Vault {
    /// Sizes and ratios of the vault (or one machine's points), and what each point alone holds.
    public func statistics(machine: String? = nil) throws(VaultError) -> VaultStatistics {
        chunks.refresh()
        let all = try points()
        // How many points use each chunk, over the whole vault (a chunk another machine uses
        // is not freed by removing this machine's point).
        var users: [ChunkID: Int] = [:]
        var used: [String: Set<ChunkID>] = [:]
        for point in all {
            var ids = Set<ChunkID>(), walked = Set<WalkedNode>()
            for disk in point.disks {
                do {
                    try collectChunkIDs(of: disk, into: &ids, walked: &walked)
                } catch let error as ChunkStoreError {
                    throw .chunks(error)
                } catch {
                    throw .invalidArgument("\(error)")
                }
            }
            for id in ids { users[id, default: 0] += 1 }
            used[point.id] = ids
        }
        var sizes: [ChunkID: (stored: UInt32, raw: UInt32)] = [:]
        var packBytes: UInt64 = 0
        do {
            for object in try store.list(prefix: IndexObject.prefix) {
                let index = try IndexObject.decode(try store.get(object.name), name: object.name)
                for (_, entries) in index.packs {
                    for e in entries where sizes[e.id] == nil { sizes[e.id] = (e.storedLength, e.rawLength) }
                }
            }
            packBytes = try store.list(prefix: "packs/").reduce(0) { $0 + $1.size }
        } catch let error as ChunkStoreError {
            throw .chunks(error)
        } catch let error as ObjectStoreError {
            throw .store(error)
        } catch {
            throw .invalidArgument("\(error)")
        }
        let selected = all.filter { machine == nil || $0.machine == machine }
        var distinct = Set<ChunkID>()
        var perPoint: [PointStatistics] = []
        var logical: UInt64 = 0, data: UInt64 = 0
        for point in selected {
            let ids = used[point.id] ?? []
            distinct.formUnion(ids)
            logical += point.logicalSize
            data += point.disks.reduce(0) { $0 + $1.dataBytes }
            let unique = ids.reduce(UInt64(0)) { $0 + (users[$1] == 1 ? UInt64(sizes[$1]?.stored ?? 0) : 0) }
            perPoint.append(PointStatistics(machine: point.machine, time: point.time, point: point.id,
                                            logicalBytes: point.logicalSize, uniqueStoredBytes: unique))
        }
        let uniqueBytes = distinct.reduce(UInt64(0)) { $0 + UInt64(sizes[$1]?.raw ?? 0) }
        let stored = distinct.reduce(UInt64(0)) { $0 + UInt64(sizes[$1]?.stored ?? 0) }
        return VaultStatistics(
            points: selected.count, logicalBytes: logical, dataBytes: data, uniqueBytes: uniqueBytes, storedBytes: stored,
            packBytes: packBytes, deduplication: uniqueBytes > 0 ? Double(data) / Double(uniqueBytes) : 0,
            compression: stored > 0 ? Double(uniqueBytes) / Double(stored) : 0, perPoint: perPoint)
    }
}
