/* Fuzz target: qp_permutation(seed, n, frame, perm, inv).
 *
 * Inputs: any seed, n from negative through a few thousand (and beyond
 * UINT32_MAX, refused before any write), any frame (zero, negative, larger
 * than n, near INT64_MAX), NULL buffers.  perm and inv hold exactly n entries.
 *
 * Oracle: on QK_OK perm is a bijection of 0..n-1, inv is its inverse, every
 * position stays inside its frame (frames of `frame` bits, the last taking
 * the remaining frame..2*frame-1, one frame when n < frame), and a second
 * call with the same arguments gives the same permutation (both nodes derive
 * it independently). */
#include "fuzz_input.h"
#include "qpost.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz_in in = {data, size};
    const uint64_t seed = fz_u64(&in);
    const uint8_t mode = fz_u8(&in);
    /* n: small or a few thousand; sometimes an arbitrary int64 (then no buffers). */
    int64_t n = fz_range(&in, 0, mode & 1 ? 5000 : 70);
    const int wild_n = (mode & 0x0e) == 0x0e;
    if (wild_n) n = fz_int(&in);
    const int64_t frame = mode & 0x10 ? fz_int(&in) : fz_range(&in, 1, 80);
    const int null_bufs = (mode & 0xe0) == 0xe0;
    const size_t cells = (n > 0 && n <= 5000) ? (size_t)n : 0;
    uint32_t *perm = null_bufs ? NULL : (uint32_t *)fz_alloc(cells, sizeof *perm, mode & 0x20);
    uint32_t *inv = null_bufs ? NULL : (uint32_t *)fz_alloc(cells, sizeof *inv, mode & 0x40);
    /* A wild n beyond the buffers must be refused: only negative or huge ones get here. */
    if (wild_n && n > 0 && n <= (int64_t)UINT32_MAX) goto done;

    const int rc = qp_permutation(seed, n, frame, perm, inv);

    const int einval = n < 0 || n > (int64_t)UINT32_MAX || frame <= 0 || (n > 0 && null_bufs);
    if (einval) {
        FZ_CHECK(rc == QK_EINVAL);
        goto done;
    }
    FZ_CHECK(rc == QK_OK);
    {
        const int64_t frames = n / frame > 1 ? n / frame : 1;
        uint8_t *seen = (uint8_t *)calloc(cells + 1, 1);
        for (int64_t i = 0; i < n; i++) {
            FZ_CHECK(perm[i] < (uint64_t)n && !seen[perm[i]]);
            seen[perm[i]] = 1;
            FZ_CHECK(inv[perm[i]] == (uint32_t)i);
            const int64_t fi = i / frame < frames ? i / frame : frames - 1;
            const int64_t fp = perm[i] / frame < frames ? perm[i] / frame : frames - 1;
            FZ_CHECK(fi == fp);
        }
        free(seen);
        uint32_t *again = (uint32_t *)fz_alloc(cells, sizeof *again, 0);
        uint32_t *again_inv = (uint32_t *)fz_alloc(cells, sizeof *again_inv, 0);
        FZ_CHECK(qp_permutation(seed, n, frame, again, again_inv) == QK_OK);
        FZ_CHECK(cells == 0 || memcmp(again, perm, cells * sizeof *perm) == 0);
        free(again);
        free(again_inv);
    }
done:
    free(perm);
    free(inv);
    return 0;
}
