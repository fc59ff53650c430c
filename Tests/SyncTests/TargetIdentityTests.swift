import Foundation
import SystemIO
import Testing
import TestSupport
@testable import Sync

/// Which recorded state is taken for a target's. The stable names of files and loop devices are
/// covered by SyncTests (a loop device's state follows its backing file); here, a device without
/// one, whose state is found by device number and name alone.
@Suite struct TargetIdentityTests {
    func state(identity: String, stable: String?, boot: String?) -> SyncState {
        SyncState(target: "/dev/sdq", isDevice: true, identity: identity, source: "m@0", sourceLabel: "m@0", disk: "os",
                  mode: .full, phase: .running, undo: true, created: false, oldSize: 1 << 20, newSize: 1 << 20, chunkSize: 65536,
                  journalBytesPlanned: 0, started: "2026-12-03T00:00:00Z", finished: nil, stable: stable, boot: boot)
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
        // Written before boots were recorded: taken as before.
        engine.sameTargetAcrossBoots = false
        try records.save(state(identity: "65:0", stable: nil, boot: nil))
        #expect(try engine.recorded(for: target).1 != nil)
        // A stable name that is not this target's: never taken.
        try records.save(state(identity: "65:0", stable: "wwid naa.5000c500a1b2c3d4", boot: Host.bootID))
        #expect(throws: SyncError.self) { try engine.recorded(for: target) }
    }
}
