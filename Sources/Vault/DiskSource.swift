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

/// Reads a source in slot-aligned batches.
final class DiskSource {
    let spec: SourceSpec
    let file: SystemFile
    /// Known for files and devices; nil for standard input until the end.
    let size: UInt64?
    let sparse: Bool
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

    /// Fills `buffer` with the next bytes; returns how many (less than the buffer only at the end).
    /// Sets `holes` for slots that lie entirely in a hole of a sparse file (known zero, not read).
    func read(into buffer: UnsafeMutableRawBufferPointer, chunkSize: Int, holes: inout [Bool]) throws(VaultError) -> Int {
        let start = position
        guard let size else {
            let n: Int
            do {
                n = try file.readSequential(into: buffer, position: start)
            } catch { throw .source(error) }
            position += UInt64(n)
            if n < buffer.count { ended = true }
            for i in holes.indices { holes[i] = false }
            return n
        }
        let want = Int(min(UInt64(buffer.count), size - min(size, start)))
        if want == 0 { ended = true; return 0 }
        let end = start + UInt64(want)
        if !sparse {
            let n: Int
            do {
                n = try file.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<want]), at: start)
            } catch { throw .source(error) }
            guard n == want else { throw .sourceShort(path: spec.description, expected: size, got: start + UInt64(n)) }
            for i in holes.indices { holes[i] = false }
        } else {
            // Only the data regions are read; the rest of the buffer is zero.
            for i in holes.indices { holes[i] = true }
            var cursor = start
            while cursor < end, let region = file.nextData(from: cursor, fileSize: size), region.start < end {
                if region.start > cursor {
                    buffer.baseAddress!.advanced(by: Int(cursor - start)).initializeMemory(as: UInt8.self, repeating: 0, count: Int(region.start - cursor))
                }
                let from = region.start, to = min(region.end, end)
                if to <= from { break }
                let slice = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(from - start)..<Int(to - start)])
                let n: Int
                do {
                    n = try file.read(into: slice, at: from)
                } catch { throw .source(error) }
                guard n == slice.count else { throw .sourceShort(path: spec.description, expected: size, got: from + UInt64(n)) }
                let firstSlot = Int(from - start) / chunkSize
                let lastSlot = (Int(to - start) - 1) / chunkSize
                if firstSlot < holes.count {
                    for s in firstSlot...min(lastSlot, holes.count - 1) { holes[s] = false }
                }
                cursor = to
            }
            if cursor < end {
                buffer.baseAddress!.advanced(by: Int(cursor - start)).initializeMemory(as: UInt8.self, repeating: 0, count: Int(end - cursor))
            }
            // A file that shrank while we read it.
            if end == size, let now = try? file.size(), now < size {
                throw .sourceShort(path: spec.description, expected: size, got: now)
            }
        }
        position = end
        if end == size { ended = true }
        return want
    }
}
