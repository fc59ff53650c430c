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
    private let level: Int32
    private var output: [UInt8] = []

    public init(level: Int32) {
        context = ZSTD_createCCtx()
        self.level = level
    }

    deinit { ZSTD_freeCCtx(context) }

    /// Compresses `data`; returns nil when compression would not save at least 1/32 of the size
    /// (the chunk is then stored as it is). Chunks that look random are not tried at all.
    public func compress(_ data: UnsafeRawBufferPointer) -> [UInt8]? {
        if data.count >= 16384 && looksIncompressible(data) { return nil }
        let bound = ZSTD_compressBound(data.count)
        if output.count < bound { output = [UInt8](repeating: 0, count: bound) }
        let written = output.withUnsafeMutableBytes { out in
            ZSTD_compressCCtx(context, out.baseAddress, bound, data.baseAddress, data.count, level)
        }
        guard ZSTD_isError(written) == 0, written < data.count - data.count / 32 else { return nil }
        return Array(output[0..<written])
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
    var counts = (0..<256).map { _ in 0 }
    let stride = (data.count - 256) / 15
    counts.withUnsafeMutableBufferPointer { c in
        for sample in 0..<16 {
            let start = sample * stride
            for i in start..<(start + 256) { c[Int(data[i])] += 1 }
        }
    }
    // Sum of n*log2(n) over the bins; entropy = log2(N) - sum/N with N = 4096.
    var sum = 0.0
    for n in counts where n > 1 { sum += Double(n) * log2(Double(n)) }
    let entropy = 12.0 - sum / 4096.0
    return entropy > 7.5
}
