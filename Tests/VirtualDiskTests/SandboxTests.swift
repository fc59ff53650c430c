import ChunkStore
import Foundation
import ObjectStore
import Synchronization
import SystemIO
import Testing
import TestSupport
import Vault
@testable import VirtualDisk

@Suite struct SandboxTests {
    /// A vault with one point of a 3 MiB + 1000 byte disk (random data, a 1 MiB hole, a short last slot).
    func fixture() throws -> (TemporaryDirectory, Vault, RecoveryPoint, [UInt8]) {
        let dir = TemporaryDirectory("sandbox")
        let vault = try Vault.create(store: LocalDirectoryStore(root: dir.file("vault")), stateDirectory: dir.file("state"))
        var disk = randomBytes(seed: 7, count: (3 << 20) + 1000)
        for i in (1 << 20)..<(2 << 20) { disk[i] = 0 }
        let path = dir.file("d.img")
        try writeAt(path, 0, disk)
        _ = try vault.backup(BackupRequest(machine: "m", disks: [("d", .path(path))], time: Date(timeIntervalSince1970: 1_800_000_000)))
        return (dir, vault, try vault.point("m@latest"), disk)
    }

    func readAll(_ disk: SandboxDisk) throws -> [UInt8] {
        var out = [UInt8](repeating: 0xEE, count: Int(disk.size))
        let n = try out.withUnsafeMutableBytes { try disk.read(into: $0, at: 0) }
        #expect(n == out.count)
        return out
    }

    /// Unaligned writes of every size against a model in memory; the overlay survives a reopen
    /// after a flush; the point is never changed.
    @Test func writesMergeOverThePointAndSurviveReopen() throws {
        let (dir, vault, point, original) = try fixture()
        defer { dir.remove() }
        let sandboxes = Sandboxes(vault: vault)
        _ = try sandboxes.create("s", from: point)
        var model = original
        do {
            let open = try sandboxes.open("s")
            let disk = try #require(open.disks.first)
            #expect(firstDifference(try readAll(disk), original) == nil)
            var random = SeededBytes(seed: 11)
            for round in 0..<300 {
                let length = round % 3 == 0 ? Int(random.next() % 200_000) + 1 : Int(random.next() % 9000) + 1
                let offset = Int(random.next() % UInt64(model.count - length))
                let bytes = random.bytes(length)
                try bytes.withUnsafeBytes { try disk.write($0, at: UInt64(offset)) }
                model.replaceSubrange(offset..<(offset + length), with: bytes)
                if round % 50 == 0 {
                    // Zeroing (discard) of an unaligned range.
                    let zeroAt = Int(random.next() % UInt64(model.count - 100_000))
                    let zeroLength = Int(random.next() % 100_000) + 1
                    try disk.zero(at: UInt64(zeroAt), length: UInt64(zeroLength))
                    for i in zeroAt..<(zeroAt + zeroLength) { model[i] = 0 }
                }
            }
            // The last bytes of the disk (a partial block).
            let tail = random.bytes(700)
            try tail.withUnsafeBytes { try disk.write($0, at: UInt64(model.count - 700)) }
            model.replaceSubrange((model.count - 700)..., with: tail)
            #expect(firstDifference(try readAll(disk), model) == nil)
            // Random reads of any range.
            for _ in 0..<100 {
                let offset = Int(random.next() % UInt64(model.count))
                let length = min(Int(random.next() % 300_000) + 1, model.count - offset)
                var buffer = [UInt8](repeating: 0, count: length)
                _ = try buffer.withUnsafeMutableBytes { try disk.read(into: $0, at: UInt64(offset)) }
                #expect(firstDifference(buffer, model[offset..<(offset + length)]) == nil)
            }
            #expect(throws: SandboxError.self) { try [1, 2].withUnsafeBytes { try disk.write($0, at: disk.size - 1) } }
            open.close()
        }
        let again = try sandboxes.open("s")
        #expect(firstDifference(try readAll(try #require(again.disks.first)), model) == nil)
        again.close()
        // The point still reads as it was.
        let reader = DiskReader(point: point, disk: try point.disk("d"), chunks: vault.chunks, cache: ChunkCache(capacityBytes: 1 << 20))
        var out = [UInt8](repeating: 0, count: original.count)
        _ = try out.withUnsafeMutableBytes { try reader.read(into: $0, at: 0) }
        #expect(firstDifference(out, original) == nil)
    }

    /// A crash between sizing a new map and writing its header leaves a map of zeros beside an
    /// empty data file: opened as a new map (it was refused as damaged until a reset). A map of
    /// zeros beside a data file of the disk's size is still damage.
    @Test func aMapLeftWithoutItsHeaderIsANewMap() throws {
        let (dir, vault, point, original) = try fixture()
        defer { dir.remove() }
        let sandboxes = Sandboxes(vault: vault)
        _ = try sandboxes.create("s", from: point)
        let first = try sandboxes.open("s")
        first.close()
        let map = sandboxes.directory + "/s/disks/d.map"
        let size = try SystemFile.open(map, .readOnly).size()
        try writeAt(map, 0, [UInt8](repeating: 0, count: Int(size)))
        #expect(throws: SandboxError.self) { try sandboxes.open("s") }
        #expect(truncate(sandboxes.directory + "/s/disks/d.data", 0) == 0)
        let open = try sandboxes.open("s")
        let disk = try #require(open.disks.first)
        #expect(firstDifference(try readAll(disk), original) == nil)
        try ([7, 7, 7] as [UInt8]).withUnsafeBytes { try disk.write($0, at: 5000) }
        open.close()
        let again = try sandboxes.open("s")
        var back = [UInt8](repeating: 0, count: 3)
        _ = try back.withUnsafeMutableBytes { try again.disks[0].read(into: $0, at: 5000) }
        #expect(back == [7, 7, 7])
        again.close()
    }

    @Test func holesFollowTheOverlay() throws {
        let (dir, vault, point, _) = try fixture()
        defer { dir.remove() }
        let sandboxes = Sandboxes(vault: vault)
        _ = try sandboxes.create("s", from: point)
        let open = try sandboxes.open("s")
        defer { open.close() }
        let disk = try #require(open.disks.first)
        #expect(try disk.nextHole(from: 0) == 1 << 20)
        #expect(try disk.nextData(from: 1 << 20) == 2 << 20)
        // A write inside the point's hole is data, from its block on.
        try [UInt8](repeating: 1, count: 10).withUnsafeBytes { try disk.write($0, at: (1 << 20) + 70_000) }
        #expect(try disk.nextData(from: 1 << 20) == (1 << 20) + 69_632)
        #expect(try disk.nextHole(from: (1 << 20) + 69_632) == (1 << 20) + 73_728)
        #expect(try disk.nextData(from: (1 << 20) + 73_728) == 2 << 20)
        #expect(try disk.nextData(from: disk.size) == nil)
    }

    /// Promote stores only what the sandbox wrote, and the new point reads as the sandbox did.
    @Test func promoteStoresOnlyTheWrittenSlots() throws {
        let (dir, vault, point, _) = try fixture()
        defer { dir.remove() }
        let sandboxes = Sandboxes(vault: vault)
        _ = try sandboxes.create("s", from: point)
        var expected: [UInt8] = []
        do {
            let open = try sandboxes.open("s")
            let disk = try #require(open.disks.first)
            try randomBytes(seed: 3, count: 100_000).withUnsafeBytes { try disk.write($0, at: 123_456) }  // 3 slots
            try [UInt8](repeating: 0, count: 65536).withUnsafeBytes { try disk.write($0, at: 2 << 20) }  // a zero slot
            expected = try readAll(disk)
            open.close()
        }
        let report = try sandboxes.promote("s")
        #expect(report.bytesRead == 4 * 65536)
        #expect(report.newBytes < 200_000 + 4096 * 4, "three new data slots plus index nodes, not the disk")
        let promoted = try vault.point("m@" + report.point)
        #expect(promoted.id == report.point)
        #expect(promoted.parent == point.id)
        #expect(promoted.consistency == .crash)
        #expect(promoted.disks[0].holeChunks == point.disks[0].holeChunks + 1)
        let target = dir.file("out.img")
        _ = try vault.restore(point: promoted, disk: "d", to: target)
        #expect(firstDifference(Array(try Data(contentsOf: URL(fileURLWithPath: target))), expected) == nil)
        #expect(try vault.check(readData: true).ok)
    }

    /// A sandbox's base is held: prune keeps it until the sandbox is cleaned up.
    @Test func aSandboxHoldsItsPointAgainstPrune() throws {
        let (dir, vault, point, original) = try fixture()
        defer { dir.remove() }
        let path = dir.file("d.img")
        try writeAt(path, 0, Array(original.reversed()))
        _ = try vault.backup(BackupRequest(machine: "m", disks: [("d", .path(path))], time: Date(timeIntervalSince1970: 1_800_086_400)))
        try vault.setPolicy(RetentionPolicy(keepLast: 1), machine: "m")
        let sandboxes = Sandboxes(vault: vault)
        _ = try sandboxes.create("s", from: point)
        let held = try vault.prune(dryRun: false)
        #expect(held.removed == 0)
        #expect(held.decisions.first { $0.point == point.id }?.reason == "held by sandbox s on \(hostName())")
        #expect(throws: SandboxError.self) { _ = try sandboxes.create("s", from: point) }
        try sandboxes.cleanup("s")
        #expect(sandboxes.names().isEmpty)
        #expect(throws: SandboxError.self) { _ = try sandboxes.open("s") }
        // A prune between its last look at the holds and the deletion has its marker out: a
        // sandbox created in that moment fails instead of losing its base.
        let marker = "gc/pruning-m-" + point.id
        try vault.store.put(marker, [])
        #expect { _ = try sandboxes.create("late", from: point) } throws: { error in "\(error)".contains("being pruned") }
        #expect(try vault.holds(machine: "m").isEmpty)
        try vault.store.delete(marker)
        let pruned = try vault.prune(dryRun: false)
        #expect(pruned.removed == 1)
        #expect(try vault.points(machine: "m").map(\.id) != [point.id])
        #expect(try vault.store.list(prefix: "gc/pruning-").isEmpty)
    }

    /// A sandbox in use cannot be opened twice, reset or cleaned up; reset discards the writes.
    @Test func exclusiveUseAndReset() throws {
        let (dir, vault, point, original) = try fixture()
        defer { dir.remove() }
        let sandboxes = Sandboxes(vault: vault)
        _ = try sandboxes.create("s", from: point)
        let open = try sandboxes.open("s")
        try [UInt8](repeating: 9, count: 5000).withUnsafeBytes { try open.disks[0].write($0, at: 10) }
        #expect(throws: SandboxError.self) { _ = try sandboxes.open("s") }
        #expect(throws: SandboxError.self) { try sandboxes.reset("s") }
        #expect(throws: SandboxError.self) { try sandboxes.cleanup("s") }
        open.close()
        #expect(try sandboxes.status("s").writtenBytes == 8192)
        try sandboxes.reset("s")
        #expect(try sandboxes.status("s").writtenBytes == 0)
        let reopened = try sandboxes.open("s")
        #expect(firstDifference(try readAll(reopened.disks[0]), original) == nil)
        reopened.close()
    }

    /// Cleanup needs neither the base point nor a complete local sandbox: a cleanup interrupted
    /// after the local removal still releases the hold when run again.
    @Test func cleanupWorksWithoutTheBaseAndAfterAnInterruptedCleanup() throws {
        let (dir, vault, point, _) = try fixture()
        defer { dir.remove() }
        let sandboxes = Sandboxes(vault: vault)
        _ = try sandboxes.create("gone", from: point)
        _ = try sandboxes.create("half", from: point)
        #expect(try vault.holds(machine: "m")[point.id] != nil)
        // The base vanishes (a damaged vault, an operator's hand): cleanup still works.
        let manifest = RecoveryPoint.objectName(machine: "m", id: point.id)
        let saved = try vault.store.get(manifest)
        try vault.store.delete(manifest)
        try sandboxes.cleanup("gone")
        try vault.store.put(manifest, saved)
        // The local directory removed, the hold left behind: cleanup releases it.
        try FileManager.default.removeItem(atPath: vault.stateDirectory + "/sandboxes/half")
        #expect(try vault.holds(machine: "m")[point.id] != nil)
        try sandboxes.cleanup("half")
        #expect(try vault.holds(machine: "m").isEmpty)
        #expect(throws: SandboxError.self) { try sandboxes.cleanup("half") }
    }
}

@Suite struct WriteModesTests {
    /// Buffered and O_DIRECT writers never overlap, and neither kind starves the other.
    @Test func theTwoKindsNeverRunTogetherAndBothGetTurns() {
        let modes = WriteModes()
        let state = Mutex<(buffered: Int, direct: Int, overlaps: Int, done: [Int])>((0, 0, 0, [0, 0]))
        let threads = (0..<8).map { n in
            Worker(name: "modes-\(n)") {
                let direct = n % 2 == 1
                for _ in 0..<300 {
                    modes.enter(direct: direct)
                    state.withLock { s in
                        if direct { s.direct += 1 } else { s.buffered += 1 }
                        if s.direct > 0 && s.buffered > 0 { s.overlaps += 1 }
                    }
                    usleep(50)
                    state.withLock { s in
                        if direct { s.direct -= 1 } else { s.buffered -= 1 }
                        s.done[direct ? 1 : 0] += 1
                    }
                    modes.leave()
                }
            }
        }
        for thread in threads { thread.join() }
        let final = state.withLock { $0 }
        #expect(final.overlaps == 0)
        #expect(final.done == [1200, 1200])
    }
}
