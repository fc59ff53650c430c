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
/// It is a cache (state directory, never in the vault): a sorted file of 48-byte records
/// (id | pack number u32 | offset u32 | stored length u32 | raw length u24 + flags u8), a fan-out
/// table over the first bits of the id, and the list of pack ids. Lookups read a few records with
/// one pread, so memory stays bounded whatever the vault's size; the kernel's page cache does the
/// rest. The cache records which index objects it holds; on open, new index objects are merged in,
/// and if one it holds has disappeared (garbage collection rewrote it) it is rebuilt.
public final class LocationTable: Sendable {
    private let table: SystemFile
    private let fanout: [UInt32]
    private let bits: Int
    public let packs: [ChunkID]
    public let count: Int
    public let includedIndexes: Set<String>

    static let recordSize = 48
    static let formatVersion = 1

    private init(table: SystemFile, fanout: [UInt32], bits: Int, packs: [ChunkID], count: Int, included: Set<String>) {
        self.table = table
        self.fanout = fanout
        self.bits = bits
        self.packs = packs
        self.count = count
        self.includedIndexes = included
    }

    deinit { table.close() }

    public func lookup(_ id: ChunkID) throws(ChunkStoreError) -> ChunkLocation? {
        let bucket = Int(id.w0 >> UInt64(64 - bits))
        var lo = Int(fanout[bucket])
        var hi = Int(fanout[bucket + 1])
        if lo == hi { return nil }
        let size = LocationTable.recordSize
        // Narrow a large range by binary search on single records, then read the rest at once.
        while hi - lo > 256 {
            let mid = (lo + hi) / 2
            let record = try readRecords(mid, 1)
            let midID = record.withUnsafeBytes { ChunkID($0) }
            if midID == id { return try record.withBytes { (raw) throws(ChunkStoreError) in try decodeLocation(raw, at: 0) } }
            if midID < id { lo = mid + 1 } else { hi = mid }
        }
        let records = try readRecords(lo, hi - lo)
        return try records.withBytes { (raw) throws(ChunkStoreError) -> ChunkLocation? in
            var a = 0, b = hi - lo
            while a < b {
                let m = (a + b) / 2
                let mid = ChunkID(raw, at: m * size)
                if mid == id { return try decodeLocation(raw, at: m * size) }
                if mid < id { a = m + 1 } else { b = m }
            }
            return nil
        }
    }

    private func readRecords(_ first: Int, _ n: Int) throws(ChunkStoreError) -> [UInt8] {
        do {
            let bytes = try table.readAll(from: UInt64(first * LocationTable.recordSize), count: n * LocationTable.recordSize)
            guard bytes.count == n * LocationTable.recordSize else {
                throw ChunkStoreError.cache(SystemError("read (truncated)", path: table.path, errno: EIO))
            }
            return bytes
        } catch let error as SystemError {
            throw .cache(error)
        } catch let error as ChunkStoreError {
            throw error
        } catch {
            throw .cache(SystemError("read", path: table.path, errno: EIO))
        }
    }

    private func decodeLocation(_ raw: UnsafeRawBufferPointer, at o: Int) throws(ChunkStoreError) -> ChunkLocation {
        let packNumber = Int(raw.loadLE(UInt32.self, at: o + 32))
        // The cache is a local file that may be damaged: an error, not a trap.
        guard packNumber < packs.count else {
            throw .cache(SystemError("use (a record names pack \(packNumber) of \(packs.count); delete the cache directory to rebuild it)",
                                     path: table.path, errno: EIO))
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

    struct State: Codable {
        var version: Int
        var generation: UInt64
        var count: Int
        var bits: Int
        var indexes: [String]
    }

    /// Opens the cache in `directory`, bringing it up to date with the index objects in `store`.
    public static func open(store: any ObjectStore, directory: String,
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

        var state = readState(directory)
        // New files never reuse the numbers of the state on disk, even when rebuilding.
        let lastGeneration = state?.generation ?? 0
        if let current = state, !Set(current.indexes).isSubset(of: names) {
            state = nil  // an index object it holds is gone: start again
        }
        // A cache whose files are gone or damaged is rebuilt: it is only a cache.
        let loaded = state.flatMap { try? load(directory: directory, state: $0) }
        if loaded == nil { state = nil }
        let included = Set(state?.indexes ?? [])
        let missing = names.subtracting(included).sorted()
        if let loaded, missing.isEmpty { return loaded }

        var generation = lastGeneration + 1
        var packs: [ChunkID] = []
        var count = 0
        var previousTable: String? = nil
        var committedTable: String? = nil
        if let current = state, let old = loaded {
            committedTable = tablePath(directory, current.generation)
            packs = old.packs
            count = old.count
            previousTable = tablePath(directory, current.generation)
        }
        var packNumbers: [ChunkID: UInt32] = [:]
        for (i, pack) in packs.enumerated() { packNumbers[pack] = UInt32(i) }

        // Merge new index objects in groups, so memory stays bounded on a large vault.
        var done = Array(included)
        var group: [[UInt8]] = []
        var groupNames: [String] = []
        var groupEntries = 0
        func flush() throws(ChunkStoreError) {
            guard !group.isEmpty else { return }
            group.sort { lhs, rhs in
                lhs.withUnsafeBytes { l in rhs.withUnsafeBytes { r in memcmp(l.baseAddress!, r.baseAddress!, 32) < 0 } }
            }
            let out = tablePath(directory, generation)
            count = try mergeSorted(previous: previousTable, previousCount: count, new: group, into: out)
            // Intermediate tables of this update go at once; the one the current state names
            // stays until the new state is in place (a crash in between must find it).
            if let previousTable, previousTable != out, previousTable != committedTable { try? FileSystem.remove(previousTable) }
            previousTable = out
            done += groupNames
            group.removeAll(keepingCapacity: true)
            groupNames.removeAll()
            groupEntries = 0
            generation += 1
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
                for entry in entries {
                    var record: [UInt8] = []
                    record.reserveCapacity(recordSize)
                    entry.id.append(to: &record)
                    record.appendLE(number)
                    record.appendLE(entry.offset)
                    record.appendLE(entry.storedLength)
                    record.appendLE((entry.rawLength & 0x00ff_ffff) | UInt32(entry.flags.raw) << 24)
                    group.append(record)
                }
                groupEntries += entries.count
            }
            groupNames.append(name)
            if groupEntries >= 1 << 19 { try flush() }
        }
        try flush()

        let finalGeneration = generation - 1
        let finalTable = tablePath(directory, finalGeneration)
        if previousTable == nil || previousTable != finalTable {
            // Nothing was merged (every new index object vanished): write an empty or copied table.
            count = try mergeSorted(previous: previousTable, previousCount: count, new: [], into: finalTable)
        }
        let bits = fanoutBits(count)
        do {
            var packBytes: [UInt8] = []
            packBytes.reserveCapacity(packs.count * 32)
            for pack in packs { pack.append(to: &packBytes) }
            try writeFile(packsPath(directory, finalGeneration), packBytes)
            // The fan-out is computed here, once per update, so that opening never scans the table.
            let table = try SystemFile.open(finalTable, .readOnly)
            let fanout = try buildFanout(table, count: count, bits: bits)
            table.close()
            var fanoutBytes: [UInt8] = []
            fanoutBytes.reserveCapacity(fanout.count * 4)
            for value in fanout { fanoutBytes.appendLE(value) }
            try writeFile(fanoutPath(directory, finalGeneration), fanoutBytes)
            let newState = State(version: formatVersion, generation: finalGeneration, count: count, bits: bits, indexes: done.sorted())
            let json = try JSONEncoder().encode(newState)
            try writeFile(directory + "/state.json", Array(json))
        } catch let error as SystemError {
            throw .cache(error)
        } catch {
            throw .cache(SystemError("write", path: directory + "/state.json", errno: EIO))
        }
        // Remove files of older generations.
        if let names = try? FileSystem.list(directory) {
            for name in names where name.hasPrefix("table-") || name.hasPrefix("packs-") || name.hasPrefix("fanout-") {
                if !name.hasSuffix("-\(finalGeneration)") { try? FileSystem.remove(directory + "/" + name) }
            }
        }
        let state2 = State(version: formatVersion, generation: finalGeneration, count: count, bits: bits, indexes: done.sorted())
        return try load(directory: directory, state: state2)
    }

    private static func tablePath(_ directory: String, _ generation: UInt64) -> String { directory + "/table-\(generation)" }
    private static func packsPath(_ directory: String, _ generation: UInt64) -> String { directory + "/packs-\(generation)" }
    private static func fanoutPath(_ directory: String, _ generation: UInt64) -> String { directory + "/fanout-\(generation)" }

    /// The stored fan-out of a generation, if it is whole and agrees with the table.
    private static func readFanout(_ directory: String, _ state: State) -> [UInt32]? {
        guard let file = try? SystemFile.open(fanoutPath(directory, state.generation), .readOnly) else { return nil }
        defer { file.close() }
        let entries = (1 << state.bits) + 1
        guard let bytes = try? file.readAll(count: entries * 4), bytes.count == entries * 4 else { return nil }
        let fanout = bytes.withUnsafeBytes { raw in (0..<entries).map { raw.loadLE(UInt32.self, at: $0 * 4) } }
        guard fanout.last == UInt32(state.count), zip(fanout, fanout.dropFirst()).allSatisfy({ $0 <= $1 }) else { return nil }
        return fanout
    }

    private static func readState(_ directory: String) -> State? {
        guard let file = try? SystemFile.open(directory + "/state.json", .readOnly) else { return nil }
        defer { file.close() }
        guard let size = try? file.size(), let bytes = try? file.readAll(count: Int(size)),
              let state = try? JSONDecoder().decode(State.self, from: Data(bytes)),
              state.version == formatVersion else { return nil }
        return state
    }

    private static func writeFile(_ path: String, _ bytes: [UInt8]) throws(SystemError) {
        try FileSystem.replace(path, with: bytes)
    }

    static func fanoutBits(_ count: Int) -> Int {
        var bits = 8
        while bits < 24 && (1 << bits) * 8 < count { bits += 1 }
        return bits
    }

    private static func load(directory: String, state: State) throws(ChunkStoreError) -> LocationTable {
        do throws(SystemError) {
            let table = try SystemFile.open(tablePath(directory, state.generation), .readOnly)
            let size = try table.size()
            guard size == UInt64(state.count * recordSize) else {
                table.close()
                throw SystemError("use (size does not match its state)", path: table.path, errno: EIO)
            }
            let packFile = try SystemFile.open(packsPath(directory, state.generation), .readOnly)
            defer { packFile.close() }
            let packBytes = try packFile.readAll(count: Int(try packFile.size()))
            var packs: [ChunkID] = []
            packs.reserveCapacity(packBytes.count / 32)
            packBytes.withUnsafeBytes { raw in
                for i in 0..<(raw.count / 32) { packs.append(ChunkID(raw, at: i * 32)) }
            }
            // Normally stored beside the table; rebuilt by one pass over it if missing.
            let fanout: [UInt32]
            if let stored = readFanout(directory, state) {
                fanout = stored
            } else {
                fanout = try buildFanout(table, count: state.count, bits: state.bits)
            }
            return LocationTable(table: table, fanout: fanout, bits: state.bits, packs: packs, count: state.count,
                                 included: Set(state.indexes))
        } catch {
            throw .cache(error)
        }
    }

    private static func buildFanout(_ table: SystemFile, count: Int, bits: Int) throws(SystemError) -> [UInt32] {
        var fanout = [UInt32](repeating: 0, count: (1 << bits) + 1)
        var counts = [UInt32](repeating: 0, count: 1 << bits)
        let perRead = 1 << 16
        var index = 0
        var buffer = [UInt8](repeating: 0, count: perRead * recordSize)
        while index < count {
            let n = min(perRead, count - index)
            let got = try buffer.withMutableBytes { (raw) throws(SystemError) -> Int in
                try table.read(into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<(n * recordSize)]), at: UInt64(index * recordSize))
            }
            guard got == n * recordSize else { throw SystemError("read (truncated)", path: table.path, errno: EIO) }
            buffer.withUnsafeBytes { raw in
                for i in 0..<n {
                    let w0 = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: i * recordSize, as: UInt64.self))
                    counts[Int(w0 >> UInt64(64 - bits))] += 1
                }
            }
            index += n
        }
        var running: UInt32 = 0
        for i in 0..<counts.count {
            fanout[i] = running
            running += counts[i]
        }
        fanout[counts.count] = running
        return fanout
    }

    /// Streams the previous sorted table and the sorted new records into `path`; drops duplicate ids.
    private static func mergeSorted(previous: String?, previousCount: Int, new: [[UInt8]], into path: String) throws(ChunkStoreError) -> Int {
        do {
            let temporary = path + ".tmp"
            try? FileSystem.remove(temporary)
            let out = try SystemFile.open(temporary, .createExclusive(permissions: 0o644))
            defer { out.close() }
            let input = try previous.map { (p) throws(SystemError) in try SystemFile.open(p, .readOnly) }
            defer { input?.close() }

            var written = 0
            var outBuffer: [UInt8] = []
            outBuffer.reserveCapacity(1 << 20)
            var outOffset: UInt64 = 0
            var lastID: ChunkID? = nil
            func emit(_ record: UnsafeRawBufferPointer) throws(SystemError) {
                let id = ChunkID(record)
                if id == lastID { return }
                lastID = id
                outBuffer.append(contentsOf: record)
                written += 1
                if outBuffer.count >= 1 << 20 {
                    try out.write(outBuffer, at: outOffset)
                    outOffset += UInt64(outBuffer.count)
                    outBuffer.removeAll(keepingCapacity: true)
                }
            }

            let block = 1 << 14
            var inBuffer = [UInt8]()
            var inIndex = 0, inCount = 0, inPosition = 0
            func refill() throws(SystemError) {
                guard let input, inPosition < previousCount else { inCount = 0; inIndex = 0; return }
                let n = min(block, previousCount - inPosition)
                inBuffer = try input.readAll(from: UInt64(inPosition * recordSize), count: n * recordSize)
                guard inBuffer.count == n * recordSize else { throw SystemError("read (truncated)", path: input.path, errno: EIO) }
                inPosition += n
                inCount = n
                inIndex = 0
            }
            try refill()
            var newIndex = 0
            while inIndex < inCount || newIndex < new.count {
                let takeOld: Bool
                if inIndex >= inCount {
                    takeOld = false
                } else if newIndex >= new.count {
                    takeOld = true
                } else {
                    let oldID = inBuffer.withUnsafeBytes { ChunkID($0, at: inIndex * recordSize) }
                    let newID = new[newIndex].withUnsafeBytes { ChunkID($0) }
                    takeOld = !(newID < oldID)
                }
                if takeOld {
                    try inBuffer.withBytes { (raw) throws(SystemError) in
                        try emit(UnsafeRawBufferPointer(rebasing: raw[(inIndex * recordSize)..<((inIndex + 1) * recordSize)]))
                    }
                    inIndex += 1
                    if inIndex == inCount { try refill() }
                } else {
                    try new[newIndex].withBytes { (raw) throws(SystemError) in try emit(raw) }
                    newIndex += 1
                }
            }
            if !outBuffer.isEmpty { try out.write(outBuffer, at: outOffset) }
            try out.sync()
            try FileSystem.rename(temporary, to: path)
            return written
        } catch {
            throw .cache(error)
        }
    }
}
