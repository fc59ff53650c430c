/// Several images read one after the other as one disk (a logical volume made of several
/// segments).
public struct DiskConcatenation: DiskImage {
    public let parts: [any DiskImage]
    /// Where each part starts in the whole.
    let starts: [UInt64]
    public let size: UInt64

    public init(_ parts: [any DiskImage]) {
        self.parts = parts
        var starts: [UInt64] = []
        var total: UInt64 = 0
        for part in parts {
            starts.append(total)
            total += part.size
        }
        self.starts = starts
        size = total
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(VirtualDiskError) -> Int {
        var done = 0
        while done < buffer.count, offset + UInt64(done) < size {
            let position = offset + UInt64(done)
            // The last part starting at or before `position`.
            var low = 0, high = starts.count - 1
            while low < high {
                let mid = (low + high + 1) / 2
                if starts[mid] <= position { low = mid } else { high = mid - 1 }
            }
            let part = parts[low]
            let within = position - starts[low]
            guard within < part.size else { break }  // an empty part at the very end
            let n = Int(min(UInt64(buffer.count - done), part.size - within))
            let got = try part.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + n)]), at: within)
            if got == 0 { break }
            done += got
        }
        return done
    }
}
