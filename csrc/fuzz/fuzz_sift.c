/* Fuzz target: qk_sift(basis_a, basis_b, n, keep_idx, n_keep).
 *
 * Inputs: two basis arrays of any byte values (the kernel compares bytes),
 * n from zero to a few thousand, NULL or a zero-byte block when n == 0, and a
 * NULL n_keep (EINVAL).  keep_idx holds exactly n entries, as the header
 * says, so the kernel's unconditional write at keep_idx[m] (m <= j < n) is
 * checked for staying inside.  Oracle: a plain loop. */
#include "fuzz_input.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz_in in = {data, size};
    int seeded;
    const size_t n = fz_length(&in, 512, 2048, &seeded);
    const int any = fz_bool(&in);
    uint8_t *a = fz_bytes(&in, n, seeded, any);
    uint8_t *b = fz_bytes(&in, n, seeded, any);
    int64_t *keep = (int64_t *)fz_alloc(n, sizeof *keep, fz_bool(&in));
    const int null_count = (fz_u8(&in) & 0x0f) == 0x0f;
    size_t m = (size_t)-1;
    const int rc = qk_sift(a, b, n, keep, null_count ? NULL : &m);
    if (null_count) {
        FZ_CHECK(rc == QK_EINVAL);
    } else {
        FZ_CHECK(rc == QK_OK);
        size_t want = 0;
        for (size_t j = 0; j < n; j++) {
            if (a[j] != b[j]) continue;
            FZ_CHECK(want < m && keep[want] == (int64_t)j);
            want++;
        }
        FZ_CHECK(m == want);
    }
    free(a);
    free(b);
    free(keep);
    return 0;
}
