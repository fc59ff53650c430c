import ChunkStore
import Dispatch
import Foundation
import ObjectStore
import Synchronization
import SystemIO
import Testing
import TestSupport
@testable import Vault

@Suite struct BackupFaultTests {
    /// A failure after the chunk writer finished (the manifest's put: a full disk) ends the
    /// backup with the error and releases the lock; it hung for ever in a second join of the
    /// writer's threads, holding the machine's lock.
    @Test func aFailureAfterThePacksAreUpEndsTheBackup() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        _ = try f.create()
        let disk = try f.makeDisk("d.img", size: 4 << 20, seed: 61)
        let vault = try Vault.open(store: HookedStore(LocalDirectoryStore(root: f.vaultPath), refusingPutsUnder: "points/"), stateDirectory: f.state)
        let outcome = Mutex<Result<String, any Error>?>(nil)
        let done = DispatchSemaphore(value: 0)
        let worker = Thread {
            let result: Result<String, any Error> = Result { try vault.backup(BackupRequest(machine: "m", disks: [("os", .path(disk))])).point }
            outcome.withLock { $0 = result }
            done.signal()
        }
        worker.start()
        #expect(done.wait(timeout: .now() + 120) == .success, "the backup hung")
        let failed = outcome.withLock { result -> Bool in
            if case .failure = result { return true }
            return false
        }
        #expect(failed)
        #expect(try LocalDirectoryStore(root: f.vaultPath).list(prefix: "locks/").isEmpty)
        // The vault is as before: no point, and a backup through a working store succeeds.
        #expect(try f.open().points().isEmpty)
        _ = try f.open().backup(BackupRequest(machine: "m", disks: [("os", .path(disk))]))
        #expect(try f.open().check(readData: true).ok)
    }

    /// A file that shrinks while it is read would give zeros for what it lost: an error.
    @Test func aSourceThatShrankDuringTheReadIsShort() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        let disk = try f.makeDisk("d.img", size: 4 << 20, seed: 62)
        let source = try DiskSource(.path(disk))
        defer { source.close() }
        try source.checkNotShrunk()
        #expect(truncate(disk, 1 << 20) == 0)
        #expect { try source.checkNotShrunk() } throws: { error in
            guard case VaultError.sourceShort(_, let expected, let got) = error else { return false }
            return expected == 4 << 20 && got == 1 << 20
        }
    }

    /// A damaged leaf of the previous point's disk index costs the next backup its shortcut
    /// there, with a warning; every later backup of the machine failed on it.
    @Test func aDamagedParentIndexIsAWarningNotAFailure() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        let vault = try f.create()
        let disk = try f.makeDisk("d.img", size: 8 << 20, seed: 63)
        let first = try vault.backup(BackupRequest(machine: "m", disks: [("os", .path(disk))]))
        let root = try #require(ChunkID(hex: first.disks[0].indexRoot))
        let location = try #require(try vault.chunks.location(root))
        let pack = f.vaultPath + "/" + PackFormat.objectName(location.pack)
        let at = UInt64(location.offset) + UInt64(location.storedLength / 2)
        let byte = try SystemFile.open(pack, .readOnly).readAll(from: at, count: 1)
        try writeAt(pack, at, [byte[0] ^ 0x20])
        try writeAt(disk, 0, randomBytes(seed: 64, count: 65536))
        let second = try f.open().backup(BackupRequest(machine: "m", disks: [("os", .path(disk))]))
        #expect(second.warnings.contains { $0.contains("previous point's index could not be read") }, "\(second.warnings)")
        let out = f.dir.file("out.img")
        _ = try f.open().restore(point: try f.open().point("m@" + second.point.prefix(12)), disk: "os", to: out)
        #expect(try sha256(file: out) == sha256(file: disk))
    }
}
