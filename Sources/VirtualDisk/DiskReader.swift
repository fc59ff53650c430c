import ChunkStore
import Foundation
import Synchronization
import SystemIO
import Vault

public enum VirtualDiskError: LifeboatError {
    case damaged(point: String, disk: String, offset: UInt64, cause: String)
    case outOfRange(disk: String, offset: UInt64, size: UInt64)

    public var description: String {
        switch self {
        case .damaged(let point, let disk, let offset, let cause):
            return "point \(point) disk \(disk) at byte \(offset) cannot be read: \(cause)"
        case .outOfRange(let disk, let offset, let size):
            return "disk \(disk) has \(size) bytes; byte \(offset) is past its end"
        }
    }

    public var kind: FailureKind {
        switch self {
        case .damaged: return .damaged
        case .outOfRange: return .usage
        }
    }
}

/// Zeros for a hole slot handed to `wholeSlot`: the largest chunk size, never written, so its
/// pages stay the kernel's shared zero page.
private nonisolated(unsafe) let zeroSlots = UnsafeRawPointer(calloc(8 << 20, 1)!)

/// Random-access reads of one disk of one recovery point: offset -> slot -> chunk id -> cache
/// or pack. Safe from many threads.
///
/// Chunks a read covers whole are decoded straight into the caller's buffer (a sequential
/// reader's kernel readahead sends such reads, several at once, and they are served in
/// parallel); chunks a read covers in part go through the chunk cache, so that small random
/// reads around one chunk fetch and verify it once.
public final class DiskReader: Sendable {
    public let point: RecoveryPoint
    public let disk: PointDisk
    private let index: DiskIndexReader
    private let chunks: ChunkStore
    private let cache: ChunkCache
    private let scratches = Mutex<[ReadScratch]>([])
    /// The slot tags this host recorded when it backed up the point, if it did: chunks read
    /// back are vouched for by them, and SHA-256 checks only those they do not vouch for.
    private let tags: SlotFingerprints?

    public var size: UInt64 { disk.size }
    public var chunkSize: Int { disk.chunkSize }

    public init(point: RecoveryPoint, disk: PointDisk, chunks: ChunkStore, cache: ChunkCache, tags: SlotFingerprints? = nil) {
        self.tags = tags
        self.point = point
        self.disk = disk
        self.chunks = chunks
        self.cache = cache
        self.index = DiskIndexReader(disk: disk, chunks: chunks, cachedNodes: 64)
    }

    /// Reads up to `buffer.count` bytes at `offset`; fewer only at the end of the disk.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(VirtualDiskError) -> Int {
        try read(into: buffer, at: offset, wholeSlot: nil)
    }

    /// Reads as `read(into:at:)` does. `wholeSlot` is given every slot the read covers in part
    /// and had to produce whole (a chunk fetched from its pack, or a hole): its first byte's
    /// offset and all its bytes, so that a caller with a page cache of its own can keep the rest
    /// of what was decoded.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64,
                     wholeSlot: ((UInt64, UnsafeRawBufferPointer) -> Void)?) throws(VirtualDiskError) -> Int {
        guard offset < disk.size, buffer.count > 0 else { return 0 }
        let length = Int(min(UInt64(buffer.count), disk.size - offset))
        let chunkSize = UInt64(disk.chunkSize)
        let firstSlot = Int(offset / chunkSize)
        let lastSlot = Int((offset + UInt64(length) - 1) / chunkSize)

        var ids: [ChunkID] = []
        ids.reserveCapacity(lastSlot - firstSlot + 1)
        do {
            var slot = firstSlot
            while slot <= lastSlot {
                let leaf = try index.leaf(containing: slot)
                let upTo = min(lastSlot, leaf.first + leaf.ids.count - 1)
                ids.append(contentsOf: leaf.ids[(slot - leaf.first)...(upTo - leaf.first)])
                slot = upTo + 1
            }
        } catch {
            throw .damaged(point: point.label, disk: disk.name, offset: offset, cause: "disk index: \(error.description)")
        }

        // Where each slot's bytes go in the buffer, and which part of the slot is wanted.
        func span(_ k: Int) -> (target: Range<Int>, from: Int, to: Int) {
            let slotStart = UInt64(firstSlot + k) * chunkSize
            let from = Int(max(offset, slotStart) - slotStart)
            let to = Int(min(offset + UInt64(length), slotStart + chunkSize) - slotStart)
            let at = Int(slotStart + UInt64(from) - offset)
            return (at..<(at + to - from), from, to)
        }
        let slotLength = { (k: Int) -> Int in Int(min(chunkSize, self.disk.size - UInt64(firstSlot + k) * chunkSize)) }

        // The recorded tags, read only when a chunk must be fetched (not for holes or cache hits).
        var loadedWindow: RecordedTags?? = nil
        func window() -> RecordedTags? {
            if case .some(let loaded) = loadedWindow { return loaded }
            let loaded = tags?.window(firstSlot..<(lastSlot + 1))
            loadedWindow = .some(loaded)
            return loaded
        }
        var whole: [Int] = []          // slots decoded straight into the buffer
        var partial: [Int] = []        // slots served through the cache
        for (k, id) in ids.enumerated() {
            let (target, from, to) = span(k)
            let out = UnsafeMutableRawBufferPointer(rebasing: buffer[target])
            if id.isZero {
                out.initializeMemory(as: UInt8.self, repeating: 0)
                if let wholeSlot, to - from < slotLength(k) {
                    wholeSlot(UInt64(firstSlot + k) * chunkSize, UnsafeRawBufferPointer(start: zeroSlots, count: slotLength(k)))
                }
            } else if from == 0 && to == slotLength(k) {
                whole.append(k)
            } else {
                partial.append(k)
            }
        }
        if !whole.isEmpty {
            let scratch = scratches.withLock { $0.popLast() } ?? ReadScratch()
            defer { scratches.withLock { if $0.count < 8 { $0.append(scratch) } } }
            do {
                // Large reads skip the page cache: the kernel caches what it asked for anyway.
                try chunks.readMany(whole.map { ids[$0] }, scratch: scratch, bypassCache: whole.count >= 4,
                                    matches: window().map { w in { i, bytes in w.matches(slot: firstSlot + whole[i], bytes) } }) { i, _ in
                    UnsafeMutableRawBufferPointer(rebasing: buffer[span(whole[i]).target])
                }
            } catch {
                throw .damaged(point: point.label, disk: disk.name, offset: offset, cause: error.description)
            }
        }
        // Partial slots: from the cache when it holds them.
        partial.removeAll { k in
            let (target, from, to) = span(k)
            return cache.copy(ids[k], from: from, to: to, into: UnsafeMutableRawBufferPointer(rebasing: buffer[target]))
        }
        if !partial.isEmpty {
            func place(_ plain: [ChunkID: [UInt8]]) throws(VirtualDiskError) {
                for k in partial {
                    guard let bytes = plain[ids[k]] else { continue }
                    let (target, from, to) = span(k)
                    // A chunk of another length than its slot (a damaged or crafted index) would
                    // be copied from past its end.
                    guard bytes.count == slotLength(k) else {
                        throw .damaged(point: point.label, disk: disk.name, offset: UInt64(firstSlot + k) * chunkSize,
                                       cause: "slot \(firstSlot + k)'s chunk \(ids[k].short) holds \(bytes.count) bytes, the slot \(slotLength(k))")
                    }
                    bytes.withUnsafeBytes {
                        UnsafeMutableRawBufferPointer(rebasing: buffer[target]).copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[from..<to]))
                        if let wholeSlot, bytes.count == slotLength(k) { wholeSlot(UInt64(firstSlot + k) * chunkSize, $0) }
                    }
                }
            }
            let missing = Array(Set(partial.map { ids[$0] }))
            var slotOf: [ChunkID: Int] = [:]
            for k in partial { slotOf[ids[k]] = firstSlot + k }
            let (mine, others) = cache.claim(missing)
            do {
                defer { cache.release(mine) }
                if !mine.isEmpty { try place(Dictionary(try fetch(mine, slots: mine.map { slotOf[$0] ?? -1 }, window: window()), uniquingKeysWith: { a, _ in a })) }
            }
            if !others.isEmpty {
                // Another thread is fetching these: wait, then take them from the cache; what
                // is not there (its fetch failed, or it was evicted already) is fetched here.
                cache.wait(for: others)
                let waited = Set(others)
                var still = Set<ChunkID>()
                for k in partial where waited.contains(ids[k]) {
                    let (target, from, to) = span(k)
                    if !cache.copy(ids[k], from: from, to: to, into: UnsafeMutableRawBufferPointer(rebasing: buffer[target])) {
                        still.insert(ids[k])
                    }
                }
                if !still.isEmpty {
                    let again = Array(still)
                    try place(Dictionary(try fetch(again, slots: again.map { slotOf[$0] ?? -1 }, window: window()), uniquingKeysWith: { a, _ in a }))
                }
            }
        }
        return length
    }

    /// Reads, verifies and caches `ids`.
    func fetch(_ ids: [ChunkID], slots: [Int], window: RecordedTags?) throws(VirtualDiskError) -> [(ChunkID, [UInt8])] {
        let scratch = scratches.withLock { $0.popLast() } ?? ReadScratch()
        defer { scratches.withLock { if $0.count < 8 { $0.append(scratch) } } }
        // Decoded into one block of a slot per chunk (no chunk is longer than the vault's chunk
        // size), then each chunk copied out for the cache; readMany says each one's length.
        let slot = disk.chunkSize
        var lengths = [Int](repeating: 0, count: ids.count)
        do {
            let block = UnsafeMutableRawBufferPointer.allocate(byteCount: max(ids.count * slot, 1), alignment: 64)
            defer { block.deallocate() }
            try chunks.readMany(ids, scratch: scratch, bypassCache: false,
                                matches: window.map { w in { i, bytes in w.matches(slot: slots[i], bytes) } }) { i, length in
                lengths[i] = length
                return UnsafeMutableRawBufferPointer(rebasing: block[(i * slot)..<(i * slot + min(length, slot))])
            }
            var result: [(ChunkID, [UInt8])] = []
            for (i, id) in ids.enumerated() {
                guard lengths[i] <= slot else {
                    throw VirtualDiskError.damaged(point: point.label, disk: disk.name, offset: UInt64(max(slots[i], 0)) * UInt64(slot),
                                                   cause: "chunk \(id.short) holds \(lengths[i]) bytes, more than a slot")
                }
                let chunk = UnsafeRawBufferPointer(rebasing: block[(i * slot)..<(i * slot + lengths[i])])
                cache.put(id, chunk)
                result.append((id, Array(chunk)))
            }
            return result
        } catch let error as VirtualDiskError {
            throw error
        } catch let error as ChunkStoreError {
            let offset = damagedOffset(error)
            throw .damaged(point: point.label, disk: disk.name, offset: offset, cause: error.description)
        } catch {
            throw .damaged(point: point.label, disk: disk.name, offset: 0, cause: "\(error)")
        }
    }

    /// The first byte of the disk that uses the chunk an error names (for the log line).
    private func damagedOffset(_ error: ChunkStoreError) -> UInt64 {
        let bad: ChunkID
        switch error {
        case .damagedChunk(let id, _, _, _), .missingChunk(let id): bad = id
        default: return 0
        }
        var slot = 0
        while slot < disk.slotCount {
            guard let leaf = try? index.leaf(containing: slot) else { return 0 }
            if let i = leaf.ids.firstIndex(of: bad) { return UInt64(leaf.first + i) * UInt64(disk.chunkSize) }
            slot = leaf.first + leaf.ids.count
        }
        return 0
    }

    // MARK: - Holes

    /// The first offset at or after `offset` that holds data (SEEK_DATA), or nil if none.
    public func nextData(from offset: UInt64) throws(VirtualDiskError) -> UInt64? {
        try scan(from: offset, wantData: true)
    }

    /// The first offset at or after `offset` in a hole (SEEK_HOLE); the disk's end counts as one.
    public func nextHole(from offset: UInt64) throws(VirtualDiskError) -> UInt64 {
        try scan(from: offset, wantData: false) ?? disk.size
    }

    private func scan(from offset: UInt64, wantData: Bool) throws(VirtualDiskError) -> UInt64? {
        guard offset < disk.size else { return nil }
        var slot = Int(offset / UInt64(disk.chunkSize))
        while slot < disk.slotCount {
            let leaf: (first: Int, ids: [ChunkID])
            do {
                leaf = try index.leaf(containing: slot)
            } catch {
                throw .damaged(point: point.label, disk: disk.name, offset: offset, cause: error.description)
            }
            for i in (slot - leaf.first)..<leaf.ids.count where leaf.ids[i].isZero != wantData {
                return max(offset, UInt64(leaf.first + i) * UInt64(disk.chunkSize))
            }
            slot = leaf.first + leaf.ids.count
        }
        return nil
    }
}
