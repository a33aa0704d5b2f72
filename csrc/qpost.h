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

#define QP_ENOTCONVERGED (-16) /* Cascade flipped more bits than the caller allows */
#define QP_MAX_PASSES 64        /* passes of a Cascade plan, at most */

/* A permutation of 0..n-1 that shuffles each frame [f*frame, (f+1)*frame)
 * within itself, the last frame holding the remaining frame..2*frame-1 bits
 * (Fisher-Yates driven by SplitMix64 from seed, so both nodes
 * derive the same one on any platform), and its inverse.  Frames confine
 * Cascade's chains of corrections, so the frames of a key progress in
 * parallel instead of one long chain. */
int qp_permutation(uint64_t seed, int64_t n, int64_t frame, uint32_t *perm, uint32_t *inv);

/* pre[0] = 0, pre[i+1] = pre[i] ^ bits[perm[i]]  (n+1 entries). */
int qp_prefix_parity(const uint8_t *bits, const uint32_t *perm, int64_t n, uint8_t *pre);

/* out[q] = parity of permuted positions [start[q], end[q]) of pass pass[q],
 * from that pass's prefix array pre[pass[q]] (n+1 entries);
 * 0 <= pass < npass, 0 <= start < end <= n. */
int qp_range_parity(const uint8_t *const *pre, int npass, int64_t n, const int64_t *pass,
                    const int64_t *start, const int64_t *end, int64_t nq, uint8_t *out);

/* Parity of each block of k permuted positions (the last may be shorter):
 * out holds ceil(n/k) entries. */
int qp_block_parity(const uint8_t *bits, const uint32_t *perm, int64_t n, int64_t k,
                    uint8_t *out);

/* Bob's side of Cascade for one block: a state machine driven one round trip
 * at a time by qp_cascade_round.  Every buffer is the caller's, sized from the
 * plan; nb[p] = ceil(n / ks[p]) blocks in pass p, kp[p] the least power of two
 * >= ks[p]; npass <= QP_MAX_PASSES.  The caller sets every field before the
 * first round (active, ns and corrected zero) and never touches the state
 * between rounds.
 *
 * A binary search runs in every odd block of every pass begun, all of them
 * asking their next question in the same round trip.  An error found is
 * flipped at once: every block holding it, in every pass begun, changes
 * parity, and a search already running there starts again from its block's
 * root, which costs no question where Alice's parities are known.  When no
 * block of any pass begun is odd, the next pass begins; after the last,
 * Cascade is done. */
typedef struct {
    int64_t n;                       /* key bits */
    int npass;                       /* passes in the plan */
    int active;                      /* passes begun so far */
    const int64_t *ks;               /* [npass] block size of each pass */
    const uint32_t *const *perms;    /* [npass][n] permuted position -> bit */
    const uint32_t *const *invs;     /* [npass][n] bit -> permuted position */
    const uint8_t *const *alice_top; /* [npass][nb] Alice's block parities */
    uint8_t *bits;                   /* [n] Bob's key, corrected in place */
    uint8_t *const *bob_perm;        /* [npass][n] Bob's key in each pass's order */
    uint8_t *const *bob_par;         /* [npass][nb] Bob's block parities */
    uint8_t *const *known;           /* [npass][nb * 2 * kp] Alice's parity per tree node, 2: unknown */
    int64_t *const *slot;            /* [npass][nb] the search running in the block, or -1 */
    int64_t cap;                     /* sum of nb over passes: searches and questions at most */
    int64_t *work;                   /* [cap] scratch: the searches queued to run */
    int64_t ns;                      /* searches running */
    int64_t *s_pass, *s_blk, *s_node; /* [cap] per search: pass, block, current tree node */
    uint8_t *s_pending;              /* [cap] the search asked for its node's left child */
    int64_t corrected;               /* bits flipped so far */
    int64_t max_corrected;           /* QP_ENOTCONVERGED beyond this many */
} qp_cascade;

/* Bob's next round: record Alice's answers to the last questions (nans of
 * them, one per running search, in order; none before the first round), run
 * the cascade as far as it goes without her, and write the next questions
 * (ranges q_start..q_end of permuted positions of pass q_pass, one per running
 * search, cap entries each) and their number to *nq; *nq == 0 when Cascade is
 * done.  Answers that do not match the questions (QK_EINVAL) or are not 0 or
 * 1 (QK_ENOTBIT) are refused before anything changes; a state the caller broke
 * (QK_EINVAL, QK_ENOTBIT for an Alice parity above 1) may be found midway, and
 * the block is lost either way; QP_ENOTCONVERGED when more than max_corrected
 * bits were flipped (wrong parities can make Cascade flip bits forever): give
 * up the block. */
int qp_cascade_round(qp_cascade *c, const uint8_t *answers, int64_t nans, int64_t *q_pass,
                     int64_t *q_start, int64_t *q_end, int64_t *nq);

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
