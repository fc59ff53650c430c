import CFuse
import Foundation
import Glibc
import Synchronization
import Sync
import SystemIO
import Testing
import TestSupport
import Vault
import VirtualDisk

/// A one-file FUSE filesystem (`/disk.img`, backed by a plain file) that fails writes touching
/// chosen byte ranges with EIO, as a failing disk would, and the next `failingFlushes` flushes.
final class FaultyDisk: Sendable {
    let backing: SystemFile
    let mountpoint: String
    let failing = Mutex<[Range<UInt64>]>([])
    let failingFlushes = Atomic<Int>(0)
    private let finished = DispatchSemaphore(value: 0)
    private let handle = Mutex<UInt>(0)

    var image: String { mountpoint + "/disk.img" }

    init(backing path: String, at mountpoint: String) throws {
        backing = try SystemFile.open(path, .readWrite)
        self.mountpoint = mountpoint
        try FileSystem.createDirectories(mountpoint)
        var ops = fuse_operations()
        ops.getattr = { path, st, _ in faultyDisk()?.getattr(path, st) ?? -EIO }
        ops.readdir = { _, buffer, filler, _, _, _ in
            for name in [".", "..", "disk.img"] { _ = filler?(buffer, name, nil, 0, fuse_fill_dir_flags(0)) }
            return 0
        }
        ops.open = { path, _ in path.map { String(cString: $0) } == "/disk.img" ? 0 : -ENOENT }
        ops.read = { _, buffer, size, offset, _ in faultyDisk()?.read(buffer, size, offset) ?? -EIO }
        ops.write = { _, buffer, size, offset, _ in faultyDisk()?.write(buffer, size, offset) ?? -EIO }
        ops.truncate = { _, size, _ in faultyDisk()?.truncate(size) ?? -EIO }
        ops.fsync = { _, _, _ in faultyDisk()?.fsync() ?? -EIO }
        ops.`init` = { _, _ in fuse_get_context()?.pointee.private_data }

        var arguments = ["faulty-disk"]
        var argv: [UnsafeMutablePointer<CChar>?] = arguments.indices.map { strdup(arguments[$0]) }
        defer { for p in argv { free(p) } }
        arguments.removeAll()
        let me = Unmanaged.passUnretained(self).toOpaque()
        let fuse: OpaquePointer? = argv.withUnsafeMutableBufferPointer { buffer in
            var args = fuse_args(argc: Int32(buffer.count), argv: buffer.baseAddress, allocated: 0)
            return lb_fuse_new(&args, &ops, me)
        }
        guard let fuse else { throw SyncTestError.failed("fuse_new") }
        guard fuse_mount(fuse, mountpoint) == 0 else {
            fuse_destroy(fuse)
            throw SyncTestError.failed("fuse_mount")
        }
        handle.withLock { $0 = UInt(bitPattern: Int(bitPattern: UnsafeRawPointer(fuse))) }
        let finished = self.finished
        let address = UInt(bitPattern: Int(bitPattern: UnsafeRawPointer(fuse)))
        Thread {
            let fuse = OpaquePointer(bitPattern: address)!
            _ = lb_fuse_loop_mt(fuse, 4)
            fuse_unmount(fuse)
            fuse_destroy(fuse)
            finished.signal()
        }.start()
    }

    /// As Linux reports a lost writeback: once, then the next flush succeeds.
    func fsync() -> Int32 {
        failingFlushes.wrappingSubtract(1, ordering: .relaxed).oldValue > 0 ? -EIO : 0
    }

    func stop() {
        if let fuse = OpaquePointer(bitPattern: handle.withLock({ $0 })) { fuse_exit(fuse) }
        _ = umount2(mountpoint, Int32(MNT_DETACH))
        _ = finished.wait(timeout: .now() + 10)
        backing.close()
    }

    func getattr(_ path: UnsafePointer<CChar>?, _ st: UnsafeMutablePointer<stat>?) -> Int32 {
        guard let path, let st else { return -EINVAL }
        st.pointee = stat()
        switch String(cString: path) {
        case "/":
            st.pointee.st_mode = S_IFDIR | 0o755
            st.pointee.st_nlink = 2
        case "/disk.img":
            st.pointee.st_mode = S_IFREG | 0o644
            st.pointee.st_nlink = 1
            st.pointee.st_size = off_t((try? backing.size()) ?? 0)
        default:
            return -ENOENT
        }
        return 0
    }

    func read(_ buffer: UnsafeMutablePointer<CChar>?, _ size: Int, _ offset: off_t) -> Int32 {
        guard let buffer else { return -EINVAL }
        let n = try? backing.read(into: UnsafeMutableRawBufferPointer(start: buffer, count: size), at: UInt64(offset))
        return n.map { Int32($0) } ?? -EIO
    }

    func write(_ buffer: UnsafePointer<CChar>?, _ size: Int, _ offset: off_t) -> Int32 {
        guard let buffer else { return -EINVAL }
        let range = UInt64(offset)..<(UInt64(offset) + UInt64(size))
        if failing.withLock({ $0.contains { $0.overlaps(range) } }) { return -EIO }
        do {
            try backing.write(UnsafeRawBufferPointer(start: buffer, count: size), at: UInt64(offset))
        } catch { return -EIO }
        return Int32(size)
    }

    func truncate(_ size: off_t) -> Int32 {
        (try? backing.truncate(to: UInt64(size))) != nil ? 0 : -EIO
    }
}

enum SyncTestError: Error {
    case failed(String)
}

private func faultyDisk() -> FaultyDisk? {
    guard let data = fuse_get_context()?.pointee.private_data else { return nil }
    return Unmanaged<FaultyDisk>.fromOpaque(data).takeUnretainedValue()
}

@Suite(.serialized, .enabled(if: isRoot && FileSystem.exists("/dev/fuse"))) struct FaultyDiskTests {
    /// A failed flush of a sandbox's overlay is recorded beside it, so that it outlives the
    /// server (umount and `sandbox list` say it); the overlay stays usable, in the state of its
    /// last successful flush at least, and the next successful flush removes the record.
    @Test func aFailedSandboxFlushIsRecordedUntilAFlushSucceeds() throws {
        let f = try SyncFixture()
        defer { f.dir.remove() }
        let backing = f.dir.file("overlay-backing")
        try setSize(backing, 0)
        let disk = try FaultyDisk(backing: backing, at: f.dir.file("mnt"))
        defer { disk.stop() }
        let sandboxes = Sandboxes(vault: f.vault)
        _ = try sandboxes.create("s", from: try f.vault.point("m@latest"))
        let disks = sandboxes.directory + "/s/disks"
        try FileSystem.createDirectories(disks)
        #expect(symlink(disk.image, disks + "/os.data") == 0)

        let open = try sandboxes.open("s")
        let flushed = [UInt8](repeating: 0xab, count: 8192), lost = [UInt8](repeating: 0xcd, count: 8192)
        try flushed.withUnsafeBytes { try open.disks[0].write($0, at: 1 << 20) }
        try open.disks[0].flush()
        try lost.withUnsafeBytes { try open.disks[0].write($0, at: 2 << 20) }
        disk.failingFlushes.store(1, ordering: .relaxed)
        #expect(throws: SandboxError.self) { try open.disks[0].flush() }
        open.close()   // its flush fails too: one failed data sync fails every later one

        let recorded = try #require(try sandboxes.status("s").lastFlushFailed)
        #expect(recorded.contains("disk os") && recorded.contains("Input/output error") && recorded.contains("may be lost"), "\(recorded)")

        // Usable again; what the successful flush covered is there.
        let again = try sandboxes.open("s")
        var back = [UInt8](repeating: 1, count: 8192)
        _ = try back.withUnsafeMutableBytes { try again.disks[0].read(into: $0, at: 1 << 20) }
        #expect(back == flushed)
        try again.disks[0].flush()
        #expect(try sandboxes.status("s").lastFlushFailed == nil)

        // A write the overlay refuses is recorded, and stays recorded after flushes that succeed
        // (the guest had been told it succeeded; its data is not in the overlay).
        let offset = again.disks[0].writtenBytes + (4 << 20)
        // A write its writer waits for (O_DIRECT, qemu's cache=none) gets the error itself and
        // can retry: nothing is lost, nothing is recorded.
        disk.failing.withLock { $0 = [0..<(64 << 20)] }
        #expect(throws: SandboxError.self) {
            try lost.withUnsafeBytes { try again.disks[0].write($0, at: offset, cached: false) }
        }
        disk.failing.withLock { $0 = [] }
        try again.disks[0].flush()
        #expect(try sandboxes.status("s").lastFlushFailed == nil)
        disk.failing.withLock { $0 = [0..<(64 << 20)] }
        #expect(throws: SandboxError.self) {
            try lost.withUnsafeBytes { try again.disks[0].write($0, at: offset) }
        }
        disk.failing.withLock { $0 = [] }
        try again.disks[0].flush()
        let refused = try #require(try sandboxes.status("s").lastFlushFailed)
        #expect(refused.contains("a write to it failed"), "\(refused)")
        again.close()
        let reopened = try sandboxes.open("s")
        try reopened.disks[0].flush()
        #expect(try sandboxes.status("s").lastFlushFailed?.contains("a write to it failed") == true)
        reopened.close()
        // A point made of it says so.
        let promoted = try sandboxes.promote("s")
        #expect(promoted.warnings.contains { $0.contains("a write to it failed") }, "\(promoted.warnings)")
    }

    @Test func anIOErrorOnTheTargetGivesAClearErrorAndRollsBack() throws {
        let f = try SyncFixture()
        defer { f.dir.remove() }
        let backing = try f.target("backing.img", holding: 0)
        let disk = try FaultyDisk(backing: backing, at: f.dir.file("mnt"))
        defer { disk.stop() }
        let bad: UInt64 = (6 << 20) + 8192
        disk.failing.withLock { $0 = [bad..<(bad + 1)] }
        do throws(SyncError) {
            _ = try f.engine.sync(try f.source(2), to: disk.image, mode: .full)
            Issue.record("the sync must fail on the bad block")
        } catch {
            #expect(error.kind == .io)
            #expect(error.description.contains(disk.image) && error.description.contains("Input/output error"))
            // The byte is where the failing write request started: at most one request before.
            let words = error.description.split(separator: " ")
            let at = words.firstIndex(of: "byte").flatMap { UInt64(words[$0 + 1].dropLast()) } ?? 0
            #expect(at <= bad && at + (1 << 20) > bad, "\(error.description)")
            #expect(error.description.contains("--rollback"))
        }
        #expect(try f.engine.status(disk.image).condition == .midSync)
        // While the fault lasts the rollback fails too, and keeps the journal.
        #expect(throws: SyncError.self) { try f.engine.rollback(disk.image) }
        #expect(try f.engine.status(disk.image).condition == .midSync)
        disk.failing.withLock { $0 = [] }
        _ = try f.engine.rollback(disk.image)
        #expect(try sha256(file: disk.image) == f.hashes[0])
        // And a delta sync through the same (now healthy) filesystem works.
        _ = try f.engine.sync(try f.source(2), to: disk.image, mode: .delta, verify: true)
        #expect(try sha256(file: backing) == f.hashes[2])
    }

    /// A rollback stopped part way has put old bytes back below the sync's last checkpoint: a
    /// resume must look at every slot again, not start from that checkpoint.
    @Test func aResumeAfterARollbackStoppedPartWayGivesTheNewImage() throws {
        let f = try SyncFixture()
        defer { f.dir.remove() }
        let backing = try f.target("backing.img", holding: 0)
        let disk = try FaultyDisk(backing: backing, at: f.dir.file("mnt"))
        defer { disk.stop() }
        let engine = f.smallBatchEngine
        #expect(throws: SyncError.self) {
            try engine.sync(FaultySource(try f.source(2), failAfterReads: 30), to: disk.image, mode: .full)
        }
        let status = try f.engine.status(disk.image)
        #expect(status.condition == .midSync)
        // Day 0 and day 2 differ in MiB 1 and 2 (zeroed on days 1 and 2).
        try #require((status.progressBytes ?? 0) >= 3 << 20, "the sync must have checkpointed past MiB 3")
        // Records are written back newest first: failing on the first batch, whose records are
        // among the oldest, stops the rollback after most slots below the checkpoint are old again.
        disk.failing.withLock { $0 = [0..<(256 << 10)] }
        #expect(throws: SyncError.self) { try f.engine.rollback(disk.image) }
        disk.failing.withLock { $0 = [] }
        #expect(try f.engine.status(disk.image).condition == .midSync)
        _ = try f.engine.resume(disk.image, resolve: f.resolve)
        #expect(try sha256(file: backing) == f.hashes[2])
        #expect(try f.engine.status(disk.image).condition == .consistent)
    }

    /// Linux reports a lost writeback once: the flush after a failed one succeeds although the
    /// data is gone. A failed flush of the target must never be followed by a checkpoint.
    @Test func aFailedFlushOfTheTargetIsNeverFollowedByACheckpoint() throws {
        let f = try SyncFixture()
        defer { f.dir.remove() }
        let backing = try f.target("backing.img", holding: 0)
        let disk = try FaultyDisk(backing: backing, at: f.dir.file("mnt"))
        defer { disk.stop() }
        let engine = f.smallBatchEngine
        disk.failingFlushes.store(1, ordering: .relaxed)
        do throws(SyncError) {
            _ = try engine.sync(try f.source(2), to: disk.image, mode: .full)
            Issue.record("the sync must fail on the failed flush")
        } catch {
            #expect(error.kind == .io, "\(error.description)")
        }
        let status = try f.engine.status(disk.image)
        #expect(status.condition == .midSync)
        #expect(status.progressBytes == 0, "a checkpoint after the failed flush claims bytes that may be lost")
        _ = try f.engine.rollback(disk.image)
        #expect(try sha256(file: backing) == f.hashes[0])
    }
}
