import ChunkStore
import Foundation
import Glibc
import ObjectStore
import Synchronization
@testable import Sync
import SystemIO
import Testing
import TestSupport
import Vault
import VirtualDisk

/// A vault with three points of one disk (12 MiB + 5000 bytes: random data, holes, a short last
/// slot) and the images they were made from.
struct SyncFixture {
    let dir = TemporaryDirectory("sync")
    let vault: Vault
    /// The disk's image at day 0, 1 and 2.
    var days: [String] = []
    var hashes: [String] = []
    static let size: UInt64 = (12 << 20) + 5000

    init() throws {
        vault = try Vault.create(store: LocalDirectoryStore(root: dir.file("vault")), stateDirectory: dir.file("state"))
        var random = SeededBytes(seed: 7)
        let image = dir.file("disk.img")
        try setSize(image, SyncFixture.size)
        try writeAt(image, 0, random.bytes(5 << 20))          // 5 MiB data, then a hole
        try writeAt(image, 9 << 20, random.bytes(2 << 20))
        try writeAt(image, SyncFixture.size - 3000, random.bytes(3000))
        for day in 0..<3 {
            if day > 0 {
                // A day's changes: scattered 4 KiB blocks, a zeroed MiB, new data in the hole.
                for _ in 0..<20 { try writeAt(image, random.next() % (SyncFixture.size - 4096), random.bytes(4096)) }
                try writeAt(image, UInt64(day) << 20, [UInt8](repeating: 0, count: 1 << 20))
                try writeAt(image, UInt64(5 + day) << 20, random.bytes(300_000))
            }
            let copy = dir.file("day\(day).img")
            #expect(shell("cp --sparse=always \(image) \(copy)").status == 0)
            days.append(copy)
            hashes.append(try sha256(file: copy))
            _ = try vault.backup(BackupRequest(machine: "m", disks: [("os", .path(image))],
                                               time: Timestamp.parse("2026-03-0\(day + 1)T00:00:00Z")))
        }
    }

    var engine: SyncEngine { SyncEngine(stateDirectory: dir.file("state")) }

    /// An engine with 256 KiB batches and a checkpoint every MiB: a 12 MiB disk makes many.
    var smallBatchEngine: SyncEngine {
        var engine = self.engine
        engine.batchBytes = 256 << 10
        engine.writeBatchBytes = 256 << 10
        engine.streamJobBytes = 256 << 10
        engine.checkpointBytes = 1 << 20
        return engine
    }

    func source(_ day: Int) throws(SyncError) -> PointSource {
        try resolve("m@2026-03-0\(day + 1)T00:00:00Z", "os") as! PointSource
    }

    /// A copy of day `day`'s image as a target.
    func target(_ name: String, holding day: Int) throws -> String {
        let path = dir.file(name)
        #expect(shell("cp --sparse=always \(days[day]) \(path)").status == 0)
        return path
    }

    func resolve(_ spec: String, _ disk: String) throws(SyncError) -> any SyncSource {
        let point: RecoveryPoint
        do throws(VaultError) { point = try vault.point(spec) } catch { throw .source(error) }
        return try PointSource(vault: vault, point: point, disk: disk)
    }
}

/// A test source around a real one: what it does not say otherwise comes from `base`.
protocol WrappedSource: SyncSource {
    var base: any SyncSource { get }
}

extension WrappedSource {
    var label: String { base.label }
    var resumeSpec: String { base.resumeSpec }
    var diskName: String { base.diskName }
    var size: UInt64 { base.size }
    var chunkSize: Int { base.chunkSize }
}

/// A source for watching a delta that writes while it compares: the comparison of the second
/// half of the disk waits (up to 5 s) until the write pass has fetched something, and every
/// fetch checks that the journal already holds the records of the slots about to be written.
final class WatchedSource: WrappedSource {
    let base: any SyncSource
    let journalDirectory: String
    let fetched = Mutex(false)
    let problems = Mutex<[String]>([])
    private let condition = NSCondition()

    init(_ base: any SyncSource, journalDirectory: String) {
        self.base = base
        self.journalDirectory = journalDirectory
    }

    func ids(_ slots: Range<Int>) throws(SyncError) -> [ChunkID?] {
        if slots.lowerBound >= slotCount / 2 {
            condition.lock()
            let deadline = Date().addingTimeInterval(5)
            while !fetched.withLock({ $0 }) && condition.wait(until: deadline) {}
            condition.unlock()
            if !fetched.withLock({ $0 }) { problems.withLock { $0.append("slot \(slots.lowerBound) compared before any write") } }
        }
        return try base.ids(slots)
    }
    func read(_ slots: Range<Int>, into buffer: UnsafeMutableRawBufferPointer) throws(SyncError) {
        let recorded = journaledOffsets()
        for slot in slots where !recorded.contains(UInt64(slot) * UInt64(chunkSize)) {
            problems.withLock { $0.append("slot \(slot) fetched for writing before its undo record") }
        }
        try base.read(slots, into: buffer)
        condition.lock()
        fetched.withLock { $0 = true }
        condition.broadcast()
        condition.unlock()
    }

    /// The offsets of the data and zero records in the target's journal (docs/FORMAT.md,
    /// "Sync journals"): a 64-byte header, then records of a 64-byte header and a payload.
    func journaledOffsets() -> Set<UInt64> {
        // (The target's state directory: the one with a journal; `locks` holds the locks.)
        guard let name = (try? FileSystem.list(journalDirectory))?.first(where: { FileSystem.exists(journalDirectory + "/" + $0 + "/journal") }),
              let bytes = FileManager.default.contents(atPath: journalDirectory + "/" + name + "/journal") else { return [] }
        var offsets = Set<UInt64>()
        var at = 64
        while at + 64 <= bytes.count, bytes[at..<(at + 4)].elementsEqual(Array("LBJR".utf8)) {
            let kind = bytes[at + 4]
            let offset = bytes[(at + 8)..<(at + 16)].reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
            let length = bytes[(at + 16)..<(at + 20)].reversed().reduce(0) { $0 << 8 | Int($1) }
            if kind == 1 || kind == 2 { offsets.insert(offset) }
            at += 64 + (kind == 1 ? length : 0)
        }
        return offsets
    }
}

/// A source whose slot ids cannot be read (a damaged vault): the comparison fails at once.
final class UnreadableSource: WrappedSource {
    let base: any SyncSource
    init(_ base: any SyncSource) { self.base = base }
    func ids(_ slots: Range<Int>) throws(SyncError) -> [ChunkID?] { throw .invalidArgument("injected failure to read slot ids") }
    func read(_ slots: Range<Int>, into buffer: UnsafeMutableRawBufferPointer) throws(SyncError) { try base.read(slots, into: buffer) }
}

/// A source that fails (as a damaged vault would) once `budget` reads are spent, or hands out
/// wrong bytes for one slot: for interrupted syncs and verification failures.
final class FaultySource: WrappedSource {
    let base: any SyncSource
    let reads = Atomic<Int>(0)
    let budget: Int
    let corruptSlot: Int?

    init(_ base: any SyncSource, failAfterReads budget: Int = .max, corruptSlot: Int? = nil) {
        self.base = base
        self.budget = budget
        self.corruptSlot = corruptSlot
    }

    func ids(_ slots: Range<Int>) throws(SyncError) -> [ChunkID?] { try base.ids(slots) }
    func read(_ slots: Range<Int>, into buffer: UnsafeMutableRawBufferPointer) throws(SyncError) {
        if reads.add(1, ordering: .relaxed).newValue > budget { throw .invalidArgument("injected source failure") }
        try base.read(slots, into: buffer)
        if let corruptSlot, slots.contains(corruptSlot) {
            buffer[(corruptSlot - slots.lowerBound) * chunkSize] ^= 0xff
        }
    }
}

@Suite(.serialized) struct SyncTests {
    @Test func deltaAndFullOntoFilesGiveTheImageExactly() throws {
        let f = try SyncFixture()
        defer { f.dir.remove() }
        let engine = f.engine
        // delta onto the older points, full and delta onto new files.
        // Writing while comparing (the journal fits), and comparing first.
        for (old, new, overlap) in [(0, 2, true), (1, 2, true), (2, 0, true), (0, 1, true), (0, 2, false), (2, 1, false)] {
            let target = try f.target("t\(old)\(new)\(overlap).img", holding: old)
            var engine = engine
            engine.overlapWrites = overlap
            let report = try engine.sync(try f.source(new), to: target, mode: .delta)
            #expect(try sha256(file: target) == f.hashes[new])
            #expect(report.matchedBytes + report.transferredBytes == SyncFixture.size)
            #expect(report.transferredBytes < SyncFixture.size / 2, "a day's changes are small")
            #expect(report.journalBytes <= report.transferredBytes)
            #expect(try engine.status(target).condition == .consistent)
        }
        for mode in [SyncMode.full, .delta] {
            let target = f.dir.file("new-\(mode).img")
            let report = try engine.sync(try f.source(1), to: target, mode: mode, verify: true)
            #expect(report.created && report.verified && report.journalBytes == 0)
            #expect(try sha256(file: target) == f.hashes[1])
            // Zero slots stay holes: the image has about 7 MiB of data.
            #expect(allocatedBytes(target) < 9 << 20)
        }
        // Random bytes, larger (shrunk to the disk) and smaller (grown) files.
        let random = f.dir.file("random.img")
        try writeAt(random, 0, randomBytes(seed: 9, count: Int(SyncFixture.size)))
        let larger = try f.target("larger.img", holding: 0)
        try writeAt(larger, SyncFixture.size + 100_000, randomBytes(seed: 10, count: 200_000))
        let smaller = f.dir.file("smaller.img")
        try writeAt(smaller, 0, randomBytes(seed: 11, count: 3 << 20))
        for target in [random, larger, smaller] {
            for mode in [SyncMode.delta, .full] {
                let report = try engine.sync(try f.source(mode == .delta ? 2 : 1), to: target, mode: mode, verify: true)
                #expect(report.verified)
                #expect(try sha256(file: target) == f.hashes[mode == .delta ? 2 : 1])
                #expect(fileSize(target) == SyncFixture.size)
            }
        }
        // A sync onto a target that already holds the point writes nothing.
        let same = try engine.sync(try f.source(1), to: random, mode: .delta)
        #expect(same.writtenBytes == 0 && same.matchedBytes == SyncFixture.size)
    }

    /// The latest point's slot tags (recorded by the backup on this host) let a delta sync
    /// match a target's slots without SHA-256; a damaged record must only cost that shortcut.
    @Test func recordedSlotTagsMatchOnlyTheSourcesBytes() throws {
        let f = try SyncFixture()
        defer { f.dir.remove() }
        #expect(try f.source(2).recordedTags != nil, "the latest point's tags are recorded")
        #expect(try f.source(1).recordedTags == nil, "an older point's are not")
        let record = f.dir.file("state") + "/fingerprints/\(f.vault.config.id)/m/os"
        for damaged in [false, true] {
            if damaged {
                var tags = Array(try Data(contentsOf: URL(fileURLWithPath: record)).dropFirst(72))
                for i in tags.indices { tags[i] ^= 0x33 }
                try writeAt(record, 72, tags)
            }
            for old in [0, 1] {
                let target = try f.target("t\(old)-\(damaged).img", holding: old)
                let report = try f.engine.sync(try f.source(2), to: target, mode: .delta)
                #expect(try sha256(file: target) == f.hashes[2])
                #expect(report.matchedBytes + report.transferredBytes == SyncFixture.size)
                #expect(report.transferredBytes < SyncFixture.size / 2)
            }
        }
        // --verify does not trust the tags: it checks every slot against its id.
        let target = try f.target("verified.img", holding: 1)
        #expect(try f.engine.sync(try f.source(2), to: target, mode: .delta, verify: true).verified)
    }

    @Test func anInterruptedSyncRollsBackOrResumesExactly() throws {
        let f = try SyncFixture()
        defer { f.dir.remove() }
        let engine = f.engine
        // Larger and smaller files too: rollback restores the old size and the lost tail.
        let larger = try f.target("larger.img", holding: 0)
        try writeAt(larger, SyncFixture.size + 100_000, randomBytes(seed: 10, count: 200_000))
        let smaller = f.dir.file("smaller.img")
        try writeAt(smaller, 0, randomBytes(seed: 11, count: 3 << 20))
        let plain = try f.target("plain.img", holding: 0)
        let engineSmallBatches = f.smallBatchEngine
        for target in [plain, larger, smaller] {
            for (mode, budget) in [(SyncMode.full, 9), (.delta, 2), (.full, 30)] {
                let oldHash = try sha256(file: target), oldSize = fileSize(target)
                #expect(throws: SyncError.self) {
                    try engineSmallBatches.sync(FaultySource(try f.source(2), failAfterReads: budget), to: target, mode: mode)
                }
                #expect(try engine.status(target).condition == .midSync)
                // A new sync is refused until the interrupted one is resumed or rolled back.
                do throws(SyncError) {
                    _ = try engine.sync(try f.source(1), to: target, mode: .delta)
                    Issue.record("a sync over an unfinished one must be refused")
                } catch {
                    #expect(error.description.contains("--resume") && error.description.contains("--rollback"))
                }
                _ = try engine.rollback(target)
                #expect(try sha256(file: target) == oldHash)
                #expect(fileSize(target) == oldSize)
                #expect(try engine.status(target).condition == .rolledBack)

                #expect(throws: SyncError.self) {
                    try engineSmallBatches.sync(FaultySource(try f.source(2), failAfterReads: budget), to: target, mode: mode)
                }
                let resumed = try engine.resume(target, resolve: f.resolve, verify: true)
                #expect(resumed.resumed && resumed.verified)
                #expect(try sha256(file: target) == f.hashes[2])
                #expect(try engine.status(target).condition == .consistent)
                // Back to the start for the next round.
                _ = try engine.sync(try f.source(0), to: target, mode: .delta)
                if target == plain { #expect(try sha256(file: target) == f.hashes[0]) }
            }
        }
        // A new file: rollback removes it.
        let fresh = f.dir.file("fresh.img")
        #expect(throws: SyncError.self) {
            try engineSmallBatches.sync(FaultySource(try f.source(2), failAfterReads: 5), to: fresh, mode: .full)
        }
        _ = try engine.rollback(fresh)
        #expect(!FileSystem.exists(fresh))
        #expect(try engine.status(fresh).condition == .rolledBack)
    }

    /// A record damaged before a checkpoint is damage, not a torn tail: rollback and resume
    /// refuse the journal (rollback put back only the slots before the damage, and reported
    /// success).
    @Test func aJournalDamagedBeforeACheckpointIsRefused() throws {
        let f = try SyncFixture()
        defer { f.dir.remove() }
        let target = try f.target("plain.img", holding: 0)
        #expect(throws: SyncError.self) {
            try f.smallBatchEngine.sync(FaultySource(try f.source(2), failAfterReads: 30), to: target, mode: .full)
        }
        let identity = try #require(try TargetIdentity.of(target))
        let journal = f.engine.stateDirectory + "/sync/" + identity.key + "/journal"
        // The first record's payload (the header is 64 bytes, the record's own header 64 more).
        let byte = try SystemFile.open(journal, .readOnly).readAll(from: 200, count: 1)
        try writeAt(journal, 200, [byte[0] ^ 0x01])
        let before = try sha256(file: target)
        for attempt in ["rollback", "resume"] {
            do throws(SyncError) {
                if attempt == "rollback" { _ = try f.engine.rollback(target) } else { _ = try f.engine.resume(target, resolve: f.resolve) }
                Issue.record("\(attempt) of a journal damaged before a checkpoint must fail")
            } catch {
                guard case .damagedJournal = error else { Issue.record("\(attempt): \(error)"); continue }
            }
        }
        #expect(try sha256(file: target) == before)
        #expect(try f.engine.status(target).condition == .midSync)
    }

    /// A sync that an older lifeboat runs holds the lock it knew (`sync/<legacy key>/lock`):
    /// this one does not join it. Taken for the target's own lock otherwise.
    @Test func aSyncOfAnOlderLifeboatIsNotJoined() throws {
        let f = try SyncFixture()
        defer { f.dir.remove() }
        let target = try f.target("old.img", holding: 0)
        let identity = try #require(try TargetIdentity.of(target))
        let legacy = f.engine.stateDirectory + "/sync/" + identity.legacyKey
        try FileSystem.createDirectories(legacy)
        let held = try SystemFile.open(legacy + "/lock", .createOrOpen(permissions: 0o600))
        #expect(try held.lockWithoutWaiting())
        do throws(SyncError) {
            _ = try f.engine.sync(try f.source(2), to: target, mode: .delta)
            Issue.record("a sync joined one an older lifeboat holds")
        } catch {
            guard case .busy = error else { Issue.record("\(error)"); return }
        }
        held.close()
        _ = try f.engine.sync(try f.source(2), to: target, mode: .delta)
        #expect(try sha256(file: target) == f.hashes[2])
    }

    /// Only a checkpoint of this journal (its tag) makes earlier damage real damage: one of an
    /// earlier version (no tag), or bytes like one inside a payload (a guest disk holding a
    /// journal), leave the damaged part a torn tail, as a power loss can leave it.
    @Test func onlyThisJournalsCheckpointsMakeDamageReal() throws {
        let dir = TemporaryDirectory("journal")
        defer { dir.remove() }
        func write(_ name: String, checkpoint: (UndoJournal) throws -> Void) throws -> String {
            let path = dir.file(name)
            let journal = try UndoJournal.create(path, key: "0123456789abcdef0123456789abcdef")
            var records: [UInt8] = []
            for n in 0..<3 {
                var payload = [UInt8](repeating: UInt8(n + 1), count: 4096)
                if n == 2 {
                    // A payload holding what looks like a checkpoint (as a guest's own journal would).
                    let fake = UndoJournal.encodeHeader(kind: .checkpoint, offset: 1 << 20, length: 0, digest: .zero)
                    payload.replaceSubrange(100..<(100 + fake.count), with: fake)
                }
                payload.withUnsafeBytes { raw in
                    UndoJournal.encodeRecord(into: &records, offset: UInt64(n) * 4096, bytes: raw, zero: false, digest: ChunkID.sha256(raw))
                }
            }
            try journal.append(records)
            try checkpoint(journal)
            journal.close()
            // The first record's payload damaged.
            let byte = try SystemFile.open(path, .readOnly).readAll(from: 200, count: 1)
            try writeAt(path, 200, [byte[0] ^ 0x01])
            return path
        }
        let torn = try write("torn") { _ in }
        let (a, recordsA) = try UndoJournal.open(torn)
        a.close()
        #expect(recordsA.isEmpty)
        let old = try write("old") { journal in
            try journal.append(UndoJournal.encodeHeader(kind: .checkpoint, offset: 12288, length: 0, digest: .zero))
        }
        let (b, recordsB) = try UndoJournal.open(old)
        b.close()
        #expect(recordsB.isEmpty)
        let real = try write("real") { journal in try journal.checkpoint(12288) }
        #expect { try UndoJournal.open(real) } throws: { error in
            guard case .damagedJournal = error as? SyncError else { return false }
            return true
        }
    }

    @Test func aDeltaJournaledPartlyByItsComparisonRollsBackOrResumesExactly() throws {
        let f = try SyncFixture()
        defer { f.dir.remove() }
        // Nothing, part, or all of the old bytes journaled while comparing; the write pass
        // journals the rest. Interrupted in the write pass, each rolls back and resumes exactly.
        for limit: UInt64 in [0, 1 << 20, .max] {
            let target = try f.target("t-\(limit).img", holding: 0)
            var engine = f.engine
            engine.batchBytes = 256 << 10
            engine.writeBatchBytes = 256 << 10
            engine.streamJobBytes = 256 << 10
            engine.comparisonJournalLimit = limit
            #expect(throws: SyncError.self) {
                try engine.sync(FaultySource(try f.source(2), failAfterReads: 2), to: target, mode: .delta)
            }
            #expect(try engine.status(target).condition == .midSync)
            _ = try engine.rollback(target)
            #expect(try sha256(file: target) == f.hashes[0], "limit \(limit): rollback")
            #expect(throws: SyncError.self) {
                try engine.sync(FaultySource(try f.source(2), failAfterReads: 2), to: target, mode: .delta)
            }
            _ = try engine.resume(target, resolve: f.resolve, verify: true)
            #expect(try sha256(file: target) == f.hashes[2], "limit \(limit): resume")
            // A sync that completes leaves no journal behind.
            let report = try engine.sync(try f.source(0), to: target, mode: .delta)
            #expect(report.journalBytes > 0)
            #expect(try sha256(file: target) == f.hashes[0])
            #expect(try FileSystem.list(f.dir.file("state/sync")).allSatisfy { !FileSystem.exists(f.dir.file("state/sync/\($0)/journal")) })
        }
    }

    /// When the journal fits even if every slot differs, a delta writes while it compares, and
    /// each slot only after its undo record.
    @Test func aDeltaWritesWhileComparingAndEachSlotAfterItsRecord() throws {
        let f = try SyncFixture()
        defer { f.dir.remove() }
        let target = try f.target("t.img", holding: 0)
        var engine = f.engine
        engine.batchBytes = 256 << 10
        engine.writeBatchBytes = 256 << 10
        engine.streamJobBytes = 256 << 10
        let source = WatchedSource(try f.source(2), journalDirectory: f.dir.file("state/sync"))
        var plan: SyncPlan?
        let report = try engine.sync(source, to: target, mode: .delta, plan: { plan = $0 })
        #expect(source.problems.withLock { $0 } == [])
        #expect(source.fetched.withLock { $0 })
        #expect(try sha256(file: target) == f.hashes[2])
        #expect(plan?.journalBytesAtMost == true && plan?.differingBytes == nil)
        #expect(report.journalBytes > 0 && report.journalBytes <= report.transferredBytes)
        #expect(report.matchedBytes + report.transferredBytes == SyncFixture.size)
    }

    /// A sync that fails before it writes anything leaves the target and its state as they were.
    @Test func aSyncStoppedBeforeWritingLeavesTheTargetsStateAsItWas() throws {
        let f = try SyncFixture()
        defer { f.dir.remove() }
        for overlap in [true, false] {
            var engine = f.engine
            engine.overlapWrites = overlap
            // A target synced before, and one never synced.
            let synced = try f.target("synced-\(overlap).img", holding: 0)
            _ = try engine.sync(try f.source(1), to: synced, mode: .delta)
            let plain = try f.target("plain-\(overlap).img", holding: 0)
            for (target, hash) in [(synced, f.hashes[1]), (plain, f.hashes[0])] {
                #expect(throws: SyncError.self) { try engine.sync(UnreadableSource(try f.source(2)), to: target, mode: .delta) }
                #expect(try sha256(file: target) == hash)
                let status = try engine.status(target)
                #expect(status.condition == .consistent, "overlap \(overlap)")
                #expect(status.source == (target == synced ? try f.source(1).label : nil))
                #expect(throws: SyncError.self) { try engine.rollback(target) }
                #expect(try FileSystem.list(f.dir.file("state/sync")).allSatisfy { !FileSystem.exists(f.dir.file("state/sync/\($0)/journal")) })
                // And the next sync runs.
                _ = try engine.sync(try f.source(2), to: target, mode: .delta)
                #expect(try sha256(file: target) == f.hashes[2])
            }
        }
    }

    @Test func verificationFailureHasItsOwnKindAndKeepsTheJournal() throws {
        let f = try SyncFixture()
        defer { f.dir.remove() }
        let target = try f.target("t.img", holding: 0)
        do throws(SyncError) {
            _ = try f.engine.sync(FaultySource(try f.source(2), corruptSlot: 3), to: target, mode: .full, verify: true)
            Issue.record("verification must fail")
        } catch {
            #expect(error.kind == .verification)
            #expect(error.description.contains("verification failed") && error.description.contains("byte \(3 * 65536)"))
        }
        #expect(try f.engine.status(target).condition == .midSync)
        _ = try f.engine.rollback(target)
        #expect(try sha256(file: target) == f.hashes[0])
    }

    @Test func noUndoSkipsTheJournalAndMarksTheTargetInconsistent() throws {
        let f = try SyncFixture()
        defer { f.dir.remove() }
        let target = try f.target("t.img", holding: 0)
        var engine = f.engine
        engine.batchBytes = 256 << 10
        engine.writeBatchBytes = 256 << 10
        engine.streamJobBytes = 256 << 10
        #expect(throws: SyncError.self) {
            try engine.sync(FaultySource(try f.source(2), failAfterReads: 3), to: target, mode: .full, undo: false)
        }
        #expect(try engine.status(target).condition == .inconsistent)
        #expect(throws: SyncError.self) { try engine.rollback(target) }
        let report = try engine.resume(target, resolve: f.resolve)
        #expect(report.journalBytes == 0)
        #expect(try sha256(file: target) == f.hashes[2])
        #expect(try engine.status(target).condition == .consistent)
    }

    @Test func aBackupOfTheSyncedTargetStoresOnlyChangedChunks() throws {
        let f = try SyncFixture()
        defer { f.dir.remove() }
        let target = try f.target("t.img", holding: 0)
        _ = try f.engine.sync(try f.source(2), to: target, mode: .delta)
        let same = try f.vault.backup(BackupRequest(machine: "m", disks: [("os", .path(target))]))
        #expect(same.chunksNew == 0)
        // The machine runs on: two 4 KiB writes in different slots, two new chunks.
        try writeAt(target, 100 << 10, randomBytes(seed: 20, count: 4096))
        try writeAt(target, 3 << 20, randomBytes(seed: 21, count: 4096))
        let changed = try f.vault.backup(BackupRequest(machine: "m", disks: [("os", .path(target))]))
        #expect(changed.chunksNew == 2)
    }

    @Test(.enabled(if: isRoot)) func loopBlockDevices() throws {
        let f = try SyncFixture()
        defer { f.dir.remove() }
        var devices: [String] = []
        defer { for d in devices { _ = shell("losetup -d \(d)") } }
        func loop(_ name: String, size: UInt64, holding day: Int?) throws -> String {
            let file = try day.map { try f.target(name, holding: $0) } ?? f.dir.file(name)
            try setSize(file, size)
            let device = shell("losetup -f --show \(file)").stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(device.hasPrefix("/dev/loop"))
            devices.append(device)
            return device
        }
        func head(_ device: String) -> String {
            shell("head -c \(SyncFixture.size) \(device) | sha256sum").stdout.prefix(64).description
        }
        let exact = try loop("exact", size: (SyncFixture.size + 511) / 512 * 512, holding: 0)
        var report = try f.engine.sync(try f.source(2), to: exact, mode: .delta, verify: true)
        #expect(head(exact) == f.hashes[2])
        #expect(report.transferredBytes < SyncFixture.size / 2)
        report = try f.engine.sync(try f.source(1), to: exact, mode: .full)
        #expect(head(exact) == f.hashes[1])
        // Larger: allowed, with a warning; the tail is left alone.
        let larger = try loop("larger", size: 20 << 20, holding: nil)
        try writeAt(larger, 19 << 20, [UInt8](repeating: 0xab, count: 4096))
        report = try f.engine.sync(try f.source(2), to: larger, mode: .delta)
        #expect(report.warnings.count == 1)
        #expect(head(larger) == f.hashes[2])
        #expect(try SystemFile.open(larger, .readOnly).readAll(from: 19 << 20, count: 1) == [0xab])
        // A rollback on a device writes zeros where a file would get holes.
        var small = f.engine
        small.batchBytes = 256 << 10
        small.writeBatchBytes = 256 << 10
        small.streamJobBytes = 256 << 10
        #expect(throws: SyncError.self) {
            try small.sync(FaultySource(try f.source(0), failAfterReads: 6), to: larger, mode: .full)
        }
        _ = try f.engine.rollback(larger)
        #expect(head(larger) == f.hashes[2])
        // Smaller: refused.
        let tiny = try loop("tiny", size: 8 << 20, holding: nil)
        do throws(SyncError) {
            _ = try f.engine.sync(try f.source(2), to: tiny, mode: .full)
            Issue.record("a device smaller than the disk must be refused")
        } catch {
            guard case .targetTooSmall = error else { Issue.record("\(error)"); return }
        }
    }

    /// Device names are handed out at attach (or boot) time: a name that held one disk during an
    /// interrupted sync can hold another afterwards. The sync's state follows the disk (a loop
    /// device is named by its backing file), never the name: rolling back by the old name would
    /// write the first disk's old bytes onto the second.
    @Test(.enabled(if: isRoot)) func anUnfinishedSyncFollowsItsDiskNotTheDevicesName() throws {
        let f = try SyncFixture()
        defer { f.dir.remove() }
        let size = (SyncFixture.size + 511) / 512 * 512
        let fileA = try f.target("a", holding: 0), fileB = try f.target("b", holding: 1)
        try setSize(fileA, size)
        try setSize(fileB, size)
        var devices: [String] = []
        defer { for d in devices { _ = shell("losetup -d \(d)") } }
        func attach(_ file: String, at device: String? = nil) -> String {
            let name = device.map { shell("losetup \($0) \(file)").status == 0 ? $0 : "" }
                ?? shell("losetup -f --show \(file)").stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(name.hasPrefix("/dev/loop"))
            if !devices.contains(name) { devices.append(name) }
            return name
        }
        func head(_ device: String) -> String {
            shell("head -c \(SyncFixture.size) \(device) | sha256sum").stdout.prefix(64).description
        }
        let first = attach(fileA), second = attach(fileB)
        var small = f.engine
        small.batchBytes = 256 << 10
        small.writeBatchBytes = 256 << 10
        small.streamJobBytes = 256 << 10
        #expect(throws: SyncError.self) {
            try small.sync(FaultySource(try f.source(2), failAfterReads: 6), to: first, mode: .full)
        }
        #expect(try f.engine.status(first).condition == .midSync)
        // Detached and attached again the other way round.
        #expect(shell("losetup -d \(first) && losetup -d \(second)").status == 0)
        _ = attach(fileB, at: first)
        _ = attach(fileA, at: second)
        #expect(try f.engine.status(first).condition == .consistent)
        #expect(try f.engine.status(second).condition == .midSync)
        _ = try f.engine.rollback(second)
        #expect(head(second) == f.hashes[0])
        #expect(head(first) == f.hashes[1])
    }

    @Test(.enabled(if: isRoot)) func aFullFilesystemGivesAClearErrorAndRollsBack() throws {
        let f = try SyncFixture()
        defer { f.dir.remove() }
        let mnt = f.dir.file("small")
        try FileSystem.createDirectories(mnt)
        #expect(shell("mount -t tmpfs -o size=10m lifeboat-test \(mnt)").status == 0)
        defer { _ = umount2(mnt, Int32(MNT_DETACH)) }
        // The target holds day 0 (about 7 MiB of data); the filesystem then has little room.
        // The new image is random everywhere: 12 MiB of data.
        let random = f.dir.file("random.img")
        try writeAt(random, 0, randomBytes(seed: 31, count: Int(SyncFixture.size)))
        _ = try f.vault.backup(BackupRequest(machine: "big", disks: [("os", .path(random))]))
        let big = try f.resolve("big@latest", "os")
        let target = mnt + "/t.img"
        #expect(shell("cp --sparse=always \(f.days[0]) \(target) && dd if=/dev/zero of=\(mnt)/filler bs=64k count=40 status=none").status == 0)
        let filler = randomBytes(seed: 30, count: 64 << 10)
        var i: UInt64 = 0
        while (try? writeAt(mnt + "/filler", 40 * 65536 + i * 65536, filler)) != nil { i += 1 }
        let oldHash = try sha256(file: target)
        do throws(SyncError) {
            _ = try f.engine.sync(big, to: target, mode: .delta)
            Issue.record("the sync must fail on a full filesystem")
        } catch {
            #expect(error.kind == .noSpace)
            #expect(error.description.contains(target) && error.description.contains("at byte ") && error.description.contains("No space left"))
            #expect(error.description.contains("--rollback"))
        }
        #expect(try f.engine.status(target).condition == .midSync)
        _ = try f.engine.rollback(target)
        #expect(try sha256(file: target) == oldHash)
    }

    /// The sync of a failback releases the target's lock when it finishes; a sync run onto the
    /// target before the failback is recorded must not leave a record that names this sandbox.
    @Test func aSyncBetweenAFailbacksSyncAndItsRecordIsNotTakenForTheFailback() throws {
        let f = try SyncFixture()
        defer { f.dir.remove() }
        _ = try Sandboxes(vault: f.vault).create("a", from: try f.vault.point("m@latest"))
        let target = f.dir.file("target.img")
        let failback = Failback(vault: f.vault, engine: f.engine)
        do {
            _ = try failback.run(.prepare, sandbox: "a", disk: nil, to: target, afterSync: {
                #expect(throws: Never.self) { _ = try f.engine.sync(f.source(0), to: target, mode: .delta) }
            })
            Issue.record("the failback was recorded over another sync")
        } catch {
            guard case .failback(let why) = error else { Issue.record("\(error)"); return }
            #expect(why.contains("changed after this failback's sync finished"), "\(why)")
            #expect(why.contains("2026-03-01"), "\(why)")
        }
        #expect(try failback.record(for: target) == nil)
        #expect(try sha256(file: target) == f.hashes[0])
        // The failback itself, run again, is recorded.
        _ = try failback.run(.prepare, sandbox: "a", disk: nil, to: target)
        #expect(try failback.record(for: target)?.phase == .prepared)
        #expect(try sha256(file: target) == f.hashes[2])
    }
}
