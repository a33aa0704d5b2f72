/* Fuzz target: qp_range_parity(pre, npass, n, pass, start, end, nq, out).
 *
 * Inputs: up to four passes, each with its own permutation and prefix-parity
 * array of exactly n + 1 entries (or a NULL one, which a query must not
 * reach), n from 0 to a few hundred, and nq queries that are usually legal
 * but may name a pass out of range, an empty or reversed range, a start below
 * zero or an end past n, including int64 edge values; negative npass, n or
 * nq; NULL arrays.  pass, start, end and out hold exactly nq entries.
 *
 * Oracle: on QK_OK, out[q] is the parity of bits[perm_p[i]] over the
 * permuted positions start <= i < end of pass p (a loop over the bits, not
 * over the prefix array); QK_EINVAL exactly when some argument or query is
 * out of range. */
#include "fuzz_input.h"
#include "qpost.h"

#define MAX_PASS 4

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz_in in = {data, size};
    const uint8_t mode = fz_u8(&in);
    const int npass = (int)fz_range(&in, 0, MAX_PASS);
    const int64_t n = fz_range(&in, 0, mode & 1 ? 2000 : 40);
    uint8_t *bits = fz_bytes(&in, (size_t)n, 1, 0);
    uint32_t *perms[MAX_PASS] = {NULL};
    uint8_t *pres[MAX_PASS] = {NULL};
    const uint8_t null_pass = fz_u8(&in); /* bit p: pass p has no prefix array */
    uint64_t state = fz_u64(&in);
    for (int p = 0; p < npass; p++) {
        perms[p] = (uint32_t *)fz_alloc((size_t)n, sizeof **perms, 0);
        for (int64_t i = 0; i < n; i++) perms[p][i] = (uint32_t)i;
        for (int64_t i = n; i > 1; i--) {
            const int64_t j = (int64_t)(fz_mix(&state) % (uint64_t)i);
            const uint32_t tmp = perms[p][i - 1];
            perms[p][i - 1] = perms[p][j];
            perms[p][j] = tmp;
        }
        if ((mode & 0x80) && (null_pass >> p & 1)) continue;
        pres[p] = (uint8_t *)fz_alloc((size_t)n + 1, 1, 0);
        pres[p][0] = 0;
        for (int64_t i = 0; i < n; i++) pres[p][i + 1] = pres[p][i] ^ bits[perms[p][i]];
    }
    const int64_t nq = fz_range(&in, 0, mode & 2 ? 300 : 16);
    const int wild = (mode & 0x0c) == 0x0c; /* queries from any int64 */
    int64_t *pass = (int64_t *)fz_alloc((size_t)nq, sizeof *pass, mode & 0x10);
    int64_t *start = (int64_t *)fz_alloc((size_t)nq, sizeof *start, mode & 0x10);
    int64_t *end = (int64_t *)fz_alloc((size_t)nq, sizeof *end, mode & 0x10);
    uint8_t *out = (uint8_t *)fz_alloc((size_t)nq, 1, mode & 0x10);
    int bad_query = 0;
    for (int64_t q = 0; q < nq; q++) {
        if (wild && fz_bool(&in)) {
            pass[q] = fz_int(&in);
            start[q] = fz_int(&in);
            end[q] = fz_int(&in);
        } else {
            pass[q] = npass > 0 ? fz_range(&in, 0, npass - 1) : 0;
            start[q] = fz_range(&in, 0, n);
            end[q] = fz_range(&in, start[q] + 1, n + 1); /* end == n + 1: one past */
        }
        bad_query |= pass[q] < 0 || pass[q] >= npass || !pres[pass[q]] || start[q] < 0 ||
                     start[q] >= end[q] || end[q] > n;
    }
    /* Arguments out of range, each alone. */
    const uint8_t bad = fz_u8(&in);
    const int neg_npass = (bad & 0x0f) == 1, neg_n = (bad & 0x0f) == 2, neg_nq = (bad & 0x0f) == 3;
    const int null_pre = (bad & 0x0f) == 4, null_arrays = (bad & 0x0f) == 5;
    const uint8_t *const *pre_arg = null_pre ? NULL : (const uint8_t *const *)pres;

    const int rc = qp_range_parity(pre_arg, neg_npass ? -1 : npass, neg_n ? -n - 1 : n,
                                   null_arrays ? NULL : pass, start, end, neg_nq ? -nq - 1 : nq,
                                   out);

    const int einval = neg_npass || neg_n || neg_nq ||
                       (nq > 0 && (null_pre || null_arrays || bad_query));
    if (einval) {
        FZ_CHECK(rc == QK_EINVAL);
    } else {
        FZ_CHECK(rc == QK_OK);
        for (int64_t q = 0; q < nq; q++) {
            uint8_t acc = 0;
            for (int64_t i = start[q]; i < end[q]; i++) acc ^= bits[perms[pass[q]][i]];
            FZ_CHECK(out[q] == acc);
        }
    }
    for (int p = 0; p < MAX_PASS; p++) {
        free(perms[p]);
        free(pres[p]);
    }
    free(bits);
    free(pass);
    free(start);
    free(end);
    free(out);
    return 0;
}
