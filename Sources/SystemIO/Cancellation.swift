import Synchronization

/// Set by the command line's SIGINT/SIGTERM handler; long operations poll it and stop cleanly.
public enum Cancellation {
    private static let flag = Atomic<Bool>(false)

    public static var requested: Bool { flag.load(ordering: .relaxed) }

    public static func request() { flag.store(true, ordering: .relaxed) }
}
