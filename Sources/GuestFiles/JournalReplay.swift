import CExt2fs
import Foundation
import VirtualDisk

/// Replays an ext3/ext4 (jbd2) journal the way the kernel does at mount, without writing
/// anything: the result is a map from filesystem block to the journal block holding its newest
/// committed copy, and `RemappedImage` reads through it. The vault, the point and the image
/// stay untouched; what is shown is what the guest would see after booting.
///
/// Three passes as in the kernel's recovery.c: find the committed transactions from the journal
/// superblock's start, collect revoke records with their sequence, then map every tagged block
/// of a committed transaction unless a revoke of the same or a later transaction cancels it.
struct JournalReplay {
    static let magic: UInt32 = 0xC03B_3998

    /// Filesystem block -> (volume byte offset of its journal copy, escaped).
    var blocks: [UInt64: (offset: UInt64, escaped: Bool)] = [:]
    var transactions = 0

    /// `journalBlock(n)` maps the journal's logical block n to its byte offset in the volume.
    /// `volumeBlocks`: the volume's size in blocks; the journal cannot be longer (nor, as mke2fs
    /// makes them, longer than 10,240,000 blocks).
    static func scan(blockSize: Int, volumeBlocks: UInt64, read: (UInt64, Int) throws(GuestFilesError) -> [UInt8],
                     journalBlock: (UInt64) throws(GuestFilesError) -> UInt64, volume: String) throws(GuestFilesError) -> JournalReplay {
        func be32(_ b: [UInt8], _ at: Int) -> UInt32? {
            guard at >= 0, at + 4 <= b.count else { return nil }
            return UInt32(b[at]) << 24 | UInt32(b[at + 1]) << 16 | UInt32(b[at + 2]) << 8 | UInt32(b[at + 3])
        }
        func bad(_ why: String) -> GuestFilesError { .corrupt(volume: volume, what: "journal: \(why)") }

        let superblock = try read(try journalBlock(0), blockSize)
        guard be32(superblock, 0) == magic, let type = be32(superblock, 4), type == 3 || type == 4 else {
            throw bad("no journal superblock")
        }
        guard let jsize = be32(superblock, 12), Int(jsize) == blockSize,
              let maxlen = be32(superblock, 16), let first = be32(superblock, 20),
              let sequence = be32(superblock, 24), let start = be32(superblock, 28) else { throw bad("short superblock") }
        var result = JournalReplay()
        guard start != 0 else { return result }  // clean: nothing to replay
        guard first >= 1, first < maxlen, start >= first, start < maxlen else { throw bad("start \(start) outside \(first)..<\(maxlen)") }
        // A crafted length would make the scan below (and what it collects) as long as it says.
        guard UInt64(maxlen) <= min(volumeBlocks, 10_240_000) else {
            throw bad("its length of \(maxlen) blocks exceeds what the volume (\(volumeBlocks) blocks) can hold")
        }
        var entries = 0
        let incompat = type == 4 ? (be32(superblock, 0x28) ?? 0) : 0
        let is64 = incompat & 0x2 != 0, csum2 = incompat & 0x8 != 0, csum3 = incompat & 0x10 != 0
        let tagBytes: Int = csum3 ? 16 : (8 + (csum2 ? 2 : 0) + (is64 ? 4 : 0))
        let tail = (csum2 || csum3) ? 4 : 0

        func next(_ block: UInt32) -> UInt32 { block + 1 >= maxlen ? first : block + 1 }

        struct Transaction {
            var sequence: UInt32
            var tags: [(fsBlock: UInt64, journal: UInt32, escaped: Bool)] = []
            var revokes: [UInt64] = []
        }
        var committed: [Transaction] = []
        var current = Transaction(sequence: sequence)
        var block = start
        var expected = sequence
        // A journal cannot hold more blocks than its length: a cycle in a crafted one ends here.
        var budget = Int(maxlen) * 2
        scan: while budget > 0 {
            budget -= 1
            let bytes = try read(try journalBlock(UInt64(block)), blockSize)
            guard be32(bytes, 0) == magic, let kind = be32(bytes, 4), be32(bytes, 8) == expected else { break }
            switch kind {
            case 1:  // descriptor: tags, each followed in the log by its data block
                var at = 12
                var data = next(block)
                while at + tagBytes <= blockSize - tail {
                    guard let low = be32(bytes, at) else { break scan }
                    let flags: UInt32
                    var high: UInt32 = 0
                    if csum3 {
                        flags = be32(bytes, at + 4) ?? 0
                        if is64 { high = be32(bytes, at + 8) ?? 0 }
                    } else {
                        flags = UInt32(bytes[at + 6]) << 8 | UInt32(bytes[at + 7])
                        if is64 { high = be32(bytes, at + 8) ?? 0 }
                    }
                    current.tags.append((UInt64(high) << 32 | UInt64(low), data, flags & 1 != 0))
                    entries += 1
                    data = next(data)
                    at += tagBytes
                    if flags & 2 == 0 { at += 16 }  // a UUID follows unless SAME_UUID
                    if flags & 8 != 0 { break }     // LAST_TAG
                    guard current.tags.count < 1 << 20 else { throw bad("a transaction with too many blocks") }
                }
                block = data
                continue scan
            case 2:  // commit
                committed.append(current)
                expected &+= 1
                current = Transaction(sequence: expected)
                result.transactions += 1
            case 5:  // revoke
                guard let used = be32(bytes, 12), used >= 16, Int(used) <= blockSize else { break scan }
                let width = is64 ? 8 : 4
                var at = 16
                while at + width <= Int(used) {
                    let value = is64 ? (UInt64(be32(bytes, at) ?? 0) << 32 | UInt64(be32(bytes, at + 4) ?? 0)) : UInt64(be32(bytes, at) ?? 0)
                    current.revokes.append(value)
                    entries += 1
                    at += width
                }
            default:
                break scan
            }
            guard entries <= 1 << 22 else { throw bad("more than \(1 << 22) block records") }
            block = next(block)
        }
        var revoked: [UInt64: UInt32] = [:]
        for t in committed {
            for b in t.revokes { revoked[b] = max(revoked[b] ?? 0, t.sequence) }
        }
        for t in committed {
            for tag in t.tags {
                if let r = revoked[tag.fsBlock], r >= t.sequence { continue }
                result.blocks[tag.fsBlock] = (try journalBlock(UInt64(tag.journal)), tag.escaped)
            }
        }
        return result
    }
}

/// A volume read through a journal replay: blocks the journal holds newer copies of come
/// from the journal.
struct RemappedImage: DiskImage {
    let base: any DiskImage
    let blockSize: Int
    let blocks: [UInt64: (offset: UInt64, escaped: Bool)]

    var size: UInt64 { base.size }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(VirtualDiskError) -> Int {
        let n = try base.read(into: buffer, at: offset)
        guard n > 0 else { return 0 }
        let bs = UInt64(blockSize)
        var block = offset / bs
        while block * bs < offset + UInt64(n) {
            if let copy = blocks[block] {
                let blockStart = block * bs
                let from = max(offset, blockStart), to = min(offset + UInt64(n), blockStart + bs)
                let out = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(from - offset)..<Int(to - offset)])
                let got = try base.read(into: out, at: copy.offset + (from - blockStart))
                guard got == out.count else { throw .outOfRange(disk: "journal", offset: copy.offset, size: base.size) }
                // An escaped block began with the journal's magic, which the journal zeroed.
                if copy.escaped && from == blockStart && out.count >= 4 {
                    out[0] = 0xC0; out[1] = 0x3B; out[2] = 0x39; out[3] = 0x98
                }
            }
            block += 1
        }
        return n
    }
}
