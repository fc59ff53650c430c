import Foundation
import SystemIO
import VirtualDisk

public enum GuestFilesError: LifeboatError {
    /// The filesystem's metadata is inconsistent (the image is damaged or crafted).
    case corrupt(volume: String, what: String)
    case notFound(path: String)
    case notADirectory(path: String)
    case notAFile(path: String)
    case tooManyLinks(path: String)
    case ambiguous(what: String, choices: [String])
    case unsupported(volume: String, what: String)
    case disk(VirtualDiskError)
    /// Restoring: the name exists in the target and --overwrite was not given.
    case exists(path: String)
    /// Restoring: the local side failed (permissions, space).
    case local(SystemError)

    public var description: String {
        switch self {
        case .corrupt(let volume, let what): return "\(volume): damaged filesystem metadata: \(what)"
        case .notFound(let path): return "\(path): no such file or directory"
        case .notADirectory(let path): return "\(path): not a directory"
        case .notAFile(let path): return "\(path): not a regular file"
        case .tooManyLinks(let path): return "\(path): too many levels of symbolic links"
        case .ambiguous(let what, let choices): return "\(what): \(choices.joined(separator: ", "))"
        case .unsupported(let volume, let what): return "\(volume): \(what) is not supported"
        case .disk(let error): return error.description
        case .exists(let path): return "\(path) already exists (use --overwrite to replace it)"
        case .local(let error): return error.description
        }
    }

    public var kind: FailureKind {
        switch self {
        case .corrupt: return .damaged
        case .notFound: return .notFound
        case .notADirectory, .notAFile, .tooManyLinks, .unsupported, .ambiguous: return .usage
        case .disk(let error): return error.kind
        case .exists: return .usage
        case .local(let error): return error.kind
        }
    }
}

public enum GuestFileType: String, Codable, Sendable {
    case regular, directory, symlink, characterDevice, blockDevice, fifo, socket
}

/// What `stat` says about a guest file.
public struct GuestFileInfo: Codable, Sendable, Equatable {
    public var inode: UInt64
    public var type: GuestFileType
    /// Permission bits with setuid, setgid and sticky (07777).
    public var permissions: UInt32
    public var uid: UInt32
    public var gid: UInt32
    public var size: UInt64
    public var links: UInt32
    /// Seconds since 1970 (UTC), with nanoseconds.
    public var accessed: GuestTime
    public var modified: GuestTime
    public var changed: GuestTime
    /// Device number of character and block devices.
    public var device: UInt64

    public init(inode: UInt64, type: GuestFileType, permissions: UInt32, uid: UInt32, gid: UInt32, size: UInt64, links: UInt32,
                accessed: GuestTime, modified: GuestTime, changed: GuestTime, device: UInt64 = 0) {
        self.inode = inode
        self.type = type
        self.permissions = permissions
        self.uid = uid
        self.gid = gid
        self.size = size
        self.links = links
        self.accessed = accessed
        self.modified = modified
        self.changed = changed
        self.device = device
    }
}

public struct GuestTime: Codable, Sendable, Equatable {
    public var seconds: Int64
    public var nanoseconds: UInt32

    public init(seconds: Int64, nanoseconds: UInt32 = 0) {
        self.seconds = seconds
        self.nanoseconds = nanoseconds
    }
}

/// A name in a directory. Guest names are bytes (Linux allows anything but '/' and NUL); they
/// are shown as UTF-8 with invalid sequences replaced, and restored as the bytes they are.
public struct GuestDirectoryEntry: Sendable {
    public var name: [UInt8]
    public var inode: UInt64
    public var type: GuestFileType

    public init(name: [UInt8], inode: UInt64, type: GuestFileType) {
        self.name = name
        self.inode = inode
        self.type = type
    }

    public var text: String { String(decoding: name, as: UTF8.self) }

    /// Names a restore must refuse: empty, ".", "..", or containing '/' or NUL.
    public var isSafe: Bool {
        !name.isEmpty && name != [46] && name != [46, 46] && !name.contains(47) && !name.contains(0)
    }
}

/// One read-only guest filesystem. Implementations must be safe from many threads (serialise
/// inside when the library underneath is not) and must never trust the image: every count,
/// offset and link they follow is checked, and what does not hold is `.corrupt`.
public protocol GuestFileSystem: AnyObject, Sendable {
    /// "ext4", "fat32", ...
    var kind: String { get }
    var label: String? { get }
    var rootInode: UInt64 { get }
    func stat(_ inode: UInt64) throws(GuestFilesError) -> GuestFileInfo
    /// The entries of a directory, without its own "." and "..". A damaged or crafted directory
    /// may hold other entries with names no restore may use ("a/b", ".", ".."): see `isSafe`.
    func list(_ directory: UInt64) throws(GuestFilesError) -> [GuestDirectoryEntry]
    func lookup(_ name: [UInt8], in directory: UInt64) throws(GuestFilesError) -> GuestDirectoryEntry?
    /// Reads up to `buffer.count` bytes of a regular file at `offset`; fewer only at its end.
    func read(_ inode: UInt64, into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(GuestFilesError) -> Int
    func readlink(_ inode: UInt64) throws(GuestFilesError) -> [UInt8]
    /// Extended attributes, name to value ("user.x", "security.selinux", ...).
    func extendedAttributes(_ inode: UInt64) throws(GuestFilesError) -> [(name: String, value: [UInt8])]
    /// What whoever reads this filesystem must be told (a journal that could not be replayed).
    var warnings: [String] { get }
}

extension GuestFileSystem {
    public var warnings: [String] { [] }
    public func extendedAttributes(_ inode: UInt64) throws(GuestFilesError) -> [(name: String, value: [UInt8])] { [] }

    /// Follows a path from the root. Symbolic links in the middle are followed inside this
    /// filesystem (absolute targets from its root), at most 40 of them; the last component's
    /// link is followed only when `followLast`.
    public func resolve(_ path: String, followLast: Bool = false) throws(GuestFilesError) -> GuestDirectoryEntry {
        var links = 0
        var pending = path.split(separator: "/", omittingEmptySubsequences: true).map { Array($0.utf8) }
        var stack: [GuestDirectoryEntry] = [GuestDirectoryEntry(name: [], inode: rootInode, type: .directory)]
        while !pending.isEmpty {
            let name = pending.removeFirst()
            if name == [46] { continue }
            if name == [46, 46] {
                if stack.count > 1 { stack.removeLast() }
                continue
            }
            guard let current = stack.last, current.type == .directory else { throw .notADirectory(path: path) }
            guard let entry = try lookup(name, in: current.inode) else { throw .notFound(path: path) }
            if entry.type == .symlink && (!pending.isEmpty || followLast) {
                links += 1
                guard links <= 40 else { throw .tooManyLinks(path: path) }
                let target = try readlink(entry.inode)
                if target.first == 47 { stack.removeSubrange(1...) }
                pending = target.split(separator: 47, omittingEmptySubsequences: true).map(Array.init) + pending
                continue
            }
            stack.append(entry)
        }
        return stack.last ?? GuestDirectoryEntry(name: [], inode: rootInode, type: .directory)
    }
}
