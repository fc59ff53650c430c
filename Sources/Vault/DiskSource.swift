import Glibc
import SystemIO

/// Where a backup reads a disk from.
public enum SourceSpec: Sendable, CustomStringConvertible {
    /// A regular file (holes found with SEEK_DATA/SEEK_HOLE are not read) or a block device.
    case path(String)
    case standardInput

    public init(_ text: String) {
        self = text == "-" ? .standardInput : .path(text)
    }

    public var description: String {
        switch self {
        case .path(let path): return path
        case .standardInput: return "standard input"
        }
    }
}

/// `n` rounded up to the O_DIRECT alignment, but never past `limit`.
func roundUp(_ n: Int, _ limit: Int) -> Int {
    let a = SystemFile.directAlignment
    return min((n + a - 1) / a * a, limit)
}

/// Reads a source in slot-aligned batches, bypassing the page cache where it can: a backup
/// reads each byte once, and filling the cache with it costs more than the read.
final class DiskSource {
    let spec: SourceSpec
    let file: SystemFile
    /// Known for files and devices; nil for standard input until the end.
    let size: UInt64?
    let sparse: Bool
    // Standard input only: how far it has been read, and whether it ended.
    private var position: UInt64 = 0
    private(set) var ended = false

    init(_ spec: SourceSpec) throws(VaultError) {
        self.spec = spec
        switch spec {
        case .standardInput:
            file = SystemFile(fd: 0, path: "standard input")
            size = nil
            sparse = false
        case .path(let path):
            do {
                file = try SystemFile.open(path, .readOnly)
                let st = try file.status()
                let type = st.st_mode & S_IFMT
                guard type == S_IFREG || type == S_IFBLK else {
                    file.close()
                    throw VaultError.invalidArgument("source \(path) is neither a regular file nor a block device")
                }
                size = try file.size()
                sparse = type == S_IFREG
                file.adviseSequential()
            } catch let error as SystemError {
                throw .source(error)
            } catch let error as VaultError {
                throw error
            } catch {
                throw .invalidArgument("\(error)")
            }
        }
    }

    func close() {
        if case .path = spec { file.close() }
    }

    /// Reads standard input: the next bytes, in order. Returns fewer than asked only at the end.
    func readNext(into buffer: UnsafeMutableRawBufferPointer, holes: inout [Bool]) throws(VaultError) -> Int {
        let n: Int
        do {
            n = try file.readSequential(into: buffer, position: position)
        } catch { throw .source(error) }
        position += UInt64(n)
        if n < buffer.count { ended = true }
        for i in holes.indices { holes[i] = false }
        return n
    }

    /// Reads the batch at `start` of a file or device (safe from several threads at once).
    /// Sets `holes` for slots that lie entirely in a hole of a sparse file (known zero, not read).
    func read(at start: UInt64, into buffer: UnsafeMutableRawBufferPointer, chunkSize: Int, holes: inout [Bool]) throws(VaultError) -> Int {
        guard let size else { return try readNext(into: buffer, holes: &holes) }
        let want = Int(min(UInt64(buffer.count), size - min(size, start)))
        if want == 0 { return 0 }
        let end = start + UInt64(want)
        if !sparse {
            let n: Int
            do {
                n = try file.readUncached(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<roundUp(want, buffer.count)]), at: start)
            } catch { throw .source(error) }
            guard n >= want else { throw .sourceShort(path: spec.description, expected: size, got: start + UInt64(n)) }
            for i in holes.indices { holes[i] = false }
            return want
        }
        // Only the data regions are read; the rest of the buffer is zero.
        for i in holes.indices { holes[i] = true }
        var cursor = start
        while cursor < end, let region = file.nextData(from: cursor, fileSize: size), region.start < end {
            if region.start > cursor {
                buffer.baseAddress!.advanced(by: Int(cursor - start)).initializeMemory(as: UInt8.self, repeating: 0, count: Int(region.start - cursor))
            }
            let from = max(region.start, cursor), to = min(region.end, end)
            if to <= from { break }
            // Region starts are filesystem-block aligned; the length is rounded up for O_DIRECT
            // (what is read past `to` is overwritten below).
            let length = Int(to - from)
            let offset = Int(from - start)
            let slice = UnsafeMutableRawBufferPointer(rebasing: buffer[offset..<(offset + roundUp(length, buffer.count - offset))])
            let n: Int
            do {
                n = try file.readUncached(into: slice, at: from)
            } catch { throw .source(error) }
            guard n >= length else { throw .sourceShort(path: spec.description, expected: size, got: from + UInt64(n)) }
            let firstSlot = offset / chunkSize
            let lastSlot = (offset + length - 1) / chunkSize
            if firstSlot < holes.count {
                for s in firstSlot...min(lastSlot, holes.count - 1) { holes[s] = false }
            }
            cursor = to
        }
        if cursor < end {
            buffer.baseAddress!.advanced(by: Int(cursor - start)).initializeMemory(as: UInt8.self, repeating: 0, count: Int(end - cursor))
        }
        return want
    }
}
