import Foundation

/// A blocking FIFO with a capacity, for pipelines of threads: producers wait when it is full,
/// consumers wait when it is empty, `close()` ends it (consumers drain, then get nil).
// @unchecked: every stored var is read and written only while holding `condition`.
public final class BoundedQueue<Element: Sendable>: @unchecked Sendable {
    private let condition = NSCondition()
    private var items: [Element?] = []
    private var head = 0
    private var closed = false
    private let capacity: Int

    public init(capacity: Int) {
        self.capacity = max(1, capacity)
    }

    /// Returns false when the queue was closed (the item is dropped).
    @discardableResult
    public func push(_ item: Element) -> Bool {
        condition.lock()
        defer { condition.unlock() }
        while !closed && items.count - head >= capacity { condition.wait() }
        if closed { return false }
        items.append(item)
        condition.broadcast()
        return true
    }

    /// Like `push`, but never waits: false when the queue is full or closed (the item is dropped).
    @discardableResult
    public func offer(_ item: Element) -> Bool {
        condition.lock()
        defer { condition.unlock() }
        if closed || items.count - head >= capacity { return false }
        items.append(item)
        condition.broadcast()
        return true
    }

    public func pop() -> Element? {
        condition.lock()
        defer { condition.unlock() }
        while head == items.count && !closed { condition.wait() }
        if head == items.count { return nil }
        let item = items[head]
        items[head] = nil  // release it now, not at the next compaction
        head += 1
        if head > 64 && head * 2 > items.count {
            items.removeFirst(head)
            head = 0
        }
        condition.broadcast()
        return item!
    }

    public func close() {
        condition.lock()
        closed = true
        condition.broadcast()
        condition.unlock()
    }
}

/// Runs `body` on a new thread; `join()` waits for it.
public final class Worker: Sendable {
    private let done = DispatchSemaphore(value: 0)

    public init(name: String, _ body: @escaping @Sendable () -> Void) {
        let thread = Thread { [done] in
            // The kernel's name (15 bytes), so that top and perf tell the threads apart.
            let comm = open("/proc/thread-self/comm", O_WRONLY | O_CLOEXEC)
            if comm >= 0 {
                _ = Array(name.utf8.prefix(15)).withUnsafeBytes { write(comm, $0.baseAddress, $0.count) }
                close(comm)
            }
            body()
            done.signal()
        }
        thread.name = name
        thread.stackSize = 1 << 20
        thread.start()
    }

    /// Safe to call again (a writer's `abandon` after its `finish` joined the same threads).
    public func join() {
        done.wait()
        done.signal()
    }
}
