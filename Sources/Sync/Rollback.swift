import Foundation
import Glibc
import SystemIO
import Vault

extension SyncEngine {
    /// The state recorded for a target: by its identity, or by its path when the file is gone.
    func locate(_ path: String) throws(SyncError) -> (SyncStateDirectory, SyncState, TargetIdentity?)? {
        if let identity = try TargetIdentity.of(path) {
            let dir = SyncStateDirectory(stateDirectory: stateDirectory, key: identity.key)
            guard let state = try dir.load() else { return nil }
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
        guard let (found, recorded, _) = try locate(path) else { throw .nothingToRollBack(TargetIdentity.canonicalPath(path)) }
        let lock = try TargetLock.acquire(found, target: recorded.target)
        defer { lock.release() }
        // Read again under the lock: another process may have finished or undone it meanwhile.
        guard let (dir, state, identity) = try locate(path), state.phase == .running else {
            throw .nothingToRollBack(TargetIdentity.canonicalPath(path))
        }
        guard state.undo else { throw .rollbackImpossible(state.target) }
        var restored: UInt64 = 0
        var removed = false
        if state.created {
            if identity != nil {
                do throws(SystemError) {
                    try FileSystem.remove(state.target)
                    try FileSystem.syncDirectory(FileSystem.parentDirectory(of: state.target))
                } catch { throw .target(error) }
            }
            removed = true
        } else {
            guard identity != nil else { throw .target(SystemError("open", path: state.target, errno: ENOENT)) }
            let (journal, records) = try UndoJournal.open(dir.journalPath)
            defer { journal.close() }
            let target = try Target(path: state.target, isDevice: state.isDevice, undo: true)
            defer { target.close() }
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
                if Cancellation.requested { throw .interrupted(path: state.target, undo: true) }
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
        return RollbackReport(target: state.target, source: state.sourceLabel, restoredBytes: restored, removed: removed,
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
