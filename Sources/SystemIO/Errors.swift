#if canImport(Glibc)
import Glibc
#endif

/// What kind of failure an error is; the command line maps each to a documented exit code.
public enum FailureKind: Sendable {
    case usage          // the request itself is wrong (bad argument, unknown point)
    case notFound       // a vault, point, disk or source that does not exist
    case damaged        // data failed a check: damaged vault, truncated or malicious input
    case busy           // another process holds a lock
    case io             // a read or write failed (EIO and friends)
    case noSpace        // ENOSPC / EDQUOT
    case interrupted    // cancelled by a signal
    case verification   // data written was read back and differs from what was meant
}

/// An error that can be told to an operator in one sentence.
public protocol LifeboatError: Error, CustomStringConvertible, Sendable {
    var kind: FailureKind { get }
}

/// A failed system call: what was being done, on which path, and the errno.
public struct SystemError: LifeboatError {
    public let operation: String
    public let path: String
    public let errno: Int32

    public init(_ operation: String, path: String, errno: Int32 = Glibc.errno) {
        self.operation = operation
        self.path = path
        self.errno = errno
    }

    public var description: String {
        "cannot \(operation) \(path): \(String(cString: strerror(errno)))"
    }

    public var kind: FailureKind {
        switch errno {
        case ENOENT, ENOTDIR: return .notFound
        case ENOSPC, EDQUOT: return .noSpace
        case EINTR: return .interrupted
        default: return .io
        }
    }
}

extension String {
    /// The text of a C buffer up to its first NUL (all of it if there is none), as UTF-8.
    public init(nulTerminated buffer: [CChar]) {
        let bytes = buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }
        self.init(decoding: bytes, as: UTF8.self)
    }
}
