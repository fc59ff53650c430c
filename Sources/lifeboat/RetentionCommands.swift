import ArgumentParser
import Foundation
import SystemIO
import Vault

struct Policy: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Set or show a machine's retention policy.",
        subcommands: [PolicySet.self, PolicyShow.self])
}

struct PolicySet: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "set",
        abstract: "Set how many points of a machine prune keeps.",
        discussion: """
        Rules apply as in borg and Proxmox: keep-within, then keep-last, hourly, daily, weekly
        (ISO weeks), monthly and yearly, each keeping the newest point of each period not already
        kept by an earlier rule; periods in UTC. Protected points, and points younger than their
        --keep-until, are always kept. The new policy replaces the old one.

        Example:
          lifeboat policy set web01 --keep-last 3 --keep-daily 7 --keep-weekly 4 --keep-monthly 12
        """)

    @OptionGroup var vault: VaultOptions
    @Argument(help: "The machine.") var machine: String
    @Option(help: "Keep the N newest points.") var keepLast: Int?
    @Option(help: "Keep the newest point of each of the last N hours that have one.") var keepHourly: Int?
    @Option(help: "... of each of the last N days.") var keepDaily: Int?
    @Option(help: "... of each of the last N ISO weeks.") var keepWeekly: Int?
    @Option(help: "... of each of the last N months.") var keepMonthly: Int?
    @Option(help: "... of each of the last N years.") var keepYearly: Int?
    @Option(help: ArgumentHelp("Keep every point younger than this (36h, 7d, 2w, 6m, 1y).", valueName: "duration"))
    var keepWithin: String?

    func run() throws {
        try report {
            let policy = RetentionPolicy(keepLast: keepLast, keepHourly: keepHourly, keepDaily: keepDaily, keepWeekly: keepWeekly,
                                         keepMonthly: keepMonthly, keepYearly: keepYearly, keepWithin: keepWithin)
            guard !policy.isEmpty else { throw VaultError.invalidArgument("give at least one --keep-... rule") }
            try vault.open().setPolicy(policy, machine: machine)
            print("policy of \(machine): \(describe(policy))")
        }
    }
}

struct PolicyShow: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "show",
        abstract: "Show a machine's retention policy.",
        discussion: "Example:\n  lifeboat policy show web01 --json")

    @OptionGroup var vault: VaultOptions
    @Argument(help: "The machine.") var machine: String
    @Flag(help: "Print JSON.") var json = false

    func run() throws {
        try report {
            let policy = try vault.open().policy(machine: machine)
            if json {
                printJSON(policy ?? RetentionPolicy())
            } else {
                print(policy.map { "policy of \(machine): \(describe($0))" } ?? "\(machine) has no policy: prune keeps all its points")
            }
        }
    }
}

func describe(_ p: RetentionPolicy) -> String {
    var parts: [String] = []
    if let w = p.keepWithin { parts.append("within \(w)") }
    for (name, value) in [("last", p.keepLast), ("hourly", p.keepHourly), ("daily", p.keepDaily), ("weekly", p.keepWeekly),
                          ("monthly", p.keepMonthly), ("yearly", p.keepYearly)] {
        if let value, value > 0 { parts.append("\(name) \(value)") }
    }
    return parts.joined(separator: ", ")
}

struct Prune: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Remove the points the machines' policies do not keep.",
        discussion: """
        Lists every point as kept (with the rule that kept it) or removed. Machines without a
        policy keep everything. Removing a point removes its manifest; `lifeboat gc` then frees
        the space only it used.

        Example:
          lifeboat prune web01 --dry-run
        """)

    @OptionGroup var vault: VaultOptions
    @Argument(help: "Only this machine.") var machine: String?
    @Flag(help: "Show what would be removed; change nothing.") var dryRun = false
    @Flag(help: "Print JSON.") var json = false

    func run() throws {
        try report {
            let opened = try vault.open()
            installInterruptHandlers()
            let result = try opened.prune(machine: machine, dryRun: dryRun)
            if json {
                printJSON(result)
                return
            }
            var rows = [["MACHINE", "TIME", "ID", "", "RULE"]]
            for d in result.decisions {
                rows.append([d.machine, d.time, String(d.point.prefix(12)), d.keep ? "keep" : (dryRun ? "would remove" : "removed"), d.reason])
            }
            print(formatTable(rows), terminator: "")
            print("\(result.kept) kept, \(result.removed) \(dryRun ? "would be removed" : "removed")")
        }
    }
}

struct Protect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Protect a point from prune.",
        discussion: "Example:\n  lifeboat protect web01@2026-03-02 --until 2027-03-02")

    @OptionGroup var vault: VaultOptions
    @Argument(help: "The point.") var point: String
    @Option(help: ArgumentHelp("Protect it until this date (ISO 8601); for ever without.", valueName: "date"))
    var until: String?

    func run() throws {
        try report {
            let opened = try vault.open()
            let p = try opened.point(point)
            var date: Date? = nil
            if let until {
                guard let d = Timestamp.parse(until) else { throw VaultError.invalidArgument("cannot read date \"\(until)\"") }
                date = d
            }
            try opened.protect(p, until: date)
            print("protected \(p.label)\(until.map { " until \($0)" } ?? "")")
        }
    }
}

struct Unprotect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Remove a point's protection.",
        discussion: "Example:\n  lifeboat unprotect web01@2026-03-02")

    @OptionGroup var vault: VaultOptions
    @Argument(help: "The point.") var point: String

    func run() throws {
        try report {
            let opened = try vault.open()
            let p = try opened.point(point)
            try opened.unprotect(p)
            print("unprotected \(p.label)")
        }
    }
}

struct GC: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "gc",
        abstract: "Free the space no recovery point needs.",
        discussion: """
        Deletes packs that hold no chunk any point needs, copies the live chunks of packs that
        are more than a twentieth dead into new packs, and deletes packs left behind by interrupted backups
        once they are older than --grace. Safe while backups, mounts and restores run: packs
        are deleted only after a plan naming them was written and every backup that started
        before it has finished (otherwise the deletion is deferred to the next gc).

        Example:
          lifeboat prune && lifeboat gc
        """)

    @OptionGroup var vault: VaultOptions
    @Flag(help: "Report what would be freed; change nothing.") var dryRun = false
    @Option(help: ArgumentHelp("Age before an unindexed pack counts as left behind (e.g. 1h, 1d).", valueName: "duration"))
    var grace: String = "1h"
    @Flag(help: "Print JSON.") var json = false

    func run() throws {
        try report {
            guard let seconds = RetentionPolicy.seconds(grace) else { throw VaultError.invalidArgument("cannot read duration \"\(grace)\"") }
            let opened = try vault.open()
            installInterruptHandlers()
            let result = try opened.collectGarbage(dryRun: dryRun, grace: seconds)
            if json {
                printJSON(result)
                return
            }
            let verb = dryRun ? "would free" : "freed"
            print("\(result.points) points, \(result.liveChunks) live chunks in \(result.packs) packs")
            print("\(verb) \(formatBytes(result.bytesFreed)): deleted \(formatBytes(result.bytesDeleted)) in \(result.packsDeleted) dead packs, \(result.packsRewritten) partly dead packs rewritten (\(formatBytes(result.bytesCopied)) of live chunks copied), \(result.orphanPacksDeleted) packs left by interrupted backups")
            if result.orphanPacksIndexed > 0 {
                print("\(result.orphanPacksIndexed) packs no index object listed hold chunks points need and nothing else holds: listed again, kept")
            }
            if result.damagedChunks > 0 {
                Terminal.warning("\(result.damagedChunks) live chunks failed their check while being copied; the packs holding them were kept: run `lifeboat check --read-data`")
            }
            if result.deferred { print("deletion deferred: a backup that was running when this gc planned it still runs; run gc again later") }
        }
    }
}

struct Stats: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show sizes, deduplication and compression, and what each point alone holds.",
        discussion: """
        ONLY IT is the stored size of the chunks no other point uses: what pruning that point
        (and then gc) would free.

        Example:
          lifeboat stats web01
        """)

    @OptionGroup var vault: VaultOptions
    @Argument(help: "Only this machine's points.") var machine: String?
    @Flag(help: "Print JSON.") var json = false

    func run() throws {
        try report {
            if let machine { try validateName(machine, what: "machine") }
            let s = try vault.open().statistics(machine: machine)
            if json {
                printJSON(s)
                return
            }
            print("points       \(s.points)")
            print("logical      \(formatBytes(s.logicalBytes)) (data \(formatBytes(s.dataBytes)), the rest holes)")
            print("unique       \(formatBytes(s.uniqueBytes))  deduplication \(String(format: "%.2f", s.deduplication))x")
            print("stored       \(formatBytes(s.storedBytes))  compression \(String(format: "%.2f", s.compression))x")
            print("packs        \(formatBytes(s.packBytes)) in the vault (gc frees what no point uses)")
            var rows = [["MACHINE", "TIME", "ID", "SIZE", "ONLY IT"]]
            for p in s.perPoint {
                rows.append([p.machine, p.time, String(p.point.prefix(12)), formatBytes(p.logicalBytes), formatBytes(p.uniqueStoredBytes)])
            }
            print(formatTable(rows), terminator: "")
        }
    }
}
