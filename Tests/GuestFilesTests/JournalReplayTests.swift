import Foundation
import GuestFiles
import SystemIO
import Testing
import TestSupport
import VirtualDisk

/// Crash-consistent points: an ext4 image copied while the kernel has it mounted, after the
/// writes were committed to the journal but before they were written in place. Lifeboat's
/// in-memory replay must show what the kernel shows after e2fsck replays the journal for real.
@Suite struct JournalReplayTests {
    /// What the guest does before the copy; `$M` is the mount point. fsync (`sync FILE`) commits
    /// the journal without writing the metadata in place (a plain `sync` would).
    static let variants: [String: (mount: String, script: String)] = [
        "manySmallFiles": ("nodelalloc", """
            mkdir -p $M/many/sub
            for i in $(seq 1 400); do echo "file $i" > $M/many/f$i; done
            for i in $(seq 1 50); do echo "sub $i" > $M/many/sub/s$i; done
            ln -s f1 $M/many/link
            sync $M/many/f1
            """),
        "deletedAfterACommit": ("nodelalloc", """
            # No blocks held back, so that filling the volume uses every free block.
            echo 0 > /sys/fs/ext4/$(basename $(findmnt -n -o SOURCE $M))/reserved_clusters
            mkdir -p $M/gone $M/kept
            for i in $(seq 1 600); do echo "doomed $i" > $M/gone/name-that-is-quite-long-$i; done
            echo kept > $M/kept/k
            sync $M/kept/k
            head -c 100000000 /dev/urandom > $M/kept/fill1 2>/dev/null || true
            sync $M/kept/fill1
            # The directory's blocks (journaled above) are freed and revoked, then become the
            # data of fill2, which a replay ignoring the revokes would overwrite with old entries.
            rm -rf $M/gone
            sync $M/kept/k
            head -c 100000000 /dev/urandom > $M/kept/fill2 2>/dev/null || true
            sync $M/kept/fill2
            """),
        "rewrittenFile": ("nodelalloc", """
            head -c 1000000 /dev/urandom > $M/file
            echo first > $M/small
            sync $M/file
            head -c 300000 /dev/urandom > $M/file
            echo second version > $M/small
            mv $M/small $M/renamed
            sync $M/file
            """),
        "journaledData": ("data=journal", """
            mkdir $M/j
            for i in $(seq 1 60); do head -c 20000 /dev/urandom > $M/j/d$i; done
            sync $M/j/d1
            """),
    ]

    @Test(.enabled(if: isRoot), arguments: ["manySmallFiles", "deletedAfterACommit", "rewrittenFile", "journaledData"])
    func replayShowsWhatTheKernelShowsAfterRecovery(variant: String) throws {
        // The kernel may write the committed metadata in place before the copy (its flusher
        // runs when the machine is busy with other tests' writes); then the copy proves nothing
        // about the replay, and the guest's run is repeated on a new image.
        for attempt in 1...4 {
            let dir = TemporaryDirectory("journal-\(variant)-\(attempt)")
            defer { dir.remove() }
            let copy = dir.file("copy.img")
            let expected = try crashCopy(variant: variant, in: dir, to: copy)

            let copyHash = try sha256(file: copy)
            let fs = try Ext4FileSystem(image: try FileImage(path: copy), volume: "copy")
            #expect(fs.neededRecovery && fs.replayed && fs.replayError == nil, "\(fs.replayError ?? "")")
            let replayed = try lifeboatManifest(fs, directorySizes: true)
            let differences = GuestTrees.differences(expected, replayed)
            #expect(differences.isEmpty, "\(differences.joined(separator: "\n"))")
            // Nothing was written to the image.
            #expect(try sha256(file: copy) == copyHash)

            // Without the replay the tree is not the reference: the test proves the replay.
            let raw = try Ext4FileSystem(image: try FileImage(path: copy), volume: "copy", replayJournal: false)
            #expect(raw.neededRecovery && !raw.replayed)
            let unreplayed = (try? lifeboatManifest(raw, directorySizes: true)) ?? [:]
            if unreplayed != expected { return }
        }
        Issue.record("in 4 runs of the guest the kernel wrote everything in place before the copy: nothing was left to replay")
    }

    /// Runs the variant's guest on a fresh ext4 image, copies the image while it is mounted and
    /// returns the tree the kernel shows once e2fsck has replayed the copy's journal.
    private func crashCopy(variant: String, in dir: TemporaryDirectory, to copy: String) throws -> [String: String] {
        let (options, script) = try #require(JournalReplayTests.variants[variant])
        let live = dir.file("live.img"), reference = dir.file("reference.img")
        let made = shell("truncate -s 64M \(live) && mkfs.ext4 -q -F -m 0 \(live)")
        try #require(made.status == 0, "\(made.stderr)")
        let mount = try LoopMount(image: live, at: dir.file("live"), options: "rw,\(options)")
        let guest: ProcessResult
        let copied: ProcessResult
        do {
            defer { mount.unmount() }
            guest = shell("set -e; M='\(mount.path)'\n" + script)
            copied = shell("cp --sparse=always \(live) \(copy)")
        }
        try #require(guest.status == 0, "\(guest.stderr)")
        try #require(copied.status == 0)
        let features = shell("dumpe2fs -h \(copy) 2>/dev/null | grep '^Filesystem features'").stdout
        try #require(features.contains("needs_recovery"), "the copy has no journal to replay: \(features)")

        let fsck = shell("cp --sparse=always \(copy) \(reference) && e2fsck -fy -E journal_only \(reference)")
        try #require(fsck.status <= 1, "\(fsck.stdout) \(fsck.stderr)")
        let referenceMount = try LoopMount(image: reference, at: dir.file("ref"))
        defer { referenceMount.unmount() }
        return try GuestTrees.localManifest(referenceMount.path, directorySizes: true)
    }
}
