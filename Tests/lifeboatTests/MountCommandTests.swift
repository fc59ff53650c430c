import Foundation
import Glibc
import SystemIO
import Testing
import TestSupport

@Suite(.serialized, .enabled(if: isRoot && FileSystem.exists("/dev/fuse"))) struct MountCommandTests {
    func mountPID(_ mountpoint: String) -> pid_t? {
        // "[l]" keeps the pattern from matching the shell that runs pgrep.
        let out = shell("pgrep -f '[l]ifeboat mount \(mountpoint) '").stdout
        return out.split(separator: "\n").first.flatMap { pid_t($0) }
    }

    @Test func mountReturnsWhenReadyAndUnmountStopsTheServer() throws {
        let cli = CLI()
        defer {
            shell("umount -l \(cli.dir.file("mnt")) 2>/dev/null")
            cli.dir.remove()
        }
        #expect(cli("init").status == 0)
        let image = try cli.randomImage("a.img", megabytes: 8, seed: 1)
        #expect(cli("backup", "--machine", "m", "--disk", "os=" + image, "--time", "2026-05-01T00:00:00Z").status == 0)
        let mnt = cli.dir.file("mnt")
        try FileSystem.createDirectories(mnt)
        let mounted = cli("mount", mnt)
        #expect(mounted.status == 0, "\(mounted.stderr)")
        // Ready when the command returned: no waiting.
        #expect(try sha256(file: mnt + "/machines/m/2026-05-01T00:00:00Z/disks/os.img") == sha256(file: image))
        let again = cli("mount", mnt)
        #expect(again.status == 64)
        #expect(again.stderr.contains("already mounted"))
        let pid = try #require(mountPID(mnt))
        #expect(cli("umount", mnt).status == 0)
        var waited = 0
        while kill(pid, 0) == 0 && waited < 200 { usleep(20_000); waited += 1 }
        #expect(kill(pid, 0) != 0, "the server stops after umount")
        #expect(cli("umount", mnt).status == 64)  // not mounted any more
    }

    @Test func signalsUnmountCleanlyAndStaleMountsAreCleared() throws {
        let cli = CLI()
        defer {
            shell("umount -l \(cli.dir.file("mnt")) 2>/dev/null")
            cli.dir.remove()
        }
        #expect(cli("init").status == 0)
        let image = try cli.randomImage("a.img", megabytes: 4, seed: 2)
        #expect(cli("backup", "--machine", "m", "--disk", "os=" + image).status == 0)
        let mnt = cli.dir.file("mnt")
        try FileSystem.createDirectories(mnt)

        // SIGTERM: the server unmounts and exits.
        #expect(cli("mount", mnt).status == 0)
        let pid = try #require(mountPID(mnt))
        kill(pid, SIGTERM)
        var waited = 0
        while kill(pid, 0) == 0 && waited < 200 { usleep(20_000); waited += 1 }
        #expect(kill(pid, 0) != 0, "the server exits on SIGTERM")
        #expect(shell("grep -q ' \(mnt) ' /proc/self/mountinfo").status != 0, "and leaves no mount behind")

        // kill -9 leaves a stale mount; the next mount clears it and mounts again.
        #expect(cli("mount", mnt).status == 0)
        let victim = try #require(mountPID(mnt))
        kill(victim, SIGKILL)
        usleep(200_000)
        #expect(shell("ls \(mnt)").stderr.contains("not connected"))
        let remount = cli("mount", mnt)
        #expect(remount.status == 0, "\(remount.stderr)")
        #expect(try sha256(file: mnt + "/machines/m/latest/disks/os.img") == sha256(file: image))
        // And umount clears a stale one too.
        let second = try #require(mountPID(mnt))
        kill(second, SIGKILL)
        usleep(200_000)
        let cleared = cli("umount", mnt)
        #expect(cleared.status == 0)
        #expect(shell("grep -q ' \(mnt) ' /proc/self/mountinfo").status != 0, "the dead mount is gone")
    }
}
