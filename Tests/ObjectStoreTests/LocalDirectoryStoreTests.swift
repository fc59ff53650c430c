import Foundation
import ObjectStore
import SystemIO
import Testing
import TestSupport

@Suite struct LocalDirectoryStoreTests {
    @Test func putGetReadListDelete() throws {
        let dir = TemporaryDirectory("store")
        defer { dir.remove() }
        let store = LocalDirectoryStore(root: dir.path)
        let bytes = Array("hello, vault".utf8)
        try store.put("packs/ab/abcdef", bytes)
        try store.put("index/123", [1, 2, 3])
        #expect(try store.get("packs/ab/abcdef") == bytes)
        #expect(try store.read("packs/ab/abcdef", at: 7, count: 5) == Array("vault".utf8))
        #expect(try store.size("index/123") == 3)
        #expect(try store.size("index/none") == nil)
        #expect(try store.list(prefix: "packs/").map(\.name) == ["packs/ab/abcdef"])
        #expect(Set(try store.list(prefix: "").map(\.name)) == ["packs/ab/abcdef", "index/123"])
        #expect(try store.list(prefix: "packs/ab/abc").count == 1)
        #expect(try store.list(prefix: "nothing/").isEmpty)
        try store.delete("index/123")
        try store.delete("index/123")  // deleting twice is fine
        #expect(try store.size("index/123") == nil)
        // No temporary files are left behind.
        #expect(try FileSystem.list(dir.path + "/packs/ab") == ["abcdef"])
    }

    @Test func putIfAbsentCreatesOnce() throws {
        let dir = TemporaryDirectory("store")
        defer { dir.remove() }
        let store = LocalDirectoryStore(root: dir.path)
        #expect(try store.putIfAbsent("locks/web01", [1]))
        #expect(try !store.putIfAbsent("locks/web01", [2]))
        #expect(try store.get("locks/web01") == [1])
    }

    @Test func deleteIfUnchangedDeletesOnlyWhatWasSeen() throws {
        let dir = TemporaryDirectory("store")
        defer { dir.remove() }
        let store = LocalDirectoryStore(root: dir.path)
        try store.put("locks/web01", [1])
        #expect(try !store.deleteIfUnchanged("locks/web01", [2]))
        #expect(try store.get("locks/web01") == [1])
        #expect(try store.deleteIfUnchanged("locks/web01", [1]))
        #expect(try store.size("locks/web01") == nil)
        #expect(try !store.deleteIfUnchanged("locks/web01", [1]))
        #expect(try store.list(prefix: "locks/").isEmpty)   // the guard file is not an object
    }

    @Test func missingObjectsAndShortReadsAreErrors() throws {
        let dir = TemporaryDirectory("store")
        defer { dir.remove() }
        let store = LocalDirectoryStore(root: dir.path)
        #expect(throws: ObjectStoreError.self) { try store.get("points/x/y") }
        try store.put("a", [1, 2, 3])
        do {
            _ = try store.read("a", at: 2, count: 10)
            Issue.record("a read past the end must fail")
        } catch {
            guard case .shortRead = error else { Issue.record("wrong error \(error)"); return }
        }
    }

    @Test(arguments: ["../escape", "a/../../b", "/abs", "a//b", ".tmp-x", "a/.hidden", "sp ace", "", "a/"])
    func namesThatCouldEscapeAreRefused(_ name: String) throws {
        let dir = TemporaryDirectory("store")
        defer { dir.remove() }
        let store = LocalDirectoryStore(root: dir.path)
        #expect(throws: ObjectStoreError.self) { try store.put(name, [1]) }
    }
}
