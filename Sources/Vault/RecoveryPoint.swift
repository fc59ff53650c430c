import ChunkStore
import Foundation
import SystemIO

/// One disk of a recovery point.
public struct PointDisk: Codable, Sendable, Hashable {
    public var name: String
    /// Logical size in bytes.
    public var size: UInt64
    public var chunkSize: Int
    /// Root of the disk index tree (hex chunk id; all zeros for an all-zero disk).
    public var indexRoot: String
    /// Levels of the tree: 1 means the root lists the data chunk ids directly.
    public var indexDepth: Int
    /// Bytes in slots that are not all-zero.
    public var dataBytes: UInt64
    /// Plaintext bytes of the chunks this point added to the vault.
    public var newBytes: UInt64
    /// Bytes those new chunks take in packs (after compression).
    public var storedBytes: UInt64
    public var newChunks: Int
    public var reusedChunks: Int
    public var holeChunks: Int

    public var slotCount: Int { Int((size + UInt64(chunkSize) - 1) / UInt64(chunkSize)) }
    public var root: ChunkID { ChunkID(hex: indexRoot) ?? .zero }
}

public enum Consistency: String, Codable, Sendable {
    case application
    case crash
}

/// A recovery point's manifest: all of a machine's disks at one moment (docs/FORMAT.md,
/// "Recovery points"). Immutable; its object name is `points/<machine>/<SHA-256 of its bytes>`,
/// and it is written last, after everything it names is durable: it is the commit.
public struct RecoveryPoint: Codable, Sendable {
    public var format: Int
    public var machine: String
    /// The point's time: when the disks were captured (or --time).
    public var time: String
    /// When the backup finished writing it.
    public var created: String
    public var host: String
    public var consistency: Consistency
    public var tags: [String]
    /// The point whose disk indexes served as the dedup reference, if any.
    public var parent: String?
    /// Prune never removes the point before this time (ISO 8601), if set.
    public var keepUntil: String?
    public var disks: [PointDisk]

    /// Set when read: the hex SHA-256 of the manifest's bytes.
    public var id: String = ""
    /// `time`, parsed once.
    public private(set) var date = Date(timeIntervalSince1970: 0)

    enum CodingKeys: String, CodingKey {
        case format, machine, time, created, host, consistency, tags, parent, keepUntil, disks
    }

    public static let currentFormat = 1
    public static let prefix = "points/"

    public var shortID: String { String(id.prefix(12)) }
    public var logicalSize: UInt64 { disks.reduce(0) { $0 + $1.size } }
    public var newBytes: UInt64 { disks.reduce(0) { $0 + $1.newBytes } }
    public var storedBytes: UInt64 { disks.reduce(0) { $0 + $1.storedBytes } }
    public var label: String { "\(machine)@\(time) (\(shortID))" }

    public func disk(_ name: String) throws(VaultError) -> PointDisk {
        guard let disk = disks.first(where: { $0.name == name }) else {
            throw .unknownDisk(point: label, disk: name, known: disks.map(\.name))
        }
        return disk
    }

    public func encoded() -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
        return Array((try? encoder.encode(self)) ?? Data())
    }

    public static func objectName(machine: String, id: String) -> String {
        prefix + machine + "/" + id
    }

    /// Parses and verifies a manifest read from `name`.
    public static func decode(_ bytes: [UInt8], name: String) throws(VaultError) -> RecoveryPoint {
        let parts = name.split(separator: "/")
        guard parts.count == 3, let id = parts.last, ChunkID.sha256(bytes).hex == id else {
            throw .badManifest(name, "its content does not match its name (checksum mismatch)")
        }
        var point: RecoveryPoint
        do {
            point = try JSONDecoder().decode(RecoveryPoint.self, from: Data(bytes))
        } catch {
            throw .badManifest(name, "not valid JSON: \(error)")
        }
        guard point.format == currentFormat else { throw .badManifest(name, "unknown format \(point.format)") }
        guard point.machine == String(parts[1]) else { throw .badManifest(name, "names machine \(point.machine)") }
        guard let date = Timestamp.parse(point.time) else { throw .badManifest(name, "bad time \(point.time)") }
        point.date = date
        // A manifest's checksum proves only that it was not changed since it was written: its
        // fields are checked as input (a crafted one must not trap, loop or escape a path).
        for disk in point.disks {
            do { try validateName(disk.name, what: "disk") } catch { throw .badManifest(name, "disk name \"\(disk.name)\" is not valid") }
            guard disk.chunkSize >= 4096, disk.chunkSize <= 8 << 20, disk.chunkSize & (disk.chunkSize - 1) == 0,
                  disk.size <= 1 << 56 else {
                throw .badManifest(name, "disk \(disk.name) has a bad size (\(disk.size) bytes in chunks of \(disk.chunkSize))")
            }
            guard ChunkID(hex: disk.indexRoot) != nil, disk.indexDepth == DiskIndex.depth(forSlots: disk.slotCount) else {
                throw .badManifest(name, "disk \(disk.name) has a bad index (depth \(disk.indexDepth) for \(disk.slotCount) slots)")
            }
        }
        point.id = String(id)
        return point
    }
}

extension RecoveryPoint {
    /// Points oldest first: by time, then creation time, then id; and since both times are to
    /// the second, a point made in the same second as its parent after it, so that the last is
    /// the newest of a machine's backups made one right after the other.
    public static func chronological(_ points: [RecoveryPoint]) -> [RecoveryPoint] {
        let sorted = points.sorted { ($0.date, $0.created, $0.id) < ($1.date, $1.created, $1.id) }
        var out: [RecoveryPoint] = []
        out.reserveCapacity(sorted.count)
        var start = 0
        while start < sorted.count {
            var end = start + 1
            while end < sorted.count, sorted[end].date == sorted[start].date, sorted[end].created == sorted[start].created { end += 1 }
            var group = Array(sorted[start..<end])
            // A point whose parent is still waiting in the group goes after it.
            while !group.isEmpty {
                let waiting = Set(group.map(\.id))
                let next = group.firstIndex { $0.parent.map { !waiting.contains($0) } ?? true } ?? 0
                out.append(group.remove(at: next))
            }
            start = end
        }
        return out
    }
}
