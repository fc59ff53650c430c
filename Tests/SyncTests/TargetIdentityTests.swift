import Foundation
import SystemIO
import Testing
import TestSupport
import Vault
@testable import Sync

/// Which recorded state is taken for a target's. The stable names of files and loop devices are
/// covered by SyncTests (a loop device's state follows its backing file); here, a device without
/// one, whose state is found by device number and name alone.
@Suite struct TargetIdentityTests {
    func state(identity: String, stable: String?, boot: String?, started: String = "2026-12-03T00:00:00Z") -> SyncState {
        SyncState(target: "/dev/sdq", isDevice: true, identity: identity, source: "m@0", sourceLabel: "m@0", disk: "os",
                  mode: .full, phase: .running, undo: true, created: false, oldSize: 1 << 20, newSize: 1 << 20, chunkSize: 65536,
                  journalBytesPlanned: 0, started: started, finished: nil, stable: stable, boot: boot)
    }

    /// A file's stable name is its inode's, with the inode's generation: a file deleted and made
    /// again (often under the same inode number) is another file, and gets none of the first's state.
    @Test func aFileMadeAgainUnderItsNameIsAnotherTarget() throws {
        let dir = TemporaryDirectory("identity")
        defer { dir.remove() }
        let path = dir.file("disk.img")
        #expect(FileManager.default.createFile(atPath: path, contents: Data(repeating: 1, count: 4096)))
        // Only where the filesystem has an id that survives a reboot (ext4, btrfs) or a named disk.
        let type = shell("stat -f -c %T '\(dir.path)'").stdout
        guard let first = try TargetIdentity.of(path)?.stable else {
            #expect(!type.contains("ext") && !type.contains("btrfs"), "a file on \(type) has no stable name")
            return
        }
        #expect(first.contains("generation"))
        let handle = try #require(FileHandle(forWritingAtPath: path))
        try handle.write(contentsOf: Data(repeating: 2, count: 100))
        try handle.close()
        #expect(try TargetIdentity.of(path)?.stable == first)
        try FileManager.default.removeItem(atPath: path)
        #expect(FileManager.default.createFile(atPath: path, contents: Data(repeating: 1, count: 4096)))
        let again = try #require(try TargetIdentity.of(path))
        #expect(again.stable != first)
    }

    /// A file in a btrfs subvolume: stat gives it the subvolume's own device number, which no
    /// mount lists; its filesystem is still found (by mount point) and named by its UUID.
    @Test(.enabled(if: isRoot)) func aFileOnABtrfsSubvolumeHasAStableName() throws {
        let dir = TemporaryDirectory("btrfs")
        defer { dir.remove() }
        let image = dir.file("fs.img"), mnt = dir.file("mnt")
        try FileSystem.createDirectories(mnt)
        #expect(shell("truncate -s 160M '\(image)' && mkfs.btrfs -q '\(image)'").status == 0)
        guard shell("mount -o loop '\(image)' '\(mnt)'").status == 0 else {
            Issue.record("cannot mount btrfs")
            return
        }
        defer { _ = shell("umount '\(mnt)'") }
        #expect(shell("btrfs -q subvolume create '\(mnt)/vol'").status == 0)
        let path = mnt + "/vol/disk.img"
        #expect(FileManager.default.createFile(atPath: path, contents: Data(repeating: 1, count: 4096)))
        let stable = try #require(try TargetIdentity.of(path)?.stable)
        #expect(stable.hasPrefix("file fsid ") && stable.contains("generation"), "\(stable)")
    }

    @Test func aStateFoundByDeviceNumberMustBeThisBootsOrConfirmed() throws {
        let dir = TemporaryDirectory("identity")
        defer { dir.remove() }
        var engine = SyncEngine(stateDirectory: dir.path)
        let target = TargetIdentity(path: "/dev/sdq", isDevice: true, id: "65:0", stable: nil)
        let records = SyncStateDirectory(stateDirectory: dir.path, key: target.key)

        // Recorded in this boot for this device number: taken.
        try records.save(state(identity: "65:0", stable: nil, boot: Host.bootID))
        #expect(try engine.recorded(for: target).1 != nil)
        // This boot, another device number under the same name: another disk.
        try records.save(state(identity: "65:16", stable: nil, boot: Host.bootID))
        #expect(throws: SyncError.self) { try engine.recorded(for: target) }
        // Another boot: the number may name another disk now; taken only on the operator's word.
        try records.save(state(identity: "65:0", stable: nil, boot: "another-boot"))
        #expect { try engine.recorded(for: target) } throws: { error in
            (error as? SyncError)?.description.contains("--same-target") == true
        }
        engine.sameTargetAcrossBoots = true
        #expect(try engine.recorded(for: target).1 != nil)
        // Written by a lifeboat that recorded no boots: taken if it began in this boot, else
        // only on the operator's word.
        engine.sameTargetAcrossBoots = false
        try records.save(state(identity: "65:0", stable: nil, boot: nil, started: Timestamp.format(Date())))
        #expect(try engine.recorded(for: target).1 != nil)
        let beforeBoot = Timestamp.format(try #require(Host.bootTime).addingTimeInterval(-60))
        try records.save(state(identity: "65:0", stable: nil, boot: nil, started: beforeBoot))
        #expect { try engine.recorded(for: target) } throws: { error in
            (error as? SyncError)?.description.contains("--same-target") == true
        }
        engine.sameTargetAcrossBoots = true
        #expect(try engine.recorded(for: target).1 != nil)
        engine.sameTargetAcrossBoots = false
        // A loop device without a stable name, attached to another file since: another disk.
        var attached = state(identity: "65:0", stable: nil, boot: Host.bootID)
        attached.attachment = "2049:12 offset 0"
        try records.save(attached)
        var loop = target
        loop.attachment = "2049:12 offset 0"
        #expect(try engine.recorded(for: loop).1 != nil)
        loop.attachment = "2049:13 offset 0"
        #expect { try engine.recorded(for: loop) } throws: { error in
            (error as? SyncError)?.description.contains("attached") == true
        }
        // A stable name that is not this target's: never taken.
        try records.save(state(identity: "65:0", stable: "wwid naa.5000c500a1b2c3d4", boot: Host.bootID))
        #expect(throws: SyncError.self) { try engine.recorded(for: target) }
    }
}
