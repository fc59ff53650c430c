import SystemIO

/// LVM2 physical volumes and the linear logical volumes on them.
///
/// This lives in VirtualDisk, not GuestFiles: a logical volume is a disk (a `DiskImage`) whose
/// filesystem is then read like a partition's, and the mount can show volumes as disks without
/// knowing any filesystem.
///
/// On disk (lvm2 `lib/format_text/layout.h`, `lib/label/label.h`):
/// - A label in one of the first four 512-byte sectors: "LABELONE", the sector's own number
///   (u64), a CRC (u32) of bytes 20-511, the offset of the PV header (u32), "LVM2 001". The PV
///   header: the PV's id (32 characters), the device size in bytes (u64), then two lists of
///   (offset u64, size u64) ending with a zero entry: the data areas, then the metadata areas.
/// - A metadata area starts with a 512-byte header: a CRC (u32) of bytes 4-511, the magic
///   " LVM2 x[5A%r0N*>", version 1, the area's start and size (u64), then raw locations
///   (offset from the area's start u64, size u64, CRC of the text u32, flags u32; 1 = ignored).
///   The text is a ring buffer after the header: it may wrap to the area's byte 512.
/// - The CRCs are CRC-32 started at 0xf597a6cf without final inversion.
/// - The text is `name { key = value ... }` sections: strings, integers, lists in brackets. The
///   volume group section has `extent_size` (sectors), `physical_volumes` (`pv0 { id, dev_size,
///   pe_start, pe_count }`, sectors) and `logical_volumes`, each with `segmentN { start_extent,
///   extent_count, type, stripe_count, stripes = ["pv0", first extent] }`.
public enum LVM {
    static let initialCRC: UInt32 = 0xF597_A6CF
    static let metadataMagic = Array(" LVM2 x[5A%r0N*>".utf8)
    /// What a crafted volume may make us read or hold.
    static let maxMetadataBytes = 1 << 20
    static let maxAreas = 8

    /// The PV label of a disk; nil when the disk is not an LVM2 physical volume.
    public static func label(of image: any DiskImage) throws(LVMError) -> PhysicalVolumeLabel? {
        for sector in 0..<4 {
            guard UInt64(sector + 1) * 512 <= image.size else { return nil }
            let bytes: [UInt8]
            do { bytes = try image.bytes(at: UInt64(sector) * 512, count: 512, what: "LVM label") } catch { throw .disk(error) }
            guard bytes.bytes(at: 0, 8).map(Array.init) == Array("LABELONE".utf8) else { continue }
            guard bytes.le64(at: 8) == UInt64(sector), let crc = bytes.le32(at: 16),
                  CRC32.update(initialCRC, bytes[20...]) == crc else {
                throw .damaged(disk: "LVM label", what: "the label in sector \(sector) fails its checksum")
            }
            guard bytes.bytes(at: 24, 8).map(Array.init) == Array("LVM2 001".utf8) else {
                throw .unsupported(volume: "LVM label", what: "a physical volume label that is not LVM2 001")
            }
            guard let headerOffset = bytes.le32(at: 20).map(Int.init), let id = bytes.bytes(at: headerOffset, 32),
                  let deviceSize = bytes.le64(at: headerOffset + 32) else {
                throw .damaged(disk: "LVM label", what: "the PV header lies outside its sector")
            }
            // Two zero-terminated lists of (offset, size): data areas, then metadata areas.
            var lists: [[(offset: UInt64, size: UInt64)]] = [[], []]
            var at = headerOffset + 40
            for list in 0..<2 {
                while true {
                    guard let offset = bytes.le64(at: at), let size = bytes.le64(at: at + 8) else {
                        throw .damaged(disk: "LVM label", what: "the PV header's area list runs off its sector")
                    }
                    at += 16
                    if offset == 0 { break }
                    guard lists[list].count < maxAreas else { throw .damaged(disk: "LVM label", what: "too many areas in the PV header") }
                    lists[list].append((offset, size))
                }
            }
            return PhysicalVolumeLabel(id: formatID(Array(id)), deviceSize: deviceSize, dataAreas: lists[0], metadataAreas: lists[1])
        }
        return nil
    }

    public static func probe(_ image: any DiskImage) -> Bool {
        (try? label(of: image)) != nil
    }

    /// The volume group described on a physical volume: the newest (highest seqno) valid copy of
    /// its metadata. nil when the disk is not a PV; an error when it is but holds no metadata
    /// that can be read.
    public static func volumeGroup(on image: any DiskImage, name disk: String = "disk") throws(LVMError) -> VolumeGroup? {
        guard let label = try label(of: image) else { return nil }
        var best: VolumeGroup?
        var problems: [String] = []
        for area in label.metadataAreas {
            for text in try metadataTexts(image, area: area, disk: disk, problems: &problems) {
                do throws(LVMError) {
                    let group = try VolumeGroup(parsing: text, disk: disk)
                    if let current = best, current.seqno >= group.seqno { continue }
                    best = group
                } catch {
                    problems.append(error.description)
                }
            }
        }
        guard let best else {
            let why = problems.isEmpty ? "no metadata area holds metadata" : problems.joined(separator: "; ")
            throw .damaged(disk: disk, what: "LVM physical volume \(label.id) has no readable metadata (\(why))")
        }
        return best
    }

    /// The metadata texts a metadata area's header points at, each checked against its CRC.
    static func metadataTexts(_ image: any DiskImage, area: (offset: UInt64, size: UInt64), disk: String,
                              problems: inout [String]) throws(LVMError) -> [[UInt8]] {
        let header: [UInt8]
        do { header = try image.bytes(at: area.offset, count: 512, what: disk) } catch {
            problems.append("metadata area at byte \(area.offset) lies past the end of the disk")
            return []
        }
        guard header.bytes(at: 4, 16).map(Array.init) == metadataMagic else {
            problems.append("metadata area at byte \(area.offset) has no LVM2 header")
            return []
        }
        guard let crc = header.le32(at: 0), CRC32.update(initialCRC, header[4...]) == crc else {
            problems.append("metadata area header at byte \(area.offset) fails its checksum")
            return []
        }
        guard header.le64(at: 24) == area.offset, let size = header.le64(at: 32), size > 512, size <= area.size || area.size == 0,
              size <= image.size - area.offset else {
            problems.append("metadata area header at byte \(area.offset) disagrees with the label")
            return []
        }
        var texts: [[UInt8]] = []
        var at = 40
        while let offset = header.le64(at: at), let length = header.le64(at: at + 8), let checksum = header.le32(at: at + 16),
              let flags = header.le32(at: at + 20), offset != 0 {
            at += 24
            guard flags & 1 == 0 else { continue }  // RAW_LOCN_IGNORED
            guard offset >= 512, offset < size, length > 0, length <= UInt64(maxMetadataBytes), length <= size - 512 else {
                problems.append("metadata text at \(offset) (\(length) bytes) lies outside its area or is too large")
                continue
            }
            // A ring buffer: what does not fit before the area's end continues after its header.
            let first = min(length, size - offset)
            var text: [UInt8]
            do throws(VirtualDiskError) {
                text = try image.bytes(at: area.offset + offset, count: Int(first), what: disk)
                if first < length { text += try image.bytes(at: area.offset + 512, count: Int(length - first), what: disk) }
            } catch {
                problems.append(error.description)
                continue
            }
            guard CRC32.update(initialCRC, text) == checksum else {
                problems.append("metadata text at \(offset) fails its checksum")
                continue
            }
            while text.last == 0 { text.removeLast() }
            texts.append(text)
        }
        return texts
    }

    /// "3gRht2sneW..." -> "3gRht2-sneW-fAJX-NyVt-xsrh-OFfX-uhgRsJ", as the metadata writes ids.
    static func formatID(_ raw: [UInt8]) -> String {
        var text = ""
        for (i, b) in raw.enumerated() {
            if [6, 10, 14, 18, 22, 26].contains(i) { text.append("-") }
            text.append(Character(Unicode.Scalar(b < 0x80 ? b : 0x3F)))
        }
        return text
    }
}

public enum LVMError: LifeboatError {
    case damaged(disk: String, what: String)
    case unsupported(volume: String, what: String)
    case missingPhysicalVolume(volume: String, id: String)
    case disk(VirtualDiskError)

    public var description: String {
        switch self {
        case .damaged(let disk, let what): return "\(disk): damaged LVM metadata: \(what)"
        case .unsupported(let volume, let what): return "logical volume \(volume): \(what) is not supported"
        case .missingPhysicalVolume(let volume, let id):
            return "logical volume \(volume) lies partly on physical volume \(id), which is not among the disks given"
        case .disk(let error): return error.description
        }
    }

    public var kind: FailureKind {
        switch self {
        case .damaged: return .damaged
        case .unsupported: return .usage
        case .missingPhysicalVolume: return .notFound
        case .disk(let error): return error.kind
        }
    }
}

public struct PhysicalVolumeLabel: Sendable {
    /// With dashes, as in the metadata ("3gRht2-sneW-...").
    public var id: String
    public var deviceSize: UInt64
    public var dataAreas: [(offset: UInt64, size: UInt64)]
    public var metadataAreas: [(offset: UInt64, size: UInt64)]
}

public struct VolumeGroup: Sendable {
    public struct PhysicalVolume: Sendable {
        /// The metadata's name for it ("pv0").
        public var name: String
        public var id: String
        /// Byte offset of the first extent on the PV (pe_start).
        public var start: UInt64
        public var extents: UInt64
        public var deviceSize: UInt64
    }

    public struct Segment: Sendable {
        public var firstExtent: UInt64
        public var extents: UInt64
        /// The PV's name in the metadata ("pv0") and the extent there.
        public var physicalVolume: String
        public var physicalExtent: UInt64
    }

    public struct LogicalVolume: Sendable {
        public var name: String
        public var id: String
        /// Hidden volumes are parts of others (thin pool data, mirror legs, snapshot stores).
        public var visible: Bool
        public var size: UInt64
        public var segments: [Segment]
        /// Why this volume cannot be read as a linear disk (thin, raid, striped, a gap); nil if it can.
        public var unsupported: String?
    }

    public var name: String
    public var id: String
    public var seqno: Int64
    /// Bytes per extent.
    public var extentSize: UInt64
    public var physicalVolumes: [PhysicalVolume]
    public var logicalVolumes: [LogicalVolume]

    /// A logical volume as a disk. `disks` are the physical volumes by id (`LVM.label(of:).id`);
    /// a volume on a PV that is not given is refused.
    public func image(of volume: LogicalVolume, on disks: [String: any DiskImage]) throws(LVMError) -> any DiskImage {
        let label = "\(name)/\(volume.name)"
        if let why = volume.unsupported { throw .unsupported(volume: label, what: why) }
        var parts: [any DiskImage] = []
        for segment in volume.segments {
            guard let pv = physicalVolumes.first(where: { $0.name == segment.physicalVolume }) else {
                throw .damaged(disk: label, what: "a segment names physical volume \(segment.physicalVolume), which the group does not have")
            }
            guard let disk = disks[pv.id] else { throw .missingPhysicalVolume(volume: label, id: pv.id) }
            let offset = pv.start + segment.physicalExtent * extentSize
            let length = segment.extents * extentSize
            guard offset <= disk.size, length <= disk.size - offset else {
                throw .damaged(disk: label, what: "a segment lies past the end of physical volume \(pv.id)")
            }
            parts.append(DiskSlice(disk, offset: offset, size: length))
        }
        return parts.count == 1 ? parts[0] : DiskConcatenation(parts)
    }

    /// A logical volume of a group that lies on one disk.
    public func image(of volume: LogicalVolume, on disk: any DiskImage) throws(LVMError) -> any DiskImage {
        guard let label = try LVM.label(of: disk) else { throw .damaged(disk: name, what: "the disk given is not a physical volume") }
        return try image(of: volume, on: [label.id: disk])
    }

    /// Reads the volume group from metadata text, checking every number it will use.
    init(parsing text: [UInt8], disk: String) throws(LVMError) {
        let top = try LVMText.parse(text, disk: disk)
        // The group is the one top-level section with physical volumes.
        guard let (groupName, group) = top.sections.first(where: { $0.1.section("physical_volumes") != nil }) else {
            throw .damaged(disk: disk, what: "the metadata has no volume group section")
        }
        func damaged(_ what: String) -> LVMError { .damaged(disk: disk, what: "volume group \(groupName): \(what)") }
        guard let seqno = group.number("seqno"), let extentSectors = group.number("extent_size"), extentSectors > 0,
              extentSectors <= 1 << 32 else { throw damaged("no seqno or a bad extent size") }
        name = groupName
        id = group.string("id") ?? ""
        self.seqno = seqno
        extentSize = UInt64(extentSectors) * 512
        physicalVolumes = []
        logicalVolumes = []
        let maxExtents: UInt64 = (1 << 62) / extentSize
        for (pvName, pv) in group.section("physical_volumes")?.sections ?? [] {
            guard let pvID = pv.string("id"), let start = pv.number("pe_start"), start >= 0, start < 1 << 53,
                  let count = pv.number("pe_count"), count >= 0, UInt64(count) <= maxExtents else {
                throw damaged("physical volume \(pvName) lacks id, pe_start or pe_count")
            }
            let size = pv.number("dev_size").map { UInt64(max(0, min($0, 1 << 53))) * 512 } ?? 0
            physicalVolumes.append(PhysicalVolume(name: pvName, id: pvID, start: UInt64(start) * 512, extents: UInt64(count), deviceSize: size))
        }
        for (lvName, lv) in group.section("logical_volumes")?.sections ?? [] {
            var volume = LogicalVolume(name: lvName, id: lv.string("id") ?? "", visible: lv.strings("status").contains("VISIBLE"),
                                       size: 0, segments: [], unsupported: nil)
            var next: UInt64 = 0
            let segments = lv.sections.filter { $0.0.hasPrefix("segment") }
                .sorted { ($0.1.number("start_extent") ?? 0) < ($1.1.number("start_extent") ?? 0) }
            for (segmentName, segment) in segments {
                guard let start = segment.number("start_extent"), let count = segment.number("extent_count"), start >= 0, count > 0,
                      UInt64(start) <= maxExtents, UInt64(count) <= maxExtents else {
                    throw damaged("\(lvName)/\(segmentName) lacks its extents")
                }
                let type = segment.string("type") ?? "?"
                let stripes = segment.list("stripes")
                if type != "striped" {
                    volume.unsupported = volume.unsupported ?? "segment type \(type)"
                } else if segment.number("stripe_count") != 1 || stripes.count != 2 {
                    volume.unsupported = volume.unsupported ?? "striping over \(segment.number("stripe_count") ?? 0) volumes"
                } else if UInt64(start) != next {
                    volume.unsupported = volume.unsupported ?? "a gap between segments"
                } else if case .string(let pvName) = stripes[0], case .number(let pvExtent) = stripes[1], pvExtent >= 0,
                          let pv = physicalVolumes.first(where: { $0.name == pvName }),
                          UInt64(pvExtent) <= pv.extents, UInt64(count) <= pv.extents - UInt64(pvExtent) {
                    volume.segments.append(Segment(firstExtent: UInt64(start), extents: UInt64(count), physicalVolume: pvName,
                                                   physicalExtent: UInt64(pvExtent)))
                } else {
                    throw damaged("\(lvName)/\(segmentName) names extents its physical volume does not have")
                }
                next = UInt64(start) + UInt64(count)
                guard next <= maxExtents else { throw damaged("\(lvName) is absurdly large") }
            }
            volume.size = next * extentSize
            logicalVolumes.append(volume)
        }
    }
}

// MARK: - The metadata text format

/// A value of the LVM2 text format.
indirect enum LVMValue: Sendable {
    case string(String)
    case number(Int64)
    case list([LVMValue])
    case section(LVMSection)
}

/// `key = value` pairs and named subsections, in order.
struct LVMSection: Sendable {
    var values: [(String, LVMValue)] = []

    var sections: [(String, LVMSection)] {
        values.compactMap { if case .section(let s) = $0.1 { return ($0.0, s) } else { return nil } }
    }

    func value(_ key: String) -> LVMValue? { values.first { $0.0 == key }?.1 }
    func section(_ key: String) -> LVMSection? { if case .section(let s)? = value(key) { return s } else { return nil } }
    func string(_ key: String) -> String? { if case .string(let s)? = value(key) { return s } else { return nil } }
    func number(_ key: String) -> Int64? { if case .number(let n)? = value(key) { return n } else { return nil } }
    func list(_ key: String) -> [LVMValue] { if case .list(let l)? = value(key) { return l } else { return [] } }
    func strings(_ key: String) -> [String] { list(key).compactMap { if case .string(let s) = $0 { return s } else { return nil } } }
}

/// A recursive-descent parser of the text format, bounded in depth and in the number of items.
struct LVMText {
    static let maxDepth = 16
    static let maxItems = 200_000

    let bytes: [UInt8]
    let disk: String
    var at = 0
    var items = 0

    static func parse(_ bytes: [UInt8], disk: String) throws(LVMError) -> LVMSection {
        guard bytes.count <= LVM.maxMetadataBytes else { throw .damaged(disk: disk, what: "metadata larger than 1 MiB") }
        var parser = LVMText(bytes: bytes, disk: disk)
        let top = try parser.body(depth: 0)
        guard parser.peek() == nil else { throw parser.error("unexpected '}'") }
        return top
    }

    func error(_ what: String) -> LVMError { .damaged(disk: disk, what: "metadata text at byte \(at): \(what)") }

    /// The next significant byte, after blanks and `#` comments.
    mutating func peek() -> UInt8? {
        while at < bytes.count {
            let b = bytes[at]
            if b == 0x23 {
                while at < bytes.count && bytes[at] != 0x0A { at += 1 }
            } else if b == 0x20 || b == 0x09 || b == 0x0A || b == 0x0D {
                at += 1
            } else {
                return b
            }
        }
        return nil
    }

    static func isWordByte(_ b: UInt8) -> Bool {
        (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || b == 0x5F || b == 0x2E || b == 0x2D || b == 0x2B
    }

    mutating func word() throws(LVMError) -> String {
        let start = at
        while at < bytes.count && Self.isWordByte(bytes[at]) { at += 1 }
        guard at > start else { throw error("expected a name") }
        return String(decoding: bytes[start..<at], as: UTF8.self)
    }

    mutating func body(depth: Int) throws(LVMError) -> LVMSection {
        guard depth <= Self.maxDepth else { throw error("sections nested deeper than \(Self.maxDepth)") }
        var section = LVMSection()
        while let b = peek(), b != 0x7D {
            let key = try word()
            items += 1
            guard items <= Self.maxItems else { throw error("more than \(Self.maxItems) items") }
            switch peek() {
            case 0x3D:  // =
                at += 1
                section.values.append((key, try value(depth: depth)))
            case 0x7B:  // {
                at += 1
                let inner = try body(depth: depth + 1)
                guard peek() == 0x7D else { throw error("section \(key) is not closed") }
                at += 1
                section.values.append((key, .section(inner)))
            default:
                throw error("expected '=' or '{' after \(key)")
            }
        }
        return section
    }

    mutating func value(depth: Int) throws(LVMError) -> LVMValue {
        guard let b = peek() else { throw error("expected a value") }
        switch b {
        case 0x22:  // a string, with \" and \\ escapes
            at += 1
            var out: [UInt8] = []
            while true {
                guard at < bytes.count else { throw error("unterminated string") }
                var c = bytes[at]
                at += 1
                if c == 0x22 { break }
                if c == 0x5C {
                    guard at < bytes.count else { throw error("unterminated string") }
                    c = bytes[at]
                    at += 1
                }
                out.append(c)
            }
            return .string(String(decoding: out, as: UTF8.self))
        case 0x5B:  // [ value, value ]
            at += 1
            guard depth < Self.maxDepth else { throw error("lists nested too deep") }
            var list: [LVMValue] = []
            while true {
                guard let c = peek() else { throw error("unterminated list") }
                if c == 0x5D { at += 1; break }
                if !list.isEmpty {
                    guard c == 0x2C else { throw error("expected ',' in a list") }
                    at += 1
                    if peek() == 0x5D { at += 1; break }
                }
                items += 1
                guard items <= Self.maxItems else { throw error("more than \(Self.maxItems) items") }
                list.append(try value(depth: depth + 1))
            }
            return .list(list)
        default:
            let text = try word()
            if let n = Int64(text) { return .number(n) }
            return .string(text)  // a float or bare word: kept as text, unused here
        }
    }
}
