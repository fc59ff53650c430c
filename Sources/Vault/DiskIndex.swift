import ChunkStore
import Synchronization
import SystemIO

/// A disk index: the chunk id of every slot of a disk, stored as a tree of index chunks
/// (docs/FORMAT.md, "Disk indexes"). A node holds up to 2048 ids (64 KiB); leaves hold the ids
/// of data chunks, inner nodes the ids of the nodes below. Node boundaries depend only on slot
/// numbers, so an unchanged region of the disk gives byte-identical nodes, which dedup stores
/// once: a point's metadata grows with what changed, not with the disk.
public enum DiskIndex {
    public static let fanout = 2048

    /// Levels needed for `slots` slots (at least 1).
    public static func depth(forSlots slots: Int) -> Int {
        var depth = 1
        var capacity = fanout
        while capacity < slots {
            depth += 1
            capacity = capacity.multipliedReportingOverflow(by: fanout).overflow ? Int.max : capacity * fanout
        }
        return depth
    }
}

/// Where a finished index node goes: the backup stores it as a chunk and returns its id.
public protocol IndexNodeSink {
    func store(node: [UInt8]) throws -> ChunkID
}

/// Builds a disk index tree from slot ids appended in order.
public struct DiskIndexWriter {
    private var levels: [[UInt8]] = [[]]
    private var slots = 0
    private let sink: any IndexNodeSink

    public init(sink: any IndexNodeSink) {
        self.sink = sink
    }

    public mutating func append(_ id: ChunkID) throws {
        try append(id, level: 0)
        slots += 1
    }

    // A full level is emitted only when one more id arrives, so that the top of the tree is
    // known only at the end and matches `DiskIndex.depth(forSlots:)`.
    private mutating func append(_ id: ChunkID, level: Int) throws {
        if levels.count <= level { levels.append([]) }
        if levels[level].count == DiskIndex.fanout * ChunkID.byteCount {
            let node = levels[level]
            levels[level].removeAll(keepingCapacity: true)
            try append(try emit(node), level: level + 1)
        }
        id.append(to: &levels[level])
    }

    private func emit(_ node: [UInt8]) throws -> ChunkID {
        if node.allSatisfy({ $0 == 0 }) { return .zero }
        return try sink.store(node: node)
    }

    /// Flushes partial nodes; returns the root and the depth.
    public mutating func finish() throws -> (root: ChunkID, depth: Int) {
        let depth = DiskIndex.depth(forSlots: slots)
        for level in 0..<(depth - 1) {
            if level < levels.count && !levels[level].isEmpty {
                let node = levels[level]
                levels[level].removeAll()
                try append(try emit(node), level: level + 1)
            }
        }
        let top = depth - 1 < levels.count ? levels[depth - 1] : []
        return (try emit(top), depth)
    }
}

/// Reads a disk index tree, caching a few nodes.
public final class DiskIndexReader: Sendable {
    public let disk: PointDisk
    private let chunks: ChunkStore
    private let cache = Mutex<[ChunkID: [ChunkID]]>([:])
    private let cacheLimit: Int

    public init(disk: PointDisk, chunks: ChunkStore, cachedNodes: Int = 16) {
        self.disk = disk
        self.chunks = chunks
        self.cacheLimit = cachedNodes
    }

    /// The ids in one node; a zero id stands for a node of zeros.
    public func node(_ id: ChunkID, expected: Int) throws(ChunkStoreError) -> [ChunkID] {
        if id.isZero { return [ChunkID](repeating: .zero, count: expected) }
        if let hit = cache.withLock({ $0[id] }) { return hit }
        let bytes = try chunks.read(id)
        guard bytes.count % ChunkID.byteCount == 0 else {
            throw .damagedChunk(id, pack: "index node", offset: 0, reason: "length \(bytes.count) is not a multiple of 32")
        }
        let ids = bytes.withUnsafeBytes { raw in
            (0..<(raw.count / 32)).map { ChunkID(raw, at: $0 * 32) }
        }
        cache.withLock { c in
            // Evict one node, not all: random reads over a disk touch every leaf in turn, and
            // re-reading a node costs a decompression and a SHA-256 of 64 KiB.
            if c.count >= cacheLimit, let victim = c.keys.randomElement() { c.removeValue(forKey: victim) }
            c[id] = ids
        }
        return ids
    }

    /// Slots covered by one node at `level` (0 = leaf).
    private func span(_ level: Int) -> Int {
        var s = 1
        for _ in 0...level { s = s.multipliedReportingOverflow(by: DiskIndex.fanout).overflow ? Int.max : s * DiskIndex.fanout }
        return s
    }

    /// The leaf holding `slot`: its first slot and its ids.
    public func leaf(containing slot: Int) throws(ChunkStoreError) -> (first: Int, ids: [ChunkID]) {
        let slots = disk.slotCount
        precondition(slot >= 0 && slot < slots)
        var id = disk.root
        var first = 0
        var level = disk.indexDepth - 1
        while level > 0 {
            let childSpan = span(level - 1)
            let children = (min(slots - first, span(level)) + childSpan - 1) / childSpan
            let ids = try node(id, expected: children)
            let index = (slot - first) / childSpan
            guard index < ids.count else {
                throw .damagedChunk(id, pack: "index node", offset: 0, reason: "has \(ids.count) entries, slot \(slot) needs \(index + 1)")
            }
            id = ids[index]
            first += index * childSpan
            level -= 1
        }
        let count = min(slots - first, DiskIndex.fanout)
        let ids = try node(id, expected: count)
        guard ids.count == count else {
            throw .damagedChunk(id, pack: "index node", offset: 0, reason: "leaf has \(ids.count) entries, expected \(count)")
        }
        return (first, ids)
    }

    public func id(ofSlot slot: Int) throws(ChunkStoreError) -> ChunkID {
        let (first, ids) = try leaf(containing: slot)
        return ids[slot - first]
    }

    /// Calls `visit` with every leaf in slot order.
    public func forEachLeaf(_ visit: (Int, [ChunkID]) throws -> Void) throws {
        var slot = 0
        while slot < disk.slotCount {
            let (first, ids) = try leaf(containing: slot)
            try visit(first, ids)
            slot = first + ids.count
        }
    }
}
