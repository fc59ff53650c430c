import Foundation
import Crypto
import Glibc
import Synchronization
import SystemIO

/// Who a target is, independent of the name it was given.
///
/// `id` names it for this boot: a file's device and inode, a block device's device number.
/// `stable` names it across reboots, where the system gives a name that cannot be another
/// disk's: a device-mapper UUID (LVM), a SCSI/NVMe WWID, a loop device's backing file, a
/// partition of one of those; for a file its filesystem id and inode. Device numbers and
/// /dev names are handed out at boot and can name another disk after one, so a sync state is
/// filed under the stable name where there is one (`key`), and a state recorded in another
/// boot for a target without one is not trusted blindly (SyncState.boot).
public struct TargetIdentity: Sendable, Equatable {
    public let path: String
    public let isDevice: Bool
    public let id: String
    public let stable: String?
    /// A loop device: the file it is attached to now (device:inode of the backing file, and the
    /// offset). Checked within a boot where there is no stable name: detached and attached to
    /// another file, the same device number is another disk.
    public var attachment: String? = nil

    /// Names the target's state directory.
    public var key: String {
        guard let stable else { return legacyKey }
        return Self.digest("stable " + stable)
    }

    /// The key of states written before stable names (device or inode number and path).
    public var legacyKey: String { Self.digest((isDevice ? "device " : "file ") + id + " " + path) }

    /// Names the lock: the same bytes under two names (hard links, two device nodes) take one lock.
    var lockKey: String { Self.digest((isDevice ? "device " : "file ") + id) }

    private static func digest(_ text: String) -> String {
        Array(SHA256.hash(data: Array(text.utf8))).prefix(16).hex
    }

    /// The identity of an existing file or block device; nil when `path` does not exist.
    public static func of(_ path: String) throws(SyncError) -> TargetIdentity? {
        var st = stat()
        guard stat(path, &st) == 0 else {
            if errno == ENOENT { return nil }
            throw .target(SystemError("stat", path: path))
        }
        return try of(path, status: st)
    }

    /// The identity of what `st` describes, found at `path`.
    static func of(_ path: String, status st: stat) throws(SyncError) -> TargetIdentity {
        let canonical = canonicalPath(path)
        switch st.st_mode & S_IFMT {
        case S_IFBLK:
            let (major, minor) = (major(UInt(st.st_rdev)), minor(UInt(st.st_rdev)))
            return TargetIdentity(path: canonical, isDevice: true, id: "\(major):\(minor)", stable: stableDeviceName(major: major, minor: minor),
                                  attachment: loopAttachment(major: major, minor: minor))
        case S_IFREG:
            return TargetIdentity(path: canonical, isDevice: false, id: "\(st.st_dev):\(st.st_ino)", stable: stableFileName(canonical, status: st))
        default: throw .notATarget(path)
        }
    }

    /// A file: the stable name of the disk its filesystem is on (else, on ext2/3/4 and btrfs,
    /// the filesystem's id, which they derive from its UUID; xfs derives it from the device
    /// number, which a reboot can give to another disk), its inode, and the inode's generation
    /// (a number the filesystem draws when it allocates the inode, so a file deleted and another
    /// made under the same inode number is another file). nil where one of them is missing.
    static func stableFileName(_ path: String, status st: stat) -> String? {
        // Everything from one descriptor, checked to be the file stat described.
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var opened = stat()
        guard fstat(fd, &opened) == 0, opened.st_dev == st.st_dev, opened.st_ino == st.st_ino else { return nil }
        let filesystem: String
        if let disk = stableDeviceName(major: major(UInt(st.st_dev)), minor: minor(UInt(st.st_dev))) {
            filesystem = "on " + disk
        } else {
            // f_type, the first field of struct statfs (a long), by the call itself: not by a
            // mount table, where a btrfs subvolume's device number is not listed and a mount
            // hidden under a later one still is.
            var raw = [Int](repeating: 0, count: 32)
            var ids = statvfs()
            guard raw.withUnsafeMutableBytes({ lifeboat_fstatfs(fd, $0.baseAddress!) }) == 0,
                  raw[0] == 0xEF53 || raw[0] == 0x9123683E,   // ext2/3/4, btrfs
                  fstatvfs(fd, &ids) == 0, ids.f_fsid != 0 else { return nil }
            filesystem = "fsid " + String(ids.f_fsid, radix: 16)
        }
        // FS_IOC_GETVERSION: ext2/3/4, xfs and btrfs answer it; tmpfs does not.
        var generation: UInt64 = 0
        guard ioctl(fd, UInt(0x8008_7601), &generation) == 0 else { return nil }
        return "file \(filesystem) \(st.st_ino) generation \(UInt32(truncatingIfNeeded: generation))"
    }

    static func loopAttachment(major: UInt, minor: UInt) -> String? {
        let sys = "/sys/dev/block/\(major):\(minor)/loop/"
        guard let file = try? String(contentsOfFile: sys + "backing_file", encoding: .utf8) else { return nil }
        var st = stat()
        guard stat(file.trimmingCharacters(in: .whitespacesAndNewlines), &st) == 0 else { return "gone" }
        let offset = (try? String(contentsOfFile: sys + "offset", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "0"
        return "\(st.st_dev):\(st.st_ino) offset \(offset)"
    }

    /// A block device's name that no other disk has, or nil. Serial numbers are left out: a
    /// hypervisor gives every virtual disk the same one unless told otherwise.
    static func stableDeviceName(major: UInt, minor: UInt) -> String? {
        let sys = "/sys/dev/block/\(major):\(minor)"
        func read(_ name: String) -> String? {
            guard let text = try? String(contentsOfFile: sys + "/" + name, encoding: .utf8) else { return nil }
            let value = text.trimmingCharacters(in: .whitespacesAndNewlines)
            return value.isEmpty ? nil : value
        }
        if let uuid = read("dm/uuid") { return "dm " + uuid }
        if let file = read("loop/backing_file") {
            var st = stat()
            guard stat(file, &st) == 0, let name = stableFileName(file, status: st) else { return nil }
            return "loop " + name + " offset " + (read("loop/offset") ?? "0") + " limit " + (read("loop/sizelimit") ?? "0")
        }
        if let number = read("partition") {
            // The disk it is a partition of: the parent directory in sysfs.
            guard let resolved = realpath(sys, nil) else { return nil }
            let parent = FileSystem.parentDirectory(of: String(cString: resolved))
            free(resolved)
            guard let dev = try? String(contentsOfFile: parent + "/dev", encoding: .utf8) else { return nil }
            let parts = dev.trimmingCharacters(in: .whitespacesAndNewlines).split(separator: ":")
            guard parts.count == 2, let ma = UInt(parts[0]), let mi = UInt(parts[1]),
                  let disk = stableDeviceName(major: ma, minor: mi) else { return nil }
            return disk + " partition " + number
        }
        if let wwid = read("wwid") ?? read("device/wwid") { return "wwid " + wwid }
        return nil
    }

    /// realpath of the file, or of its directory when the file does not exist.
    public static func canonicalPath(_ path: String) -> String {
        if let resolved = realpath(path, nil) {
            defer { free(resolved) }
            return String(cString: resolved)
        }
        let absolute = FileSystem.absolute(path)
        let parent = FileSystem.parentDirectory(of: absolute)
        let name = String(absolute[absolute.index(after: absolute.lastIndex(of: "/")!)...])
        guard let resolved = realpath(parent, nil) else { return absolute }
        defer { free(resolved) }
        let dir = String(cString: resolved)
        return (dir == "/" ? "" : dir) + "/" + name
    }

    private static func major(_ dev: UInt) -> UInt { ((dev >> 8) & 0xfff) | ((dev >> 32) & ~0xfff) }
    private static func minor(_ dev: UInt) -> UInt { (dev & 0xff) | ((dev >> 12) & ~0xff) }
}

/// An open target: a buffered descriptor and, where the filesystem allows it, an O_DIRECT one
/// for large aligned reads and writes (UncachedFile). Every failure names the target and the byte.
final class Target: Sendable {
    let path: String
    let isDevice: Bool
    let undo: Bool
    private let file: UncachedFile
    private var buffered: SystemFile { file.buffered }
    private let dataFlush = DataFlush()

    init(path: String, isDevice: Bool, undo: Bool) throws(SyncError) {
        self.path = path
        self.isDevice = isDevice
        self.undo = undo
        do throws(SystemError) {
            file = try UncachedFile(path, .readWrite)
        } catch { throw .target(error) }
    }

    func close() {
        file.close()
    }

    /// The file or device opened is the one that was identified and locked (the name was looked
    /// up twice: a rename or a symlink swapped in between would send the writes elsewhere).
    func check(is identity: TargetIdentity) throws(SyncError) {
        let st: stat
        do throws(SystemError) { st = try buffered.status() } catch { throw .target(error) }
        let opened = try TargetIdentity.of(path, status: st)
        guard opened.id == identity.id, opened.isDevice == identity.isDevice else {
            throw .target(SystemError("open the target it locked (it was replaced meanwhile)", path: path, errno: ESTALE))
        }
    }

    func size() throws(SyncError) -> UInt64 {
        do throws(SystemError) { return try buffered.size() } catch { throw .target(error) }
    }

    /// Starts reading a range into the page cache, for `read(..., cached: true)` later.
    func prefetch(at offset: UInt64, length: UInt64) {
        buffered.adviseWillNeed(at: offset, length: length)
    }

    /// Reads `buffer.count` bytes at `offset`; past the end of the target reads zeros. `cached`
    /// reads through the page cache (what `prefetch` brought in), otherwise O_DIRECT if aligned.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, cached: Bool = false) throws(SyncError) {
        var n: Int
        do throws(SystemError) {
            n = cached ? try buffered.read(into: buffer, at: offset) : try file.read(into: buffer, at: offset)
        } catch {
            throw .targetIO(path: path, offset: offset, writing: false, cause: error, undo: undo)
        }
        if n < buffer.count { UnsafeMutableRawBufferPointer(rebasing: buffer[n...]).initializeMemory(as: UInt8.self, repeating: 0) }
    }

    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(SyncError) {
        do throws(SystemError) {
            try file.write(buffer, at: offset)
        } catch {
            throw .targetIO(path: path, offset: failedOffset(error, default: offset), writing: true, cause: error, undo: undo)
        }
    }

    /// Makes `count` bytes at `offset` read as zeros: a hole in a file (or zeros written where
    /// the filesystem cannot punch), zeros on a device. Returns the bytes written.
    @discardableResult
    func zero(at offset: UInt64, count: Int, zeros: UnsafeRawBufferPointer) throws(SyncError) -> UInt64 {
        if !isDevice {
            do {
                if try buffered.punchHole(at: offset, length: UInt64(count)) { return 0 }
            } catch {
                guard error.errno == EINVAL else {
                    throw .targetIO(path: path, offset: offset, writing: true, cause: error, undo: undo)
                }
            }
        }
        var done = 0
        while done < count {
            let n = min(zeros.count, count - done)
            try write(UnsafeRawBufferPointer(rebasing: zeros[0..<n]), at: offset + UInt64(done))
            done += n
        }
        return UInt64(count)
    }

    /// True when a file has no data in `offset..<offset+count` (SEEK_DATA); never for devices.
    func isHole(at offset: UInt64, count: Int, fileSize: UInt64) -> Bool {
        guard !isDevice else { return false }
        guard let next = buffered.nextData(from: offset, fileSize: fileSize) else { return true }
        return next.start >= offset + UInt64(count)
    }

    /// Data regions of a file from `offset` to `end` (the whole range for a device).
    func dataRegions(from offset: UInt64, to end: UInt64) -> [(start: UInt64, end: UInt64)] {
        guard !isDevice else { return offset < end ? [(offset, end)] : [] }
        var regions: [(start: UInt64, end: UInt64)] = []
        var at = offset
        while at < end, let next = buffered.nextData(from: at, fileSize: end), next.start < end {
            regions.append((next.start, min(next.end, end)))
            at = max(next.end, next.start + 1)
        }
        return regions
    }

    /// A failed flush fails every later one (DataFlush): no checkpoint after it.
    func dataSync() throws(SyncError) {
        do throws(SystemError) {
            try dataFlush.sync(buffered)
        } catch {
            throw .targetIO(path: path, offset: 0, writing: true, cause: error, undo: undo)
        }
    }

    func resize(to size: UInt64) throws(SyncError) {
        do throws(SystemError) { try buffered.truncate(to: size) } catch {
            throw .targetIO(path: path, offset: size, writing: true, cause: error, undo: undo)
        }
    }

    /// SystemFile's message carries the exact byte of a failed write ("write at byte N of").
    private func failedOffset(_ error: SystemError, default offset: UInt64) -> UInt64 {
        let words = error.operation.split(separator: " ")
        if let i = words.firstIndex(of: "byte"), i + 1 < words.count, let n = UInt64(words[i + 1]) { return n }
        return offset
    }
}

// Glibc's module map leaves out sys/vfs.h (statfs); the buffer is larger than struct statfs.
@_silgen_name("fstatfs")
private func lifeboat_fstatfs(_ fd: Int32, _ buffer: UnsafeMutableRawPointer) -> Int32
