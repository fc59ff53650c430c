import Testing
import GuestFiles

@Suite struct ResolveTests {
    @Test func unsafeNamesAreRecognised() {
        for bad in ["", ".", "..", "a/b"] {
            #expect(!GuestDirectoryEntry(name: Array(bad.utf8), inode: 1, type: .regular).isSafe)
        }
        #expect(!GuestDirectoryEntry(name: [97, 0, 98], inode: 1, type: .regular).isSafe)
        #expect(GuestDirectoryEntry(name: Array("...".utf8), inode: 1, type: .regular).isSafe)
    }
}
