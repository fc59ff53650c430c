// SHA-256 (FIPS 180-4) of several equal-length inputs at once with the x86 SHA extensions.
// One SHA256RNDS2 waits for the one before it (4 cycles on Zen 3); four independent messages
// keep the unit busy: 2.9 GB/s per core against BoringSSL's 1.55 GB/s for one at a time
// (64 KiB inputs, this project's machine). Results are checked against BoringSSL in the tests.
#include "sha256lanes.h"
#include <string.h>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

#define SHA_TARGET __attribute__((target("sha,sse4.1,ssse3")))

// The state as the round instruction wants it: ABEF and CDGH.
typedef struct { __m128i abef, cdgh; } lane_state;

SHA_TARGET static inline lane_state initial_state(void) {
    const uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    __m128i dcba = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&h[0]), 0xB1);
    __m128i efgh = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&h[4]), 0x1B);
    lane_state s = {_mm_alignr_epi8(dcba, efgh, 8), _mm_blend_epi16(efgh, dcba, 0xF0)};
    return s;
}

SHA_TARGET static inline void store_digest(lane_state s, uint8_t *out) {
    const __m128i swap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i feba = _mm_shuffle_epi32(s.abef, 0x1B);
    __m128i dchg = _mm_shuffle_epi32(s.cdgh, 0xB1);
    _mm_storeu_si128((__m128i *)out, _mm_shuffle_epi8(_mm_blend_epi16(feba, dchg, 0xF0), swap));
    _mm_storeu_si128((__m128i *)(out + 16), _mm_shuffle_epi8(_mm_alignr_epi8(dchg, feba, 8), swap));
}

// `blocks` 64-byte blocks of each of `w` messages; `w` is a constant where this is inlined, so
// the lane loops unroll and the lanes' instructions interleave.
SHA_TARGET __attribute__((always_inline)) static inline void
compress_blocks(int w, lane_state *state, const uint8_t *const *data, size_t blocks) {
    const __m128i swap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    lane_state s[4];
    for (int l = 0; l < w; l++) s[l] = state[l];
    for (size_t b = 0; b < blocks; b++) {
        lane_state saved[4];
        __m128i m[4][4];
        for (int l = 0; l < w; l++) saved[l] = s[l];
        for (int g = 0; g < 16; g++) {
            const __m128i k = _mm_loadu_si128((const __m128i *)&K[4 * g]);
            const int i = g & 3;
            for (int l = 0; l < w; l++) {
                if (g < 4) {
                    m[l][i] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(data[l] + b * 64 + 16 * g)), swap);
                } else {
                    // W[t] = s1(W[t-2]) + W[t-7] + s0(W[t-15]) + W[t-16], four words at a time.
                    __m128i x = _mm_sha256msg1_epu32(m[l][i], m[l][(i + 1) & 3]);
                    x = _mm_add_epi32(x, _mm_alignr_epi8(m[l][(i + 3) & 3], m[l][(i + 2) & 3], 4));
                    m[l][i] = _mm_sha256msg2_epu32(x, m[l][(i + 3) & 3]);
                }
                const __m128i wk = _mm_add_epi32(m[l][i], k);
                s[l].cdgh = _mm_sha256rnds2_epu32(s[l].cdgh, s[l].abef, wk);
                s[l].abef = _mm_sha256rnds2_epu32(s[l].abef, s[l].cdgh, _mm_shuffle_epi32(wk, 0x0E));
            }
        }
        for (int l = 0; l < w; l++) {
            s[l].abef = _mm_add_epi32(s[l].abef, saved[l].abef);
            s[l].cdgh = _mm_add_epi32(s[l].cdgh, saved[l].cdgh);
        }
    }
    for (int l = 0; l < w; l++) state[l] = s[l];
}

// The padding: the message's last partial block, 0x80, zeros, the length in bits (big-endian);
// one or two blocks.
static size_t final_blocks(uint8_t out[128], const uint8_t *rest, size_t count, uint64_t length) {
    memset(out, 0, 128);
    memcpy(out, rest, count);
    out[count] = 0x80;
    size_t blocks = count + 9 <= 64 ? 1 : 2;
    uint64_t bits = length * 8;
    for (int i = 0; i < 8; i++) out[blocks * 64 - 1 - i] = (uint8_t)(bits >> (8 * i));
    return blocks;
}

SHA_TARGET __attribute__((always_inline)) static inline void
hash_lanes(int w, const uint8_t *const *inputs, size_t length, uint8_t *digests) {
    lane_state s[4];
    for (int l = 0; l < w; l++) s[l] = initial_state();
    compress_blocks(w, s, inputs, length / 64);
    uint8_t tails[4][128];
    const uint8_t *tail[4];
    size_t blocks = 0;
    for (int l = 0; l < w; l++) {
        blocks = final_blocks(tails[l], inputs[l] + length / 64 * 64, length % 64, length);
        tail[l] = tails[l];
    }
    compress_blocks(w, s, tail, blocks);
    for (int l = 0; l < w; l++) store_digest(s[l], digests + 32 * l);
}

SHA_TARGET static void hash2(const uint8_t *const *inputs, size_t length, uint8_t *digests) {
    hash_lanes(2, inputs, length, digests);
}

SHA_TARGET static void hash4(const uint8_t *const *inputs, size_t length, uint8_t *digests) {
    hash_lanes(4, inputs, length, digests);
}

int lb_sha256_lanes_available(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const int ssse3 = (c >> 9) & 1, sse41 = (c >> 19) & 1;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    return ssse3 && sse41 && ((b >> 29) & 1);
}

int lb_sha256_lanes(const uint8_t *const *inputs, size_t lanes, size_t length, uint8_t *digests) {
    static int available = -1;   // a benign race: every thread computes the same answer
    if (available < 0) available = lb_sha256_lanes_available();
    if (!available) return 0;
    if (lanes == 4) { hash4(inputs, length, digests); return 1; }
    if (lanes == 2) { hash2(inputs, length, digests); return 1; }
    return 0;
}

#else

int lb_sha256_lanes_available(void) { return 0; }

int lb_sha256_lanes(const uint8_t *const *inputs, size_t lanes, size_t length, uint8_t *digests) {
    (void)inputs; (void)lanes; (void)length; (void)digests;
    return 0;
}

#endif
