import Foundation
import Glibc
import Synchronization

/// Messages and progress on standard error. Progress is drawn only on a terminal.
enum Terminal {
    static let isInteractive = isatty(2) == 1

    static func error(_ message: String) {
        write("lifeboat: \(message)\n")
    }

    static func warning(_ message: String) {
        write("lifeboat: warning: \(message)\n")
    }

    static func write(_ text: String) {
        var bytes = Array(text.utf8)
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeMutableBytes { Glibc.write(2, $0.baseAddress! + offset, $0.count - offset) }
            if n <= 0 { break }
            offset += n
        }
    }
}

/// A progress line: bytes done of total, rate, ETA; redrawn at most ten times a second.
final class ProgressLine: Sendable {
    private struct State {
        var started = Date()
        var lastDraw = Date.distantPast
        var drawn = false
    }
    private let state = Mutex(State())
    private let label: String
    private let enabled: Bool

    init(_ label: String, enabled: Bool = Terminal.isInteractive) {
        self.label = label
        self.enabled = enabled
    }

    func update(done: UInt64, total: UInt64?, label override: String? = nil) {
        guard enabled else { return }
        let now = Date()
        let line: String? = state.withLock { s in
            guard now.timeIntervalSince(s.lastDraw) >= 0.1 || (total != nil && done >= total!) else { return nil }
            s.lastDraw = now
            s.drawn = true
            let elapsed = max(now.timeIntervalSince(s.started), 0.001)
            let rate = Double(done) / elapsed
            var text = "\(override ?? label)  \(formatBytes(done))"
            if let total, total > 0 {
                let percent = Double(done) * 100 / Double(total)
                text += " / \(formatBytes(total))  \(String(format: "%.0f", percent))%"
                if rate > 0 && done < total {
                    text += "  ETA \(formatDuration(Double(total - done) / rate))"
                }
            }
            text += "  \(formatBytes(UInt64(rate)))/s"
            return text
        }
        if let line { Terminal.write("\r\u{1B}[K" + line) }
    }

    func finish() {
        guard enabled else { return }
        if state.withLock({ $0.drawn }) { Terminal.write("\r\u{1B}[K") }
    }
}

func formatBytes(_ bytes: UInt64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    var value = Double(bytes)
    var unit = 0
    while value >= 1024 && unit < units.count - 1 {
        value /= 1024
        unit += 1
    }
    return unit == 0 ? "\(bytes) B" : String(format: value < 10 ? "%.2f %@" : "%.1f %@", value, units[unit])
}

func formatDuration(_ seconds: Double) -> String {
    let s = Int(seconds.rounded())
    if s >= 3600 { return String(format: "%d:%02d:%02d", s / 3600, s / 60 % 60, s % 60) }
    return String(format: "%d:%02d", s / 60, s % 60)
}

/// Pads columns of a table for humans.
func formatTable(_ rows: [[String]]) -> String {
    guard let first = rows.first else { return "" }
    var widths = [Int](repeating: 0, count: first.count)
    for row in rows { for (i, cell) in row.enumerated() where i < widths.count { widths[i] = max(widths[i], cell.count) } }
    return rows.map { row in
        row.enumerated().map { i, cell in
            i == row.count - 1 ? cell : cell.padding(toLength: widths[i], withPad: " ", startingAt: 0)
        }.joined(separator: "  ")
    }.joined(separator: "\n") + "\n"
}
