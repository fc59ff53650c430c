import ChunkStore
import SystemIO
import Vault
import VirtualDisk

/// One disk of a sandbox, held still for the time of a sync (`Sandboxes.openImage`: exclusively
/// when it is not mounted, frozen through its mount when it is). A slot the sandbox never wrote
/// has its base point's chunk id; a slot it wrote (any block of it) has none, and its merged
/// bytes are read and compared.
public final class SandboxSource: SyncSource {
    /// What `sync sandbox:NAME` is given, and the prefix of a resume spec.
    public static let prefix = "sandbox:"

    public let image: SandboxImage
    public let disk: SandboxDisk
    private let pointDisk: PointDisk
    private let index: DiskIndexReader
    /// Per slot: the sandbox wrote at least one block of it.
    private let written: [Bool]
    /// The sandbox's contents version when it was opened (part of the resume spec).
    public let version: String

    /// Opens sandbox `name` and its disk `disk` (nil: its only disk). A mounted sandbox is frozen
    /// until `close`, or refused when `freezeIfMounted` is false.
    public init(vault: Vault, sandbox name: String, disk: String?, freezeIfMounted: Bool = true) throws(SyncError) {
        do throws(SandboxError) {
            image = try Sandboxes(vault: vault).openImage(name, freezeIfMounted: freezeIfMounted)
        } catch { throw .sandbox(error) }
        do throws(SyncError) {
            let chosen: SandboxDisk
            if let disk {
                guard let found = image.disks.first(where: { $0.name == disk }) else {
                    throw .source(.unknownDisk(point: "sandbox \(name)", disk: disk, known: image.disks.map(\.name)))
                }
                chosen = found
            } else if image.disks.count == 1 {
                chosen = image.disks[0]
            } else {
                throw .invalidArgument("sandbox \(name) has disks \(image.disks.map(\.name).joined(separator: ", ")): choose one with --disk")
            }
            self.disk = chosen
            do throws(VaultError) { pointDisk = try image.point.disk(chosen.name) } catch { throw .source(error) }
            index = DiskIndexReader(disk: pointDisk, chunks: vault.chunks, cachedNodes: 64)
            let slotCount = Int((pointDisk.size + UInt64(pointDisk.chunkSize) - 1) / UInt64(pointDisk.chunkSize))
            var written = [Bool](repeating: false, count: slotCount)
            for slot in chosen.changedSlots(chunkSize: pointDisk.chunkSize) where slot < slotCount { written[slot] = true }
            self.written = written
            version = image.version()
        } catch {
            image.close()
            throw error
        }
    }

    deinit { image.close() }

    /// Releases the sandbox (thaws it when frozen). Idempotent.
    public func close() { image.close() }

    public var name: String { image.record.name }
    public var label: String { "sandbox \(name) (over \(image.point.label))" }
    /// `sandbox:NAME@VERSION`: a resume finds the sandbox again and refuses it if it changed.
    public var resumeSpec: String { SandboxSource.prefix + name + "@" + version }
    public var diskName: String { disk.name }
    public var size: UInt64 { pointDisk.size }
    public var chunkSize: Int { pointDisk.chunkSize }
    /// Bytes of the slots the sandbox wrote.
    public var writtenSlotBytes: UInt64 {
        var bytes: UInt64 = 0
        for (slot, w) in written.enumerated() where w { bytes += UInt64(length(of: slot..<(slot + 1))) }
        return bytes
    }

    public func ids(_ slots: Range<Int>) throws(SyncError) -> [ChunkID?] {
        var out: [ChunkID?] = []
        out.reserveCapacity(slots.count)
        var slot = slots.lowerBound
        while slot < slots.upperBound {
            if written[slot] {
                out.append(nil)
                slot += 1
                continue
            }
            let leaf: (first: Int, ids: [ChunkID])
            do {
                leaf = try index.leaf(containing: slot)
            } catch {
                throw .sourceRead(.damaged(point: image.point.label, disk: disk.name, offset: UInt64(slot) * UInt64(chunkSize),
                                           cause: "disk index: \(error.description)"))
            }
            let upTo = min(slots.upperBound, leaf.first + leaf.ids.count)
            while slot < upTo {
                out.append(written[slot] ? nil : leaf.ids[slot - leaf.first])
                slot += 1
            }
        }
        return out
    }

    public func read(_ slots: Range<Int>, into buffer: UnsafeMutableRawBufferPointer) throws(SyncError) {
        let offset = UInt64(slots.lowerBound) * UInt64(chunkSize)
        do throws(SandboxError) {
            let n = try disk.read(into: buffer, at: offset)
            guard n == buffer.count else {
                throw .pastEnd(disk: disk.name, offset: offset + UInt64(n), size: size)
            }
        } catch { throw .sandbox(error) }
    }

    /// A frozen sandbox must still be frozen: otherwise its writes went on while it was read.
    public func finish() throws(SyncError) {
        guard image.stillHeld() else { throw .sandboxKeptWriting(name: name, target: "the target") }
    }

    /// `sandbox:NAME` → NAME; `sandbox:NAME@VERSION` → (NAME, VERSION); nil for anything else.
    public static func parse(_ spec: String) -> (name: String, version: String?)? {
        guard spec.hasPrefix(prefix) else { return nil }
        let rest = spec.dropFirst(prefix.count)
        guard !rest.isEmpty else { return nil }
        if let at = rest.lastIndex(of: "@") {
            return (String(rest[..<at]), String(rest[rest.index(after: at)...]))
        }
        return (String(rest), nil)
    }
}
