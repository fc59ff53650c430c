import ChunkStore
import Foundation
import Glibc
import Synchronization
import SystemIO

public struct RestoreProgress: Sendable {
    public var bytesDone: UInt64
    public var bytesTotal: UInt64
}

public struct RestoreReport: Codable, Sendable {
    public var point: String
    public var disk: String
    public var target: String
    public var size: UInt64
    /// Bytes written to the target (holes in a new file are not written).
    public var bytesWritten: UInt64
    public var seconds: Double
}

extension Vault {
    /// Writes a point's disk to a file or block device. A new file gets holes for all-zero chunks
    /// and appears under its name only when complete; every chunk is verified before it is written.
    public func restore(point: RecoveryPoint, disk name: String, to path: String, overwrite: Bool = false,
                        progress: @escaping @Sendable (RestoreProgress) -> Void = { _ in }) throws(VaultError) -> RestoreReport {
        let started = Date()
        let disk = try point.disk(name)
        var st = stat()
        let exists = stat(path, &st) == 0
        let isDevice = exists && (st.st_mode & S_IFMT) == S_IFBLK
        if exists && !isDevice {
            guard (st.st_mode & S_IFMT) == S_IFREG else { throw .invalidArgument("target \(path) is neither a regular file nor a block device") }
            guard overwrite else { throw .targetExists(path) }
        }

        let file: UncachedFile
        let partial = path + ".lifeboat-partial"
        do {
            if isDevice {
                file = try UncachedFile(path, .readWrite)
                let size = try file.buffered.size()
                guard size >= disk.size else {
                    file.close()
                    throw VaultError.targetTooSmall(path: path, size: size, needed: disk.size)
                }
            } else {
                try? FileSystem.remove(partial)
                file = try UncachedFile(partial, .createExclusive(permissions: 0o644))
                try file.buffered.truncate(to: disk.size)
            }
        } catch let error as SystemError {
            throw .target(error)
        } catch let error as VaultError {
            throw error
        } catch {
            throw .invalidArgument("\(error)")
        }

        do throws(VaultError) {
            if !isDevice { try allocateData(of: disk, in: file.buffered) }
            let written = try writeDisk(point: point, disk: disk, to: file, writeHoles: isDevice, progress: progress)
            do throws(SystemError) {
                try file.buffered.sync()
                file.close()
                if !isDevice {
                    try FileSystem.rename(partial, to: path)
                    try FileSystem.syncDirectory(FileSystem.parentDirectory(of: FileSystem.absolute(path)))
                }
            } catch { throw .target(error) }
            return RestoreReport(point: point.id, disk: name, target: path, size: disk.size, bytesWritten: written,
                                 seconds: Date().timeIntervalSince(started))
        } catch {
            file.close()
            if !isDevice { try? FileSystem.remove(partial) }
            throw error
        }
    }

    /// Allocates the runs of data slots of a new file before they are written: ext4 lets direct
    /// writes run side by side only into allocated blocks (into holes they take turns), and a
    /// target without the space fails here, before a byte is written.
    func allocateData(of disk: PointDisk, in file: SystemFile) throws(VaultError) {
        let chunkSize = UInt64(disk.chunkSize)
        var run: Range<UInt64>? = nil
        var supported = true
        func flush() throws(SystemError) {
            guard let r = run, supported else { return }
            run = nil
            supported = try file.allocate(at: r.lowerBound, length: r.upperBound - r.lowerBound)
        }
        do {
            try reader(disk).forEachLeaf { first, ids in
                if Cancellation.requested { throw VaultError.interrupted }
                for (i, id) in ids.enumerated() where !id.isZero {
                    let start = UInt64(first + i) * chunkSize
                    let end = min(start + chunkSize, disk.size)
                    if let r = run, r.upperBound == start { run = r.lowerBound..<end; continue }
                    try flush()
                    run = start..<end
                }
                guard supported else { throw AllocationStopped() }
            }
            try flush()
        } catch is AllocationStopped {
            return
        } catch let error as SystemError {
            throw .target(error)
        } catch {
            throw .wrapping(error)
        }
    }

    private struct AllocationStopped: Error {}

    /// Writes every slot of `disk` into `file` with parallel readers; zero slots only if `writeHoles`.
    func writeDisk(point: RecoveryPoint, disk: PointDisk, to file: UncachedFile, writeHoles: Bool,
                   progress: @escaping @Sendable (RestoreProgress) -> Void) throws(VaultError) -> UInt64 {
        let chunkSize = disk.chunkSize
        let index = reader(disk)
        let work = BoundedQueue<(first: Int, ids: [ChunkID])>(capacity: 8)
        let failure = Mutex<VaultError?>(nil)
        let written = Atomic<UInt64>(0)
        let done = Atomic<UInt64>(0)
        let chunks = self.chunks
        let label = point.label
        let tags = recordedSlotTags(point: point, disk: disk.name)

        @Sendable func fail(_ error: VaultError) {
            failure.withLock { if $0 == nil { $0 = error } }
            work.close()
        }
        @Sendable func range(_ slot: Int) -> ClosedRange<UInt64> {
            let start = UInt64(slot) * UInt64(chunkSize)
            return start...(min(start + UInt64(chunkSize), disk.size) - 1)
        }

        let step = max(1, (4 << 20) / chunkSize)
        // A worker waits on the vault's disk and then on the target's: enough of them that both
        // disks have requests in flight while the cores decode (4 per core restored day 4 of the
        // bench about 10% faster than 2 per core, 7 pairs back to back; each holds ~12 MiB).
        let workerCount = max(2, 4 * ProcessInfo.processInfo.activeProcessorCount + 1)
        let workers = (0..<workerCount).map { n in
            Worker(name: "restore-\(n)") {
                // Each batch is decoded into one aligned buffer, then written in runs of
                // consecutive slots with O_DIRECT: few large writes, no page-cache copies.
                let scratch = ReadScratch()
                let batch = UnsafeMutableRawBufferPointer.allocate(byteCount: step * chunkSize, alignment: SystemFile.directAlignment)
                defer { batch.deallocate() }
                while let (first, ids) = work.pop() {
                    let base = UInt64(first) * UInt64(chunkSize)
                    let length = Int(min(UInt64(ids.count * chunkSize), disk.size - base))
                    func slotBuffer(_ i: Int) -> UnsafeMutableRawBufferPointer {
                        let from = i * chunkSize
                        return UnsafeMutableRawBufferPointer(rebasing: batch[from..<min(from + chunkSize, length)])
                    }
                    do {
                        let present = ids.indices.filter { !ids[$0].isZero }
                        // Chunks this host backed up are vouched for by their slot tags.
                        let window = tags?.window(first..<(first + ids.count))
                        try chunks.readMany(present.map { ids[$0] }, scratch: scratch,
                                            matches: window.map { w in { k, bytes in w.matches(slot: first + present[k], bytes) } }) { k, _ in
                            slotBuffer(present[k])
                        }
                        if writeHoles {
                            for i in ids.indices where ids[i].isZero { slotBuffer(i).initializeMemory(as: UInt8.self, repeating: 0) }
                            try file.write(UnsafeRawBufferPointer(rebasing: batch[0..<length]), at: base)
                            written.add(UInt64(length), ordering: .relaxed)
                        } else {
                            var i = 0
                            while i < ids.count {
                                if ids[i].isZero { i += 1; continue }
                                var j = i
                                while j < ids.count && !ids[j].isZero { j += 1 }
                                let from = i * chunkSize, to = min(j * chunkSize, length)
                                try file.write(UnsafeRawBufferPointer(rebasing: batch[from..<to]), at: base + UInt64(from))
                                written.add(UInt64(to - from), ordering: .relaxed)
                                i = j
                            }
                        }
                        let total = done.add(UInt64(length), ordering: .relaxed).newValue
                        progress(RestoreProgress(bytesDone: total, bytesTotal: disk.size))
                    } catch let error as ChunkStoreError {
                        switch error {
                        case .damagedChunk(let id, _, _, _), .missingChunk(let id):
                            let slot = first + (ids.firstIndex(of: id) ?? 0)
                            fail(.damagedPoint(point: label, disk: disk.name, range: range(slot), cause: error.description))
                        default:
                            fail(.chunks(error))
                        }
                    } catch let error as SystemError {
                        fail(.target(error))
                    } catch {
                        fail(.invalidArgument("\(error)"))
                    }
                }
            }
        }

        do {
            try index.forEachLeaf { first, ids in
                if Cancellation.requested { throw VaultError.interrupted }
                var i = 0
                while i < ids.count {
                    let end = min(i + step, ids.count)
                    if !work.push((first + i, Array(ids[i..<end]))) { return }
                    i = end
                }
            }
        } catch let error as VaultError {
            fail(error)
        } catch let error as ChunkStoreError {
            fail(.chunks(error))
        } catch {
            fail(.invalidArgument("\(error)"))
        }
        work.close()
        for worker in workers { worker.join() }
        if let error = failure.withLock({ $0 }) { throw error }
        return written.load(ordering: .relaxed)
    }
}
