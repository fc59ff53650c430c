/// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320), table-driven. GPT checks its headers
/// and entry array with the usual form (`checksum`: start ~0, final ~); LVM2 uses the raw
/// update from its own initial value and no final inversion (`update`).
public enum CRC32 {
    static let table: [UInt32] = (0..<256).map { (n: UInt32) -> UInt32 in
        var c = n
        for _ in 0..<8 { c = c & 1 != 0 ? 0xEDB8_8320 ^ (c >> 1) : c >> 1 }
        return c
    }

    /// Continues `crc` over `bytes`, without pre- or post-inversion.
    public static func update<C: Collection<UInt8>>(_ crc: UInt32, _ bytes: C) -> UInt32 {
        var c = crc
        table.withUnsafeBufferPointer { t in
            for b in bytes { c = t[Int((c ^ UInt32(b)) & 0xFF)] ^ (c >> 8) }
        }
        return c
    }

    /// The standard CRC-32 of `bytes` ("123456789" -> 0xCBF43926).
    public static func checksum<C: Collection<UInt8>>(_ bytes: C) -> UInt32 {
        ~update(0xFFFF_FFFF, bytes)
    }
}
