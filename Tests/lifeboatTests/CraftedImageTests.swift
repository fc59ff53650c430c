import Foundation
import Glibc
import SystemIO
import Testing
import TestSupport

/// The guest filesystem is attacker-controlled: an ext4 image crafted with debugfs and byte
/// patches holds, next to good files, names with '/', extra "." and "..", links out of the
/// target shadowed by directories of the same name, a directory linked into itself (twice),
/// an absurd size, an extent past the end of the volume and a zeroed inode-table block.
/// `restore-files` must write nothing outside --to, finish quickly, name each bad entry and
/// restore the rest (exit 4); `ls` and `cat` must give clear errors.
@Suite(.serialized) struct CraftedImageTests {
    static func craft(_ dir: String, marker: String) -> ProcessResult {
        var commands = """
        mkdir /good
        write good /good/file
        mkdir /names
        write good /names/aXb
        write good /names/Q
        write good /names/QQ
        write good /names/fine
        mkdir /links
        symlink /links/up ../../../../../../..\(marker)
        mkdir /links/uq
        write good /links/uq/x
        symlink /links/pw /etc/passwd
        write good /links/pz
        symlink /links/dd \(marker)-dir
        mkdir /links/de
        write good /links/de/payload
        mkdir /loop
        mkdir /loop/d
        mkdir /loop/d/sub
        write good /loop/d/sub/file
        ln /loop/d /loop/d/sub/loop
        ln /loop/d /loop/d/sub/loop2
        write good /huge
        sif /huge size 0x7fffffffffff
        write eight /pastend
        sif /pastend block[5] 0x10000000
        mkdir /zeroed
        mkdir /many
        write eight /many/one
        ln /many/one /many/two
        ln /many/one /many/three
        mknod blockdev b 8 0
        write good /setuid
        sif /setuid mode 0104755

        """
        for i in 1...40 { commands += "write good /zeroed/z\(i)\n" }
        let patch = """
        import sys
        image, block, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
        data = bytearray(open(image, 'rb').read())
        # Directory entries: name_len, file_type, name. Each pattern must be found once.
        for old, new in [(b'\\x03\\x01aXb', b'\\x03\\x01a/b'), (b'\\x01\\x01Q', b'\\x01\\x01.'), (b'\\x02\\x01QQ', b'\\x02\\x01..'),
                         (b'\\x02\\x02uq', b'\\x02\\x02up'), (b'\\x02\\x01pz', b'\\x02\\x01pw'), (b'\\x02\\x02de', b'\\x02\\x02dd')]:
            assert data.count(old) == 1, (old, data.count(old))
            i = data.index(old)
            data[i:i + len(new)] = new
        # The inode-table block holding /zeroed/z26 (and its neighbours) becomes zeros.
        data[block * size:(block + 1) * size] = bytes(size)
        open(image, 'wb').write(data)
        """
        let script = """
        set -e
        cd '\(dir)'
        echo 'good content' > good
        head -c 8192 /dev/urandom > eight
        truncate -s 64M crafted.img
        mkfs.ext4 -q -F -b 1024 -O ^metadata_csum crafted.img
        cat > commands <<'EOF'
        \(commands)EOF
        debugfs -w -f commands crafted.img > /dev/null 2>&1
        block=$(debugfs -R 'imap /zeroed/z26' crafted.img 2>/dev/null | sed -n 's/.*located at block \\([0-9]*\\),.*/\\1/p')
        cat > patch.py <<'EOF'
        \(patch)
        EOF
        python3 patch.py crafted.img $block 1024
        """
        return shell(script)
    }

    /// Every regular file, directory and link under `path`, as paths (nothing followed).
    static func everything(under path: String) -> Set<String> {
        Set(shell("find '\(path)' -xdev 2>/dev/null").stdout.split(separator: "\n").map(String.init))
    }

    @Test(.enabled(if: isRoot)) func restoreFilesWritesNothingOutsideAndRestoresTheRest() throws {
        let cli = CLI()
        defer { cli.dir.remove() }
        let marker = cli.dir.file("marker")  // where the links point: must never appear
        let crafted = CraftedImageTests.craft(cli.dir.path, marker: marker)
        try #require(crafted.status == 0, "\(crafted.stdout) \(crafted.stderr)")
        #expect(cli("init").status == 0)
        #expect(cli("backup", "--machine", "vm", "--disk", "os=" + cli.dir.file("crafted.img")).status == 0)
        let passwd = try sha256(file: "/etc/passwd")
        let before = CraftedImageTests.everything(under: cli.dir.path)
        let tmpBefore = Set(shell("ls -a /tmp").stdout.split(separator: "\n").map(String.init))

        let jail = cli.dir.file("jail")
        let restore = shell("timeout -s KILL 60 '\(CLI.binary)' restore-files vm@latest:/ --to '\(jail)/out' --vault '\(cli.vault)' 2>&1")
        #expect(restore.status == 4, "\(restore.stdout)")
        let output = restore.stdout
        #expect(output.contains("unsafe name \"a/b\""), "\(output)")
        #expect(output.contains("unsafe name \".\""), "\(output)")
        #expect(output.contains("unsafe name \"..\""), "\(output)")
        #expect(output.contains("loop"), "\(output)")
        #expect(output.contains("/huge"), "\(output)")
        #expect(output.contains("/pastend"), "\(output)")
        #expect(output.contains("/zeroed/z26"), "\(output)")
        #expect(output.contains("links/up") && output.contains("already exists"), "\(output)")
        // One inode with a link count of 1 and three names is restored once, not three times.
        #expect(output.contains("/many/two: inode") && output.contains("has one link but another name"), "\(output)")
        #expect(FileSystem.exists(jail + "/out/root/many/one") && !FileSystem.exists(jail + "/out/root/many/three"))
        // A device node and a set-user-id bit are what a guest would plant to take the host over.
        #expect(output.contains("set-user/group-id bits cleared on 1 files, 1 device nodes left out"), "\(output)")
        #expect(!FileSystem.exists(jail + "/out/root/blockdev"))
        // The good files are there; the rest of each damaged directory too.
        #expect(try String(contentsOfFile: jail + "/out/root/good/file", encoding: .utf8) == "good content\n")
        #expect(FileSystem.exists(jail + "/out/root/names/fine"))
        #expect(FileSystem.exists(jail + "/out/root/loop/d/sub/file"))
        #expect(FileSystem.exists(jail + "/out/root/zeroed/z1") && FileSystem.exists(jail + "/out/root/zeroed/z40"))
        var st = stat()
        #expect(lstat(jail + "/out/root/links/up", &st) == 0 && (st.st_mode & S_IFMT) == S_IFLNK)
        #expect(lstat(jail + "/out/root/setuid", &st) == 0 && st.st_mode & 0o7777 == 0o755)

        // Nothing appeared or changed outside the target.
        let after = CraftedImageTests.everything(under: cli.dir.path).filter { !$0.hasPrefix(jail + "/out") }
        #expect(after.subtracting(before).subtracting([jail]).isEmpty, "\(after.subtracting(before))")
        #expect(!FileSystem.exists(marker) && !FileSystem.exists(marker + "-dir"))
        #expect(try sha256(file: "/etc/passwd") == passwd)
        let tmpAfter = Set(shell("ls -a /tmp").stdout.split(separator: "\n").map(String.init))
        #expect(tmpAfter.subtracting(tmpBefore).filter { !$0.hasPrefix("lifeboat-") }.isEmpty)

        // With --overwrite the directories replace the links of the same name, still inside.
        let again = shell("timeout -s KILL 60 '\(CLI.binary)' restore-files vm@latest:/links --to '\(jail)/out2' --overwrite --vault '\(cli.vault)' 2>&1")
        #expect(again.status == 0, "\(again.stdout)")
        #expect(FileSystem.exists(jail + "/out2/links/up/x") && FileSystem.exists(jail + "/out2/links/dd/payload"))
        #expect(try String(contentsOfFile: jail + "/out2/links/pw", encoding: .utf8) == "good content\n")
        #expect(!FileSystem.exists(marker) && !FileSystem.exists(marker + "-dir"))
        #expect(try sha256(file: "/etc/passwd") == passwd)
    }

    @Test(.enabled(if: isRoot)) func lsAndCatGiveClearErrors() throws {
        let cli = CLI()
        defer { cli.dir.remove() }
        let crafted = CraftedImageTests.craft(cli.dir.path, marker: cli.dir.file("marker"))
        try #require(crafted.status == 0, "\(crafted.stdout) \(crafted.stderr)")
        #expect(cli("init").status == 0)
        #expect(cli("backup", "--machine", "vm", "--disk", "os=" + cli.dir.file("crafted.img")).status == 0)
        func lifeboat(_ arguments: String) -> ProcessResult {
            shell("timeout -s KILL 30 '\(CLI.binary)' \(arguments) --vault '\(cli.vault)'")
        }
        let names = lifeboat("ls -l vm@latest:/names")
        #expect(names.status == 4 && names.stdout.contains("fine"), "\(names.stdout) \(names.stderr)")
        #expect(names.stderr.contains("unsafe name \"a/b\""), "\(names.stderr)")
        let zeroed = lifeboat("ls -l vm@latest:/zeroed")
        #expect(zeroed.status == 4 && zeroed.stdout.contains("z1 ") || zeroed.stdout.contains("z1\n"), "\(zeroed.stdout)")
        #expect(zeroed.stderr.contains("z26:"), "\(zeroed.stderr)")
        let loop = lifeboat("ls vm@latest:/loop/d/sub/loop/sub/loop2/sub")
        #expect(loop.status == 0 && loop.stdout.contains("file"))
        let huge = lifeboat("cat vm@latest:/huge > /dev/null")
        #expect(huge.status == 4 && huge.stderr.contains("claims"), "\(huge.stderr)")
        let pastEnd = lifeboat("cat vm@latest:/pastend > /dev/null")
        #expect(pastEnd.status == 4 && pastEnd.stderr.contains("pastend"), "\(pastEnd.stderr)")
        let z = lifeboat("cat vm@latest:/zeroed/z26")
        #expect(z.status == 4 && z.stderr.contains("inode"), "\(z.stderr)")
        let good = lifeboat("cat vm@latest:/good/file")
        #expect(good.status == 0 && good.stdout == "good content\n")
        #expect(lifeboat("cat vm@latest:/links/pw").stdout != (try String(contentsOfFile: "/etc/passwd", encoding: .utf8)))
    }
}
