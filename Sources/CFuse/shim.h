// libfuse 3 from Debian's libfuse3-dev. System-library targets take no cSettings, so the API
// version is chosen here; a few macros and configuration calls are wrapped for Swift.
#define FUSE_USE_VERSION 312
#include <fuse.h>
#include <fuse_lowlevel.h>

static inline struct fuse *lb_fuse_new(struct fuse_args *args, const struct fuse_operations *op, void *data) {
    return fuse_new(args, op, sizeof(struct fuse_operations), data);
}

// The multi-threaded loop with up to `max_threads` workers.
static inline int lb_fuse_loop_mt(struct fuse *f, unsigned int max_threads) {
    struct fuse_loop_config *config = fuse_loop_cfg_create();
    if (!config) return -1;
    fuse_loop_cfg_set_max_threads(config, max_threads);
    fuse_loop_cfg_set_idle_threads(config, max_threads);
    int result = fuse_loop_mt(f, config);
    fuse_loop_cfg_destroy(config);
    return result;
}

// Puts `size` bytes at `offset` of inode `ino` into the kernel's page cache (FUSE_NOTIFY_STORE).
static inline int lb_notify_store(struct fuse_session *se, fuse_ino_t ino, off_t offset, const void *data, size_t size) {
    struct fuse_bufvec buffer = FUSE_BUFVEC_INIT(size);
    buffer.buf[0].mem = (void *)data;
    return fuse_lowlevel_notify_store(se, ino, offset, &buffer, 0);
}
