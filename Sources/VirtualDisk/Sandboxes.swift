import ChunkStore
import Foundation
import Glibc
import Synchronization
import SystemIO
import Vault

/// What a sandbox is: its base point and disks. Stored as `sandbox.json` in its directory.
public struct SandboxRecord: Codable, Sendable {
    public struct Disk: Codable, Sendable {
        public var name: String
        public var size: UInt64
    }

    public var name: String
    /// The id of the vault the base point is in.
    public var vault: String
    public var machine: String
    public var point: String
    public var pointTime: String
    public var created: String
    public var host: String
    public var disks: [Disk]
}

public struct SandboxStatus: Codable, Sendable {
    public struct Disk: Codable, Sendable {
        public var name: String
        public var size: UInt64
        public var writtenBytes: UInt64
    }

    public var name: String
    public var machine: String
    public var point: String
    public var pointTime: String
    public var created: String
    public var writtenBytes: UInt64
    public var disks: [Disk]
    /// Where its server has it mounted, if it runs.
    public var mountpoint: String?
    public var serverPID: Int32?
    /// What its overlay may have lost, if its last flush failed.
    public var lastFlushFailed: String?
}

/// Where a running sandbox server says it is mounted (`mount.json`).
struct SandboxMount: Codable {
    var mountpoint: String
    var pid: Int32
}

/// The sandboxes of this host over one vault, in the local state directory:
/// `<state>/sandboxes/<name>/{sandbox.json, lock, mount.json, disks/<disk>.data, disks/<disk>.map}`.
/// The vault holds only a hold object per sandbox, which keeps prune from removing its base.
public final class Sandboxes: Sendable {
    public let vault: Vault
    public let directory: String
    /// Name of the file a mounted sandbox serves at its root: opening it freezes writes and
    /// flushes the overlay; closing it thaws; reading it says "frozen NAME" or "expired NAME".
    public static let freezeFile = ".lifeboat-freeze"

    public init(vault: Vault) {
        self.vault = vault
        self.directory = vault.stateDirectory + "/sandboxes"
    }

    func path(_ name: String) -> String { directory + "/" + name }

    static func holder(_ name: String) -> String {
        let host = hostName().map { c -> Character in c.isLetter || c.isNumber || c == "-" ? c : "_" }
        return "sandbox.\(name).\(String(host).prefix(60))"
    }

    // MARK: - Catalog

    /// A new sandbox over `point`: nothing is copied; the point is held against prune.
    public func create(_ name: String, from point: RecoveryPoint) throws(SandboxError) -> SandboxRecord {
        do {
            try validateName(name, what: "sandbox")
        } catch { throw .vault(error) }
        let dir = path(name)
        guard !FileSystem.exists(dir) else { throw .exists(name) }
        let record = SandboxRecord(
            name: name, vault: vault.config.id, machine: point.machine, point: point.id, pointTime: point.time,
            created: Timestamp.format(Date()), host: hostName(),
            disks: point.disks.map { SandboxRecord.Disk(name: $0.name, size: $0.size) })
        do {
            try vault.hold(point, holder: Sandboxes.holder(name), purpose: "sandbox \(name)")
        } catch { throw .vault(error) }
        do throws(SystemError) {
            try FileSystem.createDirectories(dir + "/disks", permissions: 0o700)
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            let bytes = Array((try? encoder.encode(record)) ?? Data())
            try FileSystem.replace(dir + "/sandbox.json", with: bytes, permissions: 0o600)
            try FileSystem.syncDirectory(dir)
        } catch {
            try? vault.release((point.machine, point.id), holder: Sandboxes.holder(name))
            try? FileManager.default.removeItem(atPath: dir)
            throw .system(error)
        }
        return record
    }

    public func record(_ name: String) throws(SandboxError) -> SandboxRecord {
        let file = path(name) + "/sandbox.json"
        guard let data = FileManager.default.contents(atPath: file) else { throw .unknown(name) }
        guard let record = try? JSONDecoder().decode(SandboxRecord.self, from: data) else {
            throw .damagedOverlay(path: file, why: "not a sandbox record")
        }
        guard record.vault == vault.config.id else {
            throw .busy(name, why: "it belongs to another vault (id \(record.vault)); use that vault")
        }
        return record
    }

    public func names() -> [String] {
        ((try? FileSystem.list(directory)) ?? []).filter { FileSystem.exists(path($0) + "/sandbox.json") }.sorted()
    }

    public func status(_ name: String) throws(SandboxError) -> SandboxStatus {
        let record = try record(name)
        var disks: [SandboxStatus.Disk] = []
        for disk in record.disks {
            disks.append(SandboxStatus.Disk(name: disk.name, size: disk.size,
                                            writtenBytes: Sandboxes.writtenBytes(mapPath: path(name) + "/disks/\(disk.name).map")))
        }
        let mount = mounted(name)
        return SandboxStatus(name: name, machine: record.machine, point: record.point, pointTime: record.pointTime,
                             created: record.created, writtenBytes: disks.reduce(0) { $0 + $1.writtenBytes }, disks: disks,
                             mountpoint: mount?.mountpoint, serverPID: mount?.pid, lastFlushFailed: flushFailure(name))
    }

    /// What the sandbox may have lost, if the last flush of one of its disks failed.
    public func flushFailure(_ name: String) -> String? {
        Sandboxes.flushFailure(sandboxDirectory: path(name))
    }

    /// The same for the sandbox kept in `dir` (`umount` knows the directory, not the vault).
    public static func flushFailure(sandboxDirectory dir: String) -> String? {
        guard let data = FileManager.default.contents(atPath: dir + "/sandbox.json"),
              let record = try? JSONDecoder().decode(SandboxRecord.self, from: data) else { return nil }
        for disk in record.disks {
            if let why = SandboxDisk.recordedFailure(prefix: dir + "/disks/" + disk.name) { return "disk \(disk.name): " + why }
        }
        return nil
    }

    /// Written bytes from a map file as last flushed (a running server may hold a few more).
    static func writtenBytes(mapPath: String) -> UInt64 {
        guard let data = FileManager.default.contents(atPath: mapPath), data.count > BlockMap.headerSize else { return 0 }
        var bits = 0
        data.withUnsafeBytes { raw in
            var i = BlockMap.headerSize
            while i + 8 <= raw.count {
                bits += raw.loadUnaligned(fromByteOffset: i, as: UInt64.self).nonzeroBitCount
                i += 8
            }
        }
        return UInt64(bits) * UInt64(SandboxDisk.blockSize)
    }

    /// The running server's mount, if one holds the sandbox's lock.
    /// The server of the sandbox mounted at `mountpoint` (absolute), if one says it serves it.
    public static func server(mountedAt mountpoint: String, stateDirectory: String = Defaults.stateDirectory) -> (name: String, directory: String, pid: Int32)? {
        let directory = stateDirectory + "/sandboxes"
        for name in (try? FileSystem.list(directory)) ?? [] {
            guard let data = FileManager.default.contents(atPath: directory + "/" + name + "/mount.json"),
                  let mount = try? JSONDecoder().decode(SandboxMount.self, from: data), mount.mountpoint == mountpoint else { continue }
            return (name, directory + "/" + name, mount.pid)
        }
        return nil
    }

    func mounted(_ name: String) -> SandboxMount? {
        guard let lock = try? SystemFile.open(path(name) + "/lock", .createOrOpen(permissions: 0o600)) else { return nil }
        defer { lock.close() }
        if (try? lock.lock(exclusive: true, wait: false)) == true { return nil }  // nobody holds it
        guard let data = FileManager.default.contents(atPath: path(name) + "/mount.json") else { return nil }
        return try? JSONDecoder().decode(SandboxMount.self, from: data)
    }

    // MARK: - Using one

    /// Opens a sandbox for exclusive use (its server, reset, cleanup, promote when not mounted).
    public func open(_ name: String, cacheBytes: Int = 64 << 20) throws(SandboxError) -> OpenSandbox {
        let record = try record(name)
        let lock = try lockExclusively(name)
        do {
            let (point, disks) = try openDisks(record, cacheBytes: cacheBytes)
            return OpenSandbox(record: record, point: point, disks: disks, directory: path(name), lock: lock)
        } catch {
            lock.close()
            throw error
        }
    }

    /// The sandbox's lock, held until the returned file is closed; busy if another process has it.
    private func lockExclusively(_ name: String) throws(SandboxError) -> SystemFile {
        do {
            let lock = try SystemFile.open(path(name) + "/lock", .createOrOpen(permissions: 0o600))
            guard try lock.lockWithoutWaiting() else {
                lock.close()
                let where_ = mounted(name).map { " (mounted at \($0.mountpoint), server pid \($0.pid))" } ?? ""
                throw SandboxError.busy(name, why: "another lifeboat process is using it\(where_)")
            }
            return lock
        } catch let error as SandboxError {
            throw error
        } catch let error as SystemError {
            throw .system(error)
        } catch { throw .damagedOverlay(path: path(name), why: "\(error)") }
    }

    private func openDisks(_ record: SandboxRecord, cacheBytes: Int) throws(SandboxError) -> (RecoveryPoint, [SandboxDisk]) {
        let point: RecoveryPoint
        do {
            point = try vault.point(record.machine + "@" + record.point)
        } catch {
            throw .vault(.unknownPoint("\(record.machine)@\(record.point)", "the base of sandbox \(record.name) is gone from the vault (\(error.description))"))
        }
        let cache = ChunkCache(capacityBytes: cacheBytes, slotSize: vault.config.chunkSize)
        var disks: [SandboxDisk] = []
        for disk in point.disks {
            let base = DiskReader(point: point, disk: disk, chunks: vault.chunks, cache: cache,
                                  tags: vault.recordedSlotTags(point: point, disk: disk.name))
            disks.append(try SandboxDisk(name: disk.name, base: base, prefix: path(record.name) + "/disks/" + disk.name))
        }
        return (point, disks)
    }

    /// Throws away everything the sandbox wrote; it starts again from its point.
    public func reset(_ name: String) throws(SandboxError) {
        // The lock only: the overlay need not be readable to be thrown away.
        let record = try record(name)
        let lock = try lockExclusively(name)
        defer { lock.close() }
        // The map goes first, durably: a map left over a missing data file would make its
        // written blocks read as zeros. The failure marker goes last.
        let disks = path(name) + "/disks"
        for disk in record.disks {
            let prefix = disks + "/" + disk.name
            for file in [prefix + ".map", prefix + ".data", SandboxDisk.failureMarker(prefix: prefix)] {
                if FileSystem.exists(file) {
                    do {
                        try FileSystem.remove(file)
                        try FileSystem.syncDirectory(disks)
                    } catch { throw .system(error) }
                }
            }
        }
    }

    /// Discards the sandbox: its overlay, its record and its hold on the point.
    public func cleanup(_ name: String) throws(SandboxError) {
        guard FileSystem.exists(path(name) + "/sandbox.json") else {
            // Removed locally by an interrupted cleanup (or never finished): its holds may remain.
            let released: Int
            do {
                released = try vault.releaseAll(holder: Sandboxes.holder(name))
            } catch { throw .vault(error) }
            if released == 0 { throw .unknown(name) }
            return
        }
        // The base point need not exist any more: only the lock and the record are needed.
        let record = try record(name)
        let lock = try lockExclusively(name)
        // Renamed away first: a crash from here on leaves no half-removed sandbox under its name.
        let doomed = directory + "/.removing-\(name)-\(getpid())"
        do {
            try FileSystem.rename(path(name), to: doomed)
        } catch {
            lock.close()
            throw .system(error)
        }
        lock.close()
        try? FileManager.default.removeItem(atPath: doomed)
        do {
            try vault.release((record.machine, record.point), holder: Sandboxes.holder(name))
        } catch { throw .vault(error) }
    }

    /// The sandbox's current state as a new crash-consistent point of its machine (deduplicated:
    /// only the slots it wrote are read and stored). A mounted sandbox is frozen for the time
    /// it takes: its writes wait (at most `WriteGate.maximumWait`), reads go on.
    public func promote(_ name: String, progress: (DerivedProgress) -> Void = { _ in }) throws(SandboxError) -> BackupReport {
        let record = try record(name)
        var report: BackupReport
        if let mount = mounted(name) {
            let freeze = try Sandboxes.freeze(mount, name: name)
            defer { Glibc.close(freeze) }
            let (point, disks) = try openDisks(record, cacheBytes: 16 << 20)
            report = try commit(record, point: point, disks: disks, progress: progress)
            guard Sandboxes.freezeAnswer(freeze).hasPrefix("frozen ") else {
                // The point is complete in the vault but may mix states: say so, do not hide it.
                throw .freezeExpired("\(name) (point \(report.point.prefix(12)) was written but may not be consistent; remove it with prune or keep it knowingly)")
            }
        } else {
            let sandbox = try open(name, cacheBytes: 16 << 20)
            defer { sandbox.close() }
            report = try commit(record, point: sandbox.point, disks: sandbox.disks, progress: progress)
        }
        // A write the overlay lost (or a failed flush) is in the point as it is in the overlay.
        if let why = Sandboxes.flushFailure(sandboxDirectory: path(name)) {
            report.warnings.append("sandbox \(name) \(why); the point holds the overlay as it is")
        }
        return report
    }

    /// Freezes a mounted sandbox: pages the kernel still holds (the mount caches writes) go to
    /// the server first; then opening the freeze file stops new writes and flushes the overlay.
    /// The freeze lasts until the returned descriptor is closed.
    /// What the freeze file says now: "frozen NAME" while the freeze held, "expired NAME" else.
    static func freezeAnswer(_ freeze: Int32) -> String {
        var answer = [UInt8](repeating: 0, count: 256)
        let n = answer.withUnsafeMutableBytes { pread(freeze, $0.baseAddress, $0.count, 0) }
        return n > 0 ? String(decoding: answer[0..<n], as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines) : ""
    }

    static func freeze(_ mount: SandboxMount, name: String) throws(SandboxError) -> Int32 {
        // A failed writeback means the guest's cached writes never reached the overlay: the
        // image read now would not be what the guest wrote.
        let root = Glibc.open(mount.mountpoint, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard root >= 0 else { throw .system(SystemError("open the mounted sandbox", path: mount.mountpoint)) }
        let synced = lifeboat_syncfs(root)
        let failure = errno
        Glibc.close(root)
        guard synced == 0 else {
            throw .system(SystemError("write back the cached writes of the mounted sandbox", path: mount.mountpoint, errno: failure))
        }
        let path = mount.mountpoint + "/" + Sandboxes.freezeFile
        let freeze = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard freeze >= 0 else { throw .system(SystemError("freeze the mounted sandbox through", path: path)) }
        // The mountpoint mount.json names may now serve another sandbox (this one's server was
        // detached and another mounted there): freezing that one would leave this one writing.
        let answer = freezeAnswer(freeze)
        if answer == "frozen" || answer == "expired" {
            Glibc.close(freeze)
            throw .busy(name, why: "its server (pid \(mount.pid)) runs an earlier lifeboat, which does not say which sandbox it serves: "
                        + "stop what uses its disk, `lifeboat umount \(mount.mountpoint)` and mount it again")
        }
        guard answer.split(separator: " ").dropFirst().joined(separator: " ") == name else {
            Glibc.close(freeze)
            throw .busy(name, why: "\(mount.mountpoint) serves \(answer.isEmpty ? "something else" : "another sandbox (\(answer))") now, "
                        + "while this sandbox's server (pid \(mount.pid)) still runs detached; stop what uses its disk, then try again")
        }
        return freeze
    }

    /// The sandbox's disks as one consistent image to read from (sync): opened exclusively when
    /// it is not mounted, so nobody mounts it meanwhile; frozen through its mountpoint when it is
    /// (its writes wait, at most `WriteGate.maximumWait`, until `close`). `freezeIfMounted: false` refuses
    /// a mounted sandbox instead of freezing it.
    public func openImage(_ name: String, freezeIfMounted: Bool = true, cacheBytes: Int = 16 << 20) throws(SandboxError) -> SandboxImage {
        let record = try record(name)
        if let mount = mounted(name) {
            guard freezeIfMounted else {
                throw .busy(name, why: "it is mounted at \(mount.mountpoint) (server pid \(mount.pid)): stop the machine and unmount it first")
            }
            let freeze = try Sandboxes.freeze(mount, name: name)
            do {
                let (point, disks) = try openDisks(record, cacheBytes: cacheBytes)
                return SandboxImage(record: record, point: point, disks: disks, directory: path(name),
                                    hold: .frozen(fd: freeze, mountpoint: mount.mountpoint))
            } catch {
                Glibc.close(freeze)
                throw error
            }
        }
        let sandbox = try open(name, cacheBytes: cacheBytes)
        return SandboxImage(record: record, point: sandbox.point, disks: sandbox.disks, directory: path(name), hold: .exclusive(sandbox))
    }

    private func commit(_ record: SandboxRecord, point: RecoveryPoint, disks: [SandboxDisk],
                        progress: (DerivedProgress) -> Void) throws(SandboxError) -> BackupReport {
        var changes: [String: any ChangedSlots] = [:]
        for disk in disks { changes[disk.name] = SandboxChanges(disk: disk, chunkSize: vault.config.chunkSize) }
        do {
            return try vault.commit(derivedFrom: point, changes: changes, tags: ["sandbox-" + record.name], progress: progress)
        } catch { throw .vault(error) }
    }
}

/// A sandbox opened for exclusive use: its lock is held until `close`.
public final class OpenSandbox: Sendable {
    public let record: SandboxRecord
    public let point: RecoveryPoint
    public let disks: [SandboxDisk]
    let directory: String
    private let lock: SystemFile

    init(record: SandboxRecord, point: RecoveryPoint, disks: [SandboxDisk], directory: String, lock: SystemFile) {
        self.record = record
        self.point = point
        self.disks = disks
        self.directory = directory
        self.lock = lock
    }

    /// Says where the sandbox is served (nil: no longer).
    public func setMounted(_ mountpoint: String?) {
        let file = directory + "/mount.json"
        guard let mountpoint else {
            try? FileSystem.remove(file)
            return
        }
        // Best effort: the record only tells `sandbox list` where the sandbox is served.
        if let bytes = try? JSONEncoder().encode(SandboxMount(mountpoint: mountpoint, pid: getpid())) {
            try? FileSystem.replace(file, with: Array(bytes))
        }
    }

    /// Flushes every disk and releases the lock.
    public func close() {
        for disk in disks { try? disk.flush() }
        lock.close()
    }
}

/// A sandbox held still for reading (`Sandboxes.openImage`): exclusively, or frozen through its
/// mount. `close` releases it.
public final class SandboxImage: Sendable {
    enum Hold: Sendable {
        case exclusive(OpenSandbox)
        case frozen(fd: Int32, mountpoint: String)
    }

    public let record: SandboxRecord
    public let point: RecoveryPoint
    public let disks: [SandboxDisk]
    let directory: String
    private let hold: Hold
    private let closed = Mutex(false)

    init(record: SandboxRecord, point: RecoveryPoint, disks: [SandboxDisk], directory: String, hold: Hold) {
        self.record = record
        self.point = point
        self.disks = disks
        self.directory = directory
        self.hold = hold
    }

    /// Where the sandbox is mounted (and frozen); nil when it was opened exclusively.
    public var mountpoint: String? {
        if case .frozen(_, let mountpoint) = hold { return mountpoint }
        return nil
    }

    /// Whether the image has been still from `openImage` until now: always when opened
    /// exclusively; when frozen, the server's answer through the freeze file ("frozen", not
    /// "expired": its writes could not wait any longer and went on).
    public func stillHeld() -> Bool {
        guard case .frozen(let fd, _) = hold else { return true }
        return Sandboxes.freezeAnswer(fd).hasPrefix("frozen ")
    }

    /// Changes whenever what the sandbox holds may have changed: each disk's block map as last
    /// flushed, and its data file's size and modification time.
    public func version() -> String {
        var text = ""
        for disk in disks {
            let prefix = directory + "/disks/" + disk.name
            let map = FileManager.default.contents(atPath: prefix + ".map").map { ChunkID.sha256(Array($0)).hex } ?? "-"
            var st = stat()
            let data = stat(prefix + ".data", &st) == 0 ? "\(st.st_size).\(st.st_mtim.tv_sec).\(st.st_mtim.tv_nsec)" : "-"
            text += "\(disk.name) \(map) \(data)\n"
        }
        return String(ChunkID.sha256(Array(text.utf8)).hex.prefix(24))
    }

    /// Thaws a frozen sandbox, or flushes and unlocks one opened exclusively. Idempotent.
    public func close() {
        guard closed.withLock({ done in defer { done = true }; return !done }) else { return }
        switch hold {
        case .exclusive(let sandbox): sandbox.close()
        case .frozen(let fd, _): Glibc.close(fd)
        }
    }
}

// Glibc's module map leaves out syncfs (a GNU extension).
@_silgen_name("syncfs")
func lifeboat_syncfs(_ fd: Int32) -> Int32
