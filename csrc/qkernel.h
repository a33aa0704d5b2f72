/* qkernel: time-tag kernels of qnoded.
 *
 * Plain C99 over caller-owned buffers: no allocation, no globals, no I/O.
 * Times are int64 picoseconds, sorted ascending where stated.  Every entry
 * point returns QK_OK or a negative QK_E* code; outputs are only meaningful
 * on QK_OK.  Convention for two streams: a true pair has t_b ~ t_a + offset.
 */
#ifndef QKERNEL_H
#define QKERNEL_H

#include <stddef.h>
#include <stdint.h>

#define QK_OK 0
#define QK_EINVAL (-1)      /* an argument is out of range */
#define QK_ENOTSORTED (-2)  /* an input that must be ascending is not */
#define QK_ECAPACITY (-3)   /* an output buffer is too small */
#define QK_ENOTBIT (-4)     /* a bit array holds a value other than 0 or 1 */

/* Histogram of t_b[j] - t_a[i] over [lo_ps, lo_ps + bin_ps*nbins). */
int qk_diff_histogram(const int64_t *t_a, size_t n_a, const int64_t *t_b, size_t n_b,
                      int64_t lo_ps, int64_t bin_ps, size_t nbins, int64_t *counts);

/* One-to-one pairs with |t_b - t_a - offset| <= window_ps/2, greedy in time;
 * with track_gain > 0 the offset follows each match: off += g*(d - off). */
int qk_coincidences(const int64_t *t_a, size_t n_a, const int64_t *t_b, size_t n_b,
                    int64_t window_ps, double offset_ps, double track_gain,
                    int64_t *idx_a, int64_t *idx_b, size_t cap, size_t *n_out,
                    double *offset_out);

/* Slot of each time: k = round((t - t0)/period); in_window if the residual
 * is within window_ps/2.  With track_gain > 0, t0 follows in-window residuals. */
int qk_assign_slots(const int64_t *t, size_t n, double t0_ps, double period_ps,
                    int64_t window_ps, double track_gain, int64_t *slot, uint8_t *in_window,
                    double *t0_out);

/* Indices where the two basis arrays agree. */
int qk_sift(const uint8_t *basis_a, const uint8_t *basis_b, size_t n, int64_t *keep_idx,
            size_t *n_keep);

/* Pack 0/1 bytes MSB first (numpy.packbits order); out holds (n+7)/8 bytes. */
int qk_pack_bits(const uint8_t *bits, size_t n, uint8_t *out);

/* Positions where two bit arrays differ. */
int qk_count_errors(const uint8_t *a, const uint8_t *b, size_t n, size_t *errors);

#endif
