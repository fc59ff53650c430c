import Crypto
import Foundation
import Glibc
import SystemIO

/// A fresh directory under /tmp, removed by `remove()`.
public struct TemporaryDirectory: Sendable {
    public let path: String

    public init(_ label: String = "test") {
        let template = "/tmp/lifeboat-\(label)-XXXXXX"
        var bytes = Array(template.utf8CString)
        let made = bytes.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        precondition(made != nil, "mkdtemp failed")
        path = String(nulTerminated: bytes)
    }

    public func file(_ name: String) -> String { path + "/" + name }

    public func remove() {
        _ = run("/bin/rm", ["-rf", path])
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
public struct SeededBytes {
    private var state: UInt64

    public init(seed: UInt64) { state = seed &* 0x9E37_79B9_7F4A_7C15 | 1 }

    public mutating func next() -> UInt64 {
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        return state
    }

    public mutating func bytes(_ count: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        out.withUnsafeMutableBytes { raw in
            var i = 0
            while i + 8 <= count {
                raw.storeBytes(of: next(), toByteOffset: i, as: UInt64.self)
                i += 8
            }
            while i < count { raw[i] = UInt8(truncatingIfNeeded: next()); i += 1 }
        }
        return out
    }
}

/// Writes `bytes` at `offset` of the file at `path` (created if missing), without truncating.
public func writeAt(_ path: String, _ offset: UInt64, _ bytes: [UInt8]) throws {
    let file = try SystemFile.open(path, .createOrOpen(permissions: 0o644))
    defer { file.close() }
    try file.write(bytes, at: offset)
}

public func setSize(_ path: String, _ size: UInt64) throws {
    let file = try SystemFile.open(path, .createOrOpen(permissions: 0o644))
    defer { file.close() }
    try file.truncate(to: size)
}

/// Where two byte sequences first differ (or where the shorter ends); nil when equal. Tests
/// compare large buffers with this: a failed `#expect(a == b)` on megabytes makes the test
/// library compute a diff that takes minutes.
public func firstDifference<A: Collection<UInt8>, B: Collection<UInt8>>(_ a: A, _ b: B) -> Int? {
    var i = 0
    for (x, y) in zip(a, b) {
        if x != y { return i }
        i += 1
    }
    return a.count == b.count ? nil : i
}

/// SHA-256 of bytes, hex.
public func sha256(bytes: [UInt8]) -> String {
    Array(SHA256.hash(data: bytes)).hex
}

/// SHA-256 of a whole file, hex.
public func sha256(file path: String) throws -> String {
    let file = try SystemFile.open(path, .readOnly)
    defer { file.close() }
    var hasher = SHA256()
    var offset: UInt64 = 0
    var buffer = [UInt8](repeating: 0, count: 1 << 20)
    while true {
        let n = try buffer.withUnsafeMutableBytes { try file.read(into: $0, at: offset) }
        if n == 0 { break }
        buffer.withUnsafeBytes { hasher.update(bufferPointer: UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
        offset += UInt64(n)
    }
    return Array(hasher.finalize()).hex
}

public func fileSize(_ path: String) -> UInt64? {
    var st = stat()
    return stat(path, &st) == 0 ? UInt64(st.st_size) : nil
}

/// Bytes a file really occupies (st_blocks), to check sparseness.
public func allocatedBytes(_ path: String) -> UInt64 {
    var st = stat()
    return stat(path, &st) == 0 ? UInt64(st.st_blocks) * 512 : 0
}

public struct ProcessResult: Sendable {
    public var status: Int32
    public var stdout: String
    public var stderr: String
}

/// Runs a program to completion, capturing its output.
@discardableResult
public func run(_ executable: String, _ arguments: [String], environment: [String: String] = [:],
                stdin: String? = nil) -> ProcessResult {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    var env = ProcessInfo.processInfo.environment
    for (k, v) in environment { env[k] = v }
    process.environment = env
    let out = Pipe(), err = Pipe()
    process.standardOutput = out
    process.standardError = err
    if let stdin {
        process.standardInput = FileHandle(forReadingAtPath: stdin)
    } else {
        process.standardInput = FileHandle.nullDevice
    }
    do {
        try process.run()
    } catch {
        return ProcessResult(status: 127, stdout: "", stderr: "\(error)")
    }
    // Read both pipes concurrently so a chatty child cannot block.
    let errData = DataBox()
    let finished = DispatchSemaphore(value: 0)
    let reader = Thread {
        errData.data = err.fileHandleForReading.readDataToEndOfFile()
        finished.signal()
    }
    reader.start()
    let outData = out.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    finished.wait()
    return ProcessResult(status: process.terminationStatus,
                         stdout: String(decoding: outData, as: UTF8.self),
                         stderr: String(decoding: errData.data, as: UTF8.self))
}

/// Runs a shell command line.
@discardableResult
public func shell(_ command: String) -> ProcessResult {
    run("/bin/sh", ["-c", command])
}

// @unchecked: written once by the reader thread, read only after its semaphore is signalled.
final class DataBox: @unchecked Sendable {
    var data = Data()
}

public var isRoot: Bool { getuid() == 0 }

/// The package root, from this file's location.
public let packageRoot: String = {
    var path = #filePath
    for _ in 0..<3 { path = FileSystem.parentDirectory(of: path) }
    return path
}()

/// `count` deterministic pseudo-random bytes.
public func randomBytes(seed: UInt64, count: Int) -> [UInt8] {
    var random = SeededBytes(seed: seed)
    return random.bytes(count)
}
