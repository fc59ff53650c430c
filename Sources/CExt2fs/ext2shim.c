#include "ext2shim.h"
#include <errno.h>
#include <stddef.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <et/com_err.h>

// ---- The I/O manager: the channel's name carries the address of an lb_source. ----

struct lb_channel_data {
    struct lb_source *source;
};

static struct struct_io_manager lb_io_manager;

static errcode_t lb_open(const char *name, int flags, io_channel *channel) {
    if (flags & IO_FLAG_RW) return EXT2_ET_RO_FILSYS;
    void *pointer = NULL;
    if (!name || sscanf(name, "lifeboat:%p", &pointer) != 1 || !pointer) return EXT2_ET_BAD_DEVICE_NAME;
    io_channel io = calloc(1, sizeof(struct struct_io_channel));
    struct lb_channel_data *data = calloc(1, sizeof(struct lb_channel_data));
    char *copy = strdup(name);
    if (!io || !data || !copy) {
        free(io); free(data); free(copy);
        return EXT2_ET_NO_MEMORY;
    }
    data->source = pointer;
    io->magic = EXT2_ET_MAGIC_IO_CHANNEL;
    io->manager = &lb_io_manager;
    io->name = copy;
    io->block_size = 1024;
    io->refcount = 1;
    io->private_data = data;
    *channel = io;
    return 0;
}

static errcode_t lb_close(io_channel channel) {
    if (--channel->refcount > 0) return 0;
    free(channel->private_data);
    free(channel->name);
    free(channel);
    return 0;
}

static errcode_t lb_set_blksize(io_channel channel, int blksize) {
    channel->block_size = blksize;
    return 0;
}

static errcode_t lb_read_blk64(io_channel channel, unsigned long long block, int count, void *buffer) {
    struct lb_channel_data *data = channel->private_data;
    unsigned long length = count < 0 ? (unsigned long)(-count) : (unsigned long)count * channel->block_size;
    unsigned long long offset = block * channel->block_size;
    int error = data->source->read(data->source->context, offset, buffer, length);
    if (error) return error == EIO ? EXT2_ET_SHORT_READ : error;
    return 0;
}

static errcode_t lb_read_blk(io_channel channel, unsigned long block, int count, void *buffer) {
    return lb_read_blk64(channel, block, count, buffer);
}

static errcode_t lb_write_blk64(io_channel channel, unsigned long long block, int count, const void *buffer) {
    return EXT2_ET_RO_FILSYS;
}

static errcode_t lb_write_blk(io_channel channel, unsigned long block, int count, const void *buffer) {
    return EXT2_ET_RO_FILSYS;
}

static errcode_t lb_write_byte(io_channel channel, unsigned long offset, int count, const void *buffer) {
    return EXT2_ET_RO_FILSYS;
}

static errcode_t lb_flush(io_channel channel) { return 0; }

static errcode_t lb_set_option(io_channel channel, const char *option, const char *arg) {
    return EXT2_ET_INVALID_ARGUMENT;
}

static struct struct_io_manager lb_io_manager = {
    .magic = EXT2_ET_MAGIC_IO_MANAGER,
    .name = "Lifeboat disk image",
    .open = lb_open,
    .close = lb_close,
    .set_blksize = lb_set_blksize,
    .read_blk = lb_read_blk,
    .write_blk = lb_write_blk,
    .flush = lb_flush,
    .write_byte = lb_write_byte,
    .set_option = lb_set_option,
    .read_blk64 = lb_read_blk64,
    .write_blk64 = lb_write_blk64,
};

errcode_t lb_ext2fs_open(struct lb_source *source, ext2_filsys *fs) {
    char name[64];
    snprintf(name, sizeof name, "lifeboat:%p", (void *)source);
    // No MMP: nothing else writes a recovery point; 64-bit block numbers for large volumes.
    int flags = EXT2_FLAG_64BITS | EXT2_FLAG_SKIP_MMP;
    return ext2fs_open2(name, NULL, flags, 0, 0, &lb_io_manager, fs);
}

// ---- Inodes ----

static void lb_time(__u32 seconds, __u32 extra, int has_extra, long long *out, unsigned int *ns) {
    long long s = (long long)(__s32)seconds;
    *ns = 0;
    if (has_extra) {
        s += (long long)(extra & EXT4_EPOCH_MASK) << 32;
        *ns = extra >> EXT4_EPOCH_BITS;
        if (*ns >= 1000000000u) *ns = 0;
    }
    *out = s;
}

errcode_t lb_read_inode(ext2_filsys fs, ext2_ino_t ino, struct lb_inode *out) {
    struct ext2_inode_large inode;
    memset(&inode, 0, sizeof inode);
    errcode_t error = ext2fs_read_inode_full(fs, ino, (struct ext2_inode *)&inode, sizeof inode);
    if (error) return error;
    memset(out, 0, sizeof *out);
    struct ext2_inode *small = (struct ext2_inode *)&inode;
    out->mode = inode.i_mode;
    out->uid = inode_uid(*small);
    out->gid = inode_gid(*small);
    out->links = inode.i_links_count;
    out->flags = inode.i_flags;
    out->size = EXT2_I_SIZE(small);
    out->blocks = ext2fs_get_stat_i_blocks(fs, small);
    int large = EXT2_INODE_SIZE(fs->super) > EXT2_GOOD_OLD_INODE_SIZE;
    int extra = large ? inode.i_extra_isize : 0;
    // A field of the large inode counts only if it lies within i_extra_isize (the kernel's
    // EXT4_FITS_IN_INODE); past it begin the in-inode extended attributes.
#define LB_FITS(field) (offsetof(struct ext2_inode_large, field) + sizeof(inode.field) <= EXT2_GOOD_OLD_INODE_SIZE + (size_t)extra)
    lb_time(inode.i_atime, inode.i_atime_extra, LB_FITS(i_atime_extra), &out->atime, &out->atime_ns);
    lb_time(inode.i_mtime, inode.i_mtime_extra, LB_FITS(i_mtime_extra), &out->mtime, &out->mtime_ns);
    lb_time(inode.i_ctime, inode.i_ctime_extra, LB_FITS(i_ctime_extra), &out->ctime, &out->ctime_ns);
#undef LB_FITS
    if (LINUX_S_ISCHR(inode.i_mode) || LINUX_S_ISBLK(inode.i_mode)) {
        // Old encoding in i_block[0], new (Linux's new_encode_dev) in i_block[1].
        if (inode.i_block[0]) {
            out->device = ((inode.i_block[0] >> 8) & 0xff) << 8 | (inode.i_block[0] & 0xff);
        } else {
            __u32 d = inode.i_block[1];
            unsigned long long major = (d & 0xfff00) >> 8, minor = (d & 0xff) | ((d >> 12) & 0xfff00);
            out->device = (major << 8) | (minor & 0xff) | ((minor & ~0xffull) << 12);
        }
    }
    if (LINUX_S_ISLNK(inode.i_mode) && ext2fs_is_fast_symlink(small) && out->size < sizeof(inode.i_block)) {
        out->fast_symlink = 1;
        memcpy(out->inline_target, (char *)inode.i_block, (size_t)out->size);
    }
    return 0;
}

// ---- Directories ----

struct lb_dir_context {
    lb_dirent_fn visit;
    void *context;
    int seen_dot_dot;
    unsigned long long blocks, max_blocks;
    int too_long;
};

static int lb_dir_callback(ext2_ino_t dir, int entry, struct ext2_dir_entry *dirent, int offset, int blocksize,
                           char *buf, void *private) {
    struct lb_dir_context *c = private;
    int length = ext2fs_dirent_name_len(dirent);
    // Every block's first entry (empty ones included): a crafted directory whose extents map
    // billions of blocks onto one block of empty entries would otherwise be read for hours.
    if (offset == 0 && ++c->blocks > c->max_blocks) {
        c->too_long = 1;
        return DIRENT_ABORT;
    }
    if (dirent->inode == 0) return 0;
    // Only the directory's own "." and ".." (the first two entries of its first block) are
    // left out; a "." or ".." anywhere else is damage or a crafted image, and is passed on
    // so that the reader can refuse it by name instead of losing it silently.
    // Inline-data directories have no stored "." and the iterator makes both up as ordinary
    // entries, so: "." naming the directory itself, and the first "..", are the real ones.
    if (length == 1 && dirent->name[0] == '.' && (entry == DIRENT_DOT_FILE || dirent->inode == dir)) return 0;
    if (length == 2 && dirent->name[0] == '.' && dirent->name[1] == '.' && (entry == DIRENT_DOT_DOT_FILE || !c->seen_dot_dot)) {
        c->seen_dot_dot = 1;
        return 0;
    }
    if (c->visit(c->context, dirent->name, length, dirent->inode, ext2fs_dirent_file_type(dirent))) return DIRENT_ABORT;
    return 0;
}

errcode_t lb_list_directory(ext2_filsys fs, ext2_ino_t dir, lb_dirent_fn visit, void *context) {
    // No more blocks than the directory's size says (a few more for inline data, whose parts
    // each start at offset 0), and never more than 2 GiB of them.
    unsigned long long cap = (2ULL << 30) / fs->blocksize, max = cap;
    struct ext2_inode inode;
    if (ext2fs_read_inode(fs, dir, &inode) == 0) {
        unsigned long long size = EXT2_I_SIZE(&inode);
        max = size / fs->blocksize + 4;
        if (max > cap) max = cap;
    }
    struct lb_dir_context c = { visit, context, 0, 0, max, 0 };
    errcode_t status = ext2fs_dir_iterate2(fs, dir, DIRENT_FLAG_INCLUDE_EMPTY, NULL, lb_dir_callback, &c);
    if (status == 0 && c.too_long) return EXT2_ET_DIR_CORRUPTED;
    return status;
}

// ---- Files ----

// libext2fs's file reader copies inline data into a buffer of three blocks without checking the
// size of the inode's system.data attribute, which an ea_inode filesystem lets reach 64 KiB: a
// crafted inode would write past the buffer. Inline data is read here instead, into a buffer of
// the size the attribute gives, and refused when it is larger than the inode (where the kernel
// keeps all inline data: i_block and the in-inode attribute space).
static errcode_t lb_read_inline(ext2_filsys fs, ext2_ino_t ino, struct ext2_inode *inode, unsigned long long offset,
                                void *buffer, unsigned int length, unsigned int *got) {
    size_t size = 0;
    errcode_t error = ext2fs_inline_data_size(fs, ino, &size);
    if (error) return error;
    if (size > (size_t)EXT2_INODE_SIZE(fs->super)) return EXT2_ET_INLINE_DATA_NO_SPACE;
    char *data = malloc(size ? size : 1);
    if (!data) return EXT2_ET_NO_MEMORY;
    size_t filled = size;
    error = ext2fs_inline_data_get(fs, ino, inode, data, &filled);
    if (!error && filled > size) error = EXT2_ET_INLINE_DATA_NO_SPACE;  // cannot happen: the same attribute, read twice
    if (!error) {
        // Never past the file's size: the inline area holds zeros after the data.
        unsigned long long end = EXT2_I_SIZE(inode);
        if (end > filled) end = filled;
        if (offset < end) {
            unsigned long long n = end - offset;
            if (n > length) n = length;
            memcpy(buffer, data + offset, (size_t)n);
            *got = (unsigned int)n;
        }
    }
    free(data);
    return error;
}

errcode_t lb_read_file(ext2_filsys fs, ext2_ino_t ino, unsigned long long offset, void *buffer,
                       unsigned int length, unsigned int *got) {
    ext2_file_t file;
    *got = 0;
    struct ext2_inode inode;
    errcode_t error = ext2fs_read_inode(fs, ino, &inode);
    if (error) return error;
    if (inode.i_flags & EXT4_INLINE_DATA_FL) return lb_read_inline(fs, ino, &inode, offset, buffer, length, got);
    error = ext2fs_file_open2(fs, ino, &inode, 0, &file);  // the inode as read, not read again
    if (error) return error;
    error = ext2fs_file_llseek(file, offset, EXT2_SEEK_SET, NULL);
    // Never past the size: libext2fs returns a file kept inline (inline_data) as its whole
    // inline area, zeros after the data included.
    __u64 size = 0;
    if (!error) error = ext2fs_file_get_lsize(file, &size);
    if (offset >= size) length = 0;
    else if (size - offset < length) length = (unsigned int)(size - offset);
    unsigned int done = 0;
    while (!error && done < length) {
        unsigned int n = 0;
        error = ext2fs_file_read(file, (char *)buffer + done, length - done, &n);
        if (error || n == 0) break;
        done += n;
    }
    *got = done;
    errcode_t closing = ext2fs_file_close(file);
    return error ? error : closing;
}

// ---- Extended attributes ----

struct lb_xattr_context {
    lb_xattr_fn visit;
    void *context;
};

static int lb_xattr_callback(char *name, char *value, size_t value_len, void *data) {
    struct lb_xattr_context *c = data;
    return c->visit(c->context, name, value, value_len) ? XATTR_ABORT : 0;
}

errcode_t lb_list_xattrs(ext2_filsys fs, ext2_ino_t ino, lb_xattr_fn visit, void *context) {
    struct ext2_xattr_handle *handle;
    errcode_t error = ext2fs_xattrs_open(fs, ino, &handle);
    if (error) return error;
    error = ext2fs_xattrs_read(handle);
    if (!error) {
        struct lb_xattr_context c = { visit, context };
        error = ext2fs_xattrs_iterate(handle, lb_xattr_callback, &c);
    }
    ext2fs_xattrs_close(&handle);
    return error;
}

static pthread_once_t lb_error_table_once = PTHREAD_ONCE_INIT;
static void lb_register_error_table(void) { initialize_ext2_error_table(); }

// libext2fs's codes read "Unknown code ext2 N" until its table is registered.
const char *lb_error_message(errcode_t code) {
    pthread_once(&lb_error_table_once, lb_register_error_table);
    return error_message(code);
}

int lb_needs_recovery(ext2_filsys fs) {
    return ext2fs_has_feature_journal_needs_recovery(fs->super) ? 1 : 0;
}

void lb_volume_label(ext2_filsys fs, char *out) {
    memcpy(out, fs->super->s_volume_name, 16);
    out[16] = 0;
}

unsigned int lb_block_size(ext2_filsys fs) { return fs->blocksize; }

static int uuid_is_null_shim(const unsigned char *uuid) {
    for (int i = 0; i < 16; i++) if (uuid[i]) return 0;
    return 1;
}

errcode_t lb_bmap(ext2_filsys fs, ext2_ino_t ino, unsigned long long logical, unsigned long long *physical) {
    blk64_t result = 0;
    errcode_t error = ext2fs_bmap2(fs, ino, NULL, NULL, 0, logical, NULL, &result);
    *physical = result;
    return error;
}

unsigned int lb_journal_inode(ext2_filsys fs) {
    if (!ext2fs_has_feature_journal(fs->super)) return 0;
    if (!uuid_is_null_shim(fs->super->s_journal_uuid)) return 0;
    return fs->super->s_journal_inum;
}

int lb_has_fast_commit(ext2_filsys fs) { return ext2fs_has_feature_fast_commit(fs->super) ? 1 : 0; }
