import ChunkStore
import Foundation
import ObjectStore
import SystemIO

/// Packs a garbage collection run decided to delete, written to the vault before anything is
/// deleted (docs/FORMAT.md, "Garbage collection"). Backups that start after a plan exists never
/// reuse chunks from its packs; the packs are deleted only once no backup that started before
/// the plan is still running.
public struct GCPlan: Codable, Sendable {
    public var created: String
    public var packs: [String]
}

public struct GCReport: Codable, Sendable {
    public var points = 0
    public var liveChunks = 0
    public var packs = 0
    /// Packs deleted because no point needs any chunk in them.
    public var packsDeleted = 0
    /// Packs more than a twentieth dead whose live chunks were copied into new packs, then deleted.
    public var packsRewritten = 0
    /// Packs no index object lists, older than the grace period (left by interrupted backups).
    public var orphanPacksDeleted = 0
    /// Net: bytes of the packs deleted, less the live bytes copied into new packs.
    public var bytesFreed: UInt64 = 0
    /// Bytes of the packs deleted.
    public var bytesDeleted: UInt64 = 0
    public var bytesCopied: UInt64 = 0
    /// True when deletion waits for backups that started before the plan (next gc completes it).
    public var deferred = false
    public var dryRun = false
    public var seconds = 0.0
}

extension Vault {
    static let gcPrefix = "gc/"

    /// Packs named by pending plans: a backup must not reuse chunks from them.
    public func packsPendingDeletion() throws(VaultError) -> Set<ChunkID> {
        var result = Set<ChunkID>()
        for (_, plan) in try plans() {
            for hex in plan.packs { if let id = ChunkID(hex: hex) { result.insert(id) } }
        }
        return result
    }

    /// Pending plans. A plan that cannot be read is an error, never "no plan": a backup that
    /// missed one could reuse a chunk about to be deleted.
    private func plans() throws(VaultError) -> [(String, GCPlan)] {
        var result: [(String, GCPlan)] = []
        do {
            for object in try store.list(prefix: Vault.gcPrefix + "plan-") {
                let bytes: [UInt8]
                do {
                    bytes = try store.get(object.name)
                } catch {
                    if case .notFound = error { continue }  // executed since the listing
                    throw error
                }
                guard let plan = try? JSONDecoder().decode(GCPlan.self, from: Data(bytes)) else {
                    throw VaultError.badManifest(object.name, "not a garbage collection plan")
                }
                result.append((object.name, plan))
            }
        } catch let error as VaultError {
            throw error
        } catch let error as ObjectStoreError {
            throw .store(error)
        } catch {
            throw .invalidArgument("\(error)")
        }
        return result.sorted { $0.0 < $1.0 }
    }

    /// Every chunk id a point needs: the nodes of its disk index trees and the slots' chunks.
    /// A manifest it cannot read stops it: that point's chunks would count as dead.
    func liveChunks() throws(VaultError) -> (Set<ChunkID>, Int) {
        var live = Set<ChunkID>(), walked = Set<ChunkID>()
        var unreadable: [(name: String, error: VaultError)] = []
        let all = try points { name, error in unreadable.append((name, error)) }
        if let first = unreadable.first {
            throw .badManifest(first.name, "\(first.error.description); garbage collection cannot tell which chunks "
                + "this point needs, so it stops (\(unreadable.count) manifest\(unreadable.count == 1 ? "" : "s") unreadable): "
                + "repair or remove it, then run gc again")
        }
        do {
            for point in all {
                for disk in point.disks { try collectChunkIDs(of: disk, into: &live, walked: &walked) }
            }
        } catch let error as ChunkStoreError {
            throw .chunks(error)
        } catch {
            throw .invalidArgument("\(error)")
        }
        return (live, all.count)
    }

    /// Adds every chunk id a disk needs to `ids`: its index nodes and its slots' chunks.
    /// Nodes in `walked` (shared with another point) are not walked again. Nodes are tracked
    /// apart from `ids`: a slot whose bytes equal an index node has the node's id, and taking
    /// it for walked would leave the node's children unmarked.
    func collectChunkIDs(of disk: PointDisk, into ids: inout Set<ChunkID>, walked: inout Set<ChunkID>) throws {
        try walk(disk.root, level: disk.indexDepth - 1, into: &ids, walked: &walked)
    }

    private func walk(_ id: ChunkID, level: Int, into ids: inout Set<ChunkID>, walked: inout Set<ChunkID>) throws {
        guard !id.isZero, walked.insert(id).inserted else { return }
        ids.insert(id)
        let bytes = try chunks.read(id)
        try bytes.withUnsafeBytes { raw in
            for i in 0..<(raw.count / 32) {
                let child = ChunkID(raw, at: i * 32)
                if level == 0 {
                    if !child.isZero { ids.insert(child) }
                } else {
                    try walk(child, level: level - 1, into: &ids, walked: &walked)
                }
            }
        }
    }

    /// Removes chunks no point refers to: deletes packs with no live chunk, copies the live
    /// chunks of packs that are more than a twentieth dead into new packs, and deletes packs left unindexed by
    /// interrupted backups once they are older than `grace`. Safe beside backups, mounts and
    /// restores: see docs/FORMAT.md, "Garbage collection".
    public func collectGarbage(dryRun: Bool = false, grace: TimeInterval = 3600, rewriteBelow: Double = 0.95,
                               now: Date = Date()) throws(VaultError) -> GCReport {
        let started = Date()
        var report = GCReport()
        report.dryRun = dryRun
        // One collector at a time; backups never wait for it.
        let lock = try MachineLock.acquire(object: Vault.gcPrefix + "lock", label: "garbage collection", operation: "gc", store: store)
        defer { lock.release() }
        chunks.refresh()

        // Plans from earlier runs first: they may be due now.
        if !dryRun {
            for (name, plan) in try plans() where try !blockedByBackups(plan) {
                try execute(plan, name: name, report: &report)
            }
        }

        // Mark.
        let (live, pointCount) = try liveChunks()
        report.points = pointCount
        report.liveChunks = live.count

        // Sweep candidates, from the index objects (what packs hold) and the pack listing.
        let indexListing: [ObjectInfo]
        let packListing: [ObjectInfo]
        do {
            indexListing = try store.list(prefix: IndexObject.prefix)
            packListing = try store.list(prefix: "packs/")
        } catch { throw .store(error) }
        var holds: [ChunkID: [PackEntry]] = [:]
        for object in indexListing {
            do {
                let index = try IndexObject.decode(try store.get(object.name), name: object.name)
                for (pack, entries) in index.packs { holds[pack] = entries }
            } catch let error as ChunkStoreError {
                throw .chunks(error)  // a damaged index: run `check`, gc must not guess
            } catch let error as ObjectStoreError {
                if case .notFound = error { continue }
                throw .store(error)
            } catch {}
        }
        let pending = try packsPendingDeletion()
        var sizes: [ChunkID: UInt64] = [:]
        var orphans: [ChunkID] = []
        for object in packListing {
            guard let id = PackFormat.id(fromObjectName: object.name) else { continue }
            sizes[id] = object.size
            if holds[id] == nil && !pending.contains(id) && now.timeIntervalSince1970 - object.modified > grace {
                orphans.append(id)
            }
        }
        report.packs = sizes.count

        // A pack retires when less than `rewriteBelow` of its bytes are live (by default: more
        // than a twentieth is dead, so that gc frees nearly all of what the removed points held);
        // its live chunks are copied unless another pack that stays already holds them.
        var retiring = Set<ChunkID>()
        var dead: [ChunkID] = []
        for (pack, entries) in holds where sizes[pack] != nil && !pending.contains(pack) {
            let total = entries.reduce(UInt64(0)) { $0 + UInt64($1.storedLength) }
            let liveBytes = entries.reduce(UInt64(0)) { $0 + (live.contains($1.id) ? UInt64($1.storedLength) : 0) }
            if liveBytes == 0 {
                dead.append(pack)
                retiring.insert(pack)
            } else if Double(liveBytes) < Double(total) * rewriteBelow {
                retiring.insert(pack)
            }
        }
        // Only a pack that exists holds a copy: an index object may still name one that is gone.
        var heldElsewhere = Set<ChunkID>()
        for (pack, entries) in holds where sizes[pack] != nil && !retiring.contains(pack) && !pending.contains(pack) {
            for entry in entries where live.contains(entry.id) { heldElsewhere.insert(entry.id) }
        }
        let rewritten = retiring.subtracting(dead)
        report.packsDeleted = dead.count
        report.packsRewritten = rewritten.count
        report.orphanPacksDeleted = orphans.count

        if dryRun {
            report.bytesDeleted = (retiring.union(orphans)).reduce(0) { $0 + (sizes[$1] ?? 0) }
            for pack in rewritten {
                for entry in holds[pack] ?? [] where live.contains(entry.id) && !heldElsewhere.contains(entry.id) {
                    report.bytesCopied += UInt64(entry.storedLength)
                }
            }
            report.bytesFreed = report.bytesDeleted > report.bytesCopied ? report.bytesDeleted - report.bytesCopied : 0
            report.seconds = Date().timeIntervalSince(started)
            return report
        }

        // Copy the live chunks of rewritten packs, as stored, into new packs.
        if !rewritten.isEmpty {
            let writer = chunks.writer()
            var copied = Set<ChunkID>()
            do {
                for pack in rewritten.sorted() {
                    if Cancellation.requested { throw VaultError.interrupted }
                    let name = PackFormat.objectName(pack)
                    for entry in holds[pack] ?? [] where live.contains(entry.id) && !heldElsewhere.contains(entry.id) && !copied.contains(entry.id) {
                        guard entry.storedLength <= ChunkStore.maximumStoredLength else {
                            throw VaultError.chunks(.damagedChunk(entry.id, pack: name, offset: entry.offset,
                                                                  reason: "its index entry gives a stored length of \(entry.storedLength) bytes"))
                        }
                        let stored = try store.read(name, at: UInt64(entry.offset), count: Int(entry.storedLength))
                        try writer.add(id: entry.id, stored: stored, rawLength: Int(entry.rawLength), flags: entry.flags)
                        copied.insert(entry.id)
                        report.bytesCopied += UInt64(entry.storedLength)
                    }
                }
                _ = try writer.finish()
            } catch {
                writer.abandon()
                if let error = error as? VaultError { throw error }
                if let error = error as? ChunkStoreError { throw .chunks(error) }
                if let error = error as? ObjectStoreError { throw .store(error) }
                throw .invalidArgument("\(error)")
            }
        }

        // The plan is written before anything is deleted.
        let candidates = retiring.union(orphans)
        guard !candidates.isEmpty else {
            report.bytesFreed = report.bytesDeleted > report.bytesCopied ? report.bytesDeleted - report.bytesCopied : 0
            report.seconds = Date().timeIntervalSince(started)
            return report
        }
        // Stamped when written, not when this run began: a backup that took its lock after this
        // moment reads the plan; one that took it before holds the deletion back.
        let written = Date()
        let plan = GCPlan(created: Timestamp.format(written), packs: candidates.map(\.hex).sorted())
        let bytes = Array((try? JSONEncoder().encode(plan)) ?? Data())
        let name = Vault.gcPrefix + "plan-" + Timestamp.format(written).filter { $0.isNumber } + "-" + ChunkID.sha256(bytes).hex.prefix(16)
        do {
            try store.put(name, bytes)
        } catch { throw .store(error) }
        if try blockedByBackups(plan) {
            report.deferred = true
        } else {
            try execute(plan, name: name, report: &report)
        }
        report.bytesFreed = report.bytesDeleted > report.bytesCopied ? report.bytesDeleted - report.bytesCopied : 0
        report.seconds = Date().timeIntervalSince(started)
        return report
    }

    /// True while a backup that started before the plan was written still runs: it may have
    /// chosen to reuse a chunk from one of the plan's packs. A lock whose holder is gone (dead
    /// process, or no heartbeat for half an hour) does not count.
    private func blockedByBackups(_ plan: GCPlan) throws(VaultError) -> Bool {
        guard let created = Timestamp.parse(plan.created) else { return true }
        let locks: [ObjectInfo]
        do {
            locks = try store.list(prefix: "locks/")
        } catch { throw .store(error) }
        for lock in locks {
            let bytes: [UInt8]
            do {
                bytes = try store.get(lock.name)
            } catch {
                if case .notFound = error { continue }  // released since the listing
                return true  // unknown: wait rather than guess
            }
            guard let holder = try? JSONDecoder().decode(MachineLock.Holder.self, from: Data(bytes)),
                  let since = Timestamp.parse(holder.started) else { return true }
            if since <= created.addingTimeInterval(1) && !holder.isStale { return true }
        }
        return false
    }

    /// Deletes a plan's packs that are still unneeded: index objects first (rewritten without
    /// them), then the packs, then the plan. Running it again after a crash finishes the job.
    private func execute(_ plan: GCPlan, name: String, report: inout GCReport) throws(VaultError) {
        // Marked again: a backup that finished since the plan was made may use its chunks.
        let (live, _) = try liveChunks()
        var doomed = Set(plan.packs.compactMap { ChunkID(hex: $0) })
        do {
            var indexes: [(name: String, index: IndexObject)] = []
            for object in try store.list(prefix: IndexObject.prefix) {
                do {
                    indexes.append((object.name, try IndexObject.decode(try store.get(object.name), name: object.name)))
                } catch let error as ObjectStoreError {
                    if case .notFound = error { continue }
                    throw error
                }
            }
            // Only packs that exist hold copies: an index object may still name one that is gone.
            let present = Set(try store.list(prefix: "packs/").compactMap { PackFormat.id(fromObjectName: $0.name) })
            var entriesOf: [ChunkID: [PackEntry]] = [:]
            for (_, index) in indexes {
                for (pack, entries) in index.packs where present.contains(pack) || doomed.contains(pack) { entriesOf[pack] = entries }
            }
            // A doomed pack holding a live chunk that no surviving pack holds is spared.
            while true {
                var outside = Set<ChunkID>()
                for (pack, entries) in entriesOf where !doomed.contains(pack) { for e in entries { outside.insert(e.id) } }
                let needed = doomed.filter { pack in
                    (entriesOf[pack] ?? []).contains { live.contains($0.id) && !outside.contains($0.id) }
                }
                if needed.isEmpty { break }
                doomed.subtract(needed)
            }
            for (old, index) in indexes where index.packs.contains(where: { doomed.contains($0.pack) }) {
                let keep = index.packs.filter { !doomed.contains($0.pack) }
                if !keep.isEmpty {
                    let bytes = IndexObject(packs: keep).encode()
                    try store.put(IndexObject.objectName(for: bytes), bytes)
                }
                try store.delete(old)
            }
            for pack in doomed.sorted() {
                if Cancellation.requested { throw VaultError.interrupted }
                let object = PackFormat.objectName(pack)
                let size = try store.size(object) ?? 0
                try store.delete(object)
                report.bytesDeleted += size
            }
            try store.delete(name)
        } catch let error as VaultError {
            throw error
        } catch let error as ObjectStoreError {
            throw .store(error)
        } catch let error as ChunkStoreError {
            throw .chunks(error)
        } catch {
            throw .invalidArgument("\(error)")
        }
        chunks.refresh()
    }
}
