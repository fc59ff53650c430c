import Foundation
import Glibc
import GuestFiles
import SystemIO
import Testing
import TestSupport
import VirtualDisk

/// The tree of a guest filesystem as Lifeboat reads it, in the manifest format of `GuestTrees`.
func lifeboatManifest(_ fs: any GuestFileSystem, from top: UInt64? = nil, directorySizes: Bool) throws -> [String: String] {
    var out: [String: String] = [:]
    var first: [UInt64: String] = [:]
    func visit(_ inode: UInt64, _ rel: [UInt8]) throws {
        let info = try fs.stat(inode)
        let key = rel.isEmpty ? "." : GuestTrees.escape(rel)
        let size = info.type == .directory && !directorySizes ? "-" : String(info.size)
        var value = "\(info.type.rawValue) \(String(info.permissions, radix: 8)) \(info.uid):\(info.gid) size=\(size) "
            + "mtime=\(info.modified.seconds).\(String(format: "%09d", info.modified.nanoseconds)) links=\(info.links)"
        if info.type == .symlink { value += " target=" + GuestTrees.escape(try fs.readlink(inode)) }
        if info.type == .regular {
            value += " sha=" + (try sha256 { buffer, offset in
                offset >= info.size ? 0 : try fs.read(inode, into: buffer, at: offset)
            })
        }
        if info.type == .regular || info.type == .directory {
            let attributes = try fs.extendedAttributes(inode).filter { $0.name.hasPrefix("user.") }.sorted { $0.name < $1.name }
            value += " xattrs=" + attributes.map { "\($0.name)=\($0.value.hex)" }.joined(separator: ",")
        }
        if info.type != .directory && info.links > 1 {
            if first[inode] == nil { first[inode] = key }
            value += " first=" + first[inode]!
        }
        out[key] = value
        if info.type == .directory {
            for child in try fs.list(inode).sorted(by: { $0.name.lexicographicallyPrecedes($1.name) }) {
                try visit(child.inode, rel.isEmpty ? child.name : rel + [47] + child.name)
            }
        }
    }
    try visit(top ?? fs.rootInode, [])
    return out
}

/// Makes an image of `kind` ("ext2", "ext3", "ext4", "ext4-1k") holding `tree`.
func makeExtImage(_ kind: String, tree: String, at path: String, size: String = "160M") throws {
    let command: String
    switch kind {
    case "ext4-1k": command = "mkfs.ext4 -b 1024"
    // Small files and directories kept inside their inodes.
    case "ext4-inline": command = "mkfs.ext4 -I 256 -O inline_data"
    default: command = "mkfs.\(kind)"
    }
    let result = shell("\(command) -q -F -L \(kind) -d '\(tree)' '\(path)' \(size)")
    guard result.status == 0 else { throw FixtureError("\(command): \(result.stderr)") }
}

@Suite struct Ext4ReferenceTests {
    /// For each kind of image made by mke2fs from a source tree with every kind of entry: the
    /// tree Lifeboat reads equals the kernel's (a read-only loop mount), and a restore of the
    /// whole tree equals it too, with owners, modes, times, xattrs, hard links and holes.
    @Test(.enabled(if: isRoot), arguments: ["ext2", "ext3", "ext4", "ext4-1k", "ext4-inline"])
    func treeAndRestoreEqualTheKernelsReading(kind: String) throws {
        let dir = TemporaryDirectory("ext-\(kind)")
        defer { dir.remove() }
        let source = dir.file("src")
        let made = GuestTrees.makeSourceTree(source)
        try #require(made.status == 0, "\(made.stderr)")
        let image = dir.file("fs.img")
        try makeExtImage(kind, tree: source, at: image)

        let mount = try LoopMount(image: image, at: dir.file("mnt"))
        let kernel: [String: String]
        let kernelNoSizes: [String: String]
        do {
            defer { mount.unmount() }
            kernel = try GuestTrees.localManifest(mount.path, directorySizes: true)
            kernelNoSizes = try GuestTrees.localManifest(mount.path, directorySizes: false)
        }
        // The fixture holds what it should (mke2fs copied xattrs, owners, links, the fifo).
        #expect(kernel["small"]?.contains("user.comment=") == true)
        #expect(kernel["small"]?.contains("1000:1000") == true)
        #expect(kernel["hard1"]?.contains("first=a/hard2") == true)
        #expect(kernel["fifo"]?.hasPrefix("fifo 640 33:44") == true)
        #expect(kernel.count >= 30)

        let fs = try Ext4FileSystem(image: try FileImage(path: image), volume: kind)
        #expect(fs.kind == (kind.hasPrefix("ext4") ? "ext4" : kind))
        #expect(fs.label == kind)
        let read = try lifeboatManifest(fs, directorySizes: true)
        let differences = GuestTrees.differences(kernel, read)
        #expect(differences.isEmpty, "\(differences.joined(separator: "\n"))")

        // Restore everything, then compare with the kernel's reading (directory sizes differ
        // between filesystems and are left out).
        var faithful = FileRestoreOptions()
        faithful.keepPrivileges = true
        let restore = FileRestore(fs: fs, volumeSize: try FileImage(path: image).size, options: faithful)
        let report = try restore.restore("/", to: dir.file("out"))
        #expect(report.errors.isEmpty, "\(report.errors)")
        #expect(report.hardLinks == 3)
        let restored = try GuestTrees.localManifest(dir.file("out/root"), directorySizes: false)
        let restoreDifferences = GuestTrees.differences(kernelNoSizes, restored)
        #expect(restoreDifferences.isEmpty, "\(restoreDifferences.joined(separator: "\n"))")
        // Holes stay holes.
        #expect(fileSize(dir.file("out/root/sparse")) == 64 << 20)
        #expect(allocatedBytes(dir.file("out/root/sparse")) < 1 << 20)
        // Symbolic links are made, not followed: the absolute one still names /etc/passwd.
        var st = stat()
        #expect(lstat(dir.file("out/root/abs"), &st) == 0 && (st.st_mode & S_IFMT) == S_IFLNK)

        // One subtree and one file, under their own names.
        let sub = try FileRestore(fs: fs, volumeSize: 0 + (try FileImage(path: image).size), options: FileRestoreOptions())
            .restore("/a/b", to: dir.file("sub"))
        #expect(sub.errors.isEmpty, "\(sub.errors)")
        #expect(try sha256(file: dir.file("sub/b/c/d/deep")) == sha256(file: source + "/a/b/c/d/deep"))
        let one = try FileRestore(fs: fs, volumeSize: try FileImage(path: image).size, options: FileRestoreOptions())
            .restore("/random.bin", to: dir.file("one"))
        #expect(one.errors.isEmpty && one.files == 1)
        #expect(try sha256(file: dir.file("one/random.bin")) == sha256(file: source + "/random.bin"))

        // By default the set-id bits are cleared (a guest could plant a set-user-id root shell),
        // and counted; a directory's bits (sticky, setgid) are kept.
        let safe = try FileRestore(fs: fs, volumeSize: try FileImage(path: image).size, options: FileRestoreOptions())
            .restore("/", to: dir.file("safe"))
        #expect(safe.errors.isEmpty, "\(safe.errors)")
        #expect(safe.setIDBitsCleared == 2 && safe.leftOut?.contains("--keep-privileges") == true)
        #expect(lstat(dir.file("safe/root/suid"), &st) == 0 && st.st_mode & 0o7777 == 0o755)
        #expect(lstat(dir.file("safe/root/sgid"), &st) == 0 && st.st_mode & 0o7777 == 0o711)
        #expect(lstat(dir.file("safe/root/sticky"), &st) == 0 && st.st_mode & 0o7777 == 0o1777)
    }
}

@Suite struct Ext4SpeedTests {
    /// A hashed directory of 10 000 files: listing and stat of every entry well under a second.
    @Test func listingTenThousandFilesIsFast() throws {
        let dir = TemporaryDirectory("ext-10k")
        defer { dir.remove() }
        let made = GuestTrees.runPython("""
            import os, sys
            os.makedirs(sys.argv[1] + '/big')
            for i in range(10000):
                open('%s/big/file-%05d' % (sys.argv[1], i), 'w').close()
            """, [dir.file("src")])
        try #require(made.status == 0, "\(made.stderr)")
        try makeExtImage("ext4", tree: dir.file("src"), at: dir.file("fs.img"), size: "64M")
        let fs = try Ext4FileSystem(image: try FileImage(path: dir.file("fs.img")), volume: "10k")
        let started = Date()
        let big = try fs.resolve("/big")
        let entries = try fs.list(big.inode)
        var bytes: UInt64 = 0
        for entry in entries { bytes += try fs.stat(entry.inode).size }
        let elapsed = Date().timeIntervalSince(started)
        #expect(entries.count == 10_000 && bytes == 0)
        #expect(elapsed < 0.5, "listing and stat of 10 000 files took \(elapsed) s")
        // Lookups by name use the cached listing.
        let lookups = Date()
        for i in stride(from: 0, to: 10_000, by: 7) {
            _ = try #require(try fs.lookup(Array(String(format: "file-%05d", i).utf8), in: big.inode))
        }
        #expect(Date().timeIntervalSince(lookups) < 0.5)
    }
}

@Suite struct Ext4CraftedSuperblockTests {
    /// An 8 MiB volume whose superblock claims 2^32 - 1 blocks in groups of 8: refused before
    /// libext2fs sees it, with the counts named. (libext2fs refuses this one too, as "superblock is
    /// corrupt"; the bound is for superblocks it would take and then allocate descriptors for.)
    @Test func aSuperblockClaimingFarMoreThanItsVolumeIsRefusedWithItsCounts() throws {
        let dir = TemporaryDirectory("ext-groups")
        defer { dir.remove() }
        let image = dir.file("crafted.img")
        #expect(shell("truncate -s 8M '\(image)' && mkfs.ext4 -q -F -O ^metadata_csum,^64bit '\(image)'").status == 0)
        let patch = GuestTrees.runPython("""
            import struct, sys
            f = open(sys.argv[1], 'r+b'); f.seek(1024); sb = bytearray(f.read(1024))
            struct.pack_into('<I', sb, 0x04, 0xFFFFFFFF)   # blocks
            struct.pack_into('<I', sb, 0x20, 8)            # blocks per group
            struct.pack_into('<I', sb, 0x28, 1)            # inodes per group
            struct.pack_into('<I', sb, 0x00, 0xFFFFFFFF // 8 + 1)  # inodes
            f.seek(1024); f.write(sb); f.close()
            """, [image])
        #expect(patch.status == 0, "\(patch.stderr)")
        let started = Date()
        do {
            _ = try Ext4FileSystem(image: try FileImage(path: image), volume: "crafted")
            Issue.record("a superblock claiming 4 TB on an 8 MiB volume must be refused")
        } catch {
            guard case GuestFilesError.corrupt(_, let what) = error else { Issue.record("wrong error: \(error)"); return }
            #expect(what.contains("claims 4294967295 blocks of 1024 bytes"), "\(what)")
        }
        #expect(Date().timeIntervalSince(started) < 5)
    }
}
