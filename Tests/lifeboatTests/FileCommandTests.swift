import Foundation
import Glibc
import SystemIO
import Testing
import TestSupport

@Suite(.serialized) struct FileCommandTests {
    /// An ext4 disk backed up into a vault: `ls`, `cat` and `restore-files` through the binary
    /// give what the kernel reads from the same image.
    @Test(.enabled(if: isRoot)) func lsCatAndRestoreFilesMatchTheKernel() throws {
        let cli = CLI()
        defer { cli.dir.remove() }
        let source = cli.dir.file("src")
        let made = GuestTrees.makeSourceTree(source)
        try #require(made.status == 0, "\(made.stderr)")
        let image = cli.dir.file("os.img")
        let mkfs = shell("mkfs.ext4 -q -F -d '\(source)' '\(image)' 128M")
        try #require(mkfs.status == 0, "\(mkfs.stderr)")
        let mount = try LoopMount(image: image, at: cli.dir.file("mnt"))
        let kernel: [String: String]
        do {
            defer { mount.unmount() }
            kernel = try GuestTrees.localManifest(mount.path, directorySizes: false)
        }
        #expect(cli("init").status == 0)
        #expect(cli("backup", "--machine", "vm", "--disk", "os=" + image, "--time", "2026-03-01T00:00:00Z").status == 0)

        let ls = cli("ls", "vm@latest:/")
        #expect(ls.status == 0, "\(ls.stderr)")
        #expect(ls.stdout.split(separator: "\n").contains("with space"))
        #expect(ls.stdout.split(separator: "\n").contains("h\u{e9}llo-\u{65e5}\u{672c}"))
        let long = cli("ls", "-l", "vm@latest:os:disk:/")  // disk and volume named
        #expect(long.status == 0, "\(long.stderr)")
        #expect(long.stdout.contains("-rwsr-xr-x"))
        #expect(long.stdout.contains("slowlink -> a/long-target-"))
        #expect(long.stdout.contains("abs -> /etc/passwd"))
        let json = try #require(try cli.json(cli("ls", "--json", "vm@latest:/a/b")) as? [[String: Any]])
        #expect(Set(json.compactMap { $0["name"] as? String }) == ["c", "hard3", "medium", "up"])
        let up = try #require(json.first { $0["name"] as? String == "up" })
        #expect(up["target"] as? String == "../../small" && up["type"] as? String == "symlink")

        let cat = cli("cat", "vm@latest:/rel")  // follows the link, like cat
        #expect(cat.status == 0 && cat.stdout == "hello, lifeboat\n")
        let catBig = shell("LIFEBOAT_VAULT='\(cli.vault)' '\(CLI.binary)' cat vm@latest:/random.bin > '\(cli.dir.file("random.out"))'")
        #expect(catBig.status == 0)
        #expect(try sha256(file: cli.dir.file("random.out")) == sha256(file: source + "/random.bin"))
        let catDir = cli("cat", "vm@latest:/a")
        #expect(catDir.status == 64 && catDir.stderr.contains("not a regular file"))
        let missing = cli("cat", "vm@latest:/no/such")
        #expect(missing.status == 3 && missing.stderr.contains("no such file"))

        let restored = cli("restore-files", "vm@latest:/", "--to", cli.dir.file("out"), "--keep-privileges", "--json")
        #expect(restored.status == 0, "\(restored.stderr)")
        let summary = try #require(try cli.json(restored) as? [String: Any])
        #expect(summary["hardLinks"] as? Int == 3)
        #expect(summary["setIDBitsCleared"] as? Int == 0)
        let differences = GuestTrees.differences(kernel, try GuestTrees.localManifest(cli.dir.file("out/root"), directorySizes: false))
        #expect(differences.isEmpty, "\(differences.joined(separator: "\n"))")
        #expect(allocatedBytes(cli.dir.file("out/root/sparse")) < 1 << 20)

        // Again into the same place: refused without --overwrite, done with it.
        let again = cli("restore-files", "vm@latest:/a", "--to", cli.dir.file("out/root"))
        #expect(again.status != 0 && again.stderr.contains("--overwrite"), "\(again.stderr)")
        try writeAt(cli.dir.file("out/root/a/b/medium"), 0, Array("changed".utf8))
        let overwritten = cli("restore-files", "vm@latest:/a", "--to", cli.dir.file("out/root"), "--overwrite")
        #expect(overwritten.status == 0, "\(overwritten.stderr)")
        #expect(try sha256(file: cli.dir.file("out/root/a/b/medium")) == sha256(file: source + "/a/b/medium"))
    }
}

extension FileCommandTests {
    /// `ls -l` of a directory of 10 000 files from a vault: well under a second.
    @Test func lsOfTenThousandFilesIsFast() throws {
        let cli = CLI()
        defer { cli.dir.remove() }
        let made = GuestTrees.runPython("""
            import os, sys
            os.makedirs(sys.argv[1] + '/big')
            for i in range(10000):
                open('%s/big/file-%05d' % (sys.argv[1], i), 'w').close()
            """, [cli.dir.file("src")])
        try #require(made.status == 0, "\(made.stderr)")
        let mkfs = shell("mkfs.ext4 -q -F -d '\(cli.dir.file("src"))' '\(cli.dir.file("os.img"))' 64M")
        try #require(mkfs.status == 0, "\(mkfs.stderr)")
        #expect(cli("init").status == 0)
        #expect(cli("backup", "--machine", "vm", "--disk", "os=" + cli.dir.file("os.img")).status == 0)
        let started = Date()
        let ls = cli("ls", "-l", "vm@latest:/big")
        let elapsed = Date().timeIntervalSince(started)
        #expect(ls.status == 0 && ls.stdout.split(separator: "\n").count == 10_000)
        #expect(elapsed < 1, "lifeboat ls -l of 10 000 files took \(elapsed) s")
    }
}
