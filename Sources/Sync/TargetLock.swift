import Foundation
import Glibc
import SystemIO
import Vault

/// The lock that keeps two syncs (or failback phases) from writing one target at once: flock on
/// `<state>/sync/<key>/lock`, taken without waiting; the file says who holds it, for the
/// message of the one refused. Released when closed, or when the holder dies.
final class TargetLock: Sendable {
    private let file: SystemFile

    private init(file: SystemFile) {
        self.file = file
    }

    static func acquire(_ dir: SyncStateDirectory, target: String) throws(SyncError) -> TargetLock {
        let path = dir.path + "/lock"
        let file: SystemFile
        do throws(SystemError) {
            try FileSystem.createDirectories(dir.path, permissions: 0o700)
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
        // Who holds it, for the message of whoever is refused (best effort).
        let note = "lifeboat pid \(getpid()) since \(Timestamp.format(Date()))\n"
        try? file.truncate(to: 0)
        try? file.write(Array(note.utf8), at: 0)
        return TargetLock(file: file)
    }

    func release() {
        // The note goes first, while the lock is still held: nobody else can have written theirs.
        try? file.truncate(to: 0)
        file.close()
    }
}
