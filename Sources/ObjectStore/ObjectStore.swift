import SystemIO

/// An object in a store listing.
public struct ObjectInfo: Sendable, Hashable {
    public let name: String
    public let size: UInt64
    /// When the object was written (S3: LastModified), seconds since 1970.
    public let modified: Double

    public init(name: String, size: UInt64, modified: Double = 0) {
        self.name = name
        self.size = size
        self.modified = modified
    }
}

public enum ObjectStoreError: LifeboatError {
    case notFound(name: String, store: String)
    case alreadyExists(name: String, store: String)
    case invalidName(String)
    case shortRead(name: String, offset: UInt64, wanted: Int, got: Int)
    case failed(SystemError)

    public var description: String {
        switch self {
        case .notFound(let name, let store): return "object \(name) is missing from \(store)"
        case .alreadyExists(let name, let store): return "object \(name) already exists in \(store)"
        case .invalidName(let name): return "invalid object name \"\(name)\""
        case .shortRead(let name, let offset, let wanted, let got):
            return "object \(name) ends early: wanted \(wanted) bytes at offset \(offset), found \(got)"
        case .failed(let error): return error.description
        }
    }

    public var kind: FailureKind {
        switch self {
        case .notFound: return .notFound
        case .alreadyExists: return .busy
        case .invalidName: return .usage
        case .shortRead: return .damaged
        case .failed(let error): return error.kind
        }
    }
}

/// Immutable named objects: the only interface the layers above have to storage.
///
/// Names are relative paths of `[A-Za-z0-9._-]` segments joined by "/". Nothing above relies on
/// rename, on directories, or on a listing showing an object the moment it was written, so the
/// same code runs on a local directory and on S3-compatible storage.
public protocol ObjectStore: Sendable {
    /// Human-readable location for messages.
    var location: String { get }

    /// Stores an object durably: when this returns, the object survives a power cut.
    /// An existing object of the same name is replaced (callers only do that with identical content).
    func put(_ name: String, _ bytes: UnsafeRawBufferPointer) throws(ObjectStoreError)

    /// Stores an object only if none of that name exists; returns false if one does.
    func putIfAbsent(_ name: String, _ bytes: UnsafeRawBufferPointer) throws(ObjectStoreError) -> Bool

    /// The whole object.
    func get(_ name: String) throws(ObjectStoreError) -> [UInt8]

    /// Exactly `buffer.count` bytes at `offset`; fewer is an error.
    func read(_ name: String, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(ObjectStoreError)

    /// Up to `buffer.count` bytes at `offset`; fewer only where the object ends. With
    /// `bypassCache` (large reads of data not read again soon) a backend may skip its caches.
    func readAvailable(_ name: String, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                       bypassCache: Bool) throws(ObjectStoreError) -> Int

    /// Size of an object, or nil if it does not exist.
    func size(_ name: String) throws(ObjectStoreError) -> UInt64?

    /// All objects whose name starts with `prefix`, in no particular order.
    func list(prefix: String) throws(ObjectStoreError) -> [ObjectInfo]

    /// Removes an object; removing a missing object is not an error.
    func delete(_ name: String) throws(ObjectStoreError)

    /// Removes an object only if it still holds `expected`, atomically; false if it holds
    /// something else or is missing. (Two takers of one stale lock must not remove the lock one
    /// of them has just created. S3 offers it as a conditional delete, If-Match on the ETag.)
    func deleteIfUnchanged(_ name: String, _ expected: [UInt8]) throws(ObjectStoreError) -> Bool
}

extension ObjectStore {
    public func put(_ name: String, _ bytes: [UInt8]) throws(ObjectStoreError) {
        try bytes.withBytes { (raw) throws(ObjectStoreError) in try put(name, raw) }
    }

    public func putIfAbsent(_ name: String, _ bytes: [UInt8]) throws(ObjectStoreError) -> Bool {
        try bytes.withBytes { (raw) throws(ObjectStoreError) in try putIfAbsent(name, raw) }
    }

    public func read(_ name: String, at offset: UInt64, count: Int) throws(ObjectStoreError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        try bytes.withMutableBytes { (raw) throws(ObjectStoreError) in try read(name, at: offset, into: raw) }
        return bytes
    }

    public func exists(_ name: String) throws(ObjectStoreError) -> Bool {
        try size(name) != nil
    }
}

/// Checks an object name against the allowed alphabet, so a name can never escape the store.
public func validateObjectName(_ name: String) throws(ObjectStoreError) {
    guard !name.isEmpty, !name.hasPrefix("/"), !name.hasSuffix("/") else { throw .invalidName(name) }
    for segment in name.split(separator: "/", omittingEmptySubsequences: false) {
        guard !segment.isEmpty, segment != ".", segment != "..", !segment.hasPrefix(".") else {
            throw .invalidName(name)
        }
        for c in segment.utf8 {
            let ok = (c >= 48 && c <= 57) || (c >= 65 && c <= 90) || (c >= 97 && c <= 122) || c == 46 || c == 95 || c == 45
            guard ok else { throw .invalidName(name) }
        }
    }
}
