#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// An open file descriptor with the path it came from, so every error names the file.
/// Not a class: the owner closes it explicitly, exactly once.
public struct SystemFile: Sendable {
    public let fd: Int32
    public let path: String

    public enum Mode: Sendable {
        case readOnly
        case readWrite
        /// Create a new file; fails if it exists.
        case createExclusive(permissions: mode_t)
        /// Create or open for writing, never truncating.
        case createOrOpen(permissions: mode_t)
    }

    public static func open(_ path: String, _ mode: Mode) throws(SystemError) -> SystemFile {
        let fd: Int32
        switch mode {
        case .readOnly: fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        case .readWrite: fd = Glibc.open(path, O_RDWR | O_CLOEXEC)
        case .createExclusive(let permissions):
            fd = Glibc.open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, permissions)
        case .createOrOpen(let permissions):
            fd = Glibc.open(path, O_RDWR | O_CREAT | O_CLOEXEC, permissions)
        }
        guard fd >= 0 else { throw SystemError("open", path: path) }
        return SystemFile(fd: fd, path: path)
    }

    public init(fd: Int32, path: String) {
        self.fd = fd
        self.path = path
    }

    public func close() {
        _ = Glibc.close(fd)
    }

    public func status() throws(SystemError) -> stat {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw SystemError("stat", path: path) }
        return st
    }

    public var isBlockDevice: Bool {
        guard let st = try? status() else { return false }
        return (st.st_mode & S_IFMT) == S_IFBLK
    }

    /// Size in bytes of a regular file or a block device.
    public func size() throws(SystemError) -> UInt64 {
        let st = try status()
        if (st.st_mode & S_IFMT) == S_IFBLK {
            var bytes: UInt64 = 0
            // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
            let BLKGETSIZE64: UInt = 0x8008_1272
            guard ioctl(fd, BLKGETSIZE64, &bytes) == 0 else { throw SystemError("get the size of", path: path) }
            return bytes
        }
        return UInt64(st.st_size)
    }

    /// Reads up to `count` bytes at `offset`, retrying short reads; returns fewer only at end of file.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(SystemError) -> Int {
        var done = 0
        while done < buffer.count {
            let n = pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw SystemError("read at byte \(offset + UInt64(done)) of", path: path)
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    /// Reads sequentially from the current position (pipes, standard input).
    public func readSequential(into buffer: UnsafeMutableRawBufferPointer, position: UInt64) throws(SystemError) -> Int {
        var done = 0
        while done < buffer.count {
            let n = Glibc.read(fd, buffer.baseAddress! + done, buffer.count - done)
            if n < 0 {
                if errno == EINTR { continue }
                throw SystemError("read at byte \(position + UInt64(done)) of", path: path)
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(SystemError) {
        var done = 0
        while done < buffer.count {
            let n = pwrite(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw SystemError("write at byte \(offset + UInt64(done)) of", path: path)
            }
            done += n
        }
    }

    /// Writes at the current position (pipes, standard output).
    public func writeSequential(_ buffer: UnsafeRawBufferPointer) throws(SystemError) {
        var done = 0
        while done < buffer.count {
            let n = Glibc.write(fd, buffer.baseAddress! + done, buffer.count - done)
            if n < 0 {
                if errno == EINTR { continue }
                throw SystemError("write to", path: path)
            }
            done += n
        }
    }

    public func write(_ bytes: [UInt8], at offset: UInt64) throws(SystemError) {
        let result = bytes.withUnsafeBytes { raw in Result { () throws(SystemError) in try write(raw, at: offset) } }
        try result.get()
    }

    public func readAll(from offset: UInt64 = 0, count: Int) throws(SystemError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        let result = bytes.withUnsafeMutableBytes { raw in Result { () throws(SystemError) in try read(into: raw, at: offset) } }
        let n = try result.get()
        if n < count { bytes.removeLast(count - n) }
        return bytes
    }

    /// The alignment O_DIRECT needs for buffers, offsets and lengths (the largest common block size).
    public static let directAlignment = 4096
    static let O_DIRECT: Int32 = 0o40000

    /// Turns O_DIRECT on or off; false when the filesystem does not support it (tmpfs).
    @discardableResult
    public func setDirect(_ on: Bool) -> Bool {
        let flags = fcntl(fd, F_GETFL)
        guard flags >= 0 else { return false }
        let wanted = on ? flags | SystemFile.O_DIRECT : flags & ~SystemFile.O_DIRECT
        return wanted == flags || fcntl(fd, F_SETFL, wanted) == 0
    }

    /// Reads like `read(into:at:)`, with O_DIRECT when the request is aligned; falls back to the
    /// page cache when the filesystem refuses.
    public func readUncached(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(SystemError) -> Int {
        let a = SystemFile.directAlignment
        guard let base = buffer.baseAddress, Int(bitPattern: base) % a == 0, offset % UInt64(a) == 0,
              buffer.count % a == 0, setDirect(true) else {
            setDirect(false)
            return try read(into: buffer, at: offset)
        }
        do {
            return try read(into: buffer, at: offset)
        } catch {
            setDirect(false)
            guard error.errno == EINVAL else { throw error }
            return try read(into: buffer, at: offset)
        }
    }

    public func sync() throws(SystemError) {
        while fsync(fd) != 0 {
            if errno == EINTR { continue }
            throw SystemError("flush", path: path)
        }
    }

    /// fdatasync: the data and what is needed to read it back, without the timestamps.
    public func syncData() throws(SystemError) {
        while fdatasync(fd) != 0 {
            if errno == EINTR { continue }
            throw SystemError("flush", path: path)
        }
    }

    /// Allocates a range inside the file without writing it (fallocate; it reads as zeros). False
    /// when the filesystem cannot. ext4 takes its inode lock shared only for O_DIRECT writes into
    /// allocated blocks: parallel direct writes into holes would take turns.
    public func allocate(at offset: UInt64, length: UInt64) throws(SystemError) -> Bool {
        while lifeboat_fallocate(fd, 0, off_t(offset), off_t(length)) != 0 {
            if errno == EINTR { continue }   // tmpfs stops at any signal; Ctrl-C is seen by the caller
            if errno == EOPNOTSUPP || errno == ENOSYS { return false }
            throw SystemError("allocate bytes \(offset)-\(offset + length) of", path: path)
        }
        return true
    }

    /// Deallocates a range, which then reads as zeros; the size stays. False when the
    /// filesystem cannot (the caller writes zeros instead).
    public func punchHole(at offset: UInt64, length: UInt64) throws(SystemError) -> Bool {
        let FALLOC_FL_KEEP_SIZE: Int32 = 1, FALLOC_FL_PUNCH_HOLE: Int32 = 2
        if lifeboat_fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off_t(offset), off_t(length)) == 0 { return true }
        if errno == EOPNOTSUPP || errno == ENOSYS { return false }
        throw SystemError("free bytes \(offset)-\(offset + length) of", path: path)
    }

    /// Takes an advisory lock on the whole file (flock); false when `wait` is false and another
    /// open file holds it. Released by `unlock` or when the file is closed.
    public func lock(exclusive: Bool, wait: Bool) throws(SystemError) -> Bool {
        let operation = (exclusive ? LOCK_EX : LOCK_SH) | (wait ? 0 : LOCK_NB)
        while flock(fd, operation) != 0 {
            if errno == EINTR { continue }
            if errno == EWOULDBLOCK { return false }
            throw SystemError("lock", path: path)
        }
        return true
    }

    /// An exclusive lock for a process that must not wait for another holder, tried for up to
    /// 0.2 s: a lock just released can stay held for a moment by a child that another thread of
    /// this process is spawning (its copy of the descriptor lives until it execs). A real holder
    /// holds it for far longer. False when it stays held.
    public func lockWithoutWaiting() throws(SystemError) -> Bool {
        for attempt in 0..<20 {
            if attempt > 0 { usleep(10_000) }
            if try lock(exclusive: true, wait: false) { return true }
        }
        return false
    }

    public func truncate(to size: UInt64) throws(SystemError) {
        guard ftruncate(fd, off_t(size)) == 0 else { throw SystemError("resize", path: path) }
    }

    /// The next data region at or after `offset` in a sparse file, or nil when only a hole remains.
    /// Filesystems without SEEK_DATA report the whole file as data.
    public func nextData(from offset: UInt64, fileSize: UInt64) -> (start: UInt64, end: UInt64)? {
        let start = lseek(fd, off_t(offset), 3 /* SEEK_DATA */)
        if start < 0 {
            if errno == ENXIO { return nil }
            return offset < fileSize ? (offset, fileSize) : nil
        }
        var end = lseek(fd, start, 4 /* SEEK_HOLE */)
        if end < 0 { end = off_t(fileSize) }
        return (UInt64(start), min(UInt64(end), fileSize))
    }

    public func adviseSequential() {
        _ = posix_fadvise(fd, 0, 0, Int32(POSIX_FADV_SEQUENTIAL))
    }

    /// Asks the kernel to start reading a range into the page cache now (in the background).
    public func adviseWillNeed(at offset: UInt64, length: UInt64) {
        _ = posix_fadvise(fd, off_t(offset), off_t(length), Int32(POSIX_FADV_WILLNEED))
    }
}

/// File-system operations on paths.
public enum FileSystem {
    public static func exists(_ path: String) -> Bool {
        access(path, F_OK) == 0
    }

    public static func isDirectory(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
    }

    /// mkdir -p. Each directory it makes is made durable in its parent: a file fsynced into a
    /// new directory is lost with it after a power cut if the directory's own entry is not.
    public static func createDirectories(_ path: String, permissions: mode_t = 0o755) throws(SystemError) {
        if isDirectory(path) {
            // Made by another process, perhaps one killed before it made the entry durable:
            // made durable here once per process, before a file is fsynced into it.
            if durableDirectories.withLock({ $0.insert(path).inserted }) {
                let parent = parentDirectory(of: path)
                do throws(SystemError) {
                    try syncDirectory(parent.isEmpty ? "." : parent)
                } catch where error.errno == EACCES || error.errno == EPERM {
                    // A parent this user may not open (a 0711 home): its entry is the owner's to keep.
                } catch {
                    durableDirectories.withLock { _ = $0.remove(path) }
                    throw error
                }
            }
            return
        }
        let parent = parentDirectory(of: path)
        if parent != path && !parent.isEmpty { try createDirectories(parent, permissions: permissions) }
        if mkdir(path, permissions) != 0 {
            if errno == EEXIST {
                // Made by another process since (then it is a directory now), or a file or a
                // dangling link in the way.
                guard isDirectory(path) else { throw SystemError("create the directory", path: path, errno: ENOTDIR) }
                return try createDirectories(path, permissions: permissions)
            }
            throw SystemError("create the directory", path: path)
        }
        try syncDirectory(parent.isEmpty ? "." : parent)
        durableDirectories.withLock { _ = $0.insert(path) }
    }

    /// Directories whose entry this process made durable in its parent.
    private static let durableDirectories = Mutex(Set<String>())

    public static func parentDirectory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        if slash == path.startIndex { return "/" }
        return String(path[..<slash])
    }

    /// Replaces a file's contents all at once: a temporary file beside it, written and fsynced,
    /// then renamed over it. A crash leaves the old file or the new one, never a mix; the
    /// caller syncs the directory when the rename itself must be durable.
    public static func replace(_ path: String, with bytes: [UInt8], permissions: mode_t = 0o644) throws(SystemError) {
        let temporary = path + ".tmp"
        try? remove(temporary)
        let file = try SystemFile.open(temporary, .createExclusive(permissions: permissions))
        do {
            try file.write(bytes, at: 0)
            try file.sync()
        } catch {
            file.close()
            try? remove(temporary)
            throw error
        }
        file.close()
        try rename(temporary, to: path)
    }

    public static func syncDirectory(_ path: String) throws(SystemError) {
        let fd = Glibc.open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError("open the directory", path: path) }
        defer { Glibc.close(fd) }
        guard fsync(fd) == 0 else { throw SystemError("flush the directory", path: path) }
    }

    public static func remove(_ path: String) throws(SystemError) {
        if unlink(path) != 0 && errno != ENOENT { throw SystemError("remove", path: path) }
    }

    public static func rename(_ from: String, to: String) throws(SystemError) {
        guard Glibc.rename(from, to) == 0 else { throw SystemError("rename \(from) to", path: to) }
    }

    /// Names in a directory, without "." and "..".
    public static func list(_ path: String) throws(SystemError) -> [String] {
        guard let dir = opendir(path) else { throw SystemError("list", path: path) }
        defer { closedir(dir) }
        var names: [String] = []
        // readdir returns nil at the end and on an error; only errno tells them apart, and a
        // listing cut short must not pass for a whole one (gc would take what it missed for gone).
        errno = 0
        while let entry = readdir(dir) {
            let name = withUnsafePointer(to: entry.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            if name != "." && name != ".." { names.append(name) }
            errno = 0
        }
        if errno != 0 { throw SystemError("list", path: path) }
        return names
    }

    public static func absolute(_ path: String) -> String {
        if path.hasPrefix("/") { return path }
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX))
        guard getcwd(&buffer, buffer.count) != nil else { return path }
        let cwd = String(nulTerminated: buffer)
        return cwd == "/" ? "/" + path : cwd + "/" + path
    }
}

// Glibc's module map does not export fallocate (it is a GNU extension).
@_silgen_name("fallocate")
func lifeboat_fallocate(_ fd: Int32, _ mode: Int32, _ offset: off_t, _ length: off_t) -> Int32
