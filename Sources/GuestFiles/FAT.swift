import Synchronization
import SystemIO
import VirtualDisk

/// FAT12, FAT16 and FAT32 (EFI system partitions, boot partitions, USB images), read in Swift.
///
/// Layout: the boot sector's BIOS parameter block (BPB) gives the sector and cluster sizes; then
/// come the reserved sectors, the FAT copies (one entry per cluster: next cluster, free, bad or
/// end of chain), on FAT12/16 a fixed root directory, and the data clusters numbered from 2. A
/// directory is an array of 32-byte entries: an 8.3 short entry per file, preceded by VFAT
/// long-name entries (13 UTF-16 units each, last one first) that carry a checksum of the short
/// name they belong to.
///
/// Inode numbers are the byte position of a file's short entry on the volume, so `stat` needs no
/// table and numbers are stable for as long as the image is; the root is 1. A directory whose
/// entry points back at one of its ancestors shows up as an entry whose inode was already seen.
///
/// Times are stored as local time without a zone; they are shown as if UTC, at FAT's 2-second
/// resolution (creation time to 10 ms). FAT has no owners or modes: directories are 0755, files
/// 0644, or 0444 with the read-only attribute; uid and gid are 0. The change time is the
/// creation time, as Linux shows it.
///
/// Safe from many threads: the volume's geometry is immutable, and the caches (FAT pages,
/// directories, cluster runs of files) each sit behind a lock that is never held across a read
/// of file data.
public final class FATFileSystem: GuestFileSystem {
    public let kind: String
    public let label: String?
    public let rootInode: UInt64 = 1
    /// The name errors give the volume ("web01@latest:os:p1").
    public let volume: String

    let image: any DiskImage
    let geometry: FATGeometry
    private let fatPages = Mutex<[Int: [UInt8]]>([:])
    private let directories = Mutex(DirectoryCache())
    private let runs = Mutex<[UInt64: ClusterRuns]>([:])

    /// FAT pages are read 64 KiB at a time; at most 512 of them (32 MiB) stay cached.
    static let fatPageSize = 65536
    static let maxFATPages = 512
    /// A directory holds at most 65536 entries (2 MiB), as in every FAT driver.
    static let maxDirectoryBytes = 65536 * 32
    /// Cached directory entries in all, and files whose cluster runs are cached.
    static let maxCachedEntries = 200_000
    static let maxCachedFiles = 256
    /// Cluster runs cached in all (16 bytes each): files sharing one crafted, fragmented chain
    /// must not multiply it in memory.
    static let maxCachedRuns = 1 << 22
    /// A file more fragmented than this is refused rather than mapped in memory.
    static let maxRunsPerFile = 1 << 20

    /// Whether the image starts with a FAT boot sector this reader accepts.
    public static func probe(_ image: any DiskImage) -> Bool {
        guard let sector = try? image.bytes(at: 0, count: 512, what: "FAT boot sector") else { return false }
        if case .success = FATGeometry.parse(sector, imageSize: image.size) { return true }
        return false
    }

    public init(_ image: any DiskImage, volume: String = "FAT volume") throws(GuestFilesError) {
        self.image = image
        self.volume = volume
        let sector: [UInt8]
        do { sector = try image.bytes(at: 0, count: 512, what: volume) } catch { throw .disk(error) }
        switch FATGeometry.parse(sector, imageSize: image.size) {
        case .failure(let problem): throw .unsupported(volume: volume, what: "a volume without a FAT boot sector (\(problem.reason))")
        case .success(let g): geometry = g
        }
        kind = "fat\(geometry.width)"
        // The label in the root directory wins over the boot sector's copy, as in Windows and
        // Linux; a damaged root leaves the boot sector's.
        var name = geometry.bootSectorLabel
        if let root = try? Self.loadDirectory(cluster: geometry.rootCluster, image: image, geometry: geometry, volume: volume, fat: fatPages),
           let rootLabel = root.label {
            name = rootLabel
        }
        label = name
    }

    // MARK: GuestFileSystem

    public func stat(_ inode: UInt64) throws(GuestFilesError) -> GuestFileInfo {
        if inode == rootInode {
            let directory = try self.directory(cluster: geometry.rootCluster)
            let zero = GuestTime(seconds: 0)
            return GuestFileInfo(inode: inode, type: .directory, permissions: 0o755, uid: 0, gid: 0, size: directory.bytes,
                                 links: UInt32(2 + directory.subdirectories), accessed: zero, modified: zero, changed: zero)
        }
        let entry = try shortEntry(inode)
        var info = GuestFileInfo(inode: inode, type: entry.isDirectory ? .directory : .regular,
                                 permissions: entry.isDirectory ? 0o755 : (entry.readOnly ? 0o444 : 0o644),
                                 uid: 0, gid: 0, size: UInt64(entry.size), links: 1,
                                 accessed: entry.accessed, modified: entry.modified, changed: entry.created)
        if entry.isDirectory {
            // A directory's size and links come from its listing; a damaged one still stats.
            if let directory = try? self.directory(cluster: entry.firstCluster) {
                info.size = directory.bytes
                info.links = UInt32(2 + directory.subdirectories)
            } else {
                info.size = 0
                info.links = 2
            }
        }
        return info
    }

    public func list(_ directory: UInt64) throws(GuestFilesError) -> [GuestDirectoryEntry] {
        try self.directory(cluster: directoryCluster(directory)).entries
    }

    public func lookup(_ name: [UInt8], in directory: UInt64) throws(GuestFilesError) -> GuestDirectoryEntry? {
        let listing = try self.directory(cluster: directoryCluster(directory))
        if let i = listing.byName[name] { return listing.entries[i] }
        // FAT names are case-insensitive: "EFI/BOOT/BOOTX64.EFI" finds "EFI/boot/bootx64.efi".
        let folded = Self.foldCase(name)
        return listing.entries.first { Self.foldCase($0.name) == folded }
    }

    public func read(_ inode: UInt64, into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(GuestFilesError) -> Int {
        guard inode != rootInode else { throw .notAFile(path: describe(inode)) }
        let entry = try shortEntry(inode)
        guard !entry.isDirectory else { throw .notAFile(path: describe(inode)) }
        let size = UInt64(entry.size)
        guard offset < size, buffer.count > 0 else { return 0 }
        let map = try clusterRuns(inode, entry)
        let clusterSize = UInt64(geometry.clusterSize)
        let end = min(size, offset + UInt64(buffer.count))
        var position = offset
        while position < end {
            let logical = position / clusterSize
            guard let run = map.run(containing: logical) else { throw corrupt("file \(describe(inode)) has fewer clusters than its size needs") }
            let runEnd = (run.logical + UInt64(run.count)) * clusterSize
            let n = Int(min(runEnd, end) - position)
            let disk = geometry.clusterOffset(run.physical) + (logical - run.logical) * clusterSize + position % clusterSize
            let done = Int(position - offset)
            try readExactly(UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + n)]), at: disk)
            position += UInt64(n)
        }
        return Int(end - offset)
    }

    public func readlink(_ inode: UInt64) throws(GuestFilesError) -> [UInt8] {
        throw .unsupported(volume: volume, what: "a symbolic link (FAT has none)")
    }

    // MARK: Entries and directories

    func describe(_ inode: UInt64) -> String { "\(volume): inode \(inode)" }

    func corrupt(_ what: String) -> GuestFilesError { .corrupt(volume: volume, what: what) }

    func readExactly(_ buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(GuestFilesError) {
        var done = 0
        while done < buffer.count {
            let n: Int
            do { n = try image.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[done...]), at: offset + UInt64(done)) } catch { throw .disk(error) }
            guard n > 0 else { throw corrupt("a cluster at byte \(offset) lies past the end of the disk") }
            done += n
        }
    }

    /// The short entry an inode names, checked to be one (an inode is a byte position, and a
    /// caller may hand back any number).
    func shortEntry(_ inode: UInt64) throws(GuestFilesError) -> FATShortEntry {
        guard inode % 32 == 0, inode >= geometry.rootDirectoryOffset, inode < geometry.dataEnd else { throw .notFound(path: describe(inode)) }
        let raw: [UInt8]
        do { raw = try image.bytes(at: inode, count: 32, what: volume) } catch { throw .disk(error) }
        guard let entry = FATShortEntry(raw, width: geometry.width), !entry.isVolumeLabel, !entry.isDotEntry else {
            throw .notFound(path: describe(inode))
        }
        return entry
    }

    /// The first cluster of a directory (0: the fixed root of FAT12/16).
    func directoryCluster(_ inode: UInt64) throws(GuestFilesError) -> UInt32 {
        if inode == rootInode { return geometry.rootCluster }
        let entry = try shortEntry(inode)
        guard entry.isDirectory else { throw .notADirectory(path: describe(inode)) }
        guard entry.firstCluster != 0 else { throw corrupt("directory \(describe(inode)) has no clusters") }
        return entry.firstCluster
    }

    func directory(cluster: UInt32) throws(GuestFilesError) -> FATDirectory {
        if let cached = directories.withLock({ $0.directories[cluster] }) { return cached }
        let directory = try Self.loadDirectory(cluster: cluster, image: image, geometry: geometry, volume: volume, fat: fatPages)
        directories.withLock { cache in
            if cache.entries + directory.entries.count > Self.maxCachedEntries {
                cache = DirectoryCache()
            }
            cache.directories[cluster] = directory
            cache.entries += directory.entries.count
        }
        return directory
    }

    static func loadDirectory(cluster: UInt32, image: any DiskImage, geometry: FATGeometry, volume: String,
                              fat: borrowing Mutex<[Int: [UInt8]]>) throws(GuestFilesError) -> FATDirectory {
        // Where the directory's bytes lie on the volume, in order.
        var extents: [(offset: UInt64, length: Int)] = []
        if cluster == 0 {
            extents = [(geometry.rootDirectoryOffset, geometry.rootDirectoryBytes)]
        } else {
            let limit = max(1, maxDirectoryBytes / geometry.clusterSize)
            let map = try chain(from: cluster, clusters: limit, exact: false, geometry: geometry, image: image, volume: volume, fat: fat)
            extents = map.runs.map { (geometry.clusterOffset($0.physical), Int($0.count) * geometry.clusterSize) }
        }
        var parser = FATDirectoryParser(width: geometry.width)
        for extent in extents where !parser.ended {
            let bytes: [UInt8]
            do { bytes = try image.bytes(at: extent.offset, count: extent.length, what: volume) } catch { throw .disk(error) }
            parser.parse(bytes, at: extent.offset)
        }
        return parser.directory(bytes: extents.reduce(0) { $0 + UInt64($1.length) })
    }

    // MARK: Cluster chains

    func clusterRuns(_ inode: UInt64, _ entry: FATShortEntry) throws(GuestFilesError) -> ClusterRuns {
        if let cached = runs.withLock({ $0[inode] }) { return cached }
        let clusterSize = UInt64(geometry.clusterSize)
        let needed = (UInt64(entry.size) + clusterSize - 1) / clusterSize
        guard entry.firstCluster != 0 else { throw corrupt("file \(describe(inode)) has \(entry.size) bytes but no clusters") }
        guard needed <= UInt64(geometry.clusterCount) else { throw corrupt("file \(describe(inode)) is larger than the volume") }
        let map = try Self.chain(from: entry.firstCluster, clusters: Int(needed), exact: true, geometry: geometry, image: image,
                                 volume: volume, fat: fatPages)
        runs.withLock { cache in
            if cache.count >= Self.maxCachedFiles { cache.remove(at: cache.startIndex) }
            var total = cache.values.reduce(0) { $0 + $1.runs.count }
            while total + map.runs.count > Self.maxCachedRuns, let first = cache.first {
                total -= first.value.runs.count
                cache.remove(at: cache.startIndex)
            }
            cache[inode] = map
        }
        return map
    }

    /// Follows a chain from `first`. `exact`: a file's chain, which must have exactly `clusters`
    /// clusters and then end; else a directory's, which must end within `clusters`. Each cluster
    /// has one successor, so a loop never reaches an end mark: the bound finds every loop.
    static func chain(from first: UInt32, clusters limit: Int, exact: Bool, geometry: FATGeometry, image: any DiskImage,
                      volume: String, fat: borrowing Mutex<[Int: [UInt8]]>) throws(GuestFilesError) -> ClusterRuns {
        var map = ClusterRuns()
        var current = first
        var count = 0
        var failure: GuestFilesError?
        fat.withLock { pages in
            while true {
                guard geometry.isDataCluster(current) else {
                    failure = .corrupt(volume: volume, what: "cluster chain from \(first) reaches cluster \(current), outside the volume")
                    return
                }
                map.append(current)
                count += 1
                guard map.runs.count <= maxRunsPerFile else {
                    failure = .unsupported(volume: volume, what: "a file in more than \(maxRunsPerFile) fragments")
                    return
                }
                let next: UInt32
                do throws(VirtualDiskError) { next = try geometry.fatEntry(current, pages: &pages, image: image) } catch { failure = .disk(error); return }
                if geometry.isEndOfChain(next) {
                    if exact && count < limit {
                        failure = .corrupt(volume: volume, what: "cluster chain from \(first) ends after \(count) clusters; the size needs \(limit)")
                    }
                    return
                }
                if count >= limit {
                    failure = .corrupt(volume: volume, what: exact ? "cluster chain from \(first) is longer than the size needs (or loops)"
                                                                  : "directory cluster chain from \(first) loops or is longer than \(limit) clusters")
                    return
                }
                current = next
            }
        }
        if let failure { throw failure }
        return map
    }

    static func foldCase(_ name: [UInt8]) -> [UInt8] {
        name.map { $0 >= 97 && $0 <= 122 ? $0 - 32 : $0 }
    }
}

/// The runs of consecutive clusters of a file, in file order.
struct ClusterRuns: Sendable {
    struct Run: Sendable {
        var logical: UInt64
        var physical: UInt32
        var count: UInt32
    }
    var runs: [Run] = []

    mutating func append(_ cluster: UInt32) {
        if let last = runs.last, last.physical &+ last.count == cluster {
            runs[runs.count - 1].count += 1
        } else {
            let logical = runs.last.map { $0.logical + UInt64($0.count) } ?? 0
            runs.append(Run(logical: logical, physical: cluster, count: 1))
        }
    }

    func run(containing logical: UInt64) -> Run? {
        var low = 0, high = runs.count
        while low < high {
            let mid = (low + high) / 2
            if runs[mid].logical + UInt64(runs[mid].count) <= logical { low = mid + 1 } else { high = mid }
        }
        return low < runs.count && runs[low].logical <= logical ? runs[low] : nil
    }
}

struct DirectoryCache {
    var directories: [UInt32: FATDirectory] = [:]
    var entries = 0
}

struct FATDirectory: Sendable {
    var entries: [GuestDirectoryEntry]
    var byName: [[UInt8]: Int]
    var subdirectories: Int
    var bytes: UInt64
    var label: String?
}

// MARK: - Boot sector

struct FATGeometryProblem: Error {
    var reason: String
}

/// What the BPB says, checked: BPB fields at 11 (bytes per sector), 13 (sectors per cluster), 14
/// (reserved sectors), 16 (FAT copies), 17 (root entries, 0 on FAT32), 19 (total sectors, 16
/// bit), 21 (media), 22 (FAT sectors, 0 on FAT32), 32 (total sectors, 32 bit); FAT32 adds 36 (FAT
/// sectors), 40 (flags: bit 7 = only the active FAT in bits 0-3 is used), 44 (root cluster).
struct FATGeometry: Sendable {
    var width: Int
    var clusterSize: Int
    var fatOffset: UInt64
    var fatBytes: Int
    var rootDirectoryOffset: UInt64
    var rootDirectoryBytes: Int
    var dataOffset: UInt64
    var clusterCount: UInt32
    /// FAT32's root directory cluster; 0 for the fixed root of FAT12/16.
    var rootCluster: UInt32
    var bootSectorLabel: String?

    var dataEnd: UInt64 { dataOffset + UInt64(clusterCount) * UInt64(clusterSize) }

    static func parse(_ s: [UInt8], imageSize: UInt64) -> Result<FATGeometry, FATGeometryProblem> {
        func fail(_ reason: String) -> Result<FATGeometry, FATGeometryProblem> { .failure(FATGeometryProblem(reason: reason)) }
        guard s.count >= 512, s[0] == 0xEB || s[0] == 0xE9 else { return fail("no boot jump") }
        guard let bps16 = s.le16(at: 11), [512, 1024, 2048, 4096].contains(bps16) else { return fail("bad sector size") }
        let bps = UInt64(bps16)
        let spc = UInt64(s[13])
        guard spc > 0, spc & (spc - 1) == 0 else { return fail("bad cluster size") }
        guard let reserved = s.le16(at: 14), reserved > 0 else { return fail("no reserved sectors") }
        let copies = UInt64(s[16])
        guard copies >= 1, copies <= 4 else { return fail("bad number of FATs") }
        guard s[21] == 0xF0 || s[21] >= 0xF8 else { return fail("bad media byte") }
        guard let rootEntries = s.le16(at: 17), let total16 = s.le16(at: 19), let fat16 = s.le16(at: 22),
              let total32 = s.le32(at: 32), let fat32 = s.le32(at: 36), let flags = s.le16(at: 40), let root32 = s.le32(at: 44)
        else { return fail("truncated boot sector") }
        let total = total16 != 0 ? UInt64(total16) : UInt64(total32)
        // Linux's rule: a zero 16-bit FAT size means FAT32; otherwise the cluster count decides.
        let isFAT32 = fat16 == 0
        let fatSectors = isFAT32 ? UInt64(fat32) : UInt64(fat16)
        guard total > 0, fatSectors > 0 else { return fail("zero-sized volume or FAT") }
        guard !isFAT32 || rootEntries == 0 else { return fail("FAT32 with a fixed root directory") }
        let rootSectors = (UInt64(rootEntries) * 32 + bps - 1) / bps
        let firstData = UInt64(reserved) + copies * fatSectors + rootSectors
        guard firstData < total else { return fail("no room for data") }
        var clusters = (total - firstData) / spc
        let width = isFAT32 ? 32 : (clusters <= 4084 ? 12 : 16)
        // The FAT cannot describe more clusters than it has entries for (2 are reserved).
        let fatEntries = fatSectors * bps * 8 / UInt64(width)
        guard fatEntries > 2 else { return fail("FAT too small") }
        clusters = min(clusters, fatEntries - 2, 0x0FFF_FFF5)
        var active: UInt64 = 0
        if isFAT32 && flags & 0x80 != 0 {
            active = UInt64(flags & 0x0F)
            guard active < copies else { return fail("active FAT \(active) does not exist") }
        }
        var geometry = FATGeometry(width: width, clusterSize: Int(bps * spc),
                                   fatOffset: (UInt64(reserved) + active * fatSectors) * bps,
                                   fatBytes: Int(fatSectors * bps),
                                   rootDirectoryOffset: (UInt64(reserved) + copies * fatSectors) * bps,
                                   rootDirectoryBytes: Int(rootSectors * bps), dataOffset: firstData * bps,
                                   clusterCount: UInt32(clusters), rootCluster: isFAT32 ? root32 : 0, bootSectorLabel: nil)
        guard geometry.fatOffset + UInt64(geometry.fatBytes) <= imageSize else { return fail("FAT past the end of the disk") }
        if isFAT32 { guard geometry.isDataCluster(root32) else { return fail("root cluster \(root32) outside the volume") } }
        // Extended boot signature 0x29, then serial, then the 11-byte label.
        let signature = isFAT32 ? 66 : 38
        if s[signature] == 0x29, let raw = s.bytes(at: signature + 5, 11) {
            geometry.bootSectorLabel = FATShortEntry.labelText(Array(raw))
        }
        return .success(geometry)
    }

    func isDataCluster(_ c: UInt32) -> Bool { c >= 2 && c - 2 < clusterCount }

    func isEndOfChain(_ value: UInt32) -> Bool {
        switch width {
        case 12: return value >= 0xFF8
        case 16: return value >= 0xFFF8
        default: return value >= 0x0FFF_FFF8
        }
    }

    func clusterOffset(_ c: UInt32) -> UInt64 { dataOffset + UInt64(c - 2) * UInt64(clusterSize) }

    /// The FAT's entry for cluster `c`, through the page cache.
    func fatEntry(_ c: UInt32, pages: inout [Int: [UInt8]], image: any DiskImage) throws(VirtualDiskError) -> UInt32 {
        let byte: Int
        switch width {
        case 12: byte = Int(c) + Int(c) / 2
        case 16: byte = Int(c) * 2
        default: byte = Int(c) * 4
        }
        var value: UInt32 = 0
        // A FAT12 entry may straddle two pages: read byte by byte through the pages.
        for i in 0..<(width == 32 ? 4 : 2) {
            let at = byte + i
            guard at < fatBytes else { return 0 }  // cannot happen with clusterCount clipped; reads as free
            let page = at / FATFileSystem.fatPageSize
            let bytes: [UInt8]
            if let cached = pages[page] {
                bytes = cached
            } else {
                if pages.count >= FATFileSystem.maxFATPages { pages.remove(at: pages.startIndex) }
                let start = page * FATFileSystem.fatPageSize
                bytes = try image.bytes(at: fatOffset + UInt64(start), count: min(FATFileSystem.fatPageSize, fatBytes - start), what: "FAT")
                pages[page] = bytes
            }
            value |= UInt32(bytes[at - page * FATFileSystem.fatPageSize]) << (8 * i)
        }
        switch width {
        case 12: return c & 1 == 1 ? value >> 4 : value & 0xFFF
        case 16: return value
        default: return value & 0x0FFF_FFFF
        }
    }
}

// MARK: - Directory entries

/// A 32-byte short (8.3) entry: name 0-10, attributes 11 (0x01 read-only, 0x08 volume label,
/// 0x10 directory, 0x0F long-name part), NT case flags 12 (0x08 lower-case base, 0x10 lower-case
/// extension), creation 10 ms units 13, creation time 14 and date 16, access date 18, high
/// cluster 20 (FAT32), write time 22 and date 24, low cluster 26, size 28.
struct FATShortEntry {
    var raw: [UInt8]
    var attributes: UInt8
    var firstCluster: UInt32
    var size: UInt32

    /// nil for a free, deleted or long-name entry.
    init?(_ raw: [UInt8], width: Int) {
        guard raw.count == 32, raw[0] != 0, raw[0] != 0xE5, raw[11] & 0x3F != 0x0F,
              let low = raw.le16(at: 26), let high = raw.le16(at: 20), let size = raw.le32(at: 28) else { return nil }
        self.raw = raw
        attributes = raw[11]
        firstCluster = UInt32(low) | (width == 32 ? UInt32(high) << 16 : 0)
        self.size = size
    }

    var isDirectory: Bool { attributes & 0x10 != 0 }
    var isVolumeLabel: Bool { attributes & 0x08 != 0 }
    var readOnly: Bool { attributes & 0x01 != 0 }
    var isDotEntry: Bool { raw[0] == 0x2E && (raw[1] == 0x20 || (raw[1] == 0x2E && raw[2] == 0x20)) }

    var modified: GuestTime { Self.time(date: raw.le16(at: 24) ?? 0, time: raw.le16(at: 22) ?? 0, centiseconds: 0) }
    var accessed: GuestTime { Self.time(date: raw.le16(at: 18) ?? 0, time: 0, centiseconds: 0) }
    var created: GuestTime { Self.time(date: raw.le16(at: 16) ?? 0, time: raw.le16(at: 14) ?? 0, centiseconds: raw[13]) }

    /// The 11 name bytes the long-name checksum covers.
    var shortNameChecksum: UInt8 {
        var sum: UInt8 = 0
        for b in raw[0..<11] { sum = (sum & 1 == 1 ? 0x80 : 0) &+ (sum >> 1) &+ b }
        return sum
    }

    /// "README.TXT", with the NT lower-case flags applied and OEM bytes read as code page 437.
    var shortName: [UInt8] {
        var base = Array(raw[0..<8])
        if base[0] == 0x05 { base[0] = 0xE5 }  // 0x05 stands for a leading 0xE5
        let ext = Array(raw[8..<11])
        func part(_ bytes: [UInt8], lower: Bool) -> String {
            var end = bytes.count
            while end > 0 && bytes[end - 1] == 0x20 { end -= 1 }
            return String(bytes[0..<end].map { b -> Character in
                if b < 0x80 { return Character(Unicode.Scalar(lower && b >= 65 && b <= 90 ? b + 32 : b)) }
                return FATShortEntry.codePage437[Int(b - 0x80)]
            })
        }
        let b = part(base, lower: raw[12] & 0x08 != 0)
        let e = part(ext, lower: raw[12] & 0x10 != 0)
        return Array((e.isEmpty ? b : b + "." + e).utf8)
    }

    static func labelText(_ raw: [UInt8]) -> String? {
        var end = raw.count
        while end > 0 && (raw[end - 1] == 0x20 || raw[end - 1] == 0) { end -= 1 }
        let text = String(decoding: raw[0..<end], as: UTF8.self)
        return text.isEmpty || text == "NO NAME" ? nil : text
    }

    static let codePage437: [Character] = Array(
        "ÇüéâäàåçêëèïîìÄÅÉæÆôöòûùÿÖÜ¢£¥₧ƒáíóúñÑªº¿⌐¬½¼¡«»░▒▓│┤╡╢╖╕╣║╗╝╜╛┐└┴┬├─┼╞╟╚╔╩╦╠═╬╧╨╤╥╙╘╒╓╫╪┘┌█▄▌▐▀αßΓπΣσµτΦΘΩδ∞φε∩≡±≥≤⌠⌡÷≈°∙·√ⁿ²■\u{A0}")

    /// Seconds since 1970 of a FAT date (bits 15-9 year since 1980, 8-5 month, 4-0 day) and time
    /// (15-11 hours, 10-5 minutes, 4-0 seconds / 2); an impossible date reads as 1970.
    static func time(date: UInt16, time: UInt16, centiseconds: UInt8) -> GuestTime {
        let year = 1980 + Int(date >> 9), month = Int(date >> 5 & 15), day = Int(date & 31)
        guard (1...12).contains(month), (1...31).contains(day) else { return GuestTime(seconds: 0) }
        // Days from 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
        let y = month <= 2 ? year - 1 : year
        let era = y / 400
        let yoe = y - era * 400
        let doy = (153 * (month + (month > 2 ? -3 : 9)) + 2) / 5 + day - 1
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
        let days = era * 146_097 + doe - 719_468
        let seconds = Int(time >> 11) * 3600 + Int(time >> 5 & 63) * 60 + Int(time & 31) * 2
        let extra = centiseconds <= 199 ? Int(centiseconds) : 0
        return GuestTime(seconds: Int64(days * 86400 + seconds + extra / 100), nanoseconds: UInt32(extra % 100) * 10_000_000)
    }
}

/// Reads directory entries in order, joining long-name parts to the short entry they precede.
/// A long name whose parts are out of order or whose checksum does not match its short entry is
/// dropped and the 8.3 name used, as Windows and Linux do.
struct FATDirectoryParser {
    let width: Int
    var ended = false
    var entries: [GuestDirectoryEntry] = []
    var byName: [[UInt8]: Int] = [:]
    var subdirectories = 0
    var label: String?
    // The long name being gathered: its parts by ordinal, the next ordinal expected, checksum.
    var parts: [[UInt16]] = []
    var expected = 0
    var checksum: UInt8 = 0

    init(width: Int) { self.width = width }

    mutating func parse(_ bytes: [UInt8], at offset: UInt64) {
        var i = 0
        while i + 32 <= bytes.count {
            defer { i += 32 }
            let raw = Array(bytes[i..<(i + 32)])
            if raw[0] == 0 { ended = true; return }
            if raw[0] == 0xE5 { expected = 0; parts = []; continue }
            if raw[11] & 0x3F == 0x0F { longNamePart(raw); continue }
            guard let entry = FATShortEntry(raw, width: width) else { continue }
            let longName = takeLongName(for: entry)
            if entry.isVolumeLabel {
                if !entry.isDirectory && label == nil { label = FATShortEntry.labelText(Array(raw[0..<11])) }
                continue
            }
            if entry.isDotEntry { continue }
            let name = longName ?? entry.shortName
            guard !name.isEmpty else { continue }
            let type: GuestFileType = entry.isDirectory ? .directory : .regular
            if entry.isDirectory { subdirectories += 1 }
            if byName[name] == nil { byName[name] = entries.count }
            entries.append(GuestDirectoryEntry(name: name, inode: offset + UInt64(i), type: type))
        }
    }

    /// Long-name entry: ordinal 0 (0x40 marks the last part, which comes first), UTF-16 units at
    /// 1-10, 14-25 and 28-31, checksum 13.
    mutating func longNamePart(_ raw: [UInt8]) {
        let ordinal = Int(raw[0] & 0x1F)
        if raw[0] & 0x40 != 0 {
            guard ordinal >= 1, ordinal <= 20 else { expected = 0; parts = []; return }
            parts = Array(repeating: [], count: ordinal)
            checksum = raw[13]
        } else {
            guard expected > 0, ordinal == expected, raw[13] == checksum else { expected = 0; parts = []; return }
        }
        var units: [UInt16] = []
        for range in [1..<11, 14..<26, 28..<32] {
            for o in stride(from: range.lowerBound, to: range.upperBound, by: 2) { units.append(raw.le16(at: o) ?? 0) }
        }
        parts[ordinal - 1] = units
        expected = ordinal - 1
        if expected == 0 { expected = -1 }  // complete: waits for its short entry
    }

    mutating func takeLongName(for entry: FATShortEntry) -> [UInt8]? {
        defer { expected = 0; parts = [] }
        guard expected == -1, entry.shortNameChecksum == checksum else { return nil }
        var units = Array(parts.joined())
        if let end = units.firstIndex(of: 0) { units.removeSubrange(end...) }
        guard !units.isEmpty else { return nil }
        return Array(String(decoding: units, as: UTF16.self).utf8)
    }

    func directory(bytes: UInt64) -> FATDirectory {
        FATDirectory(entries: entries, byName: byName, subdirectories: subdirectories, bytes: bytes, label: label)
    }
}
