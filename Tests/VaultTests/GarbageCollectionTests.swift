import ChunkStore
import Foundation
import ObjectStore
import Synchronization
import SystemIO
import Testing
import TestSupport
@testable import Vault

func storedPackBytes(_ vault: String) throws -> UInt64 {
    try LocalDirectoryStore(root: vault).list(prefix: "packs/").reduce(0) { $0 + $1.size }
}

@Suite(.serialized) struct GarbageCollectionTests {
    /// Day 0 to day 5 with 25% of the disk rewritten each day, keep the last two, gc.
    @Test func gcFreesWhatOnlyRemovedPointsHeld() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        let vault = try f.create()
        let disk = f.dir.file("d.img")
        var random = SeededBytes(seed: 11)
        try writeAt(disk, 0, random.bytes(8 << 20))
        var hashes: [String: String] = [:]
        for day in 0..<6 {
            if day > 0 { try writeAt(disk, UInt64(day % 4) * (2 << 20), random.bytes(2 << 20)) }
            let report = try vault.backup(BackupRequest(machine: "m", disks: [("os", .path(disk))],
                                                        time: Date(timeIntervalSince1970: Double(day) * 86400)))
            hashes[report.point] = try sha256(file: disk)
        }
        let before = try storedPackBytes(f.vaultPath)
        try vault.setPolicy(RetentionPolicy(keepLast: 2), machine: "m")
        #expect(try vault.prune(dryRun: false).removed == 4)
        let dry = try vault.collectGarbage(dryRun: true)
        #expect(try storedPackBytes(f.vaultPath) == before)
        let report = try vault.collectGarbage()
        #expect(!report.deferred)
        #expect(report.bytesFreed == dry.bytesFreed || report.bytesFreed > 0)
        let after = try storedPackBytes(f.vaultPath)
        // Two points of an 8 MiB random disk that share 6 MiB: about 10 MiB stay.
        #expect(after < 12 << 20, "\(after) bytes left of \(before)")
        #expect(before - after >= UInt64(Double(before - (10 << 20)) * 0.9))
        #expect(try f.open().check(readData: true).ok)
        for point in try f.open().points() {
            let out = f.dir.file("out-" + point.shortID)
            _ = try f.open().restore(point: point, disk: "os", to: out)
            #expect(try sha256(file: out) == hashes[point.id])
        }
        // A second run finds nothing more.
        #expect(try f.open().collectGarbage().bytesFreed == 0)
    }

    /// A guest that writes another disk's index leaves into its own slots makes its leaf node the
    /// other disk's level-1 node, byte for byte. Walked first, as a leaf, that node's children
    /// were marked as data and never walked: the other disk's data chunks looked dead to gc.
    @Test func aLeafThatIsAnotherDisksInnerNodeKeepsItsChildren() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        let vault = try f.create()
        // The victim: 2,049 slots (index depth 2), data in the first and the last (100 bytes).
        let victim = f.dir.file("victim.img")
        var random = SeededBytes(seed: 21)
        try writeAt(victim, 0, random.bytes(65536))
        try writeAt(victim, 2048 * 65536, random.bytes(100))
        _ = try vault.backup(BackupRequest(machine: "victim", disks: [("os", .path(victim))]))
        let disk = try #require(try vault.points(machine: "victim").first?.disks.first)
        #expect(disk.indexDepth == 2)
        let root = try vault.chunks.read(try #require(ChunkID(hex: disk.indexRoot)))
        #expect(root.count == 64)
        let leafIDs = root.withUnsafeBytes { raw in [0, 1].map { ChunkID(raw, at: $0 * 32) } }
        let leaves = try leafIDs.map { try vault.chunks.read($0) }
        // The attacker: a disk of those two leaves; its only leaf has the bytes of the victim's root.
        let attacker = f.dir.file("attacker.img")
        try writeAt(attacker, 0, leaves[0] + leaves[1])
        _ = try vault.backup(BackupRequest(machine: "attacker", disks: [("os", .path(attacker))]))
        #expect(try vault.points(machine: "attacker").first?.disks.first?.indexRoot == disk.indexRoot)
        _ = try vault.collectGarbage(grace: 0)
        let out = f.dir.file("out.img")
        _ = try f.open().restore(point: try f.open().point("victim"), disk: "os", to: out)
        #expect(try sha256(file: out) == sha256(file: victim))
        #expect(try f.open().check(readData: true).ok)
    }

    /// A pack whose index object was lost holds the only copies of chunks a point needs: gc
    /// lists it again instead of deleting it as left by an interrupted backup.
    @Test func anUnindexedPackThatPointsNeedIsIndexedAgainNotDeleted() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        let vault = try f.create()
        let disk = f.dir.file("d.img")
        var random = SeededBytes(seed: 31)
        try writeAt(disk, 0, random.bytes(40 << 20))
        _ = try vault.backup(BackupRequest(machine: "m", disks: [("os", .path(disk))]))
        // The index objects again without one pack that holds data chunks only.
        let store = LocalDirectoryStore(root: f.vaultPath)
        var lost: ChunkID? = nil
        for object in try store.list(prefix: IndexObject.prefix) {
            let index = try IndexObject.decode(try store.get(object.name), name: object.name)
            guard lost == nil, let pack = index.packs.first(where: { $0.entries.allSatisfy { $0.flags.content == ChunkFlags.dataChunk } })?.pack
            else { continue }
            lost = pack
            let bytes = IndexObject(packs: index.packs.filter { $0.pack != pack }).encode()
            try store.put(IndexObject.objectName(for: bytes), bytes)
            try store.delete(object.name)
        }
        let pack = try #require(lost)
        let damaged = try f.open().check(readData: false)
        #expect(!damaged.ok)
        let report = try f.open().collectGarbage(grace: 0)
        #expect(report.orphanPacksIndexed == 1)
        #expect(report.orphanPacksDeleted == 0)
        #expect(try store.size(PackFormat.objectName(pack)) != nil)
        let out = f.dir.file("out.img")
        _ = try f.open().restore(point: try f.open().point("m"), disk: "os", to: out)
        #expect(try sha256(file: out) == sha256(file: disk))
        let check = try f.open().check(readData: true)
        #expect(check.ok && check.warnings.isEmpty, "\(check.errors) \(check.warnings)")
    }

    /// The live chunks of a pack gc rewrites are checked before they are copied: a damaged one is
    /// not copied (its damage would outlive the pack that could still be repaired), and its pack
    /// stays as it is.
    @Test func aDamagedChunkIsNotCopiedAndItsPackStays() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        let vault = try f.create()
        let disk = f.dir.file("d.img")
        var random = SeededBytes(seed: 41)
        let first = random.bytes(65536)
        try writeAt(disk, 0, first + random.bytes((8 << 20) - 65536))
        _ = try vault.backup(BackupRequest(machine: "m", disks: [("os", .path(disk))],
                                           time: Date(timeIntervalSince1970: 86400)))
        try writeAt(disk, 2 << 20, random.bytes(6 << 20))
        _ = try vault.backup(BackupRequest(machine: "m", disks: [("os", .path(disk))],
                                           time: Date(timeIntervalSince1970: 2 * 86400)))
        try vault.setPolicy(RetentionPolicy(keepLast: 1), machine: "m")
        #expect(try vault.prune(dryRun: false).removed == 1)
        // One byte of the first slot's stored bytes, which both points shared, flipped.
        let location = try #require(try vault.chunks.location(ChunkID.sha256(first)))
        let path = f.vaultPath + "/" + PackFormat.objectName(location.pack)
        let at = UInt64(location.offset) + UInt64(location.storedLength / 2)
        let byte = try Data(contentsOf: URL(fileURLWithPath: path))[Int(at)]
        try writeAt(path, at, [byte ^ 0x40])
        let report = try f.open().collectGarbage()
        #expect(report.damagedChunks == 1)
        #expect(FileSystem.exists(path))
        // The damage is where it was, named by check; the rest of the point was copied and reads.
        let check = try f.open().check(readData: true)
        #expect(check.damaged.count == 1 && check.damaged.first?.start == 0 && (check.damaged.first?.end ?? 0) < 65536 + 1,
                "\(check.damaged)")
        #expect(throws: VaultError.self) {
            _ = try f.open().restore(point: try f.open().point("m"), disk: "os", to: f.dir.file("out.img"))
        }
    }

    /// A collector whose lock was taken over (it looked stale: paused for half an hour) stops
    /// before it writes a plan or deletes anything.
    @Test func aCollectorThatLostItsLockDeletesNothing() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        let local = LocalDirectoryStore(root: f.vaultPath)
        _ = try f.create()
        let store = HookedStore(local)
        let vault = try Vault.open(store: store, stateDirectory: f.state)
        let disk = f.dir.file("d.img")
        var random = SeededBytes(seed: 51)
        try writeAt(disk, 0, random.bytes(4 << 20))
        for day in 0..<2 {
            try writeAt(disk, 0, random.bytes(3 << 20))
            _ = try vault.backup(BackupRequest(machine: "m", disks: [("os", .path(disk))],
                                               time: Date(timeIntervalSince1970: Double(day + 1) * 86400)))
        }
        try vault.setPolicy(RetentionPolicy(keepLast: 1), machine: "m")
        #expect(try vault.prune(dryRun: false).removed == 1)
        let before = try local.list(prefix: "packs/").map(\.name).sorted()
        // While gc sweeps, another collector takes its lock.
        store.hook.withLock {
            $0 = ("packs/", { () throws(ObjectStoreError) in
                let other = #"{"host":"elsewhere","pid":1,"started":"2026-01-01T00:00:00Z","operation":"gc","refreshed":"2026-01-01T00:00:00Z","token":"00"}"#
                try local.put("gc/lock", Array(other.utf8))
            })
        }
        #expect(throws: VaultError.self) { try vault.collectGarbage() }
        // It may have written copies; it deleted nothing, and wrote no plan.
        #expect(Set(before).isSubset(of: Set(try local.list(prefix: "packs/").map(\.name))))
        #expect(try local.list(prefix: "gc/plan-").isEmpty)
        #expect(try f.open().check(readData: true).ok)
    }

    /// A point whose manifest cannot be read is not a point without chunks: gc stops, names it,
    /// and deletes nothing; once the manifest is readable again the point restores.
    @Test func anUnreadableManifestStopsGarbageCollection() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        let vault = try f.create()
        let disk = f.dir.file("d.img")
        var random = SeededBytes(seed: 12)
        try writeAt(disk, 0, random.bytes(4 << 20))
        let first = try vault.backup(BackupRequest(machine: "m", disks: [("os", .path(disk))], time: Date(timeIntervalSince1970: 0)))
        let hash = try sha256(file: disk)
        try writeAt(disk, 0, random.bytes(4 << 20))
        _ = try vault.backup(BackupRequest(machine: "n", disks: [("os", .path(disk))], time: Date(timeIntervalSince1970: 86400)))
        let manifest = f.vaultPath + "/points/m/" + first.point
        let good = try Array(Data(contentsOf: URL(fileURLWithPath: manifest)))
        var bad = good
        bad[bad.count / 2] ^= 0x01
        try Data(bad).write(to: URL(fileURLWithPath: manifest))
        let before = try storedPackBytes(f.vaultPath)
        let reopened = try f.open()
        do throws(VaultError) {
            _ = try reopened.collectGarbage(grace: 0)
            Issue.record("gc must stop on a manifest it cannot read")
        } catch {
            #expect(error.description.contains(first.point) && error.description.contains("garbage collection"), "\(error.description)")
        }
        #expect(try storedPackBytes(f.vaultPath) == before)
        try Data(good).write(to: URL(fileURLWithPath: manifest))
        let out = f.dir.file("out.img")
        _ = try f.open().restore(point: try f.open().point("m@latest"), disk: "os", to: out)
        #expect(try sha256(file: out) == hash)
    }

    /// A backup that started before a gc plan holds its deletion back; a later gc completes it.
    @Test func deletionWaitsForBackupsThatStartedBeforeThePlan() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        let vault = try f.create()
        let disk = f.dir.file("d.img")
        try writeAt(disk, 0, randomBytes(seed: 12, count: 2 << 20))
        _ = try vault.backup(BackupRequest(machine: "a", disks: [("os", .path(disk))]))
        try writeAt(disk, 0, randomBytes(seed: 13, count: 2 << 20))
        _ = try vault.backup(BackupRequest(machine: "a", disks: [("os", .path(disk))]))
        try vault.setPolicy(RetentionPolicy(keepLast: 1), machine: "a")
        _ = try vault.prune(dryRun: false)
        // A backup of another machine "started" a minute ago and still runs.
        let running = #"{"host":"\#(hostName())","pid":\#(getpid()),"started":"\#(Timestamp.format(Date().addingTimeInterval(-60)))","operation":"backup"}"#
        try LocalDirectoryStore(root: f.vaultPath).put("locks/b", Array(running.utf8))
        let before = try storedPackBytes(f.vaultPath)
        let first = try vault.collectGarbage()
        #expect(first.deferred)
        #expect(try storedPackBytes(f.vaultPath) == before)
        // While the plan waits, new backups do not reuse the chunks it names.
        #expect(try !vault.packsPendingDeletion().isEmpty)
        try LocalDirectoryStore(root: f.vaultPath).delete("locks/b")
        let second = try vault.collectGarbage()
        #expect(!second.deferred)
        #expect(second.bytesFreed > 0)
        #expect(try vault.packsPendingDeletion().isEmpty)
        #expect(try f.open().check(readData: true).ok)
    }

    /// A backup on a host whose clock is ten minutes ahead "started" after the plan by the
    /// plan's clock; it still holds the deletion back (compared by time, it did not).
    @Test func aBackupOnAHostWhoseClockIsAheadHoldsThePlanBack() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        let vault = try f.create()
        let disk = f.dir.file("d.img")
        for seed in [14, 15] as [UInt64] {
            try writeAt(disk, 0, randomBytes(seed: seed, count: 2 << 20))
            _ = try vault.backup(BackupRequest(machine: "a", disks: [("os", .path(disk))]))
        }
        try vault.setPolicy(RetentionPolicy(keepLast: 1), machine: "a")
        _ = try vault.prune(dryRun: false)
        let ahead = Timestamp.format(Date().addingTimeInterval(600))
        let running = #"{"host":"elsewhere","pid":1,"started":"\#(ahead)","refreshed":"\#(ahead)","operation":"backup","token":"01"}"#
        let local = LocalDirectoryStore(root: f.vaultPath)
        try local.put("locks/b", Array(running.utf8))
        let before = try storedPackBytes(f.vaultPath)
        #expect(try vault.collectGarbage().deferred)
        #expect(try storedPackBytes(f.vaultPath) == before)
        #expect(try local.list(prefix: "gc/blockers-").count == 1)
        try local.delete("locks/b")
        let second = try vault.collectGarbage()
        #expect(!second.deferred && second.bytesFreed > 0)
        #expect(try local.list(prefix: "gc/").map(\.name).filter { $0 != "gc/lock" }.isEmpty)
        #expect(try f.open().check(readData: true).ok)
    }

    /// A plan without its record of running backups (a gc died between the two, or an earlier
    /// version wrote it) gets one from the backups running when it is found: a backup that
    /// began after that does not hold it back (it waited until no backup at all ran).
    @Test func aPlanWithoutItsBlockersRecordGetsOne() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        let vault = try f.create()
        let disk = f.dir.file("d.img")
        for seed in [18, 19] as [UInt64] {
            try writeAt(disk, 0, randomBytes(seed: seed, count: 2 << 20))
            _ = try vault.backup(BackupRequest(machine: "a", disks: [("os", .path(disk))]))
        }
        try vault.setPolicy(RetentionPolicy(keepLast: 1), machine: "a")
        _ = try vault.prune(dryRun: false)
        let local = LocalDirectoryStore(root: f.vaultPath)
        func lock(_ token: String) -> [UInt8] {
            let now = Timestamp.format(Date())
            return Array(#"{"host":"elsewhere","pid":1,"started":"\#(now)","refreshed":"\#(now)","operation":"backup","token":"\#(token)"}"#.utf8)
        }
        try local.put("locks/b", lock("04"))
        #expect(try vault.collectGarbage().deferred)
        for record in try local.list(prefix: "gc/blockers-") { try local.delete(record.name) }
        // Found again while b runs: recorded, and waits for b.
        let pending = try vault.packsPendingDeletion()
        let before = try storedPackBytes(f.vaultPath)
        _ = try vault.collectGarbage()
        #expect(try local.list(prefix: "gc/blockers-").count == 1)
        #expect(try vault.packsPendingDeletion() == pending)
        #expect(try storedPackBytes(f.vaultPath) == before)
        // b finished; another backup began since: it read the plan, so the plan goes ahead.
        try local.delete("locks/b")
        try local.put("locks/c", lock("05"))
        _ = try vault.collectGarbage()
        #expect(try vault.packsPendingDeletion().isEmpty)
        #expect(try storedPackBytes(f.vaultPath) < before)
        try local.delete("locks/c")
        #expect(try f.open().check(readData: true).ok)
    }

    /// A pack written again after a plan named it (a backup that stored the same chunks in the
    /// same order makes a pack of the same name) is not the pack the plan judged: spared.
    @Test func aPackWrittenAgainAfterThePlanIsSpared() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        let vault = try f.create()
        let disk = f.dir.file("d.img")
        for seed in [16, 17] as [UInt64] {
            try writeAt(disk, 0, randomBytes(seed: seed, count: 2 << 20))
            _ = try vault.backup(BackupRequest(machine: "a", disks: [("os", .path(disk))]))
        }
        try vault.setPolicy(RetentionPolicy(keepLast: 1), machine: "a")
        _ = try vault.prune(dryRun: false)
        let local = LocalDirectoryStore(root: f.vaultPath)
        let running = #"{"host":"elsewhere","pid":1,"started":"\#(Timestamp.format(Date()))","refreshed":"\#(Timestamp.format(Date()))","operation":"backup","token":"02"}"#
        try local.put("locks/b", Array(running.utf8))
        #expect(try vault.collectGarbage().deferred)
        let planned = try vault.packsPendingDeletion()
        let rewritten = try #require(planned.first)
        let name = PackFormat.objectName(rewritten)
        usleep(20_000)
        try local.put(name, try local.get(name))
        // The plan's blocker finished; another backup runs now (it holds back only a new plan).
        try local.delete("locks/b")
        try local.put("locks/c", Array(running.replacingOccurrences(of: "\"02\"", with: "\"03\"").utf8))
        #expect(try vault.collectGarbage().deferred)
        #expect(try local.size(name) != nil)
        #expect(try f.open().check(readData: true).ok)
    }

    /// Backups racing prune and gc, 50 rounds: every point a backup reported restores bit-exact.
    @Test func backupsRacingGarbageCollectionLoseNothing() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        _ = try f.create()
        let disk = f.dir.file("d.img")
        try writeAt(disk, 0, randomBytes(seed: 14, count: 1 << 20))
        let writer = try Vault.open(path: f.vaultPath, stateDirectory: f.dir.file("state-backup"))
        let collector = try Vault.open(path: f.vaultPath, stateDirectory: f.dir.file("state-gc"))
        try collector.setPolicy(RetentionPolicy(keepLast: 3), machine: "m")
        let made = Mutex<[String: String]>([:])
        let failures = Mutex<[String]>([])
        let done = Atomic<Bool>(false)
        let freed = Atomic<UInt64>(0)
        let gcThread = Thread {
            while !done.load(ordering: .relaxed) {
                do {
                    _ = try collector.prune(dryRun: false)
                    freed.add(try collector.collectGarbage(grace: 0).bytesFreed, ordering: .relaxed)
                } catch {
                    if case VaultError.locked = error { continue }
                    failures.withLock { $0.append("gc: \(error)") }
                }
                usleep(UInt32.random(in: 0...20_000))
            }
        }
        gcThread.start()
        var random = SeededBytes(seed: 15)
        for round in 0..<50 {
            try writeAt(disk, (random.next() % 16) * 65536, random.bytes(65536))
            let hash = try sha256(file: disk)
            let report = try writer.backup(BackupRequest(machine: "m", disks: [("os", .path(disk))],
                                                         time: Date(timeIntervalSince1970: Double(round) * 60)))
            made.withLock { $0[report.point] = hash }
            usleep(UInt32.random(in: 0...10_000))
        }
        done.store(true, ordering: .relaxed)
        while !gcThread.isFinished { usleep(10_000) }
        #expect(failures.withLock { $0 }.isEmpty)
        #expect(freed.load(ordering: .relaxed) > 0, "the collector really deleted packs during the race")
        let reader = try Vault.open(path: f.vaultPath, stateDirectory: f.dir.file("state-check"))
        let surviving = try reader.points(machine: "m")
        #expect(surviving.count >= 3)
        for point in surviving {
            let out = f.dir.file("out-" + point.shortID)
            _ = try reader.restore(point: point, disk: "os", to: out)
            #expect(try sha256(file: out) == made.withLock { $0[point.id] })
        }
        #expect(try reader.check(readData: true).ok)
    }
}

@Suite struct StatisticsTests {
    @Test func whatEachPointAloneHoldsIsWhatGCFrees() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        let vault = try f.create()
        let disk = f.dir.file("d.img")
        try writeAt(disk, 0, randomBytes(seed: 31, count: 4 << 20))
        _ = try vault.backup(BackupRequest(machine: "m", disks: [("os", .path(disk))], time: Date(timeIntervalSince1970: 0)))
        try writeAt(disk, 0, randomBytes(seed: 32, count: 3 << 20))
        _ = try vault.backup(BackupRequest(machine: "m", disks: [("os", .path(disk))], time: Date(timeIntervalSince1970: 60)))
        let stats = try vault.statistics()
        #expect(stats.points == 2)
        #expect(stats.logicalBytes == 8 << 20)
        #expect(stats.deduplication > 1.1)  // 8 MiB of data, 7 MiB distinct
        let first = try #require(stats.perPoint.first)
        // The first point alone holds 3 MiB of random (incompressible) chunks plus its index nodes.
        #expect(first.uniqueStoredBytes >= 3 << 20 && first.uniqueStoredBytes < (3 << 20) + 65536)
        try vault.setPolicy(RetentionPolicy(keepLast: 1), machine: "m")
        _ = try vault.prune(dryRun: false)
        let before = try storedPackBytes(f.vaultPath)
        _ = try vault.collectGarbage(grace: 0)
        let freed = before - (try storedPackBytes(f.vaultPath))
        // gc freed what stats said (its pack was mostly dead: the live quarter was copied).
        #expect(freed + 65536 >= first.uniqueStoredBytes)
        #expect(try vault.check(readData: true).ok)
    }
}

@Suite struct LockHeartbeatTests {
    func lock(host: String, started: Date, refreshed: Date?) -> [UInt8] {
        let refreshedField = refreshed.map { #","refreshed":"\#(Timestamp.format($0))""# } ?? ""
        return Array(#"{"host":"\#(host)","pid":1,"started":"\#(Timestamp.format(started))","operation":"backup"\#(refreshedField)}"#.utf8)
    }

    @Test func aLockWhoseHeartbeatStoppedIsTakenOverAndALongBackupThatBeatsIsNot() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        let vault = try f.create()
        let store = LocalDirectoryStore(root: f.vaultPath)
        let disk = try f.makeDisk("d.img", size: 1 << 20, seed: 5)
        // Another host crashed an hour ago in the middle of a backup.
        try store.put("locks/m", lock(host: "elsewhere", started: Date().addingTimeInterval(-7200), refreshed: Date().addingTimeInterval(-3600)))
        _ = try vault.backup(BackupRequest(machine: "m", disks: [("os", .path(disk))]))
        // Another host has been backing up for two days and is still alive.
        try store.put("locks/m", lock(host: "elsewhere", started: Date().addingTimeInterval(-172_800), refreshed: Date()))
        #expect { try vault.backup(BackupRequest(machine: "m", disks: [("os", .path(disk))])) } throws: { error in
            guard case VaultError.locked = error else { return false }
            return true
        }
        // ... and gc waits for it rather than taking its age for a crash.
        try writeAt(disk, 0, randomBytes(seed: 6, count: 1 << 20))
        _ = try vault.backup(BackupRequest(machine: "n", disks: [("os", .path(disk))]))
        try writeAt(disk, 0, randomBytes(seed: 7, count: 1 << 20))
        _ = try vault.backup(BackupRequest(machine: "n", disks: [("os", .path(disk))]))
        try vault.setPolicy(RetentionPolicy(keepLast: 1), machine: "n")
        _ = try vault.prune(machine: "n", dryRun: false)
        #expect(try vault.collectGarbage().deferred)
    }

    /// Takers racing for one stale lock: exactly one gets it, whatever the interleaving of their
    /// checks and deletes (with a check and then a delete, two could both hold it: seen).
    @Test func oneOfManyTakersOfAStaleLockWins() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        _ = try f.create()
        let store = LocalDirectoryStore(root: f.vaultPath)
        for round in 0..<30 {
            try store.put("locks/m", lock(host: "elsewhere", started: Date().addingTimeInterval(-7200), refreshed: Date().addingTimeInterval(-3600)))
            let winners = Mutex<[MachineLock]>([])
            let refused = Atomic<Int>(0)
            let takers = (0..<6).map { n in
                Worker(name: "taker-\(n)") {
                    do {
                        let held = try MachineLock.acquire(object: "locks/m", label: "m", operation: "backup", store: store, heartbeat: false)
                        winners.withLock { $0.append(held) }
                    } catch {
                        if case VaultError.locked = error { refused.add(1, ordering: .relaxed) }
                    }
                }
            }
            for taker in takers { taker.join() }
            let held = winners.withLock { $0 }
            #expect(held.count == 1 && refused.load(ordering: .relaxed) == 5, "round \(round): \(held.count) holders")
            for lock in held { lock.release() }
        }
    }

    /// A backup commits only while its lock is still its own: one taken over (its heartbeat
    /// failed, or another host judged it stale) may have let gc delete chunks it reused.
    @Test func aBackupWhoseLockWasTakenOverDoesNotCommit() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        _ = try f.create()
        let store = LocalDirectoryStore(root: f.vaultPath)
        let held = try MachineLock.acquire(machine: "m", operation: "backup", store: store)
        try held.confirm()
        try store.put("locks/m", lock(host: "elsewhere", started: Date(), refreshed: Date()))
        #expect { try held.confirm() } throws: { error in
            guard case VaultError.lockLost = error else { return false }
            return (error as! VaultError).description.contains("elsewhere")
        }
        // Releasing it leaves the new holder's lock alone.
        held.release()
        #expect(String(decoding: try store.get("locks/m"), as: UTF8.self).contains("elsewhere"))
        try store.delete("locks/m")
        #expect { try held.confirm() } throws: { error in
            guard case VaultError.lockLost = error else { return false }
            return true
        }
        // Its own lock it removes.
        let again = try MachineLock.acquire(machine: "m", operation: "backup", store: store)
        again.release()
        #expect(try store.size("locks/m") == nil)
    }
}
