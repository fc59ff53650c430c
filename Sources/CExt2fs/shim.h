// libext2fs from Debian's libext2fs-dev (LGPL-2). The I/O manager that reads a filesystem
// from a Lifeboat disk image, and accessors that are macros in the headers, live in
// Sources/GuestFiles (C cannot be compiled in a system-library target: see ext2shim there).
#include <ext2fs/ext2_fs.h>
#include <ext2fs/ext2fs.h>
