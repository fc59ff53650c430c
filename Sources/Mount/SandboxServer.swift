import CFuse
import ChunkStore
import Foundation
import Glibc
import Synchronization
import SystemIO
import Vault
import VirtualDisk

/// The read-write FUSE file system of one sandbox:
///
///     disks/<disk>.img     the disk, read-write (reads merge the overlay over the point)
///     disks/<disk>.vhd     the same as a fixed VHD (the footer is read-only)
///     point.json           the base point
///     .lifeboat-freeze     opened by `sandbox promote` to freeze writes while it reads
///
/// It holds no chunk logic: reads and writes go to VirtualDisk's SandboxDisk.
public final class SandboxServer: Sendable {
    let sandbox: OpenSandbox
    let started = Date()
    let log: @Sendable (String) -> Void
    private let footers: [String: [UInt8]]
    private let pointJSON: [UInt8]
    private let files = Mutex<[UInt64: SandboxFile]>([:])
    private let nextHandle = Atomic<UInt64>(1)
    private let fuseHandle = Mutex<UInt>(0)

    enum SandboxFile: Sendable {
        /// `writable`: opened for writing. While such a handle is open, the kernel may hold written
        /// pages (its writeback cache) that this server has not seen yet.
        case disk(SandboxDisk, footer: [UInt8]?, writable: Bool)
        case bytes([UInt8])
        case freeze([(SandboxDisk, UInt64)], held: FreezeHold)

        var isFreeze: Bool { if case .freeze = self { return true } else { return false } }
    }

    enum Node {
        case root, disks
        case disk(SandboxDisk, vhd: Bool)
        case pointJSON
        case freeze
    }

    public init(sandbox: OpenSandbox, log: @escaping @Sendable (String) -> Void) {
        _ = lifeboat_mallopt(-8 /* M_ARENA_MAX */, 2)
        self.sandbox = sandbox
        self.log = log
        var footers: [String: [UInt8]] = [:]
        for disk in sandbox.disks {
            // A sandbox's VHD identity differs from its point's: it is another disk.
            footers[disk.name] = VHDFooter.make(diskSize: disk.size, time: sandbox.point.date,
                                                identity: ChunkID.sha256(Array(("sandbox/" + sandbox.record.name + "/" + disk.name).utf8)).bytes)
        }
        self.footers = footers
        self.pointJSON = MountNode.pointJSON(sandbox.point)
    }

    public func run(_ options: MountOptions, ready: () -> Void) throws(MountError) {
        let mountpoint = FileSystem.absolute(options.mountpoint)
        try Mounts.prepare(mountpoint)
        var ops = fuse_operations()
        ops.`init` = { conn, config in
            if let config {
                // Not kernel_cache: libfuse would then keep the cache on every open, and a disk's
                // two names (.img, .vhd) are two inodes with two page caches (see `open`).
                config.pointee.kernel_cache = 0
                config.pointee.entry_timeout = 60
                config.pointee.attr_timeout = 60
                config.pointee.nullpath_ok = 0
            }
            if let conn {
                conn.pointee.max_write = 1 << 20
                conn.pointee.max_readahead = max(conn.pointee.max_readahead, UInt32(MountOptions.sequentialReadahead))
                // The kernel keeps written pages and sends them in the background, as for any
                // file; fsync writes them back before it reaches us, so flushes keep their meaning.
                if conn.pointee.capable & UInt32(1 << 16) != 0 { conn.pointee.want |= UInt32(1 << 16) }  // FUSE_CAP_WRITEBACK_CACHE
                // O_TRUNC as a SETATTR that `truncate` refuses, not a size the kernel sets to 0 on
                // its own (dropping other writers' pages) while the open succeeds.
                conn.pointee.want &= ~UInt32(1 << 3)  // FUSE_CAP_ATOMIC_O_TRUNC
            }
            return fuse_get_context()?.pointee.private_data
        }
        ops.getattr = { path, st, _ in sandboxServer()?.getattr(path, st) ?? -EIO }
        ops.readdir = { path, buffer, filler, _, _, _ in sandboxServer()?.readdir(path, buffer, filler) ?? -EIO }
        ops.open = { path, info in sandboxServer()?.open(path, info) ?? -EIO }
        ops.read = { _, buffer, size, offset, info in sandboxServer()?.read(buffer, size, offset, info) ?? -EIO }
        ops.write = { _, buffer, size, offset, info in sandboxServer()?.write(buffer, size, offset, info) ?? -EIO }
        ops.flush = { _, info in sandboxServer()?.flush(info) ?? -EIO }
        ops.fsync = { _, _, info in sandboxServer()?.fsync(info) ?? -EIO }
        ops.release = { _, info in sandboxServer()?.release(info) ?? 0 }
        ops.lseek = { _, offset, whence, info in sandboxServer()?.lseek(offset, whence, info) ?? off_t(-EIO) }
        ops.fallocate = { _, mode, offset, length, info in sandboxServer()?.fallocate(mode, offset, length, info) ?? -EIO }
        ops.truncate = { path, size, _ in sandboxServer()?.truncate(path, size) ?? -EIO }
        ops.utimens = { _, _, _ in 0 }  // times are the point's; touching is harmless
        ops.statfs = { _, st in sandboxServer()?.statfs(st) ?? -EIO }

        let me = Unmanaged.passRetained(self)
        defer { me.release() }
        sandbox.setMounted(mountpoint)
        defer {
            for disk in sandbox.disks {
                do {
                    try disk.flush()
                } catch {
                    log("sandbox \(sandbox.record.name): \(error.description)")
                }
            }
            sandbox.setMounted(nil)
        }
        // Guest writes may wait on a freeze: enough threads that the freeze's own release and
        // the reads always find one.
        try FuseSession.run(operations: &ops,
                            options: "rw,default_permissions,fsname=lifeboat-sandbox,subtype=lifeboat" + (options.allowOther ? ",allow_other" : ""),
                            mountpoint: mountpoint, threads: max(options.threads, 32),
                            readaheadKiB: MountOptions.sequentialReadahead >> 10, data: me.toOpaque(), handle: fuseHandle, ready: ready)
    }

    public func stop() {
        FuseSession.stop(fuseHandle)
    }

    // MARK: - Tree

    private func resolve(_ path: UnsafePointer<CChar>?) -> Node? {
        guard let path else { return nil }
        let parts = String(cString: path).split(separator: "/").map(String.init)
        switch parts.count {
        case 0: return .root
        case 1:
            switch parts[0] {
            case "disks": return .disks
            case "point.json": return .pointJSON
            case Sandboxes.freezeFile: return .freeze
            default: return nil
            }
        case 2 where parts[0] == "disks":
            for disk in sandbox.disks {
                if parts[1] == disk.name + ".img" { return .disk(disk, vhd: false) }
                if parts[1] == disk.name + ".vhd" { return .disk(disk, vhd: true) }
            }
            return nil
        default: return nil
        }
    }

    func getattr(_ path: UnsafePointer<CChar>?, _ st: UnsafeMutablePointer<stat>?) -> Int32 {
        guard let st else { return -EINVAL }
        guard let node = resolve(path) else { return -ENOENT }
        st.pointee = stat()
        st.pointee.st_uid = getuid()
        st.pointee.st_gid = getgid()
        switch node {
        case .root, .disks:
            st.pointee.st_mode = S_IFDIR | 0o755
            st.pointee.st_nlink = 2
        case .disk(let disk, let vhd):
            st.pointee.st_mode = S_IFREG | 0o644
            st.pointee.st_nlink = 1
            st.pointee.st_size = off_t(disk.size) + (vhd ? off_t(VHDFooter.size) : 0)
            st.pointee.st_blocks = blkcnt_t((disk.size + 511) / 512)
            st.pointee.st_blksize = blksize_t(SandboxDisk.blockSize)
        case .pointJSON:
            st.pointee.st_mode = S_IFREG | 0o444
            st.pointee.st_nlink = 1
            st.pointee.st_size = off_t(pointJSON.count)
        case .freeze:
            st.pointee.st_mode = S_IFREG | 0o400
            st.pointee.st_nlink = 1
        }
        let seconds = timespec(tv_sec: Int(sandbox.point.date.timeIntervalSince1970), tv_nsec: 0)
        st.pointee.st_mtim = seconds
        st.pointee.st_atim = seconds
        st.pointee.st_ctim = seconds
        return 0
    }

    func readdir(_ path: UnsafePointer<CChar>?, _ buffer: UnsafeMutableRawPointer?, _ filler: fuse_fill_dir_t?) -> Int32 {
        guard let filler, let node = resolve(path) else { return -ENOENT }
        let names: [String]
        switch node {
        case .root: names = ["disks", "point.json"]
        case .disks: names = sandbox.disks.flatMap { [$0.name + ".img", $0.name + ".vhd"] }
        default: return -ENOTDIR
        }
        for name in [".", ".."] + names {
            if filler(buffer, name, nil, 0, fuse_fill_dir_flags(0)) != 0 { break }
        }
        return 0
    }

    func open(_ path: UnsafePointer<CChar>?, _ info: UnsafeMutablePointer<fuse_file_info>?) -> Int32 {
        guard let info else { return -EINVAL }
        guard let node = resolve(path) else { return -ENOENT }
        let writing = info.pointee.flags & O_ACCMODE != O_RDONLY
        let file: SandboxFile
        switch node {
        case .disk(let disk, let vhd):
            file = .disk(disk, footer: vhd ? footers[disk.name] : nil, writable: writing)
        case .pointJSON:
            if writing { return -EACCES }
            file = .bytes(pointJSON)
        case .freeze:
            if writing { return -EACCES }
            // Writes stop, and what was written is made durable, before the opener goes on.
            let frozen = sandbox.disks.map { ($0, $0.gate.freeze()) }
            for disk in sandbox.disks {
                do {
                    try disk.flush()
                } catch {
                    for (d, token) in frozen { d.gate.thaw(token) }
                    log("sandbox \(sandbox.record.name): \(error.description)")
                    return -EIO
                }
            }
            file = .freeze(frozen, held: FreezeHold())
            info.pointee.direct_io = 1
        default:
            return -EISDIR
        }
        let handle = nextHandle.add(1, ordering: .relaxed).oldValue
        let refused = files.withLock { files -> Bool in
            // A disk's .img and .vhd are two inodes with two page caches that know nothing of
            // each other's writes: one name is refused while the other is open, and the first
            // open of a name drops what its cache kept from before (the other name may have
            // written since); later opens of the same name share its cache.
            if case .disk(let disk, let footer, _) = file {
                var same = false
                for case .disk(let other, let otherFooter, _) in files.values where other === disk {
                    if (otherFooter != nil) != (footer != nil) { return true }
                    same = true
                }
                info.pointee.keep_cache = same ? 1 : 0
            }
            files[handle] = file
            return false
        }
        if refused { return -EBUSY }
        info.pointee.fh = handle
        return 0
    }

    func release(_ info: UnsafeMutablePointer<fuse_file_info>?) -> Int32 {
        guard let info else { return 0 }
        let handle = info.pointee.fh
        guard let file = files.withLock({ $0.removeValue(forKey: handle) }) else { return 0 }
        // Every disk it froze is thawed, whether or not the freeze held on all of them.
        if case .freeze(let frozen, _) = file {
            for (disk, token) in frozen { disk.gate.thaw(token) }
        }
        return 0
    }

    private func file(_ info: UnsafeMutablePointer<fuse_file_info>?) -> SandboxFile? {
        guard let info else { return nil }
        let handle = info.pointee.fh
        return files.withLock { $0[handle] }
    }

    func read(_ buffer: UnsafeMutablePointer<CChar>?, _ size: Int, _ offset: off_t,
              _ info: UnsafeMutablePointer<fuse_file_info>?) -> Int32 {
        guard let buffer, offset >= 0 else { return -EINVAL }
        guard let file = file(info) else { return -EBADF }
        let out = UnsafeMutableRawBufferPointer(start: UnsafeMutableRawPointer(buffer), count: size)
        switch file {
        case .bytes(let bytes):
            return copyOut(bytes, at: UInt64(offset), into: out)
        case .freeze(let disks, let held):
            // "frozen" while the freeze held from open to now; "expired" if writes had to go on.
            if !disks.allSatisfy({ disk, token in disk.gate.holds(token) }) { held.held.store(false, ordering: .releasing) }
            let holds = held.held.load(ordering: .acquiring)
            // With the sandbox's name: a freezer checks that the mount it froze is the sandbox it means.
            return copyOut(Array(((holds ? "frozen " : "expired ") + sandbox.record.name + "\n").utf8), at: UInt64(offset), into: out)
        case .disk(let disk, let footer, _):
            var done = 0
            do {
                if UInt64(offset) < disk.size { done = try disk.read(into: out, at: UInt64(offset)) }
            } catch {
                log("sandbox \(sandbox.record.name): \(error.description)")
                return -EIO
            }
            return Int32(appendFooter(footer, diskSize: disk.size, offset: UInt64(offset), done: done, into: out))
        }
    }

    func write(_ buffer: UnsafePointer<CChar>?, _ size: Int, _ offset: off_t, _ info: UnsafeMutablePointer<fuse_file_info>?) -> Int32 {
        guard let buffer, offset >= 0 else { return -EINVAL }
        guard case .disk(let disk, let footer, _) = file(info) else { return -EBADF }
        let position = UInt64(offset)
        var length = size
        if position + UInt64(size) > disk.size {
            // The VHD footer is computed: rewriting it with the same bytes is fine, changing it is not.
            guard let footer, position + UInt64(size) <= disk.size + UInt64(footer.count) else { return -ENOSPC }
            let start = max(position, disk.size)
            let same = (start..<(position + UInt64(size))).allSatisfy { p in
                UInt8(bitPattern: buffer[Int(p - position)]) == footer[Int(p - disk.size)]
            }
            guard same else { return -EPERM }
            length = position < disk.size ? Int(disk.size - position) : 0
        }
        do {
            // From the writeback cache (the writer was told long ago) or from a writer that waits.
            let cached = info.map { $0.pointee.writepage != 0 } ?? true
            try disk.write(UnsafeRawBufferPointer(start: UnsafeRawPointer(buffer), count: length), at: position, cached: cached)
        } catch {
            log("sandbox \(sandbox.record.name): \(error.description)")
            if case .system(let e) = error, e.errno == ENOSPC || e.errno == EDQUOT { return -ENOSPC }
            return -EIO
        }
        return Int32(size)
    }

    /// close(): a disk's writes made durable, as by fsync. The freeze file's freeze ends here
    /// rather than at RELEASE, which the kernel sends in the background, queued behind the
    /// writes that wait for the freeze to end: twelve of those fill the queue, and the writers
    /// would wait out their timeout although the promote was done.
    func flush(_ info: UnsafeMutablePointer<fuse_file_info>?) -> Int32 {
        if case .freeze(let frozen, _) = file(info) {
            for (disk, token) in frozen { disk.gate.thaw(token) }
            return 0
        }
        // A handle that could not write has nothing of its own to make durable (qemu-img info,
        // blkid and the like close without a data sync).
        guard case .disk(_, _, writable: true) = file(info) else { return 0 }
        return fsync(info)
    }

    func fsync(_ info: UnsafeMutablePointer<fuse_file_info>?) -> Int32 {
        guard case .disk(let disk, _, _) = file(info) else { return 0 }
        do {
            try disk.flush()
        } catch {
            log("sandbox \(sandbox.record.name): \(error.description)")
            return -EIO
        }
        return 0
    }

    func fallocate(_ mode: Int32, _ offset: off_t, _ length: off_t, _ info: UnsafeMutablePointer<fuse_file_info>?) -> Int32 {
        guard case .disk(let disk, _, _) = file(info), offset >= 0, length >= 0 else { return -EBADF }
        let keepSize: Int32 = 1, punchHole: Int32 = 2, zeroRange: Int32 = 0x10
        if mode == 0 || mode == keepSize {
            // Allocation: every byte of the disk exists; room for it in the overlay is reserved,
            // as the caller (posix_fallocate) expects later writes there not to meet ENOSPC.
            guard UInt64(offset) + UInt64(length) <= disk.size else { return -ENOSPC }
            do {
                // Where the overlay's filesystem cannot reserve, success as before: EOPNOTSUPP would
                // make glibc write a byte into every block, copying the whole range into the overlay.
                _ = try disk.reserve(at: UInt64(offset), length: UInt64(length))
                return 0
            } catch {
                if case .system(let cause) = error { return -cause.errno }
                return -EIO
            }
        }
        guard mode & (punchHole | zeroRange) != 0 else { return -EOPNOTSUPP }
        // Zeroing past the end without KEEP_SIZE would grow the file in the kernel's view.
        if mode & keepSize == 0 && UInt64(offset) + UInt64(length) > disk.size { return -ENOSPC }
        let end = min(UInt64(offset) + UInt64(length), disk.size)
        guard UInt64(offset) < end else { return 0 }
        do {
            try disk.zero(at: UInt64(offset), length: end - UInt64(offset))
        } catch {
            log("sandbox \(sandbox.record.name): \(error.description)")
            return -EIO
        }
        return 0
    }

    func truncate(_ path: UnsafePointer<CChar>?, _ size: off_t) -> Int32 {
        guard let node = resolve(path) else { return -ENOENT }
        guard case .disk(let disk, let vhd) = node else { return -EACCES }
        // A disk's size is the point's: only a no-op resize (O_TRUNC of tools that check) is fine.
        guard size >= 0 else { return -EINVAL }
        return UInt64(size) == disk.size + (vhd ? UInt64(VHDFooter.size) : 0) ? 0 : -EPERM
    }

    func lseek(_ offset: off_t, _ whence: Int32, _ info: UnsafeMutablePointer<fuse_file_info>?) -> off_t {
        guard offset >= 0 else { return off_t(-EINVAL) }
        guard case .disk(let disk, let footer, _) = file(info) else { return off_t(-EINVAL) }
        let extra = UInt64(footer?.count ?? 0)
        let total = disk.size + extra
        let position = UInt64(offset)
        guard position < total else { return off_t(-ENXIO) }
        guard position < disk.size else { return whence == 3 ? offset : off_t(total) }
        // Pages written but not yet sent are invisible here: while the disk is open for writing,
        // all of it is data (a copy that follows the holes must not skip written blocks).
        let writing = files.withLock { $0.values.contains { if case .disk(let d, _, writable: true) = $0 { d === disk } else { false } } }
        if writing {
            return whence == 3 ? offset : whence == 4 ? off_t(total) : off_t(-EINVAL)
        }
        do {
            switch whence {
            case 3:
                if let data = try disk.nextData(from: position) { return off_t(data) }
                return extra > 0 ? off_t(disk.size) : off_t(-ENXIO)
            case 4:
                let hole = try disk.nextHole(from: position)
                return hole == disk.size && extra > 0 ? off_t(total) : off_t(hole)
            default:
                return off_t(-EINVAL)
            }
        } catch {
            log("sandbox \(sandbox.record.name): \(error.description)")
            return off_t(-EIO)
        }
    }

    func statfs(_ st: UnsafeMutablePointer<statvfs>?) -> Int32 {
        guard let st else { return -EINVAL }
        st.pointee = statvfs()
        st.pointee.f_bsize = UInt(SandboxDisk.blockSize)
        st.pointee.f_frsize = UInt(SandboxDisk.blockSize)
        st.pointee.f_namemax = 255
        return 0
    }
}

/// Whether a freeze opened through `.lifeboat-freeze` still holds (it expires when writes
/// could not wait any longer).
final class FreezeHold: Sendable {
    let held = Atomic<Bool>(true)
}

/// The server of the sandbox this callback serves.
private func sandboxServer() -> SandboxServer? {
    guard let data = fuse_get_context()?.pointee.private_data else { return nil }
    return Unmanaged<SandboxServer>.fromOpaque(data).takeUnretainedValue()
}
