import CFuse
import Foundation
import Glibc
import Synchronization

/// Mounting and running a high-level libfuse file system, for every server of this module.
enum FuseSession {
    /// Mounts, calls `ready` once the kernel mount exists, and serves until unmounted or
    /// signalled. `handle` holds the session while it runs, for `stop`.
    static func run(operations: inout fuse_operations, options: String, mountpoint: String, threads: UInt32,
                    readaheadKiB: Int? = nil,
                    data: UnsafeMutableRawPointer, handle: borrowing Mutex<UInt>, ready: () -> Void) throws(MountError) {
        let arguments = ["lifeboat", "-o", options] + (getenv("LIFEBOAT_FUSE_DEBUG") != nil ? ["-d"] : [])
        var argv: [UnsafeMutablePointer<CChar>?] = arguments.map { strdup($0) }
        defer { for p in argv { free(p) } }
        let fuse: OpaquePointer? = argv.withUnsafeMutableBufferPointer { buffer in
            var args = fuse_args(argc: Int32(buffer.count), argv: buffer.baseAddress, allocated: 0)
            return lb_fuse_new(&args, &operations, data)
        }
        guard let fuse else { throw .fuse("cannot create the file system (bad options?)") }
        defer { fuse_destroy(fuse) }
        guard fuse_mount(fuse, mountpoint) == 0 else {
            throw .fuse("cannot mount at \(mountpoint) (is /dev/fuse available, and are you allowed to mount?)")
        }
        handle.withLock { $0 = UInt(bitPattern: Int(bitPattern: UnsafeRawPointer(fuse))) }
        if let readaheadKiB { setReadahead(mountpoint: mountpoint, kibibytes: readaheadKiB) }
        // Background jobs start with SIGINT ignored, and libfuse only hooks signals left at
        // SIG_DFL; a parent may also have blocked them.
        var unblock = sigset_t()
        sigemptyset(&unblock)
        for s in [SIGINT, SIGTERM, SIGHUP] {
            signal(s, SIG_DFL)
            sigaddset(&unblock, s)
        }
        pthread_sigmask(SIG_UNBLOCK, &unblock, nil)
        let session = fuse_get_session(fuse)
        _ = fuse_set_signal_handlers(session)
        ready()
        let status = lb_fuse_loop_mt(fuse, threads)
        fuse_remove_signal_handlers(session)
        handle.withLock { $0 = 0 }
        fuse_unmount(fuse)
        if status < 0 { throw .fuse("the request loop failed (\(status))") }
    }

    /// Ends the request loop of a running session (tests; the command line uses signals and umount).
    static func stop(_ handle: borrowing Mutex<UInt>) {
        let value = handle.withLock { $0 }
        if value != 0, let fuse = OpaquePointer(bitPattern: value) { fuse_exit(fuse) }
    }

    /// Widens the kernel's readahead for the mount. A FUSE mount gets 128 KiB, so a sequential
    /// reader has one or two requests in flight and one server thread works while the others
    /// wait; a wider window sends several 1 MiB requests at once. Best effort: the knob is the
    /// mount's backing device in sysfs, writable by root only, and a mount works without it.
    static func setReadahead(mountpoint: String, kibibytes: Int) {
        guard let device = Mounts.device(of: mountpoint) else { return }
        let knob = "/sys/class/bdi/\(device)/read_ahead_kb"
        let fd = open(knob, O_WRONLY)
        guard fd >= 0 else { return }
        defer { close(fd) }
        let text = "\(kibibytes)\n"
        _ = text.withCString { write(fd, $0, strlen($0)) }
    }
}
