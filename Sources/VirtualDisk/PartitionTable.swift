/// A partition of a disk, from its MBR or GPT.
public struct Partition: Sendable, Equatable {
    public enum Scheme: String, Sendable, Codable { case mbr, gpt }

    /// 1-based, as Linux numbers them (MBR logical partitions from 5).
    public var number: Int
    public var scheme: Scheme
    /// Byte offset and length on the disk.
    public var start: UInt64
    public var size: UInt64
    /// MBR: the type byte in hex ("83"); GPT: the type GUID ("0FC63DAF-8483-4772-8E79-3D69D8477DE4").
    public var type: String
    /// GPT partition name, if any.
    public var name: String?
    /// GPT unique partition GUID (what `PARTUUID=` names in fstab), if any.
    public var guid: String?

    public init(number: Int, scheme: Scheme, start: UInt64, size: UInt64, type: String, name: String? = nil, guid: String? = nil) {
        self.number = number
        self.scheme = scheme
        self.start = start
        self.size = size
        self.type = type
        self.name = name
        self.guid = guid
    }

    /// The partition's bytes as a disk of their own.
    public func image(on disk: any DiskImage) -> DiskSlice {
        DiskSlice(disk, offset: start, size: size)
    }
}

/// The partitions of a disk, read from its MBR (with the extended partition's chain of logical
/// partitions) or its GPT (primary header, else the backup at the last sector).
///
/// The table is untrusted data: every count, offset and link is checked. What does not hold is
/// skipped or clipped to the disk, and said in `warnings`; only a failed read of the disk
/// itself throws. A disk with no table has no partitions (it may be one filesystem whole).
public struct PartitionTable: Sendable {
    /// nil: no partition table.
    public var scheme: Partition.Scheme?
    public var partitions: [Partition]
    /// What was wrong with the table and how it was handled ("primary GPT header damaged, the
    /// backup was used").
    public var warnings: [String]
    /// GPT disk GUID.
    public var diskGUID: String?

    public init(scheme: Partition.Scheme?, partitions: [Partition], warnings: [String] = [], diskGUID: String? = nil) {
        self.scheme = scheme
        self.partitions = partitions
        self.warnings = warnings
        self.diskGUID = diskGUID
    }

    /// Both MBR and GPT tables count in 512-byte sectors here (4 KiB-sector disks are not read).
    public static let sectorSize: UInt64 = 512
    /// Bounds on what a crafted GPT header may ask for: the array is read whole, so at most
    /// 1024 entries of at most 4096 bytes (4 MiB).
    static let maxGPTEntries = 1024
    static let maxGPTEntrySize = 4096
    /// Linux stops following an EBR chain long before this.
    static let maxLogicalPartitions = 256

    public static func read(from image: any DiskImage) throws(VirtualDiskError) -> PartitionTable {
        let sectors = image.size / sectorSize
        guard sectors >= 2 else { return PartitionTable(scheme: nil, partitions: []) }
        let mbr = try image.bytes(at: 0, count: Int(sectorSize), what: "partition table")
        let entries = MBREntry.entries(of: mbr)
        let hasSignature = mbr[510] == 0x55 && mbr[511] == 0xAA
        if hasSignature && entries.contains(where: { $0.type == 0xEE }) {
            return try readGPT(image, sectors: sectors, protective: true)
        }
        guard hasSignature, !looksLikeVolumeBootRecord(mbr), entries.allSatisfy({ $0.status == 0 || $0.status == 0x80 }),
              entries.contains(where: { !$0.isEmpty }) else {
            // No MBR: a GPT without its protective MBR is still worth a look.
            return try readGPT(image, sectors: sectors, protective: false)
        }
        return try readMBR(image, sectors: sectors, entries: entries)
    }
}

// MARK: - MBR

/// One 16-byte entry of an MBR or EBR: status (0x80 bootable), CHS start, type, CHS end, LBA
/// start (relative: to the disk for primaries, to the EBR or the extended partition in chains),
/// sector count.
struct MBREntry {
    var status: UInt8
    var type: UInt8
    var first: UInt64
    var sectors: UInt64

    static func entries(of sector: [UInt8]) -> [MBREntry] {
        (0..<4).map { i in
            let o = 446 + 16 * i
            return MBREntry(status: sector[o], type: sector[o + 4],
                            first: UInt64(sector.le32(at: o + 8) ?? 0), sectors: UInt64(sector.le32(at: o + 12) ?? 0))
        }
    }

    var isExtended: Bool { type == 0x05 || type == 0x0F || type == 0x85 }
    var isEmpty: Bool { type == 0 || sectors == 0 }
}

extension PartitionTable {
    /// A filesystem that starts at sector 0 (a whole-disk FAT, NTFS or exFAT) also ends its
    /// first sector with 55 AA; its boot code may look like partition entries.
    static func looksLikeVolumeBootRecord(_ sector: [UInt8]) -> Bool {
        func text(_ offset: Int, _ value: String) -> Bool { sector.bytes(at: offset, value.utf8.count).map(Array.init) == Array(value.utf8) }
        return text(3, "NTFS    ") || text(3, "EXFAT   ") || text(54, "FAT12   ") || text(54, "FAT16   ")
            || text(54, "FAT     ") || text(82, "FAT32   ")
    }

    static func hex(_ type: UInt8) -> String {
        let digits = Array("0123456789abcdef")
        return String([digits[Int(type >> 4)], digits[Int(type & 15)]])
    }

    /// A partition from sector `first` of `count` sectors, clipped to `[0, limit)`; nil (with a
    /// warning) when nothing of it is inside.
    static func clipped(number: Int, first: UInt64, count: UInt64, limit: UInt64, within: String,
                        warnings: inout [String]) -> (UInt64, UInt64)? {
        guard first < limit else {
            warnings.append("partition \(number) starts at sector \(first), past the end of the \(within) (\(limit) sectors): skipped")
            return nil
        }
        let end = first.addingReportingOverflow(count)
        if end.overflow || end.partialValue > limit {
            warnings.append("partition \(number) ends past the end of the \(within): clipped to it")
            return (first, limit - first)
        }
        return (first, count)
    }

    static func readMBR(_ image: any DiskImage, sectors: UInt64, entries: [MBREntry]) throws(VirtualDiskError) -> PartitionTable {
        var partitions: [Partition] = []
        var warnings: [String] = []
        var extended: (first: UInt64, count: UInt64)?
        for (i, entry) in entries.enumerated() where !entry.isEmpty {
            guard let (first, count) = clipped(number: i + 1, first: entry.first, count: entry.sectors, limit: sectors,
                                               within: "disk", warnings: &warnings) else { continue }
            if entry.isExtended {
                if extended == nil {
                    extended = (first, count)
                } else {
                    warnings.append("partition \(i + 1) is a second extended partition: its logical partitions are not read")
                }
                continue
            }
            partitions.append(Partition(number: i + 1, scheme: .mbr, start: first * sectorSize, size: count * sectorSize, type: hex(entry.type)))
        }
        if let extended {
            partitions += try readLogicalPartitions(image, extended: extended, warnings: &warnings)
        }
        return PartitionTable(scheme: .mbr, partitions: partitions, warnings: warnings)
    }

    /// Follows the chain of extended boot records. Each EBR's first entry is a logical partition
    /// (relative to the EBR); its second links the next EBR (relative to the extended partition).
    /// The chain may not leave the extended partition, revisit an EBR or run past a bound.
    static func readLogicalPartitions(_ image: any DiskImage, extended: (first: UInt64, count: UInt64),
                                      warnings: inout [String]) throws(VirtualDiskError) -> [Partition] {
        var partitions: [Partition] = []
        var visited: Set<UInt64> = []
        var ebr = extended.first
        let end = extended.first + extended.count
        var number = 5
        while true {
            guard visited.count < maxLogicalPartitions else {
                warnings.append("the chain of logical partitions is longer than \(maxLogicalPartitions): the rest is not read")
                break
            }
            guard visited.insert(ebr).inserted else {
                warnings.append("the chain of logical partitions loops back to sector \(ebr): stopped there")
                break
            }
            let sector = try image.bytes(at: ebr * sectorSize, count: Int(sectorSize), what: "extended boot record")
            guard sector[510] == 0x55 && sector[511] == 0xAA else {
                warnings.append("the extended boot record at sector \(ebr) has no signature: the chain stops there")
                break
            }
            let entries = MBREntry.entries(of: sector)
            // Linux reads all four entries of an EBR; tools write a logical partition in the first
            // and the link in the second.
            var next: UInt64?
            for entry in entries where !entry.isEmpty {
                if entry.isExtended {
                    if next == nil { next = entry.first }
                    continue
                }
                let start = ebr + entry.first
                guard entry.first > 0, start < end else {
                    warnings.append("logical partition \(number) lies outside the extended partition: skipped")
                    continue
                }
                let count = min(entry.sectors, end - start)
                if count < entry.sectors { warnings.append("logical partition \(number) ends past the extended partition: clipped to it") }
                partitions.append(Partition(number: number, scheme: .mbr, start: start * sectorSize, size: count * sectorSize, type: hex(entry.type)))
                number += 1
            }
            guard let link = next else { break }
            let (target, overflow) = extended.first.addingReportingOverflow(link)
            guard !overflow, link > 0, target < end else {
                warnings.append("the chain of logical partitions points outside the extended partition: stopped there")
                break
            }
            ebr = target
        }
        return partitions
    }
}

// MARK: - GPT

/// A GPT header (LBA 1, and its backup at the last LBA): "EFI PART", revision, header size,
/// header CRC32 (computed with this field zeroed), my LBA, alternate LBA, first and last usable
/// LBA, disk GUID, entry array LBA, entry count, entry size, entry array CRC32.
struct GPTHeader {
    var myLBA: UInt64
    var alternateLBA: UInt64
    var firstUsable: UInt64
    var lastUsable: UInt64
    var diskGUID: String
    var entriesLBA: UInt64
    var entryCount: Int
    var entrySize: Int
    var entriesCRC: UInt32

    /// The header in `sector`, or why it is not valid.
    static func parse(_ sector: [UInt8], at lba: UInt64, sectors: UInt64) -> Result<GPTHeader, GPTHeaderProblem> {
        guard sector.bytes(at: 0, 8).map(Array.init) == Array("EFI PART".utf8) else { return .failure(.init("no GPT signature")) }
        guard let size = sector.le32(at: 12), size >= 92, size <= 512,
              let crc = sector.le32(at: 16) else { return .failure(.init("bad header size")) }
        var copy = Array(sector[0..<Int(size)])
        for i in 16..<20 { copy[i] = 0 }
        guard CRC32.checksum(copy) == crc else { return .failure(.init("header checksum mismatch")) }
        guard let my = sector.le64(at: 24), let alternate = sector.le64(at: 32), let first = sector.le64(at: 40),
              let last = sector.le64(at: 48), let guid = sector.bytes(at: 56, 16), let entriesLBA = sector.le64(at: 72),
              let count = sector.le32(at: 80), let entrySize = sector.le32(at: 84), let entriesCRC = sector.le32(at: 88)
        else { return .failure(.init("truncated header")) }
        guard my == lba else { return .failure(.init("header says it is at sector \(my), not \(lba)")) }
        guard count <= PartitionTable.maxGPTEntries else { return .failure(.init("header claims \(count) partition entries (at most \(PartitionTable.maxGPTEntries) are read)")) }
        guard entrySize >= 128, entrySize <= PartitionTable.maxGPTEntrySize, entrySize % 128 == 0 else {
            return .failure(.init("bad partition entry size \(entrySize)"))
        }
        let arraySectors = (UInt64(count) * UInt64(entrySize) + PartitionTable.sectorSize - 1) / PartitionTable.sectorSize
        guard entriesLBA >= 1, entriesLBA < sectors, arraySectors <= sectors - entriesLBA else {
            return .failure(.init("partition entry array lies outside the disk"))
        }
        return .success(GPTHeader(myLBA: my, alternateLBA: alternate, firstUsable: first, lastUsable: last,
                                  diskGUID: PartitionTable.guid(guid), entriesLBA: entriesLBA, entryCount: Int(count),
                                  entrySize: Int(entrySize), entriesCRC: entriesCRC))
    }
}

struct GPTHeaderProblem: Error {
    var reason: String
    init(_ reason: String) { self.reason = reason }
}

extension PartitionTable {
    /// A GUID in its usual text form: the first three fields are stored little-endian, the last
    /// two big-endian.
    static func guid<C: Collection<UInt8>>(_ raw: C) -> String {
        let b = Array(raw)
        guard b.count == 16 else { return "" }
        let order = [3, 2, 1, 0, -1, 5, 4, -1, 7, 6, -1, 8, 9, -1, 10, 11, 12, 13, 14, 15]
        let digits = Array("0123456789ABCDEF")
        var text = ""
        for i in order {
            if i < 0 { text.append("-"); continue }
            text.append(digits[Int(b[i] >> 4)])
            text.append(digits[Int(b[i] & 15)])
        }
        return text
    }

    /// The header at `lba` and its entry array, both checked.
    static func gptCopy(_ image: any DiskImage, at lba: UInt64, sectors: UInt64) throws(VirtualDiskError) -> Result<(GPTHeader, [UInt8]), GPTHeaderProblem> {
        let sector = try image.bytes(at: lba * sectorSize, count: Int(sectorSize), what: "GPT header")
        let header: GPTHeader
        switch GPTHeader.parse(sector, at: lba, sectors: sectors) {
        case .failure(let problem): return .failure(problem)
        case .success(let h): header = h
        }
        let array = try image.bytes(at: header.entriesLBA * sectorSize, count: header.entryCount * header.entrySize, what: "GPT partition entries")
        guard CRC32.checksum(array) == header.entriesCRC else { return .failure(.init("partition entry array checksum mismatch")) }
        return .success((header, array))
    }

    static func readGPT(_ image: any DiskImage, sectors: UInt64, protective: Bool) throws(VirtualDiskError) -> PartitionTable {
        var warnings: [String] = []
        let lastLBA = sectors - 1
        let primary = try gptCopy(image, at: 1, sectors: sectors)
        let chosen: (GPTHeader, [UInt8])
        switch primary {
        case .success(let copy):
            chosen = copy
            // Both headers are checked: a damaged backup is worth knowing before it is needed.
            let backupLBA = copy.0.alternateLBA < sectors && copy.0.alternateLBA > 1 ? copy.0.alternateLBA : lastLBA
            if case .failure(let problem) = try gptCopy(image, at: backupLBA, sectors: sectors) {
                warnings.append("backup GPT at sector \(backupLBA) is damaged (\(problem.reason)); the primary is used")
            }
        case .failure(let problem):
            guard protective else { return PartitionTable(scheme: nil, partitions: []) }
            switch try gptCopy(image, at: lastLBA, sectors: sectors) {
            case .success(let copy):
                chosen = copy
                warnings.append("primary GPT is damaged (\(problem.reason)); the backup at sector \(lastLBA) was used")
            case .failure(let backupProblem):
                warnings.append("primary GPT is damaged (\(problem.reason)) and so is the backup (\(backupProblem.reason)): no partitions read")
                return PartitionTable(scheme: .gpt, partitions: [], warnings: warnings)
            }
        }
        if !protective { warnings.append("the disk has a GPT but no protective MBR") }
        let (header, array) = chosen
        var partitions: [Partition] = []
        for i in 0..<header.entryCount {
            let o = i * header.entrySize
            guard let typeBytes = array.bytes(at: o, 16), typeBytes.contains(where: { $0 != 0 }),
                  let unique = array.bytes(at: o + 16, 16), let first = array.le64(at: o + 32), let last = array.le64(at: o + 40),
                  let rawName = array.bytes(at: o + 56, 72) else { continue }
            guard first <= last else {
                warnings.append("partition \(i + 1) ends before it starts: skipped")
                continue
            }
            // A last LBA of 2^64-1 with a first of 0 is a count of 2^64: clipped below, not an overflow.
            let span = (last - first).addingReportingOverflow(1)
            guard let (start, count) = clipped(number: i + 1, first: first, count: span.overflow ? .max : span.partialValue, limit: sectors,
                                               within: "disk", warnings: &warnings) else { continue }
            partitions.append(Partition(number: i + 1, scheme: .gpt, start: start * sectorSize, size: count * sectorSize,
                                        type: guid(typeBytes), name: utf16Name(rawName), guid: guid(unique)))
        }
        return PartitionTable(scheme: .gpt, partitions: partitions, warnings: warnings, diskGUID: header.diskGUID)
    }

    /// A GPT name: up to 36 UTF-16LE code units, ending at the first NUL.
    static func utf16Name(_ raw: ArraySlice<UInt8>) -> String? {
        let bytes = Array(raw)
        var units: [UInt16] = []
        var i = 0
        while let unit = bytes.le16(at: i), unit != 0 {
            units.append(unit)
            i += 2
        }
        return units.isEmpty ? nil : String(decoding: units, as: UTF16.self)
    }
}
