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
    /// Each pack's modification time as listed when the plan was made (absent in older plans):
    /// a pack written again since (a backup that stored the same chunks in the same order makes
    /// a pack of the same name) is not the pack the plan judged, and is spared.
    public var modified: [String: Double]? = nil
}

/// The backups running when a plan was written (`gc/blockers-<the plan's name after "plan-">`):
/// the plan waits until each has finished. Recorded by identity, never by comparing times, which
/// would compare two hosts' clocks.
struct GCBlockers: Codable {
    struct Lock: Codable {
        var object: String
        /// The lock object's contents when the plan was written.
        var content: String
    }
    var locks: [Lock]
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
    /// Packs no index object listed that hold chunks points need and no other pack holds (an
    /// index object was lost): listed again by a new index object, and kept.
    public var orphanPacksIndexed = 0
    /// Live chunks whose every copy in the packs to rewrite failed to verify: those packs are
    /// kept as they are (`check --read-data` names the damage).
    public var damagedChunks = 0
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
        var live = Set<ChunkID>(), walked = Set<WalkedNode>()
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

    /// An index node as walked: the same bytes mean other children at another level.
    struct WalkedNode: Hashable {
        let id: ChunkID
        let level: Int
    }

    /// Adds every chunk id a disk needs to `ids`: its index nodes and its slots' chunks.
    /// Nodes in `walked` (shared with another point) are not walked again. Nodes are tracked
    /// apart from `ids`, and by level: a slot whose bytes equal an index node has the node's id,
    /// and a leaf whose bytes equal a node of level 1 (a guest can write 2,048 slots whose ids
    /// are another disk's leaves) has that node's id; taking either for walked would leave the
    /// node's children unmarked, and gc would delete them.
    func collectChunkIDs(of disk: PointDisk, into ids: inout Set<ChunkID>, walked: inout Set<WalkedNode>) throws {
        try walk(disk.root, level: disk.indexDepth - 1, into: &ids, walked: &walked)
    }

    private func walk(_ id: ChunkID, level: Int, into ids: inout Set<ChunkID>, walked: inout Set<WalkedNode>) throws {
        guard !id.isZero, walked.insert(WalkedNode(id: id, level: level)).inserted else { return }
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
            let pending = try plans()
            for (name, plan) in pending where try !blockedByBackups(planNamed: name) {
                try execute(plan, name: name, lock: lock, report: &report)
            }
            // Blockers of plans that are gone (a gc died between the two deletions).
            do {
                let planNames = Set(pending.map(\.0))
                for object in try store.list(prefix: Vault.gcPrefix + "blockers-")
                where !planNames.contains(Vault.gcPrefix + "plan-" + object.name.dropFirst((Vault.gcPrefix + "blockers-").count)) {
                    try store.delete(object.name)
                }
            } catch { throw .store(error) }
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
        // An unindexed pack is usually what an interrupted backup left, its chunks written again
        // since or never needed. One that holds a chunk a point needs and no indexed pack holds
        // is the only copy (its index object was lost): it is listed again, not deleted.
        var unneeded: [ChunkID] = []
        for pack in orphans {
            guard let entries = try readableDirectory(PackFormat.objectName(pack), size: sizes[pack] ?? 0) else {
                unneeded.append(pack)
                continue
            }
            var needed = false
            for entry in entries where live.contains(entry.id) {
                let located: ChunkLocation?
                do { located = try chunks.location(entry.id) } catch { throw .chunks(error) }
                if located.map({ sizes[$0.pack] == nil }) ?? true {
                    needed = true
                    break
                }
            }
            guard needed else {
                unneeded.append(pack)
                continue
            }
            if !dryRun {
                let bytes = IndexObject(packs: [(pack, entries)]).encode()
                do {
                    try store.put(IndexObject.objectName(for: bytes), bytes)
                } catch { throw .store(error) }
            }
            report.orphanPacksIndexed += 1
        }
        orphans = unneeded
        if report.orphanPacksIndexed > 0 && !dryRun { chunks.refresh() }

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

        // Copy the live chunks of rewritten packs, as stored, into new packs. Each copy is opened
        // and checked against its id first: the old packs go, so a copy of damaged bytes would
        // make the damage permanent where another copy, or the pack left as it is, keeps it
        // repairable. A chunk with no good copy keeps every pack to retire that holds it.
        if !rewritten.isEmpty {
            // Never a copy under the name of a pack that is to go (its own plan's or another's).
            let writer = chunks.writer(avoiding: retiring.union(orphans).union(pending))
            var copied = Set<ChunkID>()
            var damaged: [ChunkID: [ChunkID]] = [:]   // chunk -> packs whose copy failed
            let decompressor = ChunkDecompressor()
            var opened = [UInt8]()
            do {
                for pack in rewritten.sorted() {
                    if Cancellation.requested { throw VaultError.interrupted }
                    let name = PackFormat.objectName(pack)
                    for entry in holds[pack] ?? [] where live.contains(entry.id) && !heldElsewhere.contains(entry.id) && !copied.contains(entry.id) {
                        guard entry.storedLength <= ChunkStore.maximumStoredLength, entry.rawLength <= ChunkStore.maximumRawLength else {
                            damaged[entry.id, default: []].append(pack)
                            continue
                        }
                        let stored = try store.read(name, at: UInt64(entry.offset), count: Int(entry.storedLength))
                        if opened.count < Int(entry.rawLength) { opened = [UInt8](repeating: 0, count: Int(entry.rawLength)) }
                        let location = ChunkLocation(pack: pack, offset: entry.offset, storedLength: entry.storedLength,
                                                     rawLength: entry.rawLength, flags: entry.flags)
                        let good: Bool = stored.withUnsafeBytes { raw in
                            opened.withUnsafeMutableBytes { out in
                                (try? ChunkStore.open(id: entry.id, location: location, stored: raw,
                                                      into: UnsafeMutableRawBufferPointer(rebasing: out[0..<Int(entry.rawLength)]),
                                                      decompressor: decompressor)) != nil
                            }
                        }
                        guard good else {
                            damaged[entry.id, default: []].append(pack)
                            continue
                        }
                        try writer.add(id: entry.id, stored: stored, rawLength: Int(entry.rawLength), flags: entry.flags)
                        copied.insert(entry.id)
                        report.bytesCopied += UInt64(entry.storedLength)
                    }
                }
                _ = try writer.finish()
                for (id, packs) in damaged where !copied.contains(id) {
                    report.damagedChunks += 1
                    retiring.subtract(packs)
                }
                report.packsRewritten = retiring.subtracting(dead).count
            } catch {
                writer.abandon()
                if let error = error as? VaultError { throw error }
                if let error = error as? ChunkStoreError { throw .chunks(error) }
                if let error = error as? ObjectStoreError { throw .store(error) }
                throw .invalidArgument("\(error)")
            }
        }

        // The plan is written before anything is deleted, and only while this gc holds its lock
        // (a collector paused for half an hour lost it to another, whose plan may count on packs
        // this one would delete).
        try lock.confirm()
        let candidates = retiring.union(orphans)
        guard !candidates.isEmpty else {
            report.bytesFreed = report.bytesDeleted > report.bytesCopied ? report.bytesDeleted - report.bytesCopied : 0
            report.seconds = Date().timeIntervalSince(started)
            return report
        }
        let written = Date()
        var modified: [String: Double] = [:]
        for object in packListing {
            if let id = PackFormat.id(fromObjectName: object.name), candidates.contains(id) { modified[id.hex] = object.modified }
        }
        let plan = GCPlan(created: Timestamp.format(written), packs: candidates.map(\.hex).sorted(), modified: modified)
        let bytes = Array((try? JSONEncoder().encode(plan)) ?? Data())
        let name = Vault.gcPrefix + "plan-" + Timestamp.format(written).filter { $0.isNumber } + "-" + ChunkID.sha256(bytes).hex.prefix(16)
        // Then the backups running now: they may have started before the plan and chosen to reuse
        // a chunk of its packs. One that takes its lock after this listing reads the plan.
        do {
            try store.put(name, bytes)
        } catch { throw .store(error) }
        _ = try recordBlockers(ofPlan: name)
        if try blockedByBackups(planNamed: name) {
            report.deferred = true
        } else {
            try execute(plan, name: name, lock: lock, report: &report)
        }
        report.bytesFreed = report.bytesDeleted > report.bytesCopied ? report.bytesDeleted - report.bytesCopied : 0
        report.seconds = Date().timeIntervalSince(started)
        return report
    }

    static func blockersName(ofPlan plan: String) -> String {
        gcPrefix + "blockers-" + plan.dropFirst((gcPrefix + "plan-").count)
    }

    /// Records the backups running now as the plan's blockers; returns them.
    private func recordBlockers(ofPlan name: String) throws(VaultError) -> [GCBlockers.Lock] {
        let running = try runningBackups()
        let record = Array((try? JSONEncoder().encode(GCBlockers(locks: running))) ?? Data())
        do {
            try store.put(Vault.blockersName(ofPlan: name), record)
        } catch { throw .store(error) }
        return running
    }

    /// The backups (machine locks) that run now; a lock whose holder is gone (dead process on
    /// this host, or no heartbeat for half an hour) does not count, one that cannot be read does.
    private func runningBackups() throws(VaultError) -> [GCBlockers.Lock] {
        let locks: [ObjectInfo]
        do {
            locks = try store.list(prefix: "locks/")
        } catch { throw .store(error) }
        var running: [GCBlockers.Lock] = []
        for lock in locks {
            let bytes: [UInt8]
            do {
                bytes = try store.get(lock.name)
            } catch {
                if case .notFound = error { continue }  // released since the listing
                throw .store(error)
            }
            if let holder = try? JSONDecoder().decode(MachineLock.Holder.self, from: Data(bytes)), holder.isStale { continue }
            running.append(GCBlockers.Lock(object: lock.name, content: String(decoding: bytes, as: UTF8.self)))
        }
        return running
    }

    /// True while a backup that was running when the plan was written still runs: it may have
    /// chosen to reuse a chunk from one of the plan's packs. A plan whose record of those backups
    /// is missing (a gc died in between) waits until no backup runs.
    private func blockedByBackups(planNamed name: String) throws(VaultError) -> Bool {
        let record: GCBlockers
        do {
            record = try JSONDecoder().decode(GCBlockers.self, from: Data(try store.get(Vault.blockersName(ofPlan: name))))
        } catch let error as ObjectStoreError {
            guard case .notFound = error else { throw .store(error) }
            // Written by a gc that died before recording (or by an earlier version): recorded
            // now. A superset of what the plan had to wait for: backups that began since read
            // the plan; those that finished before now left their manifests for the second mark.
            // Without it the plan would wait until no backup at all runs, for ever in a busy vault.
            return try !recordBlockers(ofPlan: name).isEmpty
        } catch {
            return try !runningBackups().isEmpty
        }
        for lock in record.locks {
            let bytes: [UInt8]
            do {
                bytes = try store.get(lock.object)
            } catch {
                if case .notFound = error { continue }  // finished
                return true  // unknown: wait rather than guess
            }
            let then = try? JSONDecoder().decode(MachineLock.Holder.self, from: Data(lock.content.utf8))
            let now = try? JSONDecoder().decode(MachineLock.Holder.self, from: Data(bytes))
            if let then, let now {
                if now.isSame(as: then) && !now.isStale { return true }
            } else if String(decoding: bytes, as: UTF8.self) == lock.content {
                return true  // an unreadable lock, unchanged
            }
        }
        return false
    }

    /// A pack's own directory; nil when the pack is damaged or gone. A store that fails to answer
    /// stops gc: taken for "holds nothing", the only copy of a live chunk would be deleted.
    private func readableDirectory(_ name: String, size: UInt64) throws(VaultError) -> [PackEntry]? {
        do {
            return try chunks.packDirectory(name, size: size)
        } catch {
            switch error {
            case .badPack, .store(.notFound): return nil
            case .store(let failure): throw .store(failure)
            default: throw .chunks(error)
            }
        }
    }

    /// Deletes a plan's packs that are still unneeded: index objects first (rewritten without
    /// them), then the packs, then the plan. Running it again after a crash finishes the job.
    private func execute(_ plan: GCPlan, name: String, lock: MachineLock, report: inout GCReport) throws(VaultError) {
        // Marked again: a backup that finished since the plan was made may use its chunks.
        let (live, _) = try liveChunks()
        var doomed = Set(plan.packs.compactMap { ChunkID(hex: $0) })
        // Packs other plans will delete are no surviving copy: two plans that each count on the
        // other's pack would delete both.
        let otherPlans = Set(try plans().filter { $0.0 != name }.flatMap { $0.1.packs.compactMap { ChunkID(hex: $0) } })
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
            let listing = try store.list(prefix: "packs/")
            let present = Set(listing.compactMap { PackFormat.id(fromObjectName: $0.name) })
            if let recorded = plan.modified {
                for object in listing {
                    guard let id = PackFormat.id(fromObjectName: object.name), doomed.contains(id),
                          let then = recorded[id.hex], then != object.modified else { continue }
                    doomed.remove(id)
                }
            }
            var entriesOf: [ChunkID: [PackEntry]] = [:]
            for (_, index) in indexes {
                for (pack, entries) in index.packs where present.contains(pack) || doomed.contains(pack) { entriesOf[pack] = entries }
            }
            // A doomed pack no index object lists says what it holds in its own directory.
            for pack in doomed where entriesOf[pack] == nil && present.contains(pack) {
                let object = PackFormat.objectName(pack)
                if let size = try store.size(object), let entries = try readableDirectory(object, size: size) { entriesOf[pack] = entries }
            }
            // A doomed pack holding a live chunk that no surviving pack holds is spared.
            while true {
                var outside = Set<ChunkID>()
                for (pack, entries) in entriesOf where !doomed.contains(pack) && !otherPlans.contains(pack) {
                    for e in entries { outside.insert(e.id) }
                }
                let needed = doomed.filter { pack in
                    (entriesOf[pack] ?? []).contains { live.contains($0.id) && !outside.contains($0.id) }
                }
                if needed.isEmpty { break }
                doomed.subtract(needed)
            }
            try lock.confirm()
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
            try store.delete(Vault.blockersName(ofPlan: name))
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
