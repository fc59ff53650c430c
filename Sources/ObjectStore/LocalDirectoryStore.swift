import Glibc
import SystemIO

/// An object store in a local directory: one file per object.
///
/// A put writes a temporary file beside the final name, flushes it, renames it into place and
/// flushes the directory, so an object is either absent or complete. Temporary files start with
/// ".tmp-" and are never listed; garbage collection removes old ones.
public struct LocalDirectoryStore: ObjectStore {
    public let root: String

    public init(root: String) {
        self.root = root
    }

    public var location: String { root }

    private func path(_ name: String) throws(ObjectStoreError) -> String {
        try validateObjectName(name)
        return root + "/" + name
    }

    private func writeTemporary(for path: String, _ bytes: UnsafeRawBufferPointer) throws(ObjectStoreError) -> String {
        let directory = FileSystem.parentDirectory(of: path)
        do {
            try FileSystem.createDirectories(directory)
        } catch { throw .failed(error) }
        let temporary = directory + "/.tmp-" + randomSuffix()
        do throws(SystemError) {
            let file = try UncachedFile(temporary, .createExclusive(permissions: 0o644))
            defer { file.close() }
            do throws(SystemError) {
                // Objects are written once and read rarely soon after: skip the page cache.
                try file.write(bytes, at: 0)
                try file.buffered.sync()
            } catch {
                try? FileSystem.remove(temporary)
                throw error
            }
        } catch { throw .failed(error) }
        return temporary
    }

    public func put(_ name: String, _ bytes: UnsafeRawBufferPointer) throws(ObjectStoreError) {
        let target = try path(name)
        let temporary = try writeTemporary(for: target, bytes)
        do {
            try FileSystem.rename(temporary, to: target)
            try FileSystem.syncDirectory(FileSystem.parentDirectory(of: target))
        } catch {
            try? FileSystem.remove(temporary)
            throw .failed(error)
        }
    }

    public func putIfAbsent(_ name: String, _ bytes: UnsafeRawBufferPointer) throws(ObjectStoreError) -> Bool {
        let target = try path(name)
        let temporary = try writeTemporary(for: target, bytes)
        defer { try? FileSystem.remove(temporary) }
        // link(2) fails with EEXIST instead of replacing: an atomic create-if-absent.
        if link(temporary, target) != 0 {
            if errno == EEXIST { return false }
            throw .failed(SystemError("create", path: target))
        }
        do {
            try FileSystem.syncDirectory(FileSystem.parentDirectory(of: target))
        } catch { throw .failed(error) }
        return true
    }

    public func get(_ name: String) throws(ObjectStoreError) -> [UInt8] {
        let target = try path(name)
        do {
            let file = try SystemFile.open(target, .readOnly)
            defer { file.close() }
            let size = try file.size()
            let bytes = try file.readAll(count: Int(size))
            guard bytes.count == Int(size) else {
                throw ObjectStoreError.shortRead(name: name, offset: 0, wanted: Int(size), got: bytes.count)
            }
            return bytes
        } catch let error as SystemError {
            if error.errno == ENOENT { throw .notFound(name: name, store: root) }
            throw .failed(error)
        } catch let error as ObjectStoreError {
            throw error
        } catch {
            throw .invalidName(name)
        }
    }

    public func read(_ name: String, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(ObjectStoreError) {
        let n = try readAvailable(name, at: offset, into: buffer, bypassCache: false)
        guard n == buffer.count else {
            throw .shortRead(name: name, offset: offset, wanted: buffer.count, got: n)
        }
    }

    public func readAvailable(_ name: String, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                              bypassCache: Bool) throws(ObjectStoreError) -> Int {
        let target = try path(name)
        let file: SystemFile
        do {
            file = try SystemFile.open(target, .readOnly)
        } catch {
            if error.errno == ENOENT { throw .notFound(name: name, store: root) }
            throw .failed(error)
        }
        defer { file.close() }
        do {
            return bypassCache ? try file.readUncached(into: buffer, at: offset) : try file.read(into: buffer, at: offset)
        } catch { throw .failed(error) }
    }

    public func size(_ name: String) throws(ObjectStoreError) -> UInt64? {
        let target = try path(name)
        var st = stat()
        if stat(target, &st) != 0 {
            if errno == ENOENT || errno == ENOTDIR { return nil }
            throw .failed(SystemError("stat", path: target))
        }
        return UInt64(st.st_size)
    }

    public func list(prefix: String) throws(ObjectStoreError) -> [ObjectInfo] {
        // Walk only the directory the prefix lies in, then filter by the full prefix.
        let slash = prefix.lastIndex(of: "/")
        let directoryPart = slash.map { String(prefix[..<$0]) } ?? ""
        var results: [ObjectInfo] = []
        try walk(directoryPart, prefix: prefix, into: &results)
        return results
    }

    private func walk(_ relative: String, prefix: String, into results: inout [ObjectInfo]) throws(ObjectStoreError) {
        let directory = relative.isEmpty ? root : root + "/" + relative
        let names: [String]
        do {
            names = try FileSystem.list(directory)
        } catch {
            if error.errno == ENOENT || error.errno == ENOTDIR { return }
            throw .failed(error)
        }
        for name in names where !name.hasPrefix(".") {
            let child = relative.isEmpty ? name : relative + "/" + name
            // Prune subtrees that cannot match the prefix.
            if !child.hasPrefix(prefix) && !prefix.hasPrefix(child + "/") { continue }
            var st = stat()
            guard stat(root + "/" + child, &st) == 0 else {
                if errno == ENOENT { continue }  // removed since the directory was read
                throw .failed(SystemError("stat", path: root + "/" + child))
            }
            if (st.st_mode & S_IFMT) == S_IFDIR {
                try walk(child, prefix: prefix, into: &results)
            } else if (st.st_mode & S_IFMT) == S_IFREG && child.hasPrefix(prefix) {
                results.append(ObjectInfo(name: child, size: UInt64(st.st_size),
                                          modified: Double(st.st_mtim.tv_sec) + Double(st.st_mtim.tv_nsec) / 1e9))
            }
        }
    }

    /// The removal is durable when it returns: garbage collection orders its deletions.
    public func delete(_ name: String) throws(ObjectStoreError) {
        let target = try path(name)
        do {
            try FileSystem.remove(target)
            try FileSystem.syncDirectory(FileSystem.parentDirectory(of: target))
        } catch { throw .failed(error) }
    }
}

extension LocalDirectoryStore {
    /// Compare and delete under an exclusive flock of the directory's `.delete-lock`: every
    /// conditional delete of the directory takes turns, so none removes an object created after
    /// its comparison by a delete that ran between the two.
    public func deleteIfUnchanged(_ name: String, _ expected: [UInt8]) throws(ObjectStoreError) -> Bool {
        let target = try path(name)
        let directory = FileSystem.parentDirectory(of: target)
        // Read-only is enough for flock. Where the lock cannot be had (a filesystem without
        // flock, a guard file nobody here may create), compare and delete go on without it: the
        // race is then back to the moment between the two.
        let guardPath = directory + "/.delete-lock"
        let guardFile = (try? SystemFile.open(guardPath, .readOnly)) ?? (try? SystemFile.open(guardPath, .createOrOpen(permissions: 0o644)))
        defer { guardFile?.close() }   // closing releases the lock
        _ = try? guardFile?.lock(exclusive: true, wait: true)
        let found: [UInt8]
        do {
            found = try get(name)
        } catch {
            if case .notFound = error { return false }
            throw error
        }
        guard found == expected else { return false }
        do {
            try FileSystem.remove(target)
            try FileSystem.syncDirectory(directory)
        } catch { throw .failed(error) }
        return true
    }
}

func randomSuffix() -> String {
    var generator = SystemRandomNumberGenerator()
    return (0..<8).map { _ in UInt8.random(in: 0...255, using: &generator) }.hex
}
