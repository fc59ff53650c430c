import Foundation
import Testing
import TestSupport
import VirtualDisk

/// Partition tables written by sfdisk and sgdisk, read back and compared with what sfdisk itself
/// reports; then damaged and crafted tables that must give warnings, never a crash or a hang.
@Suite struct PartitionTableTests {
    /// sfdisk's own reading of a table: (number, start sector, sectors, type, name).
    func reference(_ path: String) throws -> [(Int, UInt64, UInt64, String, String?)] {
        let result = run("/usr/sbin/sfdisk", ["-J", path])
        try #require(result.status == 0, "\(result.stderr)")
        let json = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any]
        let table = json?["partitiontable"] as? [String: Any]
        let partitions = table?["partitions"] as? [[String: Any]] ?? []
        return partitions.compactMap { p in
            guard let node = p["node"] as? String, let number = Int(String(node.reversed().prefix(while: \.isNumber).reversed())),
                  let start = p["start"] as? Int, let size = p["size"] as? Int, let type = p["type"] as? String else { return nil }
            return (number, UInt64(start), UInt64(size), type, p["name"] as? String)
        }
    }

    func gptDisk(_ dir: TemporaryDirectory, _ name: String = "gpt.img") throws -> String {
        let path = dir.file(name)
        try setSize(path, 64 << 20)
        let made = shell("sgdisk -n 1:2048:+10M -t 1:ef00 -c 1:'EFI system' -n 2:0:+20M -t 2:8300 -c 2:root -n 3:0:0 \(path)")
        try #require(made.status == 0, "\(made.stderr)")
        return path
    }

    func expectSame(_ table: PartitionTable, _ reference: [(Int, UInt64, UInt64, String, String?)]) {
        #expect(table.partitions.count == reference.count)
        for (p, r) in zip(table.partitions, reference) {
            #expect(p.number == r.0)
            #expect(p.start == r.1 * 512)
            #expect(p.size == r.2 * 512)
            if p.scheme == .mbr {
                #expect(Int(p.type, radix: 16) == Int(r.3, radix: 16))
            } else {
                #expect(p.type == r.3)
                #expect(p.name == r.4)
            }
        }
    }

    @Test func crc32MatchesTheStandardCheckValue() {
        #expect(CRC32.checksum(Array("123456789".utf8)) == 0xCBF4_3926)
    }

    @Test func gptWrittenBySgdisk() throws {
        let dir = TemporaryDirectory("gpt")
        defer { dir.remove() }
        let path = try gptDisk(dir)
        let table = try PartitionTable.read(from: FileImage(path: path))
        #expect(table.scheme == .gpt)
        #expect(table.warnings.isEmpty)
        expectSame(table, try reference(path))
        #expect(table.partitions[0].type == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B")
        #expect(table.partitions[0].name == "EFI system")
        let uuids = shell("sfdisk -J \(path) | grep -o '\"uuid\": \"[^\"]*\"' | cut -d'\"' -f4").stdout.split(separator: "\n").map(String.init)
        let guids: [String] = table.partitions.map { $0.guid ?? "" }
        #expect(guids == uuids)
    }

    @Test func mbrWithAnExtendedPartitionAndTwoLogicals() throws {
        let dir = TemporaryDirectory("mbr")
        defer { dir.remove() }
        let path = dir.file("mbr.img")
        try setSize(path, 64 << 20)
        let script = """
            label: dos
            mbr.img1 : start=2048, size=10M, type=83
            mbr.img2 : size=10M, type=c
            mbr.img3 : size=30M, type=5
            mbr.img5 : size=8M, type=83
            mbr.img6 : size=8M, type=82

            """
        let made = shell("cd \(dir.path) && printf '\(script.replacingOccurrences(of: "\n", with: "\\n"))' | sfdisk -q mbr.img")
        try #require(made.status == 0, "\(made.stderr)")
        let table = try PartitionTable.read(from: FileImage(path: path))
        #expect(table.scheme == .mbr)
        #expect(table.warnings.isEmpty)
        // The extended partition is a container, not a volume: it is not listed.
        expectSame(table, try reference(path).filter { $0.3 != "5" })
        #expect(table.partitions.map(\.number) == [1, 2, 5, 6])
    }

    @Test func wholeDiskFilesystemHasNoTable() throws {
        let dir = TemporaryDirectory("notable")
        defer { dir.remove() }
        let path = dir.file("fat.img")
        try #require(shell("mkfs.vfat -C \(path) 8192 >/dev/null").status == 0)
        let table = try PartitionTable.read(from: FileImage(path: path))
        #expect(table.scheme == nil)
        #expect(table.partitions.isEmpty)
        try setSize(dir.file("zero.img"), 1 << 20)
        #expect(try PartitionTable.read(from: FileImage(path: dir.file("zero.img"))).scheme == nil)
        try setSize(dir.file("tiny.img"), 100)
        #expect(try PartitionTable.read(from: FileImage(path: dir.file("tiny.img"))).partitions.isEmpty)
    }

    @Test func damagedPrimaryGPTFallsBackToTheBackup() throws {
        let dir = TemporaryDirectory("gptbackup")
        defer { dir.remove() }
        let path = try gptDisk(dir)
        let expected = try reference(path)
        try writeAt(path, 512, [UInt8](repeating: 0, count: 512))
        let table = try PartitionTable.read(from: FileImage(path: path))
        #expect(table.scheme == .gpt)
        expectSame(table, expected)
        #expect(table.warnings.count == 1)
        #expect(table.warnings.first?.contains("backup") == true)
    }

    @Test func flippedByteInTheEntryArrayIsCaught() throws {
        let dir = TemporaryDirectory("gptflip")
        defer { dir.remove() }
        let path = try gptDisk(dir)
        let expected = try reference(path)
        // The primary array starts at sector 2: its checksum no longer matches, the backup's does.
        let original = try FileImage(path: path).bytes(at: 1024 + 40, count: 1, what: "t")
        try writeAt(path, 1024 + 40, [original[0] ^ 0x10])
        var table = try PartitionTable.read(from: FileImage(path: path))
        expectSame(table, expected)
        #expect(table.warnings.contains { $0.contains("entry array checksum") })
        // The same flip in the backup's array (at sectors 131039...): no copy is good.
        let size = fileSize(path)!
        try writeAt(path, size - 33 * 512 + 40, [original[0] ^ 0x10])
        table = try PartitionTable.read(from: FileImage(path: path))
        #expect(table.scheme == .gpt)
        #expect(table.partitions.isEmpty)
        #expect(table.warnings.contains { $0.contains("no partitions") })
    }

    /// Rewrites the primary GPT header's field at `offset` and fixes its checksum, as a crafted
    /// image would.
    func patchGPTHeader(_ path: String, at lba: UInt64, field offset: Int, _ value: [UInt8]) throws {
        var header = try FileImage(path: path).bytes(at: lba * 512, count: 92, what: "header")
        header.replaceSubrange(offset..<(offset + value.count), with: value)
        header.replaceSubrange(16..<20, with: [0, 0, 0, 0])
        let crc = CRC32.checksum(header)
        header.replaceSubrange(16..<20, with: withUnsafeBytes(of: crc.littleEndian, Array.init))
        try writeAt(path, lba * 512, header)
    }

    /// An entry from LBA 0 to 2^64-1 (its CRCs made right: 2^64 sectors) is clipped to the
    /// disk, not an overflow that kills the mount.
    @Test func gptEntryEndingAtTheLastPossibleSectorIsClipped() throws {
        let dir = TemporaryDirectory("gptend")
        defer { dir.remove() }
        let path = try gptDisk(dir)
        let header = try FileImage(path: path).bytes(at: 512, count: 92, what: "header")
        func le<T: FixedWidthInteger>(_ at: Int, _: T.Type) -> T {
            header[at..<(at + MemoryLayout<T>.size)].reversed().reduce(T(0)) { $0 << 8 | T($1) }
        }
        let arrayLBA = le(72, UInt64.self), count = Int(le(80, UInt32.self)), size = Int(le(84, UInt32.self))
        var array = try FileImage(path: path).bytes(at: arrayLBA * 512, count: count * size, what: "entries")
        array.replaceSubrange(32..<40, with: withUnsafeBytes(of: UInt64(0).littleEndian, Array.init))
        array.replaceSubrange(40..<48, with: withUnsafeBytes(of: UInt64.max.littleEndian, Array.init))
        try writeAt(path, arrayLBA * 512, array)
        try patchGPTHeader(path, at: 1, field: 88, withUnsafeBytes(of: CRC32.checksum(array).littleEndian, Array.init))
        let table = try PartitionTable.read(from: FileImage(path: path))
        let first = try #require(table.partitions.first { $0.number == 1 })
        #expect(first.start + first.size <= UInt64(fileSize(path)!))
        #expect(table.warnings.contains { $0.contains("partition 1") }, "\(table.warnings) \(first.start) \(first.size)")
    }

    @Test func gptClaimingABillionEntriesIsRefused() throws {
        let dir = TemporaryDirectory("gpthuge")
        defer { dir.remove() }
        var path = try gptDisk(dir)
        let expected = try reference(path)
        let billion = withUnsafeBytes(of: UInt32(1_000_000_000).littleEndian, Array.init)
        try patchGPTHeader(path, at: 1, field: 80, billion)
        var table = try PartitionTable.read(from: FileImage(path: path))
        expectSame(table, expected)
        #expect(table.warnings.contains { $0.contains("1000000000 partition entries") })
        try patchGPTHeader(path, at: fileSize(path)! / 512 - 1, field: 80, billion)
        table = try PartitionTable.read(from: FileImage(path: path))
        #expect(table.partitions.isEmpty)
        // An entry size that is not a multiple of 128, and an array past the end of the disk.
        path = try gptDisk(dir, "second.img")
        try patchGPTHeader(path, at: 1, field: 84, withUnsafeBytes(of: UInt32(1_000_000).littleEndian, Array.init))
        #expect(try PartitionTable.read(from: FileImage(path: path)).warnings.contains { $0.contains("entry size") })
        try patchGPTHeader(path, at: 1, field: 84, withUnsafeBytes(of: UInt32(128).littleEndian, Array.init))
        try patchGPTHeader(path, at: 1, field: 72, withUnsafeBytes(of: UInt64(1) << 60, Array.init))
        #expect(try PartitionTable.read(from: FileImage(path: path)).warnings.contains { $0.contains("outside the disk") })
    }

    /// An MBR entry: status, CHS, type, CHS, LBA start, sector count.
    func entry(type: UInt8, first: UInt32, sectors: UInt32) -> [UInt8] {
        [0, 0, 0, 0, type, 0, 0, 0] + withUnsafeBytes(of: first.littleEndian, Array.init) + withUnsafeBytes(of: sectors.littleEndian, Array.init)
    }

    /// A boot record at `sector` holding these entries.
    func writeRecord(_ path: String, sector: UInt64, _ entries: [[UInt8]]) throws {
        var bytes = [UInt8](repeating: 0, count: 512)
        for (i, e) in entries.enumerated() { bytes.replaceSubrange((446 + 16 * i)..<(462 + 16 * i), with: e) }
        bytes[510] = 0x55
        bytes[511] = 0xAA
        try writeAt(path, sector * 512, bytes)
    }

    @Test func ebrChainsThatLoopOrLeaveAreStopped() throws {
        let dir = TemporaryDirectory("ebr")
        defer { dir.remove() }
        let path = dir.file("loop.img")
        try setSize(path, 4 << 20)  // 8192 sectors
        // Extended partition at sector 100, 4000 sectors. EBR 100 -> logical at 101, next EBR at
        // +200 (300); EBR 300 -> logical at 301, next EBR at +200 again: itself.
        try writeRecord(path, sector: 0, [entry(type: 0x83, first: 2048, sectors: 10), entry(type: 0x05, first: 100, sectors: 4000)])
        try writeRecord(path, sector: 100, [entry(type: 0x83, first: 1, sectors: 50), entry(type: 0x05, first: 200, sectors: 60)])
        try writeRecord(path, sector: 300, [entry(type: 0x83, first: 1, sectors: 50), entry(type: 0x05, first: 200, sectors: 60)])
        var table = try PartitionTable.read(from: FileImage(path: path))
        #expect(table.partitions.map(\.number) == [1, 5, 6])
        let starts: [UInt64] = [2048 * 512, 101 * 512, 301 * 512]
        #expect(table.partitions.map(\.start) == starts)
        #expect(table.warnings.contains { $0.contains("loops") })

        // A link past the extended partition and the disk, a logical partition past the end of
        // the extended one, a primary past the end of the disk.
        try writeRecord(path, sector: 0, [entry(type: 0x83, first: 9000, sectors: 10), entry(type: 0x0F, first: 100, sectors: 4000)])
        try writeRecord(path, sector: 100, [entry(type: 0x83, first: 3990, sectors: 50), entry(type: 0x05, first: 0xFFFF_FF00, sectors: 60)])
        table = try PartitionTable.read(from: FileImage(path: path))
        #expect(table.partitions.map(\.number) == [5])
        #expect(table.partitions.first?.size == UInt64(10 * 512))
        #expect(table.warnings.count == 3)

        // An EBR chain of 1000 distinct records is cut at the bound.
        try writeRecord(path, sector: 0, [entry(type: 0x05, first: 1, sectors: 8000)])
        for i in 0..<1000 {
            try writeRecord(path, sector: UInt64(1 + 2 * i), [entry(type: 0x83, first: 1, sectors: 1), entry(type: 0x05, first: UInt32(2 * i + 2), sectors: 2)])
        }
        table = try PartitionTable.read(from: FileImage(path: path))
        #expect(table.partitions.count == 256)
        #expect(table.warnings.contains { $0.contains("longer than") })
    }
}
