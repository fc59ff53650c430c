import Glibc
import ObjectStore
import Synchronization
import SystemIO

/// Page-aligned buffers one reader thread reuses from read to read.
// @unchecked: used by one thread at a time; pools hand it from one to the next.
public final class ReadScratch: @unchecked Sendable {
    private var memory = UnsafeMutableRawBufferPointer(start: nil, count: 0)
    private var plain = UnsafeMutableRawBufferPointer(start: nil, count: 0)
    public let decompressor = ChunkDecompressor()

    public init() {}

    deinit {
        memory.deallocate()
        plain.deallocate()
    }

    /// At least `count` bytes for stored data.
    func buffer(_ count: Int) -> UnsafeMutableRawBufferPointer {
        if memory.count < count {
            memory.deallocate()
            memory = .allocate(byteCount: max(count, 1 << 20), alignment: SystemFile.directAlignment)
        }
        return UnsafeMutableRawBufferPointer(rebasing: memory[0..<count])
    }

    /// Exactly `count` bytes for one chunk's plaintext.
    public func output(_ count: Int) -> UnsafeMutableRawBufferPointer {
        if plain.count < count {
            plain.deallocate()
            plain = .allocate(byteCount: count, alignment: SystemFile.directAlignment)
        }
        return UnsafeMutableRawBufferPointer(rebasing: plain[0..<count])
    }
}

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
    /// The table in use, and the ticket its opening took (see `install`).
    private let table: Mutex<(table: LocationTable, ticket: UInt64)>
    private let tickets = Atomic<UInt64>(0)

    public init(store: any ObjectStore, parameters: ChunkParameters, cacheDirectory: String,
                acceptIndex: (String) -> Bool = { _ in true }) throws(ChunkStoreError) {
        self.store = store
        self.parameters = parameters
        self.cacheDirectory = cacheDirectory
        self.table = Mutex((try LocationTable.open(store: store, directory: cacheDirectory, accept: acceptIndex), 0))
    }

    /// Refreshes asked for, and the last one the loaded table answers: counters, so that a
    /// refresh asked while a reload runs is not lost.
    private let requested = Atomic<UInt64>(0)
    private let answered = Atomic<UInt64>(0)

    /// The chunk locations known when the store was opened, brought up to date after a refresh
    /// on first use (a process that writes and exits never pays for the merge).
    public var locations: LocationTable {
        if requested.load(ordering: .acquiring) != answered.load(ordering: .acquiring) { try? reload() }
        return table.withLock { $0.table }
    }

    /// Installs a table unless one whose opening began later is in place already: a table holds
    /// every index object written before its ticket was taken, and two threads opening at once
    /// must not leave the older one installed.
    private func install(_ fresh: LocationTable, ticket: UInt64) {
        table.withLock { if ticket > $0.ticket { $0 = (fresh, ticket) } }
    }

    /// Marks the table out of date: index objects were written (by this process or others).
    public func refresh() {
        requested.add(1, ordering: .releasing)
    }

    /// A chunk or pack the cache names is not where it says: the cache may be out of date.
    static func isStaleLocation(_ error: ChunkStoreError) -> Bool {
        switch error {
        case .store(.notFound), .missingChunk: return true
        default: return false
        }
    }

    /// Brings the table up to date now, or fails: a backup must not judge what to store from an
    /// old table (a chunk it lists may have been deleted since).
    public func reload() throws(ChunkStoreError) {
        let wanted = requested.load(ordering: .acquiring)
        let ticket = tickets.add(1, ordering: .acquiringAndReleasing).newValue
        let fresh = try LocationTable.open(store: store, directory: cacheDirectory)
        install(fresh, ticket: ticket)
        answered.store(wanted, ordering: .releasing)
    }

    /// Rebuilds of the location cache so far (0 or 1). Under its lock, so that threads whose reads
    /// fail at once wait for the one rebuild and then try again on the rebuilt table.
    private let rebuilds = Mutex<Int>(0)
    /// The caches this process rebuilt because they disagreed with their vault: the command line
    /// tells the operator, whose vault was not at fault.
    public static let rebuiltCaches = Mutex<[String]>([])
    private var rebuildCount: Int { rebuilds.withLock { $0 } }

    /// Rebuilds the location cache from the index objects, at most once per store (index objects
    /// that disagree with their packs cost one rebuild, not one per read). Returns whether a read
    /// begun when `seen` rebuilds had been done should be tried again: the cache was rebuilt since,
    /// by this call or another thread's.
    private func rebuildCache(after seen: Int) throws(ChunkStoreError) -> Bool {
        try rebuilds.withLock { (count: inout Int) throws(ChunkStoreError) -> Bool in
            if count > seen { return true }
            if count > 0 { return false }
            let ticket = tickets.add(1, ordering: .acquiringAndReleasing).newValue
            install(try LocationTable.open(store: store, directory: cacheDirectory, rebuild: true), ticket: ticket)
            count = 1
            ChunkStore.rebuiltCaches.withLock { $0.append(cacheDirectory) }
            return true
        }
    }

    /// Whether a read's failure may be the location cache's (a local file) rather than the
    /// vault's: the cache is unreadable, has no record of a chunk even after a reload (a damaged
    /// id), or places a chunk found damaged where its pack's own directory does not.
    private func cacheIsSuspect(_ error: ChunkStoreError) -> Bool {
        switch error {
        case .cache, .missingChunk:
            return true
        case .damagedChunk(let id, _, _, _):
            guard let location = try? location(id) else { return true }
            // A pack whose directory cannot be read is damaged itself: the error stands.
            guard let entries = try? packDirectory(PackFormat.objectName(location.pack)) else { return false }
            guard let entry = entries.first(where: { $0.id == id }) else { return true }
            return entry.offset != location.offset || entry.storedLength != location.storedLength
                || entry.rawLength != location.rawLength || entry.flags != location.flags
        default:
            return false
        }
    }

    /// Runs a read, recovering from what is not the vault's damage: a location cache out of date
    /// (a chunk written, or a pack moved by garbage collection, since it was loaded: reloaded, and
    /// twice more, as a reload during a garbage collection may still see a doomed copy), or one
    /// that is wrong (rebuilt from the index objects).
    private func recovering<T>(_ read: () throws(ChunkStoreError) -> T) throws(ChunkStoreError) -> T {
        var reloads = 0
        var retried = false
        while true {
            let seen = rebuildCount
            do {
                return try read()
            } catch {
                if reloads < 2, ChunkStore.isStaleLocation(error) {
                    reloads += 1
                    try reload()
                } else if !retried, rebuildCount > seen || cacheIsSuspect(error), try rebuildCache(after: seen) {
                    retried = true
                } else {
                    throw error
                }
            }
        }
    }

    /// A pack's own directory, checked against its trailer: what the pack holds, whatever any
    /// index or cache says.
    public func packDirectory(_ name: String, size knownSize: UInt64? = nil) throws(ChunkStoreError) -> [PackEntry] {
        var found = knownSize
        if found == nil {
            do { found = try store.size(name) } catch { throw .store(error) }
        }
        guard let size = found else { throw .store(.notFound(name: name, store: store.location)) }
        guard size >= UInt64(PackFormat.headerSize + PackFormat.trailerSize) else {
            throw .badPack(name, "only \(size) bytes long")
        }
        let trailerBytes: [UInt8]
        do {
            trailerBytes = try store.read(name, at: size - UInt64(PackFormat.trailerSize), count: PackFormat.trailerSize)
        } catch { throw .store(error) }
        let trailer = try PackFormat.parseTrailer(trailerBytes, packSize: size, pack: name)
        let directory: [UInt8]
        do {
            directory = try store.read(name, at: trailer.directoryOffset, count: Int(trailer.count) * PackEntry.encodedSize)
        } catch { throw .store(error) }
        return try PackFormat.parseDirectory(directory, trailer: trailer, pack: name)
    }

    public func location(_ id: ChunkID) throws(ChunkStoreError) -> ChunkLocation? {
        let seen = rebuildCount
        do {
            return try locations.lookup(id)
        } catch {
            // The cache could not answer (a damaged record): rebuilt once, then asked again.
            guard case .cache = error, try rebuildCache(after: seen) else { throw error }
            return try locations.lookup(id)
        }
    }

    /// Reads one chunk and checks it against its id.
    public func read(_ id: ChunkID) throws(ChunkStoreError) -> [UInt8] {
        try recovering { () throws(ChunkStoreError) in try readOnce(id) }
    }

    /// No stored chunk is larger than the largest chunk size (8 MiB) plus zstd's worst case: a
    /// larger length comes from a damaged index and must not become a read of gigabytes.
    public static let maximumStoredLength: UInt32 = (8 << 20) + (1 << 20)
    /// A chunk's length once opened: the largest chunk size a vault can have (index nodes are smaller).
    public static let maximumRawLength: UInt32 = 8 << 20

    private static func checkLength(_ location: ChunkLocation, of id: ChunkID) throws(ChunkStoreError) {
        guard location.storedLength <= maximumStoredLength else {
            throw .damagedChunk(id, pack: PackFormat.objectName(location.pack), offset: location.offset,
                                reason: "its index entry gives a stored length of \(location.storedLength) bytes")
        }
    }

    private func readOnce(_ id: ChunkID) throws(ChunkStoreError) -> [UInt8] {
        guard let location = try location(id) else { throw .missingChunk(id) }
        try ChunkStore.checkLength(location, of: id)
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
    /// `matches`, when given, may vouch for the plaintext instead of its SHA-256 (a keyed tag
    /// recorded when the same bytes were hashed); when it does not, the id is checked.
    public static func open(id: ChunkID, location: ChunkLocation, stored: UnsafeRawBufferPointer,
                            into output: UnsafeMutableRawBufferPointer, decompressor: ChunkDecompressor? = nil,
                            matches: ((UnsafeRawBufferPointer) -> Bool)? = nil) throws(ChunkStoreError) {
        try decode(id: id, location: location, stored: stored, into: output, decompressor: decompressor)
        if let matches, matches(UnsafeRawBufferPointer(output)) { return }
        guard ChunkID.sha256(UnsafeRawBufferPointer(output)) == id else {
            throw .damagedChunk(id, pack: PackFormat.objectName(location.pack), offset: location.offset, reason: "content does not match its id")
        }
    }

    /// Decodes stored bytes into `output` (exactly rawLength bytes), not verified.
    static func decode(id: ChunkID, location: ChunkLocation, stored: UnsafeRawBufferPointer,
                       into output: UnsafeMutableRawBufferPointer, decompressor: ChunkDecompressor?) throws(ChunkStoreError) {
        let packName = PackFormat.objectName(location.pack)
        switch location.flags.encoding {
        case ChunkFlags.stored:
            guard stored.count == output.count else {
                throw .damagedChunk(id, pack: packName, offset: location.offset, reason: "stored size differs from its length")
            }
            output.copyMemory(from: stored)
        case ChunkFlags.zstd:
            switch zstdDecompress(stored, into: output, context: decompressor) {
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
    }

    /// Reads many chunks, coalescing neighbours in the same pack into one read, and decodes each
    /// (verified against its id) straight into `destination(i, rawLength)`, which must be exactly
    /// `rawLength` bytes long, and distinct for each chunk: the chunks no tag vouched for are
    /// hashed together at the end (`ChunkID.sha256(each:)`), before this returns. A location
    /// cache out of date or wrong is reloaded or rebuilt (`recovering`), so long-running readers
    /// keep working and a damaged cache is not taken for a damaged vault.
    public func readMany(_ ids: [ChunkID], scratch: ReadScratch, bypassCache: Bool = true,
                         matches: ((_ index: Int, _ plaintext: UnsafeRawBufferPointer) -> Bool)? = nil,
                         destination: (_ index: Int, _ rawLength: Int) -> UnsafeMutableRawBufferPointer) throws(ChunkStoreError) {
        try recovering { () throws(ChunkStoreError) in
            try readManyOnce(ids, scratch: scratch, bypassCache: bypassCache, matches: matches, destination: destination)
        }
    }

    private func readManyOnce(_ ids: [ChunkID], scratch: ReadScratch, bypassCache: Bool,
                              matches: ((_ index: Int, _ plaintext: UnsafeRawBufferPointer) -> Bool)?,
                              destination: (_ index: Int, _ rawLength: Int) -> UnsafeMutableRawBufferPointer) throws(ChunkStoreError) {
        var located: [(index: Int, location: ChunkLocation)] = []
        located.reserveCapacity(ids.count)
        if ids.count > 1 { locations.prefetch(ids) }
        for (i, id) in ids.enumerated() {
            guard let location = try location(id) else { throw .missingChunk(id) }
            try ChunkStore.checkLength(location, of: id)
            located.append((i, location))
        }
        located.sort { a, b in
            a.location.pack != b.location.pack ? a.location.pack < b.location.pack : a.location.offset < b.location.offset
        }
        let align = UInt64(SystemFile.directAlignment)
        var unverified: [(index: Int, location: ChunkLocation, plaintext: UnsafeRawBufferPointer)] = []
        var start = 0
        while start < located.count {
            // A run of chunks in one pack whose gaps are small enough that reading through them is cheaper.
            var end = start + 1
            let pack = located[start].location.pack
            let first = UInt64(located[start].location.offset)
            var runEnd = first + UInt64(located[start].location.storedLength)
            while end < located.count, located[end].location.pack == pack,
                  UInt64(located[end].location.offset) <= runEnd + 65536,
                  UInt64(located[end].location.offset) + UInt64(located[end].location.storedLength) - first <= 8 << 20 {
                runEnd = max(runEnd, UInt64(located[end].location.offset) + UInt64(located[end].location.storedLength))
                end += 1
            }
            // Aligned so that the store can read around the page cache.
            let readStart = first / align * align
            let readLength = Int((runEnd - readStart + align - 1) / align * align)
            let buffer = scratch.buffer(readLength)
            let got: Int
            do {
                got = try store.readAvailable(PackFormat.objectName(pack), at: readStart, into: buffer, bypassCache: bypassCache)
            } catch { throw .store(error) }
            guard UInt64(got) >= runEnd - readStart else {
                throw .badPack(PackFormat.objectName(pack), "ends at \(readStart + UInt64(got)), before chunk data at \(runEnd)")
            }
            for k in start..<end {
                let (index, location) = located[k]
                let from = Int(UInt64(location.offset) - readStart)
                let stored = UnsafeRawBufferPointer(rebasing: buffer[from..<(from + Int(location.storedLength))])
                let target = destination(index, Int(location.rawLength))
                guard target.count == Int(location.rawLength) else {
                    throw .damagedChunk(ids[index], pack: PackFormat.objectName(pack), offset: location.offset,
                                        reason: "its length \(location.rawLength) does not fit its place (\(target.count) bytes)")
                }
                try ChunkStore.decode(id: ids[index], location: location, stored: stored, into: target, decompressor: scratch.decompressor)
                if let matches, matches(index, UnsafeRawBufferPointer(target)) { continue }
                unverified.append((index, location, UnsafeRawBufferPointer(target)))
            }
            start = end
        }
        let hashed = ChunkID.sha256(each: unverified.map(\.plaintext))
        for (k, chunk) in unverified.enumerated() where hashed[k] != ids[chunk.index] {
            throw .damagedChunk(ids[chunk.index], pack: PackFormat.objectName(chunk.location.pack), offset: chunk.location.offset,
                                reason: "content does not match its id")
        }
    }

    /// Reads many chunks; `visit` receives each chunk's index in `ids` and its verified plaintext.
    public func readMany(_ ids: [ChunkID], visit: (Int, UnsafeRawBufferPointer) throws -> Void) throws {
        let scratch = ReadScratch()
        for (i, id) in ids.enumerated() {
            guard let location = try location(id) else { throw ChunkStoreError.missingChunk(id) }
            let output = scratch.output(Int(location.rawLength))
            try readMany([id], scratch: scratch) { _, _ in output }
            try visit(i, UnsafeRawBufferPointer(output))
        }
    }

    /// Starts a writing session (one backup).
    /// `avoiding`: packs that garbage collection plans to delete; their chunks are stored again.
    public func writer(uploaders: Int = 2, lanes: Int = 1, avoiding: Set<ChunkID> = []) -> ChunkWriter {
        ChunkWriter(chunkStore: self, uploaders: uploaders, lanes: lanes, avoiding: avoiding)
    }
}

/// One session's writes: claims new ids (so each is compressed once), groups stored chunks into
/// packs, uploads them in the background, and writes index objects for them.
///
/// Nothing written here is reachable until a manifest names it; a crash leaves only
/// unreferenced packs that garbage collection removes after its grace period.
public final class ChunkWriter: Sendable {
    public let chunkStore: ChunkStore

    private struct Outcome {
        var uploaded: [(pack: ChunkID, entries: [PackEntry])] = []
        var indexNames: [String] = []
        var failure: ChunkStoreError? = nil
    }
    private final class Shared: Sendable {
        let claims = Mutex(Set<ChunkID>())
        let outcome = Mutex(Outcome())
        /// The pack being filled by each lane (a lane per hashing thread, so that one batch's
        /// chunks lie together in one pack and a reader of the disk finds them in one run).
        /// Each lane has a lock of its own: a chunk is compressed straight into its lane's pack
        /// under it, while the other lanes go on.
        let lanes: [Lane]
        let storedBytes = Atomic<UInt64>(0)
        let packCount = Atomic<Int>(0)

        init(lanes: Int) {
            self.lanes = (0..<lanes).map { _ in Lane() }
        }
    }
    private final class Lane: Sendable {
        let current = Mutex<PackBuilder?>(nil)
    }
    private let shared: Shared
    /// Empty pack buffers; its size bounds the memory packs take.
    private let pool: BoundedQueue<PackBuilder>
    private let uploads: BoundedQueue<PackBuilder>
    private let workers: [Worker]

    /// Index objects are written every this many packs, so an interrupted backup's packs are
    /// found again by the next one.
    static let packsPerIndex = 64

    /// Packs whose chunks must not be reused (pending deletion).
    public let avoiding: Set<ChunkID>

    init(chunkStore: ChunkStore, uploaders: Int, lanes: Int, avoiding: Set<ChunkID>) {
        self.chunkStore = chunkStore
        self.avoiding = avoiding
        // One pack per lane being filled and one per uploader: what the packs' memory is bounded by.
        let buffers = uploaders + max(1, lanes)
        shared = Shared(lanes: max(1, lanes))
        let pool = BoundedQueue<PackBuilder>(capacity: buffers)
        for _ in 0..<buffers { pool.push(PackBuilder(maxChunk: chunkStore.parameters.chunkSize + 4096)) }
        let uploads = BoundedQueue<PackBuilder>(capacity: buffers)
        self.pool = pool
        self.uploads = uploads
        let shared = self.shared
        let store = chunkStore.store
        let avoiding = self.avoiding
        workers = (0..<uploaders).map { n in
            Worker(name: "pack-upload-\(n)") {
                while let pack = uploads.pop() {
                    let id = pack.finish(avoiding: avoiding)
                    let entries = pack.entries
                    var failure: ObjectStoreError? = nil
                    do throws(ObjectStoreError) {
                        // Only if 64 gaps all made names of doomed packs: never written under one.
                        guard !avoiding.contains(id) else {
                            throw .failed(SystemError("write a pack not named like one garbage collection deletes", path: PackFormat.objectName(id), errno: EEXIST))
                        }
                        try store.put(PackFormat.objectName(id), pack.bytes)
                    } catch {
                        failure = error
                    }
                    // The buffer goes back before the lock is taken: a writer waiting for a
                    // buffer may hold its lane's lock, never this one.
                    pack.reset()
                    pool.push(pack)
                    shared.outcome.withLock { o in
                        if let failure {
                            if o.failure == nil { o.failure = .store(failure) }
                        } else {
                            o.uploaded.append((id, entries))
                        }
                    }
                }
            }
        }
    }

    private func checkFailure() throws(ChunkStoreError) {
        if let failure = shared.outcome.withLock({ $0.failure }) { throw failure }
    }

    /// True when the chunk must be stored by the caller: not in the vault, not claimed before.
    public func claim(_ id: ChunkID) throws(ChunkStoreError) -> Bool {
        try checkFailure()
        if shared.claims.withLock({ $0.contains(id) }) { return false }
        if let location = try chunkStore.location(id), !avoiding.contains(location.pack) { return false }
        return shared.claims.withLock { $0.insert(id).inserted }
    }

    /// Adds a claimed chunk to the current pack of `lane` (lanes beyond the writer's share
    /// one): `fill` writes its stored form, at most `capacity` bytes, straight into the pack and
    /// returns how many bytes it wrote and how they are stored. Returns the bytes stored.
    @discardableResult
    public func add(id: ChunkID, rawLength: Int, capacity: Int, lane: Int = 0,
                    fill: (UnsafeMutableRawBufferPointer) -> (count: Int, flags: ChunkFlags)) throws(ChunkStoreError) -> Int {
        try checkFailure()
        let pool = self.pool
        let stored = try shared.lanes[lane % shared.lanes.count].current.withLock { (current) throws(ChunkStoreError) -> Int in
            if let pack = current, !pack.fits(capacity) {
                current = nil
                ship(pack)
            }
            // Waits for an uploader to give a buffer back; uploaders never take a lane's lock.
            guard let pack = current ?? pool.pop() else { throw .store(.failed(SystemError("write packs to", path: "vault", errno: ECANCELED))) }
            current = pack
            let stored = pack.add(id: id, rawLength: rawLength, capacity: capacity, fill: fill)
            if pack.isFull {
                current = nil
                ship(pack)
            }
            return stored
        }
        shared.storedBytes.add(UInt64(stored), ordering: .relaxed)
        try writeIndexIfDue(final: false)
        return stored
    }

    /// Adds a claimed chunk's stored bytes to the current pack of `lane`.
    public func add(id: ChunkID, stored: UnsafeRawBufferPointer, rawLength: Int, flags: ChunkFlags, lane: Int = 0) throws(ChunkStoreError) {
        try add(id: id, rawLength: rawLength, capacity: stored.count, lane: lane, fill: PackBuilder.copying(stored, flags: flags))
    }

    /// Hands a pack that is done to the uploaders.
    private func ship(_ pack: PackBuilder) {
        shared.packCount.add(1, ordering: .relaxed)
        uploads.push(pack)
    }

    public func add(id: ChunkID, stored: [UInt8], rawLength: Int, flags: ChunkFlags, lane: Int = 0) throws(ChunkStoreError) {
        try stored.withBytes { (raw) throws(ChunkStoreError) in try add(id: id, stored: raw, rawLength: rawLength, flags: flags, lane: lane) }
    }

    private func writeIndexIfDue(final: Bool) throws(ChunkStoreError) {
        let batch: [(pack: ChunkID, entries: [PackEntry])]? = shared.outcome.withLock { o in
            guard o.uploaded.count >= ChunkWriter.packsPerIndex || (final && !o.uploaded.isEmpty) else { return nil }
            let batch = o.uploaded
            o.uploaded.removeAll()
            return batch
        }
        guard let batch else { return }
        let bytes = IndexObject(packs: batch).encode()
        let name = IndexObject.objectName(for: bytes)
        do {
            try chunkStore.store.put(name, bytes)
        } catch { throw .store(error) }
        shared.outcome.withLock { $0.indexNames.append(name) }
    }

    /// Bytes stored (after compression) so far.
    public var storedBytes: UInt64 { shared.storedBytes.load(ordering: .relaxed) }

    /// Flushes the last pack, waits for every upload, writes the last index object.
    /// When this returns, every chunk added is durable and findable through an index object.
    public func finish() throws(ChunkStoreError) -> (packs: Int, indexObjects: [String]) {
        for lane in shared.lanes {
            guard let pack = lane.current.withLock({ current in defer { current = nil }; return current }), !pack.isEmpty else { continue }
            ship(pack)
        }
        uploads.close()
        for worker in workers { worker.join() }
        try checkFailure()
        try writeIndexIfDue(final: true)
        return (shared.packCount.load(ordering: .relaxed), shared.outcome.withLock { $0.indexNames })
    }

    /// Stops the uploaders after a failure elsewhere; nothing more is written.
    public func abandon() {
        uploads.close()
        pool.close()
        for worker in workers { worker.join() }
    }
}
