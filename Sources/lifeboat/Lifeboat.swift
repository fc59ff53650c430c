import ArgumentParser
import Foundation
import SystemIO
import Vault

@main
struct Lifeboat: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lifeboat",
        abstract: "Back up virtual-machine disks into a deduplicating vault and get them back out.",
        discussion: """
        The vault is --vault PATH, else $LIFEBOAT_VAULT, else /var/lib/lifeboat/vault (root) or
        ~/.local/share/lifeboat/vault. Local state (caches) lives in $LIFEBOAT_STATE, else
        /var/lib/lifeboat/state (root) or ~/.local/state/lifeboat.

        Exit codes: 0 success, 1 failure, 3 not found, 4 damaged data, 5 busy (locked),
        6 no space left, 7 I/O error, 8 verification failed, 64 usage error, 130 interrupted.

        Example:
          lifeboat init
          lifeboat backup --machine web01 --disk os=/dev/vg0/web01-os
          lifeboat points web01
          lifeboat restore web01@latest --disk os --to /tmp/os.img
        """,
        version: "0.1.0",
        subcommands: [Init.self, Backup.self, Points.self, Show.self, Restore.self, Check.self, MountCommand.self, UmountCommand.self,
                      Policy.self, Prune.self, Protect.self, Unprotect.self, GC.self, Stats.self, SandboxCommand.self, SyncCommand.self, FailbackCommand.self,
                      Ls.self, Cat.self, RestoreFiles.self]
    )
}

/// The vault option every command takes.
struct VaultOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("The vault directory (default: $LIFEBOAT_VAULT, else a per-user default).", valueName: "path"))
    var vault: String?

    var path: String { vault ?? Defaults.vaultPath }

    func open() throws -> Vault {
        try Vault.open(path: path)
    }
}

/// Runs a command body, turning Lifeboat's errors into one sentence and a documented exit code.
func report<T>(_ body: () throws -> T) throws -> T {
    defer {
        for cache in Vault.rebuiltCaches {
            Terminal.warning("this host's chunk location cache (\(cache)) did not match the vault and was rebuilt from it; the vault was not at fault")
        }
    }
    do {
        return try body()
    } catch let error as LifeboatError {
        Terminal.error(error.description)
        throw ExitCode(lifeboatExitCode(for: error.kind))
    }
}

func lifeboatExitCode(for kind: FailureKind) -> Int32 {
    switch kind {
    case .usage: return 64
    case .notFound: return 3
    case .damaged: return 4
    case .busy: return 5
    case .noSpace: return 6
    case .io: return 7
    case .verification: return 8
    case .interrupted: return 130
    }
}

/// Lets SIGINT and SIGTERM stop a long operation cleanly; a second signal kills at once.
func installInterruptHandlers() {
    signal(SIGINT) { _ in
        Cancellation.request()
        signal(SIGINT, SIG_DFL)
    }
    signal(SIGTERM) { _ in
        Cancellation.request()
        signal(SIGTERM, SIG_DFL)
    }
}

func printJSON<T: Encodable>(_ value: T) {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
    if let data = try? encoder.encode(value) {
        FileHandle.standardOutput.write(data)
        FileHandle.standardOutput.write(Data("\n".utf8))
    }
}

/// "64K", "1M", "4096": a size in bytes.
func parseSize(_ text: String) -> Int? {
    let units: [Character: Int] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40]
    var body = text.uppercased()
    if body.hasSuffix("IB") { body.removeLast(2) } else if body.hasSuffix("B") { body.removeLast() }
    if let last = body.last, let unit = units[last] {
        return Int(body.dropLast()).map { $0 * unit }
    }
    return Int(body)
}
