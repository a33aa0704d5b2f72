/* Fuzz target: qp_cascade_round (Bob's side of Cascade), driven for a whole
 * block the way qnoded/reconcile.py drives it, round trip by round trip.
 *
 * Inputs: a key of 1 to a few hundred bits, 1 to 6 passes (sometimes up to
 * QP_MAX_PASSES + 1, refused), block sizes from 1 to past n (powers of two or
 * not), random shuffles, an error pattern of any density, max_corrected from
 * 0 up.  Alice is honest, or lies on some answers (a peer's bug or tampering:
 * Cascade then flips wrong bits and must stop at max_corrected).  At one
 * chosen round the harness may send a malformed reply (a wrong count, a
 * value other than 0 or 1, NULL), which the contract says changes nothing,
 * and then the right one; or break one of the state fields the kernel
 * validates, after which only memory safety and the return code are checked.
 * Every buffer is exactly as large as the header's sizes say.
 *
 * Oracle: every return code is one the situation allows; every question
 * names a begun pass and a non-empty range inside 0..n and is never asked
 * twice (Alice's disclosed parities are remembered); rounds are bounded by
 * the number of tree nodes; a malformed reply leaves the state byte for byte
 * as it was.  With an honest Alice, every bit Bob flips was an error (so
 * corrected is the number of bits changed, and never more than the errors),
 * max_corrected at or above the number of errors is never exceeded, and at
 * the end every block of every pass has Alice's parity. */
#include "fuzz_input.h"
#include "qpost.h"

typedef struct {
    int npass;
    int64_t n, cap, *nb, *kp;
    uint8_t *bits, **bob_perm, **bob_par, **known;
    int64_t **slot, *s_pass, *s_blk, *s_node;
    uint8_t *s_pending;
} state_view;

/* A copy of everything the state machine owns (not the work scratch). */
FZ_NO_COVERAGE
static uint8_t *snapshot(const qp_cascade *c, const state_view *v, size_t *len) {
    size_t total = sizeof *c + (size_t)v->n + 3 * (size_t)v->cap * sizeof(int64_t) + (size_t)v->cap;
    for (int p = 0; p < v->npass; p++)
        total += (size_t)v->n + (size_t)v->nb[p] * (1 + 2 * (size_t)v->kp[p] + sizeof(int64_t));
    uint8_t *buf = (uint8_t *)malloc(total), *at = buf;
#define PUT(src, bytes)                                                                  \
    do {                                                                                 \
        memcpy(at, (src), (bytes));                                                      \
        at += (bytes);                                                                   \
    } while (0)
    PUT(c, sizeof *c);
    PUT(v->bits, (size_t)v->n);
    PUT(v->s_pass, (size_t)v->cap * sizeof(int64_t));
    PUT(v->s_blk, (size_t)v->cap * sizeof(int64_t));
    PUT(v->s_node, (size_t)v->cap * sizeof(int64_t));
    PUT(v->s_pending, (size_t)v->cap);
    for (int p = 0; p < v->npass; p++) {
        PUT(v->bob_perm[p], (size_t)v->n);
        PUT(v->bob_par[p], (size_t)v->nb[p]);
        PUT(v->known[p], (size_t)v->nb[p] * 2 * (size_t)v->kp[p]);
        PUT(v->slot[p], (size_t)v->nb[p] * sizeof(int64_t));
    }
#undef PUT
    *len = total;
    return buf;
}

static int64_t pow2_at_least(int64_t k) {
    int64_t p = 1;
    while (p < k) p <<= 1;
    return p;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz_in in = {data, size};
    const uint8_t mode = fz_u8(&in);
    const int64_t n = fz_range(&in, 1, mode & 1 ? 300 : 24);
    int npass = (int)fz_range(&in, 1, 6);
    if ((mode & 0x06) == 0x06 && n <= 16) npass = QP_MAX_PASSES + (int)fz_range(&in, 0, 1);
    uint64_t state = fz_u64(&in);

    int64_t *ks = (int64_t *)fz_alloc((size_t)npass, sizeof *ks, 0);
    int64_t *nb = (int64_t *)fz_alloc((size_t)npass, sizeof *nb, 0);
    int64_t *kp = (int64_t *)fz_alloc((size_t)npass, sizeof *kp, 0);
    int64_t cap = 0, nodes = 0;
    for (int p = 0; p < npass; p++) {
        const uint8_t kmode = fz_u8(&in);
        ks[p] = kmode & 1 ? (int64_t)1 << fz_range(&in, 0, 9) : fz_range(&in, 1, n + 3);
        nb[p] = (n + ks[p] - 1) / ks[p];
        kp[p] = pow2_at_least(ks[p]);
        cap += nb[p];
        nodes += nb[p] * 2 * kp[p];
    }
    const int64_t cap_field = cap + (fz_bool(&in) ? fz_range(&in, 0, 3) : 0); /* more is allowed */

    /* Alice's key, Bob's with errors of a density from the input. */
    uint8_t *alice = (uint8_t *)fz_alloc((size_t)n, 1, 0);
    uint8_t *bits = (uint8_t *)fz_alloc((size_t)n, 1, 0);
    uint8_t *initial = (uint8_t *)fz_alloc((size_t)n, 1, 0);
    const uint8_t density = fz_u8(&in);
    int64_t errors = 0;
    for (int64_t i = 0; i < n; i++) {
        const uint64_t r = fz_mix(&state);
        alice[i] = r & 1;
        bits[i] = alice[i] ^ ((r >> 8 & 0xff) < density);
        initial[i] = bits[i];
        errors += bits[i] != alice[i];
    }

    uint32_t **perms = (uint32_t **)calloc((size_t)npass, sizeof *perms);
    uint32_t **invs = (uint32_t **)calloc((size_t)npass, sizeof *invs);
    uint8_t **alice_top = (uint8_t **)calloc((size_t)npass, sizeof *alice_top);
    uint8_t **bob_perm = (uint8_t **)calloc((size_t)npass, sizeof *bob_perm);
    uint8_t **bob_par = (uint8_t **)calloc((size_t)npass, sizeof *bob_par);
    uint8_t **known = (uint8_t **)calloc((size_t)npass, sizeof *known);
    int64_t **slot = (int64_t **)calloc((size_t)npass, sizeof *slot);
    for (int p = 0; p < npass; p++) {
        perms[p] = (uint32_t *)fz_alloc((size_t)n, sizeof **perms, 0);
        invs[p] = (uint32_t *)fz_alloc((size_t)n, sizeof **invs, 0);
        for (int64_t i = 0; i < n; i++) perms[p][i] = (uint32_t)i;
        for (int64_t i = n; i > 1; i--) {
            const int64_t j = (int64_t)(fz_mix(&state) % (uint64_t)i);
            const uint32_t tmp = perms[p][i - 1];
            perms[p][i - 1] = perms[p][j];
            perms[p][j] = tmp;
        }
        for (int64_t i = 0; i < n; i++) invs[p][perms[p][i]] = (uint32_t)i;
        alice_top[p] = (uint8_t *)calloc((size_t)nb[p], 1);
        for (int64_t i = 0; i < n; i++) alice_top[p][i / ks[p]] ^= alice[perms[p][i]];
        bob_perm[p] = (uint8_t *)fz_alloc((size_t)n, 1, 0);
        bob_par[p] = (uint8_t *)fz_alloc((size_t)nb[p], 1, 0);
        known[p] = (uint8_t *)fz_alloc((size_t)(nb[p] * 2 * kp[p]), 1, 0);
        slot[p] = (int64_t *)fz_alloc((size_t)nb[p], sizeof **slot, 0);
    }
    int64_t *work = (int64_t *)fz_alloc((size_t)cap_field, sizeof *work, 0);
    int64_t *s_pass = (int64_t *)fz_alloc((size_t)cap_field, sizeof *s_pass, 0);
    int64_t *s_blk = (int64_t *)fz_alloc((size_t)cap_field, sizeof *s_blk, 0);
    int64_t *s_node = (int64_t *)fz_alloc((size_t)cap_field, sizeof *s_node, 0);
    uint8_t *s_pending = (uint8_t *)fz_alloc((size_t)cap_field, 1, 0);
    int64_t *q_pass = (int64_t *)fz_alloc((size_t)cap_field, sizeof *q_pass, 0);
    int64_t *q_start = (int64_t *)fz_alloc((size_t)cap_field, sizeof *q_start, 0);
    int64_t *q_end = (int64_t *)fz_alloc((size_t)cap_field, sizeof *q_end, 0);
    uint8_t *answers = (uint8_t *)fz_alloc((size_t)cap_field + 1, 1, 0); /* + 1: a reply too long */
    /* Questions asked so far, per pass and range [start, end). */
    const size_t side = (size_t)n + 1;
    uint8_t *asked = (uint8_t *)calloc((size_t)npass * side * side, 1);

    const int lying = (mode & 0x18) == 0x18;
    const uint8_t mc = fz_u8(&in);
    int64_t max_corrected = mc < 0x80 ? n : mc < 0xc0 ? fz_range(&in, 0, errors + 2) : fz_int(&in);
    const uint8_t lie_rate = fz_u8(&in);
    const uint8_t trouble = fz_u8(&in);
    const int64_t trouble_round = fz_range(&in, 0, 20);
    const int malformed = (trouble & 0x0f) >= 1 && (trouble & 0x0f) <= 4;
    const int breaking = (trouble & 0x0f) >= 5 && (trouble & 0x0f) <= 11;
    /* Lies (or a broken state) can make Cascade flip bits without end, as
     * the header says: max_corrected is the caller's bound on that, so the
     * harness keeps it finite there. */
    if ((lying || breaking) && max_corrected > 4 * n) max_corrected = 4 * n;

    qp_cascade c;
    memset(&c, 0, sizeof c);
    c.n = n;
    c.npass = npass;
    c.active = 0;
    c.ks = ks;
    c.perms = (const uint32_t *const *)perms;
    c.invs = (const uint32_t *const *)invs;
    c.alice_top = (const uint8_t *const *)alice_top;
    c.bits = bits;
    c.bob_perm = bob_perm;
    c.bob_par = bob_par;
    c.known = known;
    c.slot = slot;
    c.cap = cap_field;
    c.work = work;
    c.ns = 0;
    c.s_pass = s_pass;
    c.s_blk = s_blk;
    c.s_node = s_node;
    c.s_pending = s_pending;
    c.corrected = 0;
    c.max_corrected = max_corrected;
    const state_view view = {npass, n, cap_field, nb, kp, bits, bob_perm, bob_par, known,
                             slot, s_pass, s_blk, s_node, s_pending};

    int64_t nans = 0, round = 0, nq = -1;
    int broken = 0, finished = 0;
    const int too_many_passes = npass > QP_MAX_PASSES;
    for (;; round++) {
        FZ_CHECK(round <= nodes + 1); /* each round asks at least one new node */
        if (round == trouble_round && malformed) {
            /* A malformed reply: refused, and nothing changes. */
            size_t before_len, after_len;
            uint8_t *before = snapshot(&c, &view, &before_len);
            int rc;
            const int kind = trouble & 0x0f;
            if (kind == 1) {
                rc = qp_cascade_round(&c, answers, nans + 1, q_pass, q_start, q_end, &nq);
            } else if (kind == 2 && nans > 0) {
                rc = qp_cascade_round(&c, answers, nans - 1, q_pass, q_start, q_end, &nq);
            } else if (kind == 3 && nans > 0) {
                const uint8_t keep = answers[nans - 1];
                answers[nans - 1] = (uint8_t)fz_range(&in, 2, 255);
                rc = qp_cascade_round(&c, answers, nans, q_pass, q_start, q_end, &nq);
                answers[nans - 1] = keep;
            } else {
                rc = qp_cascade_round(&c, NULL, nans > 0 ? nans : 1, q_pass, q_start, q_end, &nq);
            }
            FZ_CHECK(rc == QK_EINVAL || rc == QK_ENOTBIT);
            FZ_CHECK(rc != QK_ENOTBIT || kind == 3);
            uint8_t *after = snapshot(&c, &view, &after_len);
            FZ_CHECK(before_len == after_len && memcmp(before, after, before_len) == 0);
            free(before);
            free(after);
        }
        if (round == trouble_round && breaking) {
            /* The caller breaks a field the kernel checks; from here on only
             * memory safety and the return codes are checked. */
            broken = 1;
            const int64_t s = c.ns > 0 ? fz_range(&in, 0, c.ns - 1) : 0;
            switch (trouble & 0x0f) {
            case 5:
                c.active = fz_bool(&in) ? -1 : npass + 1;
                break;
            case 6:
                c.ns = fz_bool(&in) ? -1 : c.cap + 1;
                nans = c.ns > 0 && c.ns <= c.cap ? c.ns : nans;
                break;
            case 7:
                c.cap = cap - 1;
                break;
            case 8:
                if (c.ns > 0) s_pass[s] = fz_int(&in);
                break;
            case 9:
                if (c.ns > 0) s_blk[s] = fz_int(&in);
                break;
            case 10:
                if (c.ns > 0) s_node[s] = fz_int(&in);
                break;
            default:
                if (c.ns > 0) s_pending[s] = 0;
                break;
            }
        }
        const int rc =
            qp_cascade_round(&c, round == 0 ? NULL : answers, nans, q_pass, q_start, q_end, &nq);
        if (too_many_passes || max_corrected < 0) { /* both refused before any work */
            FZ_CHECK(rc == QK_EINVAL);
            break;
        }
        if (broken) {
            FZ_CHECK(rc == QK_OK || rc == QK_EINVAL || rc == QP_ENOTCONVERGED);
            if (rc != QK_OK || nq == 0 || round > nodes) break;
        } else if (rc == QP_ENOTCONVERGED) {
            FZ_CHECK(c.corrected > c.max_corrected);
            FZ_CHECK(lying || errors > max_corrected);
            break;
        } else {
            FZ_CHECK(rc == QK_OK);
            FZ_CHECK(c.corrected <= c.max_corrected);
        }
        FZ_CHECK(nq >= 0 && nq <= c.cap && nq == c.ns);
        if (nq == 0) {
            finished = !broken;
            break;
        }
        /* The questions, and Alice's answers. */
        for (int64_t q = 0; q < nq; q++) {
            const int64_t p = q_pass[q], lo = q_start[q], hi = q_end[q];
            if (broken && (p < 0 || p >= c.active || lo < 0 || lo >= hi || hi > n)) {
                answers[q] = 0;
                continue;
            }
            FZ_CHECK(p >= 0 && p < c.active && c.active <= npass);
            FZ_CHECK(lo >= 0 && lo < hi && hi <= n);
            uint8_t *seen = &asked[((size_t)p * side + (size_t)lo) * side + (size_t)hi];
            FZ_CHECK(broken || !*seen); /* never the same question twice */
            *seen = 1;
            uint8_t parity = 0;
            for (int64_t i = lo; i < hi; i++) parity ^= alice[perms[p][i]];
            if (lying && (fz_mix(&state) & 0xff) < lie_rate) parity ^= 1;
            answers[q] = parity;
        }
        nans = nq;
    }

    if (finished && !lying) {
        /* Honest Alice: only errors were flipped, each once, and no block of
         * any pass is odd any more. */
        int64_t changed = 0;
        for (int64_t i = 0; i < n; i++) {
            if (bits[i] != initial[i]) {
                FZ_CHECK(initial[i] != alice[i]);
                changed++;
            }
        }
        FZ_CHECK(changed == c.corrected && c.corrected <= errors);
        FZ_CHECK(c.active == npass);
        for (int p = 0; p < npass; p++) {
            uint8_t *par = (uint8_t *)calloc((size_t)nb[p], 1);
            for (int64_t i = 0; i < n; i++) par[i / ks[p]] ^= bits[perms[p][i]];
            FZ_CHECK(memcmp(par, alice_top[p], (size_t)nb[p]) == 0);
            free(par);
        }
    }

    for (int p = 0; p < npass; p++) {
        free(perms[p]);
        free(invs[p]);
        free(alice_top[p]);
        free(bob_perm[p]);
        free(bob_par[p]);
        free(known[p]);
        free(slot[p]);
    }
    free(perms);
    free(invs);
    free(alice_top);
    free(bob_perm);
    free(bob_par);
    free(known);
    free(slot);
    free(ks);
    free(nb);
    free(kp);
    free(alice);
    free(bits);
    free(initial);
    free(work);
    free(s_pass);
    free(s_blk);
    free(s_node);
    free(s_pending);
    free(q_pass);
    free(q_start);
    free(q_end);
    free(answers);
    free(asked);
    return 0;
}
