import Foundation
import Glibc
import SystemIO
import Testing
import TestSupport

/// The `lifeboat` binary built beside this test bundle, run with its own vault and state.
struct CLI {
    let dir = TemporaryDirectory("cli")
    var vault: String { dir.file("vault") }

    static let binary: String = {
        let bundle = FileSystem.parentDirectory(of: ProcessInfo.processInfo.arguments[0])
        for candidate in [bundle + "/lifeboat", packageRoot + "/.build/debug/lifeboat"] where FileSystem.exists(candidate) {
            return candidate
        }
        return packageRoot + "/.build/debug/lifeboat"
    }()

    var environment: [String: String] { ["LIFEBOAT_VAULT": vault, "LIFEBOAT_STATE": dir.file("state")] }

    @discardableResult
    func callAsFunction(_ arguments: String..., stdin: String? = nil) -> ProcessResult {
        run(CLI.binary, arguments, environment: environment, stdin: stdin)
    }

    /// Starts lifeboat in the background; returns its pid.
    func start(_ arguments: [String]) -> pid_t {
        var pid: pid_t = 0
        let argv = ([CLI.binary] + arguments).map { strdup($0) } + [nil]
        var env = ProcessInfo.processInfo.environment
        for (k, v) in environment { env[k] = v }
        let envp = env.map { strdup("\($0)=\($1)") } + [nil]
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0)
        let status = posix_spawn(&pid, CLI.binary, &actions, nil, argv, envp)
        posix_spawn_file_actions_destroy(&actions)
        for p in argv { free(p) }
        for p in envp { free(p) }
        precondition(status == 0, "cannot start lifeboat")
        return pid
    }

    func wait(_ pid: pid_t) -> Int32 {
        var status: Int32 = 0
        waitpid(pid, &status, 0)
        return (status & 0x7f) == 0 ? (status >> 8) & 0xff : -(status & 0x7f)
    }

    /// A random sparse image of `megabytes` MiB: data with holes between.
    func randomImage(_ name: String, megabytes: Int, seed: UInt64) throws -> String {
        let path = dir.file(name)
        try setSize(path, UInt64(megabytes) << 20)
        var random = SeededBytes(seed: seed)
        var offset: UInt64 = 0
        while offset < UInt64(megabytes) << 20 {
            try writeAt(path, offset, random.bytes(3 << 20))
            offset += 4 << 20
        }
        return path
    }

    func json(_ result: ProcessResult) throws -> Any {
        try JSONSerialization.jsonObject(with: Data(result.stdout.utf8))
    }
}

@Suite(.serialized) struct CommandLineTests {
    /// The README's story: a real GPT disk with an ext4 partition, two days, restore, fsck.
    @Test func backUpARealDiskTwiceRestoreAndFsck() throws {
        let cli = CLI()
        defer { cli.dir.remove() }
        let tree = cli.dir.file("tree")
        try FileSystem.createDirectories(tree + "/etc")
        try writeAt(tree + "/etc/hosts", 0, Array("127.0.0.1 localhost\n".utf8))
        var random = SeededBytes(seed: 42)
        try writeAt(tree + "/data.bin", 0, random.bytes(3 << 20))
        let disk = cli.dir.file("disk.img")
        let part = cli.dir.file("part.img")
        #expect(shell("truncate -s 64M \(disk) && sgdisk -n 1:2048:0 -t 1:8300 \(disk) >/dev/null").status == 0)
        #expect(shell("truncate -s 62M \(part) && mkfs.ext4 -q -F -d \(tree) \(part)").status == 0)
        #expect(shell("dd if=\(part) of=\(disk) bs=1M seek=1 conv=notrunc,sparse status=none").status == 0)

        #expect(cli("init").status == 0)
        let day0 = cli("backup", "--machine", "web01", "--disk", "os=" + disk, "--time", "2026-03-01T00:00:00Z", "--json")
        #expect(day0.status == 0, "\(day0.stderr)")
        let day0Hash = try sha256(file: disk)
        try writeAt(disk, 5 << 20, random.bytes(8192))
        let day1 = cli("backup", "--machine", "web01", "--disk", "os=" + disk, "--time", "2026-03-02T00:00:00Z", "--json")
        #expect(day1.status == 0, "\(day1.stderr)")
        let summary = try #require(try cli.json(day1) as? [String: Any])
        #expect(summary["chunksNew"] as? Int ?? 0 <= 3)

        let points = try #require(try cli.json(cli("points", "--json")) as? [[String: Any]])
        #expect(points.count == 2)
        #expect(points.map { $0["time"] as? String } == ["2026-03-01T00:00:00Z", "2026-03-02T00:00:00Z"])
        #expect(cli("show", "web01@-1").stdout.contains("2026-03-01"))

        #expect(cli("restore", "web01@-1", "--disk", "os", "--to", cli.dir.file("day0.img")).status == 0)
        #expect(try sha256(file: cli.dir.file("day0.img")) == day0Hash)
        #expect(cli("restore", "web01@latest", "--to", cli.dir.file("day1.img")).status == 0)
        #expect(try sha256(file: cli.dir.file("day1.img")) == sha256(file: disk))
        // A real reader: fsck of the partition inside the restored disk.
        #expect(shell("dd if=\(cli.dir.file("day0.img")) of=\(cli.dir.file("p0")) bs=1M skip=1 status=none && e2fsck -fn \(cli.dir.file("p0"))").status == 0)
        #expect(cli("check", "--read-data").status == 0)

        // This host's location cache damaged (every record's offset moved): the restore rebuilds
        // it, writes the right bytes and says so; the vault is not reported damaged.
        let caches = try FileSystem.list(cli.dir.file("state/cache"))
        let cache = cli.dir.file("state/cache/") + (try #require(caches.first))
        for table in try FileSystem.list(cache) where table.hasPrefix("table-") {
            var bytes = try #require(FileManager.default.contents(atPath: cache + "/" + table).map(Array.init))
            for r in stride(from: 0, to: bytes.count, by: 48) { bytes[r + 36] &+= 16 }
            try FileSystem.replace(cache + "/" + table, with: bytes)
        }
        let again = cli("restore", "web01@-1", "--disk", "os", "--to", cli.dir.file("day0-again.img"))
        #expect(again.status == 0, "\(again.stderr)")
        #expect(again.stderr.contains("did not match the vault and was rebuilt"), "\(again.stderr)")
        #expect(try sha256(file: cli.dir.file("day0-again.img")) == day0Hash)
        let quiet = cli("restore", "web01@-1", "--disk", "os", "--to", cli.dir.file("day0-third.img"))
        #expect(quiet.status == 0 && !quiet.stderr.contains("rebuilt"), "\(quiet.stderr)")
    }

    @Test func clearErrorsAndExitCodes() throws {
        let cli = CLI()
        defer { cli.dir.remove() }
        let missing = cli("points")
        #expect(missing.status == 3)
        #expect(missing.stderr.contains("no vault at"))
        #expect(cli("init", "--chunk-size", "3K").status == 64)
        #expect(cli("init", "--compression", "lzma").status == 64)
        #expect(cli("init").status == 0)
        #expect(cli("init").status == 64)  // already exists
        #expect(cli("show", "nobody@latest").status == 3)
        let image = try cli.randomImage("a.img", megabytes: 4, seed: 1)
        #expect(cli("backup", "--machine", "m", "--disk", "os=" + image).status == 0)
        #expect(cli("show", "m@-5").status == 3)
        #expect(cli("restore", "m", "--disk", "nope", "--to", cli.dir.file("x")).status == 3)
        let exists = cli("restore", "m", "--to", image)
        #expect(exists.status == 64)
        #expect(exists.stderr.contains("--overwrite"))
        #expect(cli("backup", "--machine", "m", "--disk", "os=/no/such/file").status == 3)
        #expect(cli("backup", "--machine", "m", "--disk", "nonsense").status == 64)
        #expect(cli("backup", "--machine", "../m", "--disk", "os=" + image).status == 64)
        // A directory that is not a vault.
        try FileSystem.createDirectories(cli.dir.file("other"))
        try writeAt(cli.dir.file("other/file"), 0, [1])
        let foreign = run(CLI.binary, ["points", "--vault", cli.dir.file("other")], environment: cli.environment)
        #expect(foreign.status == 64)
        #expect(foreign.stderr.contains("is not a Lifeboat vault"))
        // Every message is one line.
        #expect(missing.stderr.split(separator: "\n").count == 1)
    }

    @Test func standardInputHooksAndConsistency() throws {
        let cli = CLI()
        defer { cli.dir.remove() }
        #expect(cli("init").status == 0)
        let image = try cli.randomImage("a.img", megabytes: 9, seed: 2)
        let marker = cli.dir.file("post-ran")
        let app = cli("backup", "--machine", "m", "--disk", "os=-", "--pre-snapshot", "true",
                      "--post-snapshot", "touch \(marker)", "--json", stdin: image)
        #expect(app.status == 0, "\(app.stderr)")
        #expect(FileSystem.exists(marker))
        #expect((try cli.json(app) as? [String: Any])?["consistency"] as? String == "application")
        let crash = cli("backup", "--machine", "m", "--disk", "os=" + image, "--pre-snapshot", "exit 3", "--json")
        #expect(crash.status == 0)
        #expect(crash.stderr.contains("crash-consistent"))
        #expect((try cli.json(crash) as? [String: Any])?["consistency"] as? String == "crash")
        #expect(cli("restore", "m@-1", "--to", cli.dir.file("out.img")).status == 0)
        #expect(try sha256(file: cli.dir.file("out.img")) == sha256(file: image))
    }

    @Test func killedBackupsLeaveNoPointAndLoseNothing() throws {
        let cli = CLI()
        defer { cli.dir.remove() }
        #expect(cli("init").status == 0)
        let first = try cli.randomImage("first.img", megabytes: 16, seed: 3)
        let firstBackup = cli("backup", "--machine", "m", "--disk", "os=" + first, "--json")
        let firstID = try #require((try cli.json(firstBackup) as? [String: Any])?["point"] as? String)
        let firstHash = try sha256(file: first)
        let big = try cli.randomImage("big.img", megabytes: 400, seed: 4)
        var expected = 1
        for delay in [50_000, 150_000, 300_000, 500_000] as [UInt32] {
            let pid = cli.start(["backup", "--machine", "m", "--disk", "os=" + big])
            usleep(delay)
            kill(pid, SIGKILL)
            if cli.wait(pid) == 0 { expected += 1 }  // it finished before the kill
            let points = try #require(try cli.json(cli("points", "m", "--json")) as? [[String: Any]])
            #expect(points.count == expected, "a killed backup must not leave a point")
            let check = cli("check")
            #expect(check.status == 0, "\(check.stdout)")
        }
        // The lock left by the killed process is taken over; the backup now succeeds.
        let again = cli("backup", "--machine", "m", "--disk", "os=" + big)
        #expect(again.status == 0, "\(again.stderr)")
        #expect(cli("check", "--read-data").status == 0)
        #expect(cli("restore", "m@" + firstID.prefix(12), "--to", cli.dir.file("first-out.img")).status == 0)
        #expect(try sha256(file: cli.dir.file("first-out.img")) == firstHash)
        #expect(cli("restore", "m@latest", "--to", cli.dir.file("big-out.img")).status == 0)
        #expect(try sha256(file: cli.dir.file("big-out.img")) == sha256(file: big))
    }

    @Test func aSecondBackupOfTheSameMachineIsRefused() throws {
        let cli = CLI()
        defer { cli.dir.remove() }
        #expect(cli("init").status == 0)
        let big = try cli.randomImage("big.img", megabytes: 400, seed: 5)
        let pid = cli.start(["backup", "--machine", "m", "--disk", "os=" + big])
        var waited = 0
        while !FileSystem.exists(cli.vault + "/locks/m") && waited < 500 {
            usleep(10_000)
            waited += 1
        }
        let second = cli("backup", "--machine", "m", "--disk", "os=" + big)
        #expect(second.status == 5)
        #expect(second.stderr.contains("is being backed up by another process"))
        #expect(cli.wait(pid) == 0)
        #expect(cli("backup", "--machine", "m", "--disk", "os=" + big).status == 0)
    }

    @Test func interruptStopsCleanly() throws {
        let cli = CLI()
        defer { cli.dir.remove() }
        #expect(cli("init").status == 0)
        let big = try cli.randomImage("big.img", megabytes: 400, seed: 6)
        let marker = cli.dir.file("thawed")
        let pid = cli.start(["backup", "--machine", "m", "--disk", "os=" + big, "--post-snapshot", "touch " + marker])
        usleep(300_000)
        kill(pid, SIGINT)
        let status = cli.wait(pid)
        #expect(status == 130 || status == 0)  // 0 only if it finished first
        #expect(FileSystem.exists(marker), "the post-snapshot command runs even when interrupted")
        #expect(!FileSystem.exists(cli.vault + "/locks/m"))
        #expect(cli("check").status == 0)
    }

    @Test func damagedVaultIsFoundAndNeverRestoredAsData() throws {
        let cli = CLI()
        defer { cli.dir.remove() }
        #expect(cli("init").status == 0)
        let image = try cli.randomImage("a.img", megabytes: 12, seed: 7)
        #expect(cli("backup", "--machine", "m", "--disk", "os=" + image).status == 0)
        // Flip one byte in the middle of the largest pack.
        let packs = shell("find \(cli.vault)/packs -type f -printf '%s %p\\n' | sort -n | tail -1").stdout
        let parts = packs.split(separator: " ")
        let size = try #require(UInt64(parts[0]))
        let pack = String(parts[1].trimmingCharacters(in: .whitespacesAndNewlines))
        let byte = try SystemFile.open(pack, .readOnly).readAll(from: size / 2, count: 1)
        try writeAt(pack, size / 2, [byte[0] ^ 0xff])

        let check = cli("check", "--read-data")
        #expect(check.status == 4)
        #expect(check.stdout.contains("damaged: m@"))
        #expect(check.stdout.contains("disk os bytes"))
        let restore = cli("restore", "m", "--to", cli.dir.file("out.img"))
        #expect(restore.status == 4)
        #expect(restore.stderr.contains("are damaged"))
        #expect(!FileSystem.exists(cli.dir.file("out.img")))
        let json = try #require(try cli.json(cli("check", "--read-data", "--json")) as? [String: Any])
        #expect((json["damaged"] as? [Any])?.count ?? 0 >= 1)
    }

    @Test(.enabled(if: isRoot)) func fullDiskIsAClearErrorAndLosesNothing() throws {
        let cli = CLI()
        defer {
            shell("umount \(cli.vault)")
            cli.dir.remove()
        }
        try FileSystem.createDirectories(cli.vault)
        #expect(shell("mount -t tmpfs -o size=24m lifeboat-test \(cli.vault)").status == 0)
        #expect(cli("init").status == 0)
        let small = try cli.randomImage("small.img", megabytes: 4, seed: 8)
        #expect(cli("backup", "--machine", "m", "--disk", "os=" + small).status == 0)
        let big = try cli.randomImage("big.img", megabytes: 64, seed: 9)
        let full = cli("backup", "--machine", "m", "--disk", "os=" + big)
        #expect(full.status == 6, "\(full.stderr)")
        #expect(full.stderr.contains("No space left on device"))
        let points = try #require(try cli.json(cli("points", "--json")) as? [[String: Any]])
        #expect(points.count == 1)
        #expect(cli("check", "--read-data").status == 0)
        #expect(cli("restore", "m", "--to", cli.dir.file("out.img")).status == 0)
        #expect(try sha256(file: cli.dir.file("out.img")) == sha256(file: small))

        // A restore onto a filesystem without the room fails when it allocates, before it writes,
        // and leaves nothing behind.
        let target = cli.dir.file("small-target")
        try FileSystem.createDirectories(target)
        defer { shell("umount \(target)") }
        #expect(shell("mount -t tmpfs -o size=2m lifeboat-test \(target)").status == 0)
        let tooBig = cli("restore", "m", "--to", target + "/out.img")
        #expect(tooBig.status != 0)
        #expect(tooBig.stderr.contains("No space left on device") && tooBig.stderr.contains("allocate"), "\(tooBig.stderr)")
        #expect(shell("ls -A \(target)").stdout.isEmpty)
    }
}

@Suite(.serialized) struct PruneAndGCCommandTests {
    /// kill -9 at random moments of prune and of gc, 20 times each: check --read-data passes and
    /// every surviving point restores bit-exact.
    @Test func killedPrunesAndCollectionsLoseNothing() throws {
        let cli = CLI()
        defer { cli.dir.remove() }
        #expect(cli("init", "--chunk-size", "16K").status == 0)
        let disk = cli.dir.file("d.img")
        try writeAt(disk, 0, randomBytes(seed: 21, count: 24 << 20))
        var hashes: [String: String] = [:]
        var random = SeededBytes(seed: 22)
        func backup(_ n: Int) throws {
            try writeAt(disk, (random.next() % 20) << 20, random.bytes(3 << 20))
            let out = cli("backup", "--machine", "m", "--disk", "os=" + disk, "--time", Timestamp(n), "--json")
            #expect(out.status == 0, "\(out.stderr)")
            let id = try #require((try? cli.json(out) as? [String: Any])?["point"] as? String)
            hashes[id] = try sha256(file: disk)
        }
        for n in 0..<6 { try backup(n) }
        #expect(cli("policy", "set", "m", "--keep-last", "3").status == 0)
        for round in 0..<20 {
            for command in [["prune"], ["gc", "--grace", "1s"]] {
                if round == 0 {
                    // The commands work when not killed (so the kills below hit real work).
                    #expect(cli(command[0], command.count > 1 ? command[1] : "--dry-run", command.count > 2 ? command[2] : "--dry-run").status == 0)
                }
                let pid = cli.start(command)
                usleep(UInt32(random.next() % 120_000))
                kill(pid, SIGKILL)
                _ = cli.wait(pid)
            }
            if round % 4 == 0 { try backup(10 + round) }
        }
        #expect(cli("gc", "--grace", "1s").status == 0)  // finishes what the killed runs left
        let check = cli("check", "--read-data")
        #expect(check.status == 0, "\(check.stdout)")
        let points = try #require(try cli.json(cli("points", "m", "--json")) as? [[String: Any]])
        #expect(points.count >= 3)
        for point in points {
            let id = try #require(point["id"] as? String)
            let out = cli.dir.file("out-" + id.prefix(8))
            #expect(cli("restore", "m@" + id.prefix(16), "--to", out).status == 0)
            #expect(try sha256(file: out) == hashes[id])
        }
    }
}

/// An ISO 8601 time `n` hours after 2026-01-01.
func Timestamp(_ n: Int) -> String {
    let formatter = ISO8601DateFormatter()
    formatter.formatOptions = [.withInternetDateTime]
    return formatter.string(from: Date(timeIntervalSince1970: 1_767_225_600 + Double(n) * 3600))
}
