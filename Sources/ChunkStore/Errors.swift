import ObjectStore
import SystemIO

public enum ChunkStoreError: LifeboatError {
    case missingChunk(ChunkID)
    case damagedChunk(ChunkID, pack: String, offset: UInt32, reason: String)
    case badPack(String, String)
    case badIndex(String, String)
    case store(ObjectStoreError)
    case cache(SystemError)

    public var description: String {
        switch self {
        case .missingChunk(let id): return "chunk \(id.short) is not in any pack of the vault"
        case .damagedChunk(let id, let pack, let offset, let reason):
            return "chunk \(id.short) in \(pack) at offset \(offset) is damaged: \(reason)"
        case .badPack(let pack, let reason): return "pack \(pack) is damaged: \(reason)"
        case .badIndex(let name, let reason): return "index object \(name) is damaged: \(reason)"
        case .store(let error): return error.description
        case .cache(let error): return "chunk location cache: \(error.description)"
        }
    }

    public var kind: FailureKind {
        switch self {
        case .missingChunk, .damagedChunk, .badPack, .badIndex: return .damaged
        case .store(let error): return error.kind
        case .cache(let error): return error.kind
        }
    }
}
