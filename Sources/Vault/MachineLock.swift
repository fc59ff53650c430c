import Foundation
import Glibc
import ObjectStore
import Synchronization
import SystemIO

/// An exclusive lock for the length of a backup: the object `locks/<machine>`, created only if
/// absent, and refreshed by its holder every few minutes (a heartbeat). A lock is stale, and
/// taken over, when its process is gone (same host, dead pid) or its heartbeat stopped for
/// `staleAfter` (another host that crashed).
public final class MachineLock: Sendable {
    public let name: String
    let store: any ObjectStore
    private let holder: Holder
    private let stop = DispatchSemaphore(value: 0)
    private let beating: Worker?
    /// When the lock object last said this holder was alive.
    private let lastBeat = LastBeat()

    private final class LastBeat: Sendable {
        let seconds = Atomic<Double>(Date().timeIntervalSince1970)
    }

    static let heartbeat: TimeInterval = 300
    static let staleAfter: TimeInterval = 1800

    struct Holder: Codable, Sendable {
        var host: String
        var pid: Int32
        var started: String
        var operation: String
        /// Last heartbeat (absent in locks written before heartbeats existed).
        var refreshed: String?
        /// Random, per acquisition: tells apart two takers with one pid and second (threads of
        /// one process). Absent in older locks.
        var token: String?
        /// The kernel's boot id and the holder's pid namespace: a pid means something only where
        /// both are this process's (a container that shares the host's name has its own pids; a
        /// reboot reuses them). Absent in older locks.
        var boot: String?
        var pidNamespace: String?

        var lastSignOfLife: Date? { Timestamp.parse(refreshed ?? started) }

        /// The same holder (heartbeats change only `refreshed`).
        func isSame(as other: Holder) -> Bool {
            host == other.host && pid == other.pid && started == other.started && token == other.token
        }

        /// True when the holder can no longer be running.
        var isStale: Bool {
            if host == hostName() && (boot == nil || boot == Host.bootID) && (pidNamespace == nil || pidNamespace == Host.pidNamespace)
                && kill(pid, 0) != 0 && errno == ESRCH { return true }
            guard let last = lastSignOfLife else { return true }
            return Date().timeIntervalSince(last) > MachineLock.staleAfter
        }
    }

    private init(name: String, store: any ObjectStore, holder: Holder, heartbeat: Bool) {
        self.name = name
        self.store = store
        self.holder = holder
        let stop = self.stop
        let lastBeat = self.lastBeat
        beating = heartbeat ? Worker(name: "lock-heartbeat") {
            var current = holder
            while stop.wait(timeout: .now() + MachineLock.heartbeat) == .timedOut {
                // A lock taken over or removed meanwhile (this holder looked stale) is not written
                // back over its new holder: the beats stop, and `confirm` fails as they age. A
                // lock that cannot be read now is tried again at the next beat.
                do throws(ObjectStoreError) {
                    if !MachineLock.isHeld(by: holder, try store.get(name)) { break }
                } catch {
                    if case .notFound = error { break }
                    continue
                }
                let now = Date()
                current.refreshed = Timestamp.format(now)
                // A failed refresh is tried again at the next beat; `confirm` sees how long ago one worked.
                if let bytes = try? JSONEncoder().encode(current), (try? store.put(name, Array(bytes))) != nil {
                    lastBeat.seconds.store(now.timeIntervalSince1970, ordering: .relaxed)
                }
            }
        } : nil
    }

    /// Before a commit that relies on the lock (a backup's manifest names chunks it reused, which
    /// garbage collection spares only while the lock holds): the lock object must still be this
    /// holder's, and refreshed recently enough that nobody can have taken it for stale.
    public func confirm() throws(VaultError) {
        let age = Date().timeIntervalSince1970 - lastBeat.seconds.load(ordering: .relaxed)
        guard age < MachineLock.staleAfter / 2 else {
            throw .lockLost(object: name, why: "it could not be refreshed for \(Int(age / 60)) minutes")
        }
        let current: Holder
        do {
            current = try JSONDecoder().decode(Holder.self, from: Data(try store.get(name)))
        } catch let error as ObjectStoreError {
            if case .notFound = error { throw .lockLost(object: name, why: "it was removed") }
            throw .store(error)
        } catch {
            throw .lockLost(object: name, why: "it no longer reads as a lock")
        }
        guard current.isSame(as: holder) else {
            throw .lockLost(object: name, why: "it is now held by \(current.operation), pid \(current.pid) on \(current.host) since \(current.started)")
        }
    }

    public static func acquire(machine: String, operation: String, store: any ObjectStore) throws(VaultError) -> MachineLock {
        try acquire(object: "locks/" + machine, label: machine, operation: operation, store: store)
    }

    /// The same protocol for any lock object (the garbage collector's is `gc/lock`).
    static func acquire(object name: String, label machine: String, operation: String, store: any ObjectStore,
                        heartbeat: Bool = true) throws(VaultError) -> MachineLock {
        let now = Timestamp.format(Date())
        let me = Holder(host: hostName(), pid: getpid(), started: now, operation: operation, refreshed: now,
                        token: (0..<8).map { _ in UInt8.random(in: 0...255) }.hex, boot: Host.bootID, pidNamespace: Host.pidNamespace)
        let bytes = Array((try? JSONEncoder().encode(me)) ?? Data())
        for _ in 0..<3 {
            do {
                if try store.putIfAbsent(name, bytes) { return MachineLock(name: name, store: store, holder: me, heartbeat: heartbeat) }
                let existing = try store.get(name)
                guard let holder = try? JSONDecoder().decode(Holder.self, from: Data(existing)) else {
                    throw VaultError.locked(machine: machine, holder: "unreadable lock object \(name)")
                }
                if holder.isStale {
                    // Its process is gone, or its host stopped refreshing it: a crash left it.
                    // Deleted only if it is still the same lock, atomically: another taker may have
                    // deleted it and made its own in between.
                    _ = try store.deleteIfUnchanged(name, existing)
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

    /// Removes the lock object if it is still this holder's (one taken over is the new holder's).
    public func release() {
        stop.signal()
        beating?.join()
        if let found = try? store.get(name), MachineLock.isHeld(by: holder, found) { _ = try? store.deleteIfUnchanged(name, found) }
    }

    /// True when `bytes`, a lock object's contents, name `holder`.
    static func isHeld(by holder: Holder, _ bytes: [UInt8]) -> Bool {
        (try? JSONDecoder().decode(Holder.self, from: Data(bytes)))?.isSame(as: holder) ?? false
    }
}

public func hostName() -> String {
    var buffer = [CChar](repeating: 0, count: 256)
    gethostname(&buffer, buffer.count)
    return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}
