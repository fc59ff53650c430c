import Foundation
import Glibc
import ObjectStore
import SystemIO

/// Where a chunk is stored.
public struct ChunkLocation: Sendable, Hashable {
    public var pack: ChunkID
    public var offset: UInt32
    public var storedLength: UInt32
    public var rawLength: UInt32
    public var flags: ChunkFlags

    public init(pack: ChunkID, offset: UInt32, storedLength: UInt32, rawLength: UInt32, flags: ChunkFlags) {
        self.pack = pack
        self.offset = offset
        self.storedLength = storedLength
        self.rawLength = rawLength
        self.flags = flags
    }
}

/// The local, on-disk map from chunk id to pack location, built from the vault's index objects.
///
/// It is a cache (state directory, never in the vault): runs of sorted 48-byte records
/// (id | pack number u32 | offset u32 | stored length u32 | raw length u24 + flags u8), each with
/// a fan-out table over the first bits of the id, and the list of pack ids. Lookups read a few
/// records of each run with one pread, so memory stays bounded whatever the vault's size; the
/// kernel's page cache does the rest. The cache records which index objects it holds. On open,
/// the new index objects become a new run, and a run merges with the one before it once it
/// holds a quarter as many records: a backup's few thousand new chunks are written once, not
/// merged into a table of the whole vault (160 M records, 7.7 GB at 10 TB), and a record is
/// rewritten a few times over its life. If an index object it holds has disappeared (garbage
/// collection rewrote it), the cache is rebuilt.
public final class LocationTable: Sendable {
    /// One file of sorted records and its fan-out.
    private struct Run: Sendable {
        let table: SystemFile
        let fanout: [UInt32]
        let bits: Int
        let count: Int
    }

    /// Oldest (and largest) first.
    private let runs: [Run]
    public let packs: [ChunkID]
    /// Records in all runs (an id stored twice, by two backups at once, may count twice).
    public let count: Int
    public let includedIndexes: Set<String>

    static let recordSize = 48
    static let formatVersion = 2
    /// A run merges with the one before it once it holds at least 1/mergeRatio as many records.
    static let mergeRatio = 4
    /// Whatever the sizes, never more runs than this: a lookup of a new chunk reads every run.
    static let maximumRuns = 8
    /// Records of new index objects sorted in memory at once (~24 MiB); smaller in tests.
    nonisolated(unsafe) static var groupRecords = 1 << 19

    private init(runs: [Run], packs: [ChunkID], included: Set<String>) {
        self.runs = runs
        self.packs = packs
        self.count = runs.reduce(0) { $0 + $1.count }
        self.includedIndexes = included
    }

    deinit { for run in runs { run.table.close() } }

    /// The number of runs: what a lookup of an unknown id reads.
    var runCount: Int { runs.count }

    public func lookup(_ id: ChunkID) throws(ChunkStoreError) -> ChunkLocation? {
        // Oldest first: where two runs know an id, the older location wins, as in a merge.
        for run in runs {
            if let found = try lookup(id, in: run) { return found }
        }
        return nil
    }

    /// Asks the kernel to read the records `lookup` will read for `ids`, all at once and in the
    /// background. A restore or a mount from a cold cache otherwise waits for one page of the
    /// table at a time per thread (a restore of the bench's day 4: 28,000 lookups, 1.9 s).
    /// Buckets within a page of each other are asked for together: one call, not one per id.
    public func prefetch(_ ids: [ChunkID]) {
        let size = UInt64(LocationTable.recordSize)
        for run in runs {
            let buckets = ids.map { id -> (lo: UInt64, hi: UInt64) in
                let bucket = Int(id.w0 >> UInt64(64 - run.bits))
                return (UInt64(run.fanout[bucket]) * size, UInt64(run.fanout[bucket + 1]) * size)
            }.filter { $0.hi > $0.lo }.sorted { $0.lo < $1.lo }
            guard var span = buckets.first else { continue }
            for next in buckets.dropFirst() {
                if next.lo <= span.hi + 4096 {
                    span.hi = max(span.hi, next.hi)
                } else {
                    run.table.adviseWillNeed(at: span.lo, length: span.hi - span.lo)
                    span = next
                }
            }
            run.table.adviseWillNeed(at: span.lo, length: span.hi - span.lo)
        }
    }

    private func lookup(_ id: ChunkID, in run: Run) throws(ChunkStoreError) -> ChunkLocation? {
        let bucket = Int(id.w0 >> UInt64(64 - run.bits))
        var lo = Int(run.fanout[bucket])
        var hi = Int(run.fanout[bucket + 1])
        if lo == hi { return nil }
        let size = LocationTable.recordSize
        // Narrow a large range by binary search on single records, then read the rest at once.
        while hi - lo > 256 {
            let mid = (lo + hi) / 2
            let record = try readRecords(run, mid, 1)
            let midID = record.withUnsafeBytes { ChunkID($0) }
            if midID == id { return try record.withBytes { (raw) throws(ChunkStoreError) in try decodeLocation(raw, at: 0, run: run) } }
            if midID < id { lo = mid + 1 } else { hi = mid }
        }
        let records = try readRecords(run, lo, hi - lo)
        return try records.withBytes { (raw) throws(ChunkStoreError) -> ChunkLocation? in
            var a = 0, b = hi - lo
            while a < b {
                let m = (a + b) / 2
                let mid = ChunkID(raw, at: m * size)
                if mid == id { return try decodeLocation(raw, at: m * size, run: run) }
                if mid < id { a = m + 1 } else { b = m }
            }
            return nil
        }
    }

    private func readRecords(_ run: Run, _ first: Int, _ n: Int) throws(ChunkStoreError) -> [UInt8] {
        do {
            let bytes = try run.table.readAll(from: UInt64(first * LocationTable.recordSize), count: n * LocationTable.recordSize)
            guard bytes.count == n * LocationTable.recordSize else {
                throw ChunkStoreError.cache(SystemError("read (truncated)", path: run.table.path, errno: EIO))
            }
            return bytes
        } catch let error as SystemError {
            throw .cache(error)
        } catch let error as ChunkStoreError {
            throw error
        } catch {
            throw .cache(SystemError("read", path: run.table.path, errno: EIO))
        }
    }

    private func decodeLocation(_ raw: UnsafeRawBufferPointer, at o: Int, run: Run) throws(ChunkStoreError) -> ChunkLocation {
        let packNumber = Int(raw.loadLE(UInt32.self, at: o + 32))
        // The cache is a local file that may be damaged: an error, not a trap.
        guard packNumber < packs.count else {
            throw .cache(SystemError("use (a record names pack \(packNumber) of \(packs.count))",
                                     path: run.table.path, errno: EIO))
        }
        let rawAndFlags = raw.loadLE(UInt32.self, at: o + 44)
        return ChunkLocation(
            pack: packs[packNumber],
            offset: raw.loadLE(UInt32.self, at: o + 36),
            storedLength: raw.loadLE(UInt32.self, at: o + 40),
            rawLength: rawAndFlags & 0x00ff_ffff,
            flags: ChunkFlags(raw: UInt8(rawAndFlags >> 24))
        )
    }

    // MARK: - Building and synchronising

    struct RunState: Codable, Equatable {
        /// The run's files are table-<file> and fanout-<file>.
        var file: UInt64
        var count: Int
        var bits: Int
    }

    struct State: Codable {
        var version: Int
        /// The highest file number used so far; the pack list is packs-<generation>.
        var generation: UInt64
        /// Pack ids in the pack list (32 bytes each).
        var packs: Int
        /// Oldest first.
        var runs: [RunState]
        var indexes: [String]
    }

    /// Opens the cache in `directory`, bringing it up to date with the index objects in `store`.
    /// `rebuild`: from the index objects alone, whatever the cache holds (its records were found
    /// to disagree with a pack's own directory).
    public static func open(store: any ObjectStore, directory: String, rebuild: Bool = false,
                            accept: (String) -> Bool = { _ in true }) throws(ChunkStoreError) -> LocationTable {
        do {
            try FileSystem.createDirectories(directory)
        } catch { throw .cache(error) }
        let lockPath = directory + "/lock"
        let lockFD = Glibc.open(lockPath, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard lockFD >= 0 else { throw .cache(SystemError("open", path: lockPath)) }
        defer { Glibc.close(lockFD) }
        // Serialises updates between processes sharing this cache.
        while flock(lockFD, LOCK_EX) != 0 {
            if errno != EINTR { throw .cache(SystemError("lock", path: lockPath)) }
        }

        let listing: [ObjectInfo]
        do {
            listing = try store.list(prefix: IndexObject.prefix)
        } catch { throw .store(error) }
        let names = Set(listing.map(\.name).filter(accept))

        let committed = readState(directory)
        var state = rebuild ? nil : committed
        if let current = state, !Set(current.indexes).isSubset(of: names) {
            state = nil  // an index object it holds is gone: start again
        }
        // A cache whose files are gone or damaged is rebuilt: it is only a cache.
        let loaded = state.flatMap { try? load(directory: directory, state: $0) }
        if loaded == nil { state = nil }
        let included = Set(state?.indexes ?? [])
        let missing = names.subtracting(included).sorted()
        if let loaded, missing.isEmpty { return loaded }

        // New files never reuse a number in use: not the state's, nor any file's in the directory
        // (the state may be unreadable while its files are there).
        var lastFile = committed?.generation ?? 0
        for name in (try? FileSystem.list(directory)) ?? [] {
            for prefix in ["table-", "fanout-", "packs-"] where name.hasPrefix(prefix) {
                if let n = UInt64(name.dropFirst(prefix.count).prefix { $0.isNumber }) { lastFile = max(lastFile, n) }
            }
        }
        func newFile() -> UInt64 {
            lastFile += 1
            return lastFile
        }
        // The files the state on disk names stay until the new state is in place (a crash in
        // between must find them); this update's intermediate runs go as soon as they are merged.
        let committedFiles = Set(committed?.runs.map(\.file) ?? [])
        func discard(_ run: RunState) {
            guard !committedFiles.contains(run.file) else { return }
            try? FileSystem.remove(tablePath(directory, run.file))
            try? FileSystem.remove(fanoutPath(directory, run.file))
        }
        var runs = state?.runs ?? []
        func compact() throws(ChunkStoreError) {
            while runs.count >= 2,
                  runs[runs.count - 1].count * mergeRatio >= runs[runs.count - 2].count || runs.count > maximumRuns {
                let newer = runs.removeLast(), older = runs.removeLast()
                let merged = try mergeRuns([older, newer], directory: directory, into: newFile())
                discard(older)
                discard(newer)
                runs.append(merged)
            }
        }

        var packs = loaded?.packs ?? []
        var packNumbers: [ChunkID: UInt32] = [:]
        for (i, pack) in packs.enumerated() { packNumbers[pack] = UInt32(i) }
        var done = Array(included)
        var group = RecordGroup()
        var groupNames: [String] = []
        // This update's runs, each with its level: a group of records is level 0, and sixteen
        // runs of one level merge into one of the next. A rebuild of 160 M records (312 groups)
        // then writes each record about four times, where merging every group into the runs
        // before it would write it eleven times.
        var fresh: [(run: RunState, level: Int)] = []
        func mergeFresh(_ count: Int, level: Int) throws(ChunkStoreError) {
            let inputs = fresh.suffix(count).map(\.run)
            let merged = try mergeRuns(inputs, directory: directory, into: newFile())
            for run in inputs { discard(run) }
            fresh.removeLast(count)
            fresh.append((merged, level))
        }
        func flush() throws(ChunkStoreError) {
            if !group.isEmpty {
                let sorted = Cursor(sorting: group)
                fresh.append((try writeRun([sorted], directory: directory, into: newFile()), 0))
                while fresh.count >= 16, let level = fresh.last?.level,
                      fresh.suffix(16).allSatisfy({ $0.level == level }) {
                    try mergeFresh(16, level: level + 1)
                }
            }
            done += groupNames
            group = RecordGroup()
            groupNames.removeAll()
        }
        for name in missing {
            let bytes: [UInt8]
            do {
                bytes = try store.get(name)
            } catch {
                if case .notFound = error { continue }  // removed since the listing
                throw .store(error)
            }
            let object = try IndexObject.decode(bytes, name: name)
            for (pack, entries) in object.packs {
                let number: UInt32
                if let known = packNumbers[pack] {
                    number = known
                } else {
                    number = UInt32(packs.count)
                    packs.append(pack)
                    packNumbers[pack] = number
                }
                for entry in entries { group.append(entry, pack: number) }
            }
            groupNames.append(name)
            if group.count >= groupRecords { try flush() }
        }
        try flush()
        if fresh.count > 1 { try mergeFresh(fresh.count, level: 0) }
        runs += fresh.map(\.run)
        try compact()

        let packsGeneration = newFile()
        let newState = State(version: formatVersion, generation: packsGeneration, packs: packs.count, runs: runs, indexes: done.sorted())
        do {
            var packBytes: [UInt8] = []
            packBytes.reserveCapacity(packs.count * 32)
            for pack in packs { pack.append(to: &packBytes) }
            try FileSystem.replace(packsPath(directory, packsGeneration), with: packBytes)
            let json = try JSONEncoder().encode(newState)
            try FileSystem.replace(directory + "/state.json", with: Array(json))
            try FileSystem.syncDirectory(directory)
        } catch let error as SystemError {
            throw .cache(error)
        } catch {
            throw .cache(SystemError("write", path: directory + "/state.json", errno: EIO))
        }
        // Remove the files no state names any more (older updates, and any a crash left).
        let kept = Set(runs.flatMap { ["table-\($0.file)", "fanout-\($0.file)"] } + ["packs-\(packsGeneration)"])
        if let names = try? FileSystem.list(directory) {
            for name in names where name.hasPrefix("table-") || name.hasPrefix("packs-") || name.hasPrefix("fanout-") {
                if !kept.contains(name) { try? FileSystem.remove(directory + "/" + name) }
            }
        }
        return try load(directory: directory, state: newState)
    }

    private static func tablePath(_ directory: String, _ file: UInt64) -> String { directory + "/table-\(file)" }
    private static func packsPath(_ directory: String, _ generation: UInt64) -> String { directory + "/packs-\(generation)" }
    private static func fanoutPath(_ directory: String, _ file: UInt64) -> String { directory + "/fanout-\(file)" }

    private static func saveFanout(_ fanout: [UInt32], _ directory: String, _ file: UInt64) throws(SystemError) {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(fanout.count * 4)
        for value in fanout { bytes.appendLE(value) }
        try FileSystem.replace(fanoutPath(directory, file), with: bytes)
    }

    /// The stored fan-out of a run, if it is whole and agrees with the run.
    private static func readFanout(_ directory: String, _ run: RunState) -> [UInt32]? {
        guard let file = try? SystemFile.open(fanoutPath(directory, run.file), .readOnly) else { return nil }
        defer { file.close() }
        let entries = (1 << run.bits) + 1
        guard let bytes = try? file.readAll(count: entries * 4), bytes.count == entries * 4 else { return nil }
        let fanout = bytes.withUnsafeBytes { raw in (0..<entries).map { raw.loadLE(UInt32.self, at: $0 * 4) } }
        guard fanout.first == 0, fanout.last == UInt32(run.count), zip(fanout, fanout.dropFirst()).allSatisfy({ $0 <= $1 }) else { return nil }
        return fanout
    }

    private static func readState(_ directory: String) -> State? {
        guard let file = try? SystemFile.open(directory + "/state.json", .readOnly) else { return nil }
        defer { file.close() }
        guard let size = try? file.size(), size < 1 << 30, let bytes = try? file.readAll(count: Int(size)),
              let state = try? JSONDecoder().decode(State.self, from: Data(bytes)),
              state.version == formatVersion,
              (0...(1 << 32)).contains(state.packs),
              state.runs.allSatisfy({ (8...24).contains($0.bits) && (0...(1 << 40)).contains($0.count) && $0.file <= state.generation })
        else { return nil }
        return state
    }

    static func fanoutBits(_ count: Int) -> Int {
        var bits = 8
        while bits < 24 && (1 << bits) * 8 < count { bits += 1 }
        return bits
    }

    private static func load(directory: String, state: State) throws(ChunkStoreError) -> LocationTable {
        var runs: [Run] = []
        do throws(SystemError) {
            defer {
                // Only reached with runs left open on an error: a returned table owns them.
                if runs.count < state.runs.count { for run in runs { run.table.close() } }
            }
            let packFile = try SystemFile.open(packsPath(directory, state.generation), .readOnly)
            defer { packFile.close() }
            guard try packFile.size() == UInt64(state.packs) * 32 else {
                throw SystemError("use (size does not match its state)", path: packFile.path, errno: EIO)
            }
            let packBytes = try packFile.readAll(count: state.packs * 32)
            var packs: [ChunkID] = []
            packs.reserveCapacity(packBytes.count / 32)
            packBytes.withUnsafeBytes { raw in
                for i in 0..<(raw.count / 32) { packs.append(ChunkID(raw, at: i * 32)) }
            }
            for saved in state.runs {
                let table = try SystemFile.open(tablePath(directory, saved.file), .readOnly)
                guard (try? table.size()) == UInt64(saved.count * recordSize) else {
                    table.close()
                    throw SystemError("use (size does not match its state)", path: table.path, errno: EIO)
                }
                // Normally stored beside the table; rebuilt by one pass over it if missing, and
                // saved again (best effort: a reader may not be able to write here).
                let fanout: [UInt32]
                if let stored = readFanout(directory, saved) {
                    fanout = stored
                } else {
                    do {
                        fanout = try buildFanout(table, count: saved.count, bits: saved.bits)
                    } catch {
                        table.close()
                        throw error
                    }
                    try? saveFanout(fanout, directory, saved.file)
                }
                runs.append(Run(table: table, fanout: fanout, bits: saved.bits, count: saved.count))
            }
            return LocationTable(runs: runs, packs: packs, included: Set(state.indexes))
        } catch {
            throw .cache(error)
        }
    }

    private static func buildFanout(_ table: SystemFile, count: Int, bits: Int) throws(SystemError) -> [UInt32] {
        var counts = [UInt32](repeating: 0, count: 1 << bits)
        let cursor = try Cursor(file: table, count: count)
        while !cursor.atEnd {
            counts[Int(cursor.id.w0 >> UInt64(64 - bits))] += 1
            try cursor.advance()
        }
        return prefixSums(counts)
    }

    private static func prefixSums(_ counts: [UInt32]) -> [UInt32] {
        var fanout = [UInt32](repeating: 0, count: counts.count + 1)
        var running: UInt32 = 0
        for i in 0..<counts.count {
            fanout[i] = running
            running += counts[i]
        }
        fanout[counts.count] = running
        return fanout
    }

    /// Merges runs (oldest first) into a new one.
    private static func mergeRuns(_ inputs: [RunState], directory: String, into file: UInt64) throws(ChunkStoreError) -> RunState {
        var tables: [SystemFile] = []
        defer { for table in tables { table.close() } }
        var cursors: [Cursor] = []
        do throws(SystemError) {
            for run in inputs {
                let table = try SystemFile.open(tablePath(directory, run.file), .readOnly)
                tables.append(table)
                cursors.append(try Cursor(file: table, count: run.count))
            }
        } catch { throw .cache(error) }
        return try writeRun(cursors, directory: directory, into: file)
    }

    /// Streams sorted inputs (oldest first) into run `file`, its fan-out computed on the way.
    /// Where inputs share an id, the oldest input's record is kept and the others dropped.
    private static func writeRun(_ inputs: [Cursor], directory: String, into file: UInt64) throws(ChunkStoreError) -> RunState {
        let path = tablePath(directory, file)
        do throws(SystemError) {
            // The bits for the most records the run can hold: dropped duplicates only make buckets smaller.
            let bits = fanoutBits(inputs.reduce(0) { $0 + $1.count })
            var counts = [UInt32](repeating: 0, count: 1 << bits)
            let temporary = path + ".tmp"
            try? FileSystem.remove(temporary)
            let out = try SystemFile.open(temporary, .createExclusive(permissions: 0o644))
            defer { out.close() }
            var outBuffer: [UInt8] = []
            outBuffer.reserveCapacity(1 << 20)
            var outOffset: UInt64 = 0
            var written = 0
            var lastID: ChunkID? = nil
            while true {
                var best = -1
                var bestID = ChunkID.zero
                for (i, cursor) in inputs.enumerated() where !cursor.atEnd {
                    let id = cursor.id
                    if best < 0 || id < bestID { best = i; bestID = id }
                }
                if best < 0 { break }
                if bestID != lastID {
                    lastID = bestID
                    outBuffer.append(contentsOf: inputs[best].record)
                    counts[Int(bestID.w0 >> UInt64(64 - bits))] += 1
                    written += 1
                    if outBuffer.count >= 1 << 20 {
                        try out.write(outBuffer, at: outOffset)
                        outOffset += UInt64(outBuffer.count)
                        outBuffer.removeAll(keepingCapacity: true)
                    }
                }
                try inputs[best].advance()
            }
            if !outBuffer.isEmpty { try out.write(outBuffer, at: outOffset) }
            try out.sync()
            try FileSystem.rename(temporary, to: path)
            try saveFanout(prefixSums(counts), directory, file)
            return RunState(file: file, count: written, bits: bits)
        } catch {
            throw .cache(error)
        }
    }
}

/// Records of new index objects, in the order they came, for one sort.
private struct RecordGroup {
    var bytes: [UInt8] = []
    var count: Int { bytes.count / LocationTable.recordSize }
    var isEmpty: Bool { bytes.isEmpty }

    mutating func append(_ entry: PackEntry, pack number: UInt32) {
        entry.id.append(to: &bytes)
        bytes.appendLE(number)
        bytes.appendLE(entry.offset)
        bytes.appendLE(entry.storedLength)
        bytes.appendLE((entry.rawLength & 0x00ff_ffff) | UInt32(entry.flags.raw) << 24)
    }
}

/// Sorted records, from a run's file (read in blocks) or sorted in memory, one at a time.
private final class Cursor {
    private let file: SystemFile?
    let count: Int
    private let buffer: UnsafeMutableRawBufferPointer
    private var bufferFirst = 0
    private var bufferCount = 0
    private(set) var position = 0
    private static let blockRecords = 1 << 14

    /// The group's records, sorted by id (a stable sort: of equal ids, the first read stays first).
    init(sorting group: RecordGroup) {
        let size = LocationTable.recordSize
        file = nil
        count = group.count
        buffer = .allocate(byteCount: max(1, group.bytes.count), alignment: 8)
        group.bytes.withUnsafeBytes { raw in
            let ids = (0..<group.count).map { ChunkID(raw, at: $0 * size) }
            let order = (0..<group.count).sorted { ids[$0] < ids[$1] || (ids[$0] == ids[$1] && $0 < $1) }
            for (k, i) in order.enumerated() {
                UnsafeMutableRawBufferPointer(rebasing: buffer[(k * size)..<((k + 1) * size)])
                    .copyMemory(from: UnsafeRawBufferPointer(rebasing: raw[(i * size)..<((i + 1) * size)]))
            }
        }
        bufferCount = count
    }

    init(file: SystemFile, count: Int) throws(SystemError) {
        self.file = file
        self.count = count
        buffer = .allocate(byteCount: Cursor.blockRecords * LocationTable.recordSize, alignment: 8)
        try refill()
    }

    deinit { buffer.deallocate() }

    var atEnd: Bool { position >= count }

    private var at: Int { (position - bufferFirst) * LocationTable.recordSize }

    var id: ChunkID { ChunkID(UnsafeRawBufferPointer(buffer), at: at) }

    /// The current record; valid until `advance`.
    var record: UnsafeRawBufferPointer { UnsafeRawBufferPointer(rebasing: buffer[at..<(at + LocationTable.recordSize)]) }

    func advance() throws(SystemError) {
        position += 1
        if file != nil && position < count && position >= bufferFirst + bufferCount { try refill() }
    }

    private func refill() throws(SystemError) {
        guard let file, position < count else { return }
        let n = min(Cursor.blockRecords, count - position)
        let bytes = n * LocationTable.recordSize
        let got = try file.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<bytes]),
                                at: UInt64(position) * UInt64(LocationTable.recordSize))
        guard got == bytes else { throw SystemError("read (truncated)", path: file.path, errno: EIO) }
        bufferFirst = position
        bufferCount = n
    }
}
