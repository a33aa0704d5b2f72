/* Fuzz target: qk_pack_bits(bits, n, out).
 *
 * Inputs: n bytes that are mostly 0/1, sometimes any value (QK_ENOTBIT), n
 * not a multiple of 8 (the partial last byte), NULL or zero-byte buffers when
 * n == 0.  out holds exactly (n + 7) / 8 bytes.  Oracle: numpy.packbits'
 * order (MSB first), bit by bit. */
#include "fuzz_input.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz_in in = {data, size};
    int seeded;
    const size_t n = fz_length(&in, 1024, 2048, &seeded);
    /* Mostly 0/1; one input in eight may hold other values. */
    const int any = (fz_u8(&in) & 7) == 7;
    uint8_t *bits = fz_bytes(&in, n, seeded, any);
    const size_t nout = (n + 7) / 8;
    uint8_t *out = (uint8_t *)fz_alloc(nout, 1, fz_bool(&in));
    const int rc = qk_pack_bits(bits, n, out);
    int notbit = 0;
    for (size_t j = 0; j < n; j++) notbit |= bits[j] > 1;
    if (notbit) {
        FZ_CHECK(rc == QK_ENOTBIT);
    } else {
        FZ_CHECK(rc == QK_OK);
        for (size_t j = 0; j < 8 * nout; j++) {
            const int want = j < n ? bits[j] : 0;
            FZ_CHECK(((out[j / 8] >> (7 - j % 8)) & 1) == want);
        }
    }
    free(bits);
    free(out);
    return 0;
}
