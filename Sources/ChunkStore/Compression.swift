import CZstd
import Foundation

/// How chunks are compressed, a vault parameter: `none` or `zstd:LEVEL`.
public enum CompressionSetting: Sendable, Equatable, CustomStringConvertible {
    case none
    case zstd(level: Int32)

    public init?(_ text: String) {
        if text == "none" { self = .none; return }
        let parts = text.split(separator: ":")
        guard parts.first == "zstd" else { return nil }
        if parts.count == 1 { self = .zstd(level: 3); return }
        guard parts.count == 2, let level = Int32(parts[1]), level >= -7, level <= 19 else { return nil }
        self = .zstd(level: level)
    }

    public var description: String {
        switch self {
        case .none: return "none"
        case .zstd(let level): return "zstd:\(level)"
        }
    }
}

/// A reusable zstd compression context; one per thread (not Sendable).
public final class ChunkCompressor {
    private let context: OpaquePointer
    /// At level 1, inputs up to 64 KiB (a default chunk) are compressed with a hash table of
    /// 4,096 entries (16 KiB, which stays in a core's L1 cache) instead of zstd's 8,192: on the
    /// bench's day-0 image, 8% less compression time for 0.4% more bytes.
    private let smallTable: Bool

    public init(level: Int32) {
        context = ZSTD_createCCtx()
        ZSTD_CCtx_setParameter(context, ZSTD_c_compressionLevel, level)
        smallTable = level == 1
    }

    deinit { ZSTD_freeCCtx(context) }

    /// Compresses `data` into `destination`; returns the bytes written, or nil when compression
    /// would not save at least 1/32 of the size (the chunk is then stored as it is). Chunks that
    /// look random are not tried at all.
    public func compress(_ data: UnsafeRawBufferPointer, into destination: UnsafeMutableRawBufferPointer) -> Int? {
        if data.count >= 16384 && looksIncompressible(data) { return nil }
        // zstd stops with an error where the output would not fit: a chunk that does not
        // shrink enough is not compressed to the end.
        let limit = min(destination.count, data.count - data.count / 32 - 1)
        guard limit > 0 else { return nil }
        // 0 restores zstd's choice for the input's size.
        ZSTD_CCtx_setParameter(context, ZSTD_c_hashLog, smallTable && data.count <= 65536 ? 12 : 0)
        let written = ZSTD_compress2(context, destination.baseAddress, limit, data.baseAddress, data.count)
        return ZSTD_isError(written) == 0 ? written : nil
    }

    /// The compressed bytes as an array, or nil (see `compress(_:into:)`).
    public func compressed(_ data: UnsafeRawBufferPointer) -> [UInt8]? {
        var count: Int? = nil
        let bytes = [UInt8](unsafeUninitializedCapacity: max(1, data.count)) { buffer, initialized in
            count = compress(data, into: UnsafeMutableRawBufferPointer(buffer))
            initialized = count ?? 0
        }
        return count == nil ? nil : bytes
    }
}

public enum ZstdError: Error {
    case failed(String)
}

/// A reusable zstd decompression context; one per thread (ZSTD_decompress would allocate and
/// initialise a new one, about 100 KiB, for every chunk).
public final class ChunkDecompressor {
    let context: OpaquePointer

    public init() { context = ZSTD_createDCtx() }

    deinit { ZSTD_freeDCtx(context) }
}

/// Decompresses one zstd frame into `output`, which must be exactly the expected size.
public func zstdDecompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer,
                           context: ChunkDecompressor? = nil) -> Result<Int, ZstdError> {
    let n = context.map { ZSTD_decompressDCtx($0.context, output.baseAddress, output.count, input.baseAddress, input.count) }
        ?? ZSTD_decompress(output.baseAddress, output.count, input.baseAddress, input.count)
    if ZSTD_isError(n) != 0 {
        return .failure(.failed(String(cString: ZSTD_getErrorName(n))))
    }
    return .success(n)
}

/// Estimates the byte entropy of 16 samples of 256 bytes spread over the chunk. Random or
/// already-compressed data measures about 7.95 bits per byte; text and binaries much less.
/// Trying zstd on a random chunk costs as much as compressing a real one, for nothing.
@inline(__always)
func looksIncompressible(_ data: UnsafeRawBufferPointer) -> Bool {
    // Four tables, one per byte of a 32-bit word: increments of the same count follow each
    // other less often, so the stores and loads of the count do not wait on each other.
    withUnsafeTemporaryAllocation(of: UInt16.self, capacity: 1024) { counts in
        counts.initialize(repeating: 0)
        let stride = (data.count - 256) / 15
        for sample in 0..<16 {
            let start = sample * stride
            for word in 0..<64 {
                let w = data.loadUnaligned(fromByteOffset: start + 4 * word, as: UInt32.self)
                counts[Int(w & 0xff)] &+= 1
                counts[256 + Int((w >> 8) & 0xff)] &+= 1
                counts[512 + Int((w >> 16) & 0xff)] &+= 1
                counts[768 + Int(w >> 24)] &+= 1
            }
        }
        // Sum of n*log2(n) over the bins; entropy = log2(N) - sum/N with N = 4096.
        var sum = 0.0
        nLog2n.withUnsafeBufferPointer { table in
            for b in 0..<256 {
                let n = Int(counts[b] &+ counts[256 + b] &+ counts[512 + b] &+ counts[768 + b])
                sum += table[n]
            }
        }
        let entropy = 12.0 - sum / 4096.0
        return entropy > 7.5
    }
}

/// n * log2(n) for the counts of the entropy estimate (0...4096).
private let nLog2n: [Double] = (0...4096).map { $0 < 2 ? 0 : Double($0) * log2(Double($0)) }
