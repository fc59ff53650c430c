import ChunkStore
import Foundation
import Glibc
import ObjectStore
import Synchronization
import SystemIO

public struct CheckProblem: Codable, Sendable {
    public var object: String
    public var message: String
}

/// A byte range of a point's disk that cannot be restored.
public struct DamagedRange: Codable, Sendable {
    public var point: String
    public var machine: String
    public var time: String
    public var disk: String
    public var start: UInt64
    public var end: UInt64
    public var reason: String
}

public struct CheckReport: Codable, Sendable {
    public var points = 0
    public var packs = 0
    public var indexObjects = 0
    public var chunksVerified = 0
    public var bytesVerified: UInt64 = 0
    public var errors: [CheckProblem] = []
    public var warnings: [CheckProblem] = []
    public var damaged: [DamagedRange] = []
    public var ok: Bool { errors.isEmpty && damaged.isEmpty }
}

public struct CheckProgress: Sendable {
    public var bytesDone: UInt64
    public var bytesTotal: UInt64
}

extension Vault {
    /// Verifies the vault without trusting the local cache or anything the writer did: index
    /// objects, pack directories, every point's disk index; with `readData`, every chunk's bytes
    /// against its id. Damage is reported as points, disks and byte ranges.
    public func check(readData: Bool, progress: @escaping @Sendable (CheckProgress) -> Void = { _ in }) throws(VaultError) -> CheckReport {
        var report = CheckReport()
        let packListing: [ObjectInfo]
        let indexListing: [ObjectInfo]
        do {
            packListing = try store.list(prefix: "packs/")
            indexListing = try store.list(prefix: IndexObject.prefix)
        } catch { throw .store(error) }
        report.packs = packListing.count
        report.indexObjects = indexListing.count
        var packSizes: [ChunkID: UInt64] = [:]
        for object in packListing {
            guard let id = PackFormat.id(fromObjectName: object.name), PackFormat.objectName(id) == object.name else {
                report.warnings.append(CheckProblem(object: object.name, message: "unexpected object name under packs/"))
                continue
            }
            packSizes[id] = object.size
        }

        // Index objects: decode each; remember a digest of each pack's entry list.
        var badIndexes = Set<String>()
        var indexedPacks: [ChunkID: ChunkID] = [:]
        var badPacks = Set<ChunkID>()
        for object in indexListing {
            do {
                let index = try IndexObject.decode(try store.get(object.name), name: object.name)
                for (pack, entries) in index.packs {
                    indexedPacks[pack] = entriesDigest(entries)
                    if packSizes[pack] == nil {
                        report.errors.append(CheckProblem(object: object.name, message: "names pack \(pack.short), which is missing"))
                        badPacks.insert(pack)
                    }
                }
            } catch let error as ChunkStoreError {
                report.errors.append(CheckProblem(object: object.name, message: error.description))
                badIndexes.insert(object.name)
            } catch let error as ObjectStoreError {
                report.errors.append(CheckProblem(object: object.name, message: error.description))
                badIndexes.insert(object.name)
            } catch {}
        }

        // Pack directories against the index objects.
        for (pack, size) in packSizes.sorted(by: { $0.key < $1.key }) {
            let name = PackFormat.objectName(pack)
            do {
                let entries = try chunks.packDirectory(name, size: size)
                if let expected = indexedPacks[pack] {
                    if expected != entriesDigest(entries) {
                        report.errors.append(CheckProblem(object: name, message: "its directory differs from the index object that lists it"))
                        badPacks.insert(pack)
                    }
                } else {
                    report.warnings.append(CheckProblem(object: name, message: "no index object lists this pack (left by an interrupted backup; garbage collection removes it, or lists it again if points need its chunks)"))
                }
            } catch {
                report.errors.append(CheckProblem(object: name, message: error.description))
                badPacks.insert(pack)
            }
        }

        // A private location table built from the index objects that passed.
        let scratch = NSTemporaryDirectory() + "lifeboat-check-" + UUID().uuidString
        defer { removeTree(scratch) }
        let checked: ChunkStore
        do {
            checked = try ChunkStore(store: store, parameters: config.parameters, cacheDirectory: scratch,
                                     acceptIndex: { !badIndexes.contains($0) })
        } catch { throw .chunks(error) }

        // Every chunk's bytes.
        var damagedIDs = Set<ChunkID>()
        if readData {
            let total = packSizes.values.reduce(0, +)
            let (ids, problems, chunks, bytes) = verifyPacks(packSizes.keys.sorted(), sizes: packSizes, total: total, progress: progress)
            damagedIDs = ids
            report.errors += problems
            report.chunksVerified = chunks
            report.bytesVerified = bytes
        }

        // Points and the ranges of their disks that cannot be read back.
        let points = try self.points(damaged: { name, error in
            report.errors.append(CheckProblem(object: name, message: error.description))
        })
        report.points = points.count
        for point in points {
            for disk in point.disks {
                report.damaged += damagedRanges(point: point, disk: disk, chunks: checked, badPacks: badPacks, damagedIDs: damagedIDs)
            }
        }
        return report
    }


    /// Reads whole packs in parallel; returns the ids of chunks that failed, and problems found.
    private func verifyPacks(_ packs: [ChunkID], sizes: [ChunkID: UInt64], total: UInt64,
                             progress: @escaping @Sendable (CheckProgress) -> Void) -> (Set<ChunkID>, [CheckProblem], Int, UInt64) {
        struct Found { var ids = Set<ChunkID>(); var problems: [CheckProblem] = []; var chunks = 0 }
        let found = Mutex(Found())
        let next = Atomic<Int>(0)
        let done = Atomic<UInt64>(0)
        let store = self.store
        let workers = (0..<max(2, ProcessInfo.processInfo.activeProcessorCount)).map { n in
            Worker(name: "check-\(n)") {
                while true {
                    let i = next.add(1, ordering: .relaxed).oldValue
                    guard i < packs.count else { break }
                    let pack = packs[i]
                    let name = PackFormat.objectName(pack)
                    let size = sizes[pack] ?? 0
                    var local = Found()
                    do {
                        let bytes = try store.get(name)
                        guard bytes.count >= PackFormat.headerSize + PackFormat.trailerSize else {
                            throw ChunkStoreError.badPack(name, "only \(bytes.count) bytes long")
                        }
                        let trailer = try PackFormat.parseTrailer(Array(bytes[(bytes.count - PackFormat.trailerSize)...]), packSize: UInt64(bytes.count), pack: name)
                        if trailer.directoryDigest != pack {
                            local.problems.append(CheckProblem(object: name, message: "its directory does not match its name"))
                        }
                        let dirStart = Int(trailer.directoryOffset)
                        let entries = try PackFormat.parseDirectory(Array(bytes[dirStart..<(dirStart + Int(trailer.count) * PackEntry.encodedSize)]), trailer: trailer, pack: name)
                        var output = [UInt8]()
                        bytes.withUnsafeBytes { raw in
                            for entry in entries {
                                let location = ChunkLocation(pack: pack, offset: entry.offset, storedLength: entry.storedLength,
                                                             rawLength: entry.rawLength, flags: entry.flags)
                                if output.count < Int(entry.rawLength) { output = [UInt8](repeating: 0, count: Int(entry.rawLength)) }
                                let stored = UnsafeRawBufferPointer(rebasing: raw[Int(entry.offset)..<(Int(entry.offset) + Int(entry.storedLength))])
                                do throws(ChunkStoreError) {
                                    try output.withMutableBytes { (out) throws(ChunkStoreError) in
                                        try ChunkStore.open(id: entry.id, location: location, stored: stored,
                                                            into: UnsafeMutableRawBufferPointer(rebasing: out[0..<Int(entry.rawLength)]))
                                    }
                                    local.chunks += 1
                                } catch {
                                    local.ids.insert(entry.id)
                                    local.problems.append(CheckProblem(object: name, message: error.description))
                                }
                            }
                        }
                    } catch let error as LifeboatError {
                        local.problems.append(CheckProblem(object: name, message: error.description))
                    } catch {
                        local.problems.append(CheckProblem(object: name, message: "\(error)"))
                    }
                    found.withLock { f in
                        f.ids.formUnion(local.ids)
                        f.problems += local.problems
                        f.chunks += local.chunks
                    }
                    let total2 = done.add(size, ordering: .relaxed).newValue
                    progress(CheckProgress(bytesDone: total2, bytesTotal: total))
                }
            }
        }
        for worker in workers { worker.join() }
        return found.withLock { ($0.ids, $0.problems, $0.chunks, done.load(ordering: .relaxed)) }
    }

    private func damagedRanges(point: RecoveryPoint, disk: PointDisk, chunks: ChunkStore,
                               badPacks: Set<ChunkID>, damagedIDs: Set<ChunkID>) -> [DamagedRange] {
        var ranges: [DamagedRange] = []
        let chunkSize = UInt64(disk.chunkSize)
        func add(_ slot: Int, _ count: Int, _ reason: String) {
            let start = UInt64(slot) * chunkSize
            let end = min(UInt64(slot + count) * chunkSize, disk.size) - 1
            if var last = ranges.last, last.end + 1 == start, last.reason == reason {
                last.end = end
                ranges[ranges.count - 1] = last
            } else {
                ranges.append(DamagedRange(point: point.id, machine: point.machine, time: point.time, disk: disk.name,
                                           start: start, end: end, reason: reason))
            }
        }
        let reader = DiskIndexReader(disk: disk, chunks: chunks)
        var slot = 0
        while slot < disk.slotCount {
            let leaf: (first: Int, ids: [ChunkID])
            do {
                leaf = try reader.leaf(containing: slot)
            } catch {
                // The index node for this region cannot be read: the whole leaf's span is lost.
                let first = slot - slot % DiskIndex.fanout
                let count = min(DiskIndex.fanout, disk.slotCount - first)
                add(first, count, "disk index: \(error.description)")
                slot = first + count
                continue
            }
            for (i, id) in leaf.ids.enumerated() where !id.isZero {
                if damagedIDs.contains(id) {
                    add(leaf.first + i, 1, "chunk \(id.short) is damaged")
                    continue
                }
                do {
                    guard let location = try chunks.location(id) else {
                        add(leaf.first + i, 1, "chunk \(id.short) is missing")
                        continue
                    }
                    if badPacks.contains(location.pack) {
                        add(leaf.first + i, 1, "chunk \(id.short) is in damaged pack \(location.pack.short)")
                    }
                } catch {
                    add(leaf.first + i, 1, error.description)
                }
            }
            slot = leaf.first + leaf.ids.count
        }
        return ranges
    }
}

func entriesDigest(_ entries: [PackEntry]) -> ChunkID {
    var bytes: [UInt8] = []
    for entry in entries.sorted(by: { $0.offset < $1.offset }) {
        entry.id.append(to: &bytes)
        bytes.appendLE(entry.offset)
        bytes.appendLE(entry.storedLength)
        bytes.appendLE(entry.rawLength)
        bytes.append(entry.flags.raw)
    }
    return ChunkID.sha256(bytes)
}

func removeTree(_ path: String) {
    if let names = try? FileSystem.list(path) {
        for name in names {
            let child = path + "/" + name
            if FileSystem.isDirectory(child) { removeTree(child) } else { try? FileSystem.remove(child) }
        }
    }
    rmdir(path)
}
