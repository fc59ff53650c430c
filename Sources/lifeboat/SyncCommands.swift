import ArgumentParser
import Foundation
import SystemIO
import Sync
import Vault
import VirtualDisk

struct SyncCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sync",
        abstract: "Write a point's or a sandbox's disk onto a file or block device (failback), journaled.",
        discussion: """
        delta (the default) reads the target, compares every chunk slot with the point's chunk
        id and writes only the slots that differ; full writes every slot without comparing.
        Before a slot is overwritten its old contents are kept in an undo journal in the state
        directory, so an interrupted or failed sync can always be finished (--resume) or undone
        (--rollback); a new sync onto a target with an unfinished one is refused until one of
        the two is chosen. `lifeboat sync status TARGET` tells which state a target is in. One
        sync at a time writes a target: a second is refused as busy (exit code 5).

        SOURCE may be sandbox:NAME: the sandbox's current disk (the slots it wrote are compared
        by their bytes). A mounted sandbox is frozen for the whole sync (its writes wait, at most
        60 s, else the sync fails and can be rolled back); for a running machine use
        `lifeboat failback` in two phases instead.

        Examples:
          lifeboat sync web01@latest --disk os --to /dev/vg0/web01-os
          lifeboat sync web01@-1 --disk os --to /srv/web01-os.img --mode full --verify
          lifeboat sync sandbox:web01-test --disk os --to /dev/vg0/web01-os
          lifeboat sync --resume /dev/vg0/web01-os
          lifeboat sync --rollback /dev/vg0/web01-os
          lifeboat sync status /dev/vg0/web01-os
        """,
        subcommands: [SyncStart.self, SyncStatusCommand.self],
        defaultSubcommand: SyncStart.self)
}

struct SyncStart: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "start",
        abstract: "Sync a point's disk onto a target, or resume or roll back an unfinished sync.",
        discussion: """
        `lifeboat sync SOURCE ...` runs this command; `start` may be omitted.
        """)

    @OptionGroup var vault: VaultOptions

    @Argument(help: "The point (MACHINE@latest, MACHINE@-N, MACHINE@TIME, MACHINE@ID) or sandbox:NAME.")
    var source: String?

    @Option(help: "The disk to sync (may be omitted when the point or sandbox has one disk).")
    var disk: String?

    @Option(help: ArgumentHelp("The target file (created sparse if missing) or block device.", valueName: "path"))
    var to: String?

    @Option(help: ArgumentHelp("delta: write only the slots that differ; full: write every slot.", valueName: "mode"))
    var mode: String = "delta"

    @Flag(help: "Re-read the target afterwards and compare every slot with the source.")
    var verify = false

    @Flag(help: "Keep no undo journal (when it cannot fit): the target is inconsistent until the sync completes.")
    var noUndo = false

    @Option(help: ArgumentHelp("Finish the unfinished sync of this target.", valueName: "target"))
    var resume: String?

    @Option(help: ArgumentHelp("Undo the unfinished sync of this target: put back its old image.", valueName: "target"))
    var rollback: String?

    @OptionGroup var engineOptions: SyncEngineOptions

    @Flag(help: "Print a JSON summary on standard output.")
    var json = false

    func run() throws {
        try report {
            let engine = engineOptions.engine()
            installInterruptHandlers()
            if let rollback {
                guard source == nil && resume == nil && to == nil else {
                    throw SyncError.invalidArgument("--rollback TARGET takes no source, --to or --resume")
                }
                let line = ProgressLine("rollback")
                let result = try engine.rollback(rollback) { p in line.update(done: p.bytesDone, total: p.bytesTotal) }
                line.finish()
                if json { printJSON(result); return }
                if result.removed {
                    print("rolled back \(result.target): the sync from \(result.source) created it, so it was removed")
                } else {
                    print("rolled back \(result.target) to its image before the sync from \(result.source): \(formatBytes(result.restoredBytes)) put back in \(String(format: "%.1f", result.seconds)) s")
                }
                return
            }
            let line = ProgressLine("sync")
            let progress: @Sendable (SyncProgress) -> Void = { p in
                line.update(done: p.bytesDone, total: p.bytesTotal, label: p.phase.rawValue)
            }
            let result: SyncReport
            if let resume {
                guard source == nil && to == nil else { throw SyncError.invalidArgument("--resume TARGET takes no source or --to") }
                let opened = try vault.open()
                var sandbox: SandboxSource?
                defer { sandbox?.close() }
                result = try engine.resume(resume, resolve: { (spec, disk) throws(SyncError) in
                    if let (name, version) = SandboxSource.parse(spec) {
                        let source = try SandboxSource(vault: opened, sandbox: name, disk: disk)
                        sandbox = source
                        guard version == nil || version == source.version else {
                            throw .sourceMismatch(target: resume, why: "sandbox \(name) changed since the sync started; roll it back with `lifeboat sync --rollback \(resume)` and sync again")
                        }
                        return source
                    }
                    let point: RecoveryPoint
                    do throws(VaultError) { point = try opened.point(spec) } catch { throw .source(error) }
                    return try PointSource(vault: opened, point: point, disk: disk)
                }, verify: verify, plan: { showPlan($0, line) }, progress: progress)
            } else {
                guard let source else { throw SyncError.invalidArgument("sync needs a SOURCE point (or --resume / --rollback TARGET)") }
                guard let to else { throw SyncError.invalidArgument("sync needs a target: --to PATH") }
                guard let syncMode = SyncMode(rawValue: mode) else { throw SyncError.invalidArgument("--mode is delta or full, not \"\(mode)\"") }
                let opened = try vault.open()
                if let (name, _) = SandboxSource.parse(source) {
                    let sandbox = try SandboxSource(vault: opened, sandbox: name, disk: disk)
                    defer { sandbox.close() }
                    if let why = Sandboxes(vault: opened).flushFailure(name) {
                        Terminal.warning("sandbox \(name) \(why); it is synced as it is")
                    }
                    if let mountpoint = sandbox.image.mountpoint, !json {
                        Terminal.warning("sandbox \(name) is mounted at \(mountpoint): it is frozen while it is synced (its writes wait, at most \(Int(WriteGate.maximumWait)) s); for a running machine use `lifeboat failback --phase prepare`")
                    }
                    result = try engine.sync(sandbox, to: to, mode: syncMode, verify: verify, undo: !noUndo,
                                             plan: { showPlan($0, line) }, progress: progress)
                    return finish(result, line)
                }
                let point = try opened.point(source)
                let name: String
                if let disk {
                    name = disk
                } else if point.disks.count == 1 {
                    name = point.disks[0].name
                } else {
                    throw VaultError.invalidArgument("point \(point.label) has disks \(point.disks.map(\.name).joined(separator: ", ")): choose one with --disk")
                }
                let pointSource = try PointSource(vault: opened, point: point, disk: name)
                result = try engine.sync(pointSource, to: to, mode: syncMode, verify: verify, undo: !noUndo,
                                         plan: { showPlan($0, line) }, progress: progress)
            }
            finish(result, line)
        }
    }

    private func finish(_ result: SyncReport, _ line: ProgressLine) {
        line.finish()
        for warning in result.warnings where !json { Terminal.warning(warning) }
        if json { printJSON(result); return }
        print(syncSummary(result))
    }

    private func showPlan(_ plan: SyncPlan, _ line: ProgressLine) {
        line.finish()
        for warning in plan.warnings { Terminal.warning(warning) }
        guard !json else { return }
        Terminal.write("lifeboat: \(planSummary(plan, undo: !noUndo || plan.resumedFrom != nil))\n")
    }
}

/// What a sync is about to do: what differs (or that it is found while writing) and the journal.
func planSummary(_ plan: SyncPlan, undo: Bool) -> String {
    let what = plan.differingBytes.map { plan.mode == .delta ? "\(formatBytes($0)) differ" : "\(formatBytes($0)) to write" }
        ?? "comparing and writing what differs"
    let journal = undo
        ? "undo journal \(plan.journalBytesAtMost ? "at most " : "")\(formatBytes(plan.journalBytes)) in \(plan.journalDirectory) (\(formatBytes(plan.freeBytes)) free)"
        : "no undo journal (--no-undo)"
    return "\(what); \(journal)"
}

/// One line: what a sync processed, matched, transferred and wrote.
func syncSummary(_ result: SyncReport) -> String {
    let rate = Double(result.processedBytes) / max(result.seconds, 0.001)
    return "synced \(result.source) disk \(result.disk) to \(result.target) (\(result.mode.rawValue)\(result.resumed ? ", resumed" : "")\(result.verified ? ", verified" : "")): processed \(formatBytes(result.processedBytes)), matched \(formatBytes(result.matchedBytes)), transferred \(formatBytes(result.transferredBytes)), written \(formatBytes(result.writtenBytes)), journal \(formatBytes(result.journalBytes)); \(String(format: "%.1f", result.seconds)) s (\(formatBytes(UInt64(rate)))/s)"
}

struct SyncStatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Say whether a target is consistent, mid-sync, or rolled back.",
        discussion: """
        Example:
          lifeboat sync status /dev/vg0/web01-os --json
        """)

    @Argument(help: "The target file or block device.")
    var target: String

    @OptionGroup var engineOptions: SyncEngineOptions

    @Flag(help: "Print JSON.")
    var json = false

    func run() throws {
        try report {
            let status = try engineOptions.engine().status(target)
            if json { printJSON(status); return }
            let source = status.source.map { "\($0) disk \(status.disk ?? "?")" } ?? ""
            switch status.condition {
            case .consistent:
                if status.source == nil {
                    print("\(status.target): consistent (no sync recorded)")
                } else {
                    print("\(status.target): consistent: synced from \(source) (\(status.mode?.rawValue ?? "")), finished \(status.finished ?? "?")")
                }
            case .midSync:
                print("\(status.target): mid-sync from \(source) (\(status.mode?.rawValue ?? "")), started \(status.started ?? "?"), \(formatBytes(status.progressBytes ?? 0)) of \(formatBytes(status.size ?? 0)) done, undo journal \(formatBytes(status.journalBytes ?? 0))")
                print("  finish it: lifeboat sync --resume \(status.target)")
                print("  undo it:   lifeboat sync --rollback \(status.target)")
            case .inconsistent:
                print("\(status.target): INCONSISTENT: a sync from \(source) without undo journal (--no-undo) did not finish, \(formatBytes(status.progressBytes ?? 0)) of \(formatBytes(status.size ?? 0)) done")
                print("  finish it: lifeboat sync --resume \(status.target)")
            case .rolledBack:
                print("\(status.target): rolled back: the sync from \(source) was undone \(status.finished ?? "?"); the target holds its old image")
            }
            if let failback = status.failback {
                switch failback.phase {
                case .prepared:
                    print("  failback of sandbox \(failback.sandbox) disk \(failback.disk): prepared \(failback.prepared ?? "?") (point \(failback.preparedPoint?.prefix(12) ?? "?")); once the machine is stopped: lifeboat failback sandbox:\(failback.sandbox) --disk \(failback.disk) --to \(status.target) --phase complete")
                case .completed:
                    print("  failback of sandbox \(failback.sandbox) disk \(failback.disk): completed \(failback.completed ?? "?") (point \(failback.completedPoint?.prefix(12) ?? "?"))")
                }
            }
        }
    }
}

/// What every command that finds a target's sync state takes.
struct SyncEngineOptions: ParsableArguments {
    @Flag(help: ArgumentHelp("The target is the disk the unfinished sync recorded before a reboot was writing (needed only where nothing that survives a reboot names the device).", valueName: "same-target"))
    var sameTarget = false

    func engine() -> SyncEngine {
        var engine = SyncEngine(stateDirectory: Defaults.stateDirectory)
        engine.sameTargetAcrossBoots = sameTarget
        return engine
    }
}
