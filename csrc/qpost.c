/* qpost: see qpost.h for the contract of every entry point. */
#include "qpost.h"

#include "qkernel.h"

#include <gmp.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and defined on every
 * platform the same way, which is all a public shuffle needs. */
static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* Uniform in [0, bound) without modulo bias (Lemire's multiply-and-reject). */
static uint64_t below(uint64_t *state, uint64_t bound) {
    unsigned __int128 m = (unsigned __int128)splitmix64(state) * bound;
    uint64_t low = (uint64_t)m;
    if (low < bound) {
        const uint64_t threshold = (0 - bound) % bound;
        while (low < threshold) {
            m = (unsigned __int128)splitmix64(state) * bound;
            low = (uint64_t)m;
        }
    }
    return (uint64_t)(m >> 64);
}

int qp_permutation(uint64_t seed, int64_t n, int64_t frame, uint32_t *perm, uint32_t *inv) {
    if (n < 0 || n > (int64_t)UINT32_MAX || frame <= 0 || (n > 0 && (!perm || !inv)))
        return QK_EINVAL;
    for (int64_t i = 0; i < n; i++) perm[i] = (uint32_t)i;
    uint64_t state = seed;
    int64_t len = 0;
    for (int64_t lo = 0; lo < n; lo += len) {
        /* The last frame takes the tail too (frame..2*frame-1 bits): a short
         * tail frame would be a single late-pass block, whose even error
         * patterns no late pass could split. */
        len = (n - lo - frame >= frame) ? frame : n - lo; /* 2 * frame may overflow */
        for (int64_t i = len - 1; i > 0; i--) {
            const uint64_t j = below(&state, (uint64_t)i + 1);
            const uint32_t tmp = perm[lo + i];
            perm[lo + i] = perm[lo + (int64_t)j];
            perm[lo + (int64_t)j] = tmp;
        }
    }
    for (int64_t i = 0; i < n; i++) inv[perm[i]] = (uint32_t)i;
    return QK_OK;
}

int qp_prefix_parity(const uint8_t *bits, const uint32_t *perm, int64_t n, uint8_t *pre) {
    if (n < 0 || !pre || (n > 0 && (!bits || !perm))) return QK_EINVAL;
    uint8_t acc = 0;
    pre[0] = 0;
    for (int64_t i = 0; i < n; i++) {
        const uint32_t j = perm[i];
        if (j >= (uint64_t)n) return QK_EINVAL;
        acc ^= bits[j] & 1;
        pre[i + 1] = acc;
    }
    return QK_OK;
}

int qp_range_parity(const uint8_t *const *pre, int npass, int64_t n, const int64_t *pass,
                    const int64_t *start, const int64_t *end, int64_t nq, uint8_t *out) {
    if (n < 0 || nq < 0 || npass < 0 || (nq > 0 && (!pre || !pass || !start || !end || !out)))
        return QK_EINVAL;
    for (int64_t q = 0; q < nq; q++) {
        if (pass[q] < 0 || pass[q] >= npass || !pre[pass[q]]) return QK_EINVAL;
        if (start[q] < 0 || start[q] >= end[q] || end[q] > n) return QK_EINVAL;
        const uint8_t *p = pre[pass[q]];
        out[q] = p[end[q]] ^ p[start[q]];
    }
    return QK_OK;
}

int qp_block_parity(const uint8_t *bits, const uint32_t *perm, int64_t n, int64_t k,
                    uint8_t *out) {
    if (n < 0 || k <= 0 || (n > 0 && (!bits || !perm || !out))) return QK_EINVAL;
    for (int64_t lo = 0, b = 0; lo < n; lo += k, b++) {
        const int64_t hi = (n - lo > k) ? lo + k : n;
        uint8_t acc = 0;
        for (int64_t i = lo; i < hi; i++) {
            if (perm[i] >= (uint64_t)n) return QK_EINVAL;
            acc ^= bits[perm[i]];
        }
        out[b] = acc & 1;
    }
    return QK_OK;
}

static int64_t pow2_at_least(int64_t k) {
    int64_t p = 1;
    while (p < k) p <<= 1;
    return p;
}

/* Range [lo, hi) of a tree node: walk down from the block's root along the
 * node's bits (after the leading one), halving as qp_cascade_step does. */
static int node_range(int64_t node, int64_t lo, int64_t hi, int64_t *lo_out, int64_t *hi_out) {
    int depth = 0;
    while ((node >> depth) > 1) depth++;
    for (int d = depth - 1; d >= 0; d--) {
        if (hi - lo < 2) return QK_EINVAL;
        const int64_t mid = lo + (hi - lo + 1) / 2;
        if ((node >> d) & 1) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    *lo_out = lo;
    *hi_out = hi;
    return QK_OK;
}

/* Parity of x[lo..hi), bytes of 0 or 1: eight at a time, the low bits of the
 * XORed words folded together at the end. */
static uint8_t range_xor(const uint8_t *x, int64_t lo, int64_t hi) {
    uint64_t acc = 0;
    int64_t i = lo;
    for (; i < hi && (i & 7); i++) acc ^= x[i];
    for (; i + 8 <= hi; i += 8) {
        uint64_t w;
        memcpy(&w, x + i, 8);
        acc ^= w;
    }
    for (; i < hi; i++) acc ^= x[i];
    acc ^= acc >> 32;
    acc ^= acc >> 16;
    acc ^= acc >> 8;
    return (uint8_t)(acc & 1);
}

/* Run one binary search down from its node while the left child's parity is
 * known.  Returns the error's bit index at a leaf, or -1 with *pending set at
 * a node whose left child Alice must be asked for; sets *bad on a search state
 * that cannot be (the caller broke the state).  Bob's parities come from his
 * key in the pass's order (bob), contiguous. */
static int64_t search_step(const uint8_t *bob, const uint32_t *perm, int64_t n, int64_t k,
                           int64_t kp, uint8_t *known, int64_t b, int64_t *node,
                           uint8_t *pending, int *bad) {
    int64_t nd = *node;
    uint8_t *tree = known + b * 2 * kp;
    const int64_t b_lo = b * k;
    const int64_t b_hi = (n - b_lo > k) ? b_lo + k : n;
    int64_t lo, hi;
    if (nd < 1 || nd >= 2 * kp || node_range(nd, b_lo, b_hi, &lo, &hi) != QK_OK ||
        tree[nd] > 1) { /* a search only ever stands where Alice's parity is known */
        *bad = 1;
        return -1;
    }
    for (;;) {
        if (hi - lo == 1) {
            *node = nd;
            return perm[lo];
        }
        const int64_t mid = lo + (hi - lo + 1) / 2;
        const int64_t left = 2 * nd, right = 2 * nd + 1;
        if (tree[left] > 1 && tree[right] <= 1) tree[left] = tree[nd] ^ tree[right];
        if (tree[left] > 1) {
            *pending = 1;
            *node = nd;
            return -1;
        }
        tree[right] = tree[nd] ^ tree[left];
        if (range_xor(bob, lo, mid) != tree[left]) {
            nd = left;
            hi = mid;
        } else {
            nd = right;
            lo = mid;
        }
    }
}

/* Searches are found through their block (slot), so that ending one can move
 * the last into its place; the work list names blocks: pass p, block b as
 * b * QP_MAX_PASSES + p. */
static void push_work(qp_cascade *c, int64_t *nwork, int64_t p, int64_t b) {
    c->work[(*nwork)++] = b * QP_MAX_PASSES + p;
}

/* A search from the root of odd block b of pass p, queued to run. */
static void start_search(qp_cascade *c, int64_t *nwork, int64_t p, int64_t b) {
    const int64_t s = c->ns++;
    c->s_pass[s] = p;
    c->s_blk[s] = b;
    c->s_node[s] = 1;
    c->s_pending[s] = 0;
    c->slot[p][b] = s;
    push_work(c, nwork, p, b);
}

static void end_search(qp_cascade *c, int64_t s) {
    c->slot[c->s_pass[s]][c->s_blk[s]] = -1;
    const int64_t last = --c->ns;
    if (s == last) return;
    c->s_pass[s] = c->s_pass[last];
    c->s_blk[s] = c->s_blk[last];
    c->s_node[s] = c->s_node[last];
    c->s_pending[s] = c->s_pending[last];
    c->slot[c->s_pass[s]][c->s_blk[s]] = s;
}

/* Flip error x now.  Every block holding it, in every pass begun, changes
 * parity: a search running there starts again from its block's root (a
 * question it posted this round is withdrawn before it is sent; what Alice
 * already disclosed stays in the tree), and a block without one that turned
 * odd gets one. */
static int flip(qp_cascade *c, int64_t *nwork, int64_t x) {
    if (x < 0 || x >= c->n) return QK_EINVAL;
    c->bits[x] ^= 1;
    for (int p = 0; p < c->active; p++) {
        const int64_t i = c->invs[p][x], b = i / c->ks[p];
        c->bob_perm[p][i] ^= 1;
        c->bob_par[p][b] ^= 1;
        const int64_t s = c->slot[p][b];
        if (s >= 0) {
            c->s_node[s] = 1;
            if (c->s_pending[s]) { /* not queued: queue it */
                c->s_pending[s] = 0;
                push_work(c, nwork, p, b);
            }
        } else if (c->bob_par[p][b] != c->alice_top[p][b]) {
            start_search(c, nwork, p, b);
        }
    }
    return ++c->corrected > c->max_corrected ? QP_ENOTCONVERGED : QK_OK;
}

/* Run the queued searches as far as they go without Alice: each ends (at an
 * error, flipped at once, or in a block a flip made even) or posts its next
 * question.  A flip queues the searches it restarts and starts new ones. */
static int run_searches(qp_cascade *c, int64_t nwork) {
    while (nwork > 0) {
        const int64_t key = c->work[--nwork];
        const int64_t p = key % QP_MAX_PASSES, b = key / QP_MAX_PASSES, k = c->ks[p];
        const int64_t s = c->slot[p][b];
        if (s < 0) return QK_EINVAL; /* a queued search always runs */
        if (c->s_node[s] == 1 && c->bob_par[p][b] == c->alice_top[p][b]) {
            end_search(c, s); /* restarted in a block a flip made even */
            continue;
        }
        int bad = 0;
        const int64_t err = search_step(c->bob_perm[p], c->perms[p], c->n, k, pow2_at_least(k),
                                        c->known[p], b, &c->s_node[s], &c->s_pending[s], &bad);
        if (bad) return QK_EINVAL;
        if (err < 0) continue; /* posted a question */
        end_search(c, s);
        const int rc = flip(c, &nwork, err);
        if (rc != QK_OK) return rc;
    }
    return QK_OK;
}

/* Begin the next pass: nothing known below Alice's block parities yet, and a
 * search in every odd block. */
static int begin_pass(qp_cascade *c, int64_t *nwork) {
    const int p = c->active;
    const int64_t k = c->ks[p], kp = pow2_at_least(k), nb = (c->n + k - 1) / k;
    memset(c->known[p], 2, (size_t)(nb * 2 * kp));
    const uint32_t *perm = c->perms[p];
    uint8_t *bob = c->bob_perm[p];
    for (int64_t i = 0; i < c->n; i++) {
        if (perm[i] >= (uint64_t)c->n) return QK_EINVAL;
        bob[i] = c->bits[perm[i]] & 1;
    }
    for (int64_t b = 0; b < nb; b++) {
        if (c->alice_top[p][b] > 1) return QK_ENOTBIT;
        c->known[p][b * 2 * kp + 1] = c->alice_top[p][b];
        c->bob_par[p][b] = range_xor(bob, b * k, (c->n - b * k > k) ? b * k + k : c->n);
        c->slot[p][b] = -1;
    }
    c->active++;
    for (int64_t b = 0; b < nb; b++)
        if (c->bob_par[p][b] != c->alice_top[p][b]) start_search(c, nwork, p, b);
    return QK_OK;
}

int qp_cascade_round(qp_cascade *c, const uint8_t *answers, int64_t nans, int64_t *q_pass,
                     int64_t *q_start, int64_t *q_end, int64_t *nq) {
    if (!c || !nq || !q_pass || !q_start || !q_end) return QK_EINVAL;
    *nq = 0;
    if (c->n < 1 || c->npass < 1 || c->active < 0 || c->active > c->npass || !c->ks ||
        !c->perms || !c->invs || !c->alice_top || !c->bits || !c->bob_perm || !c->bob_par ||
        !c->known || !c->slot || !c->work || !c->s_pass || !c->s_blk || !c->s_node ||
        !c->s_pending || c->npass > QP_MAX_PASSES)
        return QK_EINVAL;
    int64_t cap = 0;
    for (int p = 0; p < c->npass; p++) {
        if (c->ks[p] < 1 || !c->perms[p] || !c->invs[p] || !c->alice_top[p] || !c->bob_perm[p] ||
            !c->bob_par[p] || !c->known[p] || !c->slot[p])
            return QK_EINVAL;
        cap += (c->n + c->ks[p] - 1) / c->ks[p];
    }
    if (c->cap < cap || c->ns < 0 || c->ns > cap || c->max_corrected < 0) return QK_EINVAL;
    if (nans != c->ns || (nans > 0 && !answers)) return QK_EINVAL;
    /* Check everything before changing anything: a bad message leaves the state as it was. */
    for (int64_t s = 0; s < nans; s++) {
        const int64_t p = c->s_pass[s], b = c->s_blk[s], nd = c->s_node[s];
        if (answers[s] > 1) return QK_ENOTBIT;
        if (!c->s_pending[s] || p < 0 || p >= c->active || b < 0 ||
            b >= (c->n + c->ks[p] - 1) / c->ks[p] || c->slot[p][b] != s || nd < 1 ||
            nd >= pow2_at_least(c->ks[p]))
            return QK_EINVAL;
    }
    int64_t nwork = 0;
    for (int64_t s = 0; s < nans; s++) {
        const int64_t p = c->s_pass[s], kp = pow2_at_least(c->ks[p]);
        c->known[p][c->s_blk[s] * 2 * kp + 2 * c->s_node[s]] = answers[s];
        c->s_pending[s] = 0;
        push_work(c, &nwork, p, c->s_blk[s]);
    }
    int rc;
    for (;;) {
        rc = run_searches(c, nwork);
        nwork = 0;
        if (rc != QK_OK || c->ns > 0 || c->active == c->npass) break;
        rc = begin_pass(c, &nwork); /* no block of any pass begun is odd */
        if (rc != QK_OK) break;
    }
    if (rc != QK_OK) return rc;
    /* Every search left has a question: the left child of its node. */
    for (int64_t s = 0; s < c->ns; s++) {
        const int64_t p = c->s_pass[s], b = c->s_blk[s], k = c->ks[p];
        const int64_t b_lo = b * k, b_hi = (c->n - b_lo > k) ? b_lo + k : c->n;
        int64_t lo, hi;
        if (node_range(c->s_node[s], b_lo, b_hi, &lo, &hi) != QK_OK) return QK_EINVAL;
        q_pass[s] = p;
        q_start[s] = lo;
        q_end[s] = lo + (hi - lo + 1) / 2;
    }
    *nq = c->ns;
    return QK_OK;
}

/* ---- hashing ------------------------------------------------------------ */

static const uint64_t P61 = (((uint64_t)1) << 61) - 1;

static uint64_t mulmod61(uint64_t a, uint64_t b) {
    const unsigned __int128 m = (unsigned __int128)a * b;
    uint64_t r = (uint64_t)(m & P61) + (uint64_t)(m >> 61);
    r = (r & P61) + (r >> 61);
    return r >= P61 ? r - P61 : r;
}

static uint64_t addmod61(uint64_t a, uint64_t b) {
    const uint64_t r = a + b; /* both < 2^61: no overflow */
    return r >= P61 ? r - P61 : r;
}

int qp_poly61(const uint8_t *data, int64_t len, const uint64_t *r, int t, uint64_t *out) {
    if (len < 0 || t <= 0 || !r || !out || (len > 0 && !data)) return QK_EINVAL;
    for (int j = 0; j < t; j++)
        if (r[j] >= P61) return QK_EINVAL;
    for (int j = 0; j < t; j++) out[j] = 0;
    for (int64_t pos = 0; pos < len; pos += 7) {
        uint64_t chunk = 0;
        const int64_t take = (len - pos < 7) ? len - pos : 7;
        for (int64_t i = 0; i < take; i++) chunk |= (uint64_t)data[pos + i] << (8 * i);
        for (int j = 0; j < t; j++) out[j] = mulmod61(addmod61(out[j], chunk), r[j]);
    }
    /* The length closes the polynomial, so strings of different lengths (or
     * differing only in trailing zero bytes) give different polynomials. */
    const uint64_t tail = (uint64_t)len % P61;
    for (int j = 0; j < t; j++) out[j] = mulmod61(addmod61(out[j], tail), r[j]);
    return QK_OK;
}

/* Above this many key bits the product a*x is split in two halves computed on
 * two threads; below it a thread costs more than it saves. */
#define QP_SPLIT_BITS 4000000

struct mul_job {
    mpz_ptr out;
    mpz_srcptr x, y;
};

static void *mul_worker(void *arg) {
    struct mul_job *job = arg;
    mpz_mul(job->out, job->x, job->y);
    return NULL;
}

/* out = a * x, on two cores when x is long: a*x = (a*x_hi << h) + a*x_lo. */
static void mul_split(mpz_t out, const mpz_t a, const mpz_t x, int64_t nbits) {
    if (nbits < QP_SPLIT_BITS) {
        mpz_mul(out, a, x);
        return;
    }
    const mp_bitcnt_t h = (mp_bitcnt_t)(nbits / 2);
    mpz_t lo, hi, plo;
    mpz_inits(lo, hi, plo, NULL);
    mpz_tdiv_r_2exp(lo, x, h);
    mpz_tdiv_q_2exp(hi, x, h);
    struct mul_job job = {plo, a, lo};
    pthread_t thread;
    const int threaded = pthread_create(&thread, NULL, mul_worker, &job) == 0;
    if (!threaded) mul_worker(&job);
    mpz_mul(out, a, hi);
    if (threaded) pthread_join(thread, NULL);
    mpz_mul_2exp(out, out, h);
    mpz_add(out, out, plo);
    /* Halves of the key: wipe before freeing. */
    mpz_set_ui(lo, 0);
    mpz_set_ui(hi, 0);
    mpz_set_ui(plo, 0);
    mpz_clears(lo, hi, plo, NULL);
}

/* Bits [from, from + count) of the little-endian bit string x, as a number. */
static void import_bits(mpz_t out, const uint8_t *x, int64_t from, int64_t count) {
    if (count <= 0) { /* no bits: x may be NULL, and NULL + 0 is undefined */
        mpz_set_ui(out, 0);
        return;
    }
    const size_t first = (size_t)(from / 8);
    const size_t last = (size_t)((from + count + 7) / 8);
    mpz_import(out, last - first, -1, 1, 0, 0, x + first);
    mpz_tdiv_q_2exp(out, out, (mp_bitcnt_t)(from % 8));
    mpz_tdiv_r_2exp(out, out, (mp_bitcnt_t)count);
}

struct chunk_job {
    const uint8_t *x, *a;
    int64_t nbits, chunk, lo, hi; /* chunks [lo, hi) */
    size_t kbytes;
    mpz_ptr acc;
    int bad; /* a coefficient out of range */
    mpz_srcptr p;
};

/* acc = sum over the job's chunks of a_i * x_i (each a_i checked in [1, p-1]). */
static void *chunk_worker(void *arg) {
    struct chunk_job *job = arg;
    mpz_t xi, ai;
    mpz_inits(xi, ai, NULL);
    for (int64_t i = job->lo; i < job->hi; i++) {
        const int64_t from = i * job->chunk;
        const int64_t count = from + job->chunk <= job->nbits ? job->chunk : job->nbits - from;
        mpz_import(ai, job->kbytes, -1, 1, 0, 0, job->a + (size_t)i * job->kbytes);
        if (mpz_sgn(ai) == 0 || mpz_cmp(ai, job->p) >= 0) {
            job->bad = 1;
            break;
        }
        import_bits(xi, job->x, from, count);
        mpz_addmul(job->acc, ai, xi);
    }
    /* Pieces of the key and of its products: wipe before freeing. */
    mpz_set_ui(xi, 0);
    mpz_clears(xi, ai, NULL);
    return NULL;
}

int qp_mersenne_hash(const uint8_t *x, int64_t nbits, const uint8_t *a, int64_t nchunks,
                     const uint8_t *b, int64_t kbits, int64_t mbits, uint8_t *out) {
    if (nbits < 0 || kbits < 2 || mbits <= 0 || mbits >= kbits || nchunks < 1) return QK_EINVAL;
    if (!a || !b || !out || (nbits > 0 && !x)) return QK_EINVAL;
    /* Chunks of k - 1 bits, each below p; one chunk holds all of x or none is spare. */
    const int64_t chunk = kbits - 1;
    if (nchunks != (nbits > chunk ? (nbits + chunk - 1) / chunk : 1)) return QK_EINVAL;
    const size_t kbytes = (size_t)(kbits + 7) / 8, mbytes = (size_t)(mbits + 7) / 8;
    mpz_t acc, part, vb, p, hi;
    mpz_inits(acc, part, vb, p, hi, NULL);
    mpz_ui_pow_ui(p, 2, (unsigned long)kbits);
    mpz_sub_ui(p, p, 1);
    mpz_import(vb, kbytes, -1, 1, 0, 0, b);
    int rc = mpz_cmp(vb, p) >= 0 ? QK_EINVAL : QK_OK;
    if (rc == QK_OK && nchunks == 1) {
        /* One chunk: a*x, split over two threads when x is long. */
        mpz_t vx, va;
        mpz_inits(vx, va, NULL);
        import_bits(vx, x, 0, nbits);
        mpz_import(va, kbytes, -1, 1, 0, 0, a);
        if (mpz_sgn(va) == 0 || mpz_cmp(va, p) >= 0) {
            rc = QK_EINVAL;
        } else {
            mul_split(acc, va, vx, nbits);
        }
        mpz_set_ui(vx, 0);
        mpz_clears(vx, va, NULL);
    } else if (rc == QK_OK) {
        /* Several chunks: sum a_i x_i, half the chunks on a second thread. */
        const int64_t mid = nbits >= QP_SPLIT_BITS ? nchunks / 2 : 0;
        struct chunk_job mine = {x, a, nbits, chunk, mid, nchunks, kbytes, acc, 0, p};
        struct chunk_job other = {x, a, nbits, chunk, 0, mid, kbytes, part, 0, p};
        pthread_t thread;
        const int threaded = mid > 0 && pthread_create(&thread, NULL, chunk_worker, &other) == 0;
        if (mid > 0 && !threaded) chunk_worker(&other);
        chunk_worker(&mine);
        if (threaded) pthread_join(thread, NULL);
        if (mine.bad || other.bad) rc = QK_EINVAL;
        mpz_add(acc, acc, part);
    }
    if (rc == QK_OK) {
        mpz_add(acc, acc, vb);
        /* acc mod (2^k - 1): fold the high part onto the low part. */
        while (mpz_cmp(acc, p) >= 0) {
            mpz_tdiv_q_2exp(hi, acc, (mp_bitcnt_t)kbits);
            mpz_tdiv_r_2exp(acc, acc, (mp_bitcnt_t)kbits);
            mpz_add(acc, acc, hi);
            if (mpz_cmp(acc, p) == 0) mpz_set_ui(acc, 0);
        }
        mpz_tdiv_r_2exp(acc, acc, (mp_bitcnt_t)mbits);
        memset(out, 0, mbytes);
        size_t count = 0;
        mpz_export(out, &count, -1, 1, 0, 0, acc);
    }
    /* The key passed through these numbers: wipe before freeing. */
    mpz_set_ui(acc, 0);
    mpz_set_ui(part, 0);
    mpz_set_ui(hi, 0);
    mpz_clears(acc, part, vb, p, hi, NULL);
    return rc;
}
