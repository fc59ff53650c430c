import ArgumentParser
import Foundation
import Sync
import SystemIO
import Vault

struct FailbackCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "failback",
        abstract: "Fail a sandbox back onto its on-prem disk in two phases: prepare while it runs, complete once it is stopped.",
        discussion: """
        --phase prepare promotes the sandbox (running or not) to a new point and syncs that point
        onto the target while the machine keeps running: the bulk of the bytes. Stop the machine
        and unmount the sandbox, then --phase complete promotes it again and syncs that point:
        the delta sync writes only the slots that changed since prepare, then verifies the
        target. Both phases are journaled syncs (`lifeboat sync --resume/--rollback TARGET`
        after an interruption); `lifeboat sync status TARGET` shows the failback's phase.
        Afterwards, `lifeboat backup` of the target stores only the chunks that changed.

        Example:
          lifeboat failback sandbox:web01-test --disk os --to /dev/vg0/web01-os --phase prepare
          (stop the machine) lifeboat umount /mnt/web01-test
          lifeboat failback sandbox:web01-test --disk os --to /dev/vg0/web01-os --phase complete
        """)

    @OptionGroup var vault: VaultOptions

    @Argument(help: "The sandbox: sandbox:NAME.")
    var source: String

    @Option(help: "The disk (may be omitted when the sandbox has one disk).")
    var disk: String?

    @Option(help: ArgumentHelp("The target file (created sparse if missing) or block device.", valueName: "path"))
    var to: String

    @Option(help: ArgumentHelp("prepare (the machine runs on) or complete (the machine is stopped, the sandbox unmounted).", valueName: "phase"))
    var phase: String

    @Option(help: ArgumentHelp("prepare only: delta (the default) or full.", valueName: "mode"))
    var mode: String = "delta"

    @OptionGroup var engineOptions: SyncEngineOptions

    @Flag(help: "Print a JSON summary on standard output.")
    var json = false

    func run() throws {
        try report {
            guard let (name, version) = SandboxSource.parse(source), version == nil else {
                throw SyncError.invalidArgument("failback takes a sandbox: sandbox:NAME, not \"\(source)\"")
            }
            guard let phase = Failback.Phase(rawValue: phase) else {
                throw SyncError.invalidArgument("--phase is prepare or complete, not \"\(self.phase)\"")
            }
            guard let syncMode = SyncMode(rawValue: mode) else { throw SyncError.invalidArgument("--mode is delta or full, not \"\(mode)\"") }
            installInterruptHandlers()
            let failback = Failback(vault: try vault.open(), engine: engineOptions.engine())
            let chunkSize = UInt64(Defaults.chunkSize)
            let promoteLine = ProgressLine("promote \(name)", enabled: Terminal.isInteractive && !json)
            let line = ProgressLine("\(phase.rawValue)")
            let result = try failback.run(phase, sandbox: name, disk: disk, to: to, mode: syncMode, promoting: { p in
                promoteLine.update(done: UInt64(p.slotsDone) * chunkSize, total: UInt64(p.slotsTotal) * chunkSize)
            }, plan: { plan in
                promoteLine.finish()
                line.finish()
                for warning in plan.warnings { Terminal.warning(warning) }
                guard !json else { return }
                Terminal.write("lifeboat: \(planSummary(plan, undo: true))\n")
            }, progress: { p in
                line.update(done: p.bytesDone, total: p.bytesTotal, label: p.phase.rawValue)
            })
            promoteLine.finish()
            line.finish()
            if json {
                printJSON(result)
                return
            }
            for warning in result.warnings + result.sync.warnings { Terminal.warning(warning) }
            print("failback \(phase.rawValue): sandbox \(name)\(result.mounted ? " (running)" : "") promoted to \(result.pointLabel): \(formatBytes(result.promoteReadBytes)) read, \(formatBytes(result.promoteNewBytes)) new")
            print(syncSummary(result.sync))
            switch phase {
            case .prepare:
                print("next: stop the machine, unmount the sandbox, then: lifeboat failback sandbox:\(name) --disk \(result.disk) --to \(result.target) --phase complete")
            case .complete:
                print("failback complete: \(result.target) holds sandbox \(name)'s final state (verified)")
            }
        }
    }
}
