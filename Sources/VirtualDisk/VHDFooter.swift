import Foundation

/// The 512-byte footer that makes a raw disk a fixed VHD (Microsoft's "Virtual Hard Disk Image
/// Format Specification", hard disk footer): a fixed VHD is the raw bytes followed by it.
/// Computed, never stored. All fields are big-endian.
public enum VHDFooter {
    public static let size = 512

    /// `identity` seeds the footer's UUID (the same point and disk always get the same one).
    public static func make(diskSize: UInt64, time: Date, identity: [UInt8]) -> [UInt8] {
        var f = [UInt8](repeating: 0, count: size)
        func put<T: FixedWidthInteger>(_ value: T, at offset: Int) {
            withUnsafeBytes(of: value.bigEndian) { raw in
                for (i, b) in raw.enumerated() { f[offset + i] = b }
            }
        }
        f.replaceSubrange(0..<8, with: Array("conectix".utf8))   // cookie
        put(UInt32(2), at: 8)                                    // features: reserved bit set
        put(UInt32(0x0001_0000), at: 12)                         // file format version 1.0
        put(UInt64.max, at: 16)                                  // data offset: none (fixed disk)
        let epoch2000 = Date(timeIntervalSince1970: 946_684_800)
        put(UInt32(clamping: max(0, Int(time.timeIntervalSince(epoch2000)))), at: 24)  // timestamp
        // Creator application "win " (as Hyper-V writes): readers such as qemu then take the size
        // from the current-size field instead of rounding it to the CHS geometry.
        f.replaceSubrange(28..<32, with: Array("win ".utf8))
        put(UInt32(0x0001_0000), at: 32)                         // creator version
        f.replaceSubrange(36..<40, with: Array("Wi2k".utf8))     // creator host OS (as qemu writes)
        put(diskSize, at: 40)                                    // original size
        put(diskSize, at: 48)                                    // current size
        let (c, h, s) = geometry(diskSize)
        put(c, at: 56)
        f[58] = h
        f[59] = s
        put(UInt32(2), at: 60)                                   // disk type: fixed
        // UUID (68..<84): version-4 layout from the identity's hash.
        var uuid = Array(identity.prefix(16))
        while uuid.count < 16 { uuid.append(0) }
        uuid[6] = (uuid[6] & 0x0f) | 0x40
        uuid[8] = (uuid[8] & 0x3f) | 0x80
        f.replaceSubrange(68..<84, with: uuid)
        f[84] = 0                                                // saved state
        var sum: UInt32 = 0
        for b in f { sum &+= UInt32(b) }
        put(~sum, at: 64)                                        // checksum: one's complement of the byte sum
        return f
    }

    /// Cylinders, heads, sectors per track, as the specification's appendix computes them.
    static func geometry(_ size: UInt64) -> (UInt16, UInt8, UInt8) {
        var totalSectors = size / 512
        if totalSectors > 65535 * 16 * 255 { totalSectors = 65535 * 16 * 255 }
        var sectorsPerTrack: UInt64, heads: UInt64, cylinderTimesHeads: UInt64
        if totalSectors >= 65535 * 16 * 63 {
            sectorsPerTrack = 255
            heads = 16
            cylinderTimesHeads = totalSectors / sectorsPerTrack
        } else {
            sectorsPerTrack = 17
            cylinderTimesHeads = totalSectors / sectorsPerTrack
            heads = (cylinderTimesHeads + 1023) / 1024
            if heads < 4 { heads = 4 }
            if cylinderTimesHeads >= heads * 1024 || heads > 16 {
                sectorsPerTrack = 31
                heads = 16
                cylinderTimesHeads = totalSectors / sectorsPerTrack
            }
            if cylinderTimesHeads >= heads * 1024 {
                sectorsPerTrack = 63
                heads = 16
                cylinderTimesHeads = totalSectors / sectorsPerTrack
            }
        }
        let cylinders = cylinderTimesHeads / heads
        return (UInt16(min(cylinders, 65535)), UInt8(heads), UInt8(sectorsPerTrack))
    }
}
