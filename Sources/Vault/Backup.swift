import ChunkStore
import Foundation
import Glibc
import ObjectStore
import Synchronization
import SystemIO

public struct BackupRequest: Sendable {
    public var machine: String
    public var disks: [(name: String, source: SourceSpec)]
    public var time: Date?
    public var preSnapshot: String?
    public var postSnapshot: String?
    public var tags: [String]
    /// Prune keeps the point at least until then.
    public var keepUntil: Date?
    /// The blocks read side by side (`ReadOrder`); small in tests, to interleave small disks.
    var readBlockBytes: UInt64 = 512 << 20

    public init(machine: String, disks: [(name: String, source: SourceSpec)], time: Date? = nil,
                preSnapshot: String? = nil, postSnapshot: String? = nil, tags: [String] = [], keepUntil: Date? = nil) {
        self.keepUntil = keepUntil
        self.machine = machine
        self.disks = disks
        self.time = time
        self.preSnapshot = preSnapshot
        self.postSnapshot = postSnapshot
        self.tags = tags
    }
}

public struct BackupProgress: Sendable {
    public var disk: String
    public var bytesDone: UInt64
    public var bytesTotal: UInt64?
}

/// What a backup did, for the `--json` summary.
public struct BackupReport: Codable, Sendable {
    public var point: String
    public var machine: String
    public var time: String
    public var consistency: Consistency
    public var disks: [PointDisk]
    /// Bytes read from the sources (holes of sparse files are not read).
    public var bytesRead: UInt64
    /// Plaintext bytes of chunks this backup added to the vault.
    public var newBytes: UInt64
    /// What those chunks take in packs, after compression.
    public var storedBytes: UInt64
    public var chunksNew: Int
    public var chunksReused: Int
    /// Reused chunks whose slot was recognised as unchanged by its keyed tag, without SHA-256.
    public var chunksRecognised: Int = 0
    public var packs: Int
    public var seconds: Double
    public var warnings: [String]
}

/// Counters shared by one disk's workers.
final class DiskCounters: Sendable {
    let newChunks = Atomic<Int>(0)
    let reusedChunks = Atomic<Int>(0)
    let holeChunks = Atomic<Int>(0)
    let newBytes = Atomic<UInt64>(0)
    let storedBytes = Atomic<UInt64>(0)
    let dataBytes = Atomic<UInt64>(0)
    let bytesRead = Atomic<UInt64>(0)
    /// Batches whose leaf of the previous point's disk index could not be read: hashed in full.
    let previousUnreadable = Atomic<Int>(0)
}

/// A reusable batch buffer handed from the reader to a worker and back.
// @unchecked: the buffer is owned by exactly one thread at a time; queues hand it over.
final class Batch: @unchecked Sendable {
    let memory: UnsafeMutableRawBufferPointer
    var number = 0
    var firstSlot = 0
    var count = 0
    var holes: [Bool]

    init(bytes: Int, slots: Int) {
        memory = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes, alignment: SystemFile.directAlignment)
        holes = [Bool](repeating: false, count: slots)
    }

    deinit { memory.deallocate() }
}

struct BatchResult: Sendable {
    var number: Int
    var firstSlot: Int
    var ids: [ChunkID]
}

extension Vault {
    /// Makes one recovery point of all the request's disks.
    public func backup(_ request: BackupRequest, progress: @escaping @Sendable (BackupProgress) -> Void = { _ in }) throws(VaultError) -> BackupReport {
        let started = Date()
        try validateName(request.machine, what: "machine")
        guard !request.disks.isEmpty else { throw .invalidArgument("a backup needs at least one --disk NAME=SOURCE") }
        var seen = Set<String>()
        for disk in request.disks {
            try validateName(disk.name, what: "disk")
            guard seen.insert(disk.name).inserted else { throw .invalidArgument("disk \(disk.name) is named twice") }
        }
        for tag in request.tags { try validateName(tag, what: "tag") }
        if request.disks.filter({ if case .standardInput = $0.source { return true } else { return false } }).count > 1 {
            throw .invalidArgument("only one disk can be read from standard input")
        }

        let lock = try MachineLock.acquire(machine: request.machine, operation: "backup", store: store)
        defer { lock.release() }

        var warnings: [String] = []
        var consistency = Consistency.crash
        if let command = request.preSnapshot {
            let status = runHook(command)
            if status == 0 {
                consistency = .application
            } else {
                warnings.append("pre-snapshot command exited with status \(status): the point is crash-consistent")
            }
        }
        defer {
            if let command = request.postSnapshot {
                let status = runHook(command)
                if status != 0 { FileHandle.standardError.write(Data("lifeboat: post-snapshot command exited with status \(status)\n".utf8)) }
            }
        }
        let time = request.time ?? started

        let parent = try points(machine: request.machine).last
        // Chunks in packs that garbage collection is about to delete are stored again.
        let avoiding = try packsPendingDeletion()
        // Read after the lock and the plans: what gc deleted before them is gone from the table.
        do {
            try chunks.reload()
        } catch { throw .chunks(error) }
        let writer = chunks.writer(lanes: max(1, ProcessInfo.processInfo.activeProcessorCount), avoiding: avoiding)
        var disks: [PointDisk] = []
        var bytesRead: UInt64 = 0
        // Each disk's slot tags, kept once the point is committed.
        var made: [(SlotFingerprints, Int)] = []
        defer { for (f, _) in made { f.abandon() } }
        do {
            for (name, spec) in request.disks {
                let previous = parent.flatMap { p in p.disks.first { $0.name == name && $0.chunkSize == config.chunkSize } }
                let fingerprints = SlotFingerprints.open(
                    path: SlotFingerprints.path(stateDirectory: stateDirectory, vault: config.id, machine: request.machine, disk: name),
                    parent: previous == nil ? nil : parent?.id, chunkSize: config.chunkSize)
                let (disk, read, unreadable) = try backupDisk(name: name, spec: spec, previous: previous, fingerprints: fingerprints,
                                                              writer: writer, readBlockBytes: request.readBlockBytes, progress: progress)
                if unreadable > 0 {
                    warnings.append("disk \(name): \(unreadable) parts of the previous point's index could not be read (run `lifeboat check`); "
                                    + "their slots were hashed and compared in full")
                }
                disks.append(disk)
                bytesRead += read
                if let fingerprints { made.append((fingerprints, disk.slotCount)) }
            }
            let (packs, _) = try writer.finish()
            let point = RecoveryPoint(
                format: RecoveryPoint.currentFormat, machine: request.machine, time: Timestamp.format(time),
                created: Timestamp.format(Date()), host: hostName(), consistency: consistency,
                tags: request.tags, parent: parent?.id, keepUntil: request.keepUntil.map(Timestamp.format), disks: disks)
            let bytes = point.encoded()
            let id = ChunkID.sha256(bytes).hex
            // The commit: everything the manifest names is durable by now, and kept by gc while
            // the lock holds.
            try lock.confirm()
            try store.put(RecoveryPoint.objectName(machine: request.machine, id: id), bytes)
            chunks.refresh()
            for (fingerprints, slots) in made { fingerprints.commit(point: id, slots: slots) }
            return BackupReport(
                point: id, machine: request.machine, time: point.time, consistency: consistency, disks: disks,
                bytesRead: bytesRead, newBytes: point.newBytes, storedBytes: point.storedBytes,
                chunksNew: disks.reduce(0) { $0 + $1.newChunks }, chunksReused: disks.reduce(0) { $0 + $1.reusedChunks },
                chunksRecognised: made.reduce(0) { $0 + $1.0.recognised.load(ordering: .relaxed) },
                packs: packs, seconds: Date().timeIntervalSince(started), warnings: warnings)
        } catch {
            writer.abandon()
            throw VaultError.wrapping(error)
        }
    }

    /// The order in which a disk's batches are read: two blocks of `block` batches side by side,
    /// a batch of one, then a batch of the other, then the next two blocks. A disk's regions
    /// differ (text that zstd works hard on, random data it does not even try, holes), and
    /// reading two at once keeps both the cores and the disk busy where one region alone would
    /// leave one of them waiting. The disk index is built in slot order, so the ids of the second
    /// block wait for the first: at most `block` batches' ids, whatever the disk's size.
    struct ReadOrder {
        /// nil: a source of unknown size (standard input), read in order.
        let batches: Int?
        let block: Int

        /// The batch read `k`-th, or nil past the end.
        func batch(_ k: Int) -> Int? {
            guard let batches else { return k }
            guard k < batches else { return nil }
            let pair = k / (2 * block), at = k % (2 * block)
            let first = pair * 2 * block
            let second = max(0, min(block, batches - first - block))   // the second block's length
            if at < 2 * second { return first + (at % 2 == 0 ? at / 2 : block + at / 2) }
            return first + second + (at - 2 * second)                  // the first block's rest
        }
    }

    /// Reads one disk through the pipeline: reader thread -> hashing/compressing workers -> this
    /// thread, which puts the ids back in slot order and builds the disk index.
    private func backupDisk(name: String, spec: SourceSpec, previous: PointDisk?, fingerprints: SlotFingerprints?, writer: ChunkWriter,
                            readBlockBytes: UInt64,
                            progress: @escaping @Sendable (BackupProgress) -> Void) throws(VaultError) -> (PointDisk, UInt64, Int) {
        let source = try DiskSource(spec)
        defer { source.close() }
        let chunkSize = config.chunkSize
        let slotsPerBatch = max(1, (4 << 20) / chunkSize)
        let workerCount = max(1, ProcessInfo.processInfo.activeProcessorCount)
        // Files and devices are read by several threads at once (O_DIRECT has no readahead, and
        // the device needs several requests in flight to reach its speed); standard input by one.
        // 12 readers and 4 spare batches against 8 and 2: a day-2 incremental 5-7% faster (11
        // interleaved pairs, medians 1.51/1.55 s against 1.63), peak RSS 170 MB against 145.
        let readerCount = source.size == nil ? 1 : 12
        // Enough batches for every reader and worker to hold one, and a few waiting.
        let batchCount = readerCount + workerCount * 2 + 4
        let free = BoundedQueue<Batch>(capacity: batchCount)
        for _ in 0..<batchCount { free.push(Batch(bytes: slotsPerBatch * chunkSize, slots: slotsPerBatch)) }
        let filled = BoundedQueue<Batch>(capacity: batchCount)
        let results = BoundedQueue<BatchResult>(capacity: batchCount * 2)
        let failure = Mutex<VaultError?>(nil)
        let counters = DiskCounters()
        let previousIndex = previous.map { reader($0) }
        let previousSlots = previous?.slotCount ?? 0

        @Sendable func fail(_ error: VaultError) {
            failure.withLock { if $0 == nil { $0 = error } }
            free.close()
            filled.close()
        }

        let sourceBox = SourceBox(source)
        let batchBytes = UInt64(slotsPerBatch * chunkSize)
        let order = ReadOrder(batches: source.size.map { Int(($0 + batchBytes - 1) / batchBytes) },
                              block: max(1, Int(readBlockBytes / batchBytes)))
        let nextBatch = Atomic<Int>(0)
        let readersLeft = Atomic<Int>(readerCount)
        let readers = (0..<readerCount).map { n in
            Worker(name: "backup-read-\(n)") {
                while let batch = free.pop() {
                    if Cancellation.requested { fail(.interrupted); break }
                    guard let number = order.batch(nextBatch.add(1, ordering: .relaxed).oldValue) else {
                        free.push(batch)
                        break
                    }
                    do throws(VaultError) {
                        let start = UInt64(number) * batchBytes
                        if let size = sourceBox.source.size, start >= size && !(size == 0 && number == 0) {
                            free.push(batch)
                            break
                        }
                        let n = try sourceBox.source.read(at: start, into: batch.memory, chunkSize: chunkSize, holes: &batch.holes)
                        if n == 0 { free.push(batch); break }
                        batch.number = number
                        batch.firstSlot = number * slotsPerBatch
                        batch.count = n
                        counters.bytesRead.add(UInt64(n), ordering: .relaxed)
                        filled.push(batch)
                        if sourceBox.source.size == nil && sourceBox.source.ended { break }
                    } catch {
                        fail(error)
                        break
                    }
                }
                if readersLeft.subtract(1, ordering: .acquiringAndReleasing).newValue == 0 { filled.close() }
            }
        }

        let active = Atomic<Int>(workerCount)
        let compression = config.parameters.compression
        let workers = (0..<workerCount).map { n in
            Worker(name: "backup-hash-\(n)") {
                let compressor: ChunkCompressor? = {
                    if case .zstd(let level) = compression { return ChunkCompressor(level: level) }
                    return nil
                }()
                while let batch = filled.pop() {
                    do {
                        let ids = try Vault.processBatch(batch, chunkSize: chunkSize, previous: previousIndex,
                                                         previousSlots: previousSlots, fingerprints: fingerprints, writer: writer,
                                                         compressor: compressor, counters: counters, lane: n)
                        let result = BatchResult(number: batch.number, firstSlot: batch.firstSlot, ids: ids)
                        free.push(batch)
                        results.push(result)
                    } catch let error as VaultError {
                        fail(error)
                    } catch let error as ChunkStoreError {
                        fail(.chunks(error))
                    } catch {
                        fail(.invalidArgument("\(error)"))
                    }
                }
                if active.subtract(1, ordering: .acquiringAndReleasing).newValue == 0 { results.close() }
            }
        }

        // In-order assembly of the disk index on this thread.
        let sink = IndexSink(writer: writer, compression: compression, counters: counters)
        var index = DiskIndexWriter(sink: sink)
        var waiting: [Int: BatchResult] = [:]
        var next = 0
        var slots = 0
        var processed: UInt64 = 0   // slots hashed, in any order: the progress
        var assemblyError: VaultError? = nil
        while let result = results.pop() {
            if assemblyError != nil { continue }
            waiting[result.number] = result
            processed += UInt64(result.ids.count)
            progress(BackupProgress(disk: name, bytesDone: min(processed * UInt64(chunkSize), source.size ?? UInt64.max),
                                    bytesTotal: source.size))
            while let ready = waiting.removeValue(forKey: next) {
                do {
                    for id in ready.ids { try index.append(id) }
                } catch let error as ChunkStoreError {
                    assemblyError = .chunks(error)
                    fail(.chunks(error))
                } catch {
                    assemblyError = .invalidArgument("\(error)")
                    fail(.invalidArgument("\(error)"))
                }
                slots += ready.ids.count
                next += 1
            }
        }
        for reader in readers { reader.join() }
        for worker in workers { worker.join() }
        if let error = failure.withLock({ $0 }) { throw error }
        if let error = assemblyError { throw error }

        let size = counters.bytesRead.load(ordering: .relaxed)
        if let expected = source.size, size != expected {
            throw .sourceShort(path: spec.description, expected: expected, got: size)
        }
        try source.checkNotShrunk()
        let (root, depth): (ChunkID, Int)
        do {
            (root, depth) = try index.finish()
        } catch let error as ChunkStoreError {
            throw .chunks(error)
        } catch {
            throw .invalidArgument("\(error)")
        }
        let disk = PointDisk(
            name: name, size: size, chunkSize: chunkSize, indexRoot: root.hex, indexDepth: depth,
            dataBytes: counters.dataBytes.load(ordering: .relaxed),
            newBytes: counters.newBytes.load(ordering: .relaxed),
            storedBytes: counters.storedBytes.load(ordering: .relaxed),
            newChunks: counters.newChunks.load(ordering: .relaxed),
            reusedChunks: counters.reusedChunks.load(ordering: .relaxed),
            holeChunks: counters.holeChunks.load(ordering: .relaxed))
        var bytesRead = size
        if source.sparse { bytesRead = counters.dataBytes.load(ordering: .relaxed) }
        return (disk, bytesRead, counters.previousUnreadable.load(ordering: .relaxed))
    }

    /// Hashes every slot of a batch; stores the chunks that are new to the vault.
    static func processBatch(_ batch: Batch, chunkSize: Int, previous: DiskIndexReader?, previousSlots: Int,
                             fingerprints: SlotFingerprints? = nil, writer: ChunkWriter, compressor: ChunkCompressor?, counters: DiskCounters, lane: Int) throws -> [ChunkID] {
        let slots = (batch.count + chunkSize - 1) / chunkSize
        var ids = [ChunkID](repeating: .zero, count: slots)
        var previousLeaf: (first: Int, ids: [ChunkID])? = nil
        if let previous, batch.firstSlot < previousSlots {
            // A damaged parent costs this batch its shortcut, not the backup: a new point is the
            // way out of it.
            do {
                previousLeaf = try previous.leaf(containing: batch.firstSlot)
            } catch {
                counters.previousUnreadable.add(1, ordering: .relaxed)
            }
        }
        var holes = 0, reused = 0, fresh = 0
        var data: UInt64 = 0, newBytes: UInt64 = 0, stored: UInt64 = 0
        let tagSize = SlotFingerprints.tagSize
        let recorded = previousLeaf == nil ? nil : fingerprints?.window(batch.firstSlot..<(batch.firstSlot + slots))
        var tags = fingerprints == nil ? [] : [UInt8](repeating: 0, count: slots * tagSize)
        defer { fingerprints?.record(tags, from: batch.firstSlot) }
        func slotBytes(_ s: Int) -> UnsafeRawBufferPointer {
            UnsafeRawBufferPointer(rebasing: batch.memory[(s * chunkSize)..<min(s * chunkSize + chunkSize, batch.count)])
        }
        // A slot with its id: reused from the previous point or the vault, or stored.
        func settle(_ s: Int, _ id: ChunkID) throws {
            ids[s] = id
            let slot = batch.firstSlot + s
            if writer.avoiding.isEmpty, let leaf = previousLeaf, slot - leaf.first < leaf.ids.count, leaf.ids[slot - leaf.first] == id {
                reused += 1
                return
            }
            guard try writer.claim(id) else {
                reused += 1
                return
            }
            let bytes = slotBytes(s)
            stored += UInt64(try storeClaimed(id: id, bytes: bytes, writer: writer, compressor: compressor, lane: lane))
            fresh += 1
            newBytes += UInt64(bytes.count)
        }
        // Slots waiting for SHA-256, hashed four at a time (`ChunkID.sha256(each:)`).
        var pending: [Int] = []
        pending.reserveCapacity(4)
        func hashPending() throws {
            let hashed = ChunkID.sha256(each: pending.map(slotBytes))
            for (k, s) in pending.enumerated() { try settle(s, hashed[k]) }
            pending.removeAll(keepingCapacity: true)
        }
        for s in 0..<slots {
            let bytes = slotBytes(s)
            if batch.holes[s] || isAllZero(bytes) {
                holes += 1
                continue
            }
            data += UInt64(bytes.count)
            let slot = batch.firstSlot + s
            // The previous point's id where the keyed tag says the slot is unchanged; SHA-256 otherwise.
            if let fingerprints, let tag = fingerprints.tag(bytes, slot: slot) {
                tags.replaceSubrange((s * tagSize)..<((s + 1) * tagSize), with: tag)
                if let recorded, let leaf = previousLeaf, slot - leaf.first < leaf.ids.count,
                   !leaf.ids[slot - leaf.first].isZero, recorded.matches(slot: slot, tag: tag) {
                    fingerprints.recognised.add(1, ordering: .relaxed)
                    try settle(s, leaf.ids[slot - leaf.first])
                    continue
                }
            }
            pending.append(s)
            if pending.count == 4 { try hashPending() }
        }
        try hashPending()
        counters.holeChunks.add(holes, ordering: .relaxed)
        counters.reusedChunks.add(reused, ordering: .relaxed)
        counters.newChunks.add(fresh, ordering: .relaxed)
        counters.dataBytes.add(data, ordering: .relaxed)
        counters.newBytes.add(newBytes, ordering: .relaxed)
        counters.storedBytes.add(stored, ordering: .relaxed)
        return ids
    }
}

extension VaultError {
    /// The errors a point's writing can meet, as a VaultError.
    static func wrapping(_ error: any Error) -> VaultError {
        switch error {
        case let error as VaultError: return error
        case let error as ChunkStoreError: return .chunks(error)
        case let error as ObjectStoreError: return .store(error)
        default: return .invalidArgument("\(error)")
        }
    }
}

/// Compresses (when it pays) and adds a data chunk the caller has claimed, straight into its
/// pack; returns the bytes stored.
func storeClaimed(id: ChunkID, bytes: UnsafeRawBufferPointer, writer: ChunkWriter, compressor: ChunkCompressor?,
                  lane: Int) throws(ChunkStoreError) -> Int {
    try writer.add(id: id, rawLength: bytes.count, capacity: bytes.count, lane: lane) { destination in
        if let count = compressor?.compress(bytes, into: destination) {
            return (count, ChunkFlags(raw: ChunkFlags.dataChunk | ChunkFlags.zstd))
        }
        return PackBuilder.copying(bytes, flags: ChunkFlags(raw: ChunkFlags.dataChunk | ChunkFlags.stored))(destination)
    }
}

// @unchecked: standard input is read by one thread only; files and devices with pread,
// which is safe from several threads.
final class SourceBox: @unchecked Sendable {
    let source: DiskSource
    init(_ source: DiskSource) { self.source = source }
}

/// Stores disk index nodes as index chunks in the same session.
struct IndexSink: IndexNodeSink {
    let writer: ChunkWriter
    let compressor: ChunkCompressor?
    let counters: DiskCounters

    init(writer: ChunkWriter, compression: CompressionSetting, counters: DiskCounters) {
        self.writer = writer
        self.counters = counters
        if case .zstd(let level) = compression { compressor = ChunkCompressor(level: level) } else { compressor = nil }
    }

    func store(node: [UInt8]) throws -> ChunkID {
        let id = ChunkID.sha256(node)
        guard try writer.claim(id) else { return id }
        var flags = ChunkFlags(raw: ChunkFlags.indexChunk | ChunkFlags.stored)
        var stored = node
        if let compressed = node.withUnsafeBytes({ compressor?.compressed($0) }) {
            stored = compressed
            flags.raw = ChunkFlags.indexChunk | ChunkFlags.zstd
        }
        try writer.add(id: id, stored: stored, rawLength: node.count, flags: flags)
        counters.newBytes.add(UInt64(node.count), ordering: .relaxed)
        counters.storedBytes.add(UInt64(stored.count), ordering: .relaxed)
        return id
    }
}

/// Runs a hook through the shell, its output on our standard error; returns the exit status.
func runHook(_ command: String) -> Int32 {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/bin/sh")
    process.arguments = ["-c", command]
    process.standardOutput = FileHandle.standardError
    do {
        try process.run()
    } catch {
        return 127
    }
    process.waitUntilExit()
    return process.terminationStatus
}
