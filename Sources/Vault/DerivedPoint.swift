import ChunkStore
import Foundation
import ObjectStore
import SystemIO

/// The slots of one disk that may differ from a base point's disk, with their current bytes
/// (a sandbox overlay). Slots not named keep the base's chunk.
public protocol ChangedSlots {
    /// Slot numbers (of the vault's chunk size), ascending.
    var changedSlots: [Int] { get }
    /// Reads a whole slot (the chunk size; fewer bytes only in the disk's last slot).
    func readSlot(_ slot: Int, into buffer: UnsafeMutableRawBufferPointer) throws -> Int
}

public struct DerivedProgress: Sendable {
    public var slotsDone: Int
    public var slotsTotal: Int
}

extension Vault {
    /// Makes a new point of `base.machine` whose disks are the base's with `changes` applied:
    /// only the changed slots are read, hashed and (when new) stored; every other slot reuses
    /// the base's chunk, so the cost follows what changed, not the disk's size.
    public func commit(derivedFrom base: RecoveryPoint, changes: [String: any ChangedSlots], time: Date? = nil,
                       tags: [String] = [], progress: (DerivedProgress) -> Void = { _ in }) throws(VaultError) -> BackupReport {
        let started = Date()
        for tag in tags { try validateName(tag, what: "tag") }
        for name in changes.keys where !base.disks.contains(where: { $0.name == name }) {
            throw .unknownDisk(point: base.label, disk: name, known: base.disks.map(\.name))
        }
        let lock = try MachineLock.acquire(machine: base.machine, operation: "promote", store: store)
        defer { lock.release() }
        // The base must still be there: its chunks are what the new point reuses.
        let present: Bool
        do {
            present = try store.size(RecoveryPoint.objectName(machine: base.machine, id: base.id)) != nil
        } catch { throw .store(error) }
        guard present else { throw .unknownPoint(base.label, "it has been removed from the vault") }
        let avoiding = try packsPendingDeletion()
        do {
            try chunks.reload()
        } catch { throw .chunks(error) }

        let writer = chunks.writer(lanes: 1, avoiding: avoiding)
        let total = changes.values.reduce(0) { $0 + $1.changedSlots.count }
        var done = 0
        var disks: [PointDisk] = []
        do {
            for disk in base.disks {
                guard disk.chunkSize == config.chunkSize else {
                    throw VaultError.invalidArgument("disk \(disk.name) of \(base.label) has \(disk.chunkSize)-byte chunks, the vault now \(config.chunkSize)")
                }
                let changed = changes[disk.name]?.changedSlots ?? []
                if changed.isEmpty && avoiding.isEmpty {
                    var same = disk
                    (same.newBytes, same.storedBytes, same.newChunks) = (0, 0, 0)
                    same.reusedChunks = disk.slotCount - disk.holeChunks
                    disks.append(same)
                    continue
                }
                disks.append(try deriveDisk(disk, changed: changed, from: changes[disk.name], writer: writer) {
                    done += 1
                    progress(DerivedProgress(slotsDone: done, slotsTotal: total))
                })
            }
            let (packs, _) = try writer.finish()
            let point = RecoveryPoint(
                format: RecoveryPoint.currentFormat, machine: base.machine, time: Timestamp.format(time ?? started),
                created: Timestamp.format(Date()), host: hostName(), consistency: .crash,
                tags: tags, parent: base.id, keepUntil: nil, disks: disks)
            let bytes = point.encoded()
            let id = ChunkID.sha256(bytes).hex
            try lock.confirm()
            try store.put(RecoveryPoint.objectName(machine: base.machine, id: id), bytes)
            chunks.refresh()
            let read = UInt64(total) * UInt64(config.chunkSize)
            return BackupReport(
                point: id, machine: base.machine, time: point.time, consistency: .crash, disks: disks,
                bytesRead: read, newBytes: point.newBytes, storedBytes: point.storedBytes,
                chunksNew: disks.reduce(0) { $0 + $1.newChunks }, chunksReused: disks.reduce(0) { $0 + $1.reusedChunks },
                packs: packs, seconds: Date().timeIntervalSince(started), warnings: [])
        } catch {
            writer.abandon()
            throw VaultError.wrapping(error)
        }
    }

    private func deriveDisk(_ disk: PointDisk, changed: [Int], from source: (any ChangedSlots)?, writer: ChunkWriter,
                            slotDone: () -> Void) throws -> PointDisk {
        let counters = DiskCounters()
        let compressor: ChunkCompressor? = {
            if case .zstd(let level) = config.parameters.compression { return ChunkCompressor(level: level) }
            return nil
        }()
        var index = DiskIndexWriter(sink: IndexSink(writer: writer, compression: config.parameters.compression, counters: counters))
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: disk.chunkSize, alignment: SystemFile.directAlignment)
        defer { buffer.deallocate() }
        var next = 0  // the next entry of `changed`
        var holes = 0, reused = 0, fresh = 0
        var data: UInt64 = 0, newBytes: UInt64 = 0, stored: UInt64 = 0

        try reader(disk).forEachLeaf { first, ids in
            for (k, baseID) in ids.enumerated() {
                let slot = first + k
                let length = Int(min(UInt64(disk.chunkSize), disk.size - UInt64(slot) * UInt64(disk.chunkSize)))
                while next < changed.count && changed[next] < slot { next += 1 }
                if Cancellation.requested { throw VaultError.interrupted }
                if next < changed.count && changed[next] == slot, let source {
                    let n = try source.readSlot(slot, into: buffer)
                    guard n == length else {
                        throw VaultError.invalidArgument("slot \(slot) of disk \(disk.name) read \(n) bytes, not \(length)")
                    }
                    slotDone()
                    let bytes = UnsafeRawBufferPointer(rebasing: buffer[0..<n])
                    if isAllZero(bytes) {
                        holes += 1
                        try index.append(.zero)
                        continue
                    }
                    let id = ChunkID.sha256(bytes)
                    data += UInt64(n)
                    if try writer.claim(id) {
                        stored += UInt64(try storeClaimed(id: id, bytes: bytes, writer: writer, compressor: compressor, lane: 0))
                        newBytes += UInt64(n)
                        fresh += 1
                    } else {
                        reused += 1
                    }
                    try index.append(id)
                    continue
                }
                if baseID.isZero {
                    holes += 1
                } else {
                    data += UInt64(length)
                    // A chunk in a pack that gc is about to delete is stored again (as a backup does).
                    if !writer.avoiding.isEmpty, try writer.claim(baseID) {
                        let plain = try chunks.read(baseID)
                        try plain.withBytes { (raw) throws(ChunkStoreError) in
                            stored += UInt64(try storeClaimed(id: baseID, bytes: raw, writer: writer, compressor: compressor, lane: 0))
                        }
                        newBytes += UInt64(plain.count)
                        fresh += 1
                    } else {
                        reused += 1
                    }
                }
                try index.append(baseID)
            }
        }
        let (root, depth) = try index.finish()
        return PointDisk(
            name: disk.name, size: disk.size, chunkSize: disk.chunkSize, indexRoot: root.hex, indexDepth: depth,
            dataBytes: data, newBytes: newBytes + counters.newBytes.load(ordering: .relaxed),
            storedBytes: stored + counters.storedBytes.load(ordering: .relaxed),
            newChunks: fresh, reusedChunks: reused, holeChunks: holes)
    }
}
