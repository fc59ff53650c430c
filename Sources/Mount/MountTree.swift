import Foundation
import Vault

/// What a path in the mount is. The tree (docs/guide.md, "Mounting"):
///
///     machines/<machine>/<point time>/disks/<disk>.img   the raw disk
///     machines/<machine>/<point time>/disks/<disk>.vhd   the same as a fixed VHD
///     machines/<machine>/<point time>/disks/<disk>.files/<volume>/...   the files inside (GuestFiles)
///     machines/<machine>/<point time>/point.json         the point's metadata
///     machines/<machine>/latest -> <point time>
///     by-id/<point id> -> ../machines/<machine>/<point time>
enum MountNode {
    case root
    case machines
    case machine(String, [(name: String, point: RecoveryPoint)])
    case point(RecoveryPoint)
    case disks(RecoveryPoint)
    case disk(RecoveryPoint, PointDisk, vhd: Bool)
    /// `<disk>.files` and below: the volumes of the disk, then paths inside one.
    case files(RecoveryPoint, PointDisk, rest: [String])
    case pointJSON(RecoveryPoint, [UInt8])
    case link(String, time: Date)
    case byID

    static func resolve(_ path: String, in snapshot: PointCatalog.Snapshot) -> MountNode? {
        let parts = path.split(separator: "/", omittingEmptySubsequences: true).map(String.init)
        guard let first = parts.first else { return .root }
        switch first {
        case "machines":
            guard parts.count >= 2 else { return .machines }
            guard let points = snapshot.machines[parts[1]] else { return nil }
            guard parts.count >= 3 else { return .machine(parts[1], points) }
            if parts[2] == "latest" {
                guard parts.count == 3, let last = points.last else { return nil }
                return .link(last.name, time: last.point.date)
            }
            guard let entry = points.first(where: { $0.name == parts[2] }) else { return nil }
            let point = entry.point
            if parts.count == 3 { return .point(point) }
            switch parts[3] {
            case "point.json":
                return parts.count == 4 ? .pointJSON(point, pointJSON(point)) : nil
            case "disks":
                if parts.count == 4 { return .disks(point) }
                let name = parts[4]
                for disk in point.disks {
                    if name == disk.name + ".files" { return .files(point, disk, rest: Array(parts[5...])) }
                }
                guard parts.count == 5 else { return nil }
                for disk in point.disks {
                    if name == disk.name + ".img" { return .disk(point, disk, vhd: false) }
                    if name == disk.name + ".vhd" { return .disk(point, disk, vhd: true) }
                }
                return nil
            default:
                return nil
            }
        case "by-id":
            guard parts.count >= 2 else { return .byID }
            guard parts.count == 2, let point = snapshot.byID[parts[1]],
                  let entry = snapshot.machines[point.machine]?.first(where: { $0.point.id == point.id }) else { return nil }
            return .link("../machines/\(point.machine)/\(entry.name)", time: point.date)
        default:
            return nil
        }
    }

    /// Names in a directory node.
    func children(in snapshot: PointCatalog.Snapshot) -> [String]? {
        switch self {
        case .root: return ["machines", "by-id"]
        case .machines: return snapshot.machines.keys.sorted()
        case .machine(_, let points): return points.map(\.name) + (points.isEmpty ? [] : ["latest"])
        case .point: return ["disks", "point.json"]
        case .disks(let point): return point.disks.flatMap { [$0.name + ".img", $0.name + ".vhd", $0.name + ".files"] }
        case .byID: return snapshot.byID.keys.sorted()
        default: return nil
        }
    }

    static func pointJSON(_ point: RecoveryPoint) -> [UInt8] {
        struct Shown: Encodable {
            var id: String
            var point: RecoveryPoint
        }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        return Array((try? encoder.encode(Shown(id: point.id, point: point))) ?? Data()) + [10]
    }
}
