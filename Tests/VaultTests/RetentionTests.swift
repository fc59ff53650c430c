import ChunkStore
import Foundation
import ObjectStore
import SystemIO
import Synchronization
import Testing
import TestSupport
@testable import Vault

/// Manifests as a backup writes them (encoded and read back), for the retention rules.
func points(at times: [Date], machine: String = "m") throws -> [RecoveryPoint] {
    try times.enumerated().map { i, time in
        let point = RecoveryPoint(format: 1, machine: machine, time: Timestamp.format(time), created: "2026-01-01T00:00:0\(i % 10)Z",
                                  host: "h", consistency: .crash, tags: ["n\(i)"], parent: nil, keepUntil: nil, disks: [])
        let bytes = point.encoded()
        return try RecoveryPoint.decode(bytes, name: RecoveryPoint.objectName(machine: machine, id: ChunkID.sha256(bytes).hex))
    }
}

let borgAvailable = FileSystem.exists("/usr/lib/python3/dist-packages/borg/helpers/misc.py")

@Suite struct RetentionTests {
    @Test func dailyWeeklyAndTheOldestRule() throws {
        // Four days, two points on day 2; keep 3 daily: the newest of each of the last 3 days.
        let day = 86400.0
        let base = Timestamp.parse("2026-03-02T08:00:00Z")!
        let times = [base, base.addingTimeInterval(day), base.addingTimeInterval(day + 3600), base.addingTimeInterval(3 * day)]
        let p = try points(at: times)
        let plan = Retention.plan(p, policy: RetentionPolicy(keepDaily: 3), now: base.addingTimeInterval(10 * day))
        let kept = Set(plan.filter(\.keep).map(\.point))
        #expect(kept == Set([p[3].id, p[2].id, p[0].id]))
        #expect(plan.first { $0.point == p[3].id }?.reason == "daily #1")
        // keep-last 1 then daily 2: the last point counts once; daily takes the next two days.
        let mixed = Retention.plan(p, policy: RetentionPolicy(keepLast: 1, keepDaily: 2), now: base)
        #expect(Set(mixed.filter(\.keep).map(\.point)) == Set([p[3].id, p[2].id, p[0].id]))
        // More periods wanted than there are: the oldest point is kept too.
        let oldest = Retention.plan(p, policy: RetentionPolicy(keepMonthly: 5), now: base)
        #expect(oldest.first { $0.point == p[0].id }?.reason == "monthly[oldest] #2")
    }

    @Test func withinProtectionAndKeepUntil() throws {
        let now = Timestamp.parse("2026-06-01T00:00:00Z")!
        let times = (0..<10).map { now.addingTimeInterval(-Double($0) * 86400 - 60) }
        var p = try points(at: times)
        let plan = Retention.plan(p, policy: RetentionPolicy(keepWithin: "3d"), now: now)
        #expect(plan.filter(\.keep).count == 3)
        let protected = Retention.plan(p, policy: RetentionPolicy(keepLast: 1), now: now,
                                       protected: [p[9].id: nil, p[8].id: now.addingTimeInterval(-1), p[7].id: now.addingTimeInterval(86400)])
        let keep = Set(protected.filter(\.keep).map(\.point))
        #expect(keep == Set([p[0].id, p[9].id, p[7].id]))  // an expired protection no longer keeps p[8]
        // A point backed up with --keep-until stays until then.
        var point = p[5]
        point.keepUntil = "2026-07-01T00:00:00Z"
        let bytes = point.encoded()
        p[5] = try RecoveryPoint.decode(bytes, name: RecoveryPoint.objectName(machine: "m", id: ChunkID.sha256(bytes).hex))
        let untilPlan = Retention.plan(p, policy: RetentionPolicy(keepLast: 1), now: now)
        #expect(untilPlan.first { $0.point == p[5].id }?.reason == "keep-until 2026-07-01T00:00:00Z")
        #expect(RetentionPolicy.seconds("36h") == 36.0 * 3600)
        #expect(RetentionPolicy.seconds("2w") == 14.0 * 86400)
        #expect(RetentionPolicy.seconds("x") == nil)
        #expect(throws: VaultError.self) { try RetentionPolicy(keepWithin: "7 days").validate() }
    }

    /// 200 random timelines: the points Lifeboat keeps are the archives borg 1.2 keeps, by
    /// borg's own code, for the same times and rules.
    @Test(.enabled(if: borgAvailable)) func agreesWithBorgOnRandomTimelines() throws {
        var random = SeededBytes(seed: 2026)
        struct Case: Encodable { var times: [Int]; var rules: [String: Int] }
        var cases: [Case] = []
        for _ in 0..<200 {
            let count = Int(random.next() % 40) + 1
            // Spans from hours to years, with clusters in one period.
            let spread = [3600, 86400, 7 * 86400, 40 * 86400, 800 * 86400][Int(random.next() % 5)]
            let start = 1_700_000_000 + Int(random.next() % 100_000_000)
            var times = Set<Int>()
            while times.count < count { times.insert(start + Int(random.next() % UInt64(spread * 4))) }
            var rules: [String: Int] = [:]
            for rule in ["last", "hourly", "daily", "weekly", "monthly", "yearly"] where random.next() % 2 == 0 {
                rules[rule] = Int(random.next() % 6)
            }
            if rules.values.allSatisfy({ $0 == 0 }) { rules["daily"] = 2 }
            cases.append(Case(times: times.sorted(), rules: rules))
        }
        let input = TemporaryDirectory("oracle")
        defer { input.remove() }
        try JSONEncoder().encode(cases).write(to: URL(fileURLWithPath: input.file("cases.json")))
        let oracle = packageRoot + "/Tests/VaultTests/borg_prune_oracle.py"
        let result = run("/usr/bin/python3", [oracle], environment: ["TZ": "UTC"], stdin: input.file("cases.json"))
        #expect(result.status == 0, "\(result.stderr)")
        let expected = try JSONDecoder().decode([[Int]].self, from: Data(result.stdout.utf8))
        #expect(expected.count == 200)
        for (n, c) in cases.enumerated() where n < expected.count {
            let p = try points(at: c.times.map { Date(timeIntervalSince1970: Double($0)) })
            let policy = RetentionPolicy(keepLast: c.rules["last"], keepHourly: c.rules["hourly"], keepDaily: c.rules["daily"],
                                         keepWeekly: c.rules["weekly"], keepMonthly: c.rules["monthly"], keepYearly: c.rules["yearly"])
            let plan = Retention.plan(p, policy: policy, now: Date(timeIntervalSince1970: 2_000_000_000))
            let kept = Set(plan.filter(\.keep).map(\.point))
            let ours = p.indices.filter { kept.contains(p[$0].id) }
            #expect(ours == expected[n], "timeline \(n): \(c.times) rules \(c.rules)")
        }
    }

    /// The same comparison through borg's command line, as an operator would run it: archives made
    /// with `borg create --timestamp`, kept as `borg prune --dry-run --list` says (TZ=UTC).
    @Test(.enabled(if: FileSystem.exists("/usr/bin/borg"))) func agreesWithBorgsCommandLine() throws {
        let dir = TemporaryDirectory("borg")
        defer { dir.remove() }
        let env = ["BORG_REPO": dir.file("repo"), "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
                   "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes", "BORG_BASE_DIR": dir.file("base"), "TZ": "UTC"]
        try writeAt(dir.file("f"), 0, [1])
        #expect(run("/usr/bin/borg", ["init", "-e", "none"], environment: env).status == 0)
        var random = SeededBytes(seed: 77)
        var times: [Int] = []
        var t = 1_767_225_600
        for _ in 0..<12 {
            t += Int(random.next() % 5) * 86400 + Int(random.next() % 86400)
            times.append(t)
        }
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withFullDate, .withTime, .withColonSeparatorInTime, .withDashSeparatorInDate]
        formatter.timeZone = TimeZone(identifier: "UTC")
        for (i, time) in times.enumerated() {
            let stamp = String(formatter.string(from: Date(timeIntervalSince1970: Double(time))).prefix(19))
            let made = run("/usr/bin/borg", ["create", "--timestamp", stamp, "::a\(i)", dir.file("f")], environment: env)
            #expect(made.status == 0, "\(made.stderr)")
        }
        let p = try points(at: times.map { Date(timeIntervalSince1970: Double($0)) })
        for (flags, policy) in [(["--keep-daily", "3", "--keep-weekly", "2"], RetentionPolicy(keepDaily: 3, keepWeekly: 2)),
                                (["--keep-last", "2", "--keep-monthly", "3"], RetentionPolicy(keepLast: 2, keepMonthly: 3))] {
            let listed = run("/usr/bin/borg", ["prune", "--dry-run", "--list"] + flags, environment: env)
            #expect(listed.status == 0, "\(listed.stderr)")
            let keptByBorg = listed.stderr.split(separator: "\n").filter { $0.hasPrefix("Keeping archive") }.compactMap { line in
                line.split(separator: " ").first { $0.hasPrefix("a") && Int($0.dropFirst()) != nil }.flatMap { Int($0.dropFirst()) }
            }
            let plan = Retention.plan(p, policy: policy, now: Date())
            let kept = Set(plan.filter(\.keep).map(\.point))
            #expect(p.indices.filter { kept.contains(p[$0].id) } == keptByBorg.sorted(), "\(flags)")
        }
    }

    @Test func pruneRemovesOnlyWhatThePolicyDoesNotKeep() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        let vault = try f.create()
        let disk = try f.makeDisk("d.img", size: 1 << 20, seed: 1)
        var ids: [String] = []
        for day in 0..<6 {
            try writeAt(disk, 0, [UInt8(day)])
            ids.append(try vault.backup(BackupRequest(machine: "web01", disks: [("os", .path(disk))],
                                                      time: Timestamp.parse("2026-01-0\(day + 1)T12:00:00Z"))).point)
        }
        _ = try vault.backup(BackupRequest(machine: "other", disks: [("os", .path(disk))]))
        try vault.setPolicy(RetentionPolicy(keepLast: 2), machine: "web01")
        try vault.protect(try vault.point("web01@" + ids[0].prefix(10)), until: nil)
        let dry = try vault.prune(dryRun: true, now: Timestamp.parse("2026-02-01T00:00:00Z")!)
        #expect(dry.removed == 3)
        #expect(dry.machinesWithoutPolicy == ["other"])
        #expect(try vault.points(machine: "web01").count == 6)
        let real = try vault.prune(machine: "web01", dryRun: false, now: Timestamp.parse("2026-02-01T00:00:00Z")!)
        #expect(real.removed == 3)
        #expect(Set(try vault.points(machine: "web01").map(\.id)) == Set([ids[0], ids[4], ids[5]]))
        #expect(try vault.points(machine: "other").count == 1)
        // The kept points still restore; check passes (the removed points' chunks await gc).
        let out = f.dir.file("out.img")
        _ = try vault.restore(point: try vault.point("web01"), disk: "os", to: out)
        #expect(try sha256(file: out) == sha256(file: disk))
        #expect(try vault.check(readData: true).ok)
        #expect(try vault.policy(machine: "web01") == RetentionPolicy(keepLast: 2))
        try vault.setPolicy(RetentionPolicy(keepDaily: 7), machine: "web01", now: Date().addingTimeInterval(5))
        #expect(try vault.policy(machine: "web01") == RetentionPolicy(keepDaily: 7))
    }

    /// A policy that is damaged, edited or foreign (a count or duration no rule can use) stops
    /// prune: read as it stands, `keepWithin: "7D"` or `keepLast: -1` kept nothing and every
    /// point was removed.
    @Test func aDamagedPolicyStopsPruneAndKeepsEveryPoint() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        let vault = try f.create()
        let disk = try f.makeDisk("d.img", size: 1 << 20, seed: 2)
        for day in 0..<3 {
            try writeAt(disk, 0, [UInt8(day)])
            _ = try vault.backup(BackupRequest(machine: "web01", disks: [("os", .path(disk))],
                                               time: Timestamp.parse("2026-01-0\(day + 1)T12:00:00Z")))
        }
        try vault.setPolicy(RetentionPolicy(keepLast: 2), machine: "web01")
        let name = try #require(try vault.store.list(prefix: "policies/web01/").first?.name)
        let now = Timestamp.parse("2026-02-01T00:00:00Z")!
        for content in [#"{"keepWithin":"7D"}"#, #"{"keepLast":-1}"#, #"{"keepLast":3}"#, "not json"] {
            try vault.store.put(name, Array(content.utf8))
            #expect(throws: VaultError.self) { try vault.policy(machine: "web01") }
            #expect(throws: VaultError.self) { try vault.prune(machine: "web01", dryRun: false, now: now) }
            #expect(try vault.points(machine: "web01").count == 3)
        }
        // A sound policy of a later version, with a rule this one does not know: not applied
        // without it.
        let later = Array(#"{"keepLast":1,"keepQuarterly":4}"#.utf8)
        let laterName = "policies/web01/99990101000000-" + ChunkID.sha256(later).hex.prefix(16)
        try vault.store.put(laterName, later)
        #expect { try vault.policy(machine: "web01") } throws: { error in
            "\(error)".contains("keepQuarterly")
        }
        #expect(throws: VaultError.self) { try vault.prune(machine: "web01", dryRun: false, now: now) }
        #expect(try vault.points(machine: "web01").count == 3)
        try vault.store.delete(laterName)
        // Written again through setPolicy, it is read and applied.
        try vault.setPolicy(RetentionPolicy(keepLast: 2), machine: "web01", now: Date().addingTimeInterval(5))
        #expect(try vault.prune(machine: "web01", dryRun: false, now: now).removed == 1)
    }

    /// A hold placed while a prune of its point finishes: prune has written its marker and found
    /// no hold; then, between the holder's two reads, it deletes the manifest and its marker. The
    /// holder must fail (it read the manifest first and the marker last, and succeeded on a point
    /// that was gone).
    @Test func aHoldFailsOnAPointWhosePruneFinishesMeanwhile() throws {
        let f = Fixture()
        defer { f.dir.remove() }
        _ = try f.create()
        let disk = try f.makeDisk("d.img", size: 1 << 20, seed: 3)
        let local = LocalDirectoryStore(root: f.vaultPath)
        let store = HookedStore(local)
        let vault = try Vault.open(store: store, stateDirectory: f.state)
        let id = try vault.backup(BackupRequest(machine: "web01", disks: [("os", .path(disk))])).point
        let point = try vault.point("web01@" + id.prefix(12))
        let marker = Vault.pruningMarker(machine: "web01", id: point.id)
        let manifest = RecoveryPoint.objectName(machine: "web01", id: point.id)
        try local.put(marker, [])
        store.hook.withLock {
            $0 = (marker, { () throws(ObjectStoreError) in
                try local.delete(manifest)
                try local.delete(marker)
            })
        }
        #expect(throws: VaultError.self) { try vault.hold(point, holder: "sandbox.t.h", purpose: "sandbox t") }
        #expect(try vault.holds(machine: "web01").isEmpty)
    }
}

/// Forwards to a local store; the first listing of `hook`'s prefix runs its action first (another
/// process acting at that moment); puts of names under `refusing` fail (a full disk, for example
/// when the manifest is written after every pack is up).
final class HookedStore: ObjectStore {
    let base: LocalDirectoryStore
    let refusing: String?
    let hook = Mutex<(prefix: String, action: @Sendable () throws(ObjectStoreError) -> Void)?>(nil)
    init(_ base: LocalDirectoryStore, refusingPutsUnder refusing: String? = nil) {
        self.base = base
        self.refusing = refusing
    }
    var location: String { base.location }
    func put(_ name: String, _ bytes: UnsafeRawBufferPointer) throws(ObjectStoreError) {
        if let refusing, name.hasPrefix(refusing) { throw .failed(SystemError("write", path: name, errno: ENOSPC)) }
        try base.put(name, bytes)
    }
    func putIfAbsent(_ name: String, _ bytes: UnsafeRawBufferPointer) throws(ObjectStoreError) -> Bool { try base.putIfAbsent(name, bytes) }
    func get(_ name: String) throws(ObjectStoreError) -> [UInt8] { try base.get(name) }
    func read(_ name: String, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(ObjectStoreError) {
        try base.read(name, at: offset, into: buffer)
    }
    func readAvailable(_ name: String, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, bypassCache: Bool) throws(ObjectStoreError) -> Int {
        try base.readAvailable(name, at: offset, into: buffer, bypassCache: bypassCache)
    }
    func size(_ name: String) throws(ObjectStoreError) -> UInt64? { try base.size(name) }
    func list(prefix: String) throws(ObjectStoreError) -> [ObjectInfo] {
        let action = hook.withLock { pending -> (@Sendable () throws(ObjectStoreError) -> Void)? in
            guard let p = pending, prefix == p.prefix else { return nil }
            pending = nil
            return p.action
        }
        try action?()
        return try base.list(prefix: prefix)
    }
    func delete(_ name: String) throws(ObjectStoreError) { try base.delete(name) }
    func deleteIfUnchanged(_ name: String, _ expected: [UInt8]) throws(ObjectStoreError) -> Bool { try base.deleteIfUnchanged(name, expected) }
}
