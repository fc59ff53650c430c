import Foundation
import Glibc
import SystemIO
import Vault

extension SyncEngine {
    /// The state directory of an existing target and the state recorded there (under its key,
    /// or the key states had before stable names). An unfinished sync's state must be this
    /// target's: resuming or rolling back another disk's sync onto it would write that disk's
    /// bytes here.
    func recorded(for identity: TargetIdentity) throws(SyncError) -> (SyncStateDirectory, SyncState?) {
        let dir = SyncStateDirectory(stateDirectory: stateDirectory, key: identity.key)
        var found: (SyncStateDirectory, SyncState)? = try dir.load().map { (dir, $0) }
        if found == nil && identity.key != identity.legacyKey {
            let legacy = SyncStateDirectory(stateDirectory: stateDirectory, key: identity.legacyKey)
            found = try legacy.load().map { (legacy, $0) }
        }
        guard let (at, state) = found else { return (dir, nil) }
        if state.phase == .running { try verify(state, isFor: identity) }
        return (at, state)
    }

    private func verify(_ state: SyncState, isFor identity: TargetIdentity) throws(SyncError) {
        guard state.isDevice == identity.isDevice else {
            throw .otherTarget(path: identity.path, why: "it was recorded for a \(state.isDevice ? "block device" : "file")")
        }
        if let name = state.stable {
            // The stable name decides; the device's number may have changed with it (a re-attach).
            guard name == identity.stable else {
                throw .otherTarget(path: identity.path, why: "it was recorded for \(state.target), named \(name); this target is "
                                   + (identity.stable ?? "without such a name"))
            }
            return
        }
        if let boot = state.boot, boot == Host.bootID {
            guard state.identity == identity.id else {
                throw .otherTarget(path: identity.path, why: "it was recorded for \(state.isDevice ? "device" : "file") \(state.identity) "
                                   + "at \(state.target); this is \(identity.id)")
            }
            if let then = state.attachment, then != identity.attachment {
                throw .otherTarget(path: identity.path, why: "it was recorded for the loop device attached to file \(then); it is "
                                   + "attached to \(identity.attachment ?? "nothing") now")
            }
            return
        }
        // Written by an earlier lifeboat that recorded no boots: trusted if it began in this boot.
        if state.boot == nil, let started = Timestamp.parse(state.started), let booted = Host.bootTime, started >= booted { return }
        // Found by device number and name, which a reboot can give to another disk.
        guard sameTargetAcrossBoots else {
            throw .otherTarget(path: identity.path, why: "it was recorded before a reboot, and nothing that survives a reboot named "
                               + "the disk then (device numbers and /dev names can name another disk after one); if \(identity.path) "
                               + "is the disk that sync was writing, say so with --same-target")
        }
    }

    /// A journal's records against the sync they undo: a range outside the target, or an offset
    /// past the disk, is damage (a crafted or foreign journal would write anywhere, or trap).
    func check(_ records: [UndoJournal.Record], of state: SyncState, journal: String, targetSize: UInt64) throws(SyncError) {
        let limit = max(state.oldSize, state.newSize, targetSize)
        for record in records {
            let (end, overflow) = record.offset.addingReportingOverflow(UInt64(record.length))
            guard !overflow, record.offset <= UInt64(Int64.max), end <= limit else {
                throw .damagedJournal(path: journal, why: "a record names bytes \(record.offset) to \(end), beyond the target's \(limit)")
            }
        }
    }

    /// The state recorded for a target: by its identity, or by its path when the file is gone.
    func locate(_ path: String) throws(SyncError) -> (SyncStateDirectory, SyncState, TargetIdentity?)? {
        if let identity = try TargetIdentity.of(path) {
            let (dir, state) = try recorded(for: identity)
            guard let state else { return nil }
            return (dir, state, identity)
        }
        guard let (dir, state) = SyncStateDirectory.find(stateDirectory: stateDirectory,
                                                         canonicalPath: TargetIdentity.canonicalPath(path)) else { return nil }
        return (dir, state, nil)
    }

    /// Puts back the pre-sync image of a target whose sync did not finish: every journaled old
    /// range written back, last first, then the file's old size (or the file removed, when the
    /// sync created it). Interrupted, it can simply be run again.
    public func rollback(_ path: String, progress: @escaping @Sendable (SyncProgress) -> Void = { _ in }) throws(SyncError) -> RollbackReport {
        let started = Date()
        // Locked by what the target is now (a file gone since: by its state directory), then
        // read again under the lock: another process may have finished, undone or recreated it.
        var attempt = 0
        var locked: (TargetLock, SyncStateDirectory, SyncState, TargetIdentity?)? = nil
        while locked == nil {
            guard let (found, recordedState, identity) = try locate(path) else { throw .nothingToRollBack(TargetIdentity.canonicalPath(path)) }
            let lock: TargetLock
            if let identity {
                lock = try TargetLock.acquire(stateDirectory: stateDirectory, identity: identity)
            } else {
                lock = try TargetLock.acquire(stateDirectory: stateDirectory, gone: found, target: recordedState.target)
            }
            let again: (SyncStateDirectory, SyncState, TargetIdentity?)?
            do throws(SyncError) { again = try locate(path) } catch {
                lock.release()
                throw error
            }
            guard let (dir, state, now) = again else {
                lock.release()
                throw .nothingToRollBack(TargetIdentity.canonicalPath(path))
            }
            if now?.lockKey == identity?.lockKey && dir.path == found.path {
                locked = (lock, dir, state, now)
            } else {
                lock.release()
                attempt += 1
                guard attempt < 3 else { throw .busy(path: recordedState.target, holder: "it keeps changing (another sync is creating it)") }
            }
        }
        guard let (lock, dir, state, identity) = locked else { throw .nothingToRollBack(TargetIdentity.canonicalPath(path)) }
        defer { lock.release() }
        guard state.phase == .running else { throw .nothingToRollBack(TargetIdentity.canonicalPath(path)) }
        guard state.undo else { throw .rollbackImpossible(state.target) }
        // Written where the target is now: state.target is the name it had then (a device's
        // name can belong to another disk after a reboot).
        let targetPath = identity?.path ?? state.target
        var restored: UInt64 = 0
        var removed = false
        if state.created {
            if identity != nil {
                do throws(SystemError) {
                    try FileSystem.remove(targetPath)
                    try FileSystem.syncDirectory(FileSystem.parentDirectory(of: targetPath))
                } catch { throw .target(error) }
            }
            removed = true
        } else {
            guard let identity else { throw .target(SystemError("open", path: state.target, errno: ENOENT)) }
            let (journal, records) = try UndoJournal.open(dir.journalPath, key: dir.key)
            defer { journal.close() }
            let target = try Target(path: targetPath, isDevice: state.isDevice, undo: true)
            defer { target.close() }
            try target.check(is: identity)
            try check(records, of: state, journal: dir.journalPath, targetSize: try target.size())
            // From the first write back, no slot holds the new image for sure: a resume after an
            // interrupted rollback must compare from the start, not from the last checkpoint.
            try journal.truncateToEnd()
            try journal.checkpoint(0)
            let undo = records.filter { $0.kind != .checkpoint }
            let total = undo.reduce(UInt64(0)) { $0 + UInt64($1.length) }
            let largest = undo.map(\.length).max() ?? 0
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(largest, 1 << 20), alignment: SystemFile.directAlignment)
            defer { buffer.deallocate() }
            let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: SystemFile.directAlignment)
            zeros.initializeMemory(as: UInt8.self, repeating: 0)
            defer { zeros.deallocate() }
            for record in undo.reversed() {
                if Cancellation.requested { throw .interrupted(path: targetPath, undo: true) }
                switch record.kind {
                case .data:
                    try journal.readPayload(record, into: buffer)
                    try target.write(UnsafeRawBufferPointer(rebasing: buffer[0..<record.length]), at: record.offset)
                case .zero:
                    try target.zero(at: record.offset, count: record.length, zeros: UnsafeRawBufferPointer(zeros))
                case .checkpoint:
                    break
                }
                restored += UInt64(record.length)
                progress(SyncProgress(phase: .rollback, bytesDone: restored, bytesTotal: total))
            }
            if !state.isDevice { try target.resize(to: state.oldSize) }
            try target.dataSync()
        }
        var finished = state
        finished.phase = .rolledBack
        finished.finished = Timestamp.format(Date())
        try dir.save(finished)
        try dir.removeJournal()
        return RollbackReport(target: targetPath, source: state.sourceLabel, restoredBytes: restored, removed: removed,
                              seconds: Date().timeIntervalSince(started))
    }

    /// Whether a target is consistent, mid-sync (with the source and the progress), left
    /// inconsistent by a sync without undo journal, or rolled back.
    public func status(_ path: String) throws(SyncError) -> SyncStatus {
        guard let (dir, state, _) = try locate(path) else {
            return SyncStatus(target: TargetIdentity.canonicalPath(path), condition: .consistent)
        }
        var status = SyncStatus(target: state.target, condition: .consistent, source: state.sourceLabel, disk: state.disk,
                                mode: state.mode, size: state.newSize, started: state.started, finished: state.finished)
        status.failback = try? dir.loadFailback()
        switch state.phase {
        case .complete: status.condition = .consistent
        case .rolledBack: status.condition = .rolledBack
        case .running:
            status.condition = state.undo ? .midSync : .inconsistent
            if let (journal, records) = try? UndoJournal.open(dir.journalPath, checkPayloads: false) {
                status.progressBytes = records.last { $0.kind == .checkpoint }?.offset ?? 0
                status.journalBytes = journal.size
                journal.close()
            }
        }
        return status
    }
}
