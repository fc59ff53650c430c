import CHashing
import Crypto
import SystemIO

/// A chunk's identity: SHA-256 of its plaintext (HMAC-SHA-256 under the vault's id key once
/// vaults are encrypted). All zero bytes means "a hole": an all-zero chunk, never stored.
public struct ChunkID: Hashable, Comparable, Sendable, CustomStringConvertible {
    // Four big-endian words: comparing them in order compares the bytes lexicographically.
    public let w0: UInt64, w1: UInt64, w2: UInt64, w3: UInt64

    public static let byteCount = 32
    public static let zero = ChunkID(w0: 0, w1: 0, w2: 0, w3: 0)

    public init(w0: UInt64, w1: UInt64, w2: UInt64, w3: UInt64) {
        self.w0 = w0; self.w1 = w1; self.w2 = w2; self.w3 = w3
    }

    /// Reads 32 bytes at `offset`.
    public init(_ raw: UnsafeRawBufferPointer, at offset: Int = 0) {
        w0 = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
        w1 = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: offset + 8, as: UInt64.self))
        w2 = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: offset + 16, as: UInt64.self))
        w3 = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: offset + 24, as: UInt64.self))
    }

    public init?(bytes: [UInt8]) {
        guard bytes.count == 32 else { return nil }
        self = bytes.withUnsafeBytes { ChunkID($0) }
    }

    public init?(hex: String) {
        guard hex.utf8.count == 64, let raw = SystemIO.bytes(fromHex: hex) else { return nil }
        self.init(bytes: raw)
    }

    public var isZero: Bool { (w0 | w1 | w2 | w3) == 0 }

    public var bytes: [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(32)
        append(to: &out)
        return out
    }

    public func append(to out: inout [UInt8]) {
        withUnsafeBytes(of: w0.bigEndian) { out.append(contentsOf: $0) }
        withUnsafeBytes(of: w1.bigEndian) { out.append(contentsOf: $0) }
        withUnsafeBytes(of: w2.bigEndian) { out.append(contentsOf: $0) }
        withUnsafeBytes(of: w3.bigEndian) { out.append(contentsOf: $0) }
    }

    public func store(to raw: UnsafeMutableRawBufferPointer, at offset: Int) {
        raw.storeBytes(of: w0.bigEndian, toByteOffset: offset, as: UInt64.self)
        raw.storeBytes(of: w1.bigEndian, toByteOffset: offset + 8, as: UInt64.self)
        raw.storeBytes(of: w2.bigEndian, toByteOffset: offset + 16, as: UInt64.self)
        raw.storeBytes(of: w3.bigEndian, toByteOffset: offset + 24, as: UInt64.self)
    }

    public var hex: String { bytes.hex }
    public var description: String { hex }
    public var short: String { String(hex.prefix(12)) }

    public static func < (a: ChunkID, b: ChunkID) -> Bool {
        if a.w0 != b.w0 { return a.w0 < b.w0 }
        if a.w1 != b.w1 { return a.w1 < b.w1 }
        if a.w2 != b.w2 { return a.w2 < b.w2 }
        return a.w3 < b.w3
    }

    public func hash(into hasher: inout Hasher) {
        // Already uniformly distributed: one word is enough.
        hasher.combine(w1)
    }

    /// SHA-256 of `data`.
    public static func sha256(_ data: UnsafeRawBufferPointer) -> ChunkID {
        SHA256.hash(data: data).withUnsafeBytes { ChunkID($0) }
    }

    public static func sha256(_ data: [UInt8]) -> ChunkID {
        data.withUnsafeBytes { sha256($0) }
    }

    /// Whether `sha256(each:)` hashes several inputs at once on this CPU (the SHA extensions).
    public static let hashesInLanes = lb_sha256_lanes_available() != 0

    /// SHA-256 of each input. Runs of inputs of the same length are hashed four (or two) at a
    /// time where the CPU has the SHA extensions, about twice as fast as one at a time
    /// (Sources/CHashing); the rest one by one.
    public static func sha256(each inputs: [UnsafeRawBufferPointer]) -> [ChunkID] {
        var ids = [ChunkID](repeating: .zero, count: inputs.count)
        var i = 0
        withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 4 * byteCount) { digests in
            withUnsafeTemporaryAllocation(of: UnsafePointer<UInt8>?.self, capacity: 4) { pointers in
                while i < inputs.count {
                    let length = inputs[i].count
                    var run = 1
                    while hashesInLanes && length > 0 && run < 4 && i + run < inputs.count && inputs[i + run].count == length { run += 1 }
                    let lanes = run == 4 ? 4 : run >= 2 ? 2 : 1
                    if lanes > 1 {
                        for l in 0..<lanes { pointers[l] = inputs[i + l].baseAddress?.assumingMemoryBound(to: UInt8.self) }
                        if lb_sha256_lanes(pointers.baseAddress, lanes, length, digests.baseAddress) != 0 {
                            let raw = UnsafeRawBufferPointer(digests)
                            for l in 0..<lanes { ids[i + l] = ChunkID(raw, at: l * byteCount) }
                            i += lanes
                            continue
                        }
                    }
                    ids[i] = sha256(inputs[i])
                    i += 1
                }
            }
        }
        return ids
    }
}

/// True when every byte is zero.
@inline(__always)
public func isAllZero(_ data: UnsafeRawBufferPointer) -> Bool {
    var i = 0
    let n = data.count
    guard let base = data.baseAddress else { return true }
    // Word-wise OR; the compiler vectorises this loop.
    var acc: UInt64 = 0
    while i + 64 <= n {
        for k in stride(from: 0, to: 64, by: 8) {
            acc |= base.loadUnaligned(fromByteOffset: i + k, as: UInt64.self)
        }
        if acc != 0 { return false }
        i += 64
    }
    while i < n {
        if base.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }
        i += 1
    }
    return true
}
