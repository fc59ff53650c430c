import ChunkStore
import Foundation
import Glibc
import Mount
import ObjectStore
import Synchronization
import SystemIO
import Testing
import TestSupport
import Vault

/// A vault mounted in this process, served from a thread, as the tests' real clients see it.
final class MountedVault: Sendable {
    let mountpoint: String
    let server: MountServer
    let log = Mutex<[String]>([])
    private let finished = DispatchSemaphore(value: 0)

    init(_ vault: Vault, at mountpoint: String) throws {
        try FileSystem.createDirectories(mountpoint)
        self.mountpoint = mountpoint
        var options = MountOptions(mountpoint: mountpoint)
        options.cacheBytes = 16 << 20
        let ready = DispatchSemaphore(value: 0)
        let failure = Mutex<String?>(nil)
        let logBox = LogBox()
        server = MountServer(vault: vault, options: options) { line in logBox.append(line) }
        logBox.target = self
        let server = self.server
        let finished = self.finished
        let fixed = options
        let thread = Thread {
            do {
                try server.run(fixed) { ready.signal() }
            } catch {
                failure.withLock { $0 = "\(error)" }
                ready.signal()
            }
            finished.signal()
        }
        thread.start()
        ready.wait()
        if let failure = failure.withLock({ $0 }) { throw MountTestError.failed(failure) }
    }

    func path(_ relative: String) -> String { mountpoint + "/" + relative }

    /// Unmounts and waits for the server to stop.
    func unmount() {
        _ = try? Mounts.unmount(mountpoint)
        if finished.wait(timeout: .now() + 10) == .timedOut {
            server.stop()
            _ = finished.wait(timeout: .now() + 5)
        }
    }
}

// @unchecked: `lines` is guarded by its mutex; `target` is set once before the server starts.
final class LogBox: @unchecked Sendable {
    let lines = Mutex<[String]>([])
    weak var target: MountedVault?
    func append(_ line: String) {
        lines.withLock { $0.append(line) }
        target?.log.withLock { $0.append(line) }
    }
}

enum MountTestError: Error {
    case failed(String)
}

struct MountFixture {
    let dir = TemporaryDirectory("mount")
    var state: String { dir.file("state") }

    func vault() throws -> Vault {
        if FileSystem.exists(dir.file("vault/config")) {
            return try Vault.open(path: dir.file("vault"), stateDirectory: state)
        }
        return try Vault.create(store: LocalDirectoryStore(root: dir.file("vault")), stateDirectory: state)
    }

    /// A 64 MiB disk: a GPT and an ext4 partition with a few files, made by the real tools.
    func ext4Disk(_ name: String, seed: UInt64) throws -> String {
        let tree = dir.file(name + "-tree")
        try FileSystem.createDirectories(tree + "/etc")
        try writeAt(tree + "/etc/hostname", 0, Array("\(name)\n".utf8))
        var random = SeededBytes(seed: seed)
        try writeAt(tree + "/random.bin", 0, random.bytes(5 << 20))
        try writeAt(tree + "/zeros-and-text.log", 0, Array(String(repeating: "all is well\n", count: 20000).utf8))
        let disk = dir.file(name)
        let part = dir.file(name + "-part")
        guard shell("truncate -s 64M \(disk) && sgdisk -n 1:2048:0 -t 1:8300 \(disk) >/dev/null && truncate -s 62M \(part) && mkfs.ext4 -q -F -d \(tree) \(part) && dd if=\(part) of=\(disk) bs=1M seek=1 conv=notrunc,sparse status=none && rm \(part)").status == 0 else {
            throw MountTestError.failed("cannot build the ext4 image")
        }
        return disk
    }
}

@Suite(.serialized, .enabled(if: isRoot && FileSystem.exists("/dev/fuse"))) struct MountTests {
    @Test func treeContentsAndRealReaders() throws {
        let f = MountFixture()
        defer { f.dir.remove() }
        let vault = try f.vault()
        let disk = try f.ext4Disk("os.img", seed: 1)
        let day0 = try sha256(file: disk)
        let first = try vault.backup(BackupRequest(machine: "web01", disks: [("os", .path(disk))], time: Timestamp.parse("2026-03-01T10:00:00Z")))
        var random = SeededBytes(seed: 2)
        try writeAt(disk, 40 << 20, random.bytes(100_000))
        let second = try vault.backup(BackupRequest(machine: "web01", disks: [("os", .path(disk))], time: Timestamp.parse("2026-03-02T10:00:00Z")))

        let mounted = try MountedVault(try f.vault(), at: f.dir.file("mnt"))
        defer { mounted.unmount() }
        #expect(try FileSystem.list(mounted.path("")).sorted() == ["by-id", "machines"])
        #expect(try FileSystem.list(mounted.path("machines")) == ["web01"])
        #expect(try FileSystem.list(mounted.path("machines/web01")).sorted() == ["2026-03-01T10:00:00Z", "2026-03-02T10:00:00Z", "latest"])
        #expect(shell("readlink \(mounted.path("machines/web01/latest"))").stdout == "2026-03-02T10:00:00Z\n")
        #expect(shell("readlink \(mounted.path("by-id/" + first.point))").stdout == "../machines/web01/2026-03-01T10:00:00Z\n")
        let json = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: mounted.path("by-id/\(second.point)/point.json")))) as? [String: Any])
        #expect(json["id"] as? String == second.point)

        let image0 = mounted.path("machines/web01/2026-03-01T10:00:00Z/disks/os.img")
        let image1 = mounted.path("machines/web01/latest/disks/os.img")
        #expect(try sha256(file: image0) == day0)
        #expect(try sha256(file: image1) == sha256(file: disk))
        var st = stat()
        #expect(stat(image0, &st) == 0)
        #expect(st.st_size == 64 << 20)
        #expect(UInt64(st.st_blocks) * 512 < 64 << 20)          // holes take no blocks
        #expect(st.st_mtim.tv_sec == Int(Timestamp.parse("2026-03-01T10:00:00Z")!.timeIntervalSince1970))
        #expect(st.st_mode & 0o222 == 0)

        // Holes are visible through SEEK_DATA/SEEK_HOLE: a sparse copy stays sparse.
        #expect(shell("cp --sparse=always \(image0) \(f.dir.file("copy.img"))").status == 0)
        #expect(allocatedBytes(f.dir.file("copy.img")) < 20 << 20)
        #expect(try sha256(file: f.dir.file("copy.img")) == day0)

        // The VHD view opens in qemu-img as the same disk.
        if FileSystem.exists("/usr/bin/qemu-img") {
            let vhd = mounted.path("machines/web01/latest/disks/os.vhd")
            let compare = shell("qemu-img compare -f vpc -F raw \(vhd) \(disk)")
            #expect(compare.status == 0, "\(compare.stdout)\(compare.stderr)")
        }

        // The kernel reads the ext4 partition inside the exposed image: fsck, then a mount.
        let loop = shell("losetup -r -f --show -o 1048576 --sizelimit 65011712 \(image1)").stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(loop.hasPrefix("/dev/loop"))
        if loop.hasPrefix("/dev/loop") {
            defer { shell("losetup -d \(loop)") }
            #expect(shell("e2fsck -fn \(loop)").status == 0)
            let target = f.dir.file("ext4")
            try FileSystem.createDirectories(target)
            #expect(shell("mount -o ro,noload \(loop) \(target)").status == 0)
            defer { shell("umount \(target)") }
            #expect(try sha256(file: target + "/random.bin") == sha256(file: f.dir.file("os.img-tree/random.bin")))
            #expect(shell("cat \(target)/etc/hostname").stdout == "os.img\n")
        }
        // Writing is refused.
        #expect(Glibc.open(image0, O_RDWR) < 0)
    }

    @Test func pointsComeAndGoWithoutARemount() throws {
        let f = MountFixture()
        defer { f.dir.remove() }
        let vault = try f.vault()
        let mounted = try MountedVault(vault, at: f.dir.file("mnt"))
        defer { mounted.unmount() }
        #expect(try FileSystem.list(mounted.path("machines")).isEmpty)  // an empty vault mounts
        let disk = f.dir.file("d.img")
        try writeAt(disk, 0, randomBytes(seed: 3, count: 1 << 20))
        let report = try vault.backup(BackupRequest(machine: "db01", disks: [("data", .path(disk))]))
        usleep(1_200_000)
        #expect(try FileSystem.list(mounted.path("machines")) == ["db01"])
        #expect(try sha256(file: mounted.path("by-id/\(report.point)/disks/data.img")) == sha256(file: disk))
        try LocalDirectoryStore(root: f.dir.file("vault")).delete(RecoveryPoint.objectName(machine: "db01", id: report.point))
        usleep(1_200_000)
        #expect(try FileSystem.list(mounted.path("machines")).isEmpty)
    }

    /// The kernel keeps symbolic links; `latest` must still move to a new point within a few
    /// seconds, without any request asking for it.
    @Test func latestMovesToANewPoint() throws {
        let f = MountFixture()
        defer { f.dir.remove() }
        let vault = try f.vault()
        let disk = f.dir.file("d.img")
        try writeAt(disk, 0, randomBytes(seed: 5, count: 1 << 20))
        _ = try vault.backup(BackupRequest(machine: "m", disks: [("d", .path(disk))], time: Timestamp.parse("2026-03-01T00:00:00Z")))
        let mounted = try MountedVault(vault, at: f.dir.file("mnt"))
        defer { mounted.unmount() }
        let latest = mounted.path("machines/m/latest")
        #expect(shell("readlink \(latest)").stdout == "2026-03-01T00:00:00Z\n")
        #expect(shell("ls \(latest)/disks").stdout.contains("d.img"))
        _ = try vault.backup(BackupRequest(machine: "m", disks: [("d", .path(disk))], time: Timestamp.parse("2026-03-02T00:00:00Z")))
        var seen = ""
        for _ in 0..<40 {
            seen = shell("readlink \(latest)").stdout
            if seen == "2026-03-02T00:00:00Z\n" { break }
            usleep(100_000)
        }
        #expect(seen == "2026-03-02T00:00:00Z\n")
    }

    @Test func damagedChunkGivesEIOOnExactlyItsRange() throws {
        let f = MountFixture()
        defer { f.dir.remove() }
        let vault = try f.vault()
        let disk = f.dir.file("d.img")
        try writeAt(disk, 0, randomBytes(seed: 4, count: 4 << 20))
        let report = try vault.backup(BackupRequest(machine: "m", disks: [("d", .path(disk))]))
        // Damage the chunk of slot 5 (bytes 327680-393215).
        let id = try vault.reader(report.disks[0]).id(ofSlot: 5)
        let location = try #require(try vault.chunks.location(id))
        let pack = f.dir.file("vault/" + PackFormat.objectName(location.pack))
        let byte = try SystemFile.open(pack, .readOnly).readAll(from: UInt64(location.offset) + 7, count: 1)
        try writeAt(pack, UInt64(location.offset) + 7, [byte[0] ^ 0x20])

        let mounted = try MountedVault(try f.vault(), at: f.dir.file("mnt"))
        defer { mounted.unmount() }
        let image = mounted.path("machines/m/latest/disks/d.img")
        let fd = Glibc.open(image, O_RDONLY)
        #expect(fd >= 0)
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 65536)
        let source = try SystemFile.open(disk, .readOnly)
        defer { source.close() }
        for slot in [4, 6, 63] {
            let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 65536, off_t(slot * 65536)) }
            #expect(n == 65536)
            #expect(buffer == (try source.readAll(from: UInt64(slot * 65536), count: 65536)))
        }
        for at in [327680, 327680 + 4096, 393215] {
            let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 1, off_t(at)) }
            #expect(n == -1 && errno == EIO, "byte \(at) must fail")
        }
        #expect(mounted.log.withLock { $0 }.contains { $0.contains("disk d") && $0.contains("327680") })
    }

    @Test func smallReadHandsItsWholeChunkToThePageCache() throws {
        let f = MountFixture()
        defer { f.dir.remove() }
        let vault = try f.vault()
        let disk = f.dir.file("d.img")
        try writeAt(disk, 0, randomBytes(seed: 9, count: 1 << 20))
        try writeAt(disk, 3 << 20, randomBytes(seed: 10, count: 1 << 20))  // slots 16-47 are a hole
        _ = try vault.backup(BackupRequest(machine: "m", disks: [("d", .path(disk))]))
        let mounted = try MountedVault(try f.vault(), at: f.dir.file("mnt"))
        defer { mounted.unmount() }
        let image = mounted.path("machines/m/latest/disks/d.img")
        let fd = Glibc.open(image, O_RDONLY)
        try #require(fd >= 0)
        defer { close(fd) }
        _ = posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM)  // no readahead: only what the test asks
        let size = 4 << 20
        let map = try #require(mmap(nil, size, PROT_READ, MAP_SHARED, fd, 0))
        defer { munmap(map, size) }
        func resident(slot: Int) -> Int {
            var pages = [UInt8](repeating: 0, count: 16)
            _ = mincore(map.advanced(by: slot << 16), 1 << 16, &pages)
            return pages.filter { $0 & 1 != 0 }.count
        }
        var page = [UInt8](repeating: 0, count: 4096)
        for slot in [3, 20] {  // a chunk and a hole
            #expect(page.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 4096, off_t(slot << 16) + 8192) } == 4096)
            var waited = 0
            while resident(slot: slot) < 16 && waited < 50 {
                usleep(100_000)
                waited += 1
            }
            #expect(resident(slot: slot) == 16, "slot \(slot): the whole chunk is in the page cache")
        }
        #expect(resident(slot: 5) == 0, "a slot nobody read is not")
        let source = try SystemFile.open(disk, .readOnly)
        defer { source.close() }
        for slot in [3, 20] {
            let cached = Array(UnsafeRawBufferPointer(start: map.advanced(by: slot << 16), count: 1 << 16))
            #expect(cached == (try source.readAll(from: UInt64(slot << 16), count: 1 << 16)))
        }
    }

    @Test func concurrentReadersAndUnmountWhileOpen() throws {
        let f = MountFixture()
        defer { f.dir.remove() }
        let vault = try f.vault()
        let disk = f.dir.file("d.img")
        try setSize(disk, 32 << 20)
        try writeAt(disk, 1 << 20, randomBytes(seed: 5, count: 20 << 20))
        _ = try vault.backup(BackupRequest(machine: "m", disks: [("d", .path(disk))]))
        let mounted = try MountedVault(try f.vault(), at: f.dir.file("mnt"))
        let image = mounted.path("machines/m/latest/disks/d.img")
        let original = try SystemFile.open(disk, .readOnly).readAll(count: 32 << 20)
        let mismatches = Atomic<Int>(0)
        DispatchQueue.concurrentPerform(iterations: 4) { worker in
            var random = SeededBytes(seed: UInt64(10 + worker))
            let fd = Glibc.open(image, O_RDONLY)
            defer { close(fd) }
            var buffer = [UInt8](repeating: 0, count: 200_000)
            for _ in 0..<60 {
                let offset = Int(random.next() % UInt64((32 << 20) - 200_000))
                let length = Int(random.next() % 200_000) + 1
                let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, length, off_t(offset)) }
                if n != length || buffer[0..<length] != original[offset..<(offset + length)] { mismatches.add(1, ordering: .relaxed) }
            }
        }
        #expect(mismatches.load(ordering: .relaxed) == 0)

        // A reader holds the disk open while the vault is unmounted: the mount is detached,
        // the reader keeps reading, and the server stops once it closes.
        let fd = Glibc.open(image, O_RDONLY)
        #expect(fd >= 0)
        #expect(try Mounts.unmount(mounted.mountpoint) == .detached)
        #expect(!Mounts.isMounted(mounted.mountpoint))
        var buffer = [UInt8](repeating: 0, count: 4096)
        let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 4096, off_t(2 << 20)) }
        #expect(n == 4096)
        #expect(buffer[...] == original[(2 << 20)..<((2 << 20) + 4096)])
        close(fd)
        mounted.unmount()
    }

    @Test func twoHundredPointsMountInUnderASecond() throws {
        let f = MountFixture()
        defer { f.dir.remove() }
        let vault = try f.vault()
        let disk = f.dir.file("d.img")
        try setSize(disk, 1 << 20)
        let base = Timestamp.parse("2026-01-01T00:00:00Z")!
        for i in 0..<4 {
            try writeAt(disk, UInt64(i) * 65536, [UInt8(i + 1)])
            _ = try vault.backup(BackupRequest(machine: "busy", disks: [("d", .path(disk))], time: base.addingTimeInterval(Double(i) * 3600)))
        }
        // 196 more valid points, hourly, sharing those disks (written as a backup writes them).
        let store = LocalDirectoryStore(root: f.dir.file("vault"))
        let made = try vault.points(machine: "busy")
        for i in 4..<200 {
            var point = made[i % 4]
            point.time = Timestamp.format(base.addingTimeInterval(Double(i) * 3600))
            let bytes = point.encoded()
            try store.put(RecoveryPoint.objectName(machine: "busy", id: ChunkID.sha256(bytes).hex), bytes)
        }
        let started = Date()
        let mounted = try MountedVault(try f.vault(), at: f.dir.file("mnt"))
        defer { mounted.unmount() }
        let names = try FileSystem.list(mounted.path("machines/busy"))
        let elapsed = Date().timeIntervalSince(started)
        #expect(names.count == 201)  // 200 points and "latest"
        #expect(elapsed < 1.0, "mount and first listing took \(elapsed) s")
    }
}

@Suite(.serialized, .enabled(if: isRoot && FileSystem.exists("/dev/fuse"))) struct UnreadableSourceTests {
    /// A source that fails with EIO mid-way (a mounted point with a damaged chunk: this kernel
    /// has no device-mapper to make one): the backup stops with the source, offset and errno,
    /// leaves no point, and the vault stays whole.
    @Test func backupOfASourceThatGivesEIOFailsCleanly() throws {
        let f = MountFixture()
        defer { f.dir.remove() }
        let vault = try f.vault()
        let disk = f.dir.file("d.img")
        try writeAt(disk, 0, randomBytes(seed: 41, count: 8 << 20))
        let report = try vault.backup(BackupRequest(machine: "src", disks: [("d", .path(disk))]))
        let id = try vault.reader(report.disks[0]).id(ofSlot: 70)
        let location = try #require(try vault.chunks.location(id))
        let pack = f.dir.file("vault/" + PackFormat.objectName(location.pack))
        let byte = try SystemFile.open(pack, .readOnly).readAll(from: UInt64(location.offset) + 3, count: 1)
        try writeAt(pack, UInt64(location.offset) + 3, [byte[0] ^ 1])

        let mounted = try MountedVault(try f.vault(), at: f.dir.file("mnt"))
        defer { mounted.unmount() }
        let other = try Vault.create(store: LocalDirectoryStore(root: f.dir.file("vault2")), stateDirectory: f.dir.file("state2"))
        let source = mounted.path("machines/src/latest/disks/d.img")
        #expect { try other.backup(BackupRequest(machine: "copy", disks: [("d", .path(source))])) } throws: { error in
            guard case VaultError.source(let cause) = error else { return false }
            return cause.errno == EIO && cause.path == source
        }
        #expect(try other.points().isEmpty)
        #expect(try other.check(readData: true).ok)
        #expect(try LocalDirectoryStore(root: f.dir.file("vault2")).size("locks/copy") == nil)
    }
}
