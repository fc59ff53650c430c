import SystemIO

/// Index objects say which chunks each pack holds, so a reader finds a chunk without opening
/// every pack (docs/FORMAT.md, "Index objects"):
///
///     "LBINDEX1" | pack count u32 | reserved u32 (0)
///     per pack: pack id (32) | entry count u32 | reserved u32 (0) | count x 48-byte PackEntry
///     SHA-256 of everything before (32)
///
/// The object's name is `index/<SHA-256 of its bytes>`. An index object only adds information
/// found in the packs' own directories: it can always be rebuilt from them.
public struct IndexObject: Sendable {
    public var packs: [(pack: ChunkID, entries: [PackEntry])]

    public static let magic: [UInt8] = Array("LBINDEX1".utf8)
    public static let prefix = "index/"

    public init(packs: [(pack: ChunkID, entries: [PackEntry])]) {
        self.packs = packs
    }

    public func encode() -> [UInt8] {
        var out: [UInt8] = IndexObject.magic
        out.appendLE(UInt32(packs.count))
        out.appendLE(UInt32(0))
        for (pack, entries) in packs {
            pack.append(to: &out)
            out.appendLE(UInt32(entries.count))
            out.appendLE(UInt32(0))
            for entry in entries { entry.encode(into: &out) }
        }
        ChunkID.sha256(out).append(to: &out)
        return out
    }

    public static func decode(_ bytes: [UInt8], name: String) throws(ChunkStoreError) -> IndexObject {
        guard bytes.count >= 16 + 32, Array(bytes[0..<8]) == magic else {
            throw .badIndex(name, "not an index object (wrong magic or too short)")
        }
        let body = bytes.count - 32
        let digest = bytes.withUnsafeBytes { ChunkID($0, at: body) }
        let actual = bytes.withUnsafeBytes { ChunkID.sha256(UnsafeRawBufferPointer(rebasing: $0[0..<body])) }
        guard digest == actual else { throw .badIndex(name, "checksum mismatch") }
        return try bytes.withBytes { (raw) throws(ChunkStoreError) -> IndexObject in
            let packCount = Int(raw.loadLE(UInt32.self, at: 8))
            var offset = 16
            var packs: [(pack: ChunkID, entries: [PackEntry])] = []
            for _ in 0..<packCount {
                guard offset + 40 <= body else { throw .badIndex(name, "truncated") }
                let pack = ChunkID(raw, at: offset)
                let count = Int(raw.loadLE(UInt32.self, at: offset + 32))
                offset += 40
                guard count <= (body - offset) / PackEntry.encodedSize else { throw .badIndex(name, "truncated") }
                var entries: [PackEntry] = []
                entries.reserveCapacity(count)
                for _ in 0..<count {
                    let entry = PackEntry.decode(raw, at: offset)
                    guard entry.rawLength <= ChunkStore.maximumRawLength, entry.storedLength <= ChunkStore.maximumStoredLength else {
                        throw .badIndex(name, "an entry of pack \(pack.short) claims \(entry.storedLength) bytes stored, \(entry.rawLength) opened")
                    }
                    entries.append(entry)
                    offset += PackEntry.encodedSize
                }
                packs.append((pack, entries))
            }
            guard offset == body else { throw .badIndex(name, "trailing bytes") }
            return IndexObject(packs: packs)
        }
    }

    public static func objectName(for bytes: [UInt8]) -> String {
        prefix + ChunkID.sha256(bytes).hex
    }
}
