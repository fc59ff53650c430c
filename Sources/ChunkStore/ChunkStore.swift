import Glibc
import ObjectStore
import Synchronization
import SystemIO

/// Parameters fixed when a vault is created.
public struct ChunkParameters: Sendable, Equatable {
    public var chunkSize: Int
    public var compression: CompressionSetting

    public init(chunkSize: Int, compression: CompressionSetting) {
        self.chunkSize = chunkSize
        self.compression = compression
    }
}

/// Chunks in packs in an object store: lookup, reading with verification, and writing sessions.
public final class ChunkStore: Sendable {
    public let store: any ObjectStore
    public let parameters: ChunkParameters
    public let cacheDirectory: String
    private let table: Mutex<LocationTable>

    public init(store: any ObjectStore, parameters: ChunkParameters, cacheDirectory: String,
                acceptIndex: (String) -> Bool = { _ in true }) throws(ChunkStoreError) {
        self.store = store
        self.parameters = parameters
        self.cacheDirectory = cacheDirectory
        self.table = Mutex(try LocationTable.open(store: store, directory: cacheDirectory, accept: acceptIndex))
    }

    /// The chunk locations known when the store was opened or last refreshed.
    public var locations: LocationTable { table.withLock { $0 } }

    /// Merges index objects written since (by this process or others).
    public func refresh() throws(ChunkStoreError) {
        let fresh = try LocationTable.open(store: store, directory: cacheDirectory)
        table.withLock { $0 = fresh }
    }

    public func location(_ id: ChunkID) throws(ChunkStoreError) -> ChunkLocation? {
        try locations.lookup(id)
    }

    /// Reads one chunk and checks it against its id.
    public func read(_ id: ChunkID) throws(ChunkStoreError) -> [UInt8] {
        guard let location = try location(id) else { throw .missingChunk(id) }
        var out = [UInt8](repeating: 0, count: Int(location.rawLength))
        let stored: [UInt8]
        do {
            stored = try store.read(PackFormat.objectName(location.pack), at: UInt64(location.offset), count: Int(location.storedLength))
        } catch { throw .store(error) }
        try out.withMutableBytes { (raw) throws(ChunkStoreError) in
            try stored.withBytes { (s) throws(ChunkStoreError) in
                try ChunkStore.open(id: id, location: location, stored: s, into: raw)
            }
        }
        return out
    }

    /// Decodes stored bytes into `output` (exactly rawLength bytes) and verifies the id.
    public static func open(id: ChunkID, location: ChunkLocation, stored: UnsafeRawBufferPointer,
                            into output: UnsafeMutableRawBufferPointer) throws(ChunkStoreError) {
        let packName = PackFormat.objectName(location.pack)
        switch location.flags.encoding {
        case ChunkFlags.stored:
            guard stored.count == output.count else {
                throw .damagedChunk(id, pack: packName, offset: location.offset, reason: "stored size differs from its length")
            }
            output.copyMemory(from: stored)
        case ChunkFlags.zstd:
            switch zstdDecompress(stored, into: output) {
            case .success(let n):
                guard n == output.count else {
                    throw .damagedChunk(id, pack: packName, offset: location.offset, reason: "decompressed to \(n) bytes, expected \(output.count)")
                }
            case .failure(.failed(let reason)):
                throw .damagedChunk(id, pack: packName, offset: location.offset, reason: "cannot decompress: \(reason)")
            }
        default:
            throw .damagedChunk(id, pack: packName, offset: location.offset, reason: "unknown encoding \(location.flags.encoding)")
        }
        guard ChunkID.sha256(UnsafeRawBufferPointer(output)) == id else {
            throw .damagedChunk(id, pack: packName, offset: location.offset, reason: "content does not match its id")
        }
    }

    /// Reads many chunks, coalescing neighbours in the same pack into one read.
    /// `visit` receives each chunk's index in `ids` and its verified plaintext.
    public func readMany(_ ids: [ChunkID], visit: (Int, UnsafeRawBufferPointer) throws -> Void) throws {
        var located: [(index: Int, location: ChunkLocation)] = []
        located.reserveCapacity(ids.count)
        for (i, id) in ids.enumerated() {
            guard let location = try location(id) else { throw ChunkStoreError.missingChunk(id) }
            located.append((i, location))
        }
        located.sort { a, b in
            a.location.pack != b.location.pack ? a.location.pack < b.location.pack : a.location.offset < b.location.offset
        }
        var output = [UInt8](repeating: 0, count: parameters.chunkSize)
        var start = 0
        while start < located.count {
            // A run of chunks in one pack whose gaps are small enough that reading through them is cheaper.
            var end = start + 1
            let pack = located[start].location.pack
            var runEnd = UInt64(located[start].location.offset) + UInt64(located[start].location.storedLength)
            while end < located.count, located[end].location.pack == pack,
                  UInt64(located[end].location.offset) <= runEnd + 65536,
                  UInt64(located[end].location.offset) + UInt64(located[end].location.storedLength) - UInt64(located[start].location.offset) <= 8 << 20 {
                runEnd = max(runEnd, UInt64(located[end].location.offset) + UInt64(located[end].location.storedLength))
                end += 1
            }
            let runStart = UInt64(located[start].location.offset)
            let bytes: [UInt8]
            do {
                bytes = try store.read(PackFormat.objectName(pack), at: runStart, count: Int(runEnd - runStart))
            } catch { throw ChunkStoreError.store(error) }
            try bytes.withUnsafeBytes { raw in
                for k in start..<end {
                    let (index, location) = located[k]
                    let from = Int(UInt64(location.offset) - runStart)
                    let stored = UnsafeRawBufferPointer(rebasing: raw[from..<(from + Int(location.storedLength))])
                    if output.count < Int(location.rawLength) { output = [UInt8](repeating: 0, count: Int(location.rawLength)) }
                    try output.withUnsafeMutableBytes { out in
                        let target = UnsafeMutableRawBufferPointer(rebasing: out[0..<Int(location.rawLength)])
                        try ChunkStore.open(id: ids[index], location: location, stored: stored, into: target)
                        try visit(index, UnsafeRawBufferPointer(target))
                    }
                }
            }
            start = end
        }
    }

    /// Starts a writing session (one backup).
    public func writer(uploaders: Int = 2) -> ChunkWriter {
        ChunkWriter(chunkStore: self, uploaders: uploaders)
    }
}

/// One session's writes: claims new ids (so each is compressed once), groups stored chunks into
/// packs, uploads them in the background, and writes index objects for them.
///
/// Nothing written here is reachable until a manifest names it; a crash leaves only
/// unreferenced packs that garbage collection removes after its grace period.
public final class ChunkWriter: Sendable {
    public let chunkStore: ChunkStore

    private struct State {
        var claimed: Set<ChunkID> = []
        var builder = PackBuilder()
        var uploaded: [(pack: ChunkID, entries: [PackEntry])] = []
        var indexNames: [String] = []
        var failure: ChunkStoreError? = nil
        var storedBytes: UInt64 = 0
        var packCount = 0
    }
    private final class Shared: Sendable {
        let state = Mutex(State())
    }
    private let shared = Shared()
    private let uploads: BoundedQueue<(ChunkID, [UInt8], [PackEntry])>
    private let workers: [Worker]

    /// Index objects are written every this many packs, so an interrupted backup's packs are
    /// found again by the next one.
    static let packsPerIndex = 64

    init(chunkStore: ChunkStore, uploaders: Int) {
        self.chunkStore = chunkStore
        let queue = BoundedQueue<(ChunkID, [UInt8], [PackEntry])>(capacity: 2)
        self.uploads = queue
        let shared = self.shared
        let store = chunkStore.store
        workers = (0..<uploaders).map { n in
            Worker(name: "pack-upload-\(n)") {
                while let (id, bytes, entries) = queue.pop() {
                    do throws(ObjectStoreError) {
                        try store.put(PackFormat.objectName(id), bytes)
                        shared.state.withLock { $0.uploaded.append((id, entries)) }
                    } catch {
                        shared.state.withLock { s in if s.failure == nil { s.failure = .store(error) } }
                    }
                }
            }
        }
    }

    /// True when the chunk must be stored by the caller: not in the vault, not claimed before.
    public func claim(_ id: ChunkID) throws(ChunkStoreError) -> Bool {
        if try shared.state.withLock({ (s) throws(ChunkStoreError) -> Bool in
            if let failure = s.failure { throw failure }
            return s.claimed.contains(id)
        }) { return false }
        if try chunkStore.location(id) != nil { return false }
        return shared.state.withLock { $0.claimed.insert(id).inserted }
    }

    /// Adds a claimed chunk's stored bytes to the current pack.
    public func add(id: ChunkID, stored: [UInt8], rawLength: Int, flags: ChunkFlags) throws(ChunkStoreError) {
        let full = try shared.state.withLock { (s) throws(ChunkStoreError) -> PackBuilder? in
            if let failure = s.failure { throw failure }
            s.builder.add(id: id, stored: stored, rawLength: rawLength, flags: flags)
            s.storedBytes += UInt64(stored.count)
            guard s.builder.size >= PackFormat.targetSize else { return nil }
            let full = s.builder
            s.builder = PackBuilder()
            return full
        }
        if let full { try upload(full) }
        try writeIndexIfDue(final: false)
    }

    private func upload(_ builder: consuming PackBuilder) throws(ChunkStoreError) {
        let (id, bytes, entries) = builder.finish()
        shared.state.withLock { $0.packCount += 1 }
        uploads.push((id, bytes, entries))
    }

    private func writeIndexIfDue(final: Bool) throws(ChunkStoreError) {
        let batch: [(pack: ChunkID, entries: [PackEntry])]? = shared.state.withLock { s in
            guard s.uploaded.count >= ChunkWriter.packsPerIndex || (final && !s.uploaded.isEmpty) else { return nil }
            let batch = s.uploaded
            s.uploaded.removeAll()
            return batch
        }
        guard let batch else { return }
        let bytes = IndexObject(packs: batch).encode()
        let name = IndexObject.objectName(for: bytes)
        do {
            try chunkStore.store.put(name, bytes)
        } catch { throw .store(error) }
        shared.state.withLock { $0.indexNames.append(name) }
    }

    /// Bytes stored (after compression) so far.
    public var storedBytes: UInt64 { shared.state.withLock { $0.storedBytes } }

    /// Flushes the last pack, waits for every upload, writes the last index object.
    /// When this returns, every chunk added is durable and findable through an index object.
    public func finish() throws(ChunkStoreError) -> (packs: Int, indexObjects: [String]) {
        let last: PackBuilder? = shared.state.withLock { s in
            if s.builder.isEmpty { return nil }
            let b = s.builder
            s.builder = PackBuilder()
            return b
        }
        if let last { try upload(last) }
        uploads.close()
        for worker in workers { worker.join() }
        if let failure = shared.state.withLock({ $0.failure }) { throw failure }
        try writeIndexIfDue(final: true)
        return shared.state.withLock { ($0.packCount, $0.indexNames) }
    }

    /// Stops the uploaders after a failure elsewhere; nothing more is written.
    public func abandon() {
        uploads.close()
        for worker in workers { worker.join() }
    }
}
