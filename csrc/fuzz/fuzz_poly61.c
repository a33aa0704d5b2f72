/* Fuzz target: qp_poly61(data, len, r, t, out).
 *
 * Inputs: data of 0 to a few thousand bytes (lengths on every residue mod 7,
 * the chunk size), t from negative to 8, points r that are usually below
 * p = 2^61 - 1 but may equal p or exceed it (QK_EINVAL), a negative len,
 * NULL arrays.  r and out hold exactly t entries.
 *
 * Oracle: Horner over the 7-byte little-endian chunks and then the length,
 * with a multiplication mod p by shift-and-add (no 128-bit products, so it
 * shares nothing with the kernel's folding of the Mersenne modulus). */
#include "fuzz_input.h"
#include "qpost.h"

#define P61 ((((uint64_t)1) << 61) - 1)

/* a * b mod P61 for a, b < P61: double and add; every sum stays below 2^62. */
FZ_NO_COVERAGE
static uint64_t mulmod_slow(uint64_t a, uint64_t b) {
    uint64_t acc = 0;
    for (int bit = 60; bit >= 0; bit--) {
        acc <<= 1;
        if (acc >= P61) acc -= P61;
        if (b >> bit & 1) {
            acc += a;
            if (acc >= P61) acc -= P61;
        }
    }
    return acc;
}

/* Horner over the chunks, then the length. */
FZ_NO_COVERAGE
static uint64_t reference(const uint8_t *msg, size_t len, uint64_t r) {
    uint64_t h = 0;
    for (size_t pos = 0; pos < len; pos += 7) {
        uint64_t chunk = 0;
        for (size_t i = pos; i < len && i < pos + 7; i++)
            chunk |= (uint64_t)msg[i] << (8 * (i - pos));
        h = mulmod_slow((h + chunk) % P61, r);
    }
    return mulmod_slow((h + len % P61) % P61, r);
}

static uint64_t point(fz_in *in) {
    switch (fz_u8(in) & 0x0f) {
    case 0:
        return 0;
    case 1:
        return 1;
    case 2:
        return P61 - 1;
    case 3:
        return P61; /* refused */
    case 4:
        return UINT64_MAX; /* refused */
    default:
        return fz_u64(in) % P61;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz_in in = {data, size};
    int seeded;
    const size_t len = fz_length(&in, 300, 3000, &seeded);
    uint8_t *msg = fz_bytes(&in, len, seeded, 1);
    const uint8_t mode = fz_u8(&in);
    const int t = (int)fz_range(&in, -2, 8);
    const size_t nt = t > 0 ? (size_t)t : 0;
    uint64_t *r = (mode & 3) == 3 ? NULL : (uint64_t *)fz_alloc(nt, sizeof *r, mode & 4);
    uint64_t *out = (mode & 0x18) == 0x18 ? NULL : (uint64_t *)fz_alloc(nt, sizeof *out, mode & 4);
    int bad_point = 0;
    for (size_t j = 0; r && j < nt; j++) {
        r[j] = point(&in);
        bad_point |= r[j] >= P61;
    }
    const int neg_len = (mode & 0x60) == 0x60;
    const int64_t ilen = neg_len ? -(int64_t)fz_range(&in, 1, 100) : (int64_t)len;

    const int rc = qp_poly61(msg, ilen, r, t, out);

    if (neg_len || t <= 0 || !r || !out || bad_point) {
        FZ_CHECK(rc == QK_EINVAL);
    } else {
        FZ_CHECK(rc == QK_OK);
        for (size_t j = 0; j < nt; j++) FZ_CHECK(out[j] == reference(msg, len, r[j]));
    }
    free(msg);
    free(r);
    free(out);
    return 0;
}
