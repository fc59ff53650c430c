import ArgumentParser
import Foundation
import Glibc
import Mount
import SystemIO
import Vault
import VirtualDisk

struct SandboxCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sandbox",
        abstract: "Writable copy-on-write sandboxes over recovery points (test failover).",
        discussion: """
        A sandbox is a local overlay (in $LIFEBOAT_STATE/sandboxes) over one recovery point:
        reads merge what the sandbox wrote over the point, writes go to the overlay only, and the
        point never changes. While a sandbox exists its point is held: prune keeps it.

        Example:
          lifeboat sandbox create web01-test --from web01@latest
          lifeboat sandbox mount web01-test /mnt/web01-test
          qemu-system-x86_64 ... -drive file=/mnt/web01-test/disks/os.img,format=raw
          lifeboat umount /mnt/web01-test
          lifeboat sandbox promote web01-test    # keep its state as a new point
          lifeboat sandbox cleanup web01-test    # or throw it away
        """,
        subcommands: [Create.self, List.self, SandboxMount.self, Reset.self, Cleanup.self, Promote.self])

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create a sandbox over a point (instant: nothing is copied).",
            discussion: "Example:\n  lifeboat sandbox create web01-test --from web01@latest")

        @OptionGroup var vault: VaultOptions
        @Argument(help: "The sandbox's name (letters, digits, '.', '_', '-').") var name: String
        @Option(help: ArgumentHelp("The recovery point: MACHINE@latest, MACHINE@-N, MACHINE@<time> or MACHINE@<id prefix>.", valueName: "point"))
        var from: String

        func run() throws {
            try report {
                let opened = try vault.open()
                let point = try opened.point(from)
                let record = try Sandboxes(vault: opened).create(name, from: point)
                print("created sandbox \(record.name) over \(point.label) (\(point.disks.map(\.name).joined(separator: ", ")))")
            }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List the sandboxes: base point, bytes written, created, where mounted.",
            discussion: "Example:\n  lifeboat sandbox list --json")

        @OptionGroup var vault: VaultOptions
        @Flag(help: "Print JSON.") var json = false

        func run() throws {
            try report {
                let sandboxes = Sandboxes(vault: try vault.open())
                var statuses: [SandboxStatus] = []
                for name in sandboxes.names() { statuses.append(try sandboxes.status(name)) }
                if json {
                    printJSON(statuses)
                    return
                }
                guard !statuses.isEmpty else {
                    print("no sandboxes")
                    return
                }
                var rows = [["NAME", "POINT", "WRITTEN", "CREATED", "MOUNTED"]]
                for s in statuses {
                    rows.append([s.name, "\(s.machine)@\(s.pointTime) (\(s.point.prefix(12)))", formatBytes(s.writtenBytes), s.created,
                                 s.mountpoint.map { "\($0) (pid \(s.serverPID ?? 0))" } ?? "-"])
                }
                print(formatTable(rows), terminator: "")
                for s in statuses { if let why = s.lastFlushFailed { print("sandbox \(s.name): \(why)") } }
            }
        }
    }

    struct SandboxMount: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "mount",
            abstract: "Mount a sandbox read-write: disks/<disk>.img and disks/<disk>.vhd.",
            discussion: """
            fsync and flush from the client are honoured: what a guest flushed survives a crash of
            the server or a power cut. Unmount with `lifeboat umount MOUNTPOINT`.

            Example:
              lifeboat sandbox mount web01-test /mnt/web01-test
              losetup -fP --show /mnt/web01-test/disks/os.img
            """)

        @OptionGroup var vault: VaultOptions
        @Argument(help: "The sandbox.") var name: String
        @Argument(help: "An empty directory to mount on.") var mountpoint: String
        @Flag(help: "Stay in the foreground until unmounted or interrupted.") var foreground = false
        @Flag(help: "Let other users use the mount.") var allowOther = false
        @Option(help: ArgumentHelp("Memory for verified chunks of the point (e.g. 256M).", valueName: "size"))
        var cacheSize: String = "256M"
        @Option(help: .hidden) var readyFd: Int32?

        func run() throws {
            try report {
                guard let cache = parseSize(cacheSize), cache > 0 else { throw VaultError.invalidArgument("cannot read cache size \"\(cacheSize)\"") }
                if !foreground {
                    try daemonize(["sandbox", "mount", name, mountpoint, "--cache-size", cacheSize, "--vault", vault.path] + (allowOther ? ["--allow-other"] : []),
                                  mountpoint: mountpoint, what: "sandbox \(name)")
                    return
                }
                let sandbox = try Sandboxes(vault: try vault.open()).open(name, cacheBytes: cache)
                defer { sandbox.close() }
                var options = MountOptions(mountpoint: mountpoint)
                options.allowOther = allowOther
                let server = SandboxServer(sandbox: sandbox) { line in Terminal.error(line) }
                try reportReady(readyFd) { ready throws(MountError) in try server.run(options, ready: ready) }
            }
        }
    }

    struct Reset: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Throw away what a sandbox wrote; it starts again from its point.",
            discussion: "The sandbox must not be mounted.\n\nExample:\n  lifeboat sandbox reset web01-test")

        @OptionGroup var vault: VaultOptions
        @Argument(help: "The sandbox.") var name: String

        func run() throws {
            try report {
                try Sandboxes(vault: try vault.open()).reset(name)
                print("reset sandbox \(name)")
            }
        }
    }

    struct Cleanup: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Discard a sandbox (cleanup test failover); its point is no longer held.",
            discussion: "The sandbox must not be mounted.\n\nExample:\n  lifeboat sandbox cleanup web01-test")

        @OptionGroup var vault: VaultOptions
        @Argument(help: "The sandbox.") var name: String

        func run() throws {
            try report {
                try Sandboxes(vault: try vault.open()).cleanup(name)
                print("removed sandbox \(name)")
            }
        }
    }

    struct Promote: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Store a sandbox's current state as a new (crash-consistent) point of its machine.",
            discussion: """
            Only what the sandbox wrote is read and stored. A mounted sandbox keeps running: its
            writes wait while the overlay is read (reads go on); the sandbox lives on afterwards.

            Example:
              lifeboat sandbox promote web01-test --json
            """)

        @OptionGroup var vault: VaultOptions
        @Argument(help: "The sandbox.") var name: String
        @Flag(help: "Print JSON.") var json = false

        func run() throws {
            try report {
                installInterruptHandlers()
                let line = ProgressLine("promote \(name)", enabled: Terminal.isInteractive && !json)
                let chunkSize = UInt64(Defaults.chunkSize)
                let result = try Sandboxes(vault: try vault.open()).promote(name) { p in
                    line.update(done: UInt64(p.slotsDone) * chunkSize, total: UInt64(p.slotsTotal) * chunkSize)
                }
                line.finish()
                for warning in result.warnings { Terminal.warning(warning) }
                if json {
                    printJSON(result)
                } else {
                    print("promoted sandbox \(name) to point \(result.machine)@\(result.time) (\(result.point.prefix(12))): " +
                          "\(formatBytes(result.bytesRead)) read, \(formatBytes(result.newBytes)) new, \(formatBytes(result.storedBytes)) stored")
                }
            }
        }
    }
}
