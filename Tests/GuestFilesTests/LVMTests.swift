import Foundation
import GuestFiles
import Testing
import TestSupport
import VirtualDisk

/// LVM2 volumes made by the lvm2 tools (without activation: this kernel has no device-mapper),
/// with FAT filesystems written where `lvs` says each volume lies; then crafted metadata.
@Suite(.serialized) struct LVMTests {
    static let lvm = "LVM_SUPPRESS_FD_WARNINGS=1 "
    static let noActivation = "--config 'global/activation=0'"

    @Test(.enabled(if: isRoot && FileManager.default.fileExists(atPath: "/usr/sbin/pvcreate")))
    func volumesMadeByTheLVMToolsAreFoundAndRead() throws {
        let dir = TemporaryDirectory("lvm")
        defer { dir.remove() }
        let pv = dir.file("pv.img")
        try setSize(pv, 64 << 20)
        let loop = shell("losetup -f --show \(pv)").stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        try #require(loop.hasPrefix("/dev/loop"))
        let group = "lbtest\(getpid())"
        defer {
            shell(Self.lvm + "vgremove -f \(Self.noActivation) \(group) >/dev/null 2>&1")
            shell("losetup -d \(loop)")
        }
        // lv1 gets a second segment after lv2: 8 extents, then lv2's 4, then 4 more of lv1.
        for command in ["pvcreate -ff -y \(loop)", "vgcreate -s 1M \(group) \(loop)",
                        "lvcreate \(Self.noActivation) -an -Zn -L 8M -n lv1 \(group)",
                        "lvcreate \(Self.noActivation) -an -Zn -L 4M -n lv2 \(group)",
                        "lvextend \(Self.noActivation) -L 12M \(group)/lv1"] {
            let result = shell(Self.lvm + command)
            try #require(result.status == 0, "\(command): \(result.stderr)")
        }
        // Where lvm2 says things are: the first extent's byte, and each segment's extents.
        let peStart = try #require(UInt64(shell(Self.lvm + "pvs --noheadings --nosuffix --units b -o pe_start \(loop)").stdout
            .trimmingCharacters(in: .whitespacesAndNewlines)))
        let rows = shell(Self.lvm + "lvs --noheadings --segments -o lv_name,seg_start_pe,seg_pe_ranges \(group)").stdout
            .split(separator: "\n").map { $0.split(separator: " ").map(String.init) }
        var layout: [String: [(logical: UInt64, physical: UInt64, count: UInt64)]] = [:]
        for row in rows where row.count == 3 {
            let range = row[2].split(separator: ":").last!.split(separator: "-").compactMap { UInt64($0) }
            layout[row[0], default: []].append((UInt64(row[1])!, range[0], range[1] - range[0] + 1))
        }
        #expect(layout["lv1"]?.count == 2)

        // A FAT filesystem for each volume, written extent by extent where lvm2 placed it.
        let source = dir.file("src")
        try FileManager.default.createDirectory(atPath: source + "/nested/dir", withIntermediateDirectories: true)
        try writeAt(source + "/big.bin", 0, randomBytes(seed: 11, count: 2_500_000))
        try writeAt(source + "/nested/dir/a long name.txt", 0, Array("hello\n".utf8))
        for (name, megabytes) in [("lv1", 12), ("lv2", 4)] {
            let fs = dir.file("\(name).fat")
            try #require(shell("mkfs.vfat -n \(name.uppercased()) -C \(fs) \(megabytes * 1024) >/dev/null").status == 0)
            try #require(shell("cd \(source) && TZ=UTC mcopy -s -m -i \(fs) * ::/").status == 0)
            for segment in layout[name] ?? [] {
                let dd = "dd if=\(fs) of=\(pv) bs=1M skip=\(segment.logical) seek=\(peStart / 1_048_576 + segment.physical) count=\(segment.count) conv=notrunc status=none"
                try #require(shell(dd).status == 0)
            }
        }

        let disk = try FileImage(path: pv)
        let label = try #require(try LVM.label(of: disk))
        let uuid = shell(Self.lvm + "pvs --noheadings -o pv_uuid \(loop)").stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(label.id == uuid)
        let vg = try #require(try LVM.volumeGroup(on: disk))
        #expect(vg.name == group)
        #expect(vg.extentSize == 1 << 20)
        #expect(vg.physicalVolumes.first?.start == peStart)
        #expect(vg.logicalVolumes.map(\.name) == ["lv1", "lv2"])
        let expected = try sourceTree(source)
        for volume in vg.logicalVolumes {
            #expect(volume.visible && volume.unsupported == nil)
            let segments = layout[volume.name] ?? []
            #expect(volume.segments.map(\.physicalExtent) == segments.map(\.physical))
            #expect(volume.segments.map(\.extents) == segments.map(\.count))
            let image = try vg.image(of: volume, on: disk)
            #expect(image.size == segments.reduce(0) { $0 + $1.count } << 20)
            let fs = try FATFileSystem(image, volume: "\(group)/\(volume.name)")
            #expect(fs.label == volume.name.uppercased())
            let tree = try readTree(fs)
            #expect(tree.count == expected.count)
            for (path, entry) in expected { #expect(tree[path] == entry, "\(volume.name): \(path)") }
        }
    }

    // MARK: Crafted metadata

    /// A physical volume written byte by byte: label in sector 1, a metadata area at 4096 of
    /// `areaSize` bytes holding `text` at `textOffset` (wrapping around the ring when it must),
    /// extents from 1 MiB.
    func craftPV(_ path: String, text: String, textOffset: UInt64 = 512, areaSize: UInt64 = 8192,
                 id: String = "AAAAAABBBBCCCCDDDDEEEEFFFFGGGGGG", corruptText: Bool = false) throws {
        func le<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.littleEndian, Array.init) }
        try setSize(path, 8 << 20)
        var label = Array("LABELONE".utf8) + le(UInt64(1)) + le(UInt32(0)) + le(UInt32(32)) + Array("LVM2 001".utf8)
        label += Array(id.utf8) + le(UInt64(8 << 20))
        label += le(UInt64(1 << 20)) + le(UInt64(0)) + le(UInt64(0)) + le(UInt64(0))
        label += le(UInt64(4096)) + le(areaSize) + le(UInt64(0)) + le(UInt64(0))
        label += [UInt8](repeating: 0, count: 512 - label.count)
        label.replaceSubrange(16..<20, with: le(CRC32.update(0xF597_A6CF, label[20...])))
        try writeAt(path, 512, label)
        let bytes = Array(text.utf8)
        var header = le(UInt32(0)) + Array(" LVM2 x[5A%r0N*>".utf8) + le(UInt32(1)) + le(UInt64(4096)) + le(areaSize)
        header += le(textOffset) + le(UInt64(bytes.count)) + le(CRC32.update(0xF597_A6CF, bytes)) + le(UInt32(0))
        header += [UInt8](repeating: 0, count: 512 - header.count)
        header.replaceSubrange(0..<4, with: le(CRC32.update(0xF597_A6CF, header[4...])))
        try writeAt(path, 4096, header)
        var stored = bytes
        if corruptText { stored[stored.count / 2] ^= 1 }
        let first = Int(min(UInt64(stored.count), areaSize - textOffset))
        try writeAt(path, 4096 + textOffset, Array(stored[0..<first]))
        if first < stored.count { try writeAt(path, 4096 + 512, Array(stored[first...])) }
    }

    func metadata(segments: String, peCount: Int = 7) -> String {
        """
        crafted {
        id = "g"
        seqno = 3
        extent_size = 2048 # 1 MiB
        physical_volumes {
        pv0 {
        id = "AAAAAA-BBBB-CCCC-DDDD-EEEE-FFFF-GGGGGG"
        dev_size = 16384
        pe_start = 2048
        pe_count = \(peCount)
        }
        }
        logical_volumes {
        \(segments)
        }
        }
        contents = "Text Format Volume Group"
        version = 1
        description = "with \\"quotes\\" inside"
        """
    }

    let twoSegments = """
        data {
        id = "x"
        status = ["READ", "WRITE", "VISIBLE"]
        segment_count = 2
        segment2 { start_extent = 2
        extent_count = 1
        type = "striped"
        stripe_count = 1
        stripes = ["pv0", 0] }
        segment1 { start_extent = 0
        extent_count = 2
        type = "striped"
        stripe_count = 1
        stripes = [
        "pv0", 4
        ] }
        }
        pool {
        id = "y"
        status = ["READ"]
        segment1 { start_extent = 0
        extent_count = 1
        type = "thin-pool"
        }
        }
        """

    @Test func craftedMetadataWrappingTheRingIsRead() throws {
        let dir = TemporaryDirectory("lvmring")
        defer { dir.remove() }
        let path = dir.file("pv.img")
        let text = metadata(segments: twoSegments)
        try craftPV(path, text: text, textOffset: 8192 - 100)  // 100 bytes at the end, the rest after the header
        // Recognisable extents: extent n of the PV holds byte n everywhere.
        for extent in 0..<7 { try writeAt(path, UInt64(1 + extent) << 20, [UInt8](repeating: UInt8(extent), count: 1 << 20)) }
        let disk = try FileImage(path: path)
        let vg = try #require(try LVM.volumeGroup(on: disk))
        #expect(vg.name == "crafted" && vg.seqno == 3)
        let data = try #require(vg.logicalVolumes.first { $0.name == "data" })
        #expect(data.size == 3 << 20)
        let image = try vg.image(of: data, on: disk)
        // Logical extents 0-1 are PV extents 4-5, logical extent 2 is PV extent 0: one read across both.
        let bytes = try image.bytes(at: (2 << 20) - 10, count: 20, what: "lv")
        #expect(bytes == [UInt8](repeating: 5, count: 10) + [UInt8](repeating: 0, count: 10))
        #expect(try image.bytes(at: 0, count: 1, what: "lv") == [4])
        let pool = try #require(vg.logicalVolumes.first { $0.name == "pool" })
        #expect(!pool.visible && pool.unsupported == "segment type thin-pool")
        #expect(throws: LVMError.self) { try vg.image(of: pool, on: disk) }
        #expect(throws: LVMError.self) { try vg.image(of: data, on: ["someone else": disk]) }
    }

    @Test func damagedOrHostileMetadataIsRefused() throws {
        let dir = TemporaryDirectory("lvmbad")
        defer { dir.remove() }
        let path = dir.file("pv.img")
        func refused(_ text: String, corrupt: Bool = false, _ why: String) throws {
            try craftPV(path, text: text, corruptText: corrupt)
            #expect(throws: LVMError.self, "\(why)") { try LVM.volumeGroup(on: FileImage(path: path)) }
        }
        try refused(metadata(segments: twoSegments), corrupt: true, "a flipped bit in the text")
        try refused(metadata(segments: twoSegments, peCount: 5), "extents past the PV's pe_count")
        try refused(String(repeating: "a {", count: 100) + String(repeating: "}", count: 100), "nesting 100 deep")
        try refused(metadata(segments: "x { id = \"unterminated }"), "an unterminated string")
        try refused("crafted { seqno = 1 extent_size = 0 physical_volumes { } }", "a zero extent size")
        try refused(String(repeating: "[", count: 5000), "brackets")
        // A label that fails its checksum; a disk with no label at all.
        try craftPV(path, text: metadata(segments: twoSegments))
        try writeAt(path, 512 + 100, [0xFF])
        #expect(throws: LVMError.self) { try LVM.label(of: FileImage(path: path)) }
        try setSize(dir.file("blank.img"), 1 << 20)
        #expect(try LVM.label(of: FileImage(path: dir.file("blank.img"))) == nil)
        #expect(try LVM.volumeGroup(on: FileImage(path: dir.file("blank.img"))) == nil)
    }
}
