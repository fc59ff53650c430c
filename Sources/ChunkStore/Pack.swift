import SystemIO

/// What a stored chunk holds and how its bytes are encoded; one byte in pack directories.
public struct ChunkFlags: Sendable, Hashable {
    public var raw: UInt8
    public init(raw: UInt8) { self.raw = raw }

    /// Bits 0-3: encoding of the stored bytes.
    public static let stored: UInt8 = 0      // plaintext as is
    public static let zstd: UInt8 = 1        // one zstd frame
    /// Bits 4-7: what the plaintext is.
    public static let dataChunk: UInt8 = 0x00   // a slot of a disk
    public static let indexChunk: UInt8 = 0x10  // a node of a disk index tree (ids)

    public var encoding: UInt8 { raw & 0x0f }
    public var content: UInt8 { raw & 0xf0 }
}

/// One chunk inside a pack, as the pack directory and index objects record it.
/// Encoded in 48 bytes: id (32) | offset u32 | stored length u32 | raw length u32 | flags u8 | 3 zero bytes.
public struct PackEntry: Sendable, Hashable {
    public var id: ChunkID
    public var offset: UInt32
    public var storedLength: UInt32
    public var rawLength: UInt32
    public var flags: ChunkFlags

    public static let encodedSize = 48

    public init(id: ChunkID, offset: UInt32, storedLength: UInt32, rawLength: UInt32, flags: ChunkFlags) {
        self.id = id
        self.offset = offset
        self.storedLength = storedLength
        self.rawLength = rawLength
        self.flags = flags
    }

    func encode(into out: inout [UInt8]) {
        id.append(to: &out)
        out.appendLE(offset)
        out.appendLE(storedLength)
        out.appendLE(rawLength)
        out.append(flags.raw)
        out.append(contentsOf: [0, 0, 0])
    }

    static func decode(_ raw: UnsafeRawBufferPointer, at o: Int) -> PackEntry {
        PackEntry(
            id: ChunkID(raw, at: o),
            offset: raw.loadLE(UInt32.self, at: o + 32),
            storedLength: raw.loadLE(UInt32.self, at: o + 36),
            rawLength: raw.loadLE(UInt32.self, at: o + 40),
            flags: ChunkFlags(raw: raw[o + 44])
        )
    }
}

/// The pack format (docs/FORMAT.md, "Packs"):
///
///     header   8 bytes  "LBPACK01"
///     gap      0 to 64 zero bytes (see PackBuilder.finish)
///     blobs    stored chunks back to back
///     directory  count x 48-byte PackEntry
///     trailer 56 bytes: directory offset u64 | count u32 | reserved u32 (0) |
///                       SHA-256 of the directory (32) | "LBPKEND1"
///
/// A pack's object name is the SHA-256 of its directory (the trailer's digest): the directory
/// lists every chunk's id, offset and length, so it names the content without hashing it twice.
public enum PackFormat {
    public static let headerMagic: [UInt8] = Array("LBPACK01".utf8)
    public static let trailerMagic: [UInt8] = Array("LBPKEND1".utf8)
    public static let trailerSize = 56
    public static let headerSize = 8
    /// The most bytes a writer leaves between the header and the first chunk (see PackBuilder.finish).
    public static let maximumGap = 64
    /// Packs are flushed when they reach this size.
    public static let targetSize = 16 << 20

    public static func objectName(_ id: ChunkID) -> String {
        let hex = id.hex
        return "packs/" + hex.prefix(2) + "/" + hex
    }

    public static func id(fromObjectName name: String) -> ChunkID? {
        guard name.hasPrefix("packs/"), let last = name.split(separator: "/").last else { return nil }
        return ChunkID(hex: String(last))
    }

    public struct Trailer: Sendable {
        public let directoryOffset: UInt64
        public let count: UInt32
        public let directoryDigest: ChunkID
    }

    public static func parseTrailer(_ bytes: [UInt8], packSize: UInt64, pack: String) throws(ChunkStoreError) -> Trailer {
        guard bytes.count == trailerSize else { throw .badPack(pack, "too short for a trailer") }
        return try bytes.withBytes { (raw) throws(ChunkStoreError) -> Trailer in
            guard Array(raw[48..<56]) == trailerMagic else { throw .badPack(pack, "no pack trailer (wrong magic)") }
            let offset = raw.loadLE(UInt64.self, at: 0)
            let count = raw.loadLE(UInt32.self, at: 8)
            let expected = UInt64(count) * UInt64(PackEntry.encodedSize)
            // Checked without overflow: the offset is read from a file that may be damaged.
            guard offset >= UInt64(headerSize), offset <= packSize, packSize - offset >= UInt64(trailerSize),
                  packSize - offset - UInt64(trailerSize) == expected else {
                throw .badPack(pack, "directory size \(expected) at \(offset) does not fit the pack size \(packSize)")
            }
            return Trailer(directoryOffset: offset, count: count, directoryDigest: ChunkID(raw, at: 16))
        }
    }

    /// Parses and checks a directory against its trailer: digest, and every entry inside the blob area.
    public static func parseDirectory(_ bytes: [UInt8], trailer: Trailer, pack: String) throws(ChunkStoreError) -> [PackEntry] {
        guard ChunkID.sha256(bytes) == trailer.directoryDigest else {
            throw .badPack(pack, "pack directory does not match its checksum")
        }
        var entries: [PackEntry] = []
        entries.reserveCapacity(Int(trailer.count))
        try bytes.withBytes { (raw) throws(ChunkStoreError) in
            for i in 0..<Int(trailer.count) {
                let entry = PackEntry.decode(raw, at: i * PackEntry.encodedSize)
                let end = UInt64(entry.offset) + UInt64(entry.storedLength)
                guard entry.offset >= UInt32(headerSize), end <= trailer.directoryOffset else {
                    throw .badPack(pack, "entry \(i) lies outside the blob area")
                }
                // Readers allocate what an entry claims: a damaged or crafted one must not make them try 4 GiB.
                guard entry.rawLength <= ChunkStore.maximumRawLength, entry.storedLength <= ChunkStore.maximumStoredLength else {
                    throw .badPack(pack, "entry \(i) claims \(entry.storedLength) bytes stored, \(entry.rawLength) opened")
                }
                entries.append(entry)
            }
        }
        return entries
    }
}

/// Accumulates stored chunks into one pack, in one page-aligned buffer that is reused for the
/// next pack (so packs can be written without a page-cache copy, and memory stays fixed).
// @unchecked: owned by one thread at a time; the chunk writer hands it over through queues.
public final class PackBuilder: @unchecked Sendable {
    private let memory: UnsafeMutableRawBufferPointer
    public private(set) var size = 0
    public private(set) var entries: [PackEntry] = []
    public private(set) var id: ChunkID? = nil

    /// A builder that holds at least one chunk of `maxChunk` bytes beyond the target size.
    public init(maxChunk: Int) {
        memory = UnsafeMutableRawBufferPointer.allocate(
            byteCount: PackFormat.targetSize + maxChunk + (1 << 20), alignment: SystemFile.directAlignment)
        reset()
    }

    deinit { memory.deallocate() }

    public func reset() {
        size = PackFormat.headerSize
        UnsafeMutableRawBufferPointer(rebasing: memory[0..<PackFormat.headerSize]).copyBytes(from: PackFormat.headerMagic)
        entries.removeAll(keepingCapacity: true)
        id = nil
    }

    public var isEmpty: Bool { entries.isEmpty }

    /// True when the pack has reached its target size.
    public var isFull: Bool { size + entries.count * PackEntry.encodedSize >= PackFormat.targetSize }

    /// True when a chunk of `count` stored bytes still fits with the directory and trailer.
    public func fits(_ count: Int) -> Bool {
        size + count + (entries.count + 1) * PackEntry.encodedSize + PackFormat.trailerSize + PackFormat.maximumGap <= memory.count
    }

    /// Adds a chunk whose stored form `fill` writes in place (at most `capacity` bytes);
    /// returns the bytes it wrote.
    @discardableResult
    public func add(id: ChunkID, rawLength: Int, capacity: Int, fill: (UnsafeMutableRawBufferPointer) -> (count: Int, flags: ChunkFlags)) -> Int {
        precondition(fits(capacity) && self.id == nil)
        let (count, flags) = fill(UnsafeMutableRawBufferPointer(rebasing: memory[size..<(size + capacity)]))
        precondition(count <= capacity)
        entries.append(PackEntry(id: id, offset: UInt32(size), storedLength: UInt32(count), rawLength: UInt32(rawLength), flags: flags))
        size += count
        return count
    }

    public func add(id: ChunkID, stored: UnsafeRawBufferPointer, rawLength: Int, flags: ChunkFlags) {
        add(id: id, rawLength: rawLength, capacity: stored.count, fill: PackBuilder.copying(stored, flags: flags))
    }

    /// The fill that stores `stored` as it is.
    public static func copying(_ stored: UnsafeRawBufferPointer, flags: ChunkFlags) -> (UnsafeMutableRawBufferPointer) -> (count: Int, flags: ChunkFlags) {
        { destination in
            UnsafeMutableRawBufferPointer(rebasing: destination[0..<stored.count]).copyMemory(from: stored)
            return (stored.count, flags)
        }
    }

    public func add(id: ChunkID, stored: [UInt8], rawLength: Int, flags: ChunkFlags) {
        stored.withUnsafeBytes { add(id: id, stored: $0, rawLength: rawLength, flags: flags) }
    }

    /// Appends directory and trailer; returns the pack's id. `bytes` is then the whole pack.
    /// A pack whose name would be one of `avoiding` (a pack a pending gc plan deletes: the same
    /// chunks in the same order make the same directory) is written with a gap after its header,
    /// which moves every offset and so gives it another name: gc never deletes a pack written
    /// after its plan.
    @discardableResult
    public func finish(avoiding: Set<ChunkID> = []) -> ChunkID {
        if let id { return id }
        var gap = 0
        while !avoiding.isEmpty, gap < PackFormat.maximumGap, avoiding.contains(ChunkID.sha256(encodedDirectory(shiftedBy: gap))) { gap += 1 }
        if gap > 0 {
            let start = PackFormat.headerSize
            let blobs = UnsafeRawBufferPointer(rebasing: memory[start..<size])
            UnsafeMutableRawBufferPointer(rebasing: memory[(start + gap)..<(size + gap)]).copyMemory(from: blobs)
            UnsafeMutableRawBufferPointer(rebasing: memory[start..<(start + gap)]).initializeMemory(as: UInt8.self, repeating: 0)
            size += gap
            for i in entries.indices { entries[i].offset += UInt32(gap) }
        }
        let directory = encodedDirectory(shiftedBy: 0)
        let directoryOffset = UInt64(size)
        var trailer: [UInt8] = []
        trailer.appendLE(directoryOffset)
        trailer.appendLE(UInt32(entries.count))
        trailer.appendLE(UInt32(0))
        let digest = ChunkID.sha256(directory)
        digest.append(to: &trailer)
        trailer.append(contentsOf: PackFormat.trailerMagic)
        for part in [directory, trailer] {
            UnsafeMutableRawBufferPointer(rebasing: memory[size..<(size + part.count)]).copyBytes(from: part)
            size += part.count
        }
        id = digest
        return digest
    }

    /// The directory as it would be with every chunk `shift` bytes further on.
    private func encodedDirectory(shiftedBy shift: Int) -> [UInt8] {
        var directory: [UInt8] = []
        directory.reserveCapacity(entries.count * PackEntry.encodedSize)
        for var entry in entries {
            entry.offset += UInt32(shift)
            entry.encode(into: &directory)
        }
        return directory
    }

    /// The pack's bytes so far (all of it after `finish()`).
    public var bytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(rebasing: memory[0..<size]) }
}
