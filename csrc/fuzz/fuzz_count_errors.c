/* Fuzz target: qk_count_errors(a, b, n, errors).
 *
 * Inputs: two byte arrays (0/1 or any value) of n entries, NULL or a
 * zero-byte block when n == 0, and a NULL errors pointer (EINVAL).
 * Oracle: a plain loop counting differing positions. */
#include "fuzz_input.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz_in in = {data, size};
    int seeded;
    const size_t n = fz_length(&in, 512, 2048, &seeded);
    const int any = fz_bool(&in);
    uint8_t *a = fz_bytes(&in, n, seeded, any);
    uint8_t *b = fz_bytes(&in, n, seeded, any);
    const int null_count = (fz_u8(&in) & 0x0f) == 0x0f;
    size_t e = (size_t)-1;
    const int rc = qk_count_errors(a, b, n, null_count ? NULL : &e);
    if (null_count) {
        FZ_CHECK(rc == QK_EINVAL);
    } else {
        size_t want = 0;
        for (size_t j = 0; j < n; j++) want += a[j] != b[j];
        FZ_CHECK(rc == QK_OK && e == want);
    }
    free(a);
    free(b);
    return 0;
}
