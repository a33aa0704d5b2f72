/* Fuzz target: qp_block_parity(bits, perm, n, k, out).
 *
 * Inputs: bits of any byte value, perm usually a permutation but possibly
 * corrupted (entries >= n: QK_EINVAL), n up to a few thousand or negative,
 * any k (zero, negative, larger than n, near INT64_MAX), NULL buffers.  out
 * holds exactly ceil(n / k) entries, computed without overflow.
 *
 * Oracle: the parity (low bit) of each block of k permuted positions, the last
 * one shorter, by a plain loop. */
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
    for (size_t i = n; i > 1; i--) {
        const size_t j = (size_t)(fz_mix(&state) % i);
        const uint32_t tmp = perm[i - 1];
        perm[i - 1] = perm[j];
        perm[j] = tmp;
    }
    if ((mode & 0x0c) == 0x0c && n > 0)
        perm[fz_range(&in, 0, (int64_t)n - 1)] = (uint32_t)(n + (size_t)fz_range(&in, 0, 3));
    const int64_t k = mode & 0x10 ? fz_int(&in) : fz_range(&in, 1, 300);
    const int wild_n = (mode & 0x60) == 0x60;
    const int64_t nn = wild_n ? -fz_range(&in, 1, 1000) : (int64_t)n;
    const size_t nb = k > 0 ? (size_t)((int64_t)n / k + ((int64_t)n % k != 0)) : 0;
    const int null_out = (mode & 0x80) && n > 0 && (fz_u8(&in) & 7) == 7;
    uint8_t *out = null_out ? NULL : (uint8_t *)fz_alloc(nb, 1, 1);

    const int rc = qp_block_parity(bits, perm, nn, k, out);

    int bad_perm = 0;
    for (size_t i = 0; i < n; i++) bad_perm |= perm[i] >= n;
    if (wild_n || k <= 0 || null_out || (bad_perm && n > 0)) {
        FZ_CHECK(rc == QK_EINVAL);
    } else {
        FZ_CHECK(rc == QK_OK);
        for (size_t b = 0; b < nb; b++) {
            uint8_t acc = 0;
            for (size_t i = b * (size_t)k; i < n && i < (b + 1) * (size_t)k; i++)
                acc ^= bits[perm[i]];
            FZ_CHECK(out[b] == (acc & 1));
        }
    }
    free(bits);
    free(perm);
    free(out);
    return 0;
}
