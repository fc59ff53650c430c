import CFuse
import Foundation
import Glibc
import GuestFiles
import Synchronization
import Vault
import VirtualDisk

/// The `<disk>.files` part of the mount: the readable volumes of a point's disk, and the files
/// inside each, read in user space by GuestFiles (nothing is mounted by the kernel). It holds
/// no filesystem logic: names, attributes and contents come from GuestFileSystem.
/// An errno for FUSE, as a Result's failure.
struct Errno: Error {
    let code: Int32
    init(_ code: Int32) { self.code = code }
}

final class GuestTree: Sendable {
    private struct Opened {
        var volumes: [GuestVolume]
        var filesystems: [String: any GuestFileSystem]
        var failures: [String: String]
    }

    private let vault: Vault
    private let cache: ChunkCache
    private let log: @Sendable (String) -> Void
    /// Per point and disk: its volumes and the filesystems opened so far (a few disks at a time).
    private let opened = Mutex<[String: Opened]>([:])
    private let order = Mutex<[String]>([])

    init(vault: Vault, cache: ChunkCache, log: @escaping @Sendable (String) -> Void) {
        self.vault = vault
        self.cache = cache
        self.log = log
    }

    /// A volume's directory name: LVM's "vg/lv" becomes "vg-lv".
    static func directoryName(_ volume: GuestVolume) -> [UInt8] {
        Array(volume.name.replacingOccurrences(of: "/", with: "-").utf8)
    }

    private func volumes(_ point: RecoveryPoint, _ disk: PointDisk) -> [GuestVolume] {
        let key = point.id + "/" + disk.name
        if let known = opened.withLock({ $0[key]?.volumes }) { return known }
        let reader = DiskReader(point: point, disk: disk, chunks: vault.chunks, cache: cache)
        let (found, warnings) = GuestVolumes.find(in: reader)
        for warning in warnings { log("\(point.label) disk \(disk.name): \(warning)") }
        let evicted: [String] = order.withLock { o in
            o.append(key)
            return o.count > 8 ? Array(o.prefix(o.count - 8)) : []
        }
        opened.withLock { m in
            if m[key] == nil { m[key] = Opened(volumes: found, filesystems: [:], failures: [:]) }
            for old in evicted { m[old] = nil }
        }
        if !evicted.isEmpty { order.withLock { $0.removeFirst(evicted.count) } }
        return found
    }

    private func filesystem(_ point: RecoveryPoint, _ disk: PointDisk, _ name: [UInt8]) -> Result<any GuestFileSystem, GuestFilesError>? {
        let key = point.id + "/" + disk.name
        guard let volume = volumes(point, disk).first(where: { GuestTree.directoryName($0) == name }) else { return nil }
        if let fs = opened.withLock({ $0[key]?.filesystems[volume.name] }) { return .success(fs) }
        do {
            let fs = try GuestVolumes.open(volume, label: "\(point.label) disk \(disk.name) volume \(volume.name)")
            opened.withLock { $0[key]?.filesystems[volume.name] = fs }
            for warning in fs.warnings { log(warning) }
            return .success(fs)
        } catch {
            // Logged once per volume: the directory is then empty, with EIO for its contents.
            let first = opened.withLock { m -> Bool in
                let seen = m[key]?.failures[volume.name] != nil
                m[key]?.failures[volume.name] = error.description
                return !seen
            }
            if first { log(error.description) }
            return .failure(error)
        }
    }

    enum Target {
        case volumes([GuestVolume])
        case entry(any GuestFileSystem, GuestDirectoryEntry)
    }

    /// Resolves the components after `<disk>.files`.
    func resolve(_ point: RecoveryPoint, _ disk: PointDisk, _ components: [[UInt8]]) -> Result<Target, Errno> {
        guard let first = components.first else { return .success(.volumes(volumes(point, disk))) }
        guard let opened = filesystem(point, disk, first) else { return .failure(Errno(ENOENT)) }
        let fs: any GuestFileSystem
        switch opened {
        case .success(let f): fs = f
        case .failure: return .failure(Errno(EIO))
        }
        var entry = GuestDirectoryEntry(name: [], inode: fs.rootInode, type: .directory)
        for name in components.dropFirst() {
            guard entry.type == .directory else { return .failure(Errno(ENOTDIR)) }
            do {
                guard let next = try fs.lookup(name, in: entry.inode) else { return .failure(Errno(ENOENT)) }
                entry = next
            } catch {
                log(error.description)
                return .failure(Errno(EIO))
            }
        }
        return .success(.entry(fs, entry))
    }

    func getattr(_ target: Target, time: Date, _ st: UnsafeMutablePointer<stat>) -> Int32 {
        switch target {
        case .volumes(let volumes):
            st.pointee.st_mode = S_IFDIR | 0o555
            st.pointee.st_nlink = nlink_t(2 + volumes.count)
            let seconds = timespec(tv_sec: Int(time.timeIntervalSince1970), tv_nsec: 0)
            st.pointee.st_mtim = seconds
            st.pointee.st_atim = seconds
            st.pointee.st_ctim = seconds
            return 0
        case .entry(let fs, let entry):
            let info: GuestFileInfo
            do {
                info = try fs.stat(entry.inode)
            } catch {
                log(error.description)
                return -EIO
            }
            let types: [GuestFileType: mode_t] = [.regular: S_IFREG, .directory: S_IFDIR, .symlink: S_IFLNK, .characterDevice: S_IFCHR,
                                                  .blockDevice: S_IFBLK, .fifo: S_IFIFO, .socket: S_IFSOCK]
            // Read-only whatever the guest's bits say: writes are refused anyway.
            st.pointee.st_mode = (types[info.type] ?? S_IFREG) | mode_t(info.permissions & ~0o222)
            st.pointee.st_nlink = nlink_t(max(1, info.links))
            st.pointee.st_uid = info.uid
            st.pointee.st_gid = info.gid
            st.pointee.st_size = off_t(clamping: info.size)
            st.pointee.st_blocks = blkcnt_t(clamping: info.size / 512 + (info.size % 512 == 0 ? 0 : 1))
            st.pointee.st_ino = ino_t(info.inode)
            st.pointee.st_rdev = dev_t(info.device)
            st.pointee.st_atim = timespec(tv_sec: Int(info.accessed.seconds), tv_nsec: Int(info.accessed.nanoseconds))
            st.pointee.st_mtim = timespec(tv_sec: Int(info.modified.seconds), tv_nsec: Int(info.modified.nanoseconds))
            st.pointee.st_ctim = timespec(tv_sec: Int(info.changed.seconds), tv_nsec: Int(info.changed.nanoseconds))
            return 0
        }
    }

    /// Lists a directory. With `plus` (the kernel asked for READDIRPLUS) each entry carries its
    /// attributes, which spares the kernel a lookup per name: `ls -l` of 10 000 files.
    func readdir(_ target: Target, _ buffer: UnsafeMutableRawPointer?, _ filler: fuse_fill_dir_t, plus: Bool, time: Date) -> Int32 {
        var entries: [(name: [UInt8], target: Target?)]
        switch target {
        case .volumes(let volumes): entries = volumes.map { (GuestTree.directoryName($0), nil) }
        case .entry(let fs, let entry):
            guard entry.type == .directory else { return -ENOTDIR }
            do {
                // Names a kernel cannot take ('/', NUL, "." and "..") are left out of the listing.
                entries = try fs.list(entry.inode).filter(\.isSafe).map { ($0.name, .entry(fs, $0)) }
            } catch {
                log(error.description)
                return -EIO
            }
        }
        for (name, child) in [(Array(".".utf8), nil), (Array("..".utf8), nil)] + entries {
            var st = stat()
            let withAttributes = plus && child.map { getattr($0, time: time, &st) == 0 } == true
            let full = withUnsafePointer(to: &st) { attributes in
                (name + [0]).withUnsafeBufferPointer { c in
                    c.withMemoryRebound(to: CChar.self) {
                        filler(buffer, $0.baseAddress, withAttributes ? attributes : nil, 0, fuse_fill_dir_flags(withAttributes ? 2 : 0))
                    }
                }
            }
            if full != 0 { break }
        }
        return 0
    }

    func readlink(_ target: Target) -> Result<[UInt8], Errno> {
        guard case .entry(let fs, let entry) = target else { return .failure(Errno(EINVAL)) }
        guard entry.type == .symlink else { return .failure(Errno(EINVAL)) }
        do {
            return .success(try fs.readlink(entry.inode))
        } catch {
            log(error.description)
            return .failure(Errno(EIO))
        }
    }

    func read(_ fs: any GuestFileSystem, inode: UInt64, into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Int32 {
        var done = 0
        while done < buffer.count {
            do {
                let n = try fs.read(inode, into: UnsafeMutableRawBufferPointer(rebasing: buffer[done...]), at: offset + UInt64(done))
                if n == 0 { break }
                done += n
            } catch {
                log(error.description)
                return -EIO
            }
        }
        return Int32(done)
    }

}
