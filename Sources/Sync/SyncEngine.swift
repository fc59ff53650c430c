import ChunkStore
import Foundation
import Glibc
import Synchronization
import SystemIO
import Vault

public enum SyncMode: String, Codable, Sendable {
    /// Compare the target with the source's chunk ids; write only slots that differ.
    case delta
    /// Write every slot without comparing.
    case full
}

/// What a sync is about to do, reported before the target is touched.
public struct SyncPlan: Codable, Sendable {
    public var target: String
    public var source: String
    public var mode: SyncMode
    public var size: UInt64
    /// Delta: bytes of the slots that differ, when the comparison runs before the writes (nil
    /// when they run together); full: the size.
    public var differingBytes: UInt64?
    /// Bytes of old contents the undo journal will hold (0 with --no-undo), or at most hold.
    public var journalBytes: UInt64
    /// `journalBytes` is a bound: the journal fits even if every slot holding data differs, so
    /// the writes follow the comparison without waiting for its end.
    public var journalBytesAtMost: Bool
    public var journalDirectory: String
    public var freeBytes: UInt64
    public var resumedFrom: UInt64?
    public var warnings: [String]
}

public struct SyncProgress: Sendable {
    public enum Phase: String, Sendable { case compare, write, verify, rollback }
    public var phase: Phase
    public var bytesDone: UInt64
    public var bytesTotal: UInt64
}

public struct SyncReport: Codable, Sendable {
    public var source: String
    public var disk: String
    public var target: String
    public var mode: SyncMode
    public var size: UInt64
    /// Bytes of the disk this run covered (all of it, or from the resumed checkpoint).
    public var processedBytes: UInt64
    /// Bytes of slots that already held the source's bytes (delta).
    public var matchedBytes: UInt64
    /// Bytes of the slots written (data fetched from the vault, or zeros).
    public var transferredBytes: UInt64
    /// Bytes written to the target (holes punched in a file write nothing).
    public var writtenBytes: UInt64
    /// Bytes of old contents kept in the undo journal.
    public var journalBytes: UInt64
    public var undo: Bool
    public var resumed: Bool
    public var created: Bool
    public var verified: Bool
    public var seconds: Double
    public var warnings: [String]
}

public struct RollbackReport: Codable, Sendable {
    public var target: String
    public var source: String
    public var restoredBytes: UInt64
    public var removed: Bool
    public var seconds: Double
}

public struct SyncStatus: Codable, Sendable {
    public enum Condition: String, Codable, Sendable {
        case consistent
        case midSync = "mid-sync"
        case inconsistent
        case rolledBack = "rolled-back"
    }
    public var target: String
    public var condition: Condition
    public var source: String?
    public var disk: String?
    public var mode: SyncMode?
    /// Bytes of the disk known to hold the new image (the last checkpoint).
    public var progressBytes: UInt64?
    public var size: UInt64?
    public var journalBytes: UInt64?
    public var started: String?
    public var finished: String?
    /// The two-phase failback onto this target, if one was run.
    public var failback: FailbackRecord?
}

/// Syncs virtual disks onto targets (files, block devices) so that, whatever happens, the target
/// can be brought back to exactly its old image or forward to exactly the new one. The state of
/// every target lives in `<stateDirectory>/sync/<key>` (docs/FORMAT.md, "Sync journals").
public struct SyncEngine: Sendable {
    public let stateDirectory: String
    /// Bytes per read of the comparison pass, and per journal batch (journaled, flushed once,
    /// then written) of the write pass.
    public var batchBytes = 4 << 20
    public var writeBatchBytes = 4 << 20
    /// A delta that writes while it compares gathers this many bytes of differing slots (or
    /// eight times as many of the disk) per flush of the journal.
    public var streamJobBytes = 16 << 20
    /// A checkpoint (target flushed, progress recorded) at least this often: each one flushes
    /// the target's device cache while the writers wait, and a resume compares again from it.
    public var checkpointBytes: UInt64 = 256 << 20
    /// Readers of the comparison pass: each reads a region, then hashes it while the others'
    /// reads are in flight.
    public var compareWorkers = 12
    /// The most bytes a delta's comparison may journal; nil: half the state directory's free space.
    public var comparisonJournalLimit: UInt64? = nil
    /// Whether a delta whose whole journal fits within that limit writes while it compares.
    public var overlapWrites = true
    /// The operator says the target is the disk an unfinished sync recorded before a reboot was
    /// writing (`--same-target`), where nothing that survives a reboot can tell (SyncState.boot).
    public var sameTargetAcrossBoots = false

    public init(stateDirectory: String) {
        self.stateDirectory = stateDirectory
    }

    // MARK: - Sync

    public func sync(_ source: any SyncSource, to path: String, mode: SyncMode, verify: Bool = false, undo: Bool = true,
                     plan: (SyncPlan) -> Void = { _ in },
                     progress: @escaping @Sendable (SyncProgress) -> Void = { _ in }) throws(SyncError) -> SyncReport {
        let started = Date()
        var created = false
        var identity = try TargetIdentity.of(path)
        if identity == nil {
            // A new file: created empty, then grown sparse; rolling back removes it.
            do throws(SystemError) {
                let file = try SystemFile.open(path, .createExclusive(permissions: 0o644))
                file.close()
                try FileSystem.syncDirectory(FileSystem.parentDirectory(of: FileSystem.absolute(path)))
                created = true
            } catch where error.errno == EEXIST {
                // Another sync created it just now: its lock decides below.
            } catch { throw .target(error) }
            identity = try TargetIdentity.of(path)
        }
        guard let identity else { throw .target(SystemError("open", path: path, errno: ENOENT)) }
        // One writer per target: the lock is held until the sync returns.
        let lock = try TargetLock.acquire(stateDirectory: stateDirectory, identity: identity)
        defer { lock.release() }
        let (_, previous) = try recorded(for: identity)
        // A new sync is filed under the target's key, even where its previous state was found
        // under the key states had before stable names (so that it is found after a reboot).
        let dir = SyncStateDirectory(stateDirectory: stateDirectory, key: identity.key)
        // Another sync may have taken the lock first and written the file this one created:
        // then it is not new (its zero slots must be written, and rolling back must not remove it).
        var st = stat()
        if created, stat(identity.path, &st) == 0, st.st_size != 0 { created = false }
        if !created, let state = previous, state.phase == .running, state.undo || undo {
            throw .unfinished(path: identity.path, source: state.sourceLabel, undo: state.undo)
        }
        let target = try Target(path: identity.path, isDevice: identity.isDevice, undo: undo)
        defer { target.close() }
        try target.check(is: identity)

        let oldSize = try target.size()
        var warnings: [String] = []
        if identity.isDevice {
            guard oldSize >= source.size else { throw .targetTooSmall(path: identity.path, size: oldSize, needed: source.size) }
            if oldSize > source.size {
                warnings.append("block device \(identity.path) holds \(oldSize) bytes, the disk \(source.size): the last \(oldSize - source.size) bytes are left as they are")
            }
        }
        func createJournal() throws(SyncError) -> UndoJournal {
            do throws(SystemError) { try FileSystem.createDirectories(dir.path, permissions: 0o700) } catch { throw .journal(error) }
            return try UndoJournal.create(dir.journalPath, key: dir.key)
        }
        var state = SyncState(target: identity.path, isDevice: identity.isDevice, identity: identity.id,
                              source: source.resumeSpec, sourceLabel: source.label, disk: source.diskName, mode: mode,
                              phase: .running, undo: undo, created: created, oldSize: created ? 0 : oldSize,
                              newSize: identity.isDevice ? oldSize : source.size, chunkSize: source.chunkSize,
                              journalBytesPlanned: 0, started: Timestamp.format(started), finished: nil,
                              stable: identity.stable, boot: Host.bootID, attachment: identity.attachment)
        let budget = comparisonJournalLimit ?? freeSpace() / 2
        func finished(_ report: SyncReport) -> SyncReport {
            var report = report
            report.created = created
            report.warnings = warnings
            report.seconds = Date().timeIntervalSince(started)
            return report
        }

        // Delta, when the journal fits even if every slot holding data differs (a full sync's
        // journal): the writes follow the comparison region by region, the comparison
        // journaling as it goes.
        let worstJournal = mode == .delta && overlapWrites && undo
            ? journalEstimate(source: source, target: target, oldSize: oldSize, created: created, mode: .full, differences: nil, from: 0)
            : 0
        if mode == .delta && overlapWrites && worstJournal + journalSlack(source) <= budget {
            state.journalBytesPlanned = worstJournal
            plan(SyncPlan(target: identity.path, source: source.label, mode: mode, size: source.size, differingBytes: nil,
                          journalBytes: worstJournal, journalBytesAtMost: true, journalDirectory: dir.path,
                          freeBytes: freeSpace(), resumedFrom: nil, warnings: warnings))
            let journal = try createJournal()
            defer { journal.close() }
            try dir.save(state)
            return finished(try execute(source: source, target: target, state: state, dir: dir, journal: journal, journaled: [],
                                        from: 0, feed: .comparison, fresh: created, verify: verify,
                                        unchanged: created ? nil : { restore(previous, dir) }, progress: progress))
        }

        // Otherwise compare first, which gives the exact list of slots to write and so the
        // exact size of the journal. The comparison journals the old bytes it finds (unflushed;
        // the state record does not point at this journal yet), within half the free space.
        var differences: [Difference]? = nil
        var early: UndoJournal? = nil
        var startedTarget = false
        defer {
            // Stopped before the target was touched: the journal is not needed.
            if let early, !startedTarget {
                early.close()
                try? dir.removeJournal()
            }
        }
        if mode == .delta {
            var comparison = Comparison(source: source, target: target, targetSize: oldSize,
                                        regionSlots: regionSlots(source), workers: compareWorkers)
            if undo && !created {
                early = try createJournal()
                comparison.journal = early
                comparison.journalBudget = budget
            }
            do throws(SyncError) {
                differences = try comparison.differences(from: 0) { done in
                    progress(SyncProgress(phase: .compare, bytesDone: done, bytesTotal: source.size))
                }
            } catch { throw error.beforeWriting(identity.path) }
        }
        let chunkBytes = UInt64(source.chunkSize)
        let journaled = Set((differences ?? []).filter(\.journaled).map { UInt64($0.slot) * chunkBytes })
        let journaledPayload = bytes(of: (differences ?? []).filter { $0.journaled && !$0.oldZero }, source)
        // What the journal still needs, beyond what the comparison put in it.
        let remaining = undo ? journalEstimate(source: source, target: target, oldSize: oldSize, created: created,
                                               mode: mode, differences: differences, from: 0, skipping: journaled) : 0
        let journalBytes = remaining + journaledPayload
        state.journalBytesPlanned = journalBytes
        let free = freeSpace()
        let differing = differences.map { bytes(of: $0, source) } ?? source.size
        plan(SyncPlan(target: identity.path, source: source.label, mode: mode, size: source.size, differingBytes: differing,
                      journalBytes: journalBytes, journalBytesAtMost: false, journalDirectory: dir.path,
                      freeBytes: free + journaledPayload, resumedFrom: nil, warnings: warnings))
        if undo && remaining + journalSlack(source) > free {
            if created { try? FileSystem.remove(identity.path) }
            throw .journalTooLarge(needed: journalBytes, available: free + journaledPayload, directory: stateDirectory + "/sync")
        }

        // From here on the target may change: the journal and the state record come first.
        let journal: UndoJournal
        if let early {
            try early.flush()
            journal = early
        } else {
            journal = try createJournal()
        }
        startedTarget = true
        defer { journal.close() }
        try dir.save(state)

        var report = try execute(source: source, target: target, state: state, dir: dir, journal: journal, journaled: journaled,
                                 from: 0, feed: differences.map { .differences($0) } ?? .everySlot, fresh: created, verify: verify,
                                 unchanged: created ? nil : { restore(previous, dir) }, progress: progress)
        report.journalBytes += journaledPayload
        return finished(report)
    }

    /// A sync stopped before its first write: the target keeps its old image, so it gets its
    /// old state back, and the journal goes.
    private func restore(_ previous: SyncState?, _ dir: SyncStateDirectory) {
        // The journal goes only once the state no longer names it (else resume and rollback
        // would find a running sync without its journal).
        do throws(SyncError) {
            if let previous { try dir.save(previous) } else { try dir.removeState() }
        } catch { return }
        try? dir.removeJournal()
    }

    // MARK: - Resume

    /// Finishes an interrupted sync from its last checkpoint. `resolve` finds the source again
    /// from what the state recorded (MACHINE@POINT-ID and the disk name).
    public func resume(_ path: String, resolve: (_ spec: String, _ disk: String) throws(SyncError) -> any SyncSource,
                       verify: Bool = false, plan: (SyncPlan) -> Void = { _ in },
                       progress: @escaping @Sendable (SyncProgress) -> Void = { _ in }) throws(SyncError) -> SyncReport {
        let started = Date()
        guard let identity = try TargetIdentity.of(path) else { throw .nothingToResume(TargetIdentity.canonicalPath(path)) }
        let lock = try TargetLock.acquire(stateDirectory: stateDirectory, identity: identity)
        defer { lock.release() }
        let (dir, recordedState) = try recorded(for: identity)
        guard let state = recordedState, state.phase == .running else { throw .nothingToResume(identity.path) }
        let source = try resolve(state.source, state.disk)
        guard source.size == state.newSize || state.isDevice, source.chunkSize == state.chunkSize else {
            throw .sourceMismatch(target: identity.path, why: "\(state.source) disk \(state.disk) is not the disk the sync started with")
        }
        let (journal, records) = try UndoJournal.open(dir.journalPath, key: dir.key)
        defer { journal.close() }
        try check(records, of: state, journal: dir.journalPath, targetSize: source.size)
        try journal.truncateToEnd()
        var journaled = Set<UInt64>()
        var checkpoint: UInt64 = 0
        var afterCheckpoint = UInt64(UndoJournal.headerSize)
        for record in records {
            if record.kind == .checkpoint {
                checkpoint = record.offset
                afterCheckpoint = record.payloadAt
            } else {
                journaled.insert(record.offset)
            }
        }
        try journal.rewrite(from: afterCheckpoint)
        let target = try Target(path: identity.path, isDevice: identity.isDevice, undo: state.undo)
        defer { target.close() }
        try target.check(is: identity)
        if identity.isDevice, let size = try? target.size(), size < source.size {
            throw .targetTooSmall(path: identity.path, size: size, needed: source.size)
        }
        let resumedFrom = checkpoint
        let first = Int(checkpoint / UInt64(source.chunkSize))

        var differences: [Difference]? = nil
        if state.mode == .delta {
            let size = try target.size()
            let comparison = Comparison(source: source, target: target, targetSize: size, regionSlots: regionSlots(source), workers: compareWorkers)
            differences = try comparison.differences(from: first) { done in
                progress(SyncProgress(phase: .compare, bytesDone: done, bytesTotal: source.size - resumedFrom))
            }
        }
        let journalBytes = state.undo ? journalEstimate(source: source, target: target, oldSize: try target.size(), created: state.created,
                                                        mode: state.mode, differences: differences, from: first, skipping: journaled) : 0
        let differing = differences.map { bytes(of: $0, source) } ?? (source.size - checkpoint)
        let free = freeSpace()
        plan(SyncPlan(target: identity.path, source: source.label, mode: state.mode, size: source.size, differingBytes: differing,
                      journalBytes: journalBytes, journalBytesAtMost: false, journalDirectory: dir.path, freeBytes: free,
                      resumedFrom: checkpoint, warnings: []))
        if state.undo && journalBytes + journalSlack(source) > free {
            throw .journalTooLarge(needed: journalBytes, available: free, directory: stateDirectory + "/sync")
        }
        var report = try execute(source: source, target: target, state: state, dir: dir, journal: journal, journaled: journaled,
                                 from: first, feed: differences.map { .differences($0) } ?? .everySlot, fresh: false, verify: verify,
                                 progress: progress)
        report.resumed = true
        report.created = state.created
        report.seconds = Date().timeIntervalSince(started)
        return report
    }

    // MARK: - The write pass

    private func regionSlots(_ source: any SyncSource) -> Int { max(1, batchBytes / source.chunkSize) }

    private func journalSlack(_ source: any SyncSource) -> UInt64 {
        UInt64(8 << 20) + UInt64(source.slotCount) * UInt64(UndoJournal.recordHeaderSize)
    }

    private func freeSpace() -> UInt64 {
        var st = statvfs()
        // Where the journal goes: the sync directory may be a filesystem of its own.
        var at = stateDirectory + "/sync"
        while !FileSystem.exists(at) && at != "/" && !at.isEmpty { at = FileSystem.parentDirectory(of: at) }
        guard statvfs(at, &st) == 0 else { return 0 }
        return UInt64(st.f_bavail) * UInt64(st.f_frsize)
    }

    /// Bytes of old contents the journal will hold: delta, the non-zero slots that differ; full,
    /// every slot that holds data (a file's holes cost nothing); plus a file's tail beyond the
    /// disk when the file shrinks.
    private func journalEstimate(source: any SyncSource, target: Target, oldSize: UInt64, created: Bool, mode: SyncMode,
                                 differences: [Difference]?, from first: Int, skipping journaled: Set<UInt64> = []) -> UInt64 {
        if created { return 0 }
        let chunkSize = UInt64(source.chunkSize)
        var bytes: UInt64 = 0
        if let differences {
            for d in differences where !d.oldZero && !journaled.contains(UInt64(d.slot) * chunkSize) {
                bytes += UInt64(source.length(of: d.slot..<(d.slot + 1)))
            }
        } else {
            for region in target.dataRegions(from: UInt64(first) * chunkSize, to: min(oldSize, source.size)) {
                bytes += region.end - region.start
            }
        }
        if !target.isDevice && oldSize > source.size {
            for region in target.dataRegions(from: source.size, to: oldSize) { bytes += region.end - region.start }
        }
        return bytes
    }

    /// A batch of slots written together: journaled, flushed, then written.
    private struct Batch: Sendable {
        var runs: [Range<Int>]
        var differences: [Difference]?
        /// Where the comparison's records of these slots end in the journal (0: none).
        var journalEnd: UInt64 = 0

        /// The runs of consecutive slots among `differences` (in slot order), none longer than
        /// `longestRun` slots.
        init(differences: [Difference], longestRun: Int, journalEnd: UInt64 = 0) {
            var runs: [Range<Int>] = []
            for d in differences {
                if let last = runs.last, last.upperBound == d.slot, last.count < longestRun {
                    runs[runs.count - 1] = last.lowerBound..<(d.slot + 1)
                } else {
                    runs.append(d.slot..<(d.slot + 1))
                }
            }
            self.runs = runs
            self.differences = differences
            self.journalEnd = journalEnd
        }

        init(run: Range<Int>) {
            runs = [run]
            differences = nil
        }
    }

    /// What the write pass writes.
    private enum Feed {
        /// Every slot from the first (full).
        case everySlot
        /// The slots a comparison found (delta, compared first).
        case differences([Difference])
        /// The slots a comparison run now finds, region by region, each once its undo records
        /// are durable (delta, when the journal fits even if every slot differs).
        case comparison
    }

    private struct Job: Sendable {
        /// The batches (streaming: the comparison's regions) the job completes.
        var indices: [Int]
        var batch: Batch
    }

    /// Writes the feed's slots. `unchanged`, if given, is called when the sync fails before
    /// anything was written to the target (its error then says so: `beforeWriting`).
    private func execute(source: any SyncSource, target: Target, state: SyncState, dir: SyncStateDirectory, journal: UndoJournal,
                         journaled: Set<UInt64>, from first: Int, feed: Feed, fresh: Bool, verify: Bool,
                         unchanged: (() -> Void)? = nil,
                         progress: @escaping @Sendable (SyncProgress) -> Void) throws(SyncError) -> SyncReport {
        let chunkSize = source.chunkSize
        let slotCount = source.slotCount
        let undo = state.undo
        let isDevice = target.isDevice
        let path = target.path
        let touched = Atomic<Bool>(false)

        // A file is given the disk's size; the tail it loses is journaled first.
        if !isDevice {
            let current = try target.size()
            if current > source.size && undo {
                try journalTail(target: target, journal: journal, from: source.size, to: current, skipping: journaled)
            }
            if current != source.size {
                touched.store(true, ordering: .relaxed)
                try target.resize(to: source.size)
            }
        }

        // The batches, in slot order: known now, or one per region of the comparison.
        var batches: [Batch] = []
        let perBatch = max(1, writeBatchBytes / chunkSize)
        let regionSlots = regionSlots(source)
        switch feed {
        case .differences(let differences):
            var i = 0
            while i < differences.count {
                let end = min(i + perBatch, differences.count)
                batches.append(Batch(differences: Array(differences[i..<end]), longestRun: perBatch))
                i = end
            }
        case .everySlot:
            var slot = first
            while slot < slotCount {
                let end = min(slot + perBatch, slotCount)
                batches.append(Batch(run: slot..<end))
                slot = end
            }
        case .comparison:
            break
        }
        let streaming: Bool
        if case .comparison = feed { streaming = true } else { streaming = false }
        let batchCount = streaming ? (slotCount - first + regionSlots - 1) / regionSlots : batches.count

        let queue = BoundedQueue<Job>(capacity: streaming ? 64 : 4)
        let failure = Mutex<SyncError?>(nil)
        let written = Atomic<UInt64>(0)
        let transferred = Atomic<UInt64>(0)
        let journalBytes = Atomic<UInt64>(0)
        // Which batches are done, and the checkpoint: everything below it is written.
        struct Done { var finished: Set<Int> = []; var next = 0; var lastCheckpoint: UInt64 = 0 }
        let done = Mutex(Done())
        let checkpointLock = Mutex(())
        let checkpointEvery = checkpointBytes
        let starts = batches.map { UInt64($0.runs[0].lowerBound) * UInt64(chunkSize) }
        let diskSize = source.size

        /// The offset below which every batch is done.
        @Sendable func safeOffset(_ next: Int) -> UInt64 {
            guard next < batchCount else { return diskSize }
            return streaming ? UInt64(first + next * regionSlots) * UInt64(chunkSize) : starts[next]
        }
        @Sendable func checkpoint() throws(SyncError) {
            try checkpointLock.withLock { (_: inout ()) throws(SyncError) in
                let offset = done.withLock { safeOffset($0.next) }
                // The target first: a checkpoint must never claim bytes that are not durable.
                try target.dataSync()
                try journal.checkpoint(offset)
                done.withLock { $0.lastCheckpoint = max($0.lastCheckpoint, offset) }
            }
        }

        // Each worker reads a batch from the vault, decodes it and writes it, waiting on the
        // disks (and the journal's flush) in between: enough of them that the disks always have
        // reads and writes in flight while both cores decode (6 per core with 4 MiB batches were
        // a little faster than 2 per core with 16 MiB on a full sync here, for the same memory).
        let workerCount = 6 * ProcessInfo.processInfo.activeProcessorCount + 1
        let pool = (0..<workerCount).map { n in
            Worker(name: "sync-write-\(n)") {
                let bufferSize = perBatch * chunkSize
                let old = UnsafeMutableRawBufferPointer.allocate(byteCount: bufferSize, alignment: SystemFile.directAlignment)
                let new = UnsafeMutableRawBufferPointer.allocate(byteCount: bufferSize, alignment: SystemFile.directAlignment)
                let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: min(bufferSize, 1 << 20), alignment: SystemFile.directAlignment)
                zeros.initializeMemory(as: UInt8.self, repeating: 0)
                defer { old.deallocate(); new.deallocate(); zeros.deallocate() }
                while let job = queue.pop() {
                    let batch = job.batch
                    do throws(SyncError) {
                        if Cancellation.requested { throw .interrupted(path: path, undo: undo) }
                        if streaming {
                            // The comparison journaled these slots: their records must be durable first.
                            if batch.journalEnd > 0 { try journal.flush(through: batch.journalEnd) }
                        } else if undo && !state.created {
                            // A file this sync created has no old contents: rolling back removes it.
                            let bytes = try undoRecords(batch, source: source, target: target, buffer: old, skipping: journaled)
                            try journal.append(bytes.records)
                            journalBytes.add(bytes.payload, ordering: .relaxed)
                        }
                        if !batch.runs.isEmpty { touched.store(true, ordering: .relaxed) }
                        for run in batch.runs {
                            let length = source.length(of: run)
                            let buffer = UnsafeMutableRawBufferPointer(rebasing: new[0..<length])
                            try source.read(run, into: buffer)
                            let base = UInt64(run.lowerBound) * UInt64(chunkSize)
                            if isDevice {
                                try target.write(UnsafeRawBufferPointer(buffer), at: base)
                                written.add(UInt64(length), ordering: .relaxed)
                                transferred.add(UInt64(length), ordering: .relaxed)
                                continue
                            }
                            // A file: data runs written, zero runs punched (or left as holes in a new file).
                            var k = 0
                            let slots = run.count
                            func slotRange(_ k: Int) -> Range<Int> { (k * chunkSize)..<min((k + 1) * chunkSize, length) }
                            while k < slots {
                                let zero = isAllZero(UnsafeRawBufferPointer(rebasing: buffer[slotRange(k)]))
                                var j = k + 1
                                while j < slots && isAllZero(UnsafeRawBufferPointer(rebasing: buffer[slotRange(j)])) == zero { j += 1 }
                                let from = slotRange(k).lowerBound, to = slotRange(j - 1).upperBound
                                if zero {
                                    if !fresh {
                                        let n = try target.zero(at: base + UInt64(from), count: to - from, zeros: UnsafeRawBufferPointer(zeros))
                                        written.add(n, ordering: .relaxed)
                                        transferred.add(UInt64(to - from), ordering: .relaxed)
                                    }
                                } else {
                                    try target.write(UnsafeRawBufferPointer(rebasing: buffer[from..<to]), at: base + UInt64(from))
                                    written.add(UInt64(to - from), ordering: .relaxed)
                                    transferred.add(UInt64(to - from), ordering: .relaxed)
                                }
                                k = j
                            }
                        }
                        let (advanced, offset) = done.withLock { d -> (Bool, UInt64) in
                            d.finished.formUnion(job.indices)
                            while d.finished.contains(d.next) { d.finished.remove(d.next); d.next += 1 }
                            let offset = safeOffset(d.next)
                            return (offset >= d.lastCheckpoint + checkpointEvery, offset)
                        }
                        // A streaming delta's progress is its comparison's.
                        if !streaming { progress(SyncProgress(phase: .write, bytesDone: min(offset, diskSize), bytesTotal: diskSize)) }
                        if advanced { try checkpoint() }
                    } catch {
                        failure.withLock { if $0 == nil { $0 = error } }
                        queue.close()
                    }
                }
            }
        }

        var found: [Difference] = []
        if streaming {
            var comparison = Comparison(source: source, target: target, targetSize: try target.size(),
                                        regionSlots: regionSlots, workers: compareWorkers)
            if undo && !state.created { comparison.journal = journal }
            // Regions are gathered into jobs of about a write batch, each waiting for one flush
            // of the journal: a flush per region would stall the disk many times a second.
            struct Pending { var regions: [Int] = []; var differences: [Difference] = []; var journalEnd: UInt64 = 0 }
            let pending = Mutex(Pending())
            let perJob = max(1, streamJobBytes / chunkSize)
            let regionsPerJob = max(1, perJob / regionSlots) * 8
            @Sendable func take(_ p: inout Pending) -> Job {
                defer { p = Pending() }
                return Job(indices: p.regions, batch: Batch(differences: p.differences.sorted { $0.slot < $1.slot },
                                                            longestRun: perBatch, journalEnd: p.journalEnd))
            }
            comparison.onRegion = { region, differences, journalEnd in
                let job = pending.withLock { p -> Job? in
                    p.regions.append(region)
                    p.differences += differences
                    p.journalEnd = max(p.journalEnd, journalEnd)
                    return p.differences.count >= perJob || p.regions.count >= regionsPerJob ? take(&p) : nil
                }
                return job.map { queue.push($0) } ?? true
            }
            do throws(SyncError) {
                found = try comparison.differences(from: first) { done in
                    progress(SyncProgress(phase: .compare, bytesDone: done, bytesTotal: diskSize))
                }
                let last = pending.withLock { take(&$0) }
                if !last.indices.isEmpty { queue.push(last) }
            } catch {
                failure.withLock { if $0 == nil { $0 = error } }
            }
        } else {
            // The old contents the journal needs: read ahead by the kernel, all at once, while
            // the first batches are journaled.
            if undo && !state.created, case .differences = feed {
                for batch in batches {
                    for run in batch.runs where !run.allSatisfy({ journaled.contains(UInt64($0) * UInt64(chunkSize)) }) {
                        target.prefetch(at: UInt64(run.lowerBound) * UInt64(chunkSize), length: UInt64(source.length(of: run)))
                    }
                }
            }
            for (index, batch) in batches.enumerated() {
                if !queue.push(Job(indices: [index], batch: batch)) { break }
            }
        }
        queue.close()
        for worker in pool { worker.join() }

        if let error = failure.withLock({ $0 }) {
            if let unchanged, !touched.load(ordering: .relaxed) {
                unchanged()
                throw error.beforeWriting(path)
            }
            // Record how far the sync got (best effort: the target may be what failed).
            try? checkpoint()
            throw error
        }
        try target.dataSync()

        var verified = false
        if verify {
            var comparison = Comparison(source: source, target: target, targetSize: try target.size(),
                                        regionSlots: regionSlots, workers: compareWorkers)
            comparison.useRecordedTags = false
            let mismatches = try comparison.differences(from: 0) { done in
                progress(SyncProgress(phase: .verify, bytesDone: done, bytesTotal: source.size))
            }
            if let firstBad = mismatches.first {
                // Resume must look at every slot again; if that cannot be recorded, the error says
                // so (a resume from the recorded checkpoint would skip the differing slots).
                var restartNotRecorded: String? = nil
                do throws(SyncError) { try journal.checkpoint(0) } catch { restartNotRecorded = error.description }
                throw .verificationFailed(path: path, offset: UInt64(firstBad.slot) * UInt64(chunkSize), slots: mismatches.count,
                                          restartNotRecorded: restartNotRecorded, undo: target.undo)
            }
            verified = true
        }
        do throws(SyncError) {
            try source.finish()
        } catch {
            if case .sandboxKeptWriting(let name, _) = error { throw .sandboxKeptWriting(name: name, target: path) }
            throw error
        }
        try journal.checkpoint(diskSize)
        var finished = state
        finished.phase = .complete
        finished.finished = Timestamp.format(Date())
        try dir.save(finished)
        try dir.removeJournal()

        let processed = source.size - UInt64(first) * UInt64(chunkSize)
        let differing: UInt64?
        switch feed {
        case .everySlot: differing = nil
        case .differences(let differences): differing = bytes(of: differences, source)
        case .comparison:
            differing = bytes(of: found, source)
            if undo && !state.created { journalBytes.add(bytes(of: found.filter { !$0.oldZero }, source), ordering: .relaxed) }
        }
        return SyncReport(source: source.label, disk: source.diskName, target: path, mode: state.mode, size: source.size,
                          processedBytes: processed,
                          matchedBytes: differing.map { processed - min(processed, $0) } ?? 0,
                          transferredBytes: transferred.load(ordering: .relaxed), writtenBytes: written.load(ordering: .relaxed),
                          journalBytes: journalBytes.load(ordering: .relaxed), undo: undo, resumed: false, created: false,
                          verified: verified, seconds: 0, warnings: [])
    }

    /// Bytes of the slots of `differences`.
    private func bytes(of differences: [Difference], _ source: any SyncSource) -> UInt64 {
        differences.reduce(UInt64(0)) { $0 + UInt64(source.length(of: $1.slot..<($1.slot + 1))) }
    }

    /// The undo records of a batch: each slot's old bytes (or a zero record), read from the
    /// target now. Slots journaled by an earlier run of this sync are skipped: their old
    /// bytes are already kept, and the target may now hold part of the new ones.
    private func undoRecords(_ batch: Batch, source: any SyncSource, target: Target, buffer: UnsafeMutableRawBufferPointer,
                             skipping journaled: Set<UInt64>) throws(SyncError) -> (records: [UInt8], payload: UInt64) {
        let chunkSize = source.chunkSize
        var records: [UInt8] = []
        records.reserveCapacity(buffer.count + batch.runs.reduce(0) { $0 + $1.count } * UndoJournal.recordHeaderSize)
        var payload: UInt64 = 0
        var differenceAt: [Int: Difference] = [:]
        if let differences = batch.differences { for d in differences { differenceAt[d.slot] = d } }
        for run in batch.runs {
            let length = source.length(of: run)
            let base = UInt64(run.lowerBound) * UInt64(chunkSize)
            let known = run.allSatisfy { differenceAt[$0]?.oldZero == true || journaled.contains(UInt64($0) * UInt64(chunkSize)) }
            let hole = known || target.isHole(at: base, count: length, fileSize: source.size)
            if !hole { try target.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<length]), at: base, cached: true) }
            for (k, slot) in run.enumerated() {
                let offset = UInt64(slot) * UInt64(chunkSize)
                if journaled.contains(offset) { continue }
                let from = k * chunkSize
                let bytes = UnsafeRawBufferPointer(rebasing: buffer[from..<min(from + chunkSize, length)])
                let zero = hole || differenceAt[slot]?.oldZero == true || isAllZero(bytes)
                let hash = zero ? ChunkID.zero : ChunkID.sha256(bytes)
                if !zero, let expected = differenceAt[slot], expected.oldHash != hash {
                    throw .targetChanged(path: target.path, offset: offset)
                }
                UndoJournal.encodeRecord(into: &records, offset: offset, bytes: bytes, zero: zero, digest: hash)
                if !zero { payload += UInt64(bytes.count) }
            }
        }
        return (records, payload)
    }

    /// Journals a file's bytes from `start` to `end` (its tail beyond the disk) before the file
    /// is shrunk; holes and zeros cost nothing (the rollback's resize brings them back).
    private func journalTail(target: Target, journal: UndoJournal, from start: UInt64, to end: UInt64,
                             skipping journaled: Set<UInt64>) throws(SyncError) {
        let piece = 1 << 20
        var buffer = [UInt8](repeating: 0, count: piece)
        for region in target.dataRegions(from: start, to: end) {
            var at = region.start
            while at < region.end {
                let n = Int(min(UInt64(piece), region.end - at))
                if !journaled.contains(at) {
                    try buffer.withMutableBytes { (raw) throws(SyncError) in
                        try target.read(into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<n]), at: at)
                    }
                    let slice = Array(buffer[0..<n])
                    if !slice.withUnsafeBytes({ isAllZero($0) }) {
                        var record = UndoJournal.encodeHeader(kind: .data, offset: at, length: n, digest: ChunkID.sha256(slice))
                        record += slice
                        try journal.append(record)
                    }
                }
                at += UInt64(n)
            }
        }
    }
}
