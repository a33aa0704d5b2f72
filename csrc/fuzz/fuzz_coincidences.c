/* Fuzz target: qk_coincidences(t_a, n_a, t_b, n_b, window_ps, offset_ps,
 *                              track_gain, idx_a, idx_b, cap, n_out, offset_out).
 *
 * Inputs: time arrays as in fz_times (the fixed-window path reads ahead and
 * checks order on the way, so unsorted interior values and arrays longer than
 * the 4096-entry order-check block matter), any window (negative, beyond
 * QK_WINDOW_MAX), any offset (NaN, infinities, beyond QK_WINDOW_MAX), any
 * gain (NaN, negative, above 1), a capacity from zero to past min(n_a, n_b),
 * NULL outputs.  idx_a and idx_b hold exactly cap entries each: the fast loop
 * stores a candidate pair at slot n before deciding to keep it, so a cap of
 * exactly the number of pairs is the interesting case.
 *
 * Oracle: the greedy rule of the header as a plain loop (each t_b in turn
 * passes the t_a above its window, then pairs with the one at the cursor if
 * inside), window bounds from libm ceil/floor, the same tracking update; then
 * QK_ECAPACITY exactly when it finds more pairs than cap, else the same pairs
 * and final offset bit for bit. */
#include <math.h>

#include "fuzz_input.h"

/* The header's window: ceil(off - w/2) <= d <= floor(off + w/2) in double,
 * the bounds clamped to +-4e18. */
FZ_NO_COVERAGE
static void bounds(double off, double half, int64_t *lo, int64_t *hi) {
    double l = off - half, h = off + half;
    l = l < -4.0e18 ? -4.0e18 : (l > 4.0e18 ? 4.0e18 : l);
    h = h < -4.0e18 ? -4.0e18 : (h > 4.0e18 ? 4.0e18 : h);
    *lo = (int64_t)ceil(l);
    *hi = (int64_t)floor(h);
}

/* All pairs, however many (pair arrays of min(n_a, n_b) entries). */
FZ_NO_COVERAGE
static size_t reference(const int64_t *t_a, size_t n_a, const int64_t *t_b, size_t n_b,
                        int64_t window, double offset, double gain, int64_t *ia, int64_t *ib,
                        double *off_out) {
    const double half = 0.5 * (double)window;
    double off = offset;
    int64_t lo, hi;
    bounds(off, half, &lo, &hi);
    size_t i = 0, n = 0;
    for (size_t j = 0; j < n_b && i < n_a; j++) {
        while (i < n_a && t_b[j] - t_a[i] > hi) i++;
        if (i == n_a) break;
        const int64_t d = t_b[j] - t_a[i];
        if (d < lo) continue;
        ia[n] = (int64_t)i;
        ib[n] = (int64_t)j;
        n++;
        i++;
        if (gain != 0.0) {
            off += gain * ((double)d - off);
            bounds(off, half, &lo, &hi);
        }
    }
    *off_out = off;
    return n;
}

static double gain_of(fz_in *in) {
    switch (fz_u8(in) & 7) {
    case 0:
    case 1:
    case 2:
        return 0.0; /* the fixed-window fast path */
    case 3:
        return 1.0;
    case 4:
        return 0.5;
    case 5:
        return 1.0 / 16.0;
    default:
        return fz_double(in);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz_in in = {data, size};
    size_t n_a, n_b;
    int sorted_a, sorted_b, range_a, range_b;
    int64_t *t_a = fz_times(&in, 64, 5000, &n_a, &sorted_a, &range_a);
    int64_t *t_b = fz_times(&in, 64, 5000, &n_b, &sorted_b, &range_b);
    const uint8_t wmode = fz_u8(&in);
    /* Windows: mostly a small one (the pairs then depend on the offset). */
    const int64_t window = wmode & 1 ? fz_int(&in) : fz_range(&in, 0, 4000);
    const double offset = wmode & 2 ? fz_double(&in) : (double)(int16_t)fz_bytes_u64(&in, 2);
    const double gain = gain_of(&in);
    const size_t most = n_a < n_b ? n_a : n_b;
    int64_t *ra = (int64_t *)fz_alloc(most, sizeof *ra, 1);
    int64_t *rb = (int64_t *)fz_alloc(most, sizeof *rb, 1);
    const int valid_args = window >= 0 && window <= QK_WINDOW_MAX && gain >= 0.0 && gain <= 1.0;
    const int valid_offset = fabs(offset) <= (double)QK_WINDOW_MAX;
    const int valid = valid_args && valid_offset && sorted_a && sorted_b && range_a && range_b;
    double ref_off = 0.0;
    const size_t pairs =
        valid ? reference(t_a, n_a, t_b, n_b, window, offset, gain, ra, rb, &ref_off) : 0;
    /* Capacity: around the number of pairs (the boundary), or anything up to most + 2. */
    const uint8_t cmode = fz_u8(&in);
    const size_t near = pairs + (size_t)(cmode >> 1 & 1) - (pairs > 0 ? (cmode >> 2 & 1) : 0);
    const size_t cap = (cmode & 1) ? (size_t)fz_range(&in, 0, (int64_t)most + 2) : near;
    const int null_out = (cmode & 0xf0) == 0xf0;
    const int null_idx = (cmode & 0xf0) == 0xe0 && cap > 0;
    int64_t *ia = null_idx ? NULL : (int64_t *)fz_alloc(cap, sizeof *ia, cmode & 8);
    int64_t *ib = null_idx ? NULL : (int64_t *)fz_alloc(cap, sizeof *ib, cmode & 8);
    size_t n = (size_t)-1;
    double off_out = -123.0;

    const int rc = qk_coincidences(t_a, n_a, t_b, n_b, window, offset, gain, ia, ib, cap,
                                   null_out ? NULL : &n, null_out ? NULL : &off_out);

    FZ_CHECK(fz_known_code(rc) && rc != QK_ENOTBIT);
    const int einval = !valid_args || null_out || null_idx;
    if (valid && !einval) {
        if (pairs > cap) {
            FZ_CHECK(rc == QK_ECAPACITY);
        } else {
            FZ_CHECK(rc == QK_OK);
            FZ_CHECK(n == pairs);
            for (size_t k = 0; k < n; k++) FZ_CHECK(ia[k] == ra[k] && ib[k] == rb[k]);
            FZ_CHECK(memcmp(&off_out, &ref_off, sizeof off_out) == 0);
        }
    } else {
        FZ_CHECK(rc != QK_OK && rc != QK_ECAPACITY);
        FZ_CHECK(rc != QK_EINVAL || einval);
        FZ_CHECK(rc != QK_ERANGE || !valid_offset || !range_a || !range_b);
        FZ_CHECK(rc != QK_ENOTSORTED || !sorted_a || !sorted_b);
    }
    free(t_a);
    free(t_b);
    free(ra);
    free(rb);
    free(ia);
    free(ib);
    return 0;
}
