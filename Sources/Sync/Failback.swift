import Foundation
import SystemIO
import Vault
import VirtualDisk

/// What the state directory knows about a two-phase failback onto one target
/// (`<state>/sync/<key>/failback.json`, written atomically; local state, not vault format).
public struct FailbackRecord: Codable, Sendable {
    public enum Phase: String, Codable, Sendable {
        /// The bulk pass ran: the target holds `preparedPoint`; the machine may have run on.
        case prepared
        /// The final pass ran and was verified: the target holds `completedPoint`.
        case completed
    }

    public var format = 1
    public var sandbox: String
    public var machine: String
    public var disk: String
    public var target: String
    public var phase: Phase
    public var preparedPoint: String?
    public var prepared: String?
    public var completedPoint: String?
    public var completed: String?
}

/// One phase of a failback: the point the sandbox was promoted to, and the sync of that point.
public struct FailbackReport: Codable, Sendable {
    public var phase: Failback.Phase
    public var sandbox: String
    public var disk: String
    public var target: String
    /// The point the sandbox was promoted to in this phase (its id) and its label.
    public var point: String
    public var pointLabel: String
    /// The sandbox was mounted (its machine running) while it was promoted.
    public var mounted: Bool
    /// Bytes the promote read from the sandbox, and the new bytes it stored in the vault.
    public var promoteReadBytes: UInt64
    public var promoteNewBytes: UInt64
    /// The prepare phase's point this phase follows (complete).
    public var preparedPoint: String?
    public var sync: SyncReport
    public var warnings: [String]
    public var seconds: Double
}

/// Fails a sandbox (a machine that ran failed over) back onto its on-prem disk in two phases, as
/// Azure Site Recovery's planned failover does: `prepare` promotes the running sandbox to a point
/// and syncs that point onto the target while the machine keeps running (the bulk of the bytes);
/// `complete`, once the machine is stopped and the sandbox unmounted, promotes it again and syncs
/// that point, which writes only the slots that changed since (the delta sync compares the
/// target with the chunk ids), then verifies the target. Each sync is an ordinary journaled
/// sync: interrupted, it is resumed or rolled back with `lifeboat sync`.
public struct Failback: Sendable {
    public enum Phase: String, Codable, Sendable { case prepare, complete }

    public let vault: Vault
    public let engine: SyncEngine

    public init(vault: Vault, engine: SyncEngine) {
        self.vault = vault
        self.engine = engine
    }

    public func run(_ phase: Phase, sandbox name: String, disk requested: String?, to path: String, mode: SyncMode = .delta,
                    promoting: (DerivedProgress) -> Void = { _ in },
                    plan: (SyncPlan) -> Void = { _ in },
                    progress: @escaping @Sendable (SyncProgress) -> Void = { _ in },
                    afterSync: () -> Void = {}) throws(SyncError) -> FailbackReport {
        let started = Date()
        let sandboxes = Sandboxes(vault: vault)
        let status: SandboxStatus
        do throws(SandboxError) { status = try sandboxes.status(name) } catch { throw .sandbox(error) }
        let disk: String
        if let requested {
            guard status.disks.contains(where: { $0.name == requested }) else {
                throw .source(.unknownDisk(point: "sandbox \(name)", disk: requested, known: status.disks.map(\.name)))
            }
            disk = requested
        } else if status.disks.count == 1 {
            disk = status.disks[0].name
        } else {
            throw .invalidArgument("sandbox \(name) has disks \(status.disks.map(\.name).joined(separator: ", ")): choose one with --disk")
        }
        var warnings: [String] = []
        let canonical = TargetIdentity.canonicalPath(path)
        let recorded = try record(for: path)

        switch phase {
        case .prepare:
            if status.mountpoint == nil {
                warnings.append("sandbox \(name) is not mounted: nothing will change before `--phase complete`, which could have been run alone")
            }
        case .complete:
            guard mode == .delta else { throw .invalidArgument("--phase complete syncs only what changed since prepare (delta); --mode full is for prepare") }
            if let mountpoint = status.mountpoint {
                throw .sandbox(.busy(name, why: "it is still mounted at \(mountpoint) (server pid \(status.serverPID ?? 0)): stop the machine and `lifeboat umount \(mountpoint)` before `--phase complete`"))
            }
            if let recorded, recorded.sandbox != name || recorded.disk != disk {
                if recorded.phase == .prepared {
                    throw .failback("target \(canonical) was prepared from sandbox \(recorded.sandbox) disk \(recorded.disk), not sandbox \(name) disk \(disk): complete that failback, or run `--phase prepare` for this one first")
                }
                warnings.append("target \(canonical) was last failed back from sandbox \(recorded.sandbox) disk \(recorded.disk); no prepare phase of sandbox \(name) is recorded: this pass syncs everything that differs")
            } else if let recorded, recorded.phase == .completed {
                warnings.append("the failback of sandbox \(name) onto \(canonical) was already completed \(recorded.completed ?? ""): completing it again syncs what changed since")
            } else if recorded == nil {
                warnings.append("no prepare phase is recorded for \(canonical): this pass syncs everything that differs (a one-phase failback)")
            }
        }

        // A target with an unfinished sync is refused before anything is promoted.
        let before = try engine.status(path)
        if before.condition == .midSync || before.condition == .inconsistent {
            throw .unfinished(path: before.target, source: before.source ?? "?", undo: before.condition == .midSync)
        }

        // The sandbox's state now, as a point: only what it wrote is read.
        let promoted: BackupReport
        do throws(SandboxError) {
            promoted = try sandboxes.promote(name, progress: promoting)
        } catch { throw .sandbox(error) }
        warnings += promoted.warnings
        let point: RecoveryPoint
        do throws(VaultError) { point = try vault.point(promoted.machine + "@" + promoted.point) } catch { throw .source(error) }
        let source = try PointSource(vault: vault, point: point, disk: disk)

        let report = try engine.sync(source, to: path, mode: phase == .complete ? .delta : mode, verify: phase == .complete,
                                     plan: plan, progress: progress)
        afterSync()   // the tests' way into the window between the sync and the record

        // Recorded under the target's lock, beside its sync state.
        guard let identity = try TargetIdentity.of(path) else { throw .target(SystemError("open", path: path, errno: ENOENT)) }
        let lock = try TargetLock.acquire(stateDirectory: engine.stateDirectory, identity: identity)
        defer { lock.release() }
        // The sync released the lock when it finished: another may have run onto the target since.
        // The record says what the target holds, so it is written only if that is still this point.
        let (dir, state) = try engine.recorded(for: identity)
        guard let state, state.phase == .complete, state.source == source.resumeSpec, state.disk == disk else {
            throw .failback("target \(identity.path) changed after this failback's sync finished (it now holds "
                            + (state.map { "\($0.sourceLabel) disk \($0.disk), \($0.phase.rawValue)" } ?? "no recorded sync")
                            + "): another sync ran onto it; the failback record is left as it was, and \(point.label) is kept in the vault")
        }
        let current = try dir.loadFailback()
        let now = Timestamp.format(Date())
        var record = (current?.sandbox == name && current?.disk == disk ? current : nil)
            ?? FailbackRecord(sandbox: name, machine: point.machine, disk: disk, target: identity.path, phase: .prepared)
        record.target = identity.path
        switch phase {
        case .prepare:
            record.phase = .prepared
            record.preparedPoint = point.id
            record.prepared = now
            record.completedPoint = nil
            record.completed = nil
        case .complete:
            record.phase = .completed
            record.completedPoint = point.id
            record.completed = now
        }
        try dir.write(record, to: dir.failbackPath)

        return FailbackReport(phase: phase, sandbox: name, disk: disk, target: identity.path, point: point.id, pointLabel: point.label,
                              mounted: status.mountpoint != nil, promoteReadBytes: promoted.bytesRead, promoteNewBytes: promoted.newBytes,
                              preparedPoint: phase == .complete ? recorded.flatMap { $0.sandbox == name ? $0.preparedPoint : nil } : nil,
                              sync: report, warnings: warnings, seconds: Date().timeIntervalSince(started))
    }

    /// The failback recorded for a target, if any.
    public func record(for path: String) throws(SyncError) -> FailbackRecord? {
        guard let identity = try TargetIdentity.of(path) else { return nil }
        return try engine.recorded(for: identity).0.loadFailback()
    }
}

extension SyncStateDirectory {
    var failbackPath: String { path + "/failback.json" }

    func loadFailback() throws(SyncError) -> FailbackRecord? {
        guard FileSystem.exists(failbackPath) else { return nil }
        guard let data = FileManager.default.contents(atPath: failbackPath) else {
            throw .journal(SystemError("read", path: failbackPath))
        }
        do {
            return try JSONDecoder().decode(FailbackRecord.self, from: data)
        } catch {
            throw .damagedJournal(path: failbackPath, why: "it is not a failback record")
        }
    }
}
