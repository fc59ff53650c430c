import ArgumentParser
import Foundation
import Glibc
import Mount
import SystemIO
import Vault
import VirtualDisk

struct MountCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mount",
        abstract: "Mount the vault's recovery points read-only (FUSE).",
        discussion: """
        The tree: machines/<machine>/<point time>/disks/<disk>.img (the raw disk), .../<disk>.vhd
        (the same disk as a fixed VHD), .../point.json, machines/<machine>/latest, by-id/<id>.
        Points added to or removed from the vault appear and disappear within a second.
        Without --foreground the command returns once the mount is ready, and the server runs
        in the background (its log: $LIFEBOAT_STATE/logs/mount.log). Reads are verified: damaged
        data gives an I/O error and a log line, never wrong bytes.

        Example:
          lifeboat mount /mnt/lifeboat
          qemu-img info /mnt/lifeboat/machines/web01/latest/disks/os.vhd
          lifeboat umount /mnt/lifeboat
        """)

    @OptionGroup var vault: VaultOptions

    @Argument(help: "An empty directory to mount on.")
    var mountpoint: String

    @Flag(help: "Stay in the foreground until unmounted or interrupted.")
    var foreground = false

    @Flag(help: "Let other users read the mount (needs user_allow_other in /etc/fuse.conf for non-root).")
    var allowOther = false

    @Option(help: ArgumentHelp("Memory for verified chunks (e.g. 256M).", valueName: "size"))
    var cacheSize: String = "256M"

    @Option(help: .hidden)
    var readyFd: Int32?

    func run() throws {
        try report {
            guard let cache = parseSize(cacheSize), cache > 0 else { throw VaultError.invalidArgument("cannot read cache size \"\(cacheSize)\"") }
            if !foreground {
                try daemonize(["mount", mountpoint, "--cache-size", cacheSize, "--vault", vault.path] + (allowOther ? ["--allow-other"] : []),
                              mountpoint: mountpoint, what: "the vault")
                return
            }
            var options = MountOptions(mountpoint: mountpoint)
            options.allowOther = allowOther
            options.cacheBytes = cache
            let opened = try vault.open()
            let server = MountServer(vault: opened, options: options) { line in Terminal.error(line) }
            try reportReady(readyFd) { ready throws(MountError) in try server.run(options, ready: ready) }
        }
    }
}

/// Runs a server, telling a daemonising parent on `fd` (if any) "ok" once the mount is ready,
/// or why it failed.
func reportReady(_ fd: Int32?, _ serve: (@Sendable () -> Void) throws(MountError) -> Void) throws {
    do {
        try serve {
            if let fd {
                _ = "ok\n".withCString { write(fd, $0, 3) }
                close(fd)
            }
        }
    } catch {
        if let fd {
            let message = "\(error.description)\n"
            _ = message.withCString { write(fd, $0, strlen($0)) }
            close(fd)
        }
        throw error
    }
}

/// Starts this program again with `arguments` plus `--foreground --ready-fd 3`, detached, and
/// waits until it says the mount is ready (or why it is not).
func daemonize(_ arguments: [String], mountpoint: String, what: String) throws {
    var pipeFDs: [Int32] = [0, 0]
    guard pipe(&pipeFDs) == 0 else { throw SystemError("create a pipe for", path: "mount") }
    for fd in pipeFDs { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
    let logDirectory = Defaults.stateDirectory + "/logs"
    try? FileSystem.createDirectories(logDirectory)
    // The real path, so that the server shows up as `lifeboat mount` in ps.
    var pathBuffer = [CChar](repeating: 0, count: Int(PATH_MAX))
    let length = readlink("/proc/self/exe", &pathBuffer, pathBuffer.count - 1)
    let executable = length > 0 ? String(nulTerminated: pathBuffer) : "/proc/self/exe"
    let arguments = [executable] + arguments + ["--foreground", "--ready-fd", "3"]
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 2, logDirectory + "/mount.log", O_WRONLY | O_CREAT | O_APPEND, 0o644)
    // Both pipe ends close on exec; only this copy of the write end survives, as fd 3.
    posix_spawn_file_actions_adddup2(&actions, pipeFDs[1], 3)
    // Nothing else we hold open (a caller's pipes above all) may keep the server's parent
    // waiting for an end of file.
    if let open = try? FileSystem.list("/proc/self/fd") {
        for fd in open.compactMap({ Int32($0) }) where fd > 3 && fd != pipeFDs[1] {
            posix_spawn_file_actions_addclose(&actions, fd)
        }
    }
    var attributes = posix_spawnattr_t()
    posix_spawnattr_init(&attributes)
    defer { posix_spawnattr_destroy(&attributes) }
    // POSIX_SPAWN_SETSID (leave our session), SETSIGMASK and SETSIGDEF: whatever signals the
    // caller blocks or ignores, the server must see SIGINT and SIGTERM to unmount cleanly.
    posix_spawnattr_setflags(&attributes, Int16(0x80 | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
    var empty = sigset_t()
    sigemptyset(&empty)
    posix_spawnattr_setsigmask(&attributes, &empty)
    var defaults = sigset_t()
    sigemptyset(&defaults)
    for signal in [SIGINT, SIGTERM, SIGHUP, SIGPIPE] { sigaddset(&defaults, signal) }
    posix_spawnattr_setsigdefault(&attributes, &defaults)
    var pid: pid_t = 0
    let argv = arguments.map { strdup($0) } + [nil]
    defer { for p in argv { free(p) } }
    let status = posix_spawn(&pid, executable, &actions, &attributes, argv, environ)
    close(pipeFDs[1])
    defer { close(pipeFDs[0]) }
    guard status == 0 else { throw SystemError("start the mount server for", path: mountpoint, errno: status) }
    var answer = [UInt8]()
    var buffer = [UInt8](repeating: 0, count: 512)
    while true {
        let n = buffer.withUnsafeMutableBytes { Glibc.read(pipeFDs[0], $0.baseAddress, $0.count) }
        if n <= 0 { break }
        answer += buffer[0..<n]
    }
    let text = String(decoding: answer, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    if text == "ok" {
        print("mounted \(what) at \(mountpoint) (server pid \(pid); `lifeboat umount \(mountpoint)` to stop)")
        return
    }
    var exitStatus: Int32 = 0
    waitpid(pid, &exitStatus, 0)
    Terminal.error(text.isEmpty ? "the mount server stopped before the mount was ready; see \(logDirectory)/mount.log" : text)
    let code = (exitStatus & 0x7f) == 0 ? (exitStatus >> 8) & 0xff : 1
    throw ExitCode(code == 0 ? 1 : code)
}

struct UmountCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "umount",
        abstract: "Unmount a vault or sandbox mount.",
        discussion: """
        If files are still open, the mount is detached: it disappears from the tree at once and
        the server stops when the last file is closed. A mount left by a crashed server
        ("Transport endpoint is not connected") is cleared.

        Example:
          lifeboat umount /mnt/lifeboat
        """)

    @Argument(help: "The mount point.")
    var mountpoint: String

    func run() throws {
        try report {
            let sandboxServer = Sandboxes.server(mountedAt: FileSystem.absolute(mountpoint))
            switch try Mounts.unmount(mountpoint) {
            case .unmounted:
                // A sandbox's server flushes its overlay and releases the sandbox as it stops:
                // a sync or promote right after the unmount must find it free.
                if let sandboxServer {
                    guard Mounts.waitForExit(sandboxServer.pid, seconds: 60) else {
                        print("unmounted \(mountpoint); its server (pid \(sandboxServer.pid)) is still flushing the overlay")
                        return
                    }
                    // Its last flush is the one that makes the machine's writes durable.
                    if let why = Sandboxes.flushFailure(sandboxDirectory: sandboxServer.directory) {
                        throw SandboxError.lastFlushFailed(name: sandboxServer.name, why: "unmounted \(mountpoint), but " + why)
                    }
                }
                print("unmounted \(mountpoint)")
            case .staleCleared: print("cleared the stale mount at \(mountpoint) (its server had stopped)")
            case .detached: print("detached \(mountpoint): files are still open; the server stops when they are closed")
            }
        }
    }
}
