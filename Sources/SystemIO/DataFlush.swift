import Synchronization

/// Flushes a file's data (fdatasync) for one writer of it, so that one failure fails every later
/// flush: Linux reports a lost writeback once and marks the lost pages clean, so a second
/// fdatasync would succeed over data that never reached the disk, and whatever the writer records
/// as durable after it (a sync's checkpoint, an undo record, a sandbox's map) would be a lie.
public final class DataFlush: Sendable {
    private let failure = Mutex<SystemError?>(nil)

    public init() {}

    public func sync(_ file: SystemFile) throws(SystemError) {
        try failure.withLock { (failed: inout SystemError?) throws(SystemError) in
            if let failed { throw failed }
            do throws(SystemError) {
                try file.syncData()
            } catch {
                failed = error
                throw error
            }
        }
    }
}
