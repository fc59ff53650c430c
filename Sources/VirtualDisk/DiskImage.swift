import SystemIO

/// Random-access read-only bytes of a disk: a point's disk, a sandbox's, a partition of either,
/// a logical volume. Partition tables, LVM and the guest filesystems read through this.
public protocol DiskImage: Sendable {
    var size: UInt64 { get }
    /// Reads up to `buffer.count` bytes at `offset`; fewer only at the end.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(VirtualDiskError) -> Int
}

extension DiskReader: DiskImage {}

/// A range of another image (a partition, a logical volume's linear segment).
public struct DiskSlice: DiskImage {
    public let base: any DiskImage
    public let offset: UInt64
    public let size: UInt64

    public init(_ base: any DiskImage, offset: UInt64, size: UInt64) {
        self.base = base
        self.offset = offset
        self.size = size
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(VirtualDiskError) -> Int {
        guard offset < size else { return 0 }
        let n = Int(min(UInt64(buffer.count), size - offset))
        return try base.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n]), at: self.offset + offset)
    }
}

extension DiskImage {
    /// Exactly `count` bytes at `offset`, or an error naming what ended early.
    public func bytes(at offset: UInt64, count: Int, what: String) throws(VirtualDiskError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        let n = try out.withMutableBytes { (raw) throws(VirtualDiskError) in try read(into: raw, at: offset) }
        guard n == count else { throw .outOfRange(disk: what, offset: offset + UInt64(n), size: size) }
        return out
    }
}

/// A disk image in a plain file or block device (tests, and images outside the vault).
public final class FileImage: DiskImage {
    let file: SystemFile
    public let size: UInt64

    public init(path: String) throws(SystemError) {
        file = try SystemFile.open(path, .readOnly)
        size = try file.size()
    }

    deinit { file.close() }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(VirtualDiskError) -> Int {
        guard offset < size else { return 0 }
        let n = Int(min(UInt64(buffer.count), size - offset))
        do {
            return try file.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n]), at: offset)
        } catch {
            throw .damaged(point: file.path, disk: file.path, offset: offset, cause: error.description)
        }
    }
}
