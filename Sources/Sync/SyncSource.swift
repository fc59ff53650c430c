import ChunkStore
import SystemIO
import Vault
import VirtualDisk

/// What a sync writes: a virtual disk cut into slots of `chunkSize` bytes (the last one may be
/// shorter). A slot's chunk id is its checksum, so a delta sync compares the target with ids
/// alone; a slot whose id is not known (a sandbox's written slots) is read and compared by bytes.
public protocol SyncSource: Sendable {
    /// For messages: `web01@2026-03-01T00:00:00Z (1a2b3c4d5e6f)`.
    var label: String { get }
    /// What `lifeboat sync --resume` resolves again to find the same source: must name
    /// immutable content (a point id, not `@latest`).
    var resumeSpec: String { get }
    var diskName: String { get }
    var size: UInt64 { get }
    var chunkSize: Int { get }
    /// The ids of `slots`, in order; nil for a slot whose id is not known.
    func ids(_ slots: Range<Int>) throws(SyncError) -> [ChunkID?]
    /// Reads the bytes of consecutive `slots` into `buffer`, which is exactly their length.
    func read(_ slots: Range<Int>, into buffer: UnsafeMutableRawBufferPointer) throws(SyncError)
    /// Called once every slot is written (and verified), before the sync is recorded as
    /// complete: a source that could not stay still throws, and the sync stays unfinished,
    /// so it can still be rolled back.
    func finish() throws(SyncError)
    /// Keyed tags of the source's slots recorded when this host made the point, if it has them:
    /// a target slot with the same tag holds the source's bytes, known without SHA-256.
    var recordedTags: SlotFingerprints? { get }
}

extension SyncSource {
    public func finish() throws(SyncError) {}
    public var recordedTags: SlotFingerprints? { nil }

    public var slotCount: Int { Int((size + UInt64(chunkSize) - 1) / UInt64(chunkSize)) }

    /// Bytes of `slots` (the last slot of the disk may be short).
    public func length(of slots: Range<Int>) -> Int {
        guard !slots.isEmpty else { return 0 }
        let start = UInt64(slots.lowerBound) * UInt64(chunkSize)
        return Int(min(UInt64(slots.upperBound) * UInt64(chunkSize), size) - start)
    }
}

/// One disk of a recovery point: every slot's id is known from the disk index, and bytes come
/// from `DiskReader`, which verifies every chunk against its id.
public final class PointSource: SyncSource {
    public let point: RecoveryPoint
    public let disk: PointDisk
    private let index: DiskIndexReader
    private let reader: DiskReader
    public let recordedTags: SlotFingerprints?

    public init(vault: Vault, point: RecoveryPoint, disk name: String) throws(SyncError) {
        do throws(VaultError) {
            self.disk = try point.disk(name)
        } catch { throw .source(error) }
        self.point = point
        self.recordedTags = vault.recordedSlotTags(point: point, disk: name)
        self.index = DiskIndexReader(disk: disk, chunks: vault.chunks, cachedNodes: 64)
        // Whole slots are decoded straight into the caller's buffer; the cache only serves the
        // short last slot.
        self.reader = DiskReader(point: point, disk: disk, chunks: vault.chunks,
                                 cache: ChunkCache(capacityBytes: 1 << 20, slotSize: disk.chunkSize), tags: recordedTags)
    }

    public var label: String { point.label }
    public var resumeSpec: String { "\(point.machine)@\(point.id)" }
    public var diskName: String { disk.name }
    public var size: UInt64 { disk.size }
    public var chunkSize: Int { disk.chunkSize }

    public func ids(_ slots: Range<Int>) throws(SyncError) -> [ChunkID?] {
        var out: [ChunkID?] = []
        out.reserveCapacity(slots.count)
        var slot = slots.lowerBound
        while slot < slots.upperBound {
            let leaf: (first: Int, ids: [ChunkID])
            do {
                leaf = try index.leaf(containing: slot)
            } catch {
                throw .sourceRead(.damaged(point: point.label, disk: disk.name, offset: UInt64(slot) * UInt64(chunkSize),
                                           cause: "disk index: \(error.description)"))
            }
            let upTo = min(slots.upperBound, leaf.first + leaf.ids.count)
            for s in slot..<upTo { out.append(leaf.ids[s - leaf.first]) }
            slot = upTo
        }
        return out
    }

    public func read(_ slots: Range<Int>, into buffer: UnsafeMutableRawBufferPointer) throws(SyncError) {
        do throws(VirtualDiskError) {
            let n = try reader.read(into: buffer, at: UInt64(slots.lowerBound) * UInt64(chunkSize))
            guard n == buffer.count else {
                throw .outOfRange(disk: disk.name, offset: UInt64(slots.lowerBound) * UInt64(chunkSize) + UInt64(n), size: disk.size)
            }
        } catch { throw .sourceRead(error) }
    }
}
