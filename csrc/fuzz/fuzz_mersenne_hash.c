/* Fuzz target: qp_mersenne_hash(x, nbits, a, nchunks, b, kbits, mbits, out).
 *
 * Inputs: key lengths from 0 bits to a few thousand (every offset of a chunk
 * boundary within a byte), exponents k from 2 to 1300, Mersenne or not (the
 * kernel does not check primality; the arithmetic mod 2^k - 1 is defined for
 * any k), mbits from 1 to k - 1, coefficients a_i and b that are usually in
 * range but may be 0, p or above 2^k (QK_EINVAL), a wrong nchunks, bad
 * lengths, NULL arrays.  x holds exactly (nbits + 7) / 8 bytes, a exactly
 * nchunks coefficients of (k + 7) / 8 bytes, out exactly (mbits + 7) / 8.
 * Two rare modes reach the kernel's two-thread paths (nbits >= 4e6): many
 * chunks split between threads, and one chunk with a product split in
 * halves; their keys are mostly zero so that the oracle stays cheap.
 *
 * Oracle: the same hash in ones'-complement arithmetic on k-bit numbers in
 * 32-bit limbs, written here without GMP: each a_i x_i by schoolbook
 * multiplication folded mod 2^k - 1 (or, for a sparse chunk, as a sum of
 * rotations of a_i, since a * 2^t mod 2^k - 1 is a rotated by t), sums with an
 * end-around carry, then the low mbits.  Validity (QK_EINVAL or not) is
 * decided here from the bytes as well. */
#include "fuzz_input.h"
#include "qpost.h"

#define SPLIT_BITS 4000000 /* qpost.c's QP_SPLIT_BITS */

/* ---- k-bit numbers mod 2^k - 1 in w = ceil(k / 32) little-endian limbs ---- */

FZ_NO_COVERAGE
static uint32_t *bn_new(size_t w) { return (uint32_t *)calloc(w + 1, sizeof(uint32_t)); }

FZ_NO_COVERAGE
static void bn_from_bytes(uint32_t *v, size_t w, const uint8_t *b, size_t nbytes) {
    memset(v, 0, w * sizeof *v);
    for (size_t i = 0; i < nbytes; i++) v[i / 4] |= (uint32_t)b[i] << (8 * (i % 4));
}

/* value >= 2^k - 1: a bit at or above k, or all of the low k bits set.
 * Bytewise: the big modes' coefficients are half a megabyte. */
FZ_NO_COVERAGE
static int bytes_ge_p(const uint8_t *b, size_t nbytes, int64_t k) {
    const size_t full = (size_t)(k / 8);
    const int rest = (int)(k % 8);
    int all = 1;
    for (size_t i = 0; i < nbytes; i++) {
        if (i < full) {
            all &= b[i] == 0xff;
        } else if (i == full && rest) {
            const uint8_t low = (uint8_t)((1u << rest) - 1);
            if (b[i] & ~low) return 1;
            all &= (b[i] & low) == low;
        } else if (b[i]) {
            return 1;
        }
    }
    return all;
}

FZ_NO_COVERAGE
static int bytes_zero(const uint8_t *b, size_t nbytes) {
    for (size_t i = 0; i < nbytes; i++)
        if (b[i]) return 0;
    return 1;
}

/* acc += v mod 2^k - 1, both below 2^k: the carry out of bit k wraps to bit 0
 * (2^k = 1 mod p); that sum cannot carry again. */
FZ_NO_COVERAGE
static void bn_addmod(uint32_t *acc, const uint32_t *v, size_t w, int64_t k) {
    uint64_t carry = 0;
    for (size_t i = 0; i < w; i++) {
        carry += (uint64_t)acc[i] + v[i];
        acc[i] = (uint32_t)carry;
        carry >>= 32;
    }
    uint64_t wrap = carry; /* k == 32 w: the carry out of the top limb is bit k */
    if (k < 32 * (int64_t)w) {
        const size_t q = (size_t)(k / 32);
        const int r = (int)(k % 32);
        wrap = acc[q] >> r & 1;
        acc[q] &= ~((uint32_t)1 << r);
    }
    for (size_t i = 0; i < w && wrap; i++) {
        wrap += acc[i];
        acc[i] = (uint32_t)wrap;
        wrap >>= 32;
    }
}

/* dst (w limbs) = bits [s, s + 32 w) of src (ws limbs), zero beyond src. */
FZ_NO_COVERAGE
static void bn_shr(uint32_t *dst, size_t w, const uint32_t *src, size_t ws, int64_t s) {
    const size_t q = (size_t)(s / 32);
    const int r = (int)(s % 32);
    for (size_t i = 0; i < w; i++) {
        const uint64_t lo = q + i < ws ? src[q + i] : 0;
        const uint64_t hi = q + i + 1 < ws ? src[q + i + 1] : 0;
        dst[i] = (uint32_t)((lo | hi << 32) >> r);
    }
}

/* dst (w limbs) = src << s, the bits at and above k dropped. */
FZ_NO_COVERAGE
static void bn_shl_k(uint32_t *dst, const uint32_t *src, size_t w, int64_t s, int64_t k) {
    const size_t q = (size_t)(s / 32);
    const int r = (int)(s % 32);
    for (size_t i = w; i-- > 0;) {
        const uint64_t hi = i >= q ? src[i - q] : 0;
        const uint64_t lo = i >= q + 1 ? src[i - q - 1] : 0;
        dst[i] = (uint32_t)(((hi << 32 | lo) << r) >> 32);
    }
    if (k < 32 * (int64_t)w) {
        dst[k / 32] &= ((uint32_t)1 << (k % 32)) - 1;
        for (size_t i = (size_t)(k / 32) + 1; i < w; i++) dst[i] = 0;
    }
}

/* acc += a * x mod 2^k - 1 by schoolbook multiplication, then folding the
 * product: low k bits + the rest (< 2^k, as a < 2^k and x < 2^(k-1)). */
FZ_NO_COVERAGE
static void bn_muladd_dense(uint32_t *acc, const uint32_t *a, const uint32_t *x, size_t w,
                            int64_t k) {
    uint32_t *prod = (uint32_t *)calloc(2 * w + 1, sizeof *prod);
    for (size_t i = 0; i < w; i++) {
        uint64_t carry = 0;
        for (size_t j = 0; j < w; j++) {
            carry += (uint64_t)a[i] * x[j] + prod[i + j];
            prod[i + j] = (uint32_t)carry;
            carry >>= 32;
        }
        prod[i + w] = (uint32_t)carry;
    }
    uint32_t *lo = bn_new(w), *hi = bn_new(w);
    bn_shl_k(lo, prod, w, 0, k);
    bn_shr(hi, w, prod, 2 * w, k);
    bn_addmod(lo, hi, w, k);
    bn_addmod(acc, lo, w, k);
    free(prod);
    free(lo);
    free(hi);
}

/* acc += a * x mod 2^k - 1 as the sum over the set bits t of x (count bits
 * from bit `from` of the key) of a rotated left by t within k bits. */
FZ_NO_COVERAGE
static void bn_muladd_sparse(uint32_t *acc, const uint32_t *a, const uint8_t *key, int64_t from,
                             int64_t count, size_t w, int64_t k) {
    uint32_t *left = bn_new(w), *right = bn_new(w);
    for (int64_t t = 0; t < count; t++) {
        const int64_t bit = from + t;
        if (bit % 8 == 0 && t + 8 <= count && key[bit / 8] == 0) { /* a zero byte */
            t += 7;
            continue;
        }
        if (!(key[bit / 8] >> (bit % 8) & 1)) continue;
        bn_shl_k(left, a, w, t, k);
        bn_shr(right, w, a, w, k - t); /* t < k: the top t bits of a, now at the bottom */
        bn_addmod(acc, left, w, k);
        bn_addmod(acc, right, w, k);
    }
    free(left);
    free(right);
}

/* Bits [from, from + count) of the key, as a number in w limbs. */
FZ_NO_COVERAGE
static void bn_key_bits(uint32_t *v, size_t w, const uint8_t *key, int64_t from, int64_t count) {
    memset(v, 0, w * sizeof *v);
    for (int64_t t = 0; t < count; t++) {
        const int64_t bit = from + t;
        v[t / 32] |= (uint32_t)(key[bit / 8] >> (bit % 8) & 1) << (t % 32);
    }
}

/* The expected output bytes; cost limited by the caller. */
FZ_NO_COVERAGE
static void reference(const uint8_t *x, int64_t nbits, const uint8_t *a, int64_t nchunks,
                      const uint8_t *b, int64_t k, int64_t m, uint8_t *want) {
    const size_t w = (size_t)((k + 31) / 32), kbytes = (size_t)((k + 7) / 8);
    const int64_t chunk = k - 1;
    uint32_t *acc = bn_new(w), *av = bn_new(w), *xv = bn_new(w);
    for (int64_t i = 0; i < nchunks; i++) {
        const int64_t from = i * chunk;
        const int64_t count = from + chunk <= nbits ? chunk : nbits - from;
        if (count <= 0) continue;
        /* All-zero chunks add nothing (the big modes' keys are mostly zero). */
        if (bytes_zero(x + from / 8, (size_t)((from + count + 7) / 8 - from / 8))) continue;
        bn_from_bytes(av, w, a + (size_t)i * kbytes, kbytes);
        int64_t ones = 0;
        for (int64_t t = from; t < from + count && ones * 32 < (int64_t)w; t++) {
            if (t % 8 == 0 && t + 8 <= from + count && x[t / 8] == 0) { /* a zero byte */
                t += 7;
                continue;
            }
            ones += x[t / 8] >> (t % 8) & 1;
        }
        if (ones * 32 < (int64_t)w) {
            bn_muladd_sparse(acc, av, x, from, count, w, k);
        } else {
            bn_key_bits(xv, w, x, from, count);
            bn_muladd_dense(acc, av, xv, w, k);
        }
    }
    bn_from_bytes(av, w, b, kbytes);
    bn_addmod(acc, av, w, k);
    /* 2^k - 1 is p itself: zero. */
    int all = 1;
    for (size_t i = 0; i < w; i++) {
        const int64_t bits = k - 32 * (int64_t)i < 32 ? k - 32 * (int64_t)i : 32;
        all &= acc[i] == (uint32_t)(((uint64_t)1 << bits) - 1);
    }
    if (all) memset(acc, 0, w * sizeof *acc);
    const size_t mbytes = (size_t)((m + 7) / 8);
    memset(want, 0, mbytes);
    for (int64_t t = 0; t < m; t++)
        want[t / 8] |= (uint8_t)((acc[t / 32] >> (t % 32) & 1) << (t % 8));
    free(acc);
    free(av);
    free(xv);
}

/* A coefficient of kbytes bytes: in [lo, p - 1] most of the time (random bits
 * masked to k bits, p itself and values below lo moved inside), else 0, p,
 * or a bit above k. */
FZ_NO_COVERAGE
static void coefficient(uint8_t *c, size_t kbytes, int64_t k, int lo, uint64_t *state, int bad) {
    for (size_t i = 0; i < kbytes; i++) c[i] = (uint8_t)fz_mix(state);
    if (k % 8) c[kbytes - 1] &= (uint8_t)((1u << (k % 8)) - 1);
    switch (bad) {
    case 1: /* zero */
        memset(c, 0, kbytes);
        return;
    case 2: /* p = 2^k - 1 */
        memset(c, 0xff, kbytes);
        if (k % 8) c[kbytes - 1] = (uint8_t)((1u << (k % 8)) - 1);
        return;
    case 3: /* a bit above k, where there is room in the top byte */
        if (k % 8) c[kbytes - 1] |= (uint8_t)(1u << (k % 8));
        return;
    default:
        break;
    }
    if (bytes_ge_p(c, kbytes, k)) c[0] &= 0xfe; /* p -> p - 1 */
    if (lo && bytes_zero(c, kbytes)) c[0] = 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz_in in = {data, size};
    static const int64_t mersenne[] = {2,  3,  5,   7,   13,  17,  19,  31,
                                       61, 89, 107, 127, 521, 607, 1279};
    const uint8_t mode = fz_u8(&in);
    const int big = mode == 0xb1 ? 1 : mode == 0xb2 ? 2 : 0; /* the two-thread paths */
    int64_t k, nbits;
    if (big == 1) { /* many chunks, half on a second thread */
        k = mersenne[fz_range(&in, 8, 12)];
        nbits = SPLIT_BITS + fz_range(&in, 0, 5000);
    } else if (big == 2) { /* one chunk longer than SPLIT_BITS: the product in halves */
        nbits = SPLIT_BITS + fz_range(&in, 0, 5000);
        k = nbits + 1 + fz_range(&in, 0, 100);
    } else {
        k = mode & 1 ? mersenne[fz_range(&in, 0, 14)] : fz_range(&in, 2, 1300);
        nbits = fz_range(&in, 0, mode & 2 ? 3000 : 200);
    }
    const size_t kbytes = (size_t)((k + 7) / 8), xbytes = (size_t)((nbits + 7) / 8);
    const int64_t chunk = k - 1;
    const int64_t want_chunks = nbits > chunk ? (nbits + chunk - 1) / chunk : 1;
    /* The key: from the input (big modes: mostly zero, a few bytes from the
     * input placed at the start, around the middle and at the end). */
    uint8_t *x = (uint8_t *)fz_alloc(xbytes, 1, fz_bool(&in));
    if (big) {
        memset(x, 0, xbytes);
        /* One chunk of 4e6 bits is summed as rotations of a (one per set
         * bit, each 4e6 bits long): a byte per place there, four otherwise. */
        const size_t per = big == 2 ? 1 : 4;
        const size_t at[3] = {0, xbytes / 2 - 2, xbytes - 4};
        for (int s = 0; s < 3; s++)
            for (size_t i = 0; i < per; i++) x[at[s] + i] = fz_u8(&in);
    } else {
        for (size_t i = 0; i < xbytes; i++) x[i] = fz_u8(&in);
    }
    /* Junk in the last byte past nbits, which the hash must ignore. */
    if (xbytes && nbits % 8) x[xbytes - 1] |= (uint8_t)(fz_u8(&in) & (0xff << (nbits % 8)));

    const uint8_t shape = big ? 0 : fz_u8(&in);
    int64_t m = fz_range(&in, 1, k - 1 < 4000 ? k - 1 : 4000);
    int64_t nchunks = want_chunks, kk = k, nb = nbits;
    switch (shape & 0x0f) { /* one bad length at a time */
    case 1:
        nchunks = want_chunks + 1;
        break;
    case 2:
        nchunks = want_chunks - 1;
        break;
    case 3:
        m = fz_bool(&in) ? k : 0;
        break;
    case 4:
        nb = -1 - fz_range(&in, 0, 100);
        break;
    case 5:
        kk = fz_range(&in, -2, 1); /* kbits < 2 */
        break;
    default:
        break;
    }
    const size_t achunks = nchunks > 0 ? (size_t)nchunks : 0;
    uint8_t *a = (uint8_t *)fz_alloc(achunks * kbytes, 1, 1);
    uint8_t *b = (uint8_t *)fz_alloc(kbytes, 1, 0);
    uint64_t state = fz_u64(&in);
    /* At most one coefficient out of range, in one input in four. */
    const uint8_t bad = fz_u8(&in);
    const int bad_kind = (bad & 3) == 3 ? 1 + (int)fz_range(&in, 0, 2) : 0;
    const int64_t bad_at = fz_range(&in, 0, (int64_t)achunks); /* == achunks: b */
    for (size_t i = 0; i < achunks; i++)
        coefficient(a + i * kbytes, kbytes, k, 1, &state, bad_at == (int64_t)i ? bad_kind : 0);
    /* b may be 0: "bad" for b is p or a bit above k only. */
    const int b_bad = bad_at == (int64_t)achunks && bad_kind != 1 ? bad_kind : 0;
    coefficient(b, kbytes, k, 0, &state, b_bad);
    const size_t mbytes = m > 0 ? (size_t)((m + 7) / 8) : 0;
    uint8_t *out = (uint8_t *)fz_alloc(mbytes, 1, 0);
    const uint8_t nulls = (shape >> 4) == 0x0f ? fz_u8(&in) % 4 : 0;

    const int rc = qp_mersenne_hash(nulls == 1 ? NULL : x, nb, nulls == 2 ? NULL : a, nchunks,
                                     nulls == 3 ? NULL : b, kk, m, out);

    int shape_bad = nb < 0 || kk < 2 || m <= 0 || m >= kk || nchunks != want_chunks ||
                    nulls == 2 || nulls == 3 || (nulls == 1 && nbits > 0);
    int value_bad = bytes_ge_p(b, kbytes, k);
    for (size_t i = 0; i < achunks; i++)
        value_bad |= bytes_zero(a + i * kbytes, kbytes) || bytes_ge_p(a + i * kbytes, kbytes, k);
    if (shape_bad || value_bad) {
        FZ_CHECK(rc == QK_EINVAL);
    } else {
        FZ_CHECK(rc == QK_OK);
        uint8_t *want = (uint8_t *)fz_alloc(mbytes, 1, 0);
        reference(x, nbits, a, nchunks, b, k, m, want);
        for (size_t i = 0; i < mbytes; i++) FZ_CHECK(out[i] == want[i]);
        free(want);
    }
    free(x);
    free(a);
    free(b);
    free(out);
    return 0;
}
