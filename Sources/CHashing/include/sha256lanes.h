#ifndef LIFEBOAT_SHA256LANES_H
#define LIFEBOAT_SHA256LANES_H

#include <stddef.h>
#include <stdint.h>

/// 1 when this CPU has the SHA extensions (and SSSE3, SSE4.1) the lane kernels use.
int lb_sha256_lanes_available(void);

/// SHA-256 of `lanes` (2 or 4) inputs of the same `length` at once, the 32-byte digests written
/// one after another to `digests`. The SHA extensions' round instruction has a latency of
/// several cycles; independent inputs fill the pipeline in between. Returns 0 when the kernels
/// are unavailable or `lanes` is not 2 or 4 (nothing written).
int lb_sha256_lanes(const uint8_t *const *inputs, size_t lanes, size_t length, uint8_t *digests);

#endif
