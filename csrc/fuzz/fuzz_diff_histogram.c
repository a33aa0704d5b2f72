/* Fuzz target: qk_diff_histogram(t_a, n_a, t_b, n_b, lo_ps, bin_ps, nbins, counts).
 *
 * Inputs: two time arrays that are usually ascending and in range but may be
 * out of order or hold a time beyond +-QK_T_MAX (fz_times), any lo_ps and
 * bin_ps (zero, negative, edge values), nbins from 0 to a few thousand, a
 * NULL counts.  counts holds exactly nbins entries: nbins is never larger
 * than the buffer, since a caller cannot lie about it.
 *
 * Oracle: the return code must be one the inputs justify (QK_OK exactly when
 * every argument is legal), and on QK_OK the counts must equal a plain double
 * loop over all pairs (when that is cheap). */
#include "fuzz_input.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz_in in = {data, size};
    size_t n_a, n_b;
    int sorted_a, sorted_b, range_a, range_b;
    /* One array may be longer than the 4096-entry block of the order check;
     * not both, or the pairs in range (the kernel's cost) run to millions. */
    int64_t *t_a = fz_times(&in, 64, 5000, &n_a, &sorted_a, &range_a);
    int64_t *t_b = fz_times(&in, 64, n_a > 64 ? 64 : 5000, &n_b, &sorted_b, &range_b);
    const int64_t lo = fz_int(&in);
    const int64_t bin = fz_int(&in);
    const size_t nbins = (size_t)fz_range(&in, 0, 4096);
    const int null_counts = (fz_u8(&in) & 0x1f) == 0x1f;
    int64_t *counts = null_counts ? NULL : (int64_t *)fz_alloc(nbins, sizeof *counts, 0);

    const int rc = qk_diff_histogram(t_a, n_a, t_b, n_b, lo, bin, nbins, counts);

    FZ_CHECK(fz_known_code(rc) && rc != QK_ECAPACITY && rc != QK_ENOTBIT);
    const int einval = bin <= 0 || nbins == 0 || counts == NULL;
    /* lo + bin*nbins <= QK_T_MAX, in integers without overflow (bin > 0). */
    const int span_ok = !einval && lo >= QK_T_MIN && lo <= QK_T_MAX &&
                        (uint64_t)nbins <= (uint64_t)(QK_T_MAX - lo) / (uint64_t)bin;
    const int erange = !span_ok || !range_a || !range_b;
    const int unsorted = !sorted_a || !sorted_b;
    if (!einval && !erange && !unsorted) {
        FZ_CHECK(rc == QK_OK);
        if ((uint64_t)n_a * n_b <= 1u << 16) {
            int64_t *want = (int64_t *)calloc(nbins, sizeof *want);
            for (size_t j = 0; j < n_b; j++) {
                for (size_t i = 0; i < n_a; i++) {
                    const int64_t d = t_b[j] - t_a[i]; /* both in range: no overflow */
                    if (d < lo) continue;
                    /* d >= lo: the difference fits uint64 even where d - lo would overflow. */
                    const uint64_t k = ((uint64_t)d - (uint64_t)lo) / (uint64_t)bin;
                    if (k < nbins) want[k]++;
                }
            }
            for (size_t k = 0; k < nbins; k++) FZ_CHECK(counts[k] == want[k]);
            free(want);
        }
    } else {
        FZ_CHECK(rc != QK_OK);
        FZ_CHECK(rc != QK_EINVAL || einval);
        FZ_CHECK(rc != QK_ERANGE || erange);
        FZ_CHECK(rc != QK_ENOTSORTED || unsorted);
    }
    free(t_a);
    free(t_b);
    free(counts);
    return 0;
}
