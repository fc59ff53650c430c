import Foundation
import SystemIO
import Vault
import VirtualDisk

/// A place on a disk that may hold a filesystem: the whole disk, a partition, a logical volume.
public struct GuestVolume: Sendable {
    /// "p1" (partition 1), "vg0/root" (a logical volume), "disk" (a filesystem on the whole disk).
    public var name: String
    public var image: any DiskImage
    /// For listings: "GPT partition 1, 63.0 MiB", ...
    public var summary: String

    public init(name: String, image: any DiskImage, summary: String) {
        self.name = name
        self.image = image
        self.summary = summary
    }
}

public enum GuestVolumes {
    /// The volumes of a disk that hold a filesystem Lifeboat reads, and what was seen but
    /// skipped (damaged tables, unknown filesystems) as warnings.
    public static func find(in disk: any DiskImage) -> (volumes: [GuestVolume], warnings: [String]) {
        var candidates: [GuestVolume] = []
        var warnings: [String] = []
        do {
            let table = try PartitionTable.read(from: disk)
            warnings += table.warnings
            for p in table.partitions {
                candidates.append(GuestVolume(name: "p\(p.number)", image: p.image(on: disk),
                                              summary: "\(p.scheme.rawValue.uppercased()) partition \(p.number)"))
            }
        } catch {
            warnings.append("partition table: \(error.description)")
        }
        if candidates.isEmpty {
            candidates.append(GuestVolume(name: "disk", image: disk, summary: "whole disk"))
        }
        var volumes: [GuestVolume] = []
        for candidate in candidates {
            if LVM.probe(candidate.image) {
                do {
                    guard let group = try LVM.volumeGroup(on: candidate.image, name: candidate.name) else { continue }
                    for lv in group.logicalVolumes where lv.visible {
                        let name = "\(group.name)/\(lv.name)"
                        if let why = lv.unsupported {
                            warnings.append("LVM volume \(name) on \(candidate.name): \(why)")
                            continue
                        }
                        do {
                            let image = try group.image(of: lv, on: candidate.image)
                            if probe(image) != nil {
                                volumes.append(GuestVolume(name: name, image: image, summary: "LVM logical volume \(name) on \(candidate.name)"))
                            }
                        } catch {
                            warnings.append("LVM volume \(name) on \(candidate.name): \(error.description)")
                        }
                    }
                } catch {
                    warnings.append("LVM physical volume on \(candidate.name): \(error.description)")
                }
                continue
            }
            if probe(candidate.image) != nil { volumes.append(candidate) }
        }
        return (volumes, warnings)
    }

    /// The filesystem kind a volume holds, if Lifeboat can read it.
    public static func probe(_ image: any DiskImage) -> String? {
        if Ext4FileSystem.probe(image) { return "ext" }
        if FATFileSystem.probe(image) { return "fat" }
        return nil
    }

    /// Opens the filesystem on a volume.
    public static func open(_ volume: GuestVolume, label: String) throws(GuestFilesError) -> any GuestFileSystem {
        switch probe(volume.image) {
        case "ext": return try Ext4FileSystem(image: volume.image, volume: label)
        case "fat": return try FATFileSystem(volume.image, volume: label)
        default: throw .unsupported(volume: label, what: "the filesystem on \(volume.summary)")
        }
    }
}

/// A guest filesystem of a point, chosen by disk and volume names (either may be omitted when
/// there is only one).
public struct PointFiles: Sendable {
    public let point: RecoveryPoint
    public let disk: PointDisk
    public let volume: GuestVolume
    public let fs: any GuestFileSystem
    public let warnings: [String]

    /// "web01@latest:os:p2" names the point, the disk and the volume.
    public var label: String { "\(point.machine)@\(point.time):\(disk.name):\(volume.name)" }

    public static func open(vault: Vault, point: RecoveryPoint, disk diskName: String?, volume volumeName: String?,
                            cacheBytes: Int = 64 << 20) throws(GuestFilesError) -> PointFiles {
        let disk: PointDisk
        if let diskName {
            do {
                disk = try point.disk(diskName)
            } catch {
                throw .notFound(path: "disk \(diskName) of \(point.label) (it has: \(point.disks.map(\.name).joined(separator: ", ")))")
            }
        } else {
            guard point.disks.count == 1, let only = point.disks.first else {
                throw .ambiguous(what: "\(point.label) has several disks; name one", choices: point.disks.map(\.name))
            }
            disk = only
        }
        let reader = DiskReader(point: point, disk: disk, chunks: vault.chunks,
                                cache: ChunkCache(capacityBytes: cacheBytes, slotSize: vault.config.chunkSize))
        let (volumes, warnings) = GuestVolumes.find(in: reader)
        let volume: GuestVolume
        if let volumeName {
            guard let named = volumes.first(where: { $0.name == volumeName }) else {
                throw .notFound(path: "volume \(volumeName) on disk \(disk.name) (readable volumes: \(volumes.map(\.name).joined(separator: ", ")))")
            }
            volume = named
        } else {
            guard !volumes.isEmpty else {
                throw .unsupported(volume: "\(point.label) disk \(disk.name)", what: "finding a filesystem Lifeboat reads (ext2/3/4, FAT)" +
                                   (warnings.isEmpty ? "" : "; " + warnings.joined(separator: "; ")))
            }
            guard volumes.count == 1 else {
                throw .ambiguous(what: "disk \(disk.name) has several filesystems; name one", choices: volumes.map(\.name))
            }
            volume = volumes[0]
        }
        let fs = try GuestVolumes.open(volume, label: "\(point.machine)@\(point.time):\(disk.name):\(volume.name)")
        return PointFiles(point: point, disk: disk, volume: volume, fs: fs, warnings: warnings + fs.warnings)
    }
}
