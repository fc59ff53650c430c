#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// A file open twice: buffered, and where the filesystem allows it with O_DIRECT, which large
/// aligned reads and writes use. The flag is never toggled on a shared descriptor, so threads
/// cannot turn each other's direct writes into buffered ones.
public final class UncachedFile: Sendable {
    public let buffered: SystemFile
    private let direct: SystemFile?
    private let directRefused = Atomic<Bool>(false)
    private let closed = Atomic<Bool>(false)

    public init(_ path: String, _ mode: SystemFile.Mode) throws(SystemError) {
        buffered = try SystemFile.open(path, mode)
        var readOnly = false
        if case .readOnly = mode { readOnly = true }
        var second = try? SystemFile.open(path, readOnly ? .readOnly : .readWrite)
        // The name is looked up twice: the second descriptor must be the same file (not one
        // renamed over it, or a device a link was pointed at in between), or it is not used.
        if let opened = second {
            let same = (try? buffered.status()).flatMap { a in (try? opened.status()).map { b in a.st_dev == b.st_dev && a.st_ino == b.st_ino } }
            if same != true {
                opened.close()
                second = nil
            }
        }
        if let second, second.setDirect(true) {
            direct = second
        } else {
            second?.close()   // the filesystem has no O_DIRECT (tmpfs before 6.6)
            direct = nil
        }
    }

    public var path: String { buffered.path }

    /// Closes both descriptors, once (a second call does nothing).
    public func close() {
        guard !closed.exchange(true, ordering: .relaxed) else { return }
        buffered.close()
        direct?.close()
    }

    private func descriptor(_ base: UnsafeRawPointer?, count: Int, offset: UInt64) -> SystemFile {
        let a = SystemFile.directAlignment
        guard let direct, !directRefused.load(ordering: .relaxed), let base,
              Int(bitPattern: base) % a == 0, count % a == 0, offset % UInt64(a) == 0 else { return buffered }
        return direct
    }

    /// Reads like `SystemFile.read(into:at:)`, with O_DIRECT when the request is aligned.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(SystemError) -> Int {
        let file = descriptor(buffer.baseAddress, count: buffer.count, offset: offset)
        do {
            return try file.read(into: buffer, at: offset)
        } catch where error.errno == EINVAL && file.fd != buffered.fd {
            directRefused.store(true, ordering: .relaxed)   // the filesystem refused O_DIRECT after all
            return try buffered.read(into: buffer, at: offset)
        }
    }

    /// Writes like `SystemFile.write(_:at:)`, with O_DIRECT when the request is aligned; of a
    /// request whose length is not (a disk's last bytes), the aligned head.
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(SystemError) {
        let head = buffer.count / SystemFile.directAlignment * SystemFile.directAlignment
        if head > 0 && head < buffer.count {
            try write(UnsafeRawBufferPointer(rebasing: buffer[0..<head]), at: offset)
            return try write(UnsafeRawBufferPointer(rebasing: buffer[head...]), at: offset + UInt64(head))
        }
        let file = descriptor(buffer.baseAddress, count: buffer.count, offset: offset)
        do {
            try file.write(buffer, at: offset)
        } catch where error.errno == EINVAL && file.fd != buffered.fd {
            directRefused.store(true, ordering: .relaxed)
            try buffered.write(buffer, at: offset)
        }
    }
}
