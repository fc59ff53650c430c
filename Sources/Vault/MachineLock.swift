import Foundation
import Glibc
import ObjectStore
import SystemIO

/// An exclusive lock on a machine for the length of a backup: the object `locks/<machine>`,
/// created only if absent. A lock whose process is gone (same host, dead pid) is taken over.
public struct MachineLock: Sendable {
    public let name: String
    let store: any ObjectStore

    struct Holder: Codable {
        var host: String
        var pid: Int32
        var started: String
        var operation: String
    }

    public static func acquire(machine: String, operation: String, store: any ObjectStore) throws(VaultError) -> MachineLock {
        try acquire(object: "locks/" + machine, label: machine, operation: operation, store: store)
    }

    /// The same protocol for any lock object (the garbage collector's is `gc/lock`).
    static func acquire(object name: String, label machine: String, operation: String, store: any ObjectStore) throws(VaultError) -> MachineLock {
        let me = Holder(host: hostName(), pid: getpid(), started: Timestamp.format(Date()), operation: operation)
        let bytes = Array((try? JSONEncoder().encode(me)) ?? Data())
        for _ in 0..<3 {
            do {
                if try store.putIfAbsent(name, bytes) { return MachineLock(name: name, store: store) }
                let existing = try store.get(name)
                guard let holder = try? JSONDecoder().decode(Holder.self, from: Data(existing)) else {
                    throw VaultError.locked(machine: machine, holder: "unreadable lock object \(name)")
                }
                if holder.host == me.host && kill(holder.pid, 0) != 0 && errno == ESRCH {
                    // The process that held it is gone: a crash left it behind.
                    try store.delete(name)
                    continue
                }
                throw VaultError.locked(machine: machine, holder: "\(holder.operation) by pid \(holder.pid) on \(holder.host) since \(holder.started)")
            } catch let error as VaultError {
                throw error
            } catch let error as ObjectStoreError {
                if case .notFound = error { continue }
                throw .store(error)
            } catch {
                throw .invalidArgument("\(error)")
            }
        }
        throw .locked(machine: machine, holder: "lock object \(name) keeps changing")
    }

    public func release() {
        try? store.delete(name)
    }
}

public func hostName() -> String {
    var buffer = [CChar](repeating: 0, count: 256)
    gethostname(&buffer, buffer.count)
    return String(cString: buffer)
}
