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
    /// Files and devices: read with O_DIRECT through a descriptor of its own (the readers share
    /// it; toggling O_DIRECT on one shared descriptor let one reader's fallback undo another's).
    private let uncached: UncachedFile?
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
            uncached = nil
            size = nil
            sparse = false
        case .path(let path):
            let opened: UncachedFile
            do { opened = try UncachedFile(path, .readOnly) } catch { throw .source(error) }
            uncached = opened
            file = opened.buffered
            do {
                let st = try file.status()
                let type = st.st_mode & S_IFMT
                guard type == S_IFREG || type == S_IFBLK else {
                    throw VaultError.invalidArgument("source \(path) is neither a regular file nor a block device")
                }
                size = try file.size()
                sparse = type == S_IFREG
                file.adviseSequential()
            } catch let error as SystemError {
                opened.close()
                throw .source(error)
            } catch let error as VaultError {
                opened.close()
                throw error
            } catch {
                opened.close()
                throw .invalidArgument("\(error)")
            }
        }
    }

    func close() {
        uncached?.close()
    }

    private func readAligned(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(SystemError) -> Int {
        guard let uncached else { return try file.read(into: buffer, at: offset) }
        return try uncached.read(into: buffer, at: offset)
    }

    /// After the last batch: a file that shrank while it was read gave zeros for what it lost
    /// (SEEK_DATA finds no data past its end), so the point would record bytes the image never
    /// held. A device cannot shrink under a read that way (its reads come up short).
    func checkNotShrunk() throws(VaultError) {
        guard sparse, let size else { return }
        let now: UInt64
        do { now = try file.size() } catch { throw .source(error) }
        if now < size { throw .sourceShort(path: spec.description, expected: size, got: now) }
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
                n = try readAligned(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<roundUp(want, buffer.count)]), at: start)
            } catch { throw .source(error) }
            guard n >= want else { throw .sourceShort(path: spec.description, expected: size, got: start + UInt64(n)) }
            for i in holes.indices { holes[i] = false }
            return want
        }
        // Holes of a sparse file are found with SEEK_DATA/SEEK_HOLE. The span from the first to
        // the last data byte of the batch is read with one request (holes inside it read as
        // zeros without touching the device): one large read beats many small ones.
        for i in holes.indices { holes[i] = true }
        var cursor = start
        var first: UInt64? = nil, last: UInt64 = start
        while cursor < end, let region = file.nextData(from: cursor, fileSize: size), region.start < end {
            let from = max(region.start, cursor)
            // A hole punched between SEEK_DATA and SEEK_HOLE (a guest's discard) gives an empty
            // region: the rest of the batch is taken as data, and its zeros found by their bytes.
            // Stopping there took every later data region of the batch for a hole.
            let to = region.end > from ? min(region.end, end) : end
            if first == nil { first = from }
            last = to
            let firstSlot = Int(from - start) / chunkSize
            let lastSlot = (Int(to - start) - 1) / chunkSize
            if firstSlot < holes.count {
                for s in firstSlot...min(lastSlot, holes.count - 1) { holes[s] = false }
            }
            cursor = to
        }
        guard let first else {
            buffer.baseAddress!.initializeMemory(as: UInt8.self, repeating: 0, count: want)
            return want
        }
        let a = UInt64(SystemFile.directAlignment)
        let spanStart = max(start, first / a * a)
        let offset = Int(spanStart - start)
        if offset > 0 { buffer.baseAddress!.initializeMemory(as: UInt8.self, repeating: 0, count: offset) }
        let length = Int(last - spanStart)
        let slice = UnsafeMutableRawBufferPointer(rebasing: buffer[offset..<(offset + roundUp(length, buffer.count - offset))])
        let n: Int
        do {
            n = try readAligned(into: slice, at: spanStart)
        } catch { throw .source(error) }
        guard n >= length else { throw .sourceShort(path: spec.description, expected: size, got: spanStart + UInt64(n)) }
        let tail = offset + length
        if tail < want {
            buffer.baseAddress!.advanced(by: tail).initializeMemory(as: UInt8.self, repeating: 0, count: want - tail)
        }
        return want
    }
}
