import ChunkStore
import Crypto
import Foundation
import Glibc
import Synchronization
import SystemIO

/// A local record of what each slot of a machine's disk held at its last point, kept so that
/// an incremental backup can recognise an unchanged slot without SHA-256: a keyed GHASH tag
/// (GMAC under a random key that never leaves this host's state directory) costs a fifth of a
/// SHA-256, and a slot whose tag equals the recorded one takes the previous point's chunk id.
///
/// Why this is safe: GHASH under a secret key is a universal hash; two different 64 KiB slots
/// collide with probability at most 2^-116, and nobody who can write the disk can see the key
/// or a tag, so nobody can aim for a collision. A file that does not match the parent point
/// (another host's backup, a crash between commit and rename, damage) is ignored: every slot is
/// hashed with SHA-256, as without it.
///
/// Layout (little-endian): magic "LBSLOTF1", 16-byte key, chunk size u32, pad u32, slot count
/// u64, the point id (32 bytes) the tags describe, then 16 bytes per slot (zeros for an
/// all-zero slot). docs/FORMAT.md, "Slot fingerprints".
public final class SlotFingerprints: @unchecked Sendable {
    static let magic = Array("LBSLOTF1".utf8)
    static let headerSize = 72
    public static let tagSize = 16

    let key: SymmetricKey
    private let keyBytes: [UInt8]
    let chunkSize: Int
    /// The previous point's tags, if they describe `parent`.
    private let previous: SystemFile?
    private let previousSlots: Int
    /// The tags of the point being made, written as slots are hashed (nil: only reading).
    private let next: SystemFile?
    private let path: String
    private var closed = false
    /// Slots whose tag matched the record (their SHA-256 was not computed).
    let recognised = Atomic<Int>(0)

    /// `<state>/fingerprints/<vault>/<machine>/<disk>`; names were validated by the caller.
    static func path(stateDirectory: String, vault: String, machine: String, disk: String) -> String {
        "\(stateDirectory)/fingerprints/\(vault)/\(machine)/\(disk)"
    }

    /// Opens the record for a disk's next point. Returns nil when there is no room for it (the
    /// backup works without it).
    static func open(path: String, parent: String?, chunkSize: Int) -> SlotFingerprints? {
        do {
            try FileSystem.createDirectories(FileSystem.parentDirectory(of: path), permissions: 0o700)
            var previous: SystemFile? = nil
            var slots = 0
            var key: [UInt8]? = nil
            if let file = try? SystemFile.open(path, .readOnly) {
                var header = [UInt8](repeating: 0, count: headerSize)
                let n = (try? header.withUnsafeMutableBytes { try file.read(into: $0, at: 0) }) ?? 0
                if n == headerSize, Array(header[0..<8]) == magic {
                    key = Array(header[8..<24])
                    let size = Int(UInt32(littleEndian: header.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 24, as: UInt32.self) }))
                    let count = Int(UInt64(littleEndian: header.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 32, as: UInt64.self) }))
                    let point = Array(header[40..<72])
                    let fileSize = (try? file.size()) ?? 0
                    if let parent, size == chunkSize, point == bytes(fromHex: parent),
                       fileSize == UInt64(headerSize + count * tagSize) {
                        previous = file
                        slots = count
                    }
                }
                if previous == nil { file.close() }
            }
            let keyBytes = key ?? (0..<16).map { _ in UInt8.random(in: 0...255) }
            let temporary = path + ".new"
            try? FileSystem.remove(temporary)
            let next = try SystemFile.open(temporary, .createExclusive(permissions: 0o600))
            return SlotFingerprints(key: keyBytes, chunkSize: chunkSize, previous: previous, previousSlots: slots, next: next, path: path)
        } catch {
            return nil
        }
    }

    /// The record of `point`, for reading only (a delta sync of that point compares a target's
    /// slots with it); nil when the record describes another point or is damaged.
    static func recorded(path: String, point: String, chunkSize: Int) -> SlotFingerprints? {
        guard let file = try? SystemFile.open(path, .readOnly) else { return nil }
        var header = [UInt8](repeating: 0, count: headerSize)
        let n = (try? header.withUnsafeMutableBytes { try file.read(into: $0, at: 0) }) ?? 0
        let size = header.withUnsafeBytes { Int(UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: 24, as: UInt32.self))) }
        let count = header.withUnsafeBytes { Int(UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: 32, as: UInt64.self))) }
        guard n == headerSize, Array(header[0..<8]) == magic, size == chunkSize,
              Array(header[40..<72]) == bytes(fromHex: point),
              (try? file.size()) == UInt64(headerSize + count * tagSize) else {
            file.close()
            return nil
        }
        return SlotFingerprints(key: Array(header[8..<24]), chunkSize: chunkSize, previous: file, previousSlots: count, next: nil, path: path)
    }

    private init(key: [UInt8], chunkSize: Int, previous: SystemFile?, previousSlots: Int, next: SystemFile?, path: String) {
        self.keyBytes = key
        self.key = SymmetricKey(data: key)
        self.chunkSize = chunkSize
        self.previous = previous
        self.previousSlots = previousSlots
        self.next = next
        self.path = path
    }

    deinit { abandon() }

    /// The keyed tag of one slot's bytes.
    public func tag(_ bytes: UnsafeRawBufferPointer, slot: Int) -> [UInt8]? {
        var nonce = [UInt8](repeating: 0, count: 12)
        withUnsafeBytes(of: UInt64(slot).littleEndian) { for i in 0..<8 { nonce[i] = $0[i] } }
        guard let n = try? AES.GCM.Nonce(data: nonce),
              let sealed = try? AES.GCM.seal([UInt8](), using: key, nonce: n, authenticating: bytes) else { return nil }
        return Array(sealed.tag)
    }

    /// The recorded tags of `slots` (16 bytes each), or nil where there are none.
    public func recorded(_ slots: Range<Int>) -> [UInt8]? {
        guard let previous, slots.upperBound <= previousSlots, !slots.isEmpty else { return nil }
        var out = [UInt8](repeating: 0, count: slots.count * Self.tagSize)
        let ok = (try? out.withUnsafeMutableBytes {
            try previous.read(into: $0, at: UInt64(Self.headerSize + slots.lowerBound * Self.tagSize))
        }) == out.count
        return ok ? out : nil
    }

    /// Records the tags of the slots from `first` (safe from several threads: positional writes).
    /// A failed write only costs the next backup its shortcut, so it disables the record.
    private let failed = Atomic<Bool>(false)
    func record(_ tags: [UInt8], from first: Int) {
        guard !tags.isEmpty, !failed.load(ordering: .relaxed) else { return }
        do {
            try next?.write(tags, at: UInt64(Self.headerSize + first * Self.tagSize))
        } catch {
            failed.store(true, ordering: .relaxed)
        }
    }

    /// After the point is committed: the new tags replace the old ones.
    func commit(point: String, slots: Int) {
        guard !closed, let next else { return }
        closed = true
        previous?.close()
        defer { next.close() }
        guard !failed.load(ordering: .relaxed) else {
            try? FileSystem.remove(path + ".new")
            return
        }
        var header = Self.magic + keyBytes
        withUnsafeBytes(of: UInt32(chunkSize).littleEndian) { header += $0 }
        header += [0, 0, 0, 0]
        withUnsafeBytes(of: UInt64(slots).littleEndian) { header += $0 }
        header += bytes(fromHex: point) ?? [UInt8](repeating: 0, count: 32)
        do {
            try next.write(header, at: 0)
            try next.truncate(to: UInt64(Self.headerSize + slots * Self.tagSize))
            try next.sync()
            try FileSystem.rename(path + ".new", to: path)
        } catch {
            try? FileSystem.remove(path + ".new")
        }
    }

    /// The backup failed: the old record stays as it was.
    func abandon() {
        guard !closed else { return }
        closed = true
        previous?.close()
        guard let next else { return }
        next.close()
        try? FileSystem.remove(path + ".new")
    }
}

extension Vault {
    /// The slot tags this host recorded when it backed up `point` (while it is the machine's
    /// latest point here), or nil.
    public func recordedSlotTags(point: RecoveryPoint, disk: String) -> SlotFingerprints? {
        SlotFingerprints.recorded(
            path: SlotFingerprints.path(stateDirectory: stateDirectory, vault: config.id, machine: point.machine, disk: disk),
            point: point.id, chunkSize: config.chunkSize)
    }
}

/// The recorded tags of a run of slots: plaintext read back for one of these slots (from a pack,
/// after decompression) is vouched for by its tag, without SHA-256.
public struct RecordedTags: Sendable {
    let fingerprints: SlotFingerprints
    let first: Int
    let tags: [UInt8]

    /// True when `bytes` are exactly what slot `slot` held when the record was made.
    public func matches(slot: Int, _ bytes: UnsafeRawBufferPointer) -> Bool {
        let size = SlotFingerprints.tagSize
        let k = slot - first
        guard k >= 0, (k + 1) * size <= tags.count else { return false }
        let recorded = tags[(k * size)..<((k + 1) * size)]
        guard recorded.contains(where: { $0 != 0 }), let tag = fingerprints.tag(bytes, slot: slot) else { return false }
        return recorded.elementsEqual(tag)
    }
}

extension SlotFingerprints {
    /// The recorded tags of `slots`, or nil if the record does not cover them.
    public func window(_ slots: Range<Int>) -> RecordedTags? {
        recorded(slots).map { RecordedTags(fingerprints: self, first: slots.lowerBound, tags: $0) }
    }
}
