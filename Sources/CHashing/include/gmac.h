#ifndef LIFEBOAT_GMAC_H
#define LIFEBOAT_GMAC_H

#include <stddef.h>
#include <stdint.h>

/// An expanded AES-128 key and the powers of its hash key.
typedef struct {
    uint8_t rounds[11 * 16];
    uint8_t powers[16 * 16];
} lb_gmac_key;

/// 1 when this CPU has AES-NI, AVX2 and VPCLMULQDQ (and the OS saves the YMM registers).
int lb_gmac_available(void);

/// Expands `raw` into `key`; 0 when the kernel is unavailable (nothing written).
int lb_gmac_init(lb_gmac_key *key, const uint8_t raw[16]);

/// The AES-128-GCM tag of no plaintext with `data` as associated data under a 12-byte nonce:
/// what AES.GCM.seal([], nonce, authenticating: data) gives as its tag. `key` from lb_gmac_init.
void lb_gmac(const lb_gmac_key *key, const uint8_t nonce[12], const uint8_t *data, size_t length, uint8_t tag[16]);

#endif
