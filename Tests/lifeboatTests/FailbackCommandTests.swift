import Foundation
import Glibc
import SystemIO
import Testing
import TestSupport

/// Failing a sandbox back onto its on-prem disk, through the command line and a real FUSE mount
/// written with dd.
@Suite(.serialized, .enabled(if: isRoot && FileSystem.exists("/dev/fuse"))) struct FailbackCommandTests {
    static let megabyte = 1 << 20

    /// A 32 MiB disk backed up as machine m, disk os; the on-prem target still holds it.
    func machine(_ cli: CLI) throws -> (image: String, target: String) {
        #expect(cli("init").status == 0)
        let image = try cli.randomImage("onprem.img", megabytes: 32, seed: 11)
        #expect(cli("backup", "--machine", "m", "--disk", "os=" + image, "--time", "2026-06-01T00:00:00Z").status == 0)
        let target = cli.dir.file("target.img")
        #expect(shell("cp --sparse=always \(image) \(target)").status == 0)
        return (image, target)
    }

    /// Writes `count` 64 KiB blocks of random bytes at block `seek` of the sandbox's disk, flushed.
    @discardableResult
    func write(_ mnt: String, seek: Int, count: Int) -> Int {
        let result = shell("dd if=/dev/urandom of=\(mnt)/disks/os.img bs=64k seek=\(seek) count=\(count) conv=notrunc,fsync status=none")
        #expect(result.status == 0, "\(result.stderr)")
        return count << 16
    }

    func cleanUp(_ cli: CLI, mounts: [String]) {
        for m in mounts { shell("umount -l \(m) 2>/dev/null") }
        cli.dir.remove()
    }

    @Test func twoPhaseFailbackOfARunningSandboxWritesOnlyWhatChangedAfterPrepare() throws {
        let cli = CLI()
        let mnt = cli.dir.file("mnt")
        defer { cleanUp(cli, mounts: [mnt]) }
        let (_, target) = try machine(cli)
        try FileSystem.createDirectories(mnt)
        #expect(cli("sandbox", "create", "s", "--from", "m@latest").status == 0)
        #expect(cli("sandbox", "mount", "s", mnt).status == 0)

        // The failed-over machine runs in the sandbox and writes (first round).
        var first = write(mnt, seek: 16, count: 64)           // 4 MiB at 1 MiB
        first += write(mnt, seek: 300, count: 8)               // 512 KiB at 18.75 MiB

        // Prepare while it runs: the bulk of the bytes.
        let prepare = cli("failback", "sandbox:s", "--disk", "os", "--to", target, "--phase", "prepare", "--json")
        #expect(prepare.status == 0, "\(prepare.stderr)")
        let prepared = try #require(try cli.json(prepare) as? [String: Any])
        let preparedSync = try #require(prepared["sync"] as? [String: Any])
        #expect(prepared["phase"] as? String == "prepare")
        #expect(prepared["mounted"] as? Bool == true)
        let preparedPoint = try #require(prepared["point"] as? String)
        let firstMoved = preparedSync["transferredBytes"] as? Int ?? -1
        #expect(firstMoved >= first && Double(firstMoved) <= 1.2 * Double(first), "prepare transferred \(firstMoved) for \(first) written")
        #expect(preparedSync["matchedBytes"] as? Int == (32 << 20) - firstMoved)
        // The target holds the disk as it was frozen: nothing was written since.
        #expect(try sha256(file: target) == sha256(file: mnt + "/disks/os.img"))
        #expect(cli("sync", "status", target).stdout.contains("prepared"))

        // The machine runs on (second round), then is stopped.
        var second = write(mnt, seek: 320, count: 32)          // 2 MiB at 20 MiB
        second += write(mnt, seek: 20, count: 4)               // 256 KiB inside the first round's range
        let refused = cli("failback", "sandbox:s", "--disk", "os", "--to", target, "--phase", "complete")
        #expect(refused.status == 5, "complete refuses a mounted sandbox")
        #expect(refused.stderr.contains("umount"), "\(refused.stderr)")
        let final = try sha256(file: mnt + "/disks/os.img")
        #expect(cli("umount", mnt).status == 0)

        // Complete: only the second round's slots move, and the target is verified.
        let complete = cli("failback", "sandbox:s", "--disk", "os", "--to", target, "--phase", "complete", "--json")
        #expect(complete.status == 0, "\(complete.stderr)")
        let completed = try #require(try cli.json(complete) as? [String: Any])
        let completedSync = try #require(completed["sync"] as? [String: Any])
        #expect(completed["phase"] as? String == "complete")
        #expect(completed["mounted"] as? Bool == false)
        #expect(completed["preparedPoint"] as? String == preparedPoint)
        #expect(completedSync["verified"] as? Bool == true)
        let secondMoved = completedSync["transferredBytes"] as? Int ?? -1
        #expect(secondMoved >= second && Double(secondMoved) <= 1.2 * Double(second), "complete transferred \(secondMoved) for \(second) written")
        #expect(completedSync["processedBytes"] as? Int == 32 << 20)
        #expect(try sha256(file: target) == final)
        let status = try #require(try cli.json(cli("sync", "status", target, "--json")) as? [String: Any])
        #expect(status["condition"] as? String == "consistent")
        #expect((status["failback"] as? [String: Any])?["phase"] as? String == "completed")

        // Reverse replication: a backup of the failed-back disk stores only the changed chunks
        // (here none at all: the promotes already put them in the vault).
        let backup = cli("backup", "--machine", "m", "--disk", "os=" + target, "--json")
        #expect(backup.status == 0, "\(backup.stderr)")
        let stored = try #require(try cli.json(backup) as? [String: Any])
        let newBytes = stored["newBytes"] as? Int ?? -1
        #expect(newBytes >= 0 && Double(newBytes) <= 1.2 * Double(first + second), "backup stored \(newBytes) new bytes")
        // By id: the points of this test may share a second, and so @latest.
        let backupPoint = try #require(stored["point"] as? String)
        #expect(cli("restore", "m@" + backupPoint, "--disk", "os", "--to", cli.dir.file("back.img")).status == 0)
        #expect(try sha256(file: cli.dir.file("back.img")) == final)
        #expect(cli("check", "--read-data").status == 0)
    }

    @Test func syncASandboxMountedOrNotAndOneWriterPerTarget() throws {
        let cli = CLI()
        let mnt = cli.dir.file("mnt")
        defer { cleanUp(cli, mounts: [mnt]) }
        let (image, _) = try machine(cli)
        try FileSystem.createDirectories(mnt)
        #expect(cli("sandbox", "create", "s", "--from", "m@latest").status == 0)
        #expect(cli("sandbox", "mount", "s", mnt).status == 0)
        let written = write(mnt, seek: 40, count: 48) + write(mnt, seek: 500, count: 3)

        // Mounted: frozen for the sync; it equals the disk read through the mount, and the
        // sandbox takes writes again afterwards.
        let running = cli.dir.file("running.img")
        let frozen = cli("sync", "sandbox:s", "--to", running, "--json")
        #expect(frozen.status == 0, "\(frozen.stderr)")
        #expect(try sha256(file: running) == sha256(file: mnt + "/disks/os.img"))
        write(mnt, seek: 100, count: 2)
        let final = try sha256(file: mnt + "/disks/os.img")
        #expect(cli("umount", mnt).status == 0)

        // Unmounted: opened exclusively; a new file, then a delta onto the on-prem image.
        let fresh = cli.dir.file("fresh.img")
        let created = try #require(try cli.json(cli("sync", "sandbox:s", "--disk", "os", "--to", fresh, "--verify", "--json")) as? [String: Any])
        #expect(created["verified"] as? Bool == true)
        #expect(try sha256(file: fresh) == final)
        let onprem = cli.dir.file("onprem-copy.img")
        #expect(shell("cp --sparse=always \(image) \(onprem)").status == 0)
        let delta = try #require(try cli.json(cli("sync", "sandbox:s", "--to", onprem, "--json")) as? [String: Any])
        let moved = delta["transferredBytes"] as? Int ?? -1
        let changed = written + (2 << 16)
        #expect(moved >= changed && Double(moved) <= 1.2 * Double(changed), "transferred \(moved) for \(changed) written")
        #expect(try sha256(file: onprem) == final)
        let again = try #require(try cli.json(cli("sync", "sandbox:s", "--to", onprem, "--json")) as? [String: Any])
        #expect(again["writtenBytes"] as? Int == 0)
        #expect(cli("sync", "sandbox:nosuch", "--to", onprem).status == 3)

        // One writer per target: two syncs started together; one runs, the other is refused as
        // busy (unless the first was already done when the second looked: a full sync of this
        // disk takes about as long as starting a process, so up to ten tries until they meet).
        var refusals = 0
        for _ in 0..<10 where refusals == 0 {
            let a = cli.start(["sync", "m@latest", "--to", onprem, "--mode", "full"])
            let b = cli.start(["sync", "m@latest", "--to", onprem, "--mode", "full"])
            let statuses = [cli.wait(a), cli.wait(b)].sorted()
            #expect(statuses == [0, 0] || statuses == [0, 5], "\(statuses)")
            if statuses == [0, 5] { refusals += 1 }
        }
        #expect(refusals > 0, "two syncs started together never met")
        #expect(try sha256(file: onprem) == sha256(file: image))

        // Deterministic: the target's lock held by another process (here, this one). The lock is
        // named by the file's device and inode (docs/guide.md), so a hard link to it is the same target.
        let key = shell("printf 'file %s' \"$(stat -c '%d:%i' \(onprem))\" | sha256sum | cut -c1-32").stdout
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let lock = cli.dir.file("state") + "/sync/locks/" + key
        #expect(FileSystem.exists(lock))
        let link = cli.dir.file("onprem-link.img")
        #expect(shell("ln \(onprem) \(link)").status == 0)
        let holder = try SystemFile.open(lock, .readWrite)
        #expect(try holder.lock(exclusive: true, wait: false))
        let busy = cli("sync", "sandbox:s", "--to", onprem)
        #expect(busy.status == 5, "\(busy.stderr)")
        #expect(busy.stderr.contains("is busy"), "\(busy.stderr)")
        #expect(cli("sync", "--rollback", onprem).status == 5)
        #expect(cli("sync", "--resume", onprem).status == 5)
        #expect(cli("sync", "sandbox:s", "--to", link).status == 5)
        holder.close()
        #expect(cli("sync", "sandbox:s", "--to", onprem).status == 0)
        #expect(try sha256(file: onprem) == final)
    }

    @Test func phasesInTheWrongOrderAreRefusedOrWarned() throws {
        let cli = CLI()
        defer { cli.dir.remove() }
        let (_, target) = try machine(cli)
        #expect(cli("sandbox", "create", "a", "--from", "m@latest").status == 0)
        #expect(cli("sandbox", "create", "b", "--from", "m@latest").status == 0)
        // Unmounted: prepare works but says complete alone would have done.
        let prepare = cli("failback", "sandbox:a", "--to", target, "--phase", "prepare")
        #expect(prepare.status == 0, "\(prepare.stderr)")
        #expect(prepare.stderr.contains("not mounted"))
        #expect(prepare.stdout.contains("--phase complete"))
        // Another sandbox cannot complete a failback prepared from a.
        let wrong = cli("failback", "sandbox:b", "--to", target, "--phase", "complete")
        #expect(wrong.status == 64)
        #expect(wrong.stderr.contains("prepared from sandbox a"), "\(wrong.stderr)")
        #expect(cli("failback", "sandbox:a", "--to", target, "--phase", "complete").status == 0)
        // Complete without prepare: a one-phase failback, with a warning.
        let other = cli.dir.file("other.img")
        let alone = cli("failback", "sandbox:b", "--to", other, "--phase", "complete")
        #expect(alone.status == 0, "\(alone.stderr)")
        #expect(alone.stderr.contains("no prepare phase"), "\(alone.stderr)")
        #expect(cli("failback", "m@latest", "--to", other, "--phase", "prepare").status == 64)
        #expect(cli("failback", "sandbox:a", "--to", other, "--phase", "later").status == 64)
        #expect(cli("failback", "sandbox:a", "--to", other, "--phase", "complete", "--mode", "full").status == 64)
        #expect(cli("help", "failback").stdout.contains("--phase"))
    }
}
