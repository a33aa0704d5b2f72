/* Fuzz target: qp_prefix_parity(bits, perm, n, pre).
 *
 * Inputs: bits of any byte value (the kernel uses the low bit), perm that is
 * usually a permutation but may repeat entries or point past n (QK_EINVAL),
 * n negative to a few thousand, NULL buffers.  perm and bits hold exactly n
 * entries, pre exactly n + 1.
 *
 * Oracle: pre[0] = 0 and pre[i+1] = pre[i] ^ (bits[perm[i]] & 1) by a plain
 * loop; QK_EINVAL exactly when some perm[i] >= n (or an argument is bad). */
#include "fuzz_input.h"
#include "qpost.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz_in in = {data, size};
    int seeded;
    const size_t n = fz_length(&in, 256, 5000, &seeded);
    const uint8_t mode = fz_u8(&in);
    uint8_t *bits = fz_bytes(&in, n, seeded, mode & 1);
    uint32_t *perm = (uint32_t *)fz_alloc(n, sizeof *perm, mode & 2);
    uint64_t state = fz_u64(&in);
    for (size_t i = 0; i < n; i++) perm[i] = (uint32_t)i;
    for (size_t i = n; i > 1; i--) { /* Fisher-Yates from the input's seed */
        const size_t j = (size_t)(fz_mix(&state) % i);
        const uint32_t tmp = perm[i - 1];
        perm[i - 1] = perm[j];
        perm[j] = tmp;
    }
    /* Sometimes a few entries overwritten: repeats, or values >= n. */
    const int corrupt = (mode & 0x0c) == 0x0c ? (int)fz_range(&in, 1, 4) : 0;
    for (int c = 0; c < corrupt && n > 0; c++)
        perm[fz_range(&in, 0, (int64_t)n - 1)] =
            fz_bool(&in) ? (uint32_t)fz_u64(&in) : (uint32_t)(n + (size_t)fz_range(&in, 0, 2));
    const int wild_n = (mode & 0x30) == 0x30; /* a negative n */
    const int64_t nn = wild_n ? -fz_range(&in, 1, 1000) : (int64_t)n;
    const int null_pre = (mode & 0xc0) == 0xc0;
    uint8_t *pre = null_pre ? NULL : (uint8_t *)fz_alloc(n + 1, 1, 0);

    const int rc = qp_prefix_parity(bits, perm, nn, pre);

    int bad_perm = 0;
    for (size_t i = 0; i < n; i++) bad_perm |= perm[i] >= n;
    if (wild_n || null_pre || bad_perm) {
        FZ_CHECK(rc == QK_EINVAL);
    } else {
        FZ_CHECK(rc == QK_OK && pre[0] == 0);
        uint8_t acc = 0;
        for (size_t i = 0; i < n; i++) {
            acc ^= bits[perm[i]] & 1;
            FZ_CHECK(pre[i + 1] == acc);
        }
    }
    free(bits);
    free(perm);
    free(pre);
    return 0;
}
