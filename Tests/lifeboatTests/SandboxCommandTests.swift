import Foundation
import Glibc
import SystemIO
import Testing
import TestSupport

/// Sandboxes through the command line and real clients: the kernel's loop driver and ext4,
/// e2fsck, fio, qemu-io.
@Suite(.serialized, .enabled(if: isRoot && FileSystem.exists("/dev/fuse"))) struct SandboxCommandTests {
    func serverPID(_ name: String) -> pid_t? {
        let out = shell("pgrep -f '[l]ifeboat sandbox mount \(name) '").stdout
        return out.split(separator: "\n").first.flatMap { pid_t($0) }
    }

    /// An ext4 image with a few files, backed up as machine m, disk os.
    func ext4Point(_ cli: CLI) throws -> (image: String, sha: String) {
        let tree = cli.dir.file("tree")
        try FileSystem.createDirectories(tree + "/etc")
        try "10.0.0.1 web01\n".write(toFile: tree + "/etc/hosts", atomically: true, encoding: .utf8)
        try writeAt(tree + "/etc/blob", 0, randomBytes(seed: 5, count: 3 << 20))
        let image = cli.dir.file("os.img")
        #expect(shell("truncate -s 64M \(image) && mkfs.ext4 -q -F -d \(tree) \(image)").status == 0)
        #expect(cli("backup", "--machine", "m", "--disk", "os=" + image, "--time", "2026-05-01T00:00:00Z").status == 0)
        return (image, try sha256(file: image))
    }

    func cleanUp(_ cli: CLI, mounts: [String]) {
        for m in mounts { shell("umount -l \(m) 2>/dev/null") }
        shell("losetup -j \(cli.dir.path) 2>/dev/null | cut -d: -f1 | xargs -r -n1 losetup -d")
        cli.dir.remove()
    }

    @Test func loopMountedExt4IsWrittenCheckedAndPromoted() throws {
        let cli = CLI()
        let mnt = cli.dir.file("mnt"), fs = cli.dir.file("fs")
        defer { cleanUp(cli, mounts: [fs, mnt]) }
        #expect(cli("init").status == 0)
        let (image, original) = try ext4Point(cli)
        try FileSystem.createDirectories(mnt)
        try FileSystem.createDirectories(fs)
        #expect(cli("sandbox", "create", "t1", "--from", "m@latest").status == 0)
        let mounted = cli("sandbox", "mount", "t1", mnt)
        #expect(mounted.status == 0, "\(mounted.stderr)")
        #expect(try sha256(file: mnt + "/disks/os.img") == original)
        #expect(shell("qemu-img compare -q -f vpc -F raw \(mnt)/disks/os.vhd \(image)").status == 0)

        // fallocate reserves room in the overlay (later writes there cannot meet ENOSPC) and
        // changes nothing the disk reads.
        let data = cli.dir.file("state") + "/sandboxes/t1/disks/os.data"
        let blocks = { Int(shell("stat -c %b \(data)").stdout.trimmingCharacters(in: .whitespacesAndNewlines)) ?? -1 }
        let before = blocks()
        let reserved = shell("fallocate -o 1048576 -l 4194304 \(mnt)/disks/os.img")
        #expect(reserved.status == 0, "\(reserved.stderr)")
        #expect(blocks() >= before + 8192, "\(before) -> \(blocks()) blocks of 512 bytes")
        #expect(try sha256(file: mnt + "/disks/os.img") == original)

        // A read-write kernel mount through a loop device: write, delete, unmount.
        let loop = shell("losetup -f --show \(mnt)/disks/os.img").stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(loop.hasPrefix("/dev/loop"))
        #expect(shell("mount \(loop) \(fs)").status == 0)
        try writeAt(fs + "/new.bin", 0, randomBytes(seed: 9, count: 5 << 20))
        #expect(shell("mkdir -p \(fs)/dir && cp -r \(fs)/etc \(fs)/dir/ && rm \(fs)/etc/hosts && sync").status == 0)
        #expect(shell("umount \(fs) && losetup -d \(loop)").status == 0)
        let fsck = shell("e2fsck -fn \(mnt)/disks/os.img")
        #expect(fsck.status == 0, "\(fsck.stdout)")

        // Mounted again (read-only): the changes are there.
        #expect(shell("mount -o ro,loop \(mnt)/disks/os.img \(fs)").status == 0)
        #expect(try sha256(file: fs + "/new.bin") == sha256(bytes: randomBytes(seed: 9, count: 5 << 20)))
        #expect(!FileSystem.exists(fs + "/etc/hosts"))
        #expect(FileSystem.exists(fs + "/dir/etc/hosts"))
        #expect(shell("umount \(fs)").status == 0)

        let list = try #require(try cli.json(cli("sandbox", "list", "--json")) as? [[String: Any]])
        #expect(list.first?["name"] as? String == "t1")
        #expect((list.first?["writtenBytes"] as? Int ?? 0) >= 5 << 20)
        #expect(list.first?["mountpoint"] as? String == mnt)
        #expect(cli("sandbox", "cleanup", "t1").status == 5, "busy while mounted")

        // Promote while mounted: the new point equals the disk read through the mount.
        let promoted = try #require(try cli.json(cli("sandbox", "promote", "t1", "--json")) as? [String: Any])
        let id = try #require(promoted["point"] as? String)
        #expect((promoted["newBytes"] as? Int ?? 0) < 12 << 20, "what was written, not the disk")
        #expect(cli("restore", "m@" + id, "--disk", "os", "--to", cli.dir.file("promoted.img")).status == 0)
        #expect(try sha256(file: cli.dir.file("promoted.img")) == sha256(file: mnt + "/disks/os.img"))
        // The sandbox lives on and still takes writes after the freeze.
        #expect(shell("dd if=/dev/zero of=\(mnt)/disks/os.img bs=4k count=1 seek=100 conv=notrunc,fsync status=none").status == 0)

        #expect(cli("umount", mnt).status == 0)
        #expect(cli("sandbox", "cleanup", "t1").status == 0)
        #expect(cli("restore", "m@2026-05-01T00:00:00Z", "--disk", "os", "--to", cli.dir.file("base.img")).status == 0)
        #expect(try sha256(file: cli.dir.file("base.img")) == original, "the point never changes")
        #expect(cli("check", "--read-data").status == 0)
    }

    @Test func fioAndQemuIOVerifyWhatTheyWrote() throws {
        let cli = CLI()
        let mnt = cli.dir.file("mnt")
        defer { cleanUp(cli, mounts: [mnt]) }
        #expect(cli("init").status == 0)
        let image = try cli.randomImage("a.img", megabytes: 48, seed: 3)
        let original = try sha256(file: image)
        #expect(cli("backup", "--machine", "m", "--disk", "os=" + image).status == 0)
        #expect(cli("sandbox", "create", "f", "--from", "m@latest").status == 0)
        try FileSystem.createDirectories(mnt)
        #expect(cli("sandbox", "mount", "f", mnt).status == 0)
        let disk = mnt + "/disks/os.img"

        // Random 4K writes across the disk, verified in the same run, then again from the
        // server after the kernel's cache is dropped.
        let job = "--name=v --filename=\(disk.replacingOccurrences(of: ":", with: "\\:")) --rw=randwrite --bs=4k --size=48M --ioengine=psync --verify=crc32c --randseed=42 --number_ios=3000 --norandommap"
        // fio leaves its verify state in the working directory: the test's own.
        let fio = shell("cd \(cli.dir.path) && fio \(job) --output-format=terse")
        #expect(fio.status == 0, "\(fio.stderr)")
        shell("sync; echo 3 > /proc/sys/vm/drop_caches")
        let verify = shell("cd \(cli.dir.path) && fio \(job) --verify_only --output-format=terse")
        #expect(verify.status == 0, "\(verify.stderr)")

        // qemu-io: unaligned pattern writes (copy-up of partial blocks) through the raw and VHD views.
        let writes = shell("qemu-io -f raw -c 'write -P 0xab 513 1000' -c 'write -P 0xcd 65000 140000' -c 'write -P 0x11 \(48 << 20 - 300) 300' \(disk)")
        #expect(writes.status == 0, "\(writes.stderr)")
        // The point's holes show through SEEK_HOLE, except while the disk is open for writing:
        // the kernel may then hold written pages the server has not seen.
        let holes = """
            import os, sys
            r = os.open(sys.argv[1], os.O_RDONLY)
            first = os.lseek(r, 0, os.SEEK_HOLE)
            w = os.open(sys.argv[1], os.O_RDWR)
            print(first, os.lseek(r, 0, os.SEEK_HOLE), os.fstat(r).st_size)
            """
        let seen0 = GuestTrees.runPython(holes, [mnt + "/disks/os.img"]).stdout.split(separator: " ").compactMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        #expect(seen0.count == 3 && seen0[0] < seen0[2] && seen0[1] == seen0[2], "\(seen0)")
        #expect(shell("dd if=\(disk) bs=4096 skip=256 count=1 of=/dev/null status=none").status == 0)  // cached under .img
        let vhd = shell("qemu-io -f vpc -c 'write -P 0x5a 1048576 4096' \(mnt)/disks/os.vhd")
        #expect(vhd.status == 0, "\(vhd.stderr)")
        // Without a remount, the raw view reads what the VHD view wrote: .img and .vhd are two
        // inodes with two page caches, and the first open of a name drops what its cache kept.
        let seen = shell("qemu-io -r -f raw -c 'read -P 0x5a 1048576 4096' \(disk)")
        #expect(seen.status == 0 && !seen.stdout.contains("Pattern verification failed"), "\(seen.stdout) \(seen.stderr)")
        // And the two names are never open at once.
        let both = shell("exec 3<\(disk); qemu-img info -f vpc \(mnt)/disks/os.vhd")
        #expect(both.status != 0 && both.stderr.contains("busy"), "\(both.stdout) \(both.stderr)")
        #expect(cli("umount", mnt).status == 0)
        #expect(cli("sandbox", "mount", "f", mnt).status == 0)
        let reads = shell("qemu-io -r -f raw -c 'read -P 0xab 513 1000' -c 'read -P 0xcd 65000 140000' -c 'read -P 0x11 \(48 << 20 - 300) 300' -c 'read -P 0x5a 1048576 4096' \(disk)")
        #expect(reads.status == 0 && !reads.stdout.contains("Pattern verification failed"), "\(reads.stdout) \(reads.stderr)")
        // The bytes around an unaligned write are the point's.
        let around = shell("cmp -n 513 \(disk) \(image)")
        #expect(around.status == 0)
        #expect(cli("umount", mnt).status == 0)
        #expect(try sha256(file: image) == original)
        #expect(cli("restore", "m@latest", "--disk", "os", "--to", cli.dir.file("r.img")).status == 0)
        #expect(try sha256(file: cli.dir.file("r.img")) == original)
    }

    @Test func flushedWritesSurviveKillNineAndSandboxesAreIndependent() throws {
        let cli = CLI()
        let a = cli.dir.file("a"), b = cli.dir.file("b")
        defer { cleanUp(cli, mounts: [a, b]) }
        #expect(cli("init").status == 0)
        let image = try cli.randomImage("a.img", megabytes: 16, seed: 4)
        let original = try sha256(file: image)
        #expect(cli("backup", "--machine", "m", "--disk", "os=" + image).status == 0)
        try FileSystem.createDirectories(a)
        try FileSystem.createDirectories(b)
        #expect(cli("sandbox", "create", "sa", "--from", "m@latest").status == 0)
        #expect(cli("sandbox", "create", "sb", "--from", "m@latest").status == 0)
        #expect(cli("sandbox", "mount", "sa", a).status == 0)
        #expect(cli("sandbox", "mount", "sb", b).status == 0)
        let pa = dd(pattern: 0xA1), pb = dd(pattern: 0xB2)
        // The same range written differently in each, flushed with fsync.
        #expect(shell("\(pa) | dd of=\(a)/disks/os.img bs=64k seek=7 conv=notrunc,fsync status=none").status == 0)
        #expect(shell("\(pb) | dd of=\(b)/disks/os.img bs=64k seek=7 conv=notrunc,fsync status=none").status == 0)

        // kill -9 of sandbox a's server: the next mount clears the stale mount; the data is there.
        let victim = try #require(serverPID("sa"))
        kill(victim, SIGKILL)
        var waited = 0
        while kill(victim, 0) == 0 && waited < 200 { usleep(20_000); waited += 1 }
        let remount = cli("sandbox", "mount", "sa", a)
        #expect(remount.status == 0, "\(remount.stderr)")
        #expect(sha256(bytes: region(a + "/disks/os.img")) == sha256(bytes: [UInt8](repeating: 0xA1, count: 1 << 20)))
        #expect(sha256(bytes: region(b + "/disks/os.img")) == sha256(bytes: [UInt8](repeating: 0xB2, count: 1 << 20)))
        // Outside the written range both read the point.
        #expect(shell("cmp -n \(7 << 16) \(a)/disks/os.img \(image) && cmp -n \(7 << 16) \(b)/disks/os.img \(image)").status == 0)
        #expect(cli("umount", a).status == 0)
        #expect(cli("umount", b).status == 0)
        #expect(cli("sandbox", "reset", "sb").status == 0)
        #expect(cli("sandbox", "mount", "sb", b).status == 0)
        #expect(try sha256(file: b + "/disks/os.img") == original, "reset discards the writes")
        #expect(cli("umount", b).status == 0)
        #expect(cli("restore", "m@latest", "--disk", "os", "--to", cli.dir.file("r.img")).status == 0)
        #expect(try sha256(file: cli.dir.file("r.img")) == original)
    }

    /// 1 MiB of one byte on standard output.
    func dd(pattern: UInt8) -> String {
        "head -c 1048576 /dev/zero | tr '\\000' '\\\(String(pattern, radix: 8))'"
    }

    func region(_ path: String) -> [UInt8] {
        guard let file = try? SystemFile.open(path, .readOnly) else { return [] }
        defer { file.close() }
        return (try? file.readAll(from: 7 << 16, count: 1 << 20)) ?? []
    }
}
