#ifndef LIFEBOAT_EXT2SHIM_H
#define LIFEBOAT_EXT2SHIM_H
// libext2fs for Lifeboat's GuestFiles: an I/O manager that reads through a callback (the
// filesystem lives in a disk image of a recovery point, not in a file), and small wrappers
// for what the headers offer only as macros or inline functions.
#include <ext2fs/ext2_fs.h>
#include <ext2fs/ext2fs.h>

/// Reads `length` bytes at `offset` of the filesystem's volume; returns 0 or an errno.
typedef int (*lb_read_fn)(void *context, unsigned long long offset, void *buffer, unsigned long length);

struct lb_source {
    lb_read_fn read;
    void *context;
};

/// Opens a filesystem read-only through `source` (which must outlive it).
errcode_t lb_ext2fs_open(struct lb_source *source, ext2_filsys *fs);

struct lb_inode {
    unsigned int mode, uid, gid, links, flags;
    unsigned long long size, blocks;
    long long atime, mtime, ctime;
    unsigned int atime_ns, mtime_ns, ctime_ns;
    unsigned long long device;
    int fast_symlink;
    unsigned char inline_target[64];
};

errcode_t lb_read_inode(ext2_filsys fs, ext2_ino_t ino, struct lb_inode *out);

/// Calls `visit` for each entry of a directory except its own "." and ".." (other entries so
/// named, in a damaged or crafted directory, are passed on); a non-zero return stops.
typedef int (*lb_dirent_fn)(void *context, const char *name, int name_len, unsigned int inode, int file_type);
errcode_t lb_list_directory(ext2_filsys fs, ext2_ino_t dir, lb_dirent_fn visit, void *context);

/// Reads up to `length` bytes of a file at `offset`; `*got` says how many.
errcode_t lb_read_file(ext2_filsys fs, ext2_ino_t ino, unsigned long long offset, void *buffer,
                       unsigned int length, unsigned int *got);

typedef int (*lb_xattr_fn)(void *context, const char *name, const void *value, unsigned long length);
errcode_t lb_list_xattrs(ext2_filsys fs, ext2_ino_t ino, lb_xattr_fn visit, void *context);

const char *lb_error_message(errcode_t code);
int lb_needs_recovery(ext2_filsys fs);
/// The volume label, NUL-terminated in `out` (17 bytes).
void lb_volume_label(ext2_filsys fs, char *out);
unsigned int lb_block_size(ext2_filsys fs);


/// The physical block of a file's logical block (0 for a hole).
errcode_t lb_bmap(ext2_filsys fs, ext2_ino_t ino, unsigned long long logical, unsigned long long *physical);
/// The journal's inode (0 when external or none) and whether the journal is on another device.
unsigned int lb_journal_inode(ext2_filsys fs);
int lb_has_fast_commit(ext2_filsys fs);
#endif
