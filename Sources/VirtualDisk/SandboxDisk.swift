import ChunkStore
import Foundation
import Glibc
import Synchronization
import SystemIO
import Vault

public enum SandboxError: LifeboatError {
    case unknown(String)
    case exists(String)
    case busy(String, why: String)
    case damagedOverlay(path: String, why: String)
    /// The last flush failed (a sandbox's `umount` says so; the overlay stays usable).
    case lastFlushFailed(name: String, why: String)
    case pastEnd(disk: String, offset: UInt64, size: UInt64)
    case freezeExpired(String)
    case system(SystemError)
    case vault(VaultError)
    case disk(VirtualDiskError)

    public var description: String {
        switch self {
        case .unknown(let name): return "no sandbox \(name) (see `lifeboat sandbox list`)"
        case .exists(let name): return "a sandbox \(name) already exists"
        case .busy(let name, let why): return "sandbox \(name) is busy: \(why)"
        case .damagedOverlay(let path, let why): return "the sandbox overlay \(path) is damaged: \(why)"
        case .lastFlushFailed(let name, let why): return "sandbox \(name): \(why)"
        case .pastEnd(let disk, let offset, let size): return "write at byte \(offset) is past the end of disk \(disk) (\(size) bytes)"
        case .freezeExpired(let name): return "sandbox \(name) kept writing while it was being promoted (its writes cannot wait longer than \(Int(WriteGate.maximumWait)) s); stop the machine or try again"
        case .system(let error): return error.description
        case .vault(let error): return error.description
        case .disk(let error): return error.description
        }
    }

    public var kind: FailureKind {
        switch self {
        case .unknown: return .notFound
        case .exists, .pastEnd: return .usage
        case .busy, .freezeExpired: return .busy
        case .damagedOverlay: return .damaged
        case .lastFlushFailed: return .io
        case .system(let error): return error.kind
        case .vault(let error): return error.kind
        case .disk(let error): return error.kind
        }
    }
}

/// Lets writes through, or holds them while the overlay is read as one consistent image
/// (promote of a running sandbox). A freeze never blocks writes for longer than `maximumWait`:
/// a guest whose I/O hangs is worse than a promote that has to be retried.
///
/// Each freeze has a token of its own: whether it held, and its thaw, concern that freeze only
/// (one that expired must not end, or be reported as, a later one).
public final class WriteGate: @unchecked Sendable {
    // @unchecked: the vars are read and written only while holding `condition`.
    public static let maximumWait: TimeInterval = 60
    private let condition = NSCondition()
    private var writers = 0
    /// The freeze that holds, if any.
    private var holder: UInt64? = nil
    private var nextToken: UInt64 = 1
    /// Freezes that expired and are not thawed yet.
    private var expired: Set<UInt64> = []

    public init() {}

    func enter() {
        condition.lock()
        defer { condition.unlock() }
        let deadline = Date().addingTimeInterval(WriteGate.maximumWait)
        while let token = holder {
            if !condition.wait(until: deadline) && holder == token {
                holder = nil
                expired.insert(token)
                condition.broadcast()
            }
        }
        writers += 1
    }

    func leave() {
        condition.lock()
        writers -= 1
        if writers == 0 { condition.broadcast() }
        condition.unlock()
    }

    /// Waits for other freezes and for writes in flight; new writes wait until `thaw(token)`.
    /// Returns the freeze's token.
    public func freeze() -> UInt64 {
        condition.lock()
        defer { condition.unlock() }
        while holder != nil { condition.wait() }
        let token = nextToken
        nextToken += 1
        holder = token
        while writers > 0 { condition.wait() }
        return token
    }

    /// Ends the freeze `token`; false when it had expired (writes went on while it was held).
    @discardableResult
    public func thaw(_ token: UInt64) -> Bool {
        condition.lock()
        defer { condition.unlock() }
        let held = expired.remove(token) == nil
        if holder == token {
            holder = nil
            condition.broadcast()
        }
        return held
    }

    /// True while the freeze `token` holds (it has not expired nor been thawed).
    public func holds(_ token: UInt64) -> Bool {
        condition.lock()
        defer { condition.unlock() }
        return holder == token
    }
}

/// The written blocks of an overlay: one bit per block, kept in memory and persisted (only
/// the pages that changed) when the overlay is flushed.
struct BlockMap {
    static let headerSize = 4096
    static let pageBytes = 4096
    static let magic = Array("LBOVMAP1".utf8)

    var words: [UInt64]
    /// Map pages (of `pageBytes`) changed since the last flush.
    var dirty = Set<Int>()
    var count = 0

    init(blocks: Int) {
        words = [UInt64](repeating: 0, count: (blocks + 63) / 64)
    }

    func contains(_ block: Int) -> Bool {
        words[block >> 6] & (1 << UInt64(block & 63)) != 0
    }

    mutating func insert(_ blocks: ClosedRange<Int>) {
        for block in blocks {
            let bit: UInt64 = 1 << UInt64(block & 63)
            if words[block >> 6] & bit == 0 {
                words[block >> 6] |= bit
                count += 1
                dirty.insert((block >> 6) * 8 / BlockMap.pageBytes)
            }
        }
    }

    /// The stored form of one page: words little-endian, so that byte j holds blocks 8j...8j+7.
    func page(_ n: Int) -> [UInt8] {
        let wordsPerPage = BlockMap.pageBytes / 8
        let from = n * wordsPerPage
        let to = min(words.count, from + wordsPerPage)
        var bytes = [UInt8]()
        bytes.reserveCapacity((to - from) * 8)
        for w in words[from..<to] { withUnsafeBytes(of: w.littleEndian) { bytes += $0 } }
        return bytes
    }

    static func header(blockSize: Int, diskSize: UInt64) -> [UInt8] {
        var bytes = magic
        withUnsafeBytes(of: UInt32(1).littleEndian) { bytes += $0 }
        withUnsafeBytes(of: UInt32(blockSize).littleEndian) { bytes += $0 }
        withUnsafeBytes(of: diskSize.littleEndian) { bytes += $0 }
        return bytes + [UInt8](repeating: 0, count: headerSize - bytes.count)
    }
}

/// A writable disk: a sparse data file and a block map over a point's disk. Reads merge the
/// overlay's written blocks over the point; writes go to the overlay only (partial blocks are
/// copied up first); the point is never written. Safe from many threads.
///
/// Durability: a write reaches the data file before its bit is set; `flush` (the guest's fsync)
/// makes the data durable first and the map after, so a crash or power cut leaves every block
/// either as flushed or as it was before, never a map bit over data that was not there.
public final class SandboxDisk: Sendable {
    public static let blockSize = 4096
    public let name: String
    public let base: DiskReader
    public let gate = WriteGate()
    private let data: SystemFile
    /// The same data file with O_DIRECT, for large aligned writes: they go to the device once
    /// instead of through a second page cache (the kernel's FUSE cache holds the pages already).
    /// nil where the filesystem refuses O_DIRECT (tmpfs).
    private let direct: SystemFile?
    private let directBuffers = Mutex<[AlignedBuffer]>([])
    private let directRefused = Atomic<Bool>(false)
    private let modes = WriteModes()
    private let mapFile: SystemFile
    private let map: Mutex<BlockMap>
    private let stripes: [NSLock] = (0..<64).map { _ in NSLock() }
    private let flushing = Mutex<Void>(())
    /// A failed sync of the data file fails every later one: the map must never claim lost data.
    private let dataFlush = DataFlush()
    /// Where a failed flush is recorded, so that `umount` and `sandbox list` can say it after
    /// this process is gone: the writes made since the previous flush may then be lost (Linux
    /// may drop the pages of a failed write-back), as after a crash. The overlay stays usable in
    /// that crash-consistent state; the next successful flush removes the record.
    private let failureMarker: String
    private let failureRecorded = Atomic<Bool>(false)
    /// A write the overlay refused (ENOSPC, EIO) is recorded too, and stays recorded until reset:
    /// the kernel's writeback cache had told the guest it succeeded, and a later successful
    /// flush does not bring its data back.
    private let writeFailed = Atomic<Bool>(false)
    /// Serializes the marker's writes; holds a write failure's record not yet written.
    private let markerLock = Mutex<String?>(nil)
    static let writeFailurePrefix = "a write failed: "
    /// 64 TiB: a 2 GiB block map in memory.
    static let largestDisk: UInt64 = 64 << 40

    public var size: UInt64 { base.size }
    public var blocks: Int { Int((base.size + UInt64(SandboxDisk.blockSize) - 1) / UInt64(SandboxDisk.blockSize)) }
    /// Bytes of the disk the sandbox has written (whole blocks).
    public var writtenBytes: UInt64 { UInt64(map.withLock { $0.count }) * UInt64(SandboxDisk.blockSize) }

    /// Opens (creating when missing) the overlay files `<prefix>.data` and `<prefix>.map`.
    public init(name: String, base: DiskReader, prefix: String) throws(SandboxError) {
        self.name = name
        self.base = base
        // The block map is held in memory, a bit per 4 KiB block: 32 MiB per TiB of disk. A disk
        // size from a damaged or crafted manifest must not make that allocation trap.
        guard base.size <= SandboxDisk.largestDisk else {
            throw .damagedOverlay(path: prefix + ".map", why: "disk \(name) claims \(base.size) bytes; a sandbox holds disks up to "
                                  + "\(SandboxDisk.largestDisk >> 40) TiB")
        }
        failureMarker = SandboxDisk.failureMarker(prefix: prefix)
        failureRecorded.store(FileSystem.exists(failureMarker), ordering: .relaxed)
        if let recorded = FileManager.default.contents(atPath: failureMarker),
           String(decoding: recorded.prefix(64), as: UTF8.self).hasPrefix(SandboxDisk.writeFailurePrefix) {
            writeFailed.store(true, ordering: .relaxed)
        }
        let blockCount = Int((base.size + UInt64(SandboxDisk.blockSize) - 1) / UInt64(SandboxDisk.blockSize))
        var loaded = BlockMap(blocks: blockCount)
        // A map whose data file is gone (or was cut) would read its blocks as zeros.
        let hadData = FileSystem.exists(prefix + ".data")
        do {
            data = try SystemFile.open(prefix + ".data", .createOrOpen(permissions: 0o600))
            let second = try SystemFile.open(prefix + ".data", .readWrite)
            if second.setDirect(true) {
                direct = second
            } else {
                second.close()
                direct = nil
            }
            mapFile = try SystemFile.open(prefix + ".map", .createOrOpen(permissions: 0o600))
            let dataSize = try data.size()
            let header = BlockMap.header(blockSize: SandboxDisk.blockSize, diskSize: base.size)
            let mapBytes = loaded.words.count * 8
            if try mapFile.size() == 0 {
                try mapFile.truncate(to: UInt64(BlockMap.headerSize + mapBytes))
                // Allocated now: a flush must not meet ENOSPC on a map page it has never written
                // (the guest would get EIO for its fsync). Where the filesystem cannot, sparse.
                _ = try mapFile.allocate(at: 0, length: UInt64(BlockMap.headerSize + mapBytes))
                try mapFile.write(header, at: 0)
                try mapFile.sync()
                // The new files' names too: a guest's first fsync must not be lost with them.
                try FileSystem.syncDirectory(FileSystem.parentDirectory(of: prefix))
            } else {
                let stored = try mapFile.readAll(count: BlockMap.headerSize + mapBytes)
                // A crash between sizing a new map and writing its header leaves zeros, beside a
                // data file not yet sized: a map with nothing written yet, made again. (Zeros over a
                // data file of the disk's size are damage: its writes would be dropped.)
                let fresh = dataSize == 0 && stored.count == BlockMap.headerSize + mapBytes && stored.allSatisfy { $0 == 0 }
                if fresh {
                    try mapFile.write(header, at: 0)
                    try mapFile.sync()
                    try FileSystem.syncDirectory(FileSystem.parentDirectory(of: prefix))
                }
                // Allocated on every open, at no cost once done: maps made sparse (by an earlier
                // version, or re-made above) get their room too. Best effort: a full disk must
                // not keep the sandbox from opening.
                _ = try? mapFile.allocate(at: 0, length: UInt64(BlockMap.headerSize + mapBytes))
                let reread = fresh ? header + Array(stored[header.count...]) : stored
                guard reread.count == BlockMap.headerSize + mapBytes, Array(reread[0..<header.count]) == header else {
                    throw SandboxError.damagedOverlay(path: prefix + ".map", why: "its header does not match disk \(name) (\(base.size) bytes)")
                }
                reread.withUnsafeBytes { raw in
                    for i in loaded.words.indices {
                        loaded.words[i] = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: BlockMap.headerSize + i * 8, as: UInt64.self))
                    }
                }
                loaded.count = loaded.words.reduce(0) { $0 + $1.nonzeroBitCount }
            }
            if loaded.count > 0 && (!hadData || dataSize != base.size) {
                throw SandboxError.damagedOverlay(path: prefix + ".data", why: hadData
                    ? "it holds \(dataSize) bytes where disk \(name) has \(base.size), under a map of \(loaded.count) written blocks"
                    : "it is missing, under a map of \(loaded.count) written blocks")
            }
            if dataSize != base.size { try data.truncate(to: base.size) }
        } catch let error as SandboxError {
            throw error
        } catch let error as SystemError {
            throw .system(error)
        } catch {
            throw .damagedOverlay(path: prefix, why: "\(error)")
        }
        map = Mutex(loaded)
    }

    deinit {
        data.close()
        direct?.close()
        mapFile.close()
    }

    // MARK: - Reading

    /// Reads up to `buffer.count` bytes at `offset`; fewer only at the end of the disk.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(SandboxError) -> Int {
        guard offset < size, buffer.count > 0 else { return 0 }
        let length = Int(min(UInt64(buffer.count), size - offset))
        let end = offset + UInt64(length)
        let bs = UInt64(SandboxDisk.blockSize)
        let first = Int(offset / bs), last = Int((end - 1) / bs)
        let written: [Bool] = map.withLock { m in (first...last).map { m.contains($0) } }
        var block = first
        while block <= last {
            let inOverlay = written[block - first]
            var runEnd = block
            while runEnd < last && written[runEnd + 1 - first] == inOverlay { runEnd += 1 }
            let from = max(offset, UInt64(block) * bs)
            let to = min(end, UInt64(runEnd + 1) * bs)
            let part = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(from - offset)..<Int(to - offset)])
            do {
                if inOverlay {
                    let n = try data.read(into: part, at: from)
                    if n < part.count {
                        throw SandboxError.damagedOverlay(path: data.path, why: "it ends at byte \(from + UInt64(n))")
                    }
                } else {
                    _ = try base.read(into: part, at: from)
                }
            } catch let error as SandboxError {
                throw error
            } catch let error as SystemError {
                throw .system(error)
            } catch let error as VirtualDiskError {
                throw .disk(error)
            } catch {
                throw .damagedOverlay(path: data.path, why: "\(error)")
            }
            block = runEnd + 1
        }
        return length
    }

    /// SEEK_DATA/SEEK_HOLE over the merged disk: a written block is data, even if it holds zeros.
    public func nextData(from offset: UInt64) throws(SandboxError) -> UInt64? {
        try scan(from: offset, wantData: true)
    }

    public func nextHole(from offset: UInt64) throws(SandboxError) -> UInt64 {
        try scan(from: offset, wantData: false) ?? size
    }

    private func scan(from offset: UInt64, wantData: Bool) throws(SandboxError) -> UInt64? {
        var position = offset
        let bs = UInt64(SandboxDisk.blockSize)
        while position < size {
            let block = Int(position / bs)
            if map.withLock({ $0.contains(block) }) {
                if wantData { return position }
                position = UInt64(block + 1) * bs
                continue
            }
            // In the base: its next boundary, clipped to the next written block.
            let baseNext: UInt64?
            do {
                baseNext = wantData ? try base.nextData(from: position) : try base.nextHole(from: position)
            } catch { throw .disk(error) }
            let nextWritten: UInt64? = map.withLock { m in
                var b = block + 1
                let limit = Int(((baseNext ?? size) + bs - 1) / bs)
                while b < min(limit, blocks) {
                    if m.contains(b) { return UInt64(b) * bs }
                    b += 1
                }
                return nil
            }
            if let baseNext, nextWritten.map({ baseNext <= $0 }) ?? true { return min(baseNext, size) }
            guard let nextWritten else { return wantData ? nil : size }
            if wantData { return nextWritten }
            position = nextWritten
        }
        return nil
    }

    // MARK: - Writing

    /// Reserves room in the overlay for a range (the guest's fallocate): later writes there do not
    /// fail for want of space. What the disk reads does not change. False where the filesystem
    /// cannot reserve.
    public func reserve(at offset: UInt64, length: UInt64) throws(SandboxError) -> Bool {
        guard length > 0 else { return true }
        guard offset <= size, length <= size - offset else { throw .pastEnd(disk: name, offset: offset, size: size) }
        do throws(SystemError) {
            return try data.allocate(at: offset, length: length)
        } catch { throw .system(error) }
    }

    /// Writes `buffer` at `offset` into the overlay. `cached`: the write comes from the kernel's
    /// writeback cache, so the writer was told it succeeded long ago; if it fails here its data
    /// is lost, and that is recorded until reset. A write the writer waits for (O_DIRECT: qemu's
    /// cache=none) gets the error itself and can retry: nothing is lost.
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, cached: Bool = true) throws(SandboxError) {
        guard !buffer.isEmpty else { return }
        guard offset + UInt64(buffer.count) <= size else { throw .pastEnd(disk: name, offset: offset, size: size) }
        gate.enter()
        defer { gate.leave() }
        let bs = UInt64(SandboxDisk.blockSize)
        let end = offset + UInt64(buffer.count)
        let first = Int(offset / bs), last = Int((end - 1) / bs)
        let locks = Set((first...last).prefix(64).map { $0 % 64 }).sorted().map { stripes[$0] }
        for lock in locks { lock.lock() }
        defer { for lock in locks.reversed() { lock.unlock() } }

        let spanStart = UInt64(first) * bs
        let spanEnd = min(UInt64(last + 1) * bs, size)
        let whole = offset == spanStart && end == spanEnd
        do {
            if try !(whole && writeDirect(buffer, at: offset)) {
                try writeCached(buffer, at: offset, span: spanStart..<spanEnd)
            }
        } catch let error as SandboxError {
            throw error
        } catch let error as SystemError {
            if cached { recordWriteFailure(error, at: offset, count: buffer.count) }
            throw .system(error)
        } catch {
            throw .damagedOverlay(path: data.path, why: "\(error)")
        }
        map.withLock { $0.insert(first...last) }
    }

    /// Writes through the page cache, the blocks `span` covers: partial blocks at either end are
    /// first completed from what the disk holds now (the overlay or the point), a copy-up.
    private func writeCached(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, span blocks: Range<UInt64>) throws {
        modes.enter(direct: false)
        defer { modes.leave() }
        let end = offset + UInt64(buffer.count)
        guard offset != blocks.lowerBound || end != blocks.upperBound else { return try data.write(buffer, at: offset) }
        let bs = UInt64(SandboxDisk.blockSize)
        let spanStart = blocks.lowerBound, spanEnd = blocks.upperBound
        let span = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(spanEnd - spanStart), alignment: 4096)
        defer { span.deallocate() }
        if offset > spanStart {
            let headEnd = min(spanStart + bs, spanEnd)
            _ = try read(into: UnsafeMutableRawBufferPointer(rebasing: span[0..<Int(headEnd - spanStart)]), at: spanStart)
        }
        if end < spanEnd {
            let tailStart = max(spanStart, (end - 1) / bs * bs)
            if !(tailStart == spanStart && offset > spanStart) {
                _ = try read(into: UnsafeMutableRawBufferPointer(rebasing: span[Int(tailStart - spanStart)...]), at: tailStart)
            }
        }
        UnsafeMutableRawBufferPointer(rebasing: span[Int(offset - spanStart)..<Int(end - spanStart)]).copyMemory(from: buffer)
        try data.write(UnsafeRawBufferPointer(span), at: spanStart)
    }

    /// Writes large runs of whole blocks with O_DIRECT through an aligned buffer (the request's
    /// own bytes are not aligned): they go to the device once instead of through a second page
    /// cache. False for small writes, and where the filesystem refuses O_DIRECT: the caller then
    /// writes through the cache.
    private func writeDirect(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(SystemError) -> Bool {
        guard let direct, !directRefused.load(ordering: .relaxed), buffer.count >= 64 << 10,
              buffer.count <= AlignedBuffer.size, buffer.count % SandboxDisk.blockSize == 0 else { return false }
        let aligned = directBuffers.withLock { $0.popLast() } ?? AlignedBuffer()
        defer { directBuffers.withLock { if $0.count < 16 { $0.append(aligned) } } }
        let bytes = UnsafeMutableRawBufferPointer(rebasing: aligned.memory[0..<buffer.count])
        bytes.copyMemory(from: buffer)
        modes.enter(direct: true)
        defer { modes.leave() }
        do {
            try direct.write(UnsafeRawBufferPointer(bytes), at: offset)
            return true
        } catch {
            guard error.errno == EINVAL else { throw error }
            directRefused.store(true, ordering: .relaxed)
            return false
        }
    }

    /// Makes a range read as zeros (discard, fallocate PUNCH_HOLE or ZERO_RANGE): whole blocks are
    /// freed in the data file, partial ones written with zeros.
    public func zero(at offset: UInt64, length: UInt64) throws(SandboxError) {
        guard length > 0 else { return }
        guard offset + length <= size else { throw .pastEnd(disk: name, offset: offset, size: size) }
        let bs = UInt64(SandboxDisk.blockSize)
        let end = offset + length
        let wholeStart = (offset + bs - 1) / bs * bs
        let wholeEnd = end == size ? end : end / bs * bs
        guard wholeStart < wholeEnd else {
            return try writeZeros(at: offset, length: length)
        }
        if offset < wholeStart { try writeZeros(at: offset, length: wholeStart - offset) }
        var punched = false
        do throws(SystemError) {
            gate.enter()
            defer { gate.leave() }
            // The blocks' stripe locks, as a write takes them: a partial write's copy-up racing
            // the punch could otherwise bring back what the punch discarded.
            let first = Int(wholeStart / bs), last = Int((wholeEnd - 1) / bs)
            let locks = Set((first...last).prefix(64).map { $0 % 64 }).sorted().map { stripes[$0] }
            for lock in locks { lock.lock() }
            defer { for lock in locks.reversed() { lock.unlock() } }
            modes.enter(direct: false)
            defer { modes.leave() }
            punched = try data.punchHole(at: wholeStart, length: wholeEnd - wholeStart)
            if punched { map.withLock { $0.insert(Int(wholeStart / bs)...Int((wholeEnd - 1) / bs)) } }
        } catch {
            throw .system(error)
        }
        if !punched { try writeZeros(at: wholeStart, length: wholeEnd - wholeStart) }
        if wholeEnd < end { try writeZeros(at: wholeEnd, length: end - wholeEnd) }
    }

    private func writeZeros(at offset: UInt64, length: UInt64) throws(SandboxError) {
        let piece = 1 << 20
        let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: piece, alignment: 4096)
        defer { zeros.deallocate() }
        zeros.initializeMemory(as: UInt8.self, repeating: 0)
        var done: UInt64 = 0
        while done < length {
            let n = Int(min(UInt64(piece), length - done))
            try write(UnsafeRawBufferPointer(rebasing: zeros[0..<n]), at: offset + done, cached: false)   // its caller waits for the answer
            done += UInt64(n)
        }
    }

    /// Makes everything written so far durable: the data first, then the map pages that changed.
    public func flush() throws(SandboxError) {
        do throws(SystemError) {
            try flushing.withLock { _ throws(SystemError) in
                // The pages are taken before the data is synced: every bit in them belongs to a
                // write that had reached the data file, so the sync covers it.
                let pages: [(Int, [UInt8])] = map.withLock { m in
                    let taken = m.dirty.sorted().map { ($0, m.page($0)) }
                    m.dirty.removeAll()
                    return taken
                }
                do throws(SystemError) {
                    try dataFlush.sync(data)
                    for (n, bytes) in pages {
                        try mapFile.write(bytes, at: UInt64(BlockMap.headerSize + n * BlockMap.pageBytes))
                    }
                    if !pages.isEmpty { try mapFile.syncData() }
                } catch {
                    map.withLock { m in for (n, _) in pages { m.dirty.insert(n) } }
                    recordFailure(error)
                    throw error
                }
                markerLock.withLock { pending in
                    if writeFailed.load(ordering: .relaxed) {
                        // A write failure whose record could not be written then (a full disk): again.
                        if let text = pending, writeMarker(text) { pending = nil }
                    } else if failureRecorded.exchange(false, ordering: .relaxed) {
                        try? FileSystem.remove(failureMarker)
                        try? FileSystem.syncDirectory(FileSystem.parentDirectory(of: failureMarker))
                    }
                }
            }
        } catch {
            throw .system(error)
        }
    }

    static func failureMarker(prefix: String) -> String { prefix + ".flush-failed" }

    /// What the overlay at `prefix` may have lost, if its last flush failed.
    public static func recordedFailure(prefix: String) -> String? {
        let marker = failureMarker(prefix: prefix)
        guard FileSystem.exists(marker) else { return nil }
        let cause = FileManager.default.contents(atPath: marker).map { String(decoding: $0.prefix(4096), as: UTF8.self) } ?? ""
        if cause.hasPrefix(writeFailurePrefix) {
            return "a write to it failed (\(cause.dropFirst(writeFailurePrefix.count))): the guest may have been told it succeeded "
                + "(the kernel's writeback cache), and its data is not in the overlay; reset the sandbox, or check the guest's filesystem"
        }
        return "its last flush failed (\(cause.isEmpty ? "cause not recorded" : cause)): the writes made since the flush before it "
            + "may be lost, as after a crash"
    }

    /// Best effort: the filesystem that failed the flush may refuse this too (the failure is
    /// then still in the server's log, and a failed data sync fails every later flush of this
    /// process). A refused write is recorded in the same file, for good (see writeFailed), over
    /// a flush's record; one that could not be recorded is tried again at every flush.
    private func recordWriteFailure(_ error: SystemError, at offset: UInt64, count: Int) {
        markerLock.withLock { pending in
            guard !writeFailed.exchange(true, ordering: .relaxed) else { return }
            failureRecorded.store(true, ordering: .relaxed)
            let text = SandboxDisk.writeFailurePrefix + "\(count) bytes at byte \(offset): \(error.description)"
            pending = writeMarker(text) ? nil : text
        }
    }

    private func recordFailure(_ error: SystemError) {
        markerLock.withLock { pending in
            failureRecorded.store(true, ordering: .relaxed)
            if writeFailed.load(ordering: .relaxed) {
                // The lost write's record first, if it could not be written when the write failed.
                if let text = pending, writeMarker(text) { pending = nil }
                return
            }
            guard !FileSystem.exists(failureMarker) else { return }
            writeMarker(error.description)
        }
    }

    /// Replaces the marker whole (a temporary file renamed over it): never half of one record
    /// over another. Called under markerLock.
    @discardableResult
    private func writeMarker(_ text: String) -> Bool {
        do throws(SystemError) {
            try FileSystem.replace(failureMarker, with: Array(text.utf8), permissions: 0o600)
            try FileSystem.syncDirectory(FileSystem.parentDirectory(of: failureMarker))
            return true
        } catch {
            return false
        }
    }

    // MARK: - Promote

    /// The chunk-size slots holding at least one written block, ascending.
    public func changedSlots(chunkSize: Int) -> [Int] {
        let blocksPerSlot = max(1, chunkSize / SandboxDisk.blockSize)
        return map.withLock { m in
            var slots: [Int] = []
            for (w, word) in m.words.enumerated() where word != 0 {
                var bits = word
                while bits != 0 {
                    let block = w * 64 + bits.trailingZeroBitCount
                    bits &= bits - 1
                    let slot = block / blocksPerSlot
                    if slots.last != slot { slots.append(slot) }
                }
            }
            return slots
        }
    }
}

/// Lets the overlay's buffered writes run together, and its O_DIRECT writes together, never the
/// two at once. An O_DIRECT write writes back and drops the cached folios over its range, before
/// and after it; a buffered write dirtying the same large folio (a neighbouring block) meanwhile
/// would leave that folio, with the old bytes of the direct write's blocks, in the cache (the
/// kernel's "possible data corruption due to collision with buffered I/O"): later reads would see
/// them, and a partial write would copy them up over acknowledged data. When both kinds wait,
/// they take turns.
final class WriteModes: @unchecked Sendable {
    // @unchecked: every field is used under `condition`.
    private let condition = NSCondition()
    private var active = 0
    private var activeDirect = false
    private var waiting = [0, 0]  // buffered, direct
    /// The kind that goes next once the active writes are done, when the other kind waited.
    private var turn: Int? = nil

    func enter(direct: Bool) {
        condition.lock()
        defer { condition.unlock() }
        let kind = direct ? 1 : 0
        waiting[kind] += 1
        while active > 0 ? (activeDirect != direct || waiting[1 - kind] > 0) : (turn != nil && turn != kind) {
            condition.wait()
        }
        waiting[kind] -= 1
        if turn == kind { turn = nil }
        activeDirect = direct
        active += 1
    }

    func leave() {
        condition.lock()
        defer { condition.unlock() }
        active -= 1
        if active == 0 {
            let other = activeDirect ? 0 : 1
            turn = waiting[other] > 0 ? other : nil
            condition.broadcast()
        }
    }
}

/// A page-aligned buffer for O_DIRECT writes, owned by one writer at a time.
final class AlignedBuffer: @unchecked Sendable {
    static let size = 1 << 20
    let memory = UnsafeMutableRawBufferPointer.allocate(byteCount: AlignedBuffer.size, alignment: 4096)
    deinit { memory.deallocate() }
}

/// One disk of a sandbox as the changes a promote commits.
public struct SandboxChanges: ChangedSlots {
    public let disk: SandboxDisk
    public let changedSlots: [Int]

    public init(disk: SandboxDisk, chunkSize: Int) {
        self.disk = disk
        self.changedSlots = disk.changedSlots(chunkSize: chunkSize)
    }

    public func readSlot(_ slot: Int, into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        let chunkSize = UInt64(disk.base.chunkSize)
        let start = UInt64(slot) * chunkSize
        let length = Int(min(chunkSize, disk.size - start))
        return try disk.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<length]), at: start)
    }
}
