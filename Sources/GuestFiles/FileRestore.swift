import Foundation
import Glibc
import SystemIO

public struct FileRestoreOptions: Sendable {
    public var overwrite = false
    /// Owners are restored only when the process may (root).
    public var restoreOwners = getuid() == 0
    /// Set-user-id and set-group-id bits of files, file capabilities (security.capability) and
    /// device nodes: what a compromised guest would plant to take the host over once its files
    /// are restored there by root. Left out unless asked for; the report counts what was.
    public var keepPrivileges = false
    public init() {}
}

public struct FileRestoreProgress: Sendable {
    public var bytesDone: UInt64
    public var bytesTotal: UInt64
    public var files: Int
}

public struct FileRestoreReport: Codable, Sendable {
    public var files: Int
    public var directories: Int
    public var symlinks: Int
    public var hardLinks: Int
    public var special: Int
    public var bytes: UInt64
    public var seconds: Double
    /// One sentence per entry that could not be restored; the rest was.
    public var errors: [String]
    /// Set-id bits cleared, file capabilities and device nodes left out (see `keepPrivileges`).
    public var setIDBitsCleared = 0
    public var capabilitiesLeftOut = 0
    public var deviceNodesLeftOut = 0

    /// One sentence on what was left out for safety, if anything.
    public var leftOut: String? {
        var parts: [String] = []
        if setIDBitsCleared > 0 { parts.append("set-user/group-id bits cleared on \(setIDBitsCleared) files") }
        if capabilitiesLeftOut > 0 { parts.append("\(capabilitiesLeftOut) file capabilities left out") }
        if deviceNodesLeftOut > 0 { parts.append("\(deviceNodesLeftOut) device nodes left out") }
        return parts.isEmpty ? nil : parts.joined(separator: ", ") + " (--keep-privileges restores them)"
    }
}

/// Copies a file or a tree out of a guest filesystem into a local directory, with modes, times,
/// symbolic links, hard links, extended attributes and (as root) owners.
///
/// The guest filesystem is untrusted. Everything is created relative to directory descriptors
/// this restore opened itself, with O_NOFOLLOW and O_EXCL (or an explicit replace), so no name
/// or link in the image can make it write outside the target: names with '/', ".", ".." or NUL
/// are refused, symbolic links are created, never followed, a directory met twice (a loop) is
/// refused, and a file is read only up to the size it claims, which must fit in the volume.
public final class FileRestore {
    let fs: any GuestFileSystem
    let options: FileRestoreOptions
    let volumeSize: UInt64
    let progress: (FileRestoreProgress) -> Void
    private var report = FileRestoreReport(files: 0, directories: 0, symlinks: 0, hardLinks: 0, special: 0, bytes: 0, seconds: 0, errors: [])
    private var total: UInt64 = 0
    /// Restored paths of inodes with several links: later names become hard links.
    private var linked: [UInt64: (directory: Int32, name: [UInt8], path: String)] = [:]
    private var visiting = Set<UInt64>()
    /// Inodes with one link restored so far.
    private var restoredOnce = Set<UInt64>()
    /// Directories restored so far: a directory has one name in a sound filesystem, and one
    /// linked from several places (crafted) would multiply the restore with every level.
    private var restoredDirectories: [UInt64: String] = [:]
    private var openDirectories: [Int32] = []
    /// The one duplicate kept of each target directory that holds a hard-linked file, by the
    /// directory's device and inode (descriptor numbers are reused once a directory is closed).
    private var linkDirectories: [[UInt64]: Int32] = [:]
    private var buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
    private var lastProgress = Date.distantPast

    public init(fs: any GuestFileSystem, volumeSize: UInt64, options: FileRestoreOptions,
                progress: @escaping (FileRestoreProgress) -> Void = { _ in }) {
        self.fs = fs
        self.volumeSize = volumeSize
        self.options = options
        self.progress = progress
    }

    deinit {
        buffer.deallocate()
        for fd in openDirectories { close(fd) }
    }

    /// Restores `path` (a file, link or directory of the guest) into the directory `target`,
    /// under its own name (like `cp -a PATH TARGET/`).
    public func restore(_ path: String, to target: String) throws(GuestFilesError) -> FileRestoreReport {
        let started = Date()
        let entry = try fs.resolve(path)
        do {
            try FileSystem.createDirectories(target)
        } catch { throw .local(error) }
        // A descriptor stays open for each directory holding a hard-linked file (a Nix store or
        // a snapshot tree has thousands): allow as many as the hard limit does.
        var limit = rlimit()
        if getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max
            _ = setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
        }
        let top = Glibc.open(target, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard top >= 0 else { throw .local(SystemError("open the target directory", path: target)) }
        defer { close(top) }
        var name = entry.name
        if name.isEmpty { name = Array("root".utf8) }  // the filesystem's root directory
        var counted = Set<UInt64>()
        total = (try? size(of: entry, depth: 0, counted: &counted)) ?? 0
        restoreEntry(GuestDirectoryEntry(name: name, inode: entry.inode, type: entry.type), in: top,
                     display: target + "/" + String(decoding: name, as: UTF8.self))
        // SIGINT/SIGTERM: what was restored stays; the command says it was interrupted.
        guard !Cancellation.requested else { throw .local(SystemError("restore-files interrupted", path: target, errno: EINTR)) }
        report.seconds = Date().timeIntervalSince(started)
        progress(FileRestoreProgress(bytesDone: report.bytes, bytesTotal: max(total, report.bytes), files: report.files))
        return report
    }

    /// Bytes of regular files under an entry (for the progress bar). Each directory and file
    /// is counted once: a directory linked into its own subtree (twice, in a crafted image)
    /// would otherwise make this walk exponential.
    private func size(of entry: GuestDirectoryEntry, depth: Int, counted: inout Set<UInt64>) throws(GuestFilesError) -> UInt64 {
        guard depth < 256, !Cancellation.requested, counted.insert(entry.inode).inserted, counted.count < 10_000_000 else { return 0 }
        switch entry.type {
        case .regular:
            let size = try fs.stat(entry.inode).size
            return size <= volumeSize ? size : 0
        case .directory:
            var sum: UInt64 = 0
            for child in try fs.list(entry.inode) where child.type == .regular || child.type == .directory {
                let (total, overflow) = sum.addingReportingOverflow((try? size(of: child, depth: depth + 1, counted: &counted)) ?? 0)
                sum = overflow ? .max : total
            }
            return sum
        default:
            return 0
        }
    }

    private func fail(_ display: String, _ why: String) {
        report.errors.append("\(display): \(why)")
    }

    private func restoreEntry(_ entry: GuestDirectoryEntry, in directory: Int32, display: String) {
        guard !Cancellation.requested else { return }
        guard entry.isSafe else {
            fail(display, "unsafe name \"\(entry.text)\" in the image; skipped")
            return
        }
        // Each level holds a descriptor and a stack frame: a crafted chain of directories must
        // not exhaust either.
        guard display.utf8.lazy.filter({ $0 == UInt8(ascii: "/") }).count <= 256 else {
            fail(display, "more than 256 directories deep; skipped")
            return
        }
        let info: GuestFileInfo
        do {
            info = try fs.stat(entry.inode)
        } catch {
            fail(display, error.description)
            return
        }
        // A crafted image could give one big file a link count of 1 and a hundred thousand names:
        // a second name of such an inode is refused, not copied again.
        if info.type != .directory && info.links <= 1 && !restoredOnce.insert(entry.inode).inserted {
            fail(display, "inode \(entry.inode) has one link but another name in the image (damaged or crafted); skipped")
            return
        }
        if info.type != .directory && info.links > 1, let first = linked[entry.inode] {
            do throws(GuestFilesError) {
                _ = try prepare(entry.name, in: directory, display: display, directoryWanted: false)
            } catch {
                fail(display, error.description)
                return
            }
            if entry.name.withCString({ name in first.name.withCString { linkat(first.directory, $0, directory, name, 0) } }) == 0 {
                report.hardLinks += 1
            } else {
                fail(display, "cannot link to \(first.path): \(String(cString: strerror(errno)))")
            }
            return
        }
        do throws(GuestFilesError) {
            switch info.type {
            case .directory: try restoreDirectory(entry, info, in: directory, display: display)
            case .regular: try restoreFile(entry, info, in: directory, display: display)
            case .symlink: try restoreSymlink(entry, info, in: directory, display: display)
            default: try restoreSpecial(entry, info, in: directory, display: display)
            }
        } catch {
            fail(display, error.description)
            return
        }
        if info.type != .directory && info.links > 1 {
            // The descriptor must stay open for later links: one duplicate per directory.
            var st = stat()
            let parent = fstat(directory, &st) == 0 ? [UInt64(st.st_dev), UInt64(st.st_ino)] : []
            var copy = parent.isEmpty ? -1 : linkDirectories[parent] ?? -1
            if copy < 0 {
                copy = dup(directory)
                if copy >= 0 {
                    openDirectories.append(copy)
                    if !parent.isEmpty { linkDirectories[parent] = copy }
                }
            }
            if copy >= 0 { linked[entry.inode] = (copy, entry.name, display) }
        }
    }

    /// Makes room for a name: refuses an existing one unless overwriting (then removes a file or
    /// link; an existing directory is merged into).
    private func prepare(_ name: [UInt8], in directory: Int32, display: String, directoryWanted: Bool) throws(GuestFilesError) -> Bool {
        var st = stat()
        let exists = name.withCString { fstatat(directory, $0, &st, AT_SYMLINK_NOFOLLOW) } == 0
        guard exists else { return false }
        guard options.overwrite else { throw .exists(path: display) }
        if directoryWanted && (st.st_mode & S_IFMT) == S_IFDIR { return true }
        let flags = (st.st_mode & S_IFMT) == S_IFDIR ? AT_REMOVEDIR : 0
        guard name.withCString({ unlinkat(directory, $0, flags) }) == 0 else {
            throw .local(SystemError("replace", path: display))
        }
        return false
    }

    private func restoreDirectory(_ entry: GuestDirectoryEntry, _ info: GuestFileInfo, in parent: Int32, display: String) throws(GuestFilesError) {
        guard visiting.insert(entry.inode).inserted else {
            throw .corrupt(volume: display, what: "directory inode \(entry.inode) contains itself (a loop); skipped")
        }
        defer { visiting.remove(entry.inode) }
        if let earlier = restoredDirectories[entry.inode] {
            throw .corrupt(volume: display, what: "directory inode \(entry.inode) was already restored as \(earlier) (a directory with two names); skipped")
        }
        restoredDirectories[entry.inode] = display
        let merge = try prepare(entry.name, in: parent, display: display, directoryWanted: true)
        if !merge {
            guard entry.name.withCString({ mkdirat(parent, $0, 0o700) }) == 0 else {
                throw .local(SystemError("create the directory", path: display))
            }
        }
        let fd = entry.name.withCString { openat(parent, $0, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) }
        guard fd >= 0 else { throw .local(SystemError("open the directory", path: display)) }
        defer { close(fd) }
        report.directories += 1
        let children: [GuestDirectoryEntry]
        do {
            children = try fs.list(entry.inode)
        } catch {
            fail(display, error.description)
            children = []
        }
        for child in children {
            restoreEntry(child, in: fd, display: display + "/" + child.text)
        }
        // The directory's own attributes last: its time would change with every entry made in it.
        applyAttributes(info, entry: entry, fd: fd, display: display)
    }

    private func restoreFile(_ entry: GuestDirectoryEntry, _ info: GuestFileInfo, in directory: Int32, display: String) throws(GuestFilesError) {
        guard info.size <= volumeSize else {
            throw .corrupt(volume: display, what: "the file claims \(info.size) bytes, more than its volume (\(volumeSize))")
        }
        _ = try prepare(entry.name, in: directory, display: display, directoryWanted: false)
        let fd = entry.name.withCString { openat(directory, $0, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600) }
        guard fd >= 0 else { throw .local(SystemError("create", path: display)) }
        defer { close(fd) }
        let file = SystemFile(fd: fd, path: display)
        var offset: UInt64 = 0
        // Holes stay holes: all-zero blocks are skipped, and the size is set at the end.
        while offset < info.size {
            guard !Cancellation.requested else { throw .local(SystemError("restore-files interrupted", path: display, errno: EINTR)) }
            let want = Int(min(UInt64(buffer.count), info.size - offset))
            let n = try fs.read(entry.inode, into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<want]), at: offset)
            guard n > 0 else { throw .corrupt(volume: display, what: "the file ends at byte \(offset) but claims \(info.size)") }
            var at = 0
            while at < n {
                let piece = min(4096, n - at)
                let part = UnsafeRawBufferPointer(rebasing: buffer[at..<(at + piece)])
                if !part.allSatisfy({ $0 == 0 }) {
                    do {
                        try file.write(part, at: offset + UInt64(at))
                    } catch { throw .local(error) }
                }
                at += piece
            }
            offset += UInt64(n)
            report.bytes += UInt64(n)
            tick()
        }
        do {
            try file.truncate(to: info.size)
        } catch { throw .local(error) }
        report.files += 1
        applyAttributes(info, entry: entry, fd: fd, display: display)
    }

    private func restoreSymlink(_ entry: GuestDirectoryEntry, _ info: GuestFileInfo, in directory: Int32, display: String) throws(GuestFilesError) {
        let target = try fs.readlink(entry.inode)
        guard !target.isEmpty, !target.contains(0) else { throw .corrupt(volume: display, what: "the link's target is empty or holds NUL") }
        _ = try prepare(entry.name, in: directory, display: display, directoryWanted: false)
        // The link is made as it is and never followed here; where it points is the guest's business.
        guard target.withCString({ t in entry.name.withCString { symlinkat(t, directory, $0) } }) == 0 else {
            throw .local(SystemError("create the symbolic link", path: display))
        }
        report.symlinks += 1
        if options.restoreOwners {
            _ = entry.name.withCString { fchownat(directory, $0, info.uid, info.gid, AT_SYMLINK_NOFOLLOW) }
        }
        var times = [timespec(tv_sec: Int(info.accessed.seconds), tv_nsec: Int(info.accessed.nanoseconds)),
                     timespec(tv_sec: Int(info.modified.seconds), tv_nsec: Int(info.modified.nanoseconds))]
        _ = entry.name.withCString { utimensat(directory, $0, &times, AT_SYMLINK_NOFOLLOW) }
    }

    private func restoreSpecial(_ entry: GuestDirectoryEntry, _ info: GuestFileInfo, in directory: Int32, display: String) throws(GuestFilesError) {
        let type: mode_t
        switch info.type {
        case .fifo: type = S_IFIFO
        case .characterDevice: type = S_IFCHR
        case .blockDevice: type = S_IFBLK
        case .socket: type = S_IFSOCK
        default: return
        }
        if (info.type == .characterDevice || info.type == .blockDevice) && !options.keepPrivileges {
            report.deviceNodesLeftOut += 1
            return
        }
        guard getuid() == 0 || info.type == .fifo else {
            fail(display, "device nodes are restored only as root; skipped")
            return
        }
        _ = try prepare(entry.name, in: directory, display: display, directoryWanted: false)
        guard entry.name.withCString({ mknodat(directory, $0, type | 0o600, dev_t(info.device)) }) == 0 else {
            throw .local(SystemError("create the special file", path: display))
        }
        report.special += 1
        if options.restoreOwners { _ = entry.name.withCString { fchownat(directory, $0, info.uid, info.gid, AT_SYMLINK_NOFOLLOW) } }
        _ = entry.name.withCString { fchmodat(directory, $0, mode_t(info.permissions), AT_SYMLINK_NOFOLLOW) }
        var times = [timespec(tv_sec: Int(info.accessed.seconds), tv_nsec: Int(info.accessed.nanoseconds)),
                     timespec(tv_sec: Int(info.modified.seconds), tv_nsec: Int(info.modified.nanoseconds))]
        _ = entry.name.withCString { utimensat(directory, $0, &times, AT_SYMLINK_NOFOLLOW) }
    }

    /// Owner, extended attributes, mode and times of a file or directory, in that order (chown
    /// clears setuid bits; the times last).
    private func applyAttributes(_ info: GuestFileInfo, entry: GuestDirectoryEntry, fd: Int32, display: String) {
        if options.restoreOwners, fchown(fd, info.uid, info.gid) != 0 {
            fail(display, "cannot set the owner: \(String(cString: strerror(errno)))")
        }
        if let attributes = try? fs.extendedAttributes(entry.inode) {
            for (name, value) in attributes {
                // security.* and trusted.* need privileges; system.* are ACLs libext2fs encodes its own way.
                guard name.hasPrefix("user.") || (getuid() == 0 && (name.hasPrefix("security.") || name.hasPrefix("trusted."))) else { continue }
                if name == "security.capability" && !options.keepPrivileges {
                    report.capabilitiesLeftOut += 1
                    continue
                }
                if value.withUnsafeBytes({ lifeboat_fsetxattr(fd, name, $0.baseAddress, $0.count, 0) }) != 0 && errno != ENOTSUP {
                    fail(display, "cannot set the extended attribute \(name): \(String(cString: strerror(errno)))")
                }
            }
        }
        var mode = mode_t(info.permissions)
        if info.type != .directory && mode & 0o6000 != 0 && !options.keepPrivileges {
            mode &= ~mode_t(0o6000)
            report.setIDBitsCleared += 1
        }
        if fchmod(fd, mode) != 0 {
            fail(display, "cannot set the mode: \(String(cString: strerror(errno)))")
        }
        var times = [timespec(tv_sec: Int(info.accessed.seconds), tv_nsec: Int(info.accessed.nanoseconds)),
                     timespec(tv_sec: Int(info.modified.seconds), tv_nsec: Int(info.modified.nanoseconds))]
        if futimens(fd, &times) != 0 {
            fail(display, "cannot set the times: \(String(cString: strerror(errno)))")
        }
    }

    private func tick() {
        let now = Date()
        guard now.timeIntervalSince(lastProgress) >= 0.1 else { return }
        lastProgress = now
        progress(FileRestoreProgress(bytesDone: report.bytes, bytesTotal: max(total, report.bytes), files: report.files))
    }
}

extension Array where Element == UInt8 {
    /// Calls `body` with the bytes as a NUL-terminated C string.
    func withCString<R>(_ body: (UnsafePointer<CChar>) -> R) -> R {
        (self + [0]).withUnsafeBufferPointer { buffer in
            buffer.withMemoryRebound(to: CChar.self) { body($0.baseAddress!) }
        }
    }
}

// Glibc's module map leaves out <sys/xattr.h>.
@_silgen_name("fsetxattr")
func lifeboat_fsetxattr(_ fd: Int32, _ name: UnsafePointer<CChar>, _ value: UnsafeRawPointer?, _ size: Int, _ flags: Int32) -> Int32
