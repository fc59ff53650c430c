import Crypto
import Foundation
import Glibc
import SystemIO

/// Source trees for guest-filesystem tests, and manifests of trees that an independent reader
/// (Python over a local directory or a kernel mount) and Lifeboat both write in one format, so
/// two readings of the same tree compare as two dictionaries.
///
/// A manifest line is keyed by the path from the tree's top ("." for the top), bytes escaped as
/// `manifestEscape` does; its value says type, permissions, owner, size (directories' only when
/// asked), mtime with nanoseconds, link count, symlink target, sha256 of content, user.* xattrs,
/// and for a file with several links the first path (in walk order) of the same inode.
public enum GuestTrees {
    /// Writes the reference tree under `path` (must not exist). Needs root for the owners.
    public static func makeSourceTree(_ path: String) -> ProcessResult {
        let script = """
        import os, random, sys
        top = sys.argv[1].encode()
        os.makedirs(top)
        os.chdir(top)
        r = random.Random(7)
        def write(name, data):
            with open(name, 'wb') as f: f.write(data)
        write(b'empty', b'')
        write(b'small', b'hello, lifeboat\\n')
        write(b'random.bin', r.randbytes(3 * 1024 * 1024 + 123))
        # Sparse: 64 MiB with data at 1 MiB, 40 MiB and at the very end.
        with open(b'sparse', 'wb') as f:
            f.truncate(64 << 20)
            f.seek(1 << 20); f.write(r.randbytes(5000))
            f.seek(40 << 20); f.write(b'middle')
            f.seek((64 << 20) - 3); f.write(b'end')
        os.makedirs(b'a/b/c/d')
        write(b'a/b/c/d/deep', b'deep file\\n')
        write(b'a/b/medium', r.randbytes(70000))
        os.symlink(b'small', b'rel')
        os.symlink(b'../../small', b'a/b/up')
        os.symlink(b'/etc/passwd', b'abs')
        os.symlink(b'nowhere/at/all', b'dangling')
        os.symlink(b'a/' + b'long-target-' * 8 + b'end', b'slowlink')
        os.link(b'small', b'hard1')
        os.link(b'small', b'a/hard2')
        os.link(b'random.bin', b'a/b/hard3')
        os.mkfifo(b'fifo', 0o640)
        write(b'suid', b'#!/bin/sh\\n'); os.chmod(b'suid', 0o4755)
        write(b'sgid', b'x'); os.chmod(b'sgid', 0o2711)
        os.mkdir(b'sticky'); os.chmod(b'sticky', 0o1777)
        os.mkdir(b'with space'); write(b'with space/file name', b'spaces\\n')
        write('h\\u00e9llo-\\u65e5\\u672c'.encode(), b'utf8\\n')
        write(b'bad\\xff\\xfename', b'not utf-8\\n')
        write(b'n' * 255, b'long name\\n')
        write(b'private', b'secret\\n'); os.chmod(b'private', 0o600)
        os.setxattr(b'small', b'user.comment', b'a small file')
        os.setxattr(b'small', b'user.empty', b'')
        os.setxattr(b'a', b'user.big', r.randbytes(700))
        os.setxattr(b'random.bin', b'user.checksum', b'none really')
        os.chown(b'small', 1000, 1000)
        os.chown(b'a/b', 65534, 65534)
        os.chown(b'rel', 1234, 5678, follow_symlinks=False)
        os.chown(b'fifo', 33, 44)
        os.chown(b'random.bin', 4000000, 4000001)
        times = [1_000_000_000_123_456_789, 1_234_567_890_000_000_000, 86_400_000_000_000, 1_700_000_000_999_999_999]
        i = 0
        for root, dirs, files in os.walk(b'.', topdown=False):
            for name in files + dirs:
                p = os.path.join(root, name)
                t = times[i % len(times)] + i * 1_000_000_000
                os.utime(p, ns=(t, t), follow_symlinks=False)
                i += 1
        os.utime(b'.', ns=(times[0], times[0]))
        """
        return runPython(script, [path])
    }

    /// The manifest of a local tree (a source, a kernel mount, a restored copy).
    public static func localManifest(_ path: String, directorySizes: Bool) throws -> [String: String] {
        let script = """
        import hashlib, os, stat, sys
        top = sys.argv[1].encode()
        dirsizes = sys.argv[2] == '1'
        def esc(b):
            return ''.join(chr(c) if 0x21 <= c < 0x7f and c != 0x5c else '\\\\x%02x' % c for c in b)
        first = {}
        out = []
        def visit(rel):
            p = os.path.join(top, rel) if rel != b'.' else top
            st = os.lstat(p)
            m = st.st_mode
            kind = {stat.S_IFREG: 'regular', stat.S_IFDIR: 'directory', stat.S_IFLNK: 'symlink', stat.S_IFIFO: 'fifo',
                    stat.S_IFCHR: 'characterDevice', stat.S_IFBLK: 'blockDevice', stat.S_IFSOCK: 'socket'}[stat.S_IFMT(m)]
            size = '-' if kind == 'directory' and not dirsizes else str(st.st_size)
            v = '%s %o %d:%d size=%s mtime=%d.%09d links=%d' % (kind, stat.S_IMODE(m), st.st_uid, st.st_gid, size,
                st.st_mtime_ns // 10**9, st.st_mtime_ns % 10**9, st.st_nlink)
            if kind == 'symlink':
                v += ' target=' + esc(os.readlink(p))
            if kind == 'regular':
                h = hashlib.sha256()
                with open(p, 'rb') as f:
                    while True:
                        b = f.read(1 << 20)
                        if not b: break
                        h.update(b)
                v += ' sha=' + h.hexdigest()
            if kind in ('regular', 'directory'):
                names = sorted(n for n in os.listxattr(p) if n.startswith('user.'))
                v += ' xattrs=' + ','.join(n + '=' + os.getxattr(p, n).hex() for n in names)
            if kind != 'directory' and st.st_nlink > 1:
                v += ' first=' + esc(first.setdefault(st.st_ino, rel))
            out.append(esc(rel) + '\\t' + v)
            if kind == 'directory':
                for name in sorted(os.listdir(p)):
                    visit(name if rel == b'.' else rel + b'/' + name)
        visit(b'.')
        print('\\n'.join(out))
        """
        let result = runPython(script, [path, directorySizes ? "1" : "0"])
        guard result.status == 0 else { throw FixtureError("manifest of \(path): \(result.stderr)") }
        return parse(result.stdout)
    }

    public static func parse(_ text: String) -> [String: String] {
        var manifest: [String: String] = [:]
        for line in text.split(separator: "\n") {
            guard let tab = line.firstIndex(of: "\t") else { continue }
            manifest[String(line[..<tab])] = String(line[line.index(after: tab)...])
        }
        return manifest
    }

    /// Path bytes as the manifests write them: printable ASCII as is, the rest as \xHH.
    public static func escape(_ bytes: [UInt8]) -> String {
        var out = ""
        for c in bytes {
            if c >= 0x21 && c < 0x7f && c != 0x5c { out.append(Character(UnicodeScalar(c))) } else { out += String(format: "\\x%02x", c) }
        }
        return out
    }

    /// The differences between two manifests, one line each (empty when equal), at most `limit`.
    public static func differences(_ expected: [String: String], _ actual: [String: String], limit: Int = 20) -> [String] {
        var out: [String] = []
        for key in Set(expected.keys).union(actual.keys).sorted() where expected[key] != actual[key] {
            out.append("\(key):\n  expected \(expected[key] ?? "(missing)")\n  actual   \(actual[key] ?? "(missing)")")
            if out.count >= limit { break }
        }
        return out
    }

    /// Runs a Python 3 script given as text (indented as in a Swift multi-line literal).
    public static func runPython(_ script: String, _ arguments: [String]) -> ProcessResult {
        let file = "/tmp/lifeboat-py-\(getpid())-\(UInt64.random(in: 0...UInt64.max)).py"
        do {
            try writeAt(file, 0, Array(script.utf8))
        } catch {
            return ProcessResult(status: 127, stdout: "", stderr: "\(error)")
        }
        defer { unlink(file) }
        return run("/usr/bin/python3", [file] + arguments)
    }
}

/// A read-only loop mount of an image (the kernel as the reference reader), unmounted by `unmount`.
public struct LoopMount: Sendable {
    public let path: String

    public init(image: String, at path: String, options: String = "ro") throws {
        try FileSystem.createDirectories(path)
        let result = shell("mount -o loop,\(options) '\(image)' '\(path)'")
        guard result.status == 0 else { throw FixtureError("mount \(image): \(result.stderr)") }
        self.path = path
    }

    public func unmount() {
        shell("umount '\(path)' || umount -l '\(path)'")
    }
}

/// A fixture could not be made (a tool failed); the message carries its output.
public struct FixtureError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// SHA-256 (hex) of bytes handed over piece by piece: `read(buffer, offset)` fills the buffer
/// from `offset` and returns how many bytes it gave, 0 at the end.
public func sha256(reading read: (UnsafeMutableRawBufferPointer, UInt64) throws -> Int) rethrows -> String {
    var hasher = SHA256()
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 16)
    defer { buffer.deallocate() }
    var offset: UInt64 = 0
    while true {
        let n = try read(buffer, offset)
        if n <= 0 { break }
        hasher.update(bufferPointer: UnsafeRawBufferPointer(rebasing: buffer[0..<n]))
        offset += UInt64(n)
    }
    return Array(hasher.finalize()).hex
}
