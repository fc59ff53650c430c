import Foundation
import Synchronization
import GuestFiles
import SystemIO
import Testing
import TestSupport
import VirtualDisk

/// One file as both sides of a comparison see it.
struct TreeEntry: Equatable, CustomStringConvertible {
    var type: GuestFileType
    var size: UInt64
    var sha256: String?
    var description: String { "\(type) \(size) \(sha256 ?? "-")" }
}

/// The tree of a guest filesystem read through Lifeboat: path -> type, size, sha256 of contents.
/// Directory inodes already on the path are not entered again (a crafted loop).
func readTree(_ fs: any GuestFileSystem) throws -> [String: TreeEntry] {
    var out: [String: TreeEntry] = [:]
    func walk(_ inode: UInt64, _ prefix: String, _ ancestors: Set<UInt64>) throws {
        for entry in try fs.list(inode) {
            let path = prefix + entry.text
            let info = try fs.stat(entry.inode)
            #expect(info.type == entry.type)
            if entry.type == .directory {
                out[path] = TreeEntry(type: .directory, size: 0, sha256: nil)
                guard !ancestors.contains(entry.inode) else { continue }
                try walk(entry.inode, path + "/", ancestors.union([entry.inode]))
            } else {
                out[path] = TreeEntry(type: entry.type, size: info.size, sha256: sha256(bytes: try contents(fs, entry.inode, size: info.size)))
            }
        }
    }
    try walk(fs.rootInode, "", [fs.rootInode])
    return out
}

/// A file's bytes, read in odd-sized pieces so that reads cross cluster boundaries.
func contents(_ fs: any GuestFileSystem, _ inode: UInt64, size: UInt64) throws -> [UInt8] {
    var out = [UInt8](repeating: 0, count: Int(size))
    var offset = 0
    while offset < out.count {
        let n = try out.withUnsafeMutableBytes { raw in
            try fs.read(inode, into: UnsafeMutableRawBufferPointer(rebasing: raw[offset..<min(raw.count, offset + 12_345)]), at: UInt64(offset))
        }
        #expect(n > 0)
        if n == 0 { break }
        offset += n
    }
    var probe = [UInt8](repeating: 0, count: 10)
    #expect(try probe.withUnsafeMutableBytes { try fs.read(inode, into: $0, at: size) } == 0)
    return out
}

/// The same for a folder on this machine.
func sourceTree(_ root: String) throws -> [String: TreeEntry] {
    var out: [String: TreeEntry] = [:]
    let manager = FileManager.default
    for case let relative as String in manager.enumerator(atPath: root)! {
        let path = root + "/" + relative
        var isDirectory: ObjCBool = false
        _ = manager.fileExists(atPath: path, isDirectory: &isDirectory)
        if isDirectory.boolValue {
            out[relative] = TreeEntry(type: .directory, size: 0, sha256: nil)
        } else {
            out[relative] = TreeEntry(type: .regular, size: fileSize(path) ?? 0, sha256: try sha256(file: path))
        }
    }
    return out
}

@Suite struct FATTests {
    /// A tree with what FAT makes hard: long names, names that fit 8.3 in lower case (NT case
    /// flags), non-ASCII names, an empty file, an empty folder, a deep path, a file of many
    /// clusters, and a folder of 120 long names that spans several clusters.
    func makeSource(_ dir: TemporaryDirectory) throws -> String {
        let root = dir.file("src")
        for folder in ["dir1/sub dir/deep", "empty_dir", "many"] {
            try FileManager.default.createDirectory(atPath: root + "/" + folder, withIntermediateDirectories: true)
        }
        try writeAt(root + "/UPPER.TXT", 0, Array("upper\n".utf8))
        try writeAt(root + "/lower.txt", 0, Array("lower\n".utf8))
        try writeAt(root + "/MixedCase.Md", 0, Array("mixed\n".utf8))
        try writeAt(root + "/A long file name with spaces.txt", 0, Array("long\n".utf8))
        try writeAt(root + "/café ñ 日本.txt", 0, Array("unicode\n".utf8))
        try setSize(root + "/empty", 0)
        try writeAt(root + "/big.bin", 0, randomBytes(seed: 7, count: 300_001))
        try writeAt(root + "/dir1/sub dir/deep/file.bin", 0, randomBytes(seed: 8, count: 5000))
        for i in 0..<120 {
            try writeAt(root + "/many/a rather long name number \(i).dat", 0, randomBytes(seed: UInt64(100 + i), count: i * 37))
        }
        return root
    }

    /// mkfs.vfat with `options`, filled by mcopy -s -m (times kept, taken as UTC).
    func makeImage(_ dir: TemporaryDirectory, _ source: String, name: String, kilobytes: Int, options: String) throws -> String {
        let path = dir.file(name)
        let made = shell("mkfs.vfat \(options) -n TESTVOL -C \(path) \(kilobytes)")
        try #require(made.status == 0, "\(made.stderr)")
        let copied = shell("cd \(source) && TZ=UTC mcopy -s -m -i \(path) * ::/")
        try #require(copied.status == 0, "\(copied.stderr)")
        return path
    }

    @Test(arguments: [(12, 4096, "-F 12"), (16, 20_000, "-F 16"), (32, 40_000, "-F 32 -s 1")])
    func treeMatchesTheSource(width: Int, kilobytes: Int, options: String) throws {
        let dir = TemporaryDirectory("fat\(width)")
        defer { dir.remove() }
        let source = try makeSource(dir)
        let path = try makeImage(dir, source, name: "fat.img", kilobytes: kilobytes, options: options)
        let image = try FileImage(path: path)
        #expect(FATFileSystem.probe(image))
        let fs = try FATFileSystem(image, volume: "fat.img")
        #expect(fs.kind == "fat\(width)")
        #expect(fs.label == "TESTVOL")
        let expected = try sourceTree(source)
        let actual = try readTree(fs)
        #expect(actual.count == expected.count)
        for (path, entry) in expected { #expect(actual[path] == entry, "\(path)") }

        // Lower-case 8.3 names come from the NT case flags; lookup finds any case.
        let names = try fs.list(fs.rootInode).map(\.text)
        #expect(names.contains("lower.txt") && names.contains("UPPER.TXT"))
        #expect(try fs.lookup(Array("LOWER.TXT".utf8), in: fs.rootInode)?.text == "lower.txt")
        #expect(try fs.resolve("/dir1/sub dir/deep/file.bin").type == .regular)

        // Modes, owners and times (mcopy -m kept the source's modification time).
        let big = try fs.resolve("big.bin")
        let info = try fs.stat(big.inode)
        #expect(info.permissions == 0o644 && info.uid == 0 && info.links == 1)
        let mtime = try FileManager.default.attributesOfItem(atPath: source + "/big.bin")[.modificationDate] as? Date
        #expect(abs(Double(info.modified.seconds) - (mtime?.timeIntervalSince1970 ?? 0)) <= 2)
        let root = try fs.stat(fs.rootInode)
        #expect(root.type == .directory && root.permissions == 0o755 && root.links == 2 + 3)
        #expect(try fs.stat(fs.resolve("many").inode).size >= 120 * 3 * 32)
    }

    @Test func fat32InsideAGPTPartition() throws {
        let dir = TemporaryDirectory("fatgpt")
        defer { dir.remove() }
        let source = try makeSource(dir)
        let disk = dir.file("disk.img")
        try setSize(disk, 64 << 20)
        try #require(shell("sgdisk -n 1:2048:+40M -t 1:ef00 -c 1:EFI \(disk)").status == 0)
        let volume = try makeImage(dir, dir.path + "/src/dir1", name: "part.img", kilobytes: 40 * 1024, options: "-F 32")
        try #require(shell("dd if=\(volume) of=\(disk) bs=1M seek=1 conv=notrunc status=none").status == 0)
        try #require(shell("cd \(source) && TZ=UTC mcopy -s -m -i \(disk)@@1M big.bin many ::/").status == 0)
        let table = try PartitionTable.read(from: FileImage(path: disk))
        let partition = try #require(table.partitions.first)
        let fs = try FATFileSystem(partition.image(on: FileImage(path: disk)), volume: "disk.img:p1")
        let tree = try readTree(fs)
        #expect(tree["big.bin"]?.sha256 == (try sha256(file: source + "/big.bin")))
        #expect(tree["sub dir/deep/file.bin"]?.sha256 == (try sha256(file: source + "/dir1/sub dir/deep/file.bin")))
        #expect(tree.keys.filter { $0.hasPrefix("many/") }.count == 120)
    }

    @Test func readsFromManyThreadsAgree() throws {
        let dir = TemporaryDirectory("fatthreads")
        defer { dir.remove() }
        let source = try makeSource(dir)
        let fs = try FATFileSystem(FileImage(path: makeImage(dir, source, name: "fat.img", kilobytes: 20_000, options: "-F 16")))
        let expected = try sha256(file: source + "/big.bin")
        let inode = try fs.resolve("big.bin").inode
        let results = Mutex<[String]>([])
        DispatchQueue.concurrentPerform(iterations: 8) { _ in
            let digest = (try? contents(fs, inode, size: 300_001)).map { sha256(bytes: $0) } ?? "failed"
            results.withLock { $0.append(digest) }
        }
        #expect(results.withLock { $0 } == Array(repeating: expected, count: 8))
    }

    // MARK: Crafted images

    /// A FAT16 image, its geometry from the boot sector, and a way to patch it.
    struct Patchable {
        var path: String
        var fatOffset: UInt64
        var fatBytes: UInt64
        var copies: Int

        init(_ path: String) throws {
            self.path = path
            let boot = try FileImage(path: path).bytes(at: 0, count: 512, what: "boot")
            let bps = UInt64(boot[11]) | UInt64(boot[12]) << 8
            fatOffset = (UInt64(boot[14]) | UInt64(boot[15]) << 8) * bps
            fatBytes = (UInt64(boot[22]) | UInt64(boot[23]) << 8) * bps
            copies = Int(boot[16])
        }

        /// Sets a FAT16 entry in every copy.
        func setFAT(_ cluster: UInt32, _ value: UInt16) throws {
            for copy in 0..<copies {
                try writeAt(path, fatOffset + UInt64(copy) * fatBytes + UInt64(cluster) * 2, [UInt8(value & 0xFF), UInt8(value >> 8)])
            }
        }

        func entry(_ inode: UInt64) throws -> [UInt8] { try FileImage(path: path).bytes(at: inode, count: 32, what: "entry") }

        func firstCluster(_ inode: UInt64) throws -> UInt32 {
            let e = try entry(inode)
            return UInt32(e[26]) | UInt32(e[27]) << 8
        }
    }

    func crafted(_ dir: TemporaryDirectory) throws -> (String, Patchable) {
        let source = try makeSource(dir)
        let path = try makeImage(dir, source, name: "fat.img", kilobytes: 20_000, options: "-F 16")
        return (source, try Patchable(path))
    }

    @Test func directoryChainThatLoopsIsDamagedNotEndless() throws {
        let dir = TemporaryDirectory("fatloop")
        defer { dir.remove() }
        let (_, image) = try crafted(dir)
        let many = try FATFileSystem(FileImage(path: image.path)).resolve("many").inode
        let first = try image.firstCluster(many)
        try image.setFAT(first, UInt16(first))  // the directory's first cluster is its own successor
        let fs = try FATFileSystem(FileImage(path: image.path))
        #expect(throws: GuestFilesError.self) { try fs.list(many) }
        // The rest of the volume is unharmed.
        #expect(try fs.list(fs.rootInode).count == 10)
        #expect(try contents(fs, fs.resolve("big.bin").inode, size: 300_001) == randomBytes(seed: 7, count: 300_001))
        // A subdirectory entry pointing back at its parent shows as an inode already on the path.
        let sub = try fs.resolve("dir1/sub dir").inode
        var entry = try image.entry(sub)
        let parent = try image.firstCluster(fs.resolve("dir1").inode)
        entry[26] = UInt8(parent & 0xFF)
        entry[27] = UInt8(parent >> 8)
        try writeAt(image.path, sub, entry)
        let looped = try FATFileSystem(FileImage(path: image.path))
        #expect(try looped.lookup(Array("sub dir".utf8), in: looped.resolve("dir1/sub dir").inode)?.inode == sub)
    }

    @Test func chainsOutOfRangeOrTooLongAreDamagedForThatFileOnly() throws {
        let dir = TemporaryDirectory("fatrange")
        defer { dir.remove() }
        let (source, image) = try crafted(dir)
        var fs = try FATFileSystem(FileImage(path: image.path))
        let big = try fs.resolve("big.bin").inode
        let first = try image.firstCluster(big)
        // Past the last cluster (but not an end mark).
        try image.setFAT(first + 3, 0xFFF0)
        fs = try FATFileSystem(FileImage(path: image.path))
        var buffer = [UInt8](repeating: 0, count: 400_000)
        #expect(throws: GuestFilesError.self) { try buffer.withUnsafeMutableBytes { try fs.read(big, into: $0, at: 0) } }
        #expect(try contents(fs, fs.resolve("dir1/sub dir/deep/file.bin").inode, size: 5000) == randomBytes(seed: 8, count: 5000))
        // Free in the middle of a chain.
        try image.setFAT(first + 3, 0)
        fs = try FATFileSystem(FileImage(path: image.path))
        #expect(throws: GuestFilesError.self) { try buffer.withUnsafeMutableBytes { try fs.read(big, into: $0, at: 0) } }
        // A chain longer than the size needs: the size shrunk under it.
        try image.setFAT(first + 3, UInt16(first + 4))
        var entry = try image.entry(big)
        entry[28] = 100; entry[29] = 0; entry[30] = 0; entry[31] = 0
        try writeAt(image.path, big, entry)
        fs = try FATFileSystem(FileImage(path: image.path))
        #expect(throws: GuestFilesError.self) { try buffer.withUnsafeMutableBytes { try fs.read(big, into: $0, at: 0) } }
        // A size past the whole volume.
        entry[28] = 0xFF; entry[29] = 0xFF; entry[30] = 0xFF; entry[31] = 0xFF
        try writeAt(image.path, big, entry)
        fs = try FATFileSystem(FileImage(path: image.path))
        #expect(throws: GuestFilesError.self) { try buffer.withUnsafeMutableBytes { try fs.read(big, into: $0, at: 0) } }
        #expect(try fs.stat(fs.resolve("UPPER.TXT").inode).size == 6)
        _ = source
    }

    @Test func longNameWithABadChecksumFallsBackToTheShortName() throws {
        let dir = TemporaryDirectory("fatlfn")
        defer { dir.remove() }
        let (_, image) = try crafted(dir)
        var fs = try FATFileSystem(FileImage(path: image.path))
        let inode = try fs.resolve("A long file name with spaces.txt").inode
        // The long-name part just before the short entry: change its checksum.
        var part = try image.entry(inode - 32)
        #expect(part[11] == 0x0F)
        part[13] &+= 1
        try writeAt(image.path, inode - 32, part)
        fs = try FATFileSystem(FileImage(path: image.path))
        let names = try fs.list(fs.rootInode).map(\.text)
        #expect(!names.contains("A long file name with spaces.txt"))
        #expect(names.contains("ALONGF~1.TXT"))
        #expect(try contents(fs, inode, size: 5) == Array("long\n".utf8))
        #expect(names.count == 10)
    }

    @Test func bootSectorsThatAreNotFATAreRefused() throws {
        let dir = TemporaryDirectory("fatboot")
        defer { dir.remove() }
        let path = dir.file("zero.img")
        try setSize(path, 1 << 20)
        #expect(!FATFileSystem.probe(try FileImage(path: path)))
        #expect(throws: GuestFilesError.self) { try FATFileSystem(FileImage(path: path)) }
        // A FAT16 boot sector claiming 4 billion sectors and a FAT past the end of a small image.
        let (_, image) = try crafted(dir)
        try writeAt(image.path, 19, [0, 0])
        try writeAt(image.path, 32, [0xFF, 0xFF, 0xFF, 0xFF])
        try writeAt(image.path, 22, [0xFF, 0xFF])
        #expect(throws: GuestFilesError.self) { try FATFileSystem(FileImage(path: image.path)) }
        // Inodes that name no entry.
        let fs = try FATFileSystem(FileImage(path: makeImage(dir, dir.path + "/src/dir1", name: "b.img", kilobytes: 4096, options: "-F 12")))
        for inode: UInt64 in [0, 2, 33, 1 << 40, 512] {
            #expect(throws: GuestFilesError.self) { try fs.stat(inode) }
        }
    }
}
