import Synchronization
import SystemIO
import Testing
import Glibc

@Suite struct BoundedQueueTests {
    /// Many producers and consumers through a small queue: every item arrives exactly once, and
    /// close lets the consumers drain and stop.
    @Test func everyItemOnceThroughASmallQueue() {
        let queue = BoundedQueue<Int>(capacity: 3)
        let producers = (0..<6).map { p in
            Worker(name: "producer-\(p)") {
                for i in 0..<2000 {
                    #expect(queue.push(p * 10_000 + i))
                }
            }
        }
        let seen = Mutex<[Int]>([])
        let consumers = (0..<5).map { c in
            Worker(name: "consumer-\(c)") {
                var mine: [Int] = []
                while let item = queue.pop() {
                    mine.append(item)
                }
                seen.withLock { $0 += mine }
            }
        }
        for producer in producers { producer.join() }
        queue.close()
        for consumer in consumers { consumer.join() }
        let all = seen.withLock { $0 }.sorted()
        #expect(all == (0..<6).flatMap { p in (0..<2000).map { p * 10_000 + $0 } })
        #expect(queue.pop() == nil)
        #expect(!queue.push(1))
        #expect(!queue.offer(1))
    }

    /// A full queue refuses an offer and holds a push until a pop makes room; close wakes a
    /// producer that waits.
    @Test func capacityHoldsProducersAndCloseWakesThem() {
        let queue = BoundedQueue<Int>(capacity: 2)
        #expect(queue.offer(1) && queue.offer(2))
        #expect(!queue.offer(3))
        let pushed = Atomic<Bool>(false)
        let producer = Worker(name: "producer") {
            queue.push(3)
            pushed.store(true, ordering: .releasing)
        }
        usleep(50_000)
        let early = pushed.load(ordering: .acquiring)
        #expect(!early)
        #expect(queue.pop() == 1)
        producer.join()
        let late = pushed.load(ordering: .acquiring)
        #expect(late)
        #expect(queue.pop() == 2 && queue.pop() == 3)

        #expect(queue.offer(4) && queue.offer(5))
        let refused = Atomic<Bool>(false)
        let waiting = Worker(name: "waiting") {
            refused.store(!queue.push(6), ordering: .releasing)
        }
        usleep(50_000)
        queue.close()
        waiting.join()
        let wasRefused = refused.load(ordering: .acquiring)
        #expect(wasRefused)
        #expect(queue.pop() == 4 && queue.pop() == 5 && queue.pop() == nil)
    }
}
