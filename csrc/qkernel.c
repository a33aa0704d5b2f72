/* qkernel: see qkernel.h.  Hot loops are written so the compiler can keep
 * everything in registers: two cursors walking two sorted arrays. */
#include "qkernel.h"

#include <math.h>

static int is_sorted(const int64_t *t, size_t n) {
    for (size_t i = 1; i < n; i++) {
        if (t[i] < t[i - 1]) return 0;
    }
    return 1;
}

int qk_diff_histogram(const int64_t *t_a, size_t n_a, const int64_t *t_b, size_t n_b,
                      int64_t lo_ps, int64_t bin_ps, size_t nbins, int64_t *counts) {
    if (bin_ps <= 0 || nbins == 0) return QK_EINVAL;
    if ((n_a && !t_a) || (n_b && !t_b) || !counts) return QK_EINVAL;
    if (!is_sorted(t_a, n_a) || !is_sorted(t_b, n_b)) return QK_ENOTSORTED;
    for (size_t k = 0; k < nbins; k++) counts[k] = 0;
    /* d = t_b - t_a in [lo, hi)  <=>  t_a in (t_b - hi, t_b - lo]. */
    const int64_t span = bin_ps * (int64_t)nbins;
    size_t first = 0;
    for (size_t j = 0; j < n_b; j++) {
        const int64_t tb = t_b[j];
        while (first < n_a && tb - t_a[first] >= lo_ps + span) first++;
        for (size_t i = first; i < n_a; i++) {
            const int64_t d = tb - t_a[i];
            if (d < lo_ps) break;
            counts[(size_t)((d - lo_ps) / bin_ps)]++;
        }
    }
    return QK_OK;
}

int qk_coincidences(const int64_t *t_a, size_t n_a, const int64_t *t_b, size_t n_b,
                    int64_t window_ps, double offset_ps, double track_gain,
                    int64_t *idx_a, int64_t *idx_b, size_t cap, size_t *n_out,
                    double *offset_out) {
    if (window_ps < 0 || track_gain < 0.0 || track_gain > 1.0) return QK_EINVAL;
    if ((n_a && !t_a) || (n_b && !t_b) || !n_out || !offset_out) return QK_EINVAL;
    if (cap && (!idx_a || !idx_b)) return QK_EINVAL;
    if (!is_sorted(t_a, n_a) || !is_sorted(t_b, n_b)) return QK_ENOTSORTED;
    const double half = 0.5 * (double)window_ps;
    double off = offset_ps;
    size_t i = 0, n = 0;
    /* Walk Bob's tags in order; each takes the earliest unused Alice tag that
     * lies within the window around t_b - off.  Alice tags that fall before
     * the window of the current t_b can never match a later t_b (the window
     * only moves forward while the offset changes slowly), so the cursor only
     * advances: O(n_a + n_b). */
    for (size_t j = 0; j < n_b; j++) {
        const double target = (double)t_b[j] - off;
        while (i < n_a && (double)t_a[i] < target - half) i++;
        if (i == n_a) break;
        const double d = (double)t_b[j] - (double)t_a[i];
        if (fabs(d - off) <= half) {
            if (n == cap) return QK_ECAPACITY;
            idx_a[n] = (int64_t)i;
            idx_b[n] = (int64_t)j;
            n++;
            i++;
            off += track_gain * (d - off);
        }
    }
    *n_out = n;
    *offset_out = off;
    return QK_OK;
}

int qk_assign_slots(const int64_t *t, size_t n, double t0_ps, double period_ps,
                    int64_t window_ps, double track_gain, int64_t *slot, uint8_t *in_window,
                    double *t0_out) {
    if (!(period_ps > 0.0) || window_ps < 0 || track_gain < 0.0 || track_gain > 1.0)
        return QK_EINVAL;
    if ((n && (!t || !slot || !in_window)) || !t0_out) return QK_EINVAL;
    const double half = 0.5 * (double)window_ps;
    const double inv = 1.0 / period_ps;
    double t0 = t0_ps;
    for (size_t j = 0; j < n; j++) {
        const double rel = (double)t[j] - t0;
        const double k = floor(rel * inv + 0.5);
        const double r = rel - k * period_ps;
        slot[j] = (int64_t)k;
        const int inside = fabs(r) <= half;
        in_window[j] = (uint8_t)inside;
        if (inside) t0 += track_gain * r;
    }
    *t0_out = t0;
    return QK_OK;
}

int qk_sift(const uint8_t *basis_a, const uint8_t *basis_b, size_t n, int64_t *keep_idx,
            size_t *n_keep) {
    if ((n && (!basis_a || !basis_b || !keep_idx)) || !n_keep) return QK_EINVAL;
    size_t m = 0;
    for (size_t j = 0; j < n; j++) {
        keep_idx[m] = (int64_t)j;
        m += (basis_a[j] == basis_b[j]); /* branch-free: write always, advance on match */
    }
    *n_keep = m;
    return QK_OK;
}

int qk_pack_bits(const uint8_t *bits, size_t n, uint8_t *out) {
    if (n && (!bits || !out)) return QK_EINVAL;
    size_t nbytes = (n + 7) / 8;
    for (size_t b = 0; b < nbytes; b++) {
        uint8_t v = 0;
        for (size_t k = 0; k < 8; k++) {
            size_t j = 8 * b + k;
            uint8_t bit = 0;
            if (j < n) {
                bit = bits[j];
                if (bit > 1) return QK_ENOTBIT;
            }
            v = (uint8_t)((v << 1) | bit);
        }
        out[b] = v;
    }
    return QK_OK;
}

int qk_count_errors(const uint8_t *a, const uint8_t *b, size_t n, size_t *errors) {
    if ((n && (!a || !b)) || !errors) return QK_EINVAL;
    size_t e = 0;
    for (size_t j = 0; j < n; j++) e += (a[j] != b[j]);
    *errors = e;
    return QK_OK;
}
