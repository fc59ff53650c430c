@testable import ChunkStore
import Foundation
import ObjectStore
import Synchronization
import SystemIO
import Testing
import TestSupport

@Suite struct PackFormatTests {
    @Test func packRoundTripAndDamagedDirectory() throws {
        let builder = PackBuilder(maxChunk: 65536)
        var random = SeededBytes(seed: 1)
        var chunks: [(ChunkID, [UInt8])] = []
        for _ in 0..<10 {
            let data = random.bytes(1000)
            let id = ChunkID.sha256(data)
            chunks.append((id, data))
            builder.add(id: id, stored: data, rawLength: data.count, flags: ChunkFlags(raw: ChunkFlags.stored))
        }
        let packID = builder.finish()
        let bytes = Array(builder.bytes)
        let entries = builder.entries
        let trailer = try PackFormat.parseTrailer(Array(bytes.suffix(PackFormat.trailerSize)), packSize: UInt64(bytes.count), pack: "p")
        let start = Int(trailer.directoryOffset)
        let directory = Array(bytes[start..<(start + Int(trailer.count) * PackEntry.encodedSize)])
        #expect(try PackFormat.parseDirectory(directory, trailer: trailer, pack: "p") == entries)
        #expect(packID == ChunkID.sha256(directory))
        for (entry, (id, data)) in zip(entries, chunks) {
            #expect(entry.id == id)
            #expect(Array(bytes[Int(entry.offset)..<Int(entry.offset + entry.storedLength)]) == data)
        }
        var damaged = directory
        damaged[5] ^= 0x40
        #expect(throws: ChunkStoreError.self) { try PackFormat.parseDirectory(damaged, trailer: trailer, pack: "p") }
        #expect(throws: ChunkStoreError.self) {
            try PackFormat.parseTrailer(Array(bytes.suffix(PackFormat.trailerSize)), packSize: UInt64(bytes.count + 1), pack: "p")
        }
    }

    /// The same chunks in the same order make the same pack name; a writer told to avoid that
    /// name (a pack a pending gc plan deletes) leaves a gap after the header instead.
    @Test func aPackAvoidsTheNameOfADoomedPack() throws {
        var random = SeededBytes(seed: 3)
        let chunks = (0..<5).map { _ in random.bytes(3000) }
        func build(avoiding: Set<ChunkID>) -> (ChunkID, [UInt8], [PackEntry]) {
            let builder = PackBuilder(maxChunk: 65536)
            for data in chunks { builder.add(id: ChunkID.sha256(data), stored: data, rawLength: data.count, flags: ChunkFlags(raw: ChunkFlags.stored)) }
            let id = builder.finish(avoiding: avoiding)
            return (id, Array(builder.bytes), builder.entries)
        }
        let (doomed, doomedBytes, _) = build(avoiding: [])
        #expect(build(avoiding: []).0 == doomed)
        let (id, bytes, entries) = build(avoiding: [doomed])
        #expect(id != doomed)
        #expect(bytes.count == doomedBytes.count + 1)
        #expect(entries.first?.offset == UInt32(PackFormat.headerSize + 1))
        #expect(bytes[PackFormat.headerSize] == 0)
        let trailer = try PackFormat.parseTrailer(Array(bytes.suffix(PackFormat.trailerSize)), packSize: UInt64(bytes.count), pack: "p")
        #expect(trailer.directoryDigest == id)
        let start = Int(trailer.directoryOffset)
        let parsed = try PackFormat.parseDirectory(Array(bytes[start..<(start + Int(trailer.count) * PackEntry.encodedSize)]), trailer: trailer, pack: "p")
        for (entry, data) in zip(parsed, chunks) {
            #expect(Array(bytes[Int(entry.offset)..<Int(entry.offset + entry.storedLength)]) == data)
        }
        // Both names avoided: two bytes of gap.
        let (third, _, shifted) = build(avoiding: [doomed, id])
        #expect(third != doomed && third != id)
        #expect(shifted.first?.offset == UInt32(PackFormat.headerSize + 2))
    }

    @Test func indexObjectRoundTripAndChecksum() throws {
        let entry = PackEntry(id: ChunkID.sha256([1]), offset: 8, storedLength: 100, rawLength: 200, flags: ChunkFlags(raw: 1))
        let object = IndexObject(packs: [(ChunkID.sha256([2]), [entry, entry])])
        let bytes = object.encode()
        let decoded = try IndexObject.decode(bytes, name: "i")
        #expect(decoded.packs.count == 1)
        #expect(decoded.packs[0].entries == [entry, entry])
        for position in [0, 12, 20, bytes.count - 1] {
            var damaged = bytes
            damaged[position] ^= 1
            #expect(throws: ChunkStoreError.self) { try IndexObject.decode(damaged, name: "i") }
        }
        #expect(throws: ChunkStoreError.self) { try IndexObject.decode(Array(bytes.prefix(30)), name: "i") }
    }

    @Test func zeroDetection() {
        var data = [UInt8](repeating: 0, count: 65536)
        #expect(data.withUnsafeBytes { isAllZero($0) })
        for position in [0, 63, 64, 65535] {
            data[position] = 1
            #expect(!data.withUnsafeBytes { isAllZero($0) })
            data[position] = 0
        }
        #expect([UInt8]().withUnsafeBytes { isAllZero($0) })
    }

    /// Hashing in lanes gives BoringSSL's digests: every padding case (lengths 0 to 200: one or
    /// two final blocks), runs of 4, 2 and 1 equal lengths, unaligned inputs, 64 KiB chunks; and
    /// the lanes are in use wherever the CPU has the SHA extensions.
    @Test func chunkIDsHashedInLanesMatchOneAtATime() throws {
        let data = randomBytes(seed: 11, count: 4 * 65536 + 64)
        try data.withUnsafeBytes { raw in
            func input(_ offset: Int, _ length: Int) -> UnsafeRawBufferPointer { UnsafeRawBufferPointer(rebasing: raw[offset..<(offset + length)]) }
            for length in 0...200 {
                let inputs = (0..<7).map { input(1 + $0 * 211, length) } + [input(3, length + 1)]
                let ids = ChunkID.sha256(each: inputs)
                #expect(ids == inputs.map { ChunkID.sha256($0) }, "length \(length)")
            }
            let chunks = (0..<4).map { input($0 * 65536 + $0, 65536) } + [input(5, 65536), input(7, 30000)]
            #expect(ChunkID.sha256(each: chunks) == chunks.map { ChunkID.sha256($0) })
            let abc = Array("abc".utf8)
            try abc.withUnsafeBytes { abc in
                let ids = ChunkID.sha256(each: [abc, abc, abc, abc])
                let expected = try #require(ChunkID(hex: "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"))
                #expect(ids == [ChunkID](repeating: expected, count: 4))
            }
        }
        #expect(ChunkID.sha256(each: []).isEmpty)
        let cpu = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? ""
        if cpu.contains(" sha_ni") { #expect(ChunkID.hashesInLanes) }
    }

    /// Text at every level (level 1 with its smaller table among them) comes back exactly;
    /// random bytes are not compressed; a destination too small for a saving gives nil, not a
    /// truncated frame.
    @Test func chunksCompressAndComeBackAtEveryLevel() throws {
        var random = SeededBytes(seed: 5)
        let words = ["lifeboat", "vault", "chunk", "pack", "restore", "point", "disk", "sync"]
        var text: [UInt8] = []
        while text.count < 65536 { text += Array((words[Int(random.next() % 8)] + " ").utf8) }
        text = Array(text.prefix(65536))
        let noise = random.bytes(65536)
        for level: Int32 in [-3, 1, 3, 9] {
            let compressor = ChunkCompressor(level: level)
            for input in [text, Array(text.prefix(20000)), Array(text.prefix(70000))] {
                let compressed = try #require(input.withUnsafeBytes { compressor.compressed($0) })
                #expect(compressed.count < input.count / 2)
                var output = [UInt8](repeating: 0, count: input.count)
                let n = compressed.withUnsafeBytes { c in output.withUnsafeMutableBytes { try? zstdDecompress(c, into: $0).get() } }
                #expect(n == input.count && output == input)
                // Room for less than the frame: nil.
                let small = input.withUnsafeBytes { i in
                    withUnsafeTemporaryAllocation(byteCount: compressed.count - 1, alignment: 1) { compressor.compress(i, into: $0) }
                }
                #expect(small == nil)
            }
            #expect(noise.withUnsafeBytes { compressor.compressed($0) } == nil)
        }
    }
}

@Suite struct ChunkStoreTests {
    func writeChunks(_ store: ChunkStore, _ chunks: [[UInt8]]) throws {
        let writer = store.writer()
        let compressor = ChunkCompressor(level: 3)
        for data in chunks {
            let id = ChunkID.sha256(data)
            guard try writer.claim(id) else { continue }
            let compressed = data.withUnsafeBytes { compressor.compressed($0) }
            try writer.add(id: id, stored: compressed ?? data, rawLength: data.count,
                           flags: ChunkFlags(raw: compressed == nil ? ChunkFlags.stored : ChunkFlags.zstd))
        }
        _ = try writer.finish()
    }

    /// Through the store: a writer avoiding a pack stores the same chunks under another name,
    /// and they read back from there.
    @Test func aWriterAvoidingAPackStoresItsChunksUnderAnotherName() throws {
        let dir = TemporaryDirectory("chunks")
        defer { dir.remove() }
        let objects = LocalDirectoryStore(root: dir.file("vault"))
        let parameters = ChunkParameters(chunkSize: 65536, compression: .zstd(level: 3))
        var random = SeededBytes(seed: 11)
        let chunks = (0..<8).map { _ in random.bytes(65536) }
        let first = try ChunkStore(store: objects, parameters: parameters, cacheDirectory: dir.file("cache"))
        try writeChunks(first, chunks)
        let packs = try objects.list(prefix: "packs/").compactMap { PackFormat.id(fromObjectName: $0.name) }
        #expect(packs.count == 1)
        let firstIndex = try objects.list(prefix: IndexObject.prefix).map(\.name)
        // Made again by a writer that must not reuse or recreate that pack (its chunks are
        // claimed again because their only copy is in it).
        let writer = first.writer(avoiding: Set(packs))
        let compressor = ChunkCompressor(level: 3)
        for data in chunks {
            let id = ChunkID.sha256(data)
            #expect(try writer.claim(id))
            let compressed = data.withUnsafeBytes { compressor.compressed($0) }
            try writer.add(id: id, stored: compressed ?? data, rawLength: data.count,
                           flags: ChunkFlags(raw: compressed == nil ? ChunkFlags.stored : ChunkFlags.zstd))
        }
        _ = try writer.finish()
        let after = try objects.list(prefix: "packs/").compactMap { PackFormat.id(fromObjectName: $0.name) }
        #expect(after.count == 2)
        let fresh = try #require(after.first { $0 != packs[0] })
        // As gc would leave it: the avoided pack and the index object naming it gone.
        try objects.delete(PackFormat.objectName(packs[0]))
        for name in firstIndex { try objects.delete(name) }
        let reopened = try ChunkStore(store: objects, parameters: parameters, cacheDirectory: dir.file("cache2"))
        for data in chunks {
            #expect(try reopened.location(ChunkID.sha256(data))?.pack == fresh)
            #expect(try reopened.read(ChunkID.sha256(data)) == data)
        }
    }

    /// A file or a dangling link where a directory (a vault's cache, a state directory) should
    /// be is an error naming it (it recursed until the stack overflowed).
    @Test func aFileWhereADirectoryShouldBeIsAnError() throws {
        let dir = TemporaryDirectory("dirs")
        defer { dir.remove() }
        #expect(FileManager.default.createFile(atPath: dir.file("plain"), contents: Data([1])))
        #expect(symlink(dir.file("nowhere"), dir.file("dangling")) == 0)
        for path in [dir.file("plain"), dir.file("dangling"), dir.file("plain") + "/below"] {
            do {
                try FileSystem.createDirectories(path)
                Issue.record("\(path) was taken for a directory")
            } catch {
                #expect(error.errno == ENOTDIR)
                #expect(error.description.contains(path) || error.description.contains(dir.file("plain")))
            }
        }
        try FileSystem.createDirectories(dir.file("a/b/c"))
        try FileSystem.createDirectories(dir.file("a/b/c"))
        #expect(FileSystem.isDirectory(dir.file("a/b/c")))
    }

    @Test func writtenChunksAreFoundAfterReopenAndVerified() throws {
        let dir = TemporaryDirectory("chunks")
        defer { dir.remove() }
        let objects = LocalDirectoryStore(root: dir.file("vault"))
        let parameters = ChunkParameters(chunkSize: 65536, compression: .zstd(level: 3))
        var random = SeededBytes(seed: 7)
        // Two thirds random, one third compressible and distinct.
        let chunks = (0..<420).map { i in
            i % 3 != 0 ? random.bytes(65536) : (0..<65536).map { UInt8(truncatingIfNeeded: $0 % 2 == 0 ? i : i >> 8) }
        }
        let first = try ChunkStore(store: objects, parameters: parameters, cacheDirectory: dir.file("cache"))
        try writeChunks(first, chunks)
        // 280 incompressible chunks of 64 KiB: more than one 16 MiB pack.
        #expect(try objects.list(prefix: "packs/").count >= 2)

        let reopened = try ChunkStore(store: objects, parameters: parameters, cacheDirectory: dir.file("cache"))
        #expect(reopened.locations.count == 420)
        for data in chunks.prefix(20) {
            #expect(try reopened.read(ChunkID.sha256(data)) == data)
        }
        var seen = 0
        try reopened.readMany(chunks.map { ChunkID.sha256($0) }) { index, bytes in
            #expect(Array(bytes) == chunks[index])
            seen += 1
        }
        #expect(seen == 420)
        #expect(try reopened.location(ChunkID.sha256([9, 9, 9])) == nil)

        // A second session with the same chunks stores nothing new.
        let packsBefore = try objects.list(prefix: "packs/").count
        try writeChunks(reopened, chunks)
        #expect(try objects.list(prefix: "packs/").count == packsBefore)
    }

    @Test func damagedBytesInAPackAreAnErrorNeverData() throws {
        let dir = TemporaryDirectory("chunks")
        defer { dir.remove() }
        let objects = LocalDirectoryStore(root: dir.file("vault"))
        let parameters = ChunkParameters(chunkSize: 65536, compression: .zstd(level: 3))
        var random = SeededBytes(seed: 8)
        let chunks = (0..<4).map { _ in random.bytes(65536) }
        let store = try ChunkStore(store: objects, parameters: parameters, cacheDirectory: dir.file("cache"))
        try writeChunks(store, chunks)
        let reopened = try ChunkStore(store: objects, parameters: parameters, cacheDirectory: dir.file("cache"))
        let id = ChunkID.sha256(chunks[2])
        let location = try #require(try reopened.location(id))
        let packPath = dir.file("vault/" + PackFormat.objectName(location.pack))
        let byte = try SystemFile.open(packPath, .readOnly).readAll(from: UInt64(location.offset) + 100, count: 1)
        try writeAt(packPath, UInt64(location.offset) + 100, [byte[0] ^ 0x01])
        do {
            _ = try reopened.read(id)
            Issue.record("a damaged chunk must not be returned")
        } catch {
            guard case .damagedChunk(let bad, _, _, _) = error else { Issue.record("wrong error: \(error)"); return }
            #expect(bad == id)
        }
        #expect(try reopened.read(ChunkID.sha256(chunks[1])) == chunks[1])
    }

    @Test func locationCacheFollowsIndexObjects() throws {
        let dir = TemporaryDirectory("chunks")
        defer { dir.remove() }
        let objects = LocalDirectoryStore(root: dir.file("vault"))
        let parameters = ChunkParameters(chunkSize: 4096, compression: .none)
        var random = SeededBytes(seed: 9)
        let a = (0..<2000).map { _ in random.bytes(64) }
        let b = (0..<2000).map { _ in random.bytes(64) }
        try writeChunks(try ChunkStore(store: objects, parameters: parameters, cacheDirectory: dir.file("cache")), a)
        // Another host (another cache) adds chunks; this cache merges its index objects on open.
        try writeChunks(try ChunkStore(store: objects, parameters: parameters, cacheDirectory: dir.file("other")), b)
        let merged = try ChunkStore(store: objects, parameters: parameters, cacheDirectory: dir.file("cache"))
        #expect(merged.locations.count == 4000)
        for data in a + b { #expect(try merged.location(ChunkID.sha256(data)) != nil) }

        // An index object disappears (rewritten by gc): the cache is rebuilt, not trusted.
        let indexes = try objects.list(prefix: "index/").map(\.name).sorted()
        let removed = try IndexObject.decode(try objects.get(indexes[0]), name: indexes[0])
        try objects.delete(indexes[0])
        let rebuilt = try ChunkStore(store: objects, parameters: parameters, cacheDirectory: dir.file("cache"))
        #expect(rebuilt.locations.count == 4000 - removed.packs.reduce(0) { $0 + $1.entries.count })
        #expect(try rebuilt.location(removed.packs[0].entries[0].id) == nil)
    }

    /// The cache's sorted runs: (file name, inode), oldest first.
    func runFiles(_ directory: String) throws -> [(String, UInt)] {
        try FileSystem.list(directory).filter { $0.hasPrefix("table-") && !$0.hasSuffix(".tmp") }
            .sorted { Int($0.dropFirst(6))! < Int($1.dropFirst(6))! }
            .map { name in
                let file = try SystemFile.open(directory + "/" + name, .readOnly)
                defer { file.close() }
                return (name, UInt(try file.status().st_ino))
            }
    }

    @Test func smallUpdatesAddRunsWithoutRewritingTheTable() throws {
        let dir = TemporaryDirectory("chunks")
        defer { dir.remove() }
        let objects = LocalDirectoryStore(root: dir.file("vault"))
        let parameters = ChunkParameters(chunkSize: 4096, compression: .none)
        var random = SeededBytes(seed: 11)
        let cache = dir.file("cache")
        var all = (0..<4000).map { _ in random.bytes(64) }
        try writeChunks(try ChunkStore(store: objects, parameters: parameters, cacheDirectory: dir.file("writer")), all)
        _ = try ChunkStore(store: objects, parameters: parameters, cacheDirectory: cache)
        let base = try runFiles(cache)
        #expect(base.count == 1)

        // Backups' worth of new chunks, each written by another cache, then merged into this one:
        // the big run stays as it was (same file, same inode), the new records go to small runs.
        for _ in 0..<6 {
            let batch = (0..<40).map { _ in random.bytes(64) }
            try writeChunks(try ChunkStore(store: objects, parameters: parameters, cacheDirectory: dir.file("writer")), batch)
            all += batch
            let store = try ChunkStore(store: objects, parameters: parameters, cacheDirectory: cache)
            let runs = try runFiles(cache)
            #expect(runs.first?.0 == base[0].0 && runs.first?.1 == base[0].1)
            #expect(runs.count >= 2 && runs.count <= 8)
            #expect(store.locations.count == all.count)
        }
        let small = try ChunkStore(store: objects, parameters: parameters, cacheDirectory: cache)
        for data in all { #expect(try small.location(ChunkID.sha256(data)) != nil) }
        #expect(try small.location(ChunkID.sha256([1, 2, 3])) == nil)

        // A large update merges the runs: fewer of them, nothing lost, the files of the old runs gone.
        let large = (0..<3000).map { _ in random.bytes(64) }
        try writeChunks(try ChunkStore(store: objects, parameters: parameters, cacheDirectory: dir.file("writer")), large)
        all += large
        let merged = try ChunkStore(store: objects, parameters: parameters, cacheDirectory: cache)
        let runs = try runFiles(cache)
        #expect(runs.count == 1)
        #expect(merged.locations.count == all.count)
        for data in all {
            let id = ChunkID.sha256(data)
            #expect(try merged.read(id) == data)
        }
        let names = try FileSystem.list(cache)
        #expect(names.filter { $0.hasPrefix("fanout-") }.count == runs.count)
        #expect(names.filter { $0.hasPrefix("packs-") }.count == 1)
        #expect(!names.contains { $0.hasSuffix(".tmp") })
    }

    /// A rebuild of many groups merges them by levels of sixteen, then into one run.
    @Test func aRebuildOfManyGroupsEndsInOneRunWithEverything() throws {
        let dir = TemporaryDirectory("chunks")
        defer { dir.remove() }
        let objects = LocalDirectoryStore(root: dir.file("vault"))
        let parameters = ChunkParameters(chunkSize: 4096, compression: .none)
        var random = SeededBytes(seed: 13)
        var all: [[UInt8]] = []
        // Many index objects (one per writing session), each a group of its own.
        for _ in 0..<40 {
            let batch = (0..<75).map { _ in random.bytes(64) }
            try writeChunks(try ChunkStore(store: objects, parameters: parameters, cacheDirectory: dir.file("writer")), batch)
            all += batch
        }
        let saved = LocationTable.groupRecords
        LocationTable.groupRecords = 70
        defer { LocationTable.groupRecords = saved }
        let cache = dir.file("cache")
        let store = try ChunkStore(store: objects, parameters: parameters, cacheDirectory: cache)
        #expect(try runFiles(cache).count == 1)
        #expect(store.locations.count == all.count)
        for data in all { #expect(try store.location(ChunkID.sha256(data)) != nil) }
        #expect(try store.location(ChunkID.sha256([7])) == nil)
        let names = try FileSystem.list(cache)
        #expect(names.filter { $0.hasPrefix("fanout-") }.count == 1 && !names.contains { $0.hasSuffix(".tmp") })
    }

    @Test func aCacheWithAMissingRunOrLeftoversIsRebuiltWhole() throws {
        let dir = TemporaryDirectory("chunks")
        defer { dir.remove() }
        let objects = LocalDirectoryStore(root: dir.file("vault"))
        let parameters = ChunkParameters(chunkSize: 4096, compression: .none)
        var random = SeededBytes(seed: 12)
        let cache = dir.file("cache")
        let a = (0..<3000).map { _ in random.bytes(64) }
        let b = (0..<50).map { _ in random.bytes(64) }
        try writeChunks(try ChunkStore(store: objects, parameters: parameters, cacheDirectory: dir.file("writer")), a)
        _ = try ChunkStore(store: objects, parameters: parameters, cacheDirectory: cache)
        try writeChunks(try ChunkStore(store: objects, parameters: parameters, cacheDirectory: dir.file("writer")), b)
        _ = try ChunkStore(store: objects, parameters: parameters, cacheDirectory: cache)
        let runs = try runFiles(cache)
        #expect(runs.count == 2)

        // What a crash in the middle of an update leaves, and a run's table lost.
        try FileSystem.replace(cache + "/table-999", with: [1, 2, 3])
        try FileSystem.replace(cache + "/fanout-998.tmp", with: [4])
        try FileSystem.remove(cache + "/" + runs[1].0)
        let rebuilt = try ChunkStore(store: objects, parameters: parameters, cacheDirectory: cache)
        #expect(rebuilt.locations.count == a.count + b.count)
        for data in a + b { #expect(try rebuilt.location(ChunkID.sha256(data)) != nil) }
        let names = try FileSystem.list(cache)
        #expect(!names.contains("table-999") && !names.contains("fanout-998.tmp"))

        // A lost fan-out is rebuilt from its table and saved, not rebuilt at every opening.
        let fanout = try #require(names.first { $0.hasPrefix("fanout-") })
        let saved = try #require(FileManager.default.contents(atPath: cache + "/" + fanout))
        try FileSystem.remove(cache + "/" + fanout)
        let reopened = try ChunkStore(store: objects, parameters: parameters, cacheDirectory: cache)
        for data in a + b { #expect(try reopened.location(ChunkID.sha256(data)) != nil) }
        #expect(FileManager.default.contents(atPath: cache + "/" + fanout) == saved)
    }

    /// The location cache is a local file: records damaged there (a wrong offset, a pack number
    /// out of range) are found against the packs' own directories and the cache is rebuilt, so a
    /// read succeeds; damage in a pack is still reported as the vault's.
    @Test func aDamagedLocationCacheIsRebuiltNotTakenForADamagedVault() throws {
        let dir = TemporaryDirectory("chunks")
        defer { dir.remove() }
        let objects = LocalDirectoryStore(root: dir.file("vault"))
        let parameters = ChunkParameters(chunkSize: 4096, compression: .none)
        var random = SeededBytes(seed: 21)
        let data = (0..<600).map { _ in random.bytes(4096) }
        let ids = data.map { ChunkID.sha256($0) }
        try writeChunks(try ChunkStore(store: objects, parameters: parameters, cacheDirectory: dir.file("writer")), data)
        let cache = dir.file("cache")
        _ = try ChunkStore(store: objects, parameters: parameters, cacheDirectory: cache)
        /// Rewrites a field of every record of the cache's table.
        func damage(field: Int, _ change: (UInt32) -> UInt32) throws {
            let runs = try runFiles(cache)
            #expect(runs.count == 1)
            let table = cache + "/" + (try #require(runs.last)).0
            var bytes = try #require(FileManager.default.contents(atPath: table).map(Array.init))
            for r in stride(from: 0, to: bytes.count, by: LocationTable.recordSize) {
                let o = r + field
                let value = UInt32(bytes[o]) | UInt32(bytes[o + 1]) << 8 | UInt32(bytes[o + 2]) << 16 | UInt32(bytes[o + 3]) << 24
                let changed = change(value)
                for k in 0..<4 { bytes[o + k] = UInt8(truncatingIfNeeded: changed >> (8 * k)) }
            }
            try FileSystem.replace(table, with: bytes)
        }

        // Offsets moved by 16 bytes: every chunk read from the wrong place.
        try damage(field: 36) { $0 + 16 }
        let moved = try ChunkStore(store: objects, parameters: parameters, cacheDirectory: cache)
        /// Where a chunk's pack's own directory places it.
        func recordedOffset(_ store: ChunkStore, _ id: ChunkID) throws -> UInt32? {
            let location = try #require(try store.location(id))
            return try store.packDirectory(PackFormat.objectName(location.pack)).first { $0.id == id }?.offset
        }
        #expect(try moved.location(ids[0])?.offset == (try recordedOffset(moved, ids[0])).map { $0 + 16 })
        for (i, id) in ids.enumerated().prefix(50) { #expect(try moved.read(id) == data[i]) }
        for id in ids { #expect(try moved.location(id)?.offset == (try recordedOffset(moved, id))) }

        // Pack numbers out of range: an error from the cache, not the vault.
        try damage(field: 32) { $0 + 1000 }
        let renumbered = try ChunkStore(store: objects, parameters: parameters, cacheDirectory: cache)
        var seen = 0
        try renumbered.readMany(ids) { i, bytes in
            #expect(Array(bytes) == data[i])
            seen += 1
        }
        #expect(seen == ids.count)

        // Ids damaged: the chunks are not found by the cache, but are in the vault.
        try damage(field: 0) { $0 ^ 0xffff }
        let renamed = try ChunkStore(store: objects, parameters: parameters, cacheDirectory: cache)
        #expect(try renamed.location(ids[3]) == nil)
        for (i, id) in ids.enumerated().prefix(20) { #expect(try renamed.read(id) == data[i]) }
        #expect(try renamed.location(ids[3]) != nil)

        // Threads that meet the damage at once: one rebuilds, the others wait for it and read again.
        try damage(field: 36) { $0 + 16 }
        let shared = try ChunkStore(store: objects, parameters: parameters, cacheDirectory: cache)
        let failures = Mutex<[String]>([])
        DispatchQueue.concurrentPerform(iterations: 8) { t in
            do {
                try shared.readMany(Array(ids[(t * 75)..<(t * 75 + 75)])) { i, bytes in
                    if Array(bytes) != data[t * 75 + i] { failures.withLock { $0.append("chunk \(t * 75 + i) differs") } }
                }
            } catch {
                failures.withLock { $0.append("\(error)") }
            }
        }
        #expect(failures.withLock { $0 }.isEmpty, "\(failures.withLock { $0 })")

        // A byte flipped in a pack: the cache agrees with the pack's directory, the damage is reported.
        let location = try #require(try renumbered.location(ids[7]))
        let packPath = dir.file("vault") + "/" + PackFormat.objectName(location.pack)
        var pack = try #require(FileManager.default.contents(atPath: packPath).map(Array.init))
        pack[Int(location.offset) + 100] ^= 0x01
        try FileSystem.replace(packPath, with: pack)
        let reader = try ChunkStore(store: objects, parameters: parameters, cacheDirectory: cache)
        #expect(throws: ChunkStoreError.self) { _ = try reader.read(ids[7]) }
        do {
            _ = try reader.read(ids[7])
        } catch {
            guard case .damagedChunk(let id, _, let offset, _) = error else { Issue.record("\(error)"); return }
            #expect(id == ids[7] && offset == location.offset)
        }
        #expect(try reader.read(ids[8]) == data[8])
    }
}
