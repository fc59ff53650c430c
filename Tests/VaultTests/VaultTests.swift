import ChunkStore
import Foundation
import ObjectStore
import SystemIO
import Testing
import TestSupport
@testable import Vault

/// A vault in a temporary directory with its own state directory.
struct Fixture {
    let dir = TemporaryDirectory("vault")
    var vaultPath: String { dir.file("vault") }
    var state: String { dir.file("state") }

    func create(chunkSize: Int = 65536) throws -> Vault {
        try Vault.create(store: LocalDirectoryStore(root: vaultPath), chunkSize: chunkSize, stateDirectory: state)
    }

    func open() throws -> Vault {
        try Vault.open(path: vaultPath, stateDirectory: state)
    }

    /// A sparse disk image: random data regions, compressible regions, holes.
    func makeDisk(_ name: String, size: UInt64, seed: UInt64) throws -> String {
        let path = dir.file(name)
        try setSize(path, size)
        var random = SeededBytes(seed: seed)
        var offset: UInt64 = 0
        var region = 0
        while offset < size {
            let length = min(UInt64(300_000 + region * 7919), size - offset)
            switch region % 3 {
            case 0: try writeAt(path, offset, random.bytes(Int(length)))
            case 1: try writeAt(path, offset, [UInt8](repeating: UInt8(region), count: Int(length)))
            default: break  // hole
            }
            offset += length + 4096 * UInt64(region % 5)
            region += 1
        }
        return path
    }
}

@Suite struct BackupRestoreTests {
    @Test func backupAndRestoreAreBitExactAndSparse() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        let vault = try f.create()
        let disk = try f.makeDisk("os.img", size: 20_000_000 + 1234, seed: 1)
        let report = try vault.backup(BackupRequest(machine: "web01", disks: [("os", .path(disk))]))
        #expect(report.disks[0].size == 20_001_234)
        #expect(report.chunksNew > 0)
        #expect(report.consistency == .crash)

        let point = try f.open().point("web01@latest")
        #expect(point.id == report.point)
        let out = f.dir.file("restored.img")
        _ = try f.open().restore(point: point, disk: "os", to: out)
        #expect(try sha256(file: out) == sha256(file: disk))
        #expect(allocatedBytes(out) < 18_000_000)  // holes stayed holes
        // An existing file is not replaced without being asked.
        #expect(throws: VaultError.self) { try vault.restore(point: point, disk: "os", to: out) }
        _ = try vault.restore(point: point, disk: "os", to: out, overwrite: true)
        #expect(try sha256(file: out) == sha256(file: disk))
    }

    /// A manifest whose checksum matches but whose fields are crafted (an index depth that does
    /// not fit the disk, a chunk size that is not a power of two, a disk name that is a path) is
    /// damage, reported by name: never a trap or an endless walk.
    @Test func craftedManifestsAreDamageNotCrashes() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        let vault = try f.create()
        let disk = try f.makeDisk("os.img", size: 1_000_000, seed: 3)
        let report = try vault.backup(BackupRequest(machine: "m", disks: [("os", .path(disk))]))
        let good = try Data(contentsOf: URL(fileURLWithPath: f.vaultPath + "/points/m/" + report.point))
        let store = LocalDirectoryStore(root: f.vaultPath)
        for (field, value) in [("indexDepth", 3 as Any), ("chunkSize", 65537 as Any), ("name", "../../x" as Any), ("size", UInt64.max as Any)] {
            var json = try #require(try JSONSerialization.jsonObject(with: good) as? [String: Any])
            var disks = try #require(json["disks"] as? [[String: Any]])
            disks[0][field] = value
            json["disks"] = disks
            let bytes = Array(try JSONSerialization.data(withJSONObject: json))
            let name = "points/m/" + ChunkID.sha256(bytes).hex
            #expect(throws: VaultError.self, "\(field)") { try RecoveryPoint.decode(bytes, name: name) }
            try store.put(name, bytes)
            var damaged: [String] = []
            _ = try f.open().points { object, _ in damaged.append(object) }
            #expect(damaged == [name], "\(field)")
            #expect(try !f.open().check(readData: false).ok, "\(field)")
            try store.delete(name)
        }
        #expect(try f.open().check(readData: true).ok)
    }

    /// Batches are read two blocks at a time; the order must cover every batch once, and the
    /// ids of the second block never wait for more than a block.
    @Test func theReadOrderCoversEveryBatchOnce() {
        for batches in [0, 1, 2, 3, 7, 8, 9, 16, 17, 100, 257] {
            for block in [1, 2, 3, 4, 128] {
                let order = Vault.ReadOrder(batches: batches, block: block)
                let seen = (0..<(batches + 3)).compactMap { order.batch($0) }
                #expect(seen.count == batches && Set(seen) == Set(0..<batches), "batches \(batches), block \(block)")
                // In slot order, the results waiting for their turn.
                var waiting = Set<Int>(), next = 0, most = 0
                for b in seen {
                    waiting.insert(b)
                    while waiting.remove(next) != nil { next += 1 }
                    most = max(most, waiting.count)
                }
                #expect(most <= block)
            }
        }
        #expect(Vault.ReadOrder(batches: nil, block: 4).batch(1_000_000) == 1_000_000)
    }

    /// Reading the disk's regions side by side gives the same point as reading it in order.
    @Test func aDiskReadTwoRegionsAtOnceGivesTheSamePoint() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        let vault = try f.create()
        let disk = try f.makeDisk("os.img", size: 30_000_000 + 777, seed: 3)
        let inOrder = try vault.backup(BackupRequest(machine: "a", disks: [("os", .path(disk))]))
        var request = BackupRequest(machine: "b", disks: [("os", .path(disk))])
        request.readBlockBytes = 4 << 20   // one batch per block: every batch alternates
        let sideBySide = try vault.backup(request)
        #expect(sideBySide.disks[0].indexRoot == inOrder.disks[0].indexRoot)
        // And an incremental one, restored exactly.
        try writeAt(disk, 21_000_000, randomBytes(seed: 4, count: 200_000))
        var next = BackupRequest(machine: "b", disks: [("os", .path(disk))])
        next.readBlockBytes = 8 << 20
        let changed = try vault.backup(next)
        #expect(changed.chunksNew > 0 && changed.chunksNew <= 5)
        // Made within a second of its parent: still the latest.
        #expect(try vault.point("b@latest").id == changed.point)
        let out = f.dir.file("restored.img")
        _ = try vault.restore(point: try vault.point("b@latest"), disk: "os", to: out)
        #expect(try sha256(file: out) == sha256(file: disk))
    }

    @Test func incrementalBackupStoresOnlyChangedChunks() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        let vault = try f.create()
        let disk = try f.makeDisk("os.img", size: 16 << 20, seed: 2)
        let first = try vault.backup(BackupRequest(machine: "db01", disks: [("os", .path(disk))], time: Date(timeIntervalSince1970: 1_000_000)))
        // Day 1: 4 KiB writes in 5 different 64 KiB slots.
        var random = SeededBytes(seed: 3)
        for slot in [3, 40, 41, 100, 200] { try writeAt(disk, UInt64(slot) * 65536 + 8192, random.bytes(4096)) }
        let second = try f.open().backup(BackupRequest(machine: "db01", disks: [("os", .path(disk))], time: Date(timeIntervalSince1970: 1_086_400)))
        // Five data chunks plus the changed index nodes (one leaf and the root at most).
        #expect(second.disks[0].newChunks == 5)
        #expect(second.newBytes <= 5 * 65536 + 2 * 65536)
        #expect(second.chunksReused + second.disks[0].holeChunks == 256 - 5)

        let points = try f.open().points(machine: "db01")
        #expect(points.map(\.id) == [first.point, second.point])
        #expect(points[1].parent == first.point)
        let out = f.dir.file("day1.img")
        _ = try f.open().restore(point: try f.open().point("db01@latest"), disk: "os", to: out)
        #expect(try sha256(file: out) == sha256(file: disk))
    }

    /// The slot tags kept in the state directory let an incremental backup skip SHA-256 for
    /// unchanged slots; the point must be exactly the one a state-less backup makes, and a
    /// damaged, foreign or stale record must only cost the shortcut.
    @Test func slotFingerprintsGiveTheSamePointAsHashingEverything() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        let vault = try f.create()
        let disk = try f.makeDisk("os.img", size: 12 << 20, seed: 7)
        let day0 = try vault.backup(BackupRequest(machine: "m", disks: [("os", .path(disk))], time: Date(timeIntervalSince1970: 1_000_000)))
        let record = SlotFingerprints.path(stateDirectory: f.state, vault: vault.config.id, machine: "m", disk: "os")
        #expect(FileSystem.exists(record))
        #expect(!FileSystem.exists(record + ".new"))

        var random = SeededBytes(seed: 8)
        var time = 1_000_000.0
        // Changes; then the record damaged; then a record of another point; then none at all.
        for round in 0..<4 {
            for slot in [1, 2, 50 + round, 150] { try writeAt(disk, UInt64(slot) * 65536 + 100, random.bytes(5000)) }
            switch round {
            case 1:
                // Every tag byte flipped: no slot may take its previous id from a wrong tag.
                var tags = Array(try Data(contentsOf: URL(fileURLWithPath: record)).dropFirst(72))
                for i in tags.indices { tags[i] ^= 0x5a }
                try writeAt(record, 72, tags)
            case 2:
                try writeAt(record, 40, [try Data(contentsOf: URL(fileURLWithPath: record))[40] ^ 1])  // names another point
            case 3:
                try FileSystem.remove(record)
            default: break
            }
            time += 86400
            let report = try f.open().backup(BackupRequest(machine: "m", disks: [("os", .path(disk))], time: Date(timeIntervalSince1970: time)))
            #expect(report.disks[0].newChunks == 4)
            // Only an intact record of the parent point lets slots be recognised.
            if round == 0 {
                #expect(report.chunksRecognised == report.chunksReused)
                #expect(report.chunksRecognised > 100)
            } else {
                #expect(report.chunksRecognised == 0)
            }
            // The same disk backed up into a second vault without any record: the same ids.
            let g = Fixture()
            defer { g.dir.remove() }
            let other = try g.create()
            let plain = try other.backup(BackupRequest(machine: "m", disks: [("os", .path(disk))]))
            // Equal index roots: equal ids in every slot.
            #expect(plain.disks[0].indexRoot == report.disks[0].indexRoot)
        }
        #expect(day0.disks[0].newChunks > 50)
        let out = f.dir.file("restored.img")
        _ = try f.open().restore(point: try f.open().point("m@latest"), disk: "os", to: out)
        #expect(try sha256(file: out) == sha256(file: disk))
    }

    /// The GMAC kernel gives BoringSSL's tags (the records of earlier versions stay valid): every
    /// length up to 600 bytes (partial blocks, rounds of 256), 64 KiB slots, far slot numbers;
    /// and it is in use wherever the CPU has AES-NI, AVX2 and VPCLMULQDQ.
    @Test func slotTagsFromTheKernelMatchBoringSSL() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        let fingerprints = try #require(SlotFingerprints.open(path: f.dir.file("record"), parent: nil, chunkSize: 65536))
        defer { fingerprints.abandon() }
        let data = randomBytes(seed: 12, count: 65536 + 700)
        data.withUnsafeBytes { raw in
            for length in 0...600 {
                let bytes = UnsafeRawBufferPointer(rebasing: raw[(length % 7)..<(length % 7 + length)])
                #expect(fingerprints.tag(bytes, slot: length * 977) == fingerprints.referenceTag(bytes, slot: length * 977), "length \(length)")
            }
            for slot in [0, 1, 1 << 20, Int(UInt32.max) + 5] {
                let bytes = UnsafeRawBufferPointer(rebasing: raw[3..<(3 + 65536)])
                let tag = fingerprints.tag(bytes, slot: slot)
                #expect(tag?.count == 16 && tag == fingerprints.referenceTag(bytes, slot: slot))
            }
        }
        let cpu = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? ""
        if cpu.contains(" vpclmulqdq") && cpu.contains(" aes ") && cpu.contains(" avx2 ") { #expect(fingerprints.usesKernel) }
    }

    @Test func standardInputAndSeveralDisks() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        let vault = try f.create(chunkSize: 4096)
        let a = try f.makeDisk("a.img", size: 3_000_000, seed: 4)
        let b = try f.makeDisk("b.img", size: 1_000_003, seed: 5)
        let report = try vault.backup(BackupRequest(machine: "m", disks: [("a", .path(a)), ("b", .path(b))], tags: ["weekly"]))
        #expect(report.disks.map(\.name) == ["a", "b"])
        let point = try vault.point("m@" + String(report.point.prefix(8)))
        for (name, path) in [("a", a), ("b", b)] {
            let out = f.dir.file("out-" + name)
            _ = try vault.restore(point: point, disk: name, to: out)
            #expect(try sha256(file: out) == sha256(file: path))
        }
        #expect(point.tags == ["weekly"])
        #expect(throws: VaultError.self) { try vault.restore(point: point, disk: "c", to: f.dir.file("c")) }
    }

    @Test func emptyAndTinyDisks() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        let vault = try f.create()
        let empty = f.dir.file("empty.img")
        try setSize(empty, 0)
        let tiny = f.dir.file("tiny.img")
        try writeAt(tiny, 0, [1, 2, 3])
        let zeros = f.dir.file("zeros.img")
        try setSize(zeros, 10 << 20)
        let report = try vault.backup(BackupRequest(machine: "m", disks: [("e", .path(empty)), ("t", .path(tiny)), ("z", .path(zeros))]))
        #expect(report.disks[2].holeChunks == 160)
        #expect(report.disks[2].indexRoot == ChunkID.zero.hex)
        let point = try vault.point("m")
        for (name, path) in [("e", empty), ("t", tiny), ("z", zeros)] {
            let out = f.dir.file("out-" + name)
            _ = try vault.restore(point: point, disk: name, to: out)
            #expect(try sha256(file: out) == sha256(file: path))
        }
    }
}

@Suite struct DiskIndexTests {
    final class MemorySink: IndexNodeSink {
        var nodes: [ChunkID: [UInt8]] = [:]
        func store(node: [UInt8]) throws -> ChunkID {
            let id = ChunkID.sha256(node)
            nodes[id] = node
            return id
        }
    }

    @Test(arguments: [0, 1, 2047, 2048, 2049, 5000])
    func treeShapeDependsOnlyOnSlotCount(_ slots: Int) throws {
        let sink = MemorySink()
        var writer = DiskIndexWriter(sink: sink)
        for i in 0..<slots { try writer.append(ChunkID.sha256([UInt8(i & 0xff), UInt8(i >> 8)])) }
        let (root, depth) = try writer.finish()
        #expect(depth == DiskIndex.depth(forSlots: slots))
        if slots == 0 { #expect(root.isZero) }
        if slots > 0 {
            // The root node has as many entries as the level below it needs.
            let rootEntries = sink.nodes[root]!.count / 32
            let below = depth == 1 ? slots : (slots + 2047) / 2048
            #expect(rootEntries == below)
        }
    }

    @Test func depths() {
        #expect(DiskIndex.depth(forSlots: 0) == 1)
        #expect(DiskIndex.depth(forSlots: 2048) == 1)
        #expect(DiskIndex.depth(forSlots: 2049) == 2)
        #expect(DiskIndex.depth(forSlots: 2048 * 2048) == 2)
        #expect(DiskIndex.depth(forSlots: 2048 * 2048 + 1) == 3)
        // 10 TB at 64 KiB
        #expect(DiskIndex.depth(forSlots: 160_000_000) == 3)
    }

    @Test func unchangedRegionsShareIndexNodes() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        let vault = try f.create(chunkSize: 4096)
        // 3 leaves' worth of slots (2048 x 4 KiB = 8 MiB each).
        let disk = try f.makeDisk("d.img", size: 24 << 20, seed: 6)
        _ = try vault.backup(BackupRequest(machine: "m", disks: [("d", .path(disk))], time: Date(timeIntervalSince1970: 0)))
        try writeAt(disk, 9 << 20, [0xAA])
        let second = try f.open().backup(BackupRequest(machine: "m", disks: [("d", .path(disk))], time: Date(timeIntervalSince1970: 60)))
        // One data chunk, one leaf, one root: the two other leaves are shared.
        #expect(second.chunksNew == 1)
        #expect(second.newBytes == 4096 + 2048 * 32 + 3 * 32)
    }
}

@Suite struct PointSelectionTests {
    @Test func selectors() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        let vault = try f.create()
        let disk = try f.makeDisk("d.img", size: 1 << 20, seed: 7)
        var ids: [String] = []
        for day in 0..<3 {
            try writeAt(disk, 0, [UInt8(day)])
            let time = Timestamp.parse("2026-01-0\(day + 1)T10:00:00Z")!
            ids.append(try vault.backup(BackupRequest(machine: "web01", disks: [("os", .path(disk))], time: time)).point)
        }
        #expect(try vault.point("web01@latest").id == ids[2])
        #expect(try vault.point("web01").id == ids[2])
        #expect(try vault.point("web01@-1").id == ids[1])
        #expect(try vault.point("web01@-2").id == ids[0])
        #expect(try vault.point("web01@2026-01-02T10:00:00Z").id == ids[1])
        #expect(try vault.point("web01@2026-01-01").id == ids[0])
        #expect(try vault.point("web01@" + ids[1].prefix(10)).id == ids[1])
        #expect(throws: VaultError.self) { try vault.point("web01@-3") }
        #expect(throws: VaultError.self) { try vault.point("web01@2025-01-01") }
        #expect(throws: VaultError.self) { try vault.point("nobody@latest") }
        #expect(throws: VaultError.self) { try vault.point("../etc@latest") }
    }
}

@Suite struct FaultTests {
    @Test func missingAndForeignVaults() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        #expect { try f.open() } throws: { error in
            guard case VaultError.noVault = error else { return false }
            return true
        }
        try writeAt(f.vaultPath + "-file", 0, [1])
        try FileSystem.createDirectories(f.dir.file("foreign"))
        try writeAt(f.dir.file("foreign/config"), 0, Array("{\"x\":1}".utf8))
        #expect { try Vault.open(path: f.dir.file("foreign"), stateDirectory: f.state) } throws: { error in
            guard case VaultError.foreignVault = error else { return false }
            return true
        }
        _ = try f.create()
        #expect(throws: VaultError.self) { try f.create() }
    }

    @Test func aFlippedByteIsFoundByCheckAndStopsRestore() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        let vault = try f.create()
        let disk = try f.makeDisk("os.img", size: 8 << 20, seed: 8)
        let report = try vault.backup(BackupRequest(machine: "m", disks: [("os", .path(disk))]))
        #expect(try f.open().check(readData: true).ok)
        // The restore below reads through the slot tags this backup recorded: a damaged chunk
        // must fail their check and then its SHA-256.
        #expect(vault.recordedSlotTags(point: try f.open().point("m"), disk: "os") != nil)

        // Damage the first data chunk of slot 0.
        let leaf = try f.open().reader(report.disks[0]).leaf(containing: 0)
        let id = leaf.ids[0]
        let location = try #require(try f.open().chunks.location(id))
        let pack = f.vaultPath + "/" + PackFormat.objectName(location.pack)
        let original = try SystemFile.open(pack, .readOnly).readAll(from: UInt64(location.offset) + 10, count: 1)
        try writeAt(pack, UInt64(location.offset) + 10, [original[0] ^ 0x10])

        let structural = try f.open().check(readData: false)
        #expect(structural.errors.isEmpty)  // the structure is intact; only the data is not
        let full = try f.open().check(readData: true)
        #expect(!full.ok)
        #expect(full.damaged.count == 1)
        #expect(full.damaged.first?.disk == "os")
        #expect(full.damaged.first?.start == 0)
        #expect(full.damaged.first?.end == 65535)

        let out = f.dir.file("out.img")
        #expect { try f.open().restore(point: try f.open().point("m"), disk: "os", to: out) } throws: { error in
            guard case VaultError.damagedPoint(_, let diskName, let range, _) = error else { return false }
            return diskName == "os" && range == 0...65535
        }
        #expect(!FileSystem.exists(out))
        #expect(!FileSystem.exists(out + ".lifeboat-partial"))
    }

    @Test func aSecondBackupOfTheSameMachineIsRefusedWhileTheFirstRuns() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        let vault = try f.create()
        let store = LocalDirectoryStore(root: f.vaultPath)
        let lock = try MachineLock.acquire(machine: "m", operation: "backup", store: store)
        let disk = try f.makeDisk("os.img", size: 1 << 20, seed: 9)
        #expect { try vault.backup(BackupRequest(machine: "m", disks: [("os", .path(disk))])) } throws: { error in
            guard case VaultError.locked = error else { return false }
            return true
        }
        // Another machine is not affected.
        _ = try vault.backup(BackupRequest(machine: "other", disks: [("os", .path(disk))]))
        lock.release()
        _ = try vault.backup(BackupRequest(machine: "m", disks: [("os", .path(disk))]))
    }

    @Test func aLockLeftByADeadProcessIsTakenOver() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        let vault = try f.create()
        let dead = #"{"host":"\#(hostName())","pid":2147483000,"started":"2026-01-01T00:00:00Z","operation":"backup"}"#
        try LocalDirectoryStore(root: f.vaultPath).put("locks/m", Array(dead.utf8))
        let disk = try f.makeDisk("os.img", size: 1 << 20, seed: 10)
        _ = try vault.backup(BackupRequest(machine: "m", disks: [("os", .path(disk))]))
        #expect(try LocalDirectoryStore(root: f.vaultPath).size("locks/m") == nil)
    }

    @Test func badSourcesAndTargets() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        let vault = try f.create()
        #expect(throws: VaultError.self) { try vault.backup(BackupRequest(machine: "m", disks: [("os", .path(f.dir.file("missing.img")))])) }
        #expect(throws: VaultError.self) { try vault.backup(BackupRequest(machine: "m", disks: [("os", .path(f.dir.path))])) }
        #expect(throws: VaultError.self) { try vault.backup(BackupRequest(machine: "bad/name", disks: [("os", .path("/dev/null"))])) }
        #expect(throws: VaultError.self) { try vault.backup(BackupRequest(machine: "m", disks: [])) }
        #expect(try vault.points().isEmpty)
        let disk = try f.makeDisk("os.img", size: 1 << 20, seed: 11)
        _ = try vault.backup(BackupRequest(machine: "m", disks: [("os", .path(disk))]))
        #expect(throws: VaultError.self) {
            try vault.restore(point: try vault.point("m"), disk: "os", to: f.dir.file("no/such/dir/out.img"))
        }
        // A damaged manifest is reported, not trusted.
        let name = try LocalDirectoryStore(root: f.vaultPath).list(prefix: "points/")[0].name
        try writeAt(f.vaultPath + "/" + name, 5, [0x7e])
        var damaged: [String] = []
        #expect(try f.open().points { object, _ in damaged.append(object) }.isEmpty)
        #expect(damaged == [name])
        #expect(try !f.open().check(readData: false).ok)
    }
}

@Suite struct TimestampTests {
    @Test(arguments: ["1970-01-01T00:00:00Z", "2000-02-29T23:59:59Z", "2026-11-22T02:21:31Z", "2100-03-01T12:00:00Z", "1999-12-31T00:00:01Z"])
    func fastParserAgreesWithTheFormatter(_ text: String) throws {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime]
        #expect(Timestamp.parseUTC(text) == formatter.date(from: text))
        #expect(Timestamp.format(try #require(Timestamp.parse(text))) == text)
    }

    /// The hand-written formatter against Foundation's, over dates from 1900 to 2400 with
    /// fractions of a second (rounded down by both).
    @Test func formatAgreesWithTheFormatter() {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime]
        formatter.timeZone = TimeZone(identifier: "UTC")
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<20_000 {
            let date = Date(timeIntervalSince1970: Double.random(in: -2_208_988_800...13_569_465_600, using: &generator))
            #expect(Timestamp.format(date) == formatter.string(from: date), "\(date.timeIntervalSince1970)")
        }
        for edge in [0.0, -0.5, 951_782_399.999, 951_782_400, 4_107_542_400] {
            let date = Date(timeIntervalSince1970: edge)
            #expect(Timestamp.format(date) == formatter.string(from: date), "\(edge)")
        }
    }

    @Test func otherFormsStillParse() {
        #expect(Timestamp.parseUTC("2026-01-01") == nil)
        #expect(Timestamp.parse("2026-01-01") != nil)
        #expect(Timestamp.parse("2026-01-01T10:00:00+02:00") == Timestamp.parse("2026-01-01T08:00:00Z"))
        #expect(Timestamp.parse("2026-13-01T00:00:00Z") == nil)
    }
}
