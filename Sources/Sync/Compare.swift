import ChunkStore
import Foundation
import Synchronization
import SystemIO
import Vault

/// A slot where the target differs from the source, found by the comparison pass.
struct Difference: Sendable {
    var slot: Int
    /// The target's old bytes were all zero (journaled without payload).
    var oldZero: Bool
    /// SHA-256 of the old bytes: checked again when they are journaled.
    var oldHash: ChunkID
    /// The comparison journaled the old bytes it read (see `Comparison.journal`).
    var journaled = false
}

/// The comparison pass of a delta sync (and of --verify): reads the target in large regions,
/// several at once, and compares every slot with the source's chunk id (SHA-256; an all-zero
/// slot has the zero id), or with the source's bytes where the id is not known. Regions of a
/// file that are holes are not read.
struct Comparison {
    let source: any SyncSource
    let target: Target
    let targetSize: UInt64
    let regionSlots: Int
    let workers: Int
    /// Whether a slot may be matched by the tags recorded with the source (not for --verify,
    /// which checks every slot against its SHA-256 id).
    var useRecordedTags = true
    /// Where the old bytes of the slots that differ are journaled as they are found, unflushed,
    /// while they are in hand: the write pass then neither reads them again nor waits for
    /// the journal's writes (one flush before the target is touched). At most `journalBudget`
    /// bytes; the slots past it are journaled by the write pass.
    var journal: UndoJournal? = nil
    var journalBudget: UInt64 = 0
    /// Called with each region's differences as soon as it is compared (and, with a journal,
    /// journaled: every difference then must be, whatever the budget, and a failed append fails
    /// the comparison), with the journal's end after its records. The writes of a delta follow
    /// the comparison this way. Returning false stops the comparison.
    var onRegion: (@Sendable (_ region: Int, _ differences: [Difference], _ journalEnd: UInt64) -> Bool)? = nil

    func differences(from first: Int, progress: @escaping @Sendable (UInt64) -> Void) throws(SyncError) -> [Difference] {
        let count = source.slotCount
        guard first < count else { return [] }
        let chunkSize = source.chunkSize
        let regions = BoundedQueue<Int>(capacity: workers * 2)
        let found = Mutex<[Difference]>([])
        let failure = Mutex<SyncError?>(nil)
        let done = Atomic<UInt64>(0)
        let source = self.source, target = self.target, targetSize = self.targetSize, regionSlots = self.regionSlots
        let tags = useRecordedTags ? source.recordedTags : nil
        let journal = self.journal, journalBudget = self.journalBudget, onRegion = self.onRegion
        let journalUsed = Atomic<UInt64>(0)
        let journaling = Atomic<Bool>(journal != nil)

        let pool = (0..<workers).map { n in
            Worker(name: "sync-compare-\(n)") {
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: regionSlots * chunkSize, alignment: SystemFile.directAlignment)
                let theirs = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkSize, alignment: SystemFile.directAlignment)
                defer { buffer.deallocate(); theirs.deallocate() }
                var mine: [Difference] = []
                while let start = regions.pop() {
                    do throws(SyncError) {
                        if Cancellation.requested { throw .interrupted(path: target.path, undo: target.undo) }
                        let slots = start..<min(start + regionSlots, count)
                        let ids = try source.ids(slots)
                        let length = source.length(of: slots)
                        let offset = UInt64(start) * UInt64(chunkSize)
                        let hole = offset >= targetSize || target.isHole(at: offset, count: length, fileSize: targetSize)
                        if !hole {
                            // Only the data of a sparse file is read; its holes are zeros.
                            let end = offset + UInt64(length)
                            let parts = target.dataRegions(from: offset, to: end).filter { $0.start >= offset && $0.start < $0.end }
                            if parts.count == 1 && parts[0].start == offset && parts[0].end == end {
                                try target.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<length]), at: offset)
                            } else {
                                UnsafeMutableRawBufferPointer(rebasing: buffer[0..<length]).initializeMemory(as: UInt8.self, repeating: 0)
                                for part in parts {
                                    let from = Int(part.start - offset), to = Int(part.end - offset)
                                    try target.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[from..<to]), at: part.start)
                                }
                            }
                        }
                        let recorded = hole ? nil : tags?.window(slots)
                        let foundBefore = mine.count
                        for (k, slot) in slots.enumerated() {
                            let from = k * chunkSize
                            let bytes = UnsafeRawBufferPointer(rebasing: buffer[from..<min(from + chunkSize, length)])
                            let zero = hole || isAllZero(bytes)
                            if let id = ids[k] {
                                if !zero, !id.isZero, let recorded, recorded.matches(slot: slot, bytes) {
                                    continue  // the slot holds the source's bytes
                                }
                                if id.isZero {
                                    if !zero { mine.append(Difference(slot: slot, oldZero: false, oldHash: ChunkID.sha256(bytes))) }
                                } else if zero {
                                    mine.append(Difference(slot: slot, oldZero: true, oldHash: .zero))
                                } else {
                                    let hash = ChunkID.sha256(bytes)
                                    if hash != id { mine.append(Difference(slot: slot, oldZero: false, oldHash: hash)) }
                                }
                            } else {
                                // No id: compare with the source's bytes.
                                let theirBytes = UnsafeMutableRawBufferPointer(rebasing: theirs[0..<bytes.count])
                                try source.read(slot..<(slot + 1), into: theirBytes)
                                let same = zero ? isAllZero(UnsafeRawBufferPointer(theirBytes))
                                                : memcmp(bytes.baseAddress!, theirBytes.baseAddress!, bytes.count) == 0
                                if !same { mine.append(Difference(slot: slot, oldZero: zero, oldHash: zero ? .zero : ChunkID.sha256(bytes))) }
                            }
                        }
                        var journalEnd: UInt64 = 0
                        if let journal, mine.count > foundBefore, onRegion != nil || journaling.load(ordering: .relaxed) {
                            var records: [UInt8] = []
                            for d in mine[foundBefore...] {
                                let from = (d.slot - start) * chunkSize
                                UndoJournal.encodeRecord(into: &records, offset: UInt64(d.slot) * UInt64(chunkSize),
                                                         bytes: UnsafeRawBufferPointer(rebasing: buffer[from..<min(from + chunkSize, length)]),
                                                         zero: d.oldZero, digest: d.oldHash)
                            }
                            let size = UInt64(records.count)
                            if onRegion != nil {
                                journalEnd = try journal.append(records, durable: false)
                                for i in foundBefore..<mine.count { mine[i].journaled = true }
                            } else if journalUsed.add(size, ordering: .relaxed).newValue > journalBudget {
                                journaling.store(false, ordering: .relaxed)
                            } else {
                                do throws(SyncError) {
                                    try journal.append(records, durable: false)
                                    for i in foundBefore..<mine.count { mine[i].journaled = true }
                                } catch {
                                    // The write pass journals these, and says what failed.
                                    journaling.store(false, ordering: .relaxed)
                                }
                            }
                        }
                        if let onRegion, !onRegion((start - first) / regionSlots, Array(mine[foundBefore...]), journalEnd) {
                            regions.close()
                        }
                        progress(done.add(UInt64(length), ordering: .relaxed).newValue)
                    } catch {
                        failure.withLock { if $0 == nil { $0 = error } }
                        regions.close()
                    }
                }
                found.withLock { $0.append(contentsOf: mine) }
            }
        }
        var start = first
        while start < count {
            if !regions.push(start) { break }
            start += regionSlots
        }
        regions.close()
        for worker in pool { worker.join() }
        if let error = failure.withLock({ $0 }) { throw error }
        return found.withLock { $0 }.sorted { $0.slot < $1.slot }
    }
}
