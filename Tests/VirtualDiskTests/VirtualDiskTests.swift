import ChunkStore
import Foundation
import ObjectStore
import SystemIO
import Testing
import TestSupport
import Vault
import VirtualDisk

@Suite struct DiskReaderTests {
    /// A point of a 5 MiB + 1000 byte disk: random data, a hole, a short last slot.
    func fixture() throws -> (TemporaryDirectory, Vault, RecoveryPoint, [UInt8]) {
        let dir = TemporaryDirectory("vdisk")
        let vault = try Vault.create(store: LocalDirectoryStore(root: dir.file("vault")), stateDirectory: dir.file("state"))
        var disk = randomBytes(seed: 1, count: (5 << 20) + 1000)
        for i in (1 << 20)..<(2 << 20) { disk[i] = 0 }  // a 1 MiB hole (16 slots)
        let path = dir.file("d.img")
        try writeAt(path, 0, disk)
        _ = try vault.backup(BackupRequest(machine: "m", disks: [("d", .path(path))]))
        return (dir, vault, try vault.point("m"), disk)
    }

    @Test func readsAnyRangeExactly() throws {
        let (dir, vault, point, disk) = try fixture()
        defer { dir.remove() }
        let reader = DiskReader(point: point, disk: try point.disk("d"), chunks: vault.chunks, cache: ChunkCache(capacityBytes: 1 << 20))
        var random = SeededBytes(seed: 2)
        var buffer = [UInt8](repeating: 0, count: 300_000)
        for _ in 0..<200 {
            let offset = Int(random.next() % UInt64(disk.count))
            let length = Int(random.next() % 300_000) + 1
            let n = try buffer.withUnsafeMutableBytes { try reader.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<length]), at: UInt64(offset)) }
            #expect(n == min(length, disk.count - offset))
            #expect(buffer[0..<n] == disk[offset..<(offset + n)])
        }
        #expect(try buffer.withUnsafeMutableBytes { try reader.read(into: $0, at: UInt64(disk.count)) } == 0)
    }

    @Test func holesAreFound() throws {
        let (dir, vault, point, disk) = try fixture()
        defer { dir.remove() }
        let reader = DiskReader(point: point, disk: try point.disk("d"), chunks: vault.chunks, cache: ChunkCache(capacityBytes: 1 << 20))
        #expect(try reader.nextHole(from: 0) == 1 << 20)
        #expect(try reader.nextData(from: 1 << 20) == 2 << 20)
        #expect(try reader.nextData(from: (1 << 20) + 5) == 2 << 20)
        #expect(try reader.nextHole(from: 2 << 20) == UInt64(disk.count))
        #expect(try reader.nextData(from: UInt64(disk.count)) == nil)
    }

    @Test func cacheStaysWithinItsSize() {
        let cache = ChunkCache(capacityBytes: 1 << 20, slotSize: 65536)
        for i in 0..<100 {
            let bytes = [UInt8](repeating: UInt8(i), count: 65536 - i)
            bytes.withUnsafeBytes { cache.put(ChunkID.sha256(bytes), $0) }
        }
        #expect(cache.statistics.entries == 16)
        #expect(cache.statistics.bytes <= 1 << 20)
        let last = [UInt8](repeating: 99, count: 65536 - 99)
        var out = [UInt8](repeating: 0, count: 100)
        #expect(out.withUnsafeMutableBytes { cache.copy(ChunkID.sha256(last), from: 1000, to: 1100, into: $0) })
        #expect(out == Array(last[1000..<1100]))
        let first = [UInt8](repeating: 0, count: 65536)
        #expect(!out.withUnsafeMutableBytes { cache.copy(ChunkID.sha256(first), from: 0, to: 100, into: $0) })
        // Asking past a chunk's end is a miss, never stale bytes.
        #expect(!out.withUnsafeMutableBytes { cache.copy(ChunkID.sha256(last), from: 65500, to: 65600, into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<100])) })
    }
}

@Suite struct VHDFooterTests {
    @Test func footerFieldsAndChecksum() {
        let size: UInt64 = 2 << 30
        let footer = VHDFooter.make(diskSize: size, time: Date(timeIntervalSince1970: 946_684_800 + 100), identity: Array(repeating: 7, count: 32))
        #expect(footer.count == 512)
        #expect(Array(footer[0..<8]) == Array("conectix".utf8))
        func be<T: FixedWidthInteger>(_ offset: Int, _: T.Type) -> T {
            footer[offset..<(offset + MemoryLayout<T>.size)].reduce(T(0)) { $0 << 8 | T($1) }
        }
        #expect(be(24, UInt32.self) == 100)            // seconds since 2000-01-01
        #expect(be(40, UInt64.self) == size)           // original size
        #expect(be(48, UInt64.self) == size)           // current size
        #expect(be(60, UInt32.self) == 2)              // fixed disk
        var sum: UInt32 = 0
        for (i, b) in footer.enumerated() where !(64..<68).contains(i) { sum &+= UInt32(b) }
        #expect(be(64, UInt32.self) == ~sum)
        // CHS per the specification for 2 GiB: 4161 cylinders, 16 heads, 63 sectors.
        #expect(be(56, UInt16.self) == 4161)
        #expect(footer[58] == 16)
        #expect(footer[59] == 63)
    }
}
