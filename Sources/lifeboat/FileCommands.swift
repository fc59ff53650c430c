import ArgumentParser
import Foundation
import Glibc
import GuestFiles
import SystemIO
import Vault

/// `POINT[:DISK[:VOLUME]]:/PATH`. Point times hold colons too, so the split is tried from the
/// longest point spec down: the first reading whose point exists wins.
struct GuestPath {
    var files: PointFiles
    var path: String

    static func open(_ text: String, vault: Vault) throws -> GuestPath {
        guard let slash = text.range(of: ":/") else {
            throw VaultError.invalidArgument("\"\(text)\" names no path: write POINT:/path, e.g. web01@latest:/etc/hosts or web01@latest:os:p2:/etc/hosts")
        }
        let path = String(text[text.index(after: slash.lowerBound)...])
        let parts = text[..<slash.lowerBound].split(separator: ":", omittingEmptySubsequences: false).map(String.init)
        var lastError: Error? = nil
        for names in 0...min(2, parts.count - 1) {
            let pointSpec = parts[0..<(parts.count - names)].joined(separator: ":")
            let point: RecoveryPoint
            do {
                point = try vault.point(pointSpec)
            } catch {
                if lastError == nil { lastError = error }
                continue
            }
            let rest = Array(parts[(parts.count - names)...])
            var disk: String? = nil, volume: String? = nil
            if rest.count == 2 {
                (disk, volume) = (rest[0], rest[1])
            } else if rest.count == 1 {
                // One name: a disk if the point has it, else a volume of the only disk.
                if point.disks.contains(where: { $0.name == rest[0] }) { disk = rest[0] } else { volume = rest[0] }
            }
            let files = try PointFiles.open(vault: vault, point: point, disk: disk, volume: volume)
            for warning in files.warnings { Terminal.warning(warning) }
            return GuestPath(files: files, path: path)
        }
        throw lastError ?? VaultError.invalidArgument("cannot read \"\(text)\"")
    }
}

struct FileEntry: Codable {
    var name: String
    var path: String
    var type: GuestFileType
    var mode: String
    var permissions: UInt32
    var uid: UInt32
    var gid: UInt32
    var size: UInt64
    var links: UInt32
    var modified: String
    var target: String?
}

func modeString(_ info: GuestFileInfo) -> String {
    let kinds: [GuestFileType: Character] = [.regular: "-", .directory: "d", .symlink: "l", .characterDevice: "c",
                                             .blockDevice: "b", .fifo: "p", .socket: "s"]
    var text = String(kinds[info.type] ?? "?")
    let p = info.permissions
    for (shift, special, mark) in [(6, UInt32(0o4000), Character("s")), (3, UInt32(0o2000), Character("s")), (0, UInt32(0o1000), Character("t"))] {
        let bits = (p >> UInt32(shift)) & 7
        text.append(bits & 4 != 0 ? "r" : "-")
        text.append(bits & 2 != 0 ? "w" : "-")
        if p & special != 0 {
            text.append(bits & 1 != 0 ? mark : Character(mark.uppercased()))
        } else {
            text.append(bits & 1 != 0 ? "x" : "-")
        }
    }
    return text
}

/// "2026-03-01T12:00:00Z", as Timestamp.format writes it, without building a date formatter
/// per call (which made `ls -l` of 10 000 files take most of a second).
func timeString(_ time: GuestTime) -> String {
    var seconds = time_t(clamping: time.seconds)
    var parts = tm()
    guard gmtime_r(&seconds, &parts) != nil else { return "?" }
    func two(_ n: Int32) -> String { n < 10 ? "0\(n)" : "\(n)" }
    let year = Int(parts.tm_year) + 1900
    let yearText = year >= 0 && year < 1000 ? String(repeating: "0", count: 4 - String(year).count) + String(year) : String(year)
    return "\(yearText)-\(two(parts.tm_mon + 1))-\(two(parts.tm_mday))T\(two(parts.tm_hour)):\(two(parts.tm_min)):\(two(parts.tm_sec))Z"
}

struct Ls: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ls",
        abstract: "List files inside a point's guest filesystem (ext2/3/4, FAT), without restoring or mounting.",
        discussion: """
        POINT:/PATH, or POINT:DISK:VOLUME:/PATH when the point has several disks or filesystems
        (volumes are p1, p2, ... for partitions, vg/lv for LVM volumes, disk for a filesystem on
        the whole disk). The image is read in user space: nothing is mounted, root is not needed.

        Example:
          lifeboat ls web01@latest:/etc
          lifeboat ls -l web01@latest:os:p2:/var/log --json
        """)

    @OptionGroup var vault: VaultOptions
    @Argument(help: "POINT[:DISK[:VOLUME]]:/PATH") var location: String
    @Flag(name: .short, help: "Long listing: mode, links, owner, size, time.") var long = false
    @Flag(help: "Print JSON.") var json = false

    func run() throws {
        try report {
            let guest = try GuestPath.open(location, vault: try vault.open())
            let fs = guest.files.fs
            let entry = try fs.resolve(guest.path, followLast: true)
            var shown: [(GuestDirectoryEntry, GuestFileInfo?)] = []
            var failures: [String] = []
            if entry.type == .directory {
                for child in try fs.list(entry.inode).sorted(by: { $0.name.lexicographicallyPrecedes($1.name) }) {
                    guard child.isSafe else {
                        // "a/b", ".", ".." in a damaged or crafted directory: named, not shown as a file.
                        failures.append("unsafe name \"\(child.text)\" (inode \(child.inode)) in the image; not shown")
                        continue
                    }
                    do {
                        shown.append((child, try fs.stat(child.inode)))
                    } catch {
                        failures.append("\(child.text): \(error)")
                        shown.append((child, nil))
                    }
                }
            } else {
                shown.append((entry, try fs.stat(entry.inode)))
            }
            let base = guest.path.hasSuffix("/") ? guest.path : guest.path + "/"
            let entries: [FileEntry] = shown.map { child, info in
                let target = info?.type == .symlink ? (try? fs.readlink(child.inode)).map { String(decoding: $0, as: UTF8.self) } : nil
                return FileEntry(name: child.text, path: entry.type == .directory ? base + child.text : guest.path, type: info?.type ?? child.type,
                                 mode: info.map(modeString) ?? "??????????", permissions: info?.permissions ?? 0,
                                 uid: info?.uid ?? 0, gid: info?.gid ?? 0, size: info?.size ?? 0, links: info?.links ?? 0,
                                 modified: info.map { timeString($0.modified) } ?? "", target: target)
            }
            if json {
                printJSON(entries)
            } else if long {
                let rows = entries.map { e in
                    [e.mode, "\(e.links)", "\(e.uid)", "\(e.gid)", "\(e.size)", e.modified, e.name + (e.target.map { " -> \($0)" } ?? "")]
                }
                if !rows.isEmpty { print(formatTable(rows), terminator: "") }
            } else {
                for e in entries { print(e.name) }
            }
            for failure in failures { Terminal.error(failure) }
            if !failures.isEmpty { throw ExitCode(4) }
        }
    }
}

struct Cat: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cat",
        abstract: "Write a file from inside a point's guest filesystem to standard output.",
        discussion: "Example:\n  lifeboat cat web01@latest:/etc/hosts")

    @OptionGroup var vault: VaultOptions
    @Argument(help: "POINT[:DISK[:VOLUME]]:/PATH") var location: String

    func run() throws {
        try report {
            let guest = try GuestPath.open(location, vault: try vault.open())
            let fs = guest.files.fs
            let entry = try fs.resolve(guest.path, followLast: true)
            let info = try fs.stat(entry.inode)
            guard info.type == .regular else { throw GuestFilesError.notAFile(path: guest.path) }
            // As restore-files: a size beyond the volume is damage, not gigabytes of zeros to print.
            guard info.size <= guest.files.volume.image.size else {
                throw GuestFilesError.corrupt(volume: guest.files.label, what: "\(guest.path) claims \(info.size) bytes, more than its volume (\(guest.files.volume.image.size))")
            }
            var buffer = [UInt8](repeating: 0, count: 1 << 20)
            var offset: UInt64 = 0
            let out = SystemFile(fd: 1, path: "standard output")
            while offset < info.size {
                let n: Int
                do {
                    n = try buffer.withMutableBytes { (raw) throws(GuestFilesError) in
                        try fs.read(entry.inode, into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<Int(min(UInt64(raw.count), info.size - offset))]), at: offset)
                    }
                } catch let error as GuestFilesError {
                    // Name the file: libext2fs speaks of inodes.
                    if case .corrupt(let volume, let what) = error { throw GuestFilesError.corrupt(volume: volume, what: "\(guest.path): \(what)") }
                    throw error
                }
                guard n > 0 else { throw GuestFilesError.corrupt(volume: guest.files.label, what: "\(guest.path) ends at byte \(offset) but claims \(info.size)") }
                try buffer.withBytes { (raw) throws(SystemError) in try out.writeSequential(UnsafeRawBufferPointer(rebasing: raw[0..<n])) }
                offset += UInt64(n)
            }
        }
    }
}

struct RestoreFiles: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "restore-files",
        abstract: "Copy a file or a directory tree out of a point's guest filesystem.",
        discussion: """
        Restores PATH under its own name into DIR (like `cp -a PATH DIR/`): modes, times,
        symbolic links (made, never followed), hard links, extended attributes (user.*; as root
        also security.* and trusted.*) and, as root, owners. Set-user/group-id bits, file
        capabilities and device nodes, which a compromised guest could plant to take over the
        host, are left out (and counted) unless --keep-privileges. Nothing in the image can make
        it write outside DIR. Existing names are refused unless --overwrite. Entries that cannot
        be restored are listed; the rest is restored, and the exit code is 4.

        Example:
          lifeboat restore-files web01@latest:/etc --to /tmp/restored
        """)

    @OptionGroup var vault: VaultOptions
    @Argument(help: "POINT[:DISK[:VOLUME]]:/PATH") var location: String
    @Option(help: ArgumentHelp("The directory to restore into (created if missing).", valueName: "dir")) var to: String
    @Flag(help: "Replace files that exist in DIR.") var overwrite = false
    @Flag(help: "Restore set-user/group-id bits, file capabilities and device nodes as they are in the image.")
    var keepPrivileges = false
    @Flag(help: "Print a JSON summary.") var json = false

    func run() throws {
        try report {
            installInterruptHandlers()
            let guest = try GuestPath.open(location, vault: try vault.open())
            var options = FileRestoreOptions()
            options.overwrite = overwrite
            options.keepPrivileges = keepPrivileges
            let line = ProgressLine("restore-files", enabled: Terminal.isInteractive && !json)
            let restore = FileRestore(fs: guest.files.fs, volumeSize: guest.files.volume.image.size, options: options) { p in
                line.update(done: p.bytesDone, total: p.bytesTotal)
            }
            let result = try restore.restore(guest.path, to: to)
            line.finish()
            if json {
                printJSON(result)
            } else {
                print("restored \(result.files) files, \(result.directories) directories, \(result.symlinks) links, \(result.hardLinks) hard links " +
                      "(\(formatBytes(result.bytes))) from \(guest.files.label):\(guest.path) into \(to) in \(String(format: "%.1f", result.seconds)) s")
            }
            if let leftOut = result.leftOut { Terminal.warning(leftOut) }
            for error in result.errors { Terminal.error(error) }
            if !result.errors.isEmpty { throw ExitCode(4) }
        }
    }
}
