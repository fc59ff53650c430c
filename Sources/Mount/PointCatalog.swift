import Foundation
import ObjectStore
import Synchronization
import Vault

/// The recovery points a mount shows, re-read from the vault at most once a second, so points
/// added or removed while mounted appear and disappear without a remount. Manifests already read
/// are kept (they are immutable); only new names are fetched.
final class PointCatalog: Sendable {
    struct Snapshot: Sendable {
        /// Per machine, its points oldest first, each with its directory name.
        var machines: [String: [(name: String, point: RecoveryPoint)]] = [:]
        var byID: [String: RecoveryPoint] = [:]
        var loaded = Date.distantPast
    }

    private let vault: Vault
    private let snapshot = Mutex(Snapshot())
    private let manifests = Mutex<[String: RecoveryPoint]>([:])
    private let refreshing = Mutex(false)
    private let maximumAge: TimeInterval
    private let log: @Sendable (String) -> Void
    /// Told which machines' latest point changed at a refresh (the kernel caches `latest`).
    private let latestChanged = Mutex<(@Sendable ([String]) -> Void)?>(nil)

    init(vault: Vault, maximumAge: TimeInterval = 1, log: @escaping @Sendable (String) -> Void) {
        self.vault = vault
        self.maximumAge = maximumAge
        self.log = log
    }

    var current: Snapshot {
        let now = Date()
        let current = snapshot.withLock { $0 }
        guard now.timeIntervalSince(current.loaded) >= maximumAge else { return current }
        // One thread refreshes; the others keep using the previous snapshot meanwhile.
        let mine = refreshing.withLock { busy -> Bool in
            if busy { return false }
            busy = true
            return true
        }
        if !mine && current.loaded != .distantPast { return current }
        defer { if mine { refreshing.withLock { $0 = false } } }
        if !mine {
            // The very first load: wait for whoever is doing it.
            while snapshot.withLock({ $0.loaded }) == .distantPast { usleep(1000) }
            return snapshot.withLock { $0 }
        }
        let fresh = load(now)
        snapshot.withLock { $0 = fresh }
        if current.loaded != .distantPast, let tell = latestChanged.withLock({ $0 }) {
            let changed = Set(current.machines.keys).union(fresh.machines.keys).filter {
                current.machines[$0]?.last?.name != fresh.machines[$0]?.last?.name
            }
            if !changed.isEmpty { tell(changed.sorted()) }
        }
        return fresh
    }

    func onLatestChange(_ tell: @escaping @Sendable ([String]) -> Void) {
        latestChanged.withLock { $0 = tell }
    }

    private func load(_ now: Date) -> Snapshot {
        let listing: [ObjectInfo]
        do {
            listing = try vault.store.list(prefix: RecoveryPoint.prefix)
        } catch {
            log("cannot list recovery points: \(error)")
            var stale = snapshot.withLock { $0 }
            stale.loaded = now
            return stale
        }
        let names = Set(listing.map(\.name))
        var known = manifests.withLock { m in m.filter { names.contains($0.key) } }
        for name in names where known[name] == nil {
            do {
                known[name] = try RecoveryPoint.decode(try vault.store.get(name), name: name)
            } catch {
                log("skipping damaged recovery point \(name): \(error)")
            }
        }
        manifests.withLock { $0 = known }

        var result = Snapshot()
        result.loaded = now
        var grouped: [String: [RecoveryPoint]] = [:]
        for point in known.values { grouped[point.machine, default: []].append(point) }
        for (machine, points) in grouped {
            let sorted = RecoveryPoint.chronological(points)
            var counts: [String: Int] = [:]
            for p in sorted { counts[p.time, default: 0] += 1 }
            result.machines[machine] = sorted.map { p in
                // Two points with the same time get their short id in the name.
                (counts[p.time]! > 1 ? p.time + "_" + p.shortID : p.time, p)
            }
        }
        for point in known.values { result.byID[point.id] = point }
        return result
    }
}
