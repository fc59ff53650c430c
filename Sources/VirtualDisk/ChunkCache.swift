import ChunkStore
import Foundation
import Synchronization

/// Verified chunk plaintexts, shared by every disk a process reads, in one fixed block of
/// memory cut into chunk-sized slots: the cache never holds more than its capacity, and
/// evicting and refilling slots fragments nothing (64 KiB arrays freed and allocated by many
/// threads made the heap grow well past the cache's size). Eviction is CLOCK (second chance).
// @unchecked: `memory` is read and written only while holding `state`'s lock.
public final class ChunkCache: @unchecked Sendable {
    private struct State {
        var slotOf: [ChunkID: Int] = [:]
        var owner: [ChunkID?]
        var length: [Int]
        var referenced: [Bool]
        var hand = 0
        var free: [Int]
        var hits = 0
        var misses = 0
    }
    private let state: Mutex<State>
    private let memory: UnsafeMutableRawBufferPointer
    public let slotSize: Int
    public let capacity: Int
    /// Chunks some thread is fetching now: others wait for them instead of fetching them twice.
    private let inflight = Mutex(Set<ChunkID>())
    private let landed = NSCondition()

    /// `slotSize`: the vault's chunk size; larger chunks are not cached.
    public init(capacityBytes: Int, slotSize: Int = 64 << 10) {
        self.slotSize = slotSize
        let slots = max(16, capacityBytes / slotSize)
        capacity = slots * slotSize
        // Pages are only touched (and counted in RSS) as slots fill.
        memory = .allocate(byteCount: capacity, alignment: 4096)
        state = Mutex(State(owner: Array(repeating: nil, count: slots), length: Array(repeating: 0, count: slots),
                            referenced: Array(repeating: false, count: slots), free: Array((0..<slots).reversed())))
    }

    deinit { memory.deallocate() }

    /// Copies bytes `from..<to` of a cached chunk into `target`; false if it is not cached.
    public func copy(_ id: ChunkID, from: Int, to: Int, into target: UnsafeMutableRawBufferPointer) -> Bool {
        state.withLock { s in
            guard let slot = s.slotOf[id], to <= s.length[slot] else {
                s.misses += 1
                return false
            }
            s.hits += 1
            s.referenced[slot] = true
            let base = slot * slotSize
            target.copyMemory(from: UnsafeRawBufferPointer(rebasing: memory[(base + from)..<(base + to)]))
            return true
        }
    }

    public func contains(_ id: ChunkID) -> Bool {
        state.withLock { $0.slotOf[id] != nil }
    }

    public func put(_ id: ChunkID, _ bytes: UnsafeRawBufferPointer) {
        guard bytes.count <= slotSize else { return }
        state.withLock { s in
            if s.slotOf[id] != nil { return }
            let slot: Int
            if let free = s.free.popLast() {
                slot = free
            } else {
                while true {
                    if s.hand >= s.owner.count { s.hand = 0 }
                    if s.referenced[s.hand] {
                        s.referenced[s.hand] = false
                        s.hand += 1
                        continue
                    }
                    break
                }
                slot = s.hand
                s.hand += 1
                if let old = s.owner[slot] { s.slotOf.removeValue(forKey: old) }
            }
            UnsafeMutableRawBufferPointer(rebasing: memory[(slot * slotSize)..<(slot * slotSize + bytes.count)]).copyMemory(from: bytes)
            s.owner[slot] = id
            s.length[slot] = bytes.count
            s.referenced[slot] = false
            s.slotOf[id] = slot
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
        state.withLock { s in (s.slotOf.keys.reduce(0) { $0 + s.length[s.slotOf[$1]!] }, s.slotOf.count, s.hits, s.misses) }
    }
}
