/* qkernel: time-tag kernels of qnoded.
 *
 * Plain C99 over caller-owned buffers: no allocation, no globals, no I/O.
 * Times are int64 picoseconds, sorted ascending where stated, and must lie in
 * [QK_T_MIN, QK_T_MAX] so that every difference of two times fits an int64.
 * Every entry point returns QK_OK or a negative QK_E* code; outputs are only
 * meaningful on QK_OK.  Convention for two streams: a true pair has
 * t_b ~ t_a + offset.
 */
#ifndef QKERNEL_H
#define QKERNEL_H

#include <stddef.h>
#include <stdint.h>

#define QK_OK 0
#define QK_EINVAL (-1)      /* an argument is out of range (or a required pointer is NULL) */
#define QK_ENOTSORTED (-2)  /* an input that must be ascending is not */
#define QK_ECAPACITY (-3)   /* an output buffer is too small */
#define QK_ENOTBIT (-4)     /* a bit array holds a value other than 0 or 1 */
#define QK_ERANGE (-5)      /* a time lies outside [QK_T_MIN, QK_T_MAX] */

/* +-2^62 ps (~53 days around zero): differences of two times cannot overflow. */
#define QK_T_MAX ((int64_t)4611686018427387903)
#define QK_T_MIN (-(int64_t)4611686018427387903)
/* Largest window_ps and |offset_ps| of qk_coincidences: 2^60 ps (~13 days). */
#define QK_WINDOW_MAX ((int64_t)1152921504606846976)

/* Version of the kernel's C interface (bumped on any semantic change). */
int qk_version(void);

/* Histogram of every difference d = t_b[j] - t_a[i] in [lo_ps, lo_ps + bin_ps*nbins):
 * counts[(d - lo_ps) / bin_ps] += 1.  counts (nbins entries) is zeroed first.
 * Both inputs ascending.  Cost O(n_a + n_b + pairs in range). */
int qk_diff_histogram(const int64_t *t_a, size_t n_a, const int64_t *t_b, size_t n_b,
                      int64_t lo_ps, int64_t bin_ps, size_t nbins, int64_t *counts);

/* One-to-one pairs (i, j), greedy in time order.  Both inputs ascending.
 *
 * Window: with the current offset `off` (a double), the accepted differences
 * are the integers d = t_b[j] - t_a[i] (exact int64) with
 *     ceil(off - window_ps/2) <= d <= floor(off + window_ps/2),
 * both bounds evaluated in IEEE double (and clamped to +-4e18).  Rule: a cursor i walks t_a; for each
 * t_b[j] in turn, t_a[i] is skipped (never to be paired) while d exceeds the
 * upper bound; then t_b[j] is paired with t_a[i] if d meets the lower bound
 * (and i advances), otherwise t_b[j] stays unpaired.  So each t_b takes the
 * earliest t_a in its window that no earlier t_b has used or passed.
 * Outputs are ascending in both idx_a and idx_b.
 * Tracking: after each pair, off += track_gain * (d - off) (a first-order loop
 * filter), 0 <= track_gain <= 1; *offset_out is the final off.
 * QK_ECAPACITY if there are more than cap pairs (cap = min(n_a, n_b) always
 * suffices). */
int qk_coincidences(const int64_t *t_a, size_t n_a, const int64_t *t_b, size_t n_b,
                    int64_t window_ps, double offset_ps, double track_gain,
                    int64_t *idx_a, int64_t *idx_b, size_t cap, size_t *n_out,
                    double *offset_out);

/* Slot of each time, all in IEEE double: r = (double)t[j] - t0,
 * k = floor(r * (1/period_ps) + 0.5), residual = r - k*period_ps,
 * slot[j] = k, in_window[j] = |residual| <= window_ps/2 (0 or 1).
 * With track_gain > 0, t0 += track_gain * residual after each in-window time.
 * t need not be sorted. */
int qk_assign_slots(const int64_t *t, size_t n, double t0_ps, double period_ps,
                    int64_t window_ps, double track_gain, int64_t *slot, uint8_t *in_window,
                    double *t0_out);

/* Indices where the two basis arrays agree; keep_idx holds n entries. */
int qk_sift(const uint8_t *basis_a, const uint8_t *basis_b, size_t n, int64_t *keep_idx,
            size_t *n_keep);

/* Pack 0/1 bytes MSB first (numpy.packbits order); out holds (n+7)/8 bytes. */
int qk_pack_bits(const uint8_t *bits, size_t n, uint8_t *out);

/* Positions where two byte arrays differ. */
int qk_count_errors(const uint8_t *a, const uint8_t *b, size_t n, size_t *errors);

#endif
