import Foundation
import Glibc
import SystemIO
import Testing
import TestSupport

@Suite(.serialized) struct SyncCommandTests {
    /// Two points of a 96 MiB disk that differ almost everywhere, and a target holding the first.
    func twoPoints(_ cli: CLI) throws -> (old: String, new: String) {
        #expect(cli("init").status == 0)
        let old = try cli.randomImage("old.img", megabytes: 96, seed: 1)
        #expect(cli("backup", "--machine", "m", "--disk", "os=" + old, "--time", "2026-03-01T00:00:00Z").status == 0)
        let new = try cli.randomImage("new.img", megabytes: 96, seed: 2)
        #expect(cli("backup", "--machine", "m", "--disk", "os=" + new, "--time", "2026-03-02T00:00:00Z").status == 0)
        return (old, new)
    }

    @Test func killedOrInterruptedSyncsRollBackOrResumeExactly() throws {
        let cli = CLI()
        defer { cli.dir.remove() }
        let (old, new) = try twoPoints(cli)
        let oldHash = try sha256(file: old), newHash = try sha256(file: new)
        let target = cli.dir.file("target.img")
        #expect(shell("cp --sparse=always \(old) \(target)").status == 0)
        // How long a whole sync takes here (the quickest of a few), to choose moments inside it.
        var seconds = Double.infinity
        for spec in ["m@latest", "m@-1", "m@latest", "m@-1"] {
            let started = Date()
            #expect(cli.wait(cli.start(["sync", spec, "--to", target])) == 0)
            seconds = min(seconds, Date().timeIntervalSince(started))
        }
        #expect(try sha256(file: target) == oldHash)

        var random = SeededBytes(seed: 3)
        var interrupted = 0
        for run in 0..<20 {
            let mode = run % 4 < 2 ? "delta" : "full"
            let pid = cli.start(["sync", "m@latest", "--to", target, "--mode", mode])
            usleep(UInt32(Double(random.next() % 1000) / 1000 * seconds * 0.6 * 1_000_000))
            kill(pid, run % 2 == 0 ? SIGKILL : SIGINT)
            let status = cli.wait(pid)
            let state = cli("sync", "status", target, "--json")
            let condition = (try cli.json(state) as? [String: Any])?["condition"] as? String
            if status == 0 {
                // It finished first.
                #expect(condition == "consistent")
                #expect(try sha256(file: target) == newHash)
            } else {
                interrupted += 1
                #expect(status == (run % 2 == 0 ? -SIGKILL : 130), "run \(run)")
                // Before anything was changed, the target may still count as consistent.
                if condition == "mid-sync" {
                    let refused = cli("sync", "m@latest", "--to", target)
                    #expect(refused.status == 64)
                    #expect(refused.stderr.contains("--resume") && refused.stderr.contains("--rollback"))
                    if run % 3 == 0 {
                        let resumed = cli("sync", "--resume", target)
                        #expect(resumed.status == 0, "\(resumed.stderr)")
                        #expect(try sha256(file: target) == newHash, "run \(run): resume")
                    } else {
                        let back = cli("sync", "--rollback", target)
                        #expect(back.status == 0, "\(back.stderr)")
                        #expect(try sha256(file: target) == oldHash, "run \(run): rollback")
                    }
                } else {
                    #expect(condition == "consistent" || condition == "rolled-back", "run \(run): \(state.stdout)")
                    let hash = try sha256(file: target)
                    #expect(hash == oldHash || hash == newHash)
                }
            }
            // Back to the old image for the next run.
            #expect(cli("sync", "m@-1", "--to", target).status == 0)
            #expect(try sha256(file: target) == oldHash)
        }
        #expect(interrupted >= 10, "most runs must be interrupted mid-sync")
    }

    @Test func statusJSONVerifyAndExitCodes() throws {
        let cli = CLI()
        defer { cli.dir.remove() }
        #expect(cli("init").status == 0)
        let image = try cli.randomImage("a.img", megabytes: 8, seed: 4)
        #expect(cli("backup", "--machine", "m", "--disk", "os=" + image).status == 0)
        let target = cli.dir.file("t.img")
        #expect(cli("sync", "status", target).stdout.contains("consistent (no sync recorded)"))
        let result = cli("sync", "m@latest", "--to", target, "--verify", "--json")
        #expect(result.status == 0, "\(result.stderr)")
        let report = try #require(try cli.json(result) as? [String: Any])
        #expect(report["verified"] as? Bool == true)
        #expect(report["created"] as? Bool == true)
        #expect(report["processedBytes"] as? Int == 8 << 20)
        #expect(try sha256(file: target) == sha256(file: image))
        #expect(cli("sync", "status", target).stdout.contains("consistent: synced from m@"))
        #expect(cli("sync", "--resume", target).status == 64)
        #expect(cli("sync", "--rollback", target).status == 64)
        #expect(cli("sync", "m@latest", "--to", target, "--mode", "sideways").status == 64)
        #expect(cli("sync", "m@-3", "--to", target).status == 3)
        #expect(cli("sync", "m@latest").status == 64)
        // A delta sync onto the same image writes nothing.
        let again = try #require(try cli.json(cli("sync", "m@latest", "--to", target, "--json")) as? [String: Any])
        #expect(again["writtenBytes"] as? Int == 0)
        #expect(cli("help", "sync").stdout.contains("--rollback"))
    }

    @Test(.enabled(if: isRoot)) func aJournalThatCannotFitIsRefusedUnlessNoUndo() throws {
        let cli = CLI()
        defer { cli.dir.remove() }
        let (old, new) = try twoPoints(cli)
        let target = cli.dir.file("t.img")
        #expect(shell("cp --sparse=always \(old) \(target)").status == 0)
        // A state directory with 16 MiB free; the journal needs about 72 MiB.
        let state = cli.dir.file("state")
        #expect(shell("mkdir -p \(state)/sync && mount -t tmpfs -o size=16m lifeboat-test \(state)/sync").status == 0)
        defer { _ = umount2(state + "/sync", Int32(MNT_DETACH)) }
        let refused = cli("sync", "m@latest", "--to", target)
        #expect(refused.status == 6)
        #expect(refused.stderr.contains("--no-undo"))
        #expect(try sha256(file: target) == sha256(file: old))
        let pid = cli.start(["sync", "m@latest", "--to", target, "--no-undo", "--mode", "full"])
        usleep(20_000)
        kill(pid, SIGKILL)
        if cli.wait(pid) != 0 {
            let status = cli("sync", "status", target)
            #expect(status.stdout.contains("INCONSISTENT") || status.stdout.contains("consistent"), "\(status.stdout)")
            if status.stdout.contains("INCONSISTENT") {
                #expect(cli("sync", "--rollback", target).status == 64)
                #expect(cli("sync", "--resume", target).status == 0)
            } else {
                #expect(cli("sync", "m@latest", "--to", target, "--no-undo").status == 0)
            }
        }
        #expect(cli("sync", "m@latest", "--to", target, "--no-undo").status == 0)
        #expect(try sha256(file: target) == sha256(file: new))
        #expect(cli("sync", "status", target).stdout.contains("consistent"))
    }
}
