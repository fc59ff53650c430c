import ChunkStore
import Foundation
import Glibc
import Synchronization
import SystemIO

/// What the state directory knows about one target (`<state>/sync/<key>/state.json`, written
/// atomically): the sync in progress or the last one. Local state, not vault format.
public struct SyncState: Codable, Sendable {
    public enum Phase: String, Codable, Sendable {
        case running       // started, not finished: mid-sync
        case complete      // the target holds the source's image
        case rolledBack    // the target holds its pre-sync image again
    }
    public var format = 1
    public var target: String
    public var isDevice: Bool
    public var identity: String
    public var source: String        // resolvable again by --resume (MACHINE@POINT-ID)
    public var sourceLabel: String
    public var disk: String
    public var mode: SyncMode
    public var phase: Phase
    /// False for --no-undo: the target is inconsistent until the sync completes.
    public var undo: Bool
    /// The sync created the target file: rolling back removes it.
    public var created: Bool
    public var oldSize: UInt64
    public var newSize: UInt64
    public var chunkSize: Int
    public var journalBytesPlanned: UInt64
    public var started: String
    public var finished: String?
    /// The target's stable name (TargetIdentity.stable) and the boot the sync started in;
    /// absent in states written before them.
    public var stable: String? = nil
    public var boot: String? = nil
    /// A loop device's backing file then (TargetIdentity.attachment).
    public var attachment: String? = nil
}

/// The undo journal (`<state>/sync/<key>/journal`, docs/FORMAT.md "Sync journals"): a header,
/// then records appended in order. A data record holds the old bytes of a target range, made
/// durable before the range is overwritten; a zero record says the range held only zeros; a
/// checkpoint says every slot below its offset holds the new image and is durable. Each record
/// carries the SHA-256 of its payload and a check of its header: a torn tail is ignored.
final class UndoJournal: Sendable {
    enum Kind: UInt8 {
        case data = 1
        case zero = 2
        case checkpoint = 3
    }

    struct Record {
        var kind: Kind
        var offset: UInt64
        var length: Int
        /// Where the payload starts in the journal file (data records).
        var payloadAt: UInt64
    }

    static let magic = Array("LBSYNCJ1".utf8)
    static let recordMagic = Array("LBJR".utf8)
    static let headerSize = 64
    static let recordHeaderSize = 64

    let file: SystemFile
    private let end: Mutex<UInt64>
    /// How far the journal is known durable; held while flushing, so that writers waiting for
    /// the same records share one flush.
    private let durable = Mutex<UInt64>(0)
    private let dataFlush = DataFlush()
    /// Carried by this journal's checkpoints (their digest field): a checkpoint found in the
    /// damaged part of a journal is taken for one only if it is this journal's, not bytes that
    /// look like one inside a payload (a guest disk may hold a journal of its own).
    private let checkpointTag: ChunkID

    private init(file: SystemFile, end: UInt64, header: [UInt8]) {
        self.file = file
        self.end = Mutex(end)
        checkpointTag = Self.checkpointTag(header: header)
    }

    private static func checkpointTag(header: [UInt8]) -> ChunkID {
        ChunkID.sha256(Array("lifeboat journal checkpoint".utf8) + Array(header[16..<48]))
    }

    var path: String { file.path }
    var size: UInt64 { end.withLock { $0 } }

    /// A new, empty journal (replacing any old one), durable with its directory.
    static func create(_ path: String, key: String) throws(SyncError) -> UndoJournal {
        var header = magic
        header.appendLE(UInt32(1))           // version
        header.appendLE(UInt32(0))
        header.append(contentsOf: Array(key.utf8).prefix(32))
        while header.count < headerSize { header.append(0) }
        do throws(SystemError) {
            try FileSystem.remove(path)
            let file = try SystemFile.open(path, .createExclusive(permissions: 0o600))
            try file.write(header, at: 0)
            try file.sync()
            try FileSystem.syncDirectory(FileSystem.parentDirectory(of: path))
            return UndoJournal(file: file, end: UInt64(headerSize), header: header)
        } catch { throw .journal(error) }
    }

    /// Opens a journal and reads its records, up to the first torn or damaged one; later appends
    /// go after the last good record.
    /// `checkPayloads: false` (status) trusts payloads whose header is sound.
    static func open(_ path: String, key: String? = nil, checkPayloads: Bool = true) throws(SyncError) -> (UndoJournal, [Record]) {
        let file: SystemFile
        do throws(SystemError) { file = try SystemFile.open(path, .readWrite) } catch { throw .journal(error) }
        do throws(SyncError) {
            let size: UInt64
            do throws(SystemError) { size = try file.size() } catch { throw .journal(error) }
            let header: [UInt8]
            do throws(SystemError) { header = try file.readAll(count: headerSize) } catch { throw .journal(error) }
            guard header.count == headerSize, Array(header[0..<8]) == magic else {
                throw .damagedJournal(path: path, why: "it does not start with a Lifeboat sync journal header")
            }
            let version = UInt32(header[8]) | UInt32(header[9]) << 8 | UInt32(header[10]) << 16 | UInt32(header[11]) << 24
            guard version == 1 else { throw .damagedJournal(path: path, why: "its version is \(version), not 1") }
            // The journal belongs to the state directory it lies in (a copy from another target's
            // would roll the wrong bytes back).
            if let key {
                let expected = Array(Array(key.utf8).prefix(32))
                let recorded = Array(header[16..<(16 + expected.count)])
                if recorded != expected { throw .damagedJournal(path: path, why: "it was written for another target") }
            }
            var records: [Record] = []
            var at = UInt64(headerSize)
            var payload = [UInt8]()
            while at + UInt64(recordHeaderSize) <= size {
                let head: [UInt8]
                do throws(SystemError) { head = try file.readAll(from: at, count: recordHeaderSize) } catch { throw .journal(error) }
                guard head.count == recordHeaderSize, let record = decodeHeader(head, at: at) else { break }
                let (entry, digest) = record
                if entry.kind == .data && !checkPayloads {
                    guard entry.payloadAt + UInt64(entry.length) <= size else { break }
                    at = entry.payloadAt + UInt64(entry.length)
                } else if entry.kind == .data {
                    guard entry.payloadAt + UInt64(entry.length) <= size else { break }
                    if payload.count < entry.length { payload = [UInt8](repeating: 0, count: entry.length) }
                    let n: Int
                    do throws(SystemError) {
                        n = try payload.withMutableBytes { (raw) throws(SystemError) -> Int in
                            try file.read(into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<entry.length]), at: entry.payloadAt)
                        }
                    } catch { throw .journal(error) }
                    guard n == entry.length,
                          payload.withUnsafeBytes({ ChunkID.sha256(UnsafeRawBufferPointer(rebasing: $0[0..<entry.length])) }) == digest else { break }
                    at = entry.payloadAt + UInt64(entry.length)
                } else {
                    at += UInt64(recordHeaderSize)
                }
                records.append(entry)
            }
            // A torn tail is the unflushed end of the journal. Damage before a checkpoint is not:
            // a checkpoint is written only after every record before it was flushed, so they
            // had reached the disk. Taken for a torn tail, it would be cut off, and a rollback
            // would put back only the slots before it (a resume would journal the others' new
            // bytes as their old ones). Checkpoints without this journal's tag (written before
            // checkpoints flushed first) do not count.
            if at < size, let checkpoint = try checkpointAfter(at, in: file, size: size, tag: checkpointTag(header: header)) {
                throw .damagedJournal(path: path, why: "the record at byte \(at) is damaged, and the checkpoint at byte \(checkpoint) "
                                      + "shows it had been written durably: neither --rollback nor --resume can trust it. The target "
                                      + "holds part of the new image; to finish the sync, remove \(FileSystem.parentDirectory(of: path)) "
                                      + "and sync again with --mode full")
            }
            return (UndoJournal(file: file, end: at, header: header), records)
        } catch {
            file.close()
            throw error
        }
    }

    /// The position of a sound checkpoint record after `start`, if any (searched byte by byte:
    /// records have no alignment).
    private static func checkpointAfter(_ start: UInt64, in file: SystemFile, size: UInt64, tag: ChunkID) throws(SyncError) -> UInt64? {
        let window = 4 << 20
        var base = start + 1
        while base + UInt64(recordHeaderSize) <= size {
            let count = Int(min(UInt64(window + recordHeaderSize), size - base))
            let bytes: [UInt8]
            do throws(SystemError) { bytes = try file.readAll(from: base, count: count) } catch { throw .journal(error) }
            var i = 0
            while i + recordHeaderSize <= bytes.count {
                if bytes[i] == recordMagic[0] && bytes[i + 1] == recordMagic[1] && bytes[i + 2] == recordMagic[2]
                    && bytes[i + 3] == recordMagic[3] && bytes[i + 4] == Kind.checkpoint.rawValue,
                   let (_, digest) = decodeHeader(Array(bytes[i..<(i + recordHeaderSize)]), at: base + UInt64(i)), digest == tag {
                    return base + UInt64(i)
                }
                i += 1
            }
            base += UInt64(window)
        }
        return nil
    }

    /// magic(4) kind(1) pad(3) offset(8) length(4) pad(4) sha256(32) check(8): 64 bytes.
    static func encodeHeader(kind: Kind, offset: UInt64, length: Int, digest: ChunkID) -> [UInt8] {
        var head = recordMagic
        head.append(kind.rawValue)
        head.append(contentsOf: [0, 0, 0])
        head.appendLE(offset)
        head.appendLE(UInt32(length))
        head.appendLE(UInt32(0))
        digest.append(to: &head)
        let check = ChunkID.sha256(head)
        head.appendLE(check.w0)
        return head
    }

    /// Appends the undo record of one slot: a zero record, or a data record with its old bytes.
    static func encodeRecord(into records: inout [UInt8], offset: UInt64, bytes: UnsafeRawBufferPointer, zero: Bool, digest: ChunkID) {
        if zero {
            records += encodeHeader(kind: .zero, offset: offset, length: bytes.count, digest: .zero)
        } else {
            records += encodeHeader(kind: .data, offset: offset, length: bytes.count, digest: digest)
            records.append(contentsOf: bytes)
        }
    }

    private static func decodeHeader(_ head: [UInt8], at: UInt64) -> (Record, ChunkID)? {
        guard Array(head[0..<4]) == recordMagic, let kind = Kind(rawValue: head[4]) else { return nil }
        let check = ChunkID.sha256(Array(head[0..<56]))
        return head.withUnsafeBytes { raw -> (Record, ChunkID)? in
            guard raw.loadLE(UInt64.self, at: 56) == check.w0 else { return nil }
            let offset = raw.loadLE(UInt64.self, at: 8)
            let length = Int(raw.loadLE(UInt32.self, at: 16))
            let digest = ChunkID(raw, at: 24)
            return (Record(kind: kind, offset: offset, length: length, payloadAt: at + UInt64(recordHeaderSize)), digest)
        }
    }

    /// Appends encoded records and makes them durable before returning (unless `durable` is
    /// false). Returns the journal's end after them: `flush(through:)` that position before
    /// the slots they describe are overwritten.
    @discardableResult
    func append(_ bytes: [UInt8], durable: Bool = true) throws(SyncError) -> UInt64 {
        guard !bytes.isEmpty else { return size }
        // The space is taken under the lock, the flush outside it: writers that append at once
        // share their flushes (one fdatasync makes every write before it durable).
        let after = try end.withLock { (end: inout UInt64) throws(SyncError) -> UInt64 in
            do throws(SystemError) {
                try file.write(bytes, at: end)
            } catch { throw .journal(error) }
            end += UInt64(bytes.count)
            return end
        }
        if durable { try flush(through: after) }
        return after
    }

    /// Makes every record appended so far durable.
    func flush() throws(SyncError) {
        try flush(through: size)
    }

    /// Makes the records before `position` durable, with one flush for every caller waiting
    /// at once (records are written in order, so one fdatasync covers all before it).
    /// A failed flush fails every later one (DataFlush).
    func flush(through position: UInt64) throws(SyncError) {
        try durable.withLock { (durable: inout UInt64) throws(SyncError) in
            guard durable < position else { return }
            let covered = size
            do throws(SystemError) { try dataFlush.sync(file) } catch { throw .journal(error) }
            durable = covered
        }
    }

    /// Records that every slot below `offset` holds the new image. Everything appended before
    /// is flushed first, so a checkpoint on disk proves the records before it are (see open).
    /// The flush and the write happen under the append lock: no record can come between them.
    func checkpoint(_ offset: UInt64) throws(SyncError) {
        let record = UndoJournal.encodeHeader(kind: .checkpoint, offset: offset, length: 0, digest: checkpointTag)
        let after = try end.withLock { (end: inout UInt64) throws(SyncError) -> UInt64 in
            do throws(SystemError) {
                try dataFlush.sync(file)
                try file.write(record, at: end)
            } catch { throw .journal(error) }
            end += UInt64(record.count)
            return end
        }
        try flush(through: after)
    }

    /// Writes the records from `position` on again and flushes them. After a failed flush
    /// (EIO) Linux keeps the unwritten pages in its cache, clean: read back, they look durable,
    /// and a later flush succeeds without writing them. A resume rewrites what follows the last
    /// checkpoint before it overwrites any slot those records undo.
    func rewrite(from position: UInt64) throws(SyncError) {
        let end = size
        var at = position
        while at < end {
            let count = Int(min(UInt64(4 << 20), end - at))
            do throws(SystemError) {
                let bytes = try file.readAll(from: at, count: count)
                guard bytes.count == count else { throw SystemError("read back", path: path, errno: EIO) }
                try file.write(bytes, at: at)
            } catch { throw .journal(error) }
            at += UInt64(count)
        }
        do throws(SystemError) { try file.sync() } catch { throw .journal(error) }
    }

    /// Drops everything after the last good record (a torn tail), so appends continue cleanly.
    func truncateToEnd() throws(SyncError) {
        let at = size
        do throws(SystemError) {
            try file.truncate(to: at)
            try file.sync()
        } catch { throw .journal(error) }
    }

    func readPayload(_ record: Record, into buffer: UnsafeMutableRawBufferPointer) throws(SyncError) {
        do throws(SystemError) {
            let n = try file.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<record.length]), at: record.payloadAt)
            guard n == record.length else { throw SystemError("read the payload at byte \(record.payloadAt) of", path: path, errno: EIO) }
        } catch { throw .journal(error) }
    }

    func close() { file.close() }
}

/// A target's directory in the state directory: its state and its undo journal.
struct SyncStateDirectory {
    let path: String

    init(stateDirectory: String, key: String) {
        path = stateDirectory + "/sync/" + key
    }

    /// The key it is filed under (its name).
    var key: String { String(path[path.index(after: path.lastIndex(of: "/") ?? path.startIndex)...]) }

    var statePath: String { path + "/state.json" }
    var journalPath: String { path + "/journal" }

    func load() throws(SyncError) -> SyncState? {
        guard FileSystem.exists(statePath) else { return nil }
        guard let data = FileManager.default.contents(atPath: statePath) else {
            throw .journal(SystemError("read", path: statePath))
        }
        do {
            return try JSONDecoder().decode(SyncState.self, from: data)
        } catch {
            throw .damagedJournal(path: statePath, why: "it is not a sync state record")
        }
    }

    func save(_ state: SyncState) throws(SyncError) {
        try write(state, to: statePath)
    }

    /// Temporary name, fsync, rename, fsync of the directory.
    func write(_ value: some Encodable, to finalPath: String) throws(SyncError) {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        let bytes = Array((try? encoder.encode(value)) ?? Data())
        do throws(SystemError) {
            try FileSystem.createDirectories(path, permissions: 0o700)
            try FileSystem.replace(finalPath, with: bytes, permissions: 0o600)
            try FileSystem.syncDirectory(path)
        } catch { throw .journal(error) }
    }

    /// Forgets the target's state record (a sync that stopped before changing a target that
    /// had none).
    func removeState() throws(SyncError) {
        do throws(SystemError) {
            try FileSystem.remove(statePath)
            try FileSystem.syncDirectory(path)
        } catch { throw .journal(error) }
    }

    func removeJournal() throws(SyncError) {
        do throws(SystemError) {
            try FileSystem.remove(journalPath)
            try FileSystem.syncDirectory(path)
        } catch { throw .journal(error) }
    }

    /// The state directory entry recorded for `path` when the target itself is gone (a file
    /// created by a sync that was rolled back).
    static func find(stateDirectory: String, canonicalPath: String) -> (SyncStateDirectory, SyncState)? {
        let root = stateDirectory + "/sync"
        guard let names = try? FileSystem.list(root) else { return nil }
        var matches: [(SyncStateDirectory, SyncState)] = []
        for name in names {
            let dir = SyncStateDirectory(path: root + "/" + name)
            if let state = try? dir.load(), state.target == canonicalPath { matches.append((dir, state)) }
        }
        // An unfinished sync first, else the latest.
        return matches.max { a, b in
            (a.1.phase == .running ? 1 : 0, a.1.started) < (b.1.phase == .running ? 1 : 0, b.1.started)
        }
    }

    private init(path: String) {
        self.path = path
    }
}
