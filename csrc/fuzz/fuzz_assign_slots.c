/* Fuzz target: qk_assign_slots(t, n, t0_ps, period_ps, window_ps, track_gain,
 *                              slot, in_window, t0_out).
 *
 * Inputs: any int64 times, sorted or not (the header allows both), any t0,
 * period, window and gain (NaN, infinities, zero, negative, subnormal periods
 * whose reciprocal is infinite), NULL outputs.  slot and in_window hold
 * exactly n entries.
 *
 * Oracle: the header's formulas in IEEE double with libm floor, step by
 * step, including the QK_ERANGE guard |x| < 4.6e18 that keeps the slot
 * number's conversion to int64 defined: the same return code always, and on
 * QK_OK the same slots, flags and final t0 bit for bit. */
#include <math.h>

#include "fuzz_input.h"

/* QK_OK or QK_ERANGE, as the kernel must answer for legal arguments. */
FZ_NO_COVERAGE
static int reference(const int64_t *t, size_t n, double t0, double period, int64_t window,
                     double gain, int64_t *slot, uint8_t *inside, double *t0_out) {
    const double half = 0.5 * (double)window;
    const double inv = 1.0 / period;
    for (size_t j = 0; j < n; j++) {
        const double rel = (double)t[j] - t0;
        const double x = rel * inv + 0.5;
        if (!(fabs(x) < 4.6e18)) return QK_ERANGE;
        const int64_t k = (int64_t)floor(x);
        const double r = rel - (double)k * period;
        slot[j] = k;
        inside[j] = fabs(r) <= half;
        if (inside[j]) t0 += gain * r;
    }
    *t0_out = t0;
    return QK_OK;
}

static double period_of(fz_in *in) {
    const uint8_t tag = fz_u8(in);
    if (tag < 0xc0) return 1.0 + (double)fz_bytes_u64(in, 2) / 16.0; /* 1 ps to 4 ns */
    return fz_double(in);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz_in in = {data, size};
    int seeded;
    const size_t n = fz_length(&in, 64, 2048, &seeded);
    const uint8_t mode = fz_u8(&in);
    int64_t *t = (int64_t *)fz_alloc(n, sizeof *t, mode & 1);
    uint64_t state = fz_u64(&in);
    for (size_t j = 0; j < n; j++) {
        /* Long arrays: random magnitudes below 2^(64 - shift), of either sign. */
        const uint64_t u = fz_mix(&state) >> (mode >> 2 & 63);
        t[j] = seeded ? (int64_t)(mode & 2 ? 0 - u : u) : fz_int(&in);
    }
    const double t0 = mode & 0x80 ? fz_double(&in) : (double)(int16_t)fz_bytes_u64(&in, 2);
    const double period = period_of(&in);
    const int64_t window = fz_u8(&in) & 1 ? fz_int(&in) : fz_range(&in, 0, 2000);
    const uint8_t gmode = fz_u8(&in);
    const double gain = gmode < 0x80 ? 0.0 : gmode < 0xc0 ? (double)(gmode & 0x3f) / 64.0
                                                          : fz_double(&in);
    const uint8_t nmode = fz_u8(&in);
    const int null_t0 = (nmode & 0x0f) == 0x0f;
    const int null_bufs = (nmode & 0x0f) == 0x0e && n > 0;
    int64_t *slot = null_bufs ? NULL : (int64_t *)fz_alloc(n, sizeof *slot, nmode & 0x10);
    uint8_t *inside = null_bufs ? NULL : (uint8_t *)fz_alloc(n, 1, nmode & 0x20);
    double t0_out = -7.0;

    const int rc = qk_assign_slots(t, n, t0, period, window, gain, slot, inside,
                                   null_t0 ? NULL : &t0_out);

    const int einval = !(period > 0.0) || !isfinite(period) || !isfinite(t0) || window < 0 ||
                       !(gain >= 0.0 && gain <= 1.0) || null_t0 || null_bufs;
    if (einval) {
        FZ_CHECK(rc == QK_EINVAL);
    } else {
        int64_t *ws = (int64_t *)fz_alloc(n, sizeof *ws, 1);
        uint8_t *wi = (uint8_t *)fz_alloc(n, 1, 1);
        double want_t0 = 0.0;
        const int want = reference(t, n, t0, period, window, gain, ws, wi, &want_t0);
        FZ_CHECK(rc == want);
        if (rc == QK_OK) {
            for (size_t j = 0; j < n; j++) FZ_CHECK(slot[j] == ws[j] && inside[j] == wi[j]);
            FZ_CHECK(memcmp(&t0_out, &want_t0, sizeof t0_out) == 0);
        }
        free(ws);
        free(wi);
    }
    free(t);
    free(slot);
    free(inside);
    return 0;
}
