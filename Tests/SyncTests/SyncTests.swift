import Testing
@Suite struct SyncTests {}
