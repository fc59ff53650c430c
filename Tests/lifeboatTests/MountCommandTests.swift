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

/// The files inside a point's disk, through the mount: a GPT with a FAT and an ext4 partition.
@Suite(.serialized, .enabled(if: isRoot && FileSystem.exists("/dev/fuse"))) struct MountFilesTests {
    @Test func guestFilesAppearUnderDotFiles() throws {
        let cli = CLI()
        let mnt = cli.dir.file("mnt")
        defer {
            shell("umount -l \(mnt) 2>/dev/null")
            cli.dir.remove()
        }
        let d = cli.dir.path
        let made = shell("""
            set -e; cd \(d); mkdir -p tree/etc tree/big
            echo '10.0.0.1 web01' > tree/etc/hosts; ln -s hosts tree/etc/hosts.link
            head -c 3000000 /dev/urandom > tree/big/blob
            (cd tree/big && seq 1 2000 | sed 's/^/f/' | xargs touch)
            echo 'title lifeboat' > loader.conf
            truncate -s 96M disk.img
            sgdisk -n 1:2048:+16M -t 1:ef00 -n 2:0:0 -t 2:8300 disk.img >/dev/null
            truncate -s 16M esp.img; mkfs.vfat esp.img >/dev/null; mcopy -i esp.img loader.conf ::/loader.conf
            dd if=esp.img of=disk.img bs=1M seek=1 conv=notrunc status=none
            truncate -s 79M part.img; mkfs.ext4 -q -F -d tree part.img
            dd if=part.img of=disk.img bs=1M seek=17 conv=notrunc status=none
            """)
        #expect(made.status == 0, "\(made.stderr)")
        #expect(cli("init").status == 0)
        #expect(cli("backup", "--machine", "m", "--disk", "os=" + cli.dir.file("disk.img"), "--time", "2026-05-01T00:00:00Z").status == 0)
        try FileSystem.createDirectories(mnt)
        #expect(cli("mount", mnt).status == 0)
        let files = mnt + "/machines/m/2026-05-01T00:00:00Z/disks/os.files"
        #expect(shell("ls \(files)").stdout == "p1\np2\n")
        #expect(shell("cat \(files)/p1/loader.conf").stdout == "title lifeboat\n")
        #expect(shell("cmp \(files)/p2/etc/hosts \(d)/tree/etc/hosts && cmp \(files)/p2/big/blob \(d)/tree/big/blob").status == 0)
        #expect(shell("readlink \(files)/p2/etc/hosts.link").stdout == "hosts\n")
        #expect(shell("ls \(files)/p2/big | wc -l").stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "2001")
        // Read-only: the guest's write bits are not shown, and writes fail.
        #expect(shell("stat -c %A \(files)/p2/etc/hosts").stdout == "-r--r--r--\n")
        #expect(shell("touch \(files)/p2/etc/new").status != 0)
        #expect(cli("umount", mnt).status == 0)
    }
}
