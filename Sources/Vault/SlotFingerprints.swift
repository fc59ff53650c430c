import CHashing
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
    /// The key expanded for the GMAC kernel (Sources/CHashing), where the CPU has AES-NI and
    /// VPCLMULQDQ: the same tags as BoringSSL's, about twice as fast. nil: BoringSSL computes them.
    private let kernelKey: UnsafeMutablePointer<lb_gmac_key>?
    var usesKernel: Bool { kernelKey != nil }
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

    /// The record's first 72 bytes.
    private struct Header {
        var key: [UInt8]
        var chunkSize: Int
        var slots: Int
        var point: [UInt8]

        /// The header of an intact record (its length matches its slot count), or nil.
        static func read(from file: SystemFile) -> Header? {
            var raw = [UInt8](repeating: 0, count: headerSize)
            guard (try? raw.withUnsafeMutableBytes { try file.read(into: $0, at: 0) }) == headerSize,
                  Array(raw[0..<8]) == magic else { return nil }
            // A damaged record is ignored, never trusted nor trapped on: the slot count is checked
            // before it is used in arithmetic.
            let slots = raw.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: 32, as: UInt64.self)) }
            guard slots <= 1 << 40 else { return nil }
            let header = raw.withUnsafeBytes {
                Header(key: Array(raw[8..<24]),
                       chunkSize: Int(UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: 24, as: UInt32.self))),
                       slots: Int(slots),
                       point: Array(raw[40..<72]))
            }
            guard (try? file.size()) == UInt64(headerSize + header.slots * tagSize) else { return nil }
            return header
        }

        func describes(point id: String, chunkSize: Int) -> Bool {
            self.chunkSize == chunkSize && point == bytes(fromHex: id)
        }

        var encoded: [UInt8] {
            var out = magic + key
            withUnsafeBytes(of: UInt32(chunkSize).littleEndian) { out += $0 }
            out += [0, 0, 0, 0]
            withUnsafeBytes(of: UInt64(slots).littleEndian) { out += $0 }
            return out + point
        }
    }

    /// Opens the record for a disk's next point, reading the one of `parent` if it is there.
    /// Returns nil when there is no room for it (the backup works without it).
    static func open(path: String, parent: String?, chunkSize: Int) -> SlotFingerprints? {
        do {
            try FileSystem.createDirectories(FileSystem.parentDirectory(of: path), permissions: 0o700)
            let file = try? SystemFile.open(path, .readOnly)
            let header = file.flatMap { Header.read(from: $0) }
            let usable = parent.map { header?.describes(point: $0, chunkSize: chunkSize) == true } ?? false
            if !usable { file?.close() }
            let temporary = path + ".new"
            try? FileSystem.remove(temporary)
            let next = try SystemFile.open(temporary, .createExclusive(permissions: 0o600))
            return SlotFingerprints(key: header?.key ?? (0..<16).map { _ in UInt8.random(in: 0...255) }, chunkSize: chunkSize,
                                    previous: usable ? file : nil, previousSlots: usable ? header?.slots ?? 0 : 0,
                                    next: next, path: path)
        } catch {
            return nil
        }
    }

    /// The record of `point`, for reading only (a delta sync of that point compares a target's
    /// slots with it); nil when the record describes another point or is damaged.
    static func recorded(path: String, point: String, chunkSize: Int) -> SlotFingerprints? {
        guard let file = try? SystemFile.open(path, .readOnly) else { return nil }
        guard let header = Header.read(from: file), header.describes(point: point, chunkSize: chunkSize) else {
            file.close()
            return nil
        }
        return SlotFingerprints(key: header.key, chunkSize: chunkSize, previous: file, previousSlots: header.slots, next: nil, path: path)
    }

    private init(key: [UInt8], chunkSize: Int, previous: SystemFile?, previousSlots: Int, next: SystemFile?, path: String) {
        self.keyBytes = key
        self.key = SymmetricKey(data: key)
        let expanded = UnsafeMutablePointer<lb_gmac_key>.allocate(capacity: 1)
        if key.count == 16, key.withUnsafeBufferPointer({ lb_gmac_init(expanded, $0.baseAddress) }) != 0 {
            kernelKey = expanded
        } else {
            expanded.deallocate()
            kernelKey = nil
        }
        self.chunkSize = chunkSize
        self.previous = previous
        self.previousSlots = previousSlots
        self.next = next
        self.path = path
    }

    deinit {
        abandon()
        kernelKey?.deallocate()
    }

    /// The keyed tag of one slot's bytes: the AES-128-GCM tag of no plaintext, the bytes as
    /// associated data, the slot number as the nonce.
    public func tag(_ bytes: UnsafeRawBufferPointer, slot: Int) -> [UInt8]? {
        guard let kernelKey else { return referenceTag(bytes, slot: slot) }
        // 12 bytes: the slot number, then zeros.
        return withUnsafeBytes(of: (UInt64(slot).littleEndian, UInt32(0))) { nonce in
            [UInt8](unsafeUninitializedCapacity: Self.tagSize) { tag, count in
                lb_gmac(kernelKey, nonce.baseAddress?.assumingMemoryBound(to: UInt8.self),
                        bytes.baseAddress?.assumingMemoryBound(to: UInt8.self), bytes.count, tag.baseAddress)
                count = Self.tagSize
            }
        }
    }

    /// The same tag through BoringSSL (CPUs without the kernel's instructions; the tests' reference).
    func referenceTag(_ bytes: UnsafeRawBufferPointer, slot: Int) -> [UInt8]? {
        // 12 bytes: the slot number, then zeros.
        let nonce = withUnsafeBytes(of: (UInt64(slot).littleEndian, UInt32(0))) { try? AES.GCM.Nonce(data: $0) }
        guard let nonce, let sealed = try? AES.GCM.seal([UInt8](), using: key, nonce: nonce, authenticating: bytes) else { return nil }
        return Array(sealed.tag)
    }

    /// The recorded tags of `slots` (16 bytes each), or nil where there are none.
    private func recorded(_ slots: Range<Int>) -> [UInt8]? {
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
        let header = Header(key: keyBytes, chunkSize: chunkSize, slots: slots,
                            point: bytes(fromHex: point) ?? [UInt8](repeating: 0, count: 32))
        do {
            try next.write(header.encoded, at: 0)
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
        guard recordedTag(slot) != nil, let tag = fingerprints.tag(bytes, slot: slot) else { return false }
        return matches(slot: slot, tag: tag)
    }

    /// The same, for a tag already computed.
    public func matches(slot: Int, tag: [UInt8]) -> Bool {
        recordedTag(slot)?.elementsEqual(tag) ?? false
    }

    /// The recorded tag of `slot`; nil outside the window or for an all-zero slot.
    private func recordedTag(_ slot: Int) -> ArraySlice<UInt8>? {
        let size = SlotFingerprints.tagSize
        let k = slot - first
        guard k >= 0, (k + 1) * size <= tags.count else { return nil }
        let recorded = tags[(k * size)..<((k + 1) * size)]
        return recorded.contains(where: { $0 != 0 }) ? recorded : nil
    }
}

extension SlotFingerprints {
    /// The recorded tags of `slots`, or nil if the record does not cover them.
    public func window(_ slots: Range<Int>) -> RecordedTags? {
        recorded(slots).map { RecordedTags(fingerprints: self, first: slots.lowerBound, tags: $0) }
    }
}
