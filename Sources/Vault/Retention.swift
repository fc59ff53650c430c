import ChunkStore
import Foundation
import ObjectStore
import SystemIO

/// How many recovery points of a machine to keep (docs/guide.md, "Retention").
public struct RetentionPolicy: Codable, Sendable, Equatable {
    public var keepLast: Int?
    public var keepHourly: Int?
    public var keepDaily: Int?
    public var keepWeekly: Int?
    public var keepMonthly: Int?
    public var keepYearly: Int?
    /// Keep every point younger than this (e.g. "36h", "7d", "2w", "6m", "1y").
    public var keepWithin: String?

    public init(keepLast: Int? = nil, keepHourly: Int? = nil, keepDaily: Int? = nil, keepWeekly: Int? = nil,
                keepMonthly: Int? = nil, keepYearly: Int? = nil, keepWithin: String? = nil) {
        self.keepLast = keepLast
        self.keepHourly = keepHourly
        self.keepDaily = keepDaily
        self.keepWeekly = keepWeekly
        self.keepMonthly = keepMonthly
        self.keepYearly = keepYearly
        self.keepWithin = keepWithin
    }

    /// The decoder's keys, listed so that a stored policy's other keys can be found.
    enum CodingKeys: String, CodingKey, CaseIterable {
        case keepLast, keepHourly, keepDaily, keepWeekly, keepMonthly, keepYearly, keepWithin
    }

    /// The rules this version applies, as they are named in a stored policy.
    static let ruleNames = Set(CodingKeys.allCases.map(\.stringValue))

    public var isEmpty: Bool {
        [keepLast, keepHourly, keepDaily, keepWeekly, keepMonthly, keepYearly].allSatisfy { ($0 ?? 0) == 0 } && keepWithin == nil
    }

    /// "36h", "7d", "2w", "6m" (31 days), "1y" (365 days) in seconds, as borg reads them
    /// (and "30s" for short grace periods).
    public static func seconds(_ duration: String) -> TimeInterval? {
        guard let unit = duration.last, let n = Double(duration.dropLast()), n > 0 else { return nil }
        let hours: Double
        switch unit {
        case "s": hours = 1.0 / 3600
        case "H", "h": hours = 1
        case "d": hours = 24
        case "w": hours = 24 * 7
        case "m": hours = 24 * 31
        case "y": hours = 24 * 365
        default: return nil
        }
        return n * hours * 3600
    }

    public func validate() throws(VaultError) {
        for value in [keepLast, keepHourly, keepDaily, keepWeekly, keepMonthly, keepYearly] {
            if let value, value < 0 { throw .invalidArgument("retention counts cannot be negative") }
        }
        if let keepWithin, RetentionPolicy.seconds(keepWithin) == nil {
            throw .invalidArgument("cannot read duration \"\(keepWithin)\": use a number and H, d, w, m or y, e.g. 7d")
        }
    }
}

/// Whether a point survives a prune, and the rule that decided.
public struct PruneDecision: Codable, Sendable {
    public var machine: String
    public var point: String
    public var time: String
    public var keep: Bool
    /// e.g. "daily #2", "within", "protected", "keep-until 2027-01-01T00:00:00Z"; empty when removed.
    public var reason: String
}

/// Retention as borg 1.2 and Proxmox apply it: keep-within first, then keep-last, hourly, daily,
/// weekly (ISO weeks), monthly and yearly, each walking the points newest first and keeping
/// the newest point of each period it has not seen yet; a point already kept by an earlier rule
/// marks its period as seen but does not count again. When a rule runs out of points before its
/// count is reached, it keeps the oldest point too. Periods are taken in UTC.
public enum Retention {
    public static func plan(_ points: [RecoveryPoint], policy: RetentionPolicy, now: Date,
                            protected: [String: Date?] = [:], held: [String: String] = [:]) -> [PruneDecision] {
        var reasons: [String: String] = [:]
        let newestFirst = Array(RecoveryPoint.chronological(points).reversed())

        if let within = policy.keepWithin, let seconds = RetentionPolicy.seconds(within) {
            let target = now.addingTimeInterval(-seconds)
            for p in newestFirst where p.date > target { reasons[p.id] = "within" }
        }
        let rules: [(String, Int?, (DateComponents) -> String)] = [
            ("last", policy.keepLast, { c in "\(c.year!)-\(c.month!)-\(c.day!) \(c.hour!):\(c.minute!):\(c.second!)" }),
            ("hourly", policy.keepHourly, { c in "\(c.year!)-\(c.month!)-\(c.day!) \(c.hour!)" }),
            ("daily", policy.keepDaily, { c in "\(c.year!)-\(c.month!)-\(c.day!)" }),
            ("weekly", policy.keepWeekly, { c in "\(c.yearForWeekOfYear!)-\(c.weekOfYear!)" }),
            ("monthly", policy.keepMonthly, { c in "\(c.year!)-\(c.month!)" }),
            ("yearly", policy.keepYearly, { c in "\(c.year!)" }),
        ]
        var calendar = Calendar(identifier: .iso8601)
        calendar.timeZone = TimeZone(identifier: "UTC")!
        let components = newestFirst.map {
            calendar.dateComponents([.year, .month, .day, .hour, .minute, .second, .yearForWeekOfYear, .weekOfYear], from: $0.date)
        }
        for (rule, count, period) in rules {
            guard let n = count, n > 0 else { continue }
            var last: String? = nil
            var kept = 0
            var lastSeen: Int? = nil
            for (i, p) in newestFirst.enumerated() {
                lastSeen = i
                let key = period(components[i])
                if key != last {
                    last = key
                    if reasons[p.id] == nil {
                        kept += 1
                        reasons[p.id] = "\(rule) #\(kept)"
                        if kept == n { break }
                    }
                }
            }
            if let i = lastSeen, kept < n, reasons[newestFirst[i].id] == nil {
                kept += 1
                reasons[newestFirst[i].id] = "\(rule)[oldest] #\(kept)"
            }
        }
        for p in newestFirst {
            if let entry = protected[p.id] {
                if let until = entry {
                    if until > now { reasons[p.id] = "protected until \(Timestamp.format(until))" }
                } else {
                    reasons[p.id] = "protected"
                }
            }
            if let until = p.keepUntil.flatMap(Timestamp.parse), until > now, reasons[p.id] == nil {
                reasons[p.id] = "keep-until \(p.keepUntil!)"
            }
            if let holder = held[p.id] { reasons[p.id] = "held by \(holder)" }
        }
        return newestFirst.map {
            PruneDecision(machine: $0.machine, point: $0.id, time: $0.time, keep: reasons[$0.id] != nil, reason: reasons[$0.id] ?? "")
        }
    }
}

public struct PruneReport: Codable, Sendable {
    public var decisions: [PruneDecision]
    public var removed: Int
    public var kept: Int
    public var dryRun: Bool
    /// Machines without a policy: all their points are kept.
    public var machinesWithoutPolicy: [String]
}

extension Vault {
    static let policyPrefix = "policies/"
    static let protectionPrefix = "protections/"

    /// Stores a machine's policy. Policies are immutable objects named by time; the newest wins.
    public func setPolicy(_ policy: RetentionPolicy, machine: String, now: Date = Date()) throws(VaultError) {
        try validateName(machine, what: "machine")
        try policy.validate()
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let bytes = Array((try? encoder.encode(policy)) ?? Data())
        let stamp = Timestamp.format(now).filter { $0.isNumber }
        let name = Vault.policyPrefix + machine + "/" + stamp + "-" + ChunkID.sha256(bytes).hex.prefix(16)
        do {
            try store.put(name, bytes)
        } catch { throw .store(error) }
    }

    public func policy(machine: String) throws(VaultError) -> RetentionPolicy? {
        let listing: [ObjectInfo]
        do {
            listing = try store.list(prefix: Vault.policyPrefix + machine + "/")
        } catch { throw .store(error) }
        guard let newest = listing.map(\.name).max() else { return nil }
        let bytes: [UInt8]
        do {
            bytes = try store.get(newest)
        } catch { throw .store(error) }
        // Prune acts on what it reads here, and a policy read wrong removes points: a count that
        // lost a digit, or a rule nothing can apply (which keeps nothing). Its name carries its
        // checksum (setPolicy), and what is read must be a policy setPolicy would have written.
        let remedy = "prune stops; set the machine's policy again with `lifeboat policy set`"
        guard newest.hasSuffix("-" + ChunkID.sha256(bytes).hex.prefix(16)) else {
            throw .damagedObject(newest, "its content does not match the checksum in its name; \(remedy)")
        }
        guard let policy = try? JSONDecoder().decode(RetentionPolicy.self, from: Data(bytes)) else {
            throw .damagedObject(newest, "not a retention policy; \(remedy)")
        }
        // A rule this version does not know (written by a later one) would be dropped by the
        // decoder, and the points only it keeps pruned.
        let keys = ((try? JSONSerialization.jsonObject(with: Data(bytes))) as? [String: Any]).map { Set($0.keys) } ?? []
        let unknown = keys.subtracting(RetentionPolicy.ruleNames).sorted()
        guard unknown.isEmpty else {
            throw .damagedObject(newest, "it has rules this lifeboat does not know (\(unknown.joined(separator: ", "))): "
                                 + "prune stops; use the lifeboat that set it, or set the policy again")
        }
        do {
            try policy.validate()
        } catch {
            throw .damagedObject(newest, "\(error.description); \(remedy)")
        }
        return policy
    }

    /// Protects a point from prune, for ever or until a date.
    public func protect(_ point: RecoveryPoint, until: Date?) throws(VaultError) {
        struct Protection: Codable { var until: String? }
        let bytes = Array((try? JSONEncoder().encode(Protection(until: until.map(Timestamp.format)))) ?? Data())
        do {
            try store.put(Vault.protectionPrefix + point.machine + "/" + point.id, bytes)
        } catch { throw .store(error) }
    }

    public func unprotect(_ point: RecoveryPoint) throws(VaultError) {
        do {
            try store.delete(Vault.protectionPrefix + point.machine + "/" + point.id)
        } catch { throw .store(error) }
    }

    /// Protected points of a machine: id -> until (nil: for ever).
    public func protections(machine: String) throws(VaultError) -> [String: Date?] {
        struct Protection: Codable { var until: String? }
        var result: [String: Date?] = [:]
        do {
            for object in try store.list(prefix: Vault.protectionPrefix + machine + "/") {
                let id = String(object.name.split(separator: "/").last ?? "")
                let protection = try? JSONDecoder().decode(Protection.self, from: Data(try store.get(object.name)))
                result[id] = protection?.until.flatMap(Timestamp.parse)
            }
        } catch { throw .store(error) }
        return result
    }

    /// Applies the machines' policies: removes the manifests of the points no rule keeps.
    /// The chunks they held are freed by garbage collection.
    public func prune(machine: String? = nil, dryRun: Bool, now: Date = Date()) throws(VaultError) -> PruneReport {
        if let machine { try validateName(machine, what: "machine") }
        let all = try points(machine: machine)
        var byMachine: [String: [RecoveryPoint]] = [:]
        for p in all { byMachine[p.machine, default: []].append(p) }
        var decisions: [PruneDecision] = []
        var withoutPolicy: [String] = []
        for (name, points) in byMachine.sorted(by: { $0.key < $1.key }) {
            guard let policy = try self.policy(machine: name), !policy.isEmpty else {
                withoutPolicy.append(name)
                decisions += points.reversed().map { PruneDecision(machine: name, point: $0.id, time: $0.time, keep: true, reason: "no policy") }
                continue
            }
            var plan = Retention.plan(points, policy: policy, now: now, protected: try protections(machine: name),
                                      held: try holds(machine: name))
            if !dryRun {
                for (i, decision) in plan.enumerated() where !decision.keep {
                    if Cancellation.requested { throw .interrupted }
                    // Marker first, then this point's holds once more, then the deletion: a
                    // sandbox placing a hold since the plan either is seen here or sees the marker.
                    let marker = Vault.pruningMarker(machine: name, id: decision.point)
                    do {
                        try store.put(marker, [])
                    } catch { throw .store(error) }
                    if let holder = try holder(machine: name, point: decision.point) {
                        plan[i] = PruneDecision(machine: name, point: decision.point, time: decision.time, keep: true,
                                                reason: "held by \(holder)")
                    } else {
                        do {
                            try store.delete(RecoveryPoint.objectName(machine: name, id: decision.point))
                        } catch { throw .store(error) }
                    }
                    do {
                        try store.delete(marker)
                    } catch { throw .store(error) }
                }
            }
            decisions += plan
        }
        let removed = decisions.filter { !$0.keep }.count
        return PruneReport(decisions: decisions, removed: removed, kept: decisions.count - removed, dryRun: dryRun,
                           machinesWithoutPolicy: withoutPolicy)
    }
}
