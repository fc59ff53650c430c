import ArgumentParser
import ChunkStore
import Foundation
import ObjectStore
import SystemIO
import Vault

struct Init: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create a vault.",
        discussion: """
        The chunk size and compression are fixed for the vault's life. 64K chunks store about
        60 MB per day for a VM that changes 60 MB in 4 KiB blocks; larger chunks store more.

        Example:
          lifeboat init --vault /srv/lifeboat --chunk-size 64K --compression zstd:1
        """)

    @OptionGroup var vault: VaultOptions

    @Option(help: ArgumentHelp("Chunk size: a power of two from 4K to 8M.", valueName: "size"))
    var chunkSize: String = "64K"

    @Option(help: ArgumentHelp("Compression: zstd:LEVEL (-7..19) or none.", valueName: "method"))
    var compression: String = "zstd:1"

    func run() throws {
        try report {
            guard let size = parseSize(chunkSize) else { throw VaultError.invalidArgument("cannot read chunk size \"\(chunkSize)\"") }
            guard let method = CompressionSetting(compression) else {
                throw VaultError.invalidArgument("unknown compression \"\(compression)\": use zstd:LEVEL or none")
            }
            let path = vault.path
            do throws(SystemError) {
                try FileSystem.createDirectories(path, permissions: 0o700)
            } catch { throw VaultError.target(error) }
            let created = try Vault.create(store: LocalDirectoryStore(root: path), chunkSize: size, compression: method)
            print("created vault \(created.config.id.prefix(12)) at \(path) (chunks \(formatBytes(UInt64(size))), \(method))")
        }
    }
}

struct Backup: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Make a recovery point of a machine's disks.",
        discussion: """
        SOURCE is a raw image file (its holes are not read), a block device, or - for standard
        input. Only chunks new to the vault are stored. The point is application-consistent
        when --pre-snapshot succeeded, crash-consistent otherwise; --post-snapshot runs after the
        disks were read, whatever happened.

        Example:
          lifeboat backup --machine web01 --disk os=/dev/vg0/web01-os --disk data=/srv/web01-data.img \\
              --pre-snapshot 'ssh web01 fsfreeze -f /' --post-snapshot 'ssh web01 fsfreeze -u /'
        """)

    @OptionGroup var vault: VaultOptions

    @Option(help: "The machine's name.")
    var machine: String

    @Option(name: .customLong("disk"), help: ArgumentHelp("A disk as NAME=SOURCE; repeat for each disk.", valueName: "name=source"))
    var disks: [String] = []

    @Option(help: ArgumentHelp("The point's time, ISO 8601 (default: now).", valueName: "time"))
    var time: String?

    @Option(help: ArgumentHelp("Shell command run before reading (e.g. freeze the guest).", valueName: "command"))
    var preSnapshot: String?

    @Option(help: ArgumentHelp("Shell command run after reading (e.g. thaw the guest).", valueName: "command"))
    var postSnapshot: String?

    @Option(name: .customLong("tag"), help: "A tag for the point; repeatable.")
    var tags: [String] = []

    @Option(help: ArgumentHelp("Prune keeps the point at least until this date (ISO 8601).", valueName: "date"))
    var keepUntil: String?

    @Flag(help: "Print a JSON summary on standard output.")
    var json = false

    func run() throws {
        try report {
            var parsed: [(name: String, source: SourceSpec)] = []
            for disk in disks {
                guard let eq = disk.firstIndex(of: "="), eq != disk.startIndex, disk.index(after: eq) != disk.endIndex else {
                    throw VaultError.invalidArgument("--disk wants NAME=SOURCE, not \"\(disk)\"")
                }
                parsed.append((String(disk[..<eq]), SourceSpec(String(disk[disk.index(after: eq)...]))))
            }
            var date: Date? = nil
            if let time {
                guard let d = Timestamp.parse(time) else { throw VaultError.invalidArgument("cannot read time \"\(time)\": use ISO 8601, e.g. 2026-01-31T22:00:00Z") }
                date = d
            }
            var keep: Date? = nil
            if let keepUntil {
                guard let d = Timestamp.parse(keepUntil) else { throw VaultError.invalidArgument("cannot read date \"\(keepUntil)\"") }
                keep = d
            }
            let opened = try vault.open()
            installInterruptHandlers()
            let line = ProgressLine("backup")
            let request = BackupRequest(machine: machine, disks: parsed, time: date, preSnapshot: preSnapshot,
                                        postSnapshot: postSnapshot, tags: tags, keepUntil: keep)
            let result = try opened.backup(request) { p in
                line.update(done: p.bytesDone, total: p.bytesTotal, label: "backup \(p.disk)")
            }
            line.finish()
            for warning in result.warnings { Terminal.warning(warning) }
            if json {
                printJSON(result)
            } else {
                let rate = Double(result.disks.reduce(0) { $0 + $1.size }) / max(result.seconds, 0.001)
                print("point \(result.machine)@\(result.time) (\(result.point.prefix(12))), \(result.consistency.rawValue)-consistent")
                print("  read \(formatBytes(result.bytesRead)), new \(formatBytes(result.newBytes)), stored \(formatBytes(result.storedBytes)); chunks new \(result.chunksNew), reused \(result.chunksReused); \(String(format: "%.1f", result.seconds)) s (\(formatBytes(UInt64(rate)))/s)")
            }
        }
    }
}

struct PointSummary: Codable {
    var machine: String
    var time: String
    var id: String
    var consistency: String
    var disks: [String]
    var logicalSize: UInt64
    var newBytes: UInt64
    var storedBytes: UInt64
    var tags: [String]

    init(_ point: RecoveryPoint) {
        machine = point.machine
        time = point.time
        id = point.id
        consistency = point.consistency.rawValue
        disks = point.disks.map(\.name)
        logicalSize = point.logicalSize
        newBytes = point.newBytes
        storedBytes = point.storedBytes
        tags = point.tags
    }
}

struct Points: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List recovery points.",
        discussion: """
        NEW is what the point added to the vault (plaintext of new chunks); STORED is what that
        takes in the vault after compression.

        Example:
          lifeboat points web01 --json
        """)

    @OptionGroup var vault: VaultOptions

    @Argument(help: "Only this machine's points.")
    var machine: String?

    @Flag(help: "Print JSON.")
    var json = false

    func run() throws {
        try report {
            let opened = try vault.open()
            if let machine { try validateName(machine, what: "machine") }
            let points = try opened.points(machine: machine) { name, error in Terminal.warning(error.description) }
            if json {
                printJSON(points.map(PointSummary.init))
                return
            }
            if points.isEmpty {
                print(machine.map { "no recovery points of \($0)" } ?? "no recovery points")
                return
            }
            var rows = [["MACHINE", "TIME", "ID", "CONSISTENCY", "DISKS", "SIZE", "NEW", "STORED"]]
            for p in points {
                rows.append([p.machine, p.time, p.shortID, p.consistency.rawValue, p.disks.map(\.name).joined(separator: ","),
                             formatBytes(p.logicalSize), formatBytes(p.newBytes), formatBytes(p.storedBytes)])
            }
            print(formatTable(rows), terminator: "")
        }
    }
}

struct Show: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show one recovery point.",
        discussion: """
        POINT is MACHINE@latest, MACHINE@-N (N before the latest), MACHINE@TIME (or a unique
        prefix of it) or MACHINE@ID-PREFIX.

        Example:
          lifeboat show web01@-1
        """)

    @OptionGroup var vault: VaultOptions

    @Argument(help: "The point.")
    var point: String

    @Flag(help: "Print JSON.")
    var json = false

    func run() throws {
        try report {
            let p = try vault.open().point(point)
            if json {
                var full = p
                full.id = p.id
                struct Shown: Encodable { var id: String; var point: RecoveryPoint }
                printJSON(Shown(id: p.id, point: p))
                return
            }
            print("point        \(p.machine)@\(p.time)")
            print("id           \(p.id)")
            print("consistency  \(p.consistency.rawValue)")
            print("created      \(p.created) on \(p.host)")
            if !p.tags.isEmpty { print("tags         \(p.tags.joined(separator: ", "))") }
            if let parent = p.parent { print("parent       \(parent.prefix(12))") }
            var rows = [["DISK", "SIZE", "DATA", "NEW", "STORED", "CHUNKS NEW", "REUSED", "HOLES"]]
            for d in p.disks {
                rows.append([d.name, formatBytes(d.size), formatBytes(d.dataBytes), formatBytes(d.newBytes), formatBytes(d.storedBytes),
                             "\(d.newChunks)", "\(d.reusedChunks)", "\(d.holeChunks)"])
            }
            print(formatTable(rows), terminator: "")
        }
    }
}

struct Restore: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write a point's disk to a file or a block device.",
        discussion: """
        A new file gets holes where the disk is all zeros and appears under its name only when
        complete. An existing file is replaced only with --overwrite; a block device must be at
        least as large as the disk. Every chunk is checked before it is written.

        Example:
          lifeboat restore web01@latest --disk os --to /var/tmp/web01-os.img
        """)

    @OptionGroup var vault: VaultOptions

    @Argument(help: "The point (MACHINE@latest, MACHINE@-N, MACHINE@TIME, MACHINE@ID).")
    var point: String

    @Option(help: "The disk to restore (may be omitted when the point has one disk).")
    var disk: String?

    @Option(help: ArgumentHelp("The target file or block device.", valueName: "path"))
    var to: String

    @Flag(help: "Replace an existing target file.")
    var overwrite = false

    @Flag(help: "Print a JSON summary on standard output.")
    var json = false

    func run() throws {
        try report {
            let opened = try vault.open()
            let p = try opened.point(point)
            let name: String
            if let disk {
                name = disk
            } else if p.disks.count == 1 {
                name = p.disks[0].name
            } else {
                throw VaultError.invalidArgument("point \(p.label) has disks \(p.disks.map(\.name).joined(separator: ", ")): choose one with --disk")
            }
            installInterruptHandlers()
            let line = ProgressLine("restore \(name)")
            let result = try opened.restore(point: p, disk: name, to: to, overwrite: overwrite) { progress in
                line.update(done: progress.bytesDone, total: progress.bytesTotal)
            }
            line.finish()
            if json {
                printJSON(result)
            } else {
                let rate = Double(result.size) / max(result.seconds, 0.001)
                print("restored \(p.machine)@\(p.time) disk \(name) to \(to): \(formatBytes(result.size)) in \(String(format: "%.1f", result.seconds)) s (\(formatBytes(UInt64(rate)))/s)")
            }
        }
    }
}

struct Check: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Verify the vault.",
        discussion: """
        Without --read-data: the structure (index objects, pack directories, every point's disk
        index). With --read-data: also every chunk's bytes against its id. Damage is reported as
        the points, disks and byte ranges it affects; the exit code is then 4.

        Example:
          lifeboat check --read-data
        """)

    @OptionGroup var vault: VaultOptions

    @Flag(help: "Read and verify every chunk.")
    var readData = false

    @Flag(help: "Print JSON.")
    var json = false

    func run() throws {
        try report {
            let opened = try vault.open()
            installInterruptHandlers()
            let line = ProgressLine("check")
            let result = try opened.check(readData: readData) { p in line.update(done: p.bytesDone, total: p.bytesTotal) }
            line.finish()
            if json {
                printJSON(result)
            } else {
                for warning in result.warnings { print("warning: \(warning.object): \(warning.message)") }
                for error in result.errors { print("error: \(error.object): \(error.message)") }
                for range in result.damaged {
                    print("damaged: \(range.machine)@\(range.time) (\(range.point.prefix(12))) disk \(range.disk) bytes \(range.start)-\(range.end): \(range.reason)")
                }
                let verified = readData ? ", \(result.chunksVerified) chunks (\(formatBytes(result.bytesVerified))) read and verified" : ""
                print("\(result.ok ? "ok" : "DAMAGED"): \(result.points) points, \(result.packs) packs, \(result.indexObjects) index objects\(verified)")
            }
            if !result.ok { throw ExitCode(lifeboatExitCode(for: FailureKind.damaged)) }
        }
    }
}
