/// Little-endian fields of on-disk structures, read with a bounds check: nil when the field
/// does not lie inside the bytes (a crafted offset must never trap).
extension Array where Element == UInt8 {
    public func le16(at offset: Int) -> UInt16? {
        guard offset >= 0, offset <= count - 2 else { return nil }
        return UInt16(self[offset]) | UInt16(self[offset + 1]) << 8
    }

    public func le32(at offset: Int) -> UInt32? {
        guard offset >= 0, offset <= count - 4 else { return nil }
        var v: UInt32 = 0
        for i in (0..<4).reversed() { v = v << 8 | UInt32(self[offset + i]) }
        return v
    }

    public func le64(at offset: Int) -> UInt64? {
        guard offset >= 0, offset <= count - 8 else { return nil }
        var v: UInt64 = 0
        for i in (0..<8).reversed() { v = v << 8 | UInt64(self[offset + i]) }
        return v
    }

    /// `length` bytes at `offset`, or nil when they are not all there.
    public func bytes(at offset: Int, _ length: Int) -> ArraySlice<UInt8>? {
        guard offset >= 0, length >= 0, offset <= count - length else { return nil }
        return self[offset..<(offset + length)]
    }
}
