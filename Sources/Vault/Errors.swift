import ChunkStore
import ObjectStore
import SystemIO

public enum VaultError: LifeboatError {
    case noVault(String)
    case foreignVault(String, String)
    case vaultExists(String)
    case unsupportedFormat(String, Int)
    case badConfig(String, String)
    case invalidName(String, what: String)
    case invalidArgument(String)
    case unknownMachine(String)
    case unknownPoint(String, String)
    case ambiguousPoint(String, [String])
    case unknownDisk(point: String, disk: String, known: [String])
    case badManifest(String, String)
    case damagedObject(String, String)
    case locked(machine: String, holder: String)
    case lockLost(object: String, why: String)
    case sourceShort(path: String, expected: UInt64, got: UInt64)
    case source(SystemError)
    case targetTooSmall(path: String, size: UInt64, needed: UInt64)
    case targetExists(String)
    case target(SystemError)
    case chunks(ChunkStoreError)
    case store(ObjectStoreError)
    case damagedPoint(point: String, disk: String, range: ClosedRange<UInt64>, cause: String)
    case interrupted

    public var description: String {
        switch self {
        case .noVault(let path): return "no vault at \(path) (create one with `lifeboat init`, or choose one with --vault or LIFEBOAT_VAULT)"
        case .foreignVault(let path, let why): return "\(path) is not a Lifeboat vault: \(why)"
        case .vaultExists(let path): return "a vault already exists at \(path)"
        case .unsupportedFormat(let path, let version): return "the vault at \(path) has format version \(version), which this lifeboat does not know; upgrade lifeboat"
        case .badConfig(let path, let why): return "the vault configuration at \(path) is damaged: \(why)"
        case .invalidName(let name, let what): return "invalid \(what) name \"\(name)\": use letters, digits, '.', '_' and '-', not starting with '.' or '-'"
        case .invalidArgument(let why): return why
        case .unknownMachine(let machine): return "no recovery points of machine \(machine) in the vault"
        case .unknownPoint(let spec, let why): return "no recovery point \(spec): \(why)"
        case .ambiguousPoint(let spec, let ids): return "recovery point \(spec) is ambiguous: it matches \(ids.joined(separator: ", "))"
        case .unknownDisk(let point, let disk, let known): return "point \(point) has no disk \(disk) (it has: \(known.joined(separator: ", ")))"
        case .badManifest(let name, let why): return "recovery point manifest \(name) is damaged: \(why)"
        case .damagedObject(let name, let why): return "vault object \(name) is damaged: \(why)"
        case .locked(let machine, let holder):
            if machine == "garbage collection" { return "garbage collection is already running (\(holder))" }
            return "machine \(machine) is being backed up by another process (\(holder)); try again when it has finished"
        case .lockLost(let object, let why) where object.hasPrefix("gc/"):
            return "the lock \(object) was lost (\(why)): another garbage collection may be running, so this one stopped before deleting anything more; run gc again"
        case .lockLost(let object, let why):
            return "the lock \(object) was lost (\(why)): garbage collection may have removed chunks this backup reused, so its point was not written; run the backup again"
        case .sourceShort(let path, let expected, let got): return "source \(path) ended at byte \(got) but was \(expected) bytes long when the backup started"
        case .source(let error): return "source: \(error.description)"
        case .targetTooSmall(let path, let size, let needed): return "target \(path) holds \(size) bytes, but the disk needs \(needed)"
        case .targetExists(let path): return "\(path) already exists; use --overwrite to replace it"
        case .target(let error): return "target: \(error.description)"
        case .chunks(let error): return error.description
        case .store(let error): return error.description
        case .damagedPoint(let point, let disk, let range, let cause):
            return "point \(point) disk \(disk) bytes \(range.lowerBound)-\(range.upperBound) are damaged: \(cause)"
        case .interrupted: return "interrupted"
        }
    }

    public var kind: FailureKind {
        switch self {
        case .noVault, .unknownMachine, .unknownPoint, .unknownDisk: return .notFound
        case .foreignVault, .unsupportedFormat, .invalidName, .invalidArgument, .ambiguousPoint, .vaultExists, .targetExists, .targetTooSmall: return .usage
        case .badConfig, .badManifest, .damagedObject, .damagedPoint, .sourceShort: return .damaged
        case .locked, .lockLost: return .busy
        case .source(let e), .target(let e): return e.kind
        case .chunks(let e): return e.kind
        case .store(let e): return e.kind
        case .interrupted: return .interrupted
        }
    }
}

/// Names of machines, disks and tags become object names and paths: a closed alphabet.
public func validateName(_ name: String, what: String) throws(VaultError) {
    guard !name.isEmpty, name.utf8.count <= 128, let first = name.utf8.first, first != 46, first != 45 else {
        throw .invalidName(name, what: what)
    }
    for c in name.utf8 {
        let ok = (c >= 48 && c <= 57) || (c >= 65 && c <= 90) || (c >= 97 && c <= 122) || c == 46 || c == 95 || c == 45
        guard ok else { throw .invalidName(name, what: what) }
    }
}
