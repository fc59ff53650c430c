import ChunkStore
import Foundation
import ObjectStore
import SystemIO

/// Holds keep a point from prune while something outside the vault depends on it: a sandbox
/// over the point, on some host. Unlike a protection (the operator's), a hold belongs to its
/// holder and goes away with it. Objects: `holds/<machine>/<point id>/<holder>`.
extension Vault {
    static let holdPrefix = "holds/"

    /// Written by prune before it reads a point's holds and deletes it; a hold placed meanwhile
    /// sees it and fails (each side writes, then reads the other's object: one of them sees).
    static func pruningMarker(machine: String, id: String) -> String { gcPrefix + "pruning-" + machine + "-" + id }
    /// A marker older than this was left by a prune that died; it no longer stops holds.
    static let pruningMarkerLifetime: TimeInterval = 600

    public struct Hold: Codable, Sendable {
        public var holder: String
        public var host: String
        public var created: String
        public var purpose: String
    }

    /// Places a hold, then checks that the point is still there (a prune running at the same
    /// time reads holds again just before it deletes).
    public func hold(_ point: RecoveryPoint, holder: String, purpose: String) throws(VaultError) {
        try validateName(holder, what: "holder")
        let hold = Hold(holder: holder, host: hostName(), created: Timestamp.format(Date()), purpose: purpose)
        let bytes = Array((try? JSONEncoder().encode(hold)) ?? Data())
        do {
            try store.put(Vault.holdPrefix + point.machine + "/" + point.id + "/" + holder, bytes)
        } catch { throw .store(error) }
        // The marker first, the manifest last: prune deletes the manifest before its marker, so a
        // marker gone by the time it is read means the manifest's deletion (if any) is seen next.
        let present: Bool
        let pruning: Bool
        do {
            let marker = Vault.pruningMarker(machine: point.machine, id: point.id)
            pruning = try store.list(prefix: marker).contains {
                $0.name == marker && Date().timeIntervalSince1970 - $0.modified < Vault.pruningMarkerLifetime
            }
            present = try store.size(RecoveryPoint.objectName(machine: point.machine, id: point.id)) != nil
        } catch { throw .store(error) }
        if !present || pruning {
            try? store.delete(Vault.holdPrefix + point.machine + "/" + point.id + "/" + holder)
            throw .unknownPoint(point.label, present ? "it is being pruned" : "it was removed (pruned) just now")
        }
    }

    public func release(_ point: (machine: String, id: String), holder: String) throws(VaultError) {
        do {
            try store.delete(Vault.holdPrefix + point.machine + "/" + point.id + "/" + holder)
        } catch { throw .store(error) }
    }

    /// Removes every hold of `holder`, on any point; returns how many there were.
    public func releaseAll(holder: String) throws(VaultError) -> Int {
        var released = 0
        do {
            for object in try store.list(prefix: Vault.holdPrefix) where object.name.split(separator: "/").last.map(String.init) == holder {
                try store.delete(object.name)
                released += 1
            }
        } catch { throw .store(error) }
        return released
    }

    /// Held points of a machine: point id -> who holds it ("sandbox test1 on host h").
    public func holds(machine: String) throws(VaultError) -> [String: String] {
        try holds(under: Vault.holdPrefix + machine + "/")
    }

    /// Who holds one point, as `holds(machine:)` says it; nil when nothing does.
    func holder(machine: String, point: String) throws(VaultError) -> String? {
        try holds(under: Vault.holdPrefix + machine + "/" + point + "/")[point]
    }

    private func holds(under prefix: String) throws(VaultError) -> [String: String] {
        var result: [String: String] = [:]
        do {
            for object in try store.list(prefix: prefix) {
                let parts = object.name.split(separator: "/")
                guard parts.count == 4 else { continue }
                let description: String
                if let bytes = try? store.get(object.name), let hold = try? JSONDecoder().decode(Hold.self, from: Data(bytes)) {
                    description = "\(hold.purpose) on \(hold.host)"
                } else {
                    description = String(parts[3])  // unreadable: still a hold
                }
                result[String(parts[2])] = result[String(parts[2])].map { $0 + ", " + description } ?? description
            }
        } catch { throw .store(error) }
        return result
    }
}
