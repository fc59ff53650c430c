import Foundation
import Glibc
import SystemIO
import Vault

/// The lock that keeps two syncs (or failback phases) from writing one target at once: flock on
/// `<state>/sync/locks/<key>`, taken without waiting, where the key names the target's bytes, not
/// the name it was given (two hard links, or two device nodes of one device, take one lock), and
/// on `state-<state key>` for the state directory (two devices may share one). A
/// block device is also claimed with O_EXCL, which the kernel refuses while it is mounted, in an
/// LVM volume group or a RAID, or claimed by another program, a partition of it or the disk it is
/// a partition of included. The lock file says who holds it, for the message of the one refused.
/// Released when closed, or when the holder dies.
final class TargetLock: Sendable {
    private let file: SystemFile
    private let claim: Int32?
    /// Taken before this one, released after it.
    private let outer: TargetLock?

    private init(file: SystemFile, claim: Int32?, outer: TargetLock?) {
        self.file = file
        self.claim = claim
        self.outer = outer
    }

    /// The target's lock, after the locks of the state directory it files its sync under (two
    /// devices with one stable name, two loop devices of one backing file, share that directory,
    /// not the device lock).
    static func acquire(stateDirectory: String, identity: TargetIdentity) throws(SyncError) -> TargetLock {
        let locks = try locksDirectory(stateDirectory)
        let state = try acquireState(stateDirectory: stateDirectory, key: identity.key,
                                     legacyDirectory: stateDirectory + "/sync/" + identity.legacyKey, target: identity.path)
        return try acquire(path: locks + "/" + identity.lockKey, target: identity.path,
                           device: identity.isDevice ? identity.path : nil, outer: state)
    }

    /// A target that is gone: the locks of the state directory its sync was found in.
    static func acquire(stateDirectory: String, gone directory: SyncStateDirectory, target: String) throws(SyncError) -> TargetLock {
        try acquireState(stateDirectory: stateDirectory, key: directory.key, legacyDirectory: directory.path, target: target)
    }

    /// `locks/state-<key>`, after the lock versions before these took in a state directory
    /// (`<legacy directory>/lock`, made if missing), so that this sync and one an older lifeboat
    /// runs during an upgrade exclude each other, whichever began first.
    private static func acquireState(stateDirectory: String, key: String, legacyDirectory: String,
                                     target: String) throws(SyncError) -> TargetLock {
        let locks = try locksDirectory(stateDirectory)
        do throws(SystemError) {
            try FileSystem.createDirectories(legacyDirectory, permissions: 0o700)
        } catch { throw .journal(error) }
        let legacy = try acquire(path: legacyDirectory + "/lock", target: target, device: nil, outer: nil)
        return try acquire(path: locks + "/state-" + key, target: target, device: nil, outer: legacy)
    }

    private static func locksDirectory(_ stateDirectory: String) throws(SyncError) -> String {
        let directory = stateDirectory + "/sync/locks"
        do throws(SystemError) {
            try FileSystem.createDirectories(directory, permissions: 0o700)
        } catch { throw .journal(error) }
        return directory
    }

    /// Releases `outer` when it fails.
    private static func acquire(path: String, target: String, device: String?, outer: TargetLock?) throws(SyncError) -> TargetLock {
        do throws(SyncError) {
            return try lock(path: path, target: target, device: device, outer: outer)
        } catch {
            outer?.release()
            throw error
        }
    }

    private static func lock(path: String, target: String, device: String?, outer: TargetLock?) throws(SyncError) -> TargetLock {
        let file: SystemFile
        do throws(SystemError) {
            file = try SystemFile.open(path, .createOrOpen(permissions: 0o600))
        } catch { throw .journal(error) }
        let held: Bool
        do throws(SystemError) { held = try file.lockWithoutWaiting() } catch {
            file.close()
            throw .journal(error)
        }
        guard held else {
            let holder = (try? file.readAll(count: 200)).map { String(decoding: $0, as: UTF8.self) }?
                .trimmingCharacters(in: .whitespacesAndNewlines)
            file.close()
            throw .busy(path: target, holder: holder?.isEmpty == false ? holder : nil)
        }
        var claim: Int32? = nil
        if let device {
            // A partition rescan or an md/LVM probe claims a device for a moment: tried a few times.
            var fd = open(device, O_RDONLY | O_EXCL | O_CLOEXEC)
            for _ in 0..<4 where fd < 0 && errno == EBUSY {
                usleep(50_000)
                fd = open(device, O_RDONLY | O_EXCL | O_CLOEXEC)
            }
            guard fd >= 0 else {
                let error = SystemError("claim the device", path: device)
                file.close()
                if error.errno == EBUSY {
                    throw .busy(path: target, holder: "the device is in use: mounted, part of an LVM volume group or a RAID, "
                                + "or claimed by another program (a partition of it, or the disk it is part of, counts)")
                }
                throw .target(error)
            }
            claim = fd
        }
        // Who holds it, for the message of whoever is refused (best effort).
        let note = "lifeboat pid \(getpid()) since \(Timestamp.format(Date()))\n"
        try? file.truncate(to: 0)
        try? file.write(Array(note.utf8), at: 0)
        return TargetLock(file: file, claim: claim, outer: outer)
    }

    func release() {
        if let claim { Glibc.close(claim) }
        // The note goes first, while the lock is still held: nobody else can have written theirs.
        try? file.truncate(to: 0)
        file.close()
        outer?.release()
    }
}
