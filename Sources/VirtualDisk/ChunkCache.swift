import ChunkStore
import Foundation
import Synchronization

/// Verified chunk plaintexts, bounded in bytes, shared by every disk a process reads.
/// Eviction is CLOCK (second chance): a hit only sets a bit, so lookups stay cheap.
public final class ChunkCache: Sendable {
    private struct Entry {
        var bytes: [UInt8]
        var referenced: Bool
    }
    private struct State {
        var entries: [ChunkID: Entry] = [:]
        var ring: [ChunkID] = []
        var hand = 0
        var bytes = 0
        var hits = 0
        var misses = 0
    }
    private let state = Mutex(State())
    public let capacity: Int
    /// Chunks some thread is fetching now: others wait for them instead of fetching them twice.
    private let inflight = Mutex(Set<ChunkID>())
    private let landed = NSCondition()

    public init(capacityBytes: Int) {
        capacity = max(capacityBytes, 1 << 20)
    }

    public func get(_ id: ChunkID) -> [UInt8]? {
        state.withLock { s in
            guard var entry = s.entries[id] else {
                s.misses += 1
                return nil
            }
            s.hits += 1
            if !entry.referenced {
                entry.referenced = true
                s.entries[id] = entry
            }
            return entry.bytes
        }
    }

    public func contains(_ id: ChunkID) -> Bool {
        state.withLock { $0.entries[id] != nil }
    }

    public func put(_ id: ChunkID, _ bytes: [UInt8]) {
        state.withLock { s in
            if s.entries[id] != nil { return }
            while s.bytes + bytes.count > capacity && !s.ring.isEmpty {
                if s.hand >= s.ring.count { s.hand = 0 }
                let victim = s.ring[s.hand]
                if var entry = s.entries[victim], entry.referenced {
                    entry.referenced = false
                    s.entries[victim] = entry
                    s.hand += 1
                    continue
                }
                if let removed = s.entries.removeValue(forKey: victim) { s.bytes -= removed.bytes.count }
                s.ring.swapAt(s.hand, s.ring.count - 1)
                s.ring.removeLast()
            }
            s.entries[id] = Entry(bytes: bytes, referenced: false)
            s.ring.append(id)
            s.bytes += bytes.count
        }
    }

    /// Splits `ids` into those the caller must fetch (now marked in flight) and those another
    /// thread is already fetching.
    public func claim(_ ids: [ChunkID]) -> (mine: [ChunkID], others: [ChunkID]) {
        inflight.withLock { set in
            var mine: [ChunkID] = [], others: [ChunkID] = []
            for id in ids {
                if set.contains(id) { others.append(id) } else { set.insert(id); mine.append(id) }
            }
            return (mine, others)
        }
    }

    /// Ends a claim (whether or not the chunks arrived) and wakes the waiters.
    public func release(_ ids: [ChunkID]) {
        guard !ids.isEmpty else { return }
        inflight.withLock { set in for id in ids { set.remove(id) } }
        landed.lock()
        landed.broadcast()
        landed.unlock()
    }

    /// Waits until none of `ids` is in flight.
    public func wait(for ids: [ChunkID]) {
        landed.lock()
        defer { landed.unlock() }
        while inflight.withLock({ set in ids.contains { set.contains($0) } }) {
            _ = landed.wait(until: Date(timeIntervalSinceNow: 0.05))
        }
    }

    public var statistics: (bytes: Int, entries: Int, hits: Int, misses: Int) {
        state.withLock { ($0.bytes, $0.entries.count, $0.hits, $0.misses) }
    }
}
