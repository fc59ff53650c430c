import CExt2fs
import Foundation
import Synchronization
import SystemIO
import VirtualDisk

/// ext2, ext3 and ext4 through libext2fs, reading from a disk image in user space (no loop
/// device, no kernel mount). libext2fs is not thread-safe: every call holds the filesystem's
/// lock. Directory listings are cached (a lookup in libext2fs scans the directory; a FUSE
/// `ls -l` of 10 000 files would otherwise scan it 10 000 times).
public final class Ext4FileSystem: GuestFileSystem, @unchecked Sendable {
    // @unchecked: `fs` and the source are used only while holding `lock`.
    public let kind: String
    public let label: String?
    public let rootInode: UInt64 = 2
    /// The journal had transactions to replay when the image was taken (a crash-consistent
    /// point); `replayed` says whether they were applied to what is shown.
    public let neededRecovery: Bool
    public private(set) var replayed = false
    /// Why a needed replay could not be done (the files are then shown as on disk).
    public private(set) var replayError: String?
    /// The journal has a fast-commit area, which is not replayed.
    public let fastCommit: Bool
    public let volume: String

    /// What a reader of this volume must be told: a journal that was not, or not wholly, replayed.
    public var warnings: [String] {
        if let replayError {
            return ["\(volume): the journal's last transactions could not be replayed (\(replayError)); files are shown "
                    + "as they were written in place before the crash, which may be inconsistent"]
        }
        if neededRecovery && replayed && fastCommit {
            return ["\(volume): the journal's fast-commit area is not replayed; changes made just before the crash may be missing"]
        }
        return []
    }

    private let source: SourceBox
    private var fs: ext2_filsys?
    private let lock = NSLock()
    private let sourceStruct: UnsafeMutablePointer<lb_source>
    private var directories: [UInt64: [GuestDirectoryEntry]] = [:]
    private var directoryOrder: [UInt64] = []
    private var nameIndex: [UInt64: [[UInt8]: Int]] = [:]

    /// Reads the volume for libext2fs; remembers the first error for a clear message.
    final class SourceBox: @unchecked Sendable {
        let image: any DiskImage
        var lastError: VirtualDiskError?
        /// Reads left for the current request (see `readBudget`); nil outside requests.
        var readsLeft: Int?
        var overBudget = false
        var interrupted = false
        init(_ image: any DiskImage) { self.image = image }
    }

    /// The most reads of the volume one request (a listing, a lookup, one read of a file) may
    /// make. libext2fs walks extent trees without remembering the nodes it has seen: a crafted
    /// directory whose index blocks point at each other would be walked for days with the
    /// filesystem locked (and every mount thread waiting on it). A real request makes far fewer:
    /// a directory's blocks are capped at 2 GiB, a read at a few MiB.
    static let readBudget = 2_000_000

    /// True when the image holds an ext2/3/4 superblock (magic 0xEF53 at byte 1080).
    public static func probe(_ image: any DiskImage) -> Bool {
        guard let bytes = try? image.bytes(at: 1080, count: 2, what: "probe") else { return false }
        return bytes == [0x53, 0xEF]
    }

    /// Opens the filesystem; a journal left with committed transactions (a crash-consistent
    /// point) is replayed in memory unless `replayJournal` is false.
    public init(image: any DiskImage, volume: String, replayJournal: Bool = true) throws(GuestFilesError) {
        self.volume = volume
        var (opened, box, raw) = try Ext4FileSystem.openRaw(image, volume: volume)
        neededRecovery = lb_needs_recovery(opened) != 0
        fastCommit = lb_has_fast_commit(opened) != 0
        if neededRecovery && replayJournal {
            do throws(GuestFilesError) {
                let replay = try Ext4FileSystem.replay(opened, image: image, source: box, volume: volume)
                if !replay.blocks.isEmpty {
                    // The replayed view is opened first; the on-disk one is closed only once that
                    // worked (a journal that rewrites the superblock with garbage must leave the
                    // on-disk view usable, not freed).
                    let blockSize = Int(lb_block_size(opened))
                    let remapped = try Ext4FileSystem.openRaw(RemappedImage(base: image, blockSize: blockSize, blocks: replay.blocks),
                                                              volume: volume)
                    var closing: ext2_filsys? = opened
                    ext2fs_close_free(&closing)
                    raw.deallocate()
                    (opened, box, raw) = remapped
                }
                replayed = true
            } catch {
                // Shown as on disk, and said so: better than nothing in a bad hour.
                replayError = error.description
            }
        }
        fs = opened
        source = box
        sourceStruct = raw
        var name = [CChar](repeating: 0, count: 17)
        lb_volume_label(opened, &name)
        let text = String(nulTerminated: name)
        label = text.isEmpty ? nil : text
        let features = opened.pointee.super.pointee
        if features.s_feature_incompat & 0x40 != 0 || features.s_feature_ro_compat & 0x8 != 0 {  // extents, huge_file
            kind = "ext4"
        } else if features.s_feature_compat & 0x4 != 0 {  // has_journal
            kind = "ext3"
        } else {
            kind = "ext2"
        }
    }

    /// libext2fs allocates and reads the group descriptors from the superblock's counts, which
    /// it checks against each other but not against the volume. Refused here before it opens
    /// the volume: more than 256 MiB of descriptors, or a volume claiming over 1024 times the
    /// bytes it has (a damaged or crafted superblock; the error names the counts).
    static func checkSuperblock(_ image: any DiskImage, volume: String) throws(GuestFilesError) {
        let bytes: [UInt8]
        do throws(VirtualDiskError) {
            bytes = try image.bytes(at: 1024, count: 1024, what: "superblock")
        } catch { throw .disk(error) }
        func u32(_ o: Int) -> UInt64 { UInt64(bytes.le32(at: o) ?? 0) }
        let logBlock = u32(0x18)
        guard logBlock <= 6 else { throw .corrupt(volume: volume, what: "the superblock gives a block size of 2^\(10 + logBlock) bytes") }
        let blockSize = UInt64(1024) << logBlock
        let is64 = u32(0x60) & 0x80 != 0
        let blocks = u32(0x4) | (is64 ? u32(0x150) << 32 : 0)
        let perGroup = max(1, u32(0x20))
        let descriptorSize = is64 ? max(32, UInt64(bytes.le16(at: 0xFE) ?? 0)) : 32
        let groups = blocks / perGroup + 1
        let (claimed, overflow) = blocks.multipliedReportingOverflow(by: blockSize)
        if overflow || claimed / 1024 > image.size {
            throw .corrupt(volume: volume, what: "the superblock claims \(blocks) blocks of \(blockSize) bytes, the volume has \(image.size) bytes")
        }
        if groups.multipliedReportingOverflow(by: descriptorSize).partialValue > 256 << 20 || groups > UInt64(UInt32.max) {
            throw .corrupt(volume: volume, what: "the superblock claims \(groups) block groups of \(perGroup) blocks")
        }
    }

    private static func openRaw(_ image: any DiskImage, volume: String) throws(GuestFilesError) -> (ext2_filsys, SourceBox, UnsafeMutablePointer<lb_source>) {
        try checkSuperblock(image, volume: volume)
        let box = SourceBox(image)
        let raw = UnsafeMutablePointer<lb_source>.allocate(capacity: 1)
        raw.initialize(to: lb_source(read: { context, offset, buffer, length in
            guard let context, let buffer else { return EINVAL }
            let box = Unmanaged<SourceBox>.fromOpaque(context).takeUnretainedValue()
            if let left = box.readsLeft {
                guard left > 0 else {
                    box.overBudget = true
                    return EIO
                }
                box.readsLeft = left - 1
                if left % 1024 == 0 && Cancellation.requested {
                    box.interrupted = true
                    return EINTR
                }
            }
            do throws(VirtualDiskError) {
                let out = UnsafeMutableRawBufferPointer(start: buffer, count: Int(length))
                let n = try box.image.read(into: out, at: offset)
                // libext2fs asks only for blocks the superblock claims: a short volume is damage.
                if n < Int(length) {
                    box.lastError = .outOfRange(disk: "filesystem volume", offset: offset + UInt64(n), size: box.image.size)
                    return EIO
                }
                return 0
            } catch {
                box.lastError = error
                return EIO
            }
        }, context: Unmanaged.passUnretained(box).toOpaque()))
        var opened: ext2_filsys?
        let status = lb_ext2fs_open(raw, &opened)
        guard status == 0, let opened else {
            raw.deallocate()
            throw Ext4FileSystem.error(status, volume: volume, what: "cannot open the filesystem", source: box)
        }
        return (opened, box, raw)
    }

    private static func replay(_ fs: ext2_filsys, image: any DiskImage, source: SourceBox, volume: String) throws(GuestFilesError) -> JournalReplay {
        let journal = lb_journal_inode(fs)
        guard journal != 0 else { throw .unsupported(volume: volume, what: "replaying an external journal") }
        let blockSize = Int(lb_block_size(fs))
        return try JournalReplay.scan(
            blockSize: blockSize, volumeBlocks: image.size / UInt64(blockSize),
            read: { (offset, count) throws(GuestFilesError) in
                do throws(VirtualDiskError) {
                    return try image.bytes(at: offset, count: count, what: "journal")
                } catch { throw .disk(error) }
            },
            journalBlock: { (logical) throws(GuestFilesError) in
                var physical: UInt64 = 0
                let status = lb_bmap(fs, journal, logical, &physical)
                guard status == 0, physical != 0 else {
                    throw Ext4FileSystem.error(status, volume: volume, what: "journal block \(logical) is not mapped", source: source)
                }
                let (byte, overflow) = physical.multipliedReportingOverflow(by: UInt64(blockSize))
                guard !overflow, byte < image.size else {
                    throw .corrupt(volume: volume, what: "journal block \(logical) maps to block \(physical), past the end of the volume")
                }
                return byte
            },
            volume: volume)
    }

    deinit {
        if fs != nil { ext2fs_close_free(&fs) }
        sourceStruct.deallocate()
    }

    static func error(_ code: errcode_t, volume: String, what: String, source: SourceBox) -> GuestFilesError {
        if source.interrupted { return .local(SystemError(what, path: volume, errno: EINTR)) }
        if source.overBudget {
            return .corrupt(volume: volume, what: "\(what): more than \(readBudget) reads of the volume for one request "
                                + "(an extent tree whose nodes point at each other?)")
        }
        if case .outOfRange(_, let offset, let size)? = source.lastError {
            // The filesystem points past its own volume: damaged metadata, not a bad request.
            return .corrupt(volume: volume, what: "\(what): a block at byte \(offset) is past the end of the volume (\(size) bytes)")
        }
        if let disk = source.lastError { return .disk(disk) }
        let message = String(cString: lb_error_message(code))
        return .corrupt(volume: volume, what: "\(what): \(message)")
    }

    private func locked<T>(_ body: (ext2_filsys) throws(GuestFilesError) -> T) throws(GuestFilesError) -> T {
        lock.lock()
        defer { lock.unlock() }
        guard let fs else { throw .corrupt(volume: volume, what: "the filesystem is closed") }
        source.lastError = nil
        source.overBudget = false
        source.interrupted = false
        source.readsLeft = Ext4FileSystem.readBudget
        defer { source.readsLeft = nil }
        return try body(fs)
    }

    private func checkInode(_ inode: UInt64, _ fs: ext2_filsys) throws(GuestFilesError) -> ext2_ino_t {
        guard inode >= 1, inode <= UInt64(fs.pointee.super.pointee.s_inodes_count) else {
            throw .corrupt(volume: volume, what: "inode \(inode) is out of range")
        }
        return ext2_ino_t(inode)
    }

    // MARK: - GuestFileSystem

    public func stat(_ inode: UInt64) throws(GuestFilesError) -> GuestFileInfo {
        try locked { (fs) throws(GuestFilesError) in
            let raw = try readInode(inode, fs)
            // A name pointing at a free, zeroed or overwritten inode: no type, or no links.
            guard [0o010000, 0o020000, 0o040000, 0o060000, 0o100000, 0o120000, 0o140000].contains(raw.mode & 0o170000) else {
                throw .corrupt(volume: volume, what: "inode \(inode) has no valid file type (mode \(String(raw.mode, radix: 8)); a zeroed or damaged inode)")
            }
            guard raw.links > 0 else { throw .corrupt(volume: volume, what: "inode \(inode) is not in use (no links)") }
            return Ext4FileSystem.info(inode, raw)
        }
    }

    private func readInode(_ inode: UInt64, _ fs: ext2_filsys) throws(GuestFilesError) -> lb_inode {
        let ino = try checkInode(inode, fs)
        var raw = lb_inode()
        let status = lb_read_inode(fs, ino, &raw)
        guard status == 0 else { throw Ext4FileSystem.error(status, volume: volume, what: "inode \(inode)", source: source) }
        return raw
    }

    static func type(mode: UInt32) -> GuestFileType {
        switch mode & 0o170000 {
        case 0o040000: return .directory
        case 0o120000: return .symlink
        case 0o020000: return .characterDevice
        case 0o060000: return .blockDevice
        case 0o010000: return .fifo
        case 0o140000: return .socket
        default: return .regular
        }
    }

    static func info(_ inode: UInt64, _ raw: lb_inode) -> GuestFileInfo {
        GuestFileInfo(
            inode: inode, type: type(mode: raw.mode), permissions: raw.mode & 0o7777, uid: raw.uid, gid: raw.gid,
            size: raw.size, links: raw.links,
            accessed: GuestTime(seconds: raw.atime, nanoseconds: raw.atime_ns),
            modified: GuestTime(seconds: raw.mtime, nanoseconds: raw.mtime_ns),
            changed: GuestTime(seconds: raw.ctime, nanoseconds: raw.ctime_ns),
            device: raw.device)
    }

    public func list(_ directory: UInt64) throws(GuestFilesError) -> [GuestDirectoryEntry] {
        try locked { (fs) throws(GuestFilesError) in try listLocked(directory, fs) }
    }

    private func listLocked(_ directory: UInt64, _ fs: ext2_filsys) throws(GuestFilesError) -> [GuestDirectoryEntry] {
        if let cached = directories[directory] { return cached }
        let ino = try checkInode(directory, fs)
        final class Collector {
            var entries: [GuestDirectoryEntry] = []
            var limitHit = false
        }
        let collector = Collector()
        let status = withExtendedLifetime(collector) {
            lb_list_directory(fs, ino, { context, name, length, inode, fileType in
                guard let context, let name else { return 1 }
                let c = Unmanaged<Collector>.fromOpaque(context).takeUnretainedValue()
                // A directory of millions of entries is a crafted image, not a guest.
                if c.entries.count >= 10_000_000 { c.limitHit = true; return 1 }
                let bytes = Array(UnsafeRawBufferPointer(start: name, count: Int(max(0, length))))
                let type: GuestFileType
                switch fileType {
                case 2: type = .directory
                case 3: type = .characterDevice
                case 4: type = .blockDevice
                case 5: type = .fifo
                case 6: type = .socket
                case 7: type = .symlink
                default: type = .regular
                }
                c.entries.append(GuestDirectoryEntry(name: bytes, inode: UInt64(inode), type: type))
                return 0
            }, Unmanaged.passUnretained(collector).toOpaque())
        }
        guard status == 0 else { throw Ext4FileSystem.error(status, volume: volume, what: "directory inode \(directory)", source: source) }
        if collector.limitHit { throw .corrupt(volume: volume, what: "directory inode \(directory) has more than 10 million entries") }
        var entries = collector.entries
        // Old filesystems (no filetype feature) leave the type out of the entry.
        if fs.pointee.super.pointee.s_feature_incompat & 0x2 == 0 {
            for i in entries.indices {
                if let raw = try? readInode(entries[i].inode, fs) { entries[i].type = Ext4FileSystem.type(mode: raw.mode) }
            }
        }
        var index: [[UInt8]: Int] = [:]
        for (i, entry) in entries.enumerated() where index[entry.name] == nil { index[entry.name] = i }
        directories[directory] = entries
        nameIndex[directory] = index
        directoryOrder.append(directory)
        var cachedEntries = directories.values.reduce(0) { $0 + $1.count }
        while cachedEntries > 200_000, directoryOrder.count > 1 {
            let evicted = directoryOrder.removeFirst()
            cachedEntries -= directories[evicted]?.count ?? 0
            directories[evicted] = nil
            nameIndex[evicted] = nil
        }
        return entries
    }

    public func lookup(_ name: [UInt8], in directory: UInt64) throws(GuestFilesError) -> GuestDirectoryEntry? {
        try locked { (fs) throws(GuestFilesError) in
            let entries = try listLocked(directory, fs)
            guard let i = nameIndex[directory]?[name] else { return nil }
            return entries[i]
        }
    }

    public func read(_ inode: UInt64, into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(GuestFilesError) -> Int {
        guard !buffer.isEmpty else { return 0 }
        return try locked { (fs) throws(GuestFilesError) in
            let ino = try checkInode(inode, fs)
            var got: UInt32 = 0
            let status = lb_read_file(fs, ino, offset, buffer.baseAddress, UInt32(min(buffer.count, Int(UInt32.max))), &got)
            guard status == 0 else { throw Ext4FileSystem.error(status, volume: volume, what: "reading inode \(inode) at byte \(offset)", source: source) }
            return Int(got)
        }
    }

    public func readlink(_ inode: UInt64) throws(GuestFilesError) -> [UInt8] {
        let raw = try locked { (fs) throws(GuestFilesError) in try readInode(inode, fs) }
        guard Ext4FileSystem.type(mode: raw.mode) == .symlink else { throw .corrupt(volume: volume, what: "inode \(inode) is not a symbolic link") }
        guard raw.size <= 4096 else { throw .corrupt(volume: volume, what: "symbolic link inode \(inode) claims \(raw.size) bytes") }
        if raw.fast_symlink != 0 {
            return withUnsafeBytes(of: raw.inline_target) { Array($0.prefix(Int(raw.size))) }
        }
        var target = [UInt8](repeating: 0, count: Int(raw.size))
        let n = try target.withMutableBytes { (out) throws(GuestFilesError) in try read(inode, into: out, at: 0) }
        return Array(target.prefix(n))
    }

    public func extendedAttributes(_ inode: UInt64) throws(GuestFilesError) -> [(name: String, value: [UInt8])] {
        try locked { (fs) throws(GuestFilesError) in
            let ino = try checkInode(inode, fs)
            final class Collector { var attributes: [(name: String, value: [UInt8])] = [] }
            let collector = Collector()
            let status = withExtendedLifetime(collector) {
                lb_list_xattrs(fs, ino, { context, name, value, length in
                    guard let context, let name else { return 1 }
                    let c = Unmanaged<Collector>.fromOpaque(context).takeUnretainedValue()
                    let bytes = value.map { Array(UnsafeRawBufferPointer(start: $0, count: Int(length))) } ?? []
                    c.attributes.append((String(cString: name), bytes))
                    return c.attributes.count > 10_000 ? 1 : 0
                }, Unmanaged.passUnretained(collector).toOpaque())
            }
            guard status == 0 else { throw Ext4FileSystem.error(status, volume: volume, what: "extended attributes of inode \(inode)", source: source) }
            return collector.attributes
        }
    }
}
