import Glibc
import SystemIO
import Vault
import VirtualDisk

public enum SyncError: LifeboatError {
    case source(VaultError)
    case sourceRead(VirtualDiskError)
    case invalidArgument(String)
    case notATarget(String)
    case targetTooSmall(path: String, size: UInt64, needed: UInt64)
    case target(SystemError)
    /// A read or write of the target failed at `offset`; the undo journal (if any) is intact.
    case targetIO(path: String, offset: UInt64, writing: Bool, cause: SystemError, undo: Bool)
    /// The target changed between the comparison and the write (someone else writes to it).
    case targetChanged(path: String, offset: UInt64)
    case unfinished(path: String, source: String, undo: Bool)
    case nothingToResume(String)
    case nothingToRollBack(String)
    case rollbackImpossible(String)
    case journalTooLarge(needed: UInt64, available: UInt64, directory: String)
    case journal(SystemError)
    case damagedJournal(path: String, why: String)
    case sourceMismatch(target: String, why: String)
    /// `restartNotRecorded`: why the journal could not be told to resume from the start.
    case verificationFailed(path: String, offset: UInt64, slots: Int, restartNotRecorded: String? = nil, undo: Bool = true)
    case interrupted(path: String, undo: Bool)
    /// Interrupted before the target was changed: nothing to resume or roll back.
    case interruptedBeforeWriting(path: String)
    case sandbox(SandboxError)
    /// A mounted sandbox's freeze lapsed during the sync: its writes went on, so what was read
    /// may mix states. The sync is left unfinished (its undo journal intact).
    case sandboxKeptWriting(name: String, target: String)
    /// Another sync or failback holds the target's lock.
    case busy(path: String, holder: String?)
    /// A sync state found under this target's name belongs, or may belong, to another disk.
    case otherTarget(path: String, why: String)
    /// A failback phase asked for in the wrong order or against the wrong target.
    case failback(String)

    public var description: String {
        switch self {
        case .source(let error): return error.description
        case .sourceRead(let error): return error.description
        case .invalidArgument(let why): return why
        case .notATarget(let path): return "target \(path) is neither a regular file nor a block device"
        case .targetTooSmall(let path, let size, let needed):
            return "target \(path) holds \(size) bytes, but the disk needs \(needed); a block device cannot be enlarged"
        case .target(let error): return "target: \(error.description)"
        case .targetIO(let path, let offset, let writing, let cause, let undo):
            let what = writing ? "write" : "read"
            let after = undo
                ? "; the undo journal is intact: `lifeboat sync --rollback \(path)` restores the old image, `lifeboat sync --resume \(path)` retries"
                : "; no undo journal was kept (--no-undo): `lifeboat sync --resume \(path)` retries"
            return "cannot \(what) target \(path) at byte \(offset): \(String(cString: strerror(cause.errno)))\(writing ? after : "")"
        case .targetChanged(let path, let offset):
            return "target \(path) changed at byte \(offset) while it was being synced: is something else writing to it? Roll back with `lifeboat sync --rollback \(path)`"
        case .unfinished(let path, let source, let undo):
            if !undo {
                return "target \(path) holds an unfinished sync from \(source) made without undo journal (--no-undo): finish it with `lifeboat sync --resume \(path)`, or sync again with --no-undo"
            }
            return "target \(path) holds an unfinished sync from \(source): finish it with `lifeboat sync --resume \(path)` or undo it with `lifeboat sync --rollback \(path)` first"
        case .otherTarget(let path, let why):
            return "the unfinished sync recorded for \(path) cannot be taken for this target's: \(why)"
        case .nothingToResume(let path): return "target \(path) has no unfinished sync to resume"
        case .nothingToRollBack(let path): return "target \(path) has no unfinished sync to roll back"
        case .rollbackImpossible(let path):
            return "the unfinished sync of \(path) kept no undo journal (--no-undo): it cannot be rolled back; finish it with `lifeboat sync --resume \(path)`"
        case .journalTooLarge(let needed, let available, let directory):
            return "the undo journal needs \(needed) bytes but \(directory) has \(available) free: free space, or sync with --no-undo (the target is then inconsistent until the sync completes)"
        case .journal(let error): return "undo journal: \(error.description)"
        case .damagedJournal(let path, let why): return "undo journal \(path) is damaged: \(why)"
        case .sourceMismatch(let target, let why): return "cannot resume the sync of \(target): \(why)"
        case .verificationFailed(let path, let offset, let slots, let restartNotRecorded, let undo):
            let text = "verification failed: target \(path) differs from the source in \(slots) chunk\(slots == 1 ? "" : "s"), the first at byte \(offset)"
            guard let restartNotRecorded else { return text }
            return text + "; the journal could not be told to start again from the first slot (\(restartNotRecorded)), so a resume would skip them: "
                + (undo ? "`lifeboat sync --rollback \(path)` restores the old image; then sync again"
                        : "sync again with --no-undo --mode full")
        case .interrupted(let path, let undo):
            if !undo { return "interrupted: target \(path) is inconsistent until `lifeboat sync --resume \(path)` finishes the sync" }
            return "interrupted: `lifeboat sync --resume \(path)` finishes the sync, `lifeboat sync --rollback \(path)` restores the old image"
        case .interruptedBeforeWriting(let path): return "interrupted before target \(path) was changed: it holds its old image"
        case .sandbox(let error): return error.description
        case .sandboxKeptWriting(let name, let target):
            return "sandbox \(name) kept writing while it was being synced (a running machine's writes cannot wait longer than \(Int(WriteGate.maximumWait)) s), so what was read may mix states: `lifeboat sync --rollback \(target)` restores the old image; then stop the machine and unmount the sandbox before syncing it, or fail back in two phases (`lifeboat failback sandbox:\(name) --phase prepare`, then `--phase complete` once it is stopped)"
        case .busy(let path, let holder):
            return "target \(path) is busy: another lifeboat sync or failback is writing it\(holder.map { " (\($0))" } ?? ""); wait for it to finish"
        case .failback(let why): return why
        }
    }

    /// This error from a sync that stopped before its first write to `path`: an interruption
    /// then says that the target holds its old image (nothing to resume or roll back).
    func beforeWriting(_ path: String) -> SyncError {
        if case .interrupted = self { return .interruptedBeforeWriting(path: path) }
        return self
    }

    public var kind: FailureKind {
        switch self {
        case .source(let e): return e.kind
        case .sourceRead(let e): return e.kind
        case .invalidArgument, .notATarget, .targetTooSmall, .unfinished, .nothingToResume, .nothingToRollBack,
             .rollbackImpossible, .sourceMismatch, .otherTarget: return .usage
        case .target(let e), .journal(let e): return e.kind
        case .targetIO(_, _, _, let cause, _): return cause.kind
        case .targetChanged: return .io
        case .journalTooLarge: return .noSpace
        case .damagedJournal: return .damaged
        case .verificationFailed: return .verification
        case .interrupted, .interruptedBeforeWriting: return .interrupted
        case .sandbox(let e): return e.kind
        case .sandboxKeptWriting, .busy: return .busy
        case .failback: return .usage
        }
    }
}
