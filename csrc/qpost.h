/* qpost: post-processing kernels of qnoded (error correction, hashing).
 *
 * Same rules as qkernel.h: plain C99 over caller-owned buffers, no globals,
 * no I/O; every entry point returns QK_OK or a negative QK_E* code.  Bits are
 * uint8 arrays of 0/1; "permuted position" i of pass p means bit perm[i].
 *
 * Cascade here is split so that Alice's side is stateless: she answers
 * parities of ranges of permuted positions from a prefix-parity array, and
 * Bob's side walks binary trees over his blocks, remembering every parity
 * Alice has disclosed so that none is ever asked for twice. */
#ifndef QPOST_H
#define QPOST_H

#include <stddef.h>
#include <stdint.h>

/* A permutation of 0..n-1 that shuffles each frame [f*frame, (f+1)*frame)
 * within itself, the last frame holding the remaining frame..2*frame-1 bits
 * (Fisher-Yates driven by SplitMix64 from seed, so both nodes
 * derive the same one on any platform), and its inverse.  Frames confine
 * Cascade's chains of corrections, so the frames of a key progress in
 * parallel instead of one long chain. */
int qp_permutation(uint64_t seed, int64_t n, int64_t frame, uint32_t *perm, uint32_t *inv);

/* pre[0] = 0, pre[i+1] = pre[i] ^ bits[perm[i]]  (n+1 entries). */
int qp_prefix_parity(const uint8_t *bits, const uint32_t *perm, int64_t n, uint8_t *pre);

/* out[q] = parity of permuted positions [start[q], end[q]) from a prefix array
 * of n+1 entries; 0 <= start < end <= n. */
int qp_range_parity(const uint8_t *pre, int64_t n, const int64_t *start, const int64_t *end,
                    int64_t nq, uint8_t *out);

/* Parity of each block of k permuted positions (the last may be shorter):
 * out holds ceil(n/k) entries. */
int qp_block_parity(const uint8_t *bits, const uint32_t *perm, int64_t n, int64_t k,
                    uint8_t *out);

/* One step of Bob's binary searches in one pass (block size k over n bits).
 *
 * known: Alice's parity of each tree node, indexed block * 2*kp + node, where
 * kp is the least power of two >= k, node 1 is the whole block and node i has
 * children 2i (the first ceil(len/2) positions) and 2i+1; 2 means unknown.
 * node[s] is the current node of search s (in block blk[s]), which Bob knows
 * holds an odd number of errors.  answers[s], if node_pending[s] is 1, is
 * Alice's parity of the left child of node[s], just received.
 *
 * For each search: record the answer, then descend while the left child's
 * parity is known; stop either at a leaf (err_out[s] = the bit's original
 * index, query unset) or at a node whose left child Alice must be asked
 * (q_start/q_end = its range, node_pending[s] = 1, err_out[s] = -1).
 * Returns QK_OK; bad block/node values give QK_EINVAL. */
int qp_cascade_step(const uint8_t *bits, const uint32_t *perm, int64_t n, int64_t k,
                    uint8_t *known, const int64_t *blk, int64_t *node, uint8_t *node_pending,
                    const uint8_t *answers, int64_t ns, int64_t *q_start, int64_t *q_end,
                    int64_t *err_out);

/* Flip Bob's bits at idx (distinct) and toggle the block parity of every pass
 * that contains them: invs[p], ks[p], bob_par[p] for p < npass. */
int qp_flip(uint8_t *bits, int64_t n, const int64_t *idx, int64_t nidx, int npass,
            const uint32_t *const *invs, const int64_t *ks, uint8_t *const *bob_par);

/* Polynomial hash over GF(2^61 - 1) of a byte string, with t independent
 * points: the data in 7-byte little-endian chunks c_1..c_L, then its length;
 * out[j] = sum c_i r_j^(L+2-i) mod p (Horner).  Two strings of at most L
 * chunks collide for a random r with probability <= (L+1)/p per point.
 * Each r[j] must be < 2^61 - 1. */
int qp_poly61(const uint8_t *data, int64_t len, const uint64_t *r, int t, uint64_t *out);

/* Privacy amplification: a multilinear Carter-Wegman hash modulo the Mersenne
 * prime p = 2^kbits - 1 (kbits a Mersenne exponent, checked by the caller).
 * x (nbits, little-endian bit string: bit i of byte j is bit 8j+i) is cut
 * into nchunks chunks x_1.. of kbits - 1 bits (the last may be shorter);
 * nchunks must be ceil(nbits / (kbits - 1)), or 1 when nbits < kbits.
 * out = ((sum a_i x_i + b) mod p) mod 2^mbits, with each a_i in [1, p-1]
 * (nchunks values of (kbits+7)/8 bytes, little-endian, one after another),
 * b in [0, p-1] ((kbits+7)/8 bytes), out (mbits+7)/8 bytes, mbits < kbits.
 * Two distinct x collide with probability at most 1/(p-1) before the cut to
 * mbits (x and y differ in some chunk j; a_j (x_j - y_j) then takes every
 * nonzero residue once), at most ceil(p/2^mbits)/(p-1) after.  QK_EINVAL on a
 * bad length or a coefficient out of range.  Needs GMP. */
int qp_mersenne_hash(const uint8_t *x, int64_t nbits, const uint8_t *a, int64_t nchunks,
                     const uint8_t *b, int64_t kbits, int64_t mbits, uint8_t *out);

#endif
