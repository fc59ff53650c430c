import CFuse
import ChunkStore
import Foundation
import Glibc
import GuestFiles
import Synchronization
import SystemIO
import Vault
import VirtualDisk

public struct MountOptions: Sendable {
    public var mountpoint: String
    public var allowOther = false
    /// Bytes of verified chunk plaintext kept in memory.
    public var cacheBytes = 256 << 20
    public var threads: UInt32 = 8
    /// The kernel's readahead window for the mount (root only; see FuseSession.setReadahead).
    public var readaheadKiB = MountOptions.sequentialReadahead >> 10
    /// 4 MiB: four 1 MiB requests in flight, enough for every server thread on this kind of
    /// machine; more only fills the page cache ahead of the reader.
    static let sequentialReadahead = 4 << 20
    /// Whether a small read's whole slot goes to the kernel's page cache (FUSE_NOTIFY_STORE).
    public var handOverPages = true

    public init(mountpoint: String) {
        self.mountpoint = mountpoint
    }
}

public enum MountError: LifeboatError {
    case notADirectory(String)
    case alreadyMounted(String)
    case notMounted(String)
    case fuse(String)
    case system(SystemError)

    public var description: String {
        switch self {
        case .notADirectory(let path): return "mount point \(path) is not a directory"
        case .alreadyMounted(let path): return "\(path) is already mounted (unmount it with `lifeboat umount \(path)`)"
        case .notMounted(let path): return "\(path) is not mounted"
        case .fuse(let why): return "FUSE: \(why)"
        case .system(let error): return error.description
        }
    }

    public var kind: FailureKind {
        switch self {
        case .notADirectory, .alreadyMounted, .notMounted: return .usage
        case .fuse: return .io
        case .system(let error): return error.kind
        }
    }
}

/// An open file of the mount.
enum OpenFile: Sendable {
    /// `path`: the file's path in the mount, where whole slots are handed to the page cache.
    case disk(DiskReader, footer: [UInt8]?, path: String)
    case bytes([UInt8])
    /// A file inside a guest filesystem (`<disk>.files/...`).
    case guest(any GuestFileSystem, inode: UInt64, size: UInt64)
}

/// The read-only FUSE file system of a vault: the tree of MountNode, file contents from
/// VirtualDisk. It holds no chunk logic.
public final class MountServer: Sendable {
    let vault: Vault
    let catalog: PointCatalog
    let cache: ChunkCache
    let guests: GuestTree
    let started = Date()
    let log: @Sendable (String) -> Void
    private let readers = Mutex<[String: DiskReader]>([:])
    private let files = Mutex<[UInt64: OpenFile]>([:])
    private let nextHandle = Atomic<UInt64>(1)
    private let fuseHandle = Mutex<UInt>(0)
    let readaheadBytes: Int
    /// Whole slots decoded for small reads, on their way to the kernel's page cache (about
    /// 4 MiB of them; more are dropped, not waited for).
    private let pages: BoundedQueue<SlotPages>
    private let handOverPages: Bool
    /// Kernel node ids of the mount's disk files, by path (see `nodeID`).
    private let nodeIDs = Mutex<[String: UInt64]>([:])
    private let mountpoint: String

    public init(vault: Vault, options: MountOptions, log: @escaping @Sendable (String) -> Void) {
        // Each FUSE thread would otherwise get its own malloc arena, and freed chunk buffers
        // would stay resident in all of them: memory must stay near the cache size.
        _ = lifeboat_mallopt(-8 /* M_ARENA_MAX */, 2)
        self.vault = vault
        self.log = log
        self.catalog = PointCatalog(vault: vault, log: log)
        self.cache = ChunkCache(capacityBytes: options.cacheBytes, slotSize: vault.config.chunkSize)
        self.guests = GuestTree(vault: vault, cache: cache, log: log)
        self.readaheadBytes = options.readaheadKiB << 10
        self.handOverPages = options.handOverPages
        self.pages = BoundedQueue(capacity: max(2, (4 << 20) / vault.config.chunkSize))
        self.mountpoint = FileSystem.absolute(options.mountpoint)
        catalog.onLatestChange { [weak self] machines in self?.invalidateLatest(machines) }
    }

    /// Drops the kernel's copy of `machines/<m>/latest` for machines whose latest point changed.
    /// From another thread: the refresh may run inside a request on that very link.
    private func invalidateLatest(_ machines: [String]) {
        let handle = fuseHandle.withLock { $0 }
        guard handle != 0 else { return }
        DispatchQueue.global().async { [weak self] in
            // Under the handle's lock: the session is not destroyed meanwhile.
            self?.fuseHandle.withLock { value in
                guard value == handle, let fuse = OpaquePointer(bitPattern: value) else { return }
                for machine in machines { _ = fuse_invalidate_path(fuse, "/machines/\(machine)/latest") }
            }
        }
    }

    /// The components of a raw path after `machines/<machine>/<time>/disks/<disk>.files`, as
    /// bytes (guest names need not be UTF-8).
    private func guestTarget(_ path: UnsafePointer<CChar>, _ point: RecoveryPoint, _ disk: PointDisk) -> Result<GuestTree.Target, Errno> {
        let bytes = Array(UnsafeRawBufferPointer(start: path, count: strlen(path)))
        let components = bytes.split(separator: 47, omittingEmptySubsequences: true).dropFirst(5).map(Array.init)
        return guests.resolve(point, disk, components)
    }

    // MARK: - Running

    /// Mounts and serves until unmounted or signalled. `ready` is called once the kernel mount
    /// exists (the daemonising parent waits for it).
    public func run(_ options: MountOptions, ready: @Sendable () -> Void) throws(MountError) {
        let mountpoint = FileSystem.absolute(options.mountpoint)
        try Mounts.prepare(mountpoint)
        _ = catalog.current  // the first listing, before the kernel may ask for it

        var ops = fuse_operations()
        ops.`init` = { conn, config in
            // Always READDIRPLUS: `ls -l` reads a whole directory before it stats the entries,
            // and the adaptive mode would fall back to plain READDIR after the first batch,
            // costing a lookup per entry (10 000 files: a second).
            if let conn {
                conn.pointee.want &= ~UInt32(1 << 14)  // FUSE_CAP_READDIRPLUS_AUTO
                // Symbolic links are kept by the kernel; `latest` is invalidated when it moves.
                if conn.pointee.capable & UInt32(1 << 23) != 0 { conn.pointee.want |= UInt32(1 << 23) }  // FUSE_CAP_CACHE_SYMLINKS
                // The kernel keeps the smaller of this and the device's readahead, which
                // FuseSession widened before this reply.
                conn.pointee.max_readahead = max(conn.pointee.max_readahead, UInt32(server()?.readaheadBytes ?? 0))
            }
            if let config {
                config.pointee.kernel_cache = 1       // points are immutable: keep pages across opens
                config.pointee.entry_timeout = 1      // but points come and go
                config.pointee.attr_timeout = 1
                config.pointee.negative_timeout = 1
                config.pointee.nullpath_ok = 0
            }
            return fuse_get_context()?.pointee.private_data
        }
        ops.getattr = { path, st, _ in server()?.getattr(path, st) ?? -EIO }
        ops.readdir = { path, buffer, filler, _, _, flags in server()?.readdir(path, buffer, filler, plus: flags.rawValue & 1 != 0) ?? -EIO }
        ops.open = { path, info in server()?.open(path, info) ?? -EIO }
        ops.read = { _, buffer, size, offset, info in server()?.read(buffer, size, offset, info) ?? -EIO }
        ops.release = { _, info in server()?.release(info) ?? 0 }
        ops.readlink = { path, buffer, size in server()?.readlink(path, buffer, size) ?? -EIO }
        ops.lseek = { _, offset, whence, info in server()?.lseek(offset, whence, info) ?? off_t(-EIO) }
        ops.statfs = { _, st in server()?.statfs(st) ?? -EIO }

        let me = Unmanaged.passRetained(self)
        defer { me.release() }
        // Points come and go without a request asking for them: the catalog is refreshed in
        // the background too, so that a cached `latest` is invalidated when it moves.
        let running = Atomic<Bool>(true)
        let catalog = self.catalog
        let refresher = Worker(name: "mount-catalog") {
            while running.load(ordering: .relaxed) {
                usleep(500_000)
                if running.load(ordering: .relaxed) { _ = catalog.current }
            }
        }
        let pages = self.pages
        let handing = Worker(name: "mount-pages") { [weak self] in
            while let slot = pages.pop() { self?.store(slot) }
        }
        defer {
            running.store(false, ordering: .relaxed)
            refresher.join()
            pages.close()
            handing.join()
        }
        try FuseSession.run(operations: &ops,
                            options: "ro,default_permissions,fsname=lifeboat,subtype=lifeboat" + (options.allowOther ? ",allow_other" : ""),
                            mountpoint: mountpoint, threads: options.threads, readaheadKiB: options.readaheadKiB,
                            data: me.toOpaque(), handle: fuseHandle, ready: ready)
    }

    /// Ends the request loop (tests; the command line uses signals and umount).
    public func stop() {
        FuseSession.stop(fuseHandle)
    }

    // MARK: - Handing pages to the kernel

    /// Stores one slot's bytes in the kernel's page cache of its file (FUSE_NOTIFY_STORE), off
    /// the request threads: the store waits for the page the request itself is filling.
    private func store(_ slot: SlotPages) {
        // Only while the path still shows the point the bytes came from: a point removed and
        // another made with the same time must not get them.
        guard case .disk(let point, _, _)? = MountNode.resolve(slot.path, in: catalog.current), point.id == slot.point else {
            nodeIDs.withLock { _ = $0.removeValue(forKey: slot.path) }
            return
        }
        guard let node = nodeID(slot.path) else { return }
        let status = fuseHandle.withLock { value -> Int32 in
            guard value != 0, let fuse = OpaquePointer(bitPattern: value), let session = fuse_get_session(fuse) else { return 0 }
            return slot.bytes.withUnsafeBytes { lb_notify_store(session, fuse_ino_t(node), off_t(slot.offset), $0.baseAddress, $0.count) }
        }
        // The kernel forgot the node (or never had it): look it up again next time.
        if status == -ENOENT { nodeIDs.withLock { _ = $0.removeValue(forKey: slot.path) } }
    }

    /// The kernel's node id of a file of this mount. The high-level libfuse hands the kernel's
    /// node id out as st_ino (the `use_ino` option is off), and a stat through the mount from
    /// this thread (not a request thread) is answered by the others.
    private func nodeID(_ path: String) -> UInt64? {
        if let known = nodeIDs.withLock({ $0[path] }) { return known }
        var st = stat()
        guard lstat(mountpoint + path, &st) == 0 else { return nil }
        nodeIDs.withLock { ids in
            if ids.count >= 256 { ids.removeAll() }
            ids[path] = UInt64(st.st_ino)
        }
        return UInt64(st.st_ino)
    }

    // MARK: - Operations (return 0 or -errno)

    private func node(_ path: UnsafePointer<CChar>?) -> MountNode? {
        guard let path else { return nil }
        return MountNode.resolve(String(cString: path), in: catalog.current)
    }

    func getattr(_ path: UnsafePointer<CChar>?, _ st: UnsafeMutablePointer<stat>?) -> Int32 {
        guard let st else { return -EINVAL }
        let snapshot = catalog.current
        guard let path, let node = MountNode.resolve(String(cString: path), in: snapshot) else { return -ENOENT }
        st.pointee = stat()
        st.pointee.st_uid = getuid()
        st.pointee.st_gid = getgid()
        var time = snapshot.machines.values.compactMap { $0.last?.point.date }.max() ?? started
        // A point's files carry its id in their times' nanoseconds: a path that comes to name
        // another point (one removed, another made with the same time) changes its mtime, and the
        // kernel then drops the pages it cached for the old one.
        var nanoseconds = 0
        switch node {
        case .root, .machines, .byID, .machine, .point, .disks:
            st.pointee.st_mode = S_IFDIR | 0o555
            st.pointee.st_nlink = 2
            if case .machine(_, let points) = node, let last = points.last { time = last.point.date }
            if case .point(let p) = node { time = p.date }
            if case .disks(let p) = node { time = p.date }
        case .disk(let point, let disk, let vhd):
            st.pointee.st_mode = S_IFREG | 0o444
            st.pointee.st_nlink = 1
            st.pointee.st_size = off_t(disk.size) + (vhd ? off_t(VHDFooter.size) : 0)
            // Blocks reflect what is stored: holes take none.
            st.pointee.st_blocks = blkcnt_t((disk.dataBytes + 511) / 512) + (vhd ? 1 : 0)
            st.pointee.st_blksize = blksize_t(disk.chunkSize)
            time = point.date
            nanoseconds = MountServer.nanoseconds(point)
        case .pointJSON(let point, let bytes):
            st.pointee.st_mode = S_IFREG | 0o444
            st.pointee.st_nlink = 1
            st.pointee.st_size = off_t(bytes.count)
            st.pointee.st_blocks = blkcnt_t((bytes.count + 511) / 512)
            time = point.date
            nanoseconds = MountServer.nanoseconds(point)
        case .link(let target, let when):
            st.pointee.st_mode = S_IFLNK | 0o777
            st.pointee.st_nlink = 1
            st.pointee.st_size = off_t(target.utf8.count)
            time = when
        case .files(let point, let disk, _):
            switch guestTarget(path, point, disk) {
            case .success(let target): return guests.getattr(target, time: point.date, st)
            case .failure(let e): return -e.code
            }
        }
        let seconds = timespec(tv_sec: Int(time.timeIntervalSince1970), tv_nsec: nanoseconds)
        st.pointee.st_mtim = seconds
        st.pointee.st_atim = seconds
        st.pointee.st_ctim = seconds
        return 0
    }

    /// Nanoseconds (below one second) taken from a point's id.
    static func nanoseconds(_ point: RecoveryPoint) -> Int {
        Int(UInt64(point.id.prefix(15), radix: 16) ?? 0) % 1_000_000_000
    }

    func readdir(_ path: UnsafePointer<CChar>?, _ buffer: UnsafeMutableRawPointer?, _ filler: fuse_fill_dir_t?, plus: Bool) -> Int32 {
        let snapshot = catalog.current
        guard let path, let filler, let node = MountNode.resolve(String(cString: path), in: snapshot) else { return -ENOENT }
        if case .files(let point, let disk, _) = node {
            switch guestTarget(path, point, disk) {
            case .success(let target): return guests.readdir(target, buffer, filler, plus: plus, time: point.date)
            case .failure(let e): return -e.code
            }
        }
        guard let names = node.children(in: snapshot) else { return -ENOTDIR }
        for name in [".", ".."] + names {
            if filler(buffer, name, nil, 0, fuse_fill_dir_flags(0)) != 0 { break }
        }
        return 0
    }

    func open(_ path: UnsafePointer<CChar>?, _ info: UnsafeMutablePointer<fuse_file_info>?) -> Int32 {
        guard let info else { return -EINVAL }
        if info.pointee.flags & O_ACCMODE != O_RDONLY { return -EROFS }
        guard let path, let node = node(path) else { return -ENOENT }
        let file: OpenFile
        switch node {
        case .disk(let point, let disk, let vhd):
            let key = point.id + "/" + disk.name
            let reader = readers.withLock { r in
                if let existing = r[key] { return existing }
                if r.count >= 16 { r.removeAll() }  // open handles keep theirs alive
                let made = DiskReader(point: point, disk: disk, chunks: vault.chunks, cache: cache,
                                      tags: vault.recordedSlotTags(point: point, disk: disk.name))
                r[key] = made
                return made
            }
            let footer = vhd ? VHDFooter.make(diskSize: disk.size, time: point.date,
                                              identity: ChunkID.sha256(Array((point.id + disk.name).utf8)).bytes) : nil
            file = .disk(reader, footer: footer, path: String(cString: path))
        case .pointJSON(_, let bytes):
            file = .bytes(bytes)
        case .files(let point, let disk, _):
            switch guestTarget(path, point, disk) {
            case .success(.entry(let fs, let entry)):
                guard entry.type == .regular else { return entry.type == .directory ? -EISDIR : -EACCES }
                guard let info = try? fs.stat(entry.inode) else { return -EIO }
                file = .guest(fs, inode: entry.inode, size: info.size)
            case .success(.volumes): return -EISDIR
            case .failure(let e): return -e.code
            }
        case .link:
            return -ELOOP
        default:
            return -EISDIR
        }
        let handle = nextHandle.add(1, ordering: .relaxed).oldValue
        files.withLock { $0[handle] = file }
        info.pointee.fh = handle
        info.pointee.keep_cache = 1
        return 0
    }

    func release(_ info: UnsafeMutablePointer<fuse_file_info>?) -> Int32 {
        guard let info else { return 0 }
        let handle = info.pointee.fh
        files.withLock { _ = $0.removeValue(forKey: handle) }
        return 0
    }

    func read(_ buffer: UnsafeMutablePointer<CChar>?, _ size: Int, _ offset: off_t,
              _ info: UnsafeMutablePointer<fuse_file_info>?) -> Int32 {
        guard let buffer, let info, offset >= 0 else { return -EINVAL }
        let handle = info.pointee.fh
        guard let file = files.withLock({ $0[handle] }) else { return -EBADF }
        let out = UnsafeMutableRawBufferPointer(start: UnsafeMutableRawPointer(buffer), count: size)
        switch file {
        case .bytes(let bytes):
            return copyOut(bytes, at: UInt64(offset), into: out)
        case .guest(let fs, let inode, _):
            return guests.read(fs, inode: inode, into: out, at: UInt64(offset))
        case .disk(let reader, let footer, let path):
            var done = 0
            // A small read decodes a whole chunk anyway: the kernel gets all of it, so that the
            // next reads around this one are page-cache hits instead of round trips here.
            let wholeSlot: ((UInt64, UnsafeRawBufferPointer) -> Void)? = handOverPages && size < reader.chunkSize
                ? { [pages] at, bytes in pages.offer(SlotPages(path: path, point: reader.point.id, offset: at, bytes: Array(bytes))) } : nil
            do {
                if UInt64(offset) < reader.size {
                    done = try reader.read(into: out, at: UInt64(offset), wholeSlot: wholeSlot)
                }
            } catch {
                log(error.description)
                return -EIO
            }
            return Int32(appendFooter(footer, diskSize: reader.size, offset: UInt64(offset), done: done, into: out))
        }
    }

    func lseek(_ offset: off_t, _ whence: Int32, _ info: UnsafeMutablePointer<fuse_file_info>?) -> off_t {
        guard let info, offset >= 0 else { return off_t(-EINVAL) }
        let handle = info.pointee.fh
        guard let file = files.withLock({ $0[handle] }) else { return off_t(-EBADF) }
        let size: UInt64
        var reader: DiskReader? = nil
        var footer = 0
        switch file {
        case .bytes(let bytes): size = UInt64(bytes.count)
        case .guest(_, _, let guestSize): size = guestSize
        case .disk(let r, let f, _):
            reader = r
            footer = f?.count ?? 0
            size = r.size + UInt64(footer)
        }
        let position = UInt64(offset)
        guard position < size else { return off_t(-ENXIO) }
        guard let reader, position < reader.size else {
            // Inside point.json or the VHD footer: all data.
            return whence == 3 /* SEEK_DATA */ ? offset : off_t(size)
        }
        do {
            switch whence {
            case 3:  // SEEK_DATA
                if let data = try reader.nextData(from: position) { return off_t(data) }
                return footer > 0 ? off_t(reader.size) : off_t(-ENXIO)
            case 4:  // SEEK_HOLE
                let hole = try reader.nextHole(from: position)
                return hole == reader.size && footer > 0 ? off_t(size) : off_t(hole)
            default:
                return off_t(-EINVAL)
            }
        } catch {
            log(error.description)
            return off_t(-EIO)
        }
    }

    func readlink(_ path: UnsafePointer<CChar>?, _ buffer: UnsafeMutablePointer<CChar>?, _ size: Int) -> Int32 {
        guard let buffer, size > 0 else { return -EINVAL }
        guard let node = node(path) else { return -ENOENT }
        if case .files(let point, let disk, _) = node, let path {
            switch guestTarget(path, point, disk).flatMap({ guests.readlink($0) }) {
            case .success(let target):
                let n = min(target.count, size - 1)
                for i in 0..<n { buffer[i] = CChar(bitPattern: target[i]) }
                buffer[n] = 0
                return 0
            case .failure(let e): return -e.code
            }
        }
        guard case .link(let target, _) = node else { return -EINVAL }
        let bytes = Array(target.utf8.prefix(size - 1))
        for (i, b) in bytes.enumerated() { buffer[i] = CChar(bitPattern: b) }
        buffer[bytes.count] = 0
        return 0
    }

    func statfs(_ st: UnsafeMutablePointer<statvfs>?) -> Int32 {
        guard let st else { return -EINVAL }
        st.pointee = statvfs()
        st.pointee.f_bsize = UInt(vault.config.chunkSize)
        st.pointee.f_frsize = UInt(vault.config.chunkSize)
        st.pointee.f_namemax = 255
        return 0
    }
}

/// One slot of a disk file, decoded for a small read, for the kernel's page cache.
struct SlotPages: Sendable {
    let path: String
    /// The id of the point whose bytes these are.
    let point: String
    let offset: UInt64
    let bytes: [UInt8]
}

@_silgen_name("mallopt")
func lifeboat_mallopt(_ parameter: Int32, _ value: Int32) -> Int32

/// The server of the mount this callback serves.
private func server() -> MountServer? {
    guard let data = fuse_get_context()?.pointee.private_data else { return nil }
    return Unmanaged<MountServer>.fromOpaque(data).takeUnretainedValue()
}

/// Kernel mounts: stale-mount detection and unmounting.
public enum Mounts {
    /// True when `path` is a mount point (from /proc/self/mountinfo, which never blocks: a stat of
    /// a FUSE mount whose server has not answered INIT would).
    public static func isMounted(_ path: String) -> Bool {
        device(of: path) != nil
    }

    /// "major:minor" of the file system mounted on top at `path`, from /proc/self/mountinfo
    /// (fields: id parent major:minor root mountpoint ...; the kernel escapes the mount point's
    /// space, tab, newline and backslash as octal).
    static func device(of path: String) -> String? {
        guard let text = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8) else { return nil }
        var escaped = ""
        for c in path {
            switch c {
            case " ": escaped += "\\040"
            case "\t": escaped += "\\011"
            case "\n": escaped += "\\012"
            case "\\": escaped += "\\134"
            default: escaped.append(c)
            }
        }
        var found: String? = nil
        for line in text.split(separator: "\n") {
            let fields = line.split(separator: " ")
            if fields.count > 4 && fields[4] == escaped { found = String(fields[2]) }  // the last is on top
        }
        return found
    }

    /// A mount whose server died answers ENOTCONN ("Transport endpoint is not connected").
    /// statfs always asks the server; a stat may be answered from the kernel's attribute cache.
    public static func isStale(_ path: String) -> Bool {
        var st = statvfs()
        return statvfs(path, &st) != 0 && errno == ENOTCONN
    }

    /// Checks the mount point; clears a stale mount left by a crashed server.
    static func prepare(_ path: String) throws(MountError) {
        if isMounted(path) {
            guard isStale(path) else { throw .alreadyMounted(path) }
            _ = umount2(path, Int32(MNT_DETACH))
        }
        guard FileSystem.isDirectory(path) else { throw .notADirectory(path) }
    }

    public enum Outcome: Sendable {
        case unmounted
        case staleCleared
        /// Files were open: the mount is gone from the tree; open files work until closed.
        case detached
    }

    /// Waits, at most `seconds`, for a server to end once its mount is gone (it makes what it
    /// holds durable and releases its locks as it stops).
    /// False if the process still runs after `seconds`.
    @discardableResult
    public static func waitForExit(_ pid: Int32, seconds: Double) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while kill(pid, 0) == 0 && Date() < deadline { usleep(10_000) }
        return kill(pid, 0) != 0
    }

    public static func unmount(_ path: String) throws(MountError) -> Outcome {
        let path = FileSystem.absolute(path)
        guard isMounted(path) else { throw .notMounted(path) }
        if isStale(path) {
            _ = umount2(path, Int32(MNT_DETACH))
            return .staleCleared
        }
        if umount2(path, 0) == 0 { return .unmounted }
        if errno == EBUSY, umount2(path, Int32(MNT_DETACH)) == 0 { return .detached }
        throw .system(SystemError("unmount", path: path))
    }
}

/// Copies what a read at `offset` reaches of a file held in memory (point.json and the like).
func copyOut(_ bytes: [UInt8], at offset: UInt64, into out: UnsafeMutableRawBufferPointer) -> Int32 {
    guard offset < UInt64(bytes.count) else { return 0 }
    let from = Int(offset)
    let n = min(out.count, bytes.count - from)
    bytes.withUnsafeBytes { out.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[from..<(from + n)])) }
    return Int32(n)
}

/// Copies the part of a computed VHD footer that a read at `offset` reaches past the disk's
/// end, after the `done` bytes of disk already in `out`; returns the new count.
func appendFooter(_ footer: [UInt8]?, diskSize: UInt64, offset: UInt64, done: Int, into out: UnsafeMutableRawBufferPointer) -> Int {
    guard let footer, done < out.count else { return done }
    let position = offset + UInt64(done)
    guard position >= diskSize && position < diskSize + UInt64(footer.count) else { return done }
    let from = Int(position - diskSize)
    let n = min(out.count - done, footer.count - from)
    footer.withUnsafeBytes {
        UnsafeMutableRawBufferPointer(rebasing: out[done..<(done + n)]).copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[from..<(from + n)]))
    }
    return done + n
}
