import Crypto
import Glibc
import Synchronization
import SystemIO

/// Who a target is, independent of the name it was given: a file is its device and inode, a
/// block device its device number; the canonical path is part of the identity too, so a file
/// replaced under the same name is a new target. `key` names its state directory.
public struct TargetIdentity: Sendable, Equatable {
    public let path: String
    public let isDevice: Bool
    public let id: String

    public var key: String {
        let text = (isDevice ? "device " : "file ") + id + " " + path
        return Array(SHA256.hash(data: Array(text.utf8))).prefix(16).hex
    }

    /// The identity of an existing file or block device; nil when `path` does not exist.
    public static func of(_ path: String) throws(SyncError) -> TargetIdentity? {
        var st = stat()
        guard stat(path, &st) == 0 else {
            if errno == ENOENT { return nil }
            throw .target(SystemError("stat", path: path))
        }
        let canonical = canonicalPath(path)
        switch st.st_mode & S_IFMT {
        case S_IFBLK: return TargetIdentity(path: canonical, isDevice: true, id: "\(major(UInt(st.st_rdev))):\(minor(UInt(st.st_rdev)))")
        case S_IFREG: return TargetIdentity(path: canonical, isDevice: false, id: "\(st.st_dev):\(st.st_ino)")
        default: throw .notATarget(path)
        }
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
