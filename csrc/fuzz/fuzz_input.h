/* fuzz_input: what every harness in csrc/fuzz/ shares.
 *
 * libFuzzer hands a harness a byte string; these helpers decode it into the
 * arguments a caller could pass, legal or not.  Reads past the end yield
 * zeros, so every input decodes to something and a short input means "small
 * and simple" (the fuzzer grows inputs only where that finds new code).
 *
 * Buffers handed to the kernel are allocated with exactly the size the
 * contract names (fz_alloc), never rounded up, so that AddressSanitizer
 * reports a read or write one element past the end.  A zero-length buffer is
 * either NULL or a zero-byte allocation, chosen by the input: both are legal
 * and the kernel must touch neither.
 *
 * Plain C99; static functions only, so each harness is one translation unit
 * and unused helpers cost nothing. */
#ifndef FUZZ_INPUT_H
#define FUZZ_INPUT_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qkernel.h"

/* For a harness's own slow loops (reference models, generators over large
 * buffers): no coverage instrumentation, whose comparison tracing would
 * otherwise cost more than the kernel and steer the fuzzer by the model's
 * branches rather than the kernel's. */
#if defined(__clang__)
/* noinline: inlined into an instrumented caller, the code would be instrumented there. */
#define FZ_NO_COVERAGE __attribute__((no_sanitize("coverage"), noinline))
#else
#define FZ_NO_COVERAGE
#endif

typedef struct {
    const uint8_t *p;
    size_t n;
} fz_in;

static inline uint8_t fz_u8(fz_in *in) {
    if (in->n == 0) return 0;
    in->n--;
    return *in->p++;
}

/* nbytes (<= 8) bytes, little-endian. */
static inline uint64_t fz_bytes_u64(fz_in *in, int nbytes) {
    uint64_t v = 0;
    for (int i = 0; i < nbytes; i++) v |= (uint64_t)fz_u8(in) << (8 * i);
    return v;
}

static inline uint64_t fz_u64(fz_in *in) { return fz_bytes_u64(in, 8); }

static inline int64_t fz_i64(fz_in *in) { return (int64_t)fz_u64(in); }

/* An integer in [lo, hi] (lo <= hi, hi - lo < 2^32), from as few bytes as the
 * span needs, so that the fuzzer's one-byte mutations move it usefully. */
static inline int64_t fz_range(fz_in *in, int64_t lo, int64_t hi) {
    const uint64_t span = (uint64_t)hi - (uint64_t)lo;
    if (span == 0) return lo;
    const int nbytes = span < 0x100 ? 1 : span < 0x10000 ? 2 : 4;
    return (int64_t)((uint64_t)lo + fz_bytes_u64(in, nbytes) % (span + 1));
}

static inline int fz_bool(fz_in *in) { return fz_u8(in) & 1; }

/* An int64 that is usually small (tag byte < 0x80: a signed value of up to
 * two bytes), sometimes a boundary value the kernels test (so that the
 * fuzzer need not guess 2^62 - 1 byte by byte), sometimes raw 64 bits. */
static inline int64_t fz_int(fz_in *in) {
    static const int64_t edges[] = {
        0, 1, -1, 2, 7, 8, 64, 4096, INT64_MAX, INT64_MIN, INT64_MAX - 1, INT64_MIN + 1,
        QK_T_MAX, QK_T_MAX + 1, QK_T_MAX - 1, QK_T_MIN, QK_T_MIN - 1, QK_T_MIN + 1,
        QK_WINDOW_MAX, QK_WINDOW_MAX + 1, -QK_WINDOW_MAX, -QK_WINDOW_MAX - 1,
        (int64_t)1 << 32, ((int64_t)1 << 32) - 1, INT64_MAX / 2, INT64_MAX / 2 + 1,
        INT64_MIN / 2,
    };
    const uint8_t tag = fz_u8(in);
    if (tag < 0x80) return (int64_t)(int16_t)fz_bytes_u64(in, 2);
    if (tag < 0xc0) return edges[tag % (sizeof edges / sizeof edges[0])];
    return fz_i64(in);
}

/* A double: small integers and halves, boundaries, NaN and infinities, or raw bits. */
static inline double fz_double(fz_in *in) {
    const uint8_t tag = fz_u8(in);
    if (tag < 0x80) return (double)(int16_t)fz_bytes_u64(in, 2) * (tag & 1 ? 0.5 : 1.0);
    switch (tag & 0x0f) {
    case 0:
        return 0.0;
    case 1:
        return -0.0;
    case 2:
        return 1.0;
    case 3:
        return 0.5;
    case 4:
        return (double)QK_WINDOW_MAX;
    case 5:
        return -(double)QK_WINDOW_MAX;
    case 6:
        return 4.0e18;
    case 7:
        return 1e300;
    case 8:
        return 5e-324; /* the least subnormal */
    case 9:
        return 1.0 / 0.0;
    case 10:
        return -1.0 / 0.0;
    case 11:
        return 0.0 / 0.0;
    default: {
        const uint64_t bits = fz_u64(in);
        double d;
        memcpy(&d, &bits, sizeof d);
        return d;
    }
    }
}

/* SplitMix64: fills large inputs from a short seed when a harness wants more
 * data than the fuzzer's input holds (long arrays, wide keys). */
static inline uint64_t fz_mix(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* Report the broken invariant and abort(): libFuzzer saves the input. */
#define FZ_CHECK(cond)                                                                   \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "fuzz invariant failed: %s (%s:%d)\n", #cond, __FILE__,      \
                    __LINE__);                                                           \
            abort();                                                                     \
        }                                                                                \
    } while (0)

/* Exactly count * size bytes (count == 0: NULL or a zero-byte block, as
 * null_if_empty says).  Sizes come from the harness, which bounds them. */
static inline void *fz_alloc(size_t count, size_t size, int null_if_empty) {
    if (count == 0 && null_if_empty) return NULL;
    void *p = malloc(count * size);
    if (!p && count * size != 0) abort();
    return p;
}

/* True when rc is one of the codes every entry point may return. */
static inline int fz_known_code(int rc) {
    return rc == QK_OK || rc == QK_EINVAL || rc == QK_ENOTSORTED || rc == QK_ECAPACITY ||
           rc == QK_ENOTBIT || rc == QK_ERANGE;
}

/* A time array as a caller builds one: n entries (up to max_n from the
 * input's bytes, or up to long_n filled by SplitMix64 so that the kernels'
 * blocked loops see more than one block), ascending from a base by deltas of
 * a chosen scale (wrapping in uint64, so a large base or scale runs past
 * QK_T_MAX), then optionally one entry overwritten by an arbitrary value (out
 * of order or out of range).  *sorted and *in_range say what the result is,
 * checked here by plain loops, independently of the kernel. */
static inline int64_t *fz_times(fz_in *in, size_t max_n, size_t long_n, size_t *n_out,
                                int *sorted, int *in_range) {
    const uint8_t mode = fz_u8(in);
    const int is_long = (mode & 0x70) == 0x70;
    const size_t n = (size_t)fz_range(in, 0, (int64_t)(is_long ? long_n : max_n));
    /* Base: small most of the time, an edge value otherwise. */
    const int64_t base = (mode & 0x40) ? fz_int(in) : (int64_t)(int16_t)fz_bytes_u64(in, 2);
    const int shift = (int)fz_range(in, 0, 63);
    const int dup = (mode & 0x08) != 0; /* deltas of 0 or 1 unit: many equal times */
    int64_t *t = (int64_t *)fz_alloc(n, sizeof *t, mode & 0x80);
    uint64_t state = fz_u64(in), acc = (uint64_t)base;
    for (size_t i = 0; i < n; i++) {
        if (i > 0) {
            const uint64_t raw = is_long ? fz_mix(&state) >> 56 : fz_u8(in);
            acc += (dup ? (raw & 1) : raw) << shift;
        }
        t[i] = (int64_t)acc;
    }
    if ((mode & 0x07) == 0x07 && n > 0) t[(size_t)fz_range(in, 0, (int64_t)n - 1)] = fz_int(in);
    *sorted = 1;
    *in_range = 1;
    for (size_t i = 0; i < n; i++) {
        if (i > 0 && t[i] < t[i - 1]) *sorted = 0;
        if (t[i] < QK_T_MIN || t[i] > QK_T_MAX) *in_range = 0;
    }
    *n_out = n;
    return t;
}

/* How long an array is: up to max_n (filled from the input's bytes) or, when
 * the input asks, up to long_n (filled by SplitMix64, *seeded set). */
static inline size_t fz_length(fz_in *in, size_t max_n, size_t long_n, int *seeded) {
    *seeded = (fz_u8(in) & 0x70) == 0x70;
    return (size_t)fz_range(in, 0, (int64_t)(*seeded ? long_n : max_n));
}

/* n bytes: from the input, or from SplitMix64 (seeded), masked to 0/1 unless
 * any_value (the kernels' bit arrays hold 0/1; other values are refused or
 * compared bytewise).  NULL or a zero-byte block when n == 0. */
static inline uint8_t *fz_bytes(fz_in *in, size_t n, int seeded, int any_value) {
    const int null_if_empty = fz_bool(in);
    uint8_t *b = (uint8_t *)fz_alloc(n, 1, null_if_empty);
    uint64_t state = fz_u64(in), word = 0;
    for (size_t i = 0; i < n; i++) {
        if (seeded && i % 8 == 0) word = fz_mix(&state); /* eight bytes a call */
        const uint8_t v = seeded ? (uint8_t)(word >> (8 * (i % 8))) : fz_u8(in);
        b[i] = any_value ? v : (v & 1);
    }
    return b;
}

#endif
