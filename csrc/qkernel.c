/* qkernel: see qkernel.h for the contract of every entry point.
 *
 * The hot loops are merges of two sorted arrays written so that the compiler
 * emits conditional moves instead of data-dependent branches: a time-tag
 * stream is random, so a branchy merge mispredicts about every other step. */
#include "qkernel.h"

#include <math.h>

#define QK_VERSION 2

int qk_version(void) { return QK_VERSION; }

/* 0 if t is ascending, else QK_ENOTSORTED.  An OR-reduction (vectorisable)
 * over blocks, so a long sorted array costs about one pass at memory speed. */
static int check_order(const int64_t *t, size_t n) {
    const size_t block = 4096;
    for (size_t start = 1; start < n; start += block) {
        const size_t stop = (n - start > block) ? start + block : n;
        int bad = 0;
        for (size_t i = start; i < stop; i++) bad |= (t[i] < t[i - 1]);
        if (bad) return QK_ENOTSORTED;
    }
    return QK_OK;
}

/* Range of an array taken to be sorted: its ends bound every element. */
static int check_ends(const int64_t *t, size_t n) {
    if (n == 0) return QK_OK;
    if (!t) return QK_EINVAL;
    return (t[0] < QK_T_MIN || t[n - 1] > QK_T_MAX) ? QK_ERANGE : QK_OK;
}

/* 0 if t is ascending and within [QK_T_MIN, QK_T_MAX], else an error code. */
static int check_times(const int64_t *t, size_t n) {
    const int rc = check_ends(t, n);
    return rc != QK_OK ? rc : check_order(t, n);
}

/* a - b with wrap-around instead of undefined overflow: used only where the
 * inputs' order (and so their range) is still being verified. */
static int64_t sub_wrap(int64_t a, int64_t b) { return (int64_t)((uint64_t)a - (uint64_t)b); }

int qk_diff_histogram(const int64_t *t_a, size_t n_a, const int64_t *t_b, size_t n_b,
                      int64_t lo_ps, int64_t bin_ps, size_t nbins, int64_t *counts) {
    if (bin_ps <= 0 || nbins == 0 || !counts) return QK_EINVAL;
    if (lo_ps < QK_T_MIN || lo_ps > QK_T_MAX) return QK_ERANGE;
    /* The histogram span must not overflow: lo + bin*nbins <= QK_T_MAX. */
    if ((uint64_t)nbins > (uint64_t)(QK_T_MAX - lo_ps) / (uint64_t)bin_ps) return QK_ERANGE;
    int rc = check_times(t_a, n_a);
    if (rc == QK_OK) rc = check_times(t_b, n_b);
    if (rc != QK_OK) return rc;
    for (size_t k = 0; k < nbins; k++) counts[k] = 0;
    const int64_t span = bin_ps * (int64_t)nbins;
    const int64_t hi_ps = lo_ps + span; /* <= QK_T_MAX, checked above */
    /* An integer division per pair would dominate; multiply by the reciprocal
     * in double instead and correct the quotient by one step.  That is exact:
     * the estimate is within one of the true quotient because the quotient is
     * below nbins (far below 2^52, or counts could not be allocated). */
    const double inv = 1.0 / (double)bin_ps;
    const int64_t last = (int64_t)nbins - 1;
    size_t first = 0;
    for (size_t j = 0; j < n_b; j++) {
        const int64_t tb = t_b[j];
        /* d >= hi: t_a[first] is too early for this and every later t_b. */
        while (first < n_a && tb - t_a[first] >= hi_ps) first++;
        for (size_t i = first; i < n_a; i++) {
            const int64_t d = tb - t_a[i]; /* < hi_ps, falls as i grows */
            if (d < lo_ps) break;
            const int64_t x = d - lo_ps; /* 0 <= x < span: no overflow */
            int64_t q = (int64_t)((double)x * inv);
            q = q > last ? last : q;
            const int64_t r = x - q * bin_ps;
            q -= (r < 0);
            q += (r >= bin_ps);
            counts[q]++;
        }
    }
    return QK_OK;
}

/* floor and ceil for |x| < 2^62, without a libm call (baseline x86-64 has no
 * rounding instruction); the same values as floor()/ceil(). */
static int64_t floor_i64(double x) {
    const int64_t k = (int64_t)x; /* truncates toward zero */
    return k - (x < (double)k);
}

static int64_t ceil_i64(double x) {
    const int64_t k = (int64_t)x;
    return k + (x > (double)k);
}

/* Window bounds [lo, hi] on d for offset off (see the header). */
static void window_bounds(double off, double half, int64_t *lo, int64_t *hi) {
    /* Tracking keeps off between its start and the d seen, |d| < 2^63; clamp
     * so the conversion stays defined (moot for any real time span). */
    const double top = 4.0e18;
    const double l = off - half, h = off + half;
    *lo = ceil_i64(l < -top ? -top : (l > top ? top : l));
    *hi = floor_i64(h < -top ? -top : (h > top ? top : h));
}

int qk_coincidences(const int64_t *t_a, size_t n_a, const int64_t *t_b, size_t n_b,
                    int64_t window_ps, double offset_ps, double track_gain,
                    int64_t *idx_a, int64_t *idx_b, size_t cap, size_t *n_out,
                    double *offset_out) {
    if (window_ps < 0 || window_ps > QK_WINDOW_MAX || !(track_gain >= 0.0 && track_gain <= 1.0))
        return QK_EINVAL;
    if (!n_out || !offset_out || (cap && (!idx_a || !idx_b))) return QK_EINVAL;
    if (!(fabs(offset_ps) <= (double)QK_WINDOW_MAX)) return QK_ERANGE;
    int rc = check_ends(t_a, n_a);
    if (rc == QK_OK) rc = check_ends(t_b, n_b);
    if (rc != QK_OK) return rc;

    const double half = 0.5 * (double)window_ps;
    double off = offset_ps;
    int64_t lo, hi;
    window_bounds(off, half, &lo, &hi);
    size_t i = 0, j = 0, n = 0;

    if (track_gain == 0.0 && n_a >= 2 && n_b >= 2) {
        /* Fixed window: a branch-free merge.  Each step advances i, j or both:
         *   d > hi : t_a[i] is too early for t_b[j] and every later t_b -> i++
         *   d < lo : t_b[j] is too early for every remaining t_a     -> j++
         *   else   : a pair                                          -> i++, j++
         * The pair is stored unconditionally at slot n and kept by n += m,
         * which needs one free slot: hence the n < cap in the loop test.
         * The loop-carried chain is only compare -> select: the next values of
         * t_a and t_b are loaded one step ahead (ca/na1, cb/nb1), which keeps
         * the load latency off it.  The order of the inputs is checked on the
         * way (each adjacent pair the cursors pass), so the data is read once;
         * the tails are checked after the loop. */
        int64_t ca = t_a[0], na1 = t_a[1], cb = t_b[0], nb1 = t_b[1];
        int unsorted = (na1 < ca) | (nb1 < cb);
        while (i + 2 < n_a && j + 2 < n_b && n < cap) {
            const int64_t d = sub_wrap(cb, ca);
            const int gt = d > hi;
            const int ge = d >= lo;
            idx_a[n] = (int64_t)i;
            idx_b[n] = (int64_t)j;
            n += (size_t)(ge & !gt);
            const size_t step_a = (size_t)(gt | ge);
            const size_t step_b = (size_t)!gt;
            i += step_a;
            j += step_b;
            ca = step_a ? na1 : ca;
            cb = step_b ? nb1 : cb;
            na1 = t_a[i + 1];
            nb1 = t_b[j + 1];
            unsorted |= (na1 < ca) | (nb1 < cb);
        }
        if (unsorted) return QK_ENOTSORTED;
    }
    /* Whatever the fast loop has not seen (all of it, with tracking). */
    if (i < n_a) rc = check_order(t_a + i, n_a - i);
    if (rc == QK_OK && j < n_b) rc = check_order(t_b + j, n_b - j);
    if (rc != QK_OK) return rc;
    if (track_gain == 0.0) {
        /* The last steps, with every bound checked (lo and hi are fixed). */
        while (i < n_a && j < n_b && n < cap) {
            const int64_t d = t_b[j] - t_a[i];
            const int gt = d > hi;
            const int ge = d >= lo;
            idx_a[n] = (int64_t)i;
            idx_b[n] = (int64_t)j;
            n += (size_t)(ge & !gt);
            i += (size_t)(gt | ge);
            j += (size_t)!gt;
        }
    } else {
        /* Tracking: the window moves after every pair, so recompute its bounds
         * then; between pairs the merge is the same as above. */
        while (i < n_a && j < n_b && n < cap) {
            const int64_t d = t_b[j] - t_a[i];
            if (d > hi) {
                i++;
            } else if (d < lo) {
                j++;
            } else {
                idx_a[n] = (int64_t)i;
                idx_b[n] = (int64_t)j;
                n++;
                i++;
                j++;
                off += track_gain * ((double)d - off);
                window_bounds(off, half, &lo, &hi);
            }
        }
    }
    /* Out of room: is there one more pair?  (The window no longer moves.) */
    while (i < n_a && j < n_b) {
        const int64_t d = t_b[j] - t_a[i];
        if (d > hi) {
            i++;
        } else if (d < lo) {
            j++;
        } else {
            return QK_ECAPACITY;
        }
    }
    *n_out = n;
    *offset_out = off;
    return QK_OK;
}

int qk_assign_slots(const int64_t *t, size_t n, double t0_ps, double period_ps,
                    int64_t window_ps, double track_gain, int64_t *slot, uint8_t *in_window,
                    double *t0_out) {
    if (!(period_ps > 0.0) || !isfinite(period_ps) || !isfinite(t0_ps) || window_ps < 0 ||
        !(track_gain >= 0.0 && track_gain <= 1.0))
        return QK_EINVAL;
    if ((n && (!t || !slot || !in_window)) || !t0_out) return QK_EINVAL;
    const double half = 0.5 * (double)window_ps;
    const double inv = 1.0 / period_ps;
    double t0 = t0_ps;
    for (size_t j = 0; j < n; j++) {
        const double rel = (double)t[j] - t0;
        const double x = rel * inv + 0.5;
        /* Keep the conversion to int64 defined. */
        if (!(fabs(x) < 4.6e18)) return QK_ERANGE;
        const int64_t k = floor_i64(x);
        const double r = rel - (double)k * period_ps;
        slot[j] = k;
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
        keep_idx[m] = (int64_t)j; /* branch-free: write always (m <= j < n), advance on match */
        m += (basis_a[j] == basis_b[j]);
    }
    *n_keep = m;
    return QK_OK;
}

int qk_pack_bits(const uint8_t *bits, size_t n, uint8_t *out) {
    if (n && (!bits || !out)) return QK_EINVAL;
    uint8_t bad = 0;
    for (size_t j = 0; j < n; j++) bad |= bits[j];
    if (bad > 1) return QK_ENOTBIT;
    const size_t full = n / 8;
    for (size_t b = 0; b < full; b++) {
        const uint8_t *p = bits + 8 * b;
        out[b] = (uint8_t)((p[0] << 7) | (p[1] << 6) | (p[2] << 5) | (p[3] << 4) | (p[4] << 3) |
                           (p[5] << 2) | (p[6] << 1) | p[7]);
    }
    if (n % 8) {
        uint8_t v = 0;
        for (size_t k = 0; k < 8; k++) {
            const size_t j = 8 * full + k;
            v = (uint8_t)((v << 1) | (j < n ? bits[j] : 0));
        }
        out[full] = v;
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
