"""Error correction: Cascade, with Alice answering and Bob asking.

Alice's side is stateless: from her bits and the public plan she sends the
top-level parity of every block of every pass at once, then answers parities
of ranges of permuted positions (O(1) each, from prefix parities).  Bob's side
is a state machine in C (``qp_cascade_step``): binary searches in all odd
blocks of one pass at a time, remembering every parity Alice has disclosed
(per block, as a binary tree) so that none is asked for twice; each error found
toggles the blocks that hold it in every pass so far, and the cascade goes on
until no block of any pass is odd.

Leakage is counted where it happens, at Alice: one bit per parity she
discloses.  The plan's block sizes follow Martinez-Mateo et al., "Demystifying
the information reconciliation protocol Cascade" (QIC 15, 2015): a first pass
of about 1/QBER bits, a second of about sqrt(4096/QBER), then passes of half
the key, which find the rare pairs of errors the first two left behind.

Cascade can leave an even number of errors in every block of every pass: the
verification hash (:mod:`qnoded.amplify`) catches that, and the block is
discarded.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from qnoded._qkernel import ffi, lib
from qnoded.estimation import h2
from qnoded.kernel import check_status, checked_array, pointer

U8 = npt.NDArray[np.uint8]
U32 = npt.NDArray[np.uint32]
I64 = npt.NDArray[np.int64]

MIN_QBER = 1e-3  # below this, plan as if 0.1 %: blocks beyond ~1000 bits gain nothing
MAX_QBER = 0.25  # above this no BB84 key survives; the plan stays defined
# After the first two passes, a few passes of larger blocks find the rare
# error patterns the first two left (even counts in every block); a few
# hundred parities per megabit.  Measured on 400 blocks of 3e5 bits at 1 %
# QBER: 2 late passes left errors in 7 (1.8 %, each a block lost at
# verification), 3 in 1-3, 4 in none, for f 1.056 -> 1.059.
LATE_PASSES = 4
LATE_BLOCK_FACTOR = 8
# Frames bound the chains of corrections (see qp_permutation): 2^16 bits keep
# f within about 0.03 of one long frame with two to three times fewer rounds.
DEFAULT_FRAME = 2**16


class ReconcileError(Exception):
    """A Cascade message does not fit the plan or the state of the exchange."""


class NotConvergingError(ReconcileError):
    """Bob's cascade flipped more bits than the block can hold errors: wrong parities."""


@dataclass(frozen=True, slots=True)
class CascadePlan:
    """What both sides agree on before a block: its length, passes and shuffles."""

    n: int
    block_sizes: tuple[int, ...]
    seed: int
    frame: int = DEFAULT_FRAME

    def __post_init__(self) -> None:
        if self.n < 2:
            raise ReconcileError(f"a Cascade block needs at least 2 bits, got {self.n}")
        if self.frame < 2 or self.frame & (self.frame - 1):
            raise ReconcileError(f"frame {self.frame} is not a power of two >= 2")
        if not self.block_sizes or any(
            k < 1 or k > self.frame or self.frame % k for k in self.block_sizes
        ):
            raise ReconcileError(
                f"block sizes {self.block_sizes} must divide the frame of {self.frame} bits"
            )
        if not 0 <= self.seed < 2**64:
            raise ReconcileError(f"seed {self.seed} is not a 64-bit unsigned integer")

    @classmethod
    def for_qber(cls, n: int, qber: float, seed: int, frame: int = DEFAULT_FRAME) -> CascadePlan:
        q = min(max(qber, MIN_QBER), MAX_QBER)
        alpha = math.log2(1.0 / q) - 0.5
        half = max(1, frame // 2)
        k1 = min(2 ** math.ceil(alpha), half)
        k2 = min(2 ** math.ceil((alpha + 12.0) / 2.0), half)
        late = min(LATE_BLOCK_FACTOR * k2, half)
        return cls(n=n, block_sizes=(k1, k2) + (late,) * LATE_PASSES, seed=seed, frame=frame)

    def n_blocks(self, p: int) -> int:
        return -(-self.n // self.block_sizes[p])

    def shuffles(self) -> tuple[tuple[U32, U32], ...]:
        return _shuffles(self.n, self.seed, len(self.block_sizes), self.frame)


@lru_cache(maxsize=4)
def _shuffles(n: int, seed: int, passes: int, frame: int) -> tuple[tuple[U32, U32], ...]:
    """Permutation and inverse of each pass (cached: a link reuses one plan)."""
    out = []
    for p in range(passes):
        perm = np.empty(n, dtype=np.uint32)
        inv = np.empty(n, dtype=np.uint32)
        # Each pass's sub-seed is a hash of (seed, pass): seeds that differ by
        # a constant would replay one SplitMix64 stream, shifted, and give
        # nearly the same shuffle in every pass.
        digest = hashlib.blake2b(f"cascade:{seed}:{p}".encode(), digest_size=8).digest()
        sub = int.from_bytes(digest, "little")
        check_status(
            lib.qp_permutation(
                sub, n, frame, pointer("uint32_t *", perm), pointer("uint32_t *", inv)
            ),
            "qp_permutation",
        )
        perm.flags.writeable = False
        inv.flags.writeable = False
        out.append((perm, inv))
    return tuple(out)


def _bits(name: str, bits: object, n: int) -> U8:
    arr: U8 = checked_array(name, bits, np.uint8, make_contiguous=True)
    if arr.shape[0] != n:
        raise ReconcileError(f"{name} has {arr.shape[0]} bits, the plan says {n}")
    return arr


def block_parities(bits: U8, plan: CascadePlan, p: int) -> U8:
    perm, _ = plan.shuffles()[p]
    out = np.empty(plan.n_blocks(p), dtype=np.uint8)
    check_status(
        lib.qp_block_parity(
            pointer("uint8_t *", bits),
            pointer("uint32_t *", perm),
            plan.n,
            plan.block_sizes[p],
            pointer("uint8_t *", out),
        ),
        "qp_block_parity",
    )
    return out


@dataclass(slots=True)
class Query:
    """Bob asks Alice for parities of ranges of permuted positions.

    Entry ``i`` is the range ``[start[i], end[i])`` in pass ``pass_index[i]``.
    """

    pass_index: I64
    start: I64
    end: I64

    def __len__(self) -> int:
        return int(self.start.shape[0])


class CascadeAlice:
    """Alice: discloses block parities and answers range queries; counts leakage."""

    def __init__(self, bits: U8, plan: CascadePlan) -> None:
        self.plan = plan
        self._bits = _bits("Alice's key", bits, plan.n)
        self.leaked_bits = 0
        self._prefix: dict[int, U8] = {}

    def top_parities(self) -> list[U8]:
        out = [block_parities(self._bits, self.plan, p) for p in range(len(self.plan.block_sizes))]
        self.leaked_bits += sum(int(a.shape[0]) for a in out)
        return out

    def _prefix_of(self, p: int) -> U8:
        pre = self._prefix.get(p)
        if pre is None:
            perm, _ = self.plan.shuffles()[p]
            pre = np.empty(self.plan.n + 1, dtype=np.uint8)
            check_status(
                lib.qp_prefix_parity(
                    pointer("uint8_t *", self._bits),
                    pointer("uint32_t *", perm),
                    self.plan.n,
                    pointer("uint8_t *", pre),
                ),
                "qp_prefix_parity",
            )
            self._prefix[p] = pre
        return pre

    def answer(self, query: Query) -> U8:
        """Parities of the asked ranges, in the order asked."""
        passes = np.ascontiguousarray(query.pass_index, dtype=np.int64)
        start = np.ascontiguousarray(query.start, dtype=np.int64)
        end = np.ascontiguousarray(query.end, dtype=np.int64)
        if not (passes.ndim == start.ndim == end.ndim == 1) or not (
            passes.shape == start.shape == end.shape
        ):
            raise ReconcileError("query pass, start and end arrays differ in shape")
        npass = len(self.plan.block_sizes)
        out = np.empty(start.shape[0], dtype=np.uint8)
        for p in np.unique(passes).tolist():
            if not 0 <= p < npass:
                raise ReconcileError(f"query for pass {p}, the plan has {npass}")
            sel = np.flatnonzero(passes == p)
            s_p, e_p = np.ascontiguousarray(start[sel]), np.ascontiguousarray(end[sel])
            o_p = np.empty(sel.shape[0], dtype=np.uint8)
            rc = lib.qp_range_parity(
                pointer("uint8_t *", self._prefix_of(p)),
                self.plan.n,
                pointer("int64_t *", s_p),
                pointer("int64_t *", e_p),
                sel.shape[0],
                pointer("uint8_t *", o_p),
            )
            if rc == lib.QK_EINVAL:
                raise ReconcileError(
                    f"query for pass {p} asks for a range outside 0..{self.plan.n}"
                )
            check_status(rc, "qp_range_parity")
            out[sel] = o_p
        self.leaked_bits += int(out.shape[0])
        return out


@dataclass(slots=True)
class _Searches:
    """Binary searches under way in the odd blocks of one pass."""

    blocks: I64
    node: I64
    pending: U8


class CascadeBob:
    """Bob: corrects his copy by asking for parities until no block is odd."""

    def __init__(
        self, bits: U8, plan: CascadePlan, alice_top: list[U8], *, max_corrected: int | None = None
    ) -> None:
        self.plan = plan
        # Wrong parities (a bug, or answers changed on the way) can make the
        # cascade flip bits forever, even without asking anything: cached
        # parities let searches end locally.  Past this many flips, give up.
        self.max_corrected = plan.n if max_corrected is None else max_corrected
        self.bits = _bits("Bob's key", bits, plan.n).copy()
        npass = len(plan.block_sizes)
        if len(alice_top) != npass:
            raise ReconcileError(f"{len(alice_top)} parity arrays for a plan of {npass} passes")
        self._shuffles = plan.shuffles()
        self._alice_top: list[U8] = []
        self._known: list[U8] = []
        for p, top in enumerate(alice_top):
            if top.dtype != np.uint8 or top.shape != (plan.n_blocks(p),):
                raise ReconcileError(
                    f"pass {p}: expected {plan.n_blocks(p)} block parities, got {top.shape}"
                )
            if top.shape[0] and int(top.max()) > 1:
                raise ReconcileError(f"pass {p}: a block parity is not 0 or 1")
            self._alice_top.append(np.ascontiguousarray(top))
        self.leaked_bits = sum(int(t.shape[0]) for t in alice_top)
        self._bob_par: list[U8] = []
        self._active = 0
        # One wave: searches in every odd block of every active pass, run in
        # lockstep so that a round trip serves them all; bits flip between waves.
        self._wave: dict[int, _Searches] = {}
        self._found: list[I64] = []
        # Per pass, the blocks that may have turned odd since its last wave: only
        # those holding a flipped bit (None: all, for a pass just activated).
        # Scanning a pass's every block each wave cost more than the searches.
        self._suspects: list[I64 | None] = []
        self.corrected = 0
        self.rounds = 0
        self._activate()

    def _activate(self) -> None:
        p = self._active
        k = self.plan.block_sizes[p]
        kp = 1 << max(0, (k - 1).bit_length())
        known = np.full(self.plan.n_blocks(p) * 2 * kp, 2, dtype=np.uint8)
        known[1 :: 2 * kp] = self._alice_top[p]
        self._known.append(known)
        self._bob_par.append(block_parities(self.bits, self.plan, p))
        self._suspects.append(None)
        self._active += 1

    def _step(self, p: int, srch: _Searches, answers: U8) -> tuple[I64, I64] | None:
        """Advance one pass's searches; their next ranges to ask, or None if all ended."""
        perm, _ = self._shuffles[p]
        ns = srch.blocks.shape[0]
        q_start = np.zeros(ns, dtype=np.int64)
        q_end = np.zeros(ns, dtype=np.int64)
        err = np.empty(ns, dtype=np.int64)
        check_status(
            lib.qp_cascade_step(
                pointer("uint8_t *", self.bits),
                pointer("uint32_t *", perm),
                self.plan.n,
                self.plan.block_sizes[p],
                pointer("uint8_t *", self._known[p]),
                pointer("int64_t *", srch.blocks),
                pointer("int64_t *", srch.node),
                pointer("uint8_t *", srch.pending),
                pointer("uint8_t *", answers),
                ns,
                pointer("int64_t *", q_start),
                pointer("int64_t *", q_end),
                pointer("int64_t *", err),
            ),
            "qp_cascade_step",
        )
        done = err >= 0
        if done.any():
            self._found.append(err[done])
        keep = ~done
        if not keep.any():
            return None
        srch.blocks = np.ascontiguousarray(srch.blocks[keep])
        srch.node = np.ascontiguousarray(srch.node[keep])
        srch.pending = np.ascontiguousarray(srch.pending[keep])
        return q_start[keep], q_end[keep]

    def _advance(self, answers: U8 | None) -> Query | None:
        parts: list[tuple[int, I64, I64]] = []
        pos = 0
        for p, srch in list(self._wave.items()):
            # Every search still in a wave after a step has asked one question.
            n_ans = srch.blocks.shape[0]
            ans = (
                np.zeros(srch.blocks.shape[0], dtype=np.uint8)
                if answers is None
                else np.ascontiguousarray(answers[pos : pos + n_ans])
            )
            pos += n_ans
            rng = self._step(p, srch, ans)
            if rng is None:
                del self._wave[p]
            else:
                parts.append((p, *rng))
        if not parts:
            return None
        return Query(
            pass_index=np.concatenate(
                [np.full(s.shape[0], p, dtype=np.int64) for p, s, _ in parts]
            ),
            start=np.concatenate([s for _, s, _ in parts]),
            end=np.concatenate([e for _, _, e in parts]),
        )

    def _flip_found(self) -> None:
        if not self._found:
            return
        # Two searches of one wave (in different passes) may end on the same
        # error: each leaf is a true error, flipped once.
        idx = np.unique(np.concatenate(self._found)).astype(np.int64)
        self._found = []
        npass = self._active
        invs = [self._shuffles[p][1] for p in range(npass)]
        inv_ptrs = ffi.new("uint32_t *[]", [pointer("uint32_t *", a) for a in invs])
        par_ptrs = ffi.new("uint8_t *[]", [pointer("uint8_t *", a) for a in self._bob_par])
        ks = np.array(self.plan.block_sizes[:npass], dtype=np.int64)
        check_status(
            lib.qp_flip(
                pointer("uint8_t *", self.bits),
                self.plan.n,
                pointer("int64_t *", idx),
                idx.shape[0],
                npass,
                inv_ptrs,
                pointer("int64_t *", ks),
                par_ptrs,
            ),
            "qp_flip",
        )
        self.corrected += int(idx.shape[0])
        for p in range(npass):
            held = self._suspects[p]
            if held is not None:
                blocks = invs[p][idx].astype(np.int64) // int(ks[p])
                self._suspects[p] = np.concatenate([held, blocks])
        if self.corrected > self.max_corrected:
            raise NotConvergingError(
                f"did not converge: {self.corrected} corrections, at most "
                f"{self.max_corrected} expected"
            )

    def _odd_blocks(self, p: int) -> I64:
        """Pass ``p``'s blocks whose parities differ now (and forget the suspects)."""
        held = self._suspects[p]
        self._suspects[p] = np.empty(0, dtype=np.int64)
        if held is None:
            return np.flatnonzero(self._bob_par[p] ^ self._alice_top[p]).astype(np.int64)
        cand = np.unique(held)
        odd: I64 = cand[(self._bob_par[p][cand] ^ self._alice_top[p][cand]) == 1]
        return odd

    def next_query(self, answers: U8 | None = None) -> Query | None:
        """The next question for Alice, given her answers to the last; None when done."""
        if answers is not None:
            expected = sum(s.blocks.shape[0] for s in self._wave.values())
            if not self._wave:
                raise ReconcileError("answers arrived but no question is open")
            if answers.dtype != np.uint8 or answers.shape != (expected,):
                raise ReconcileError(f"expected {expected} answers, got {answers.shape}")
            if expected and int(answers.max()) > 1:
                raise ReconcileError("an answer is not a parity (0 or 1)")
            self.leaked_bits += expected
            self.rounds += 1
            q = self._advance(answers)
            if q is not None:
                return q
            self._flip_found()
        while True:
            for p in range(self._active):
                odd = self._odd_blocks(p)
                if odd.shape[0]:
                    self._wave[p] = _Searches(
                        blocks=odd,
                        node=np.ones(odd.shape[0], dtype=np.int64),
                        pending=np.zeros(odd.shape[0], dtype=np.uint8),
                    )
            if not self._wave:
                if self._active == len(self.plan.block_sizes):
                    return None
                self._activate()
                continue
            q = self._advance(None)
            if q is not None:
                return q
            self._flip_found()


@dataclass(frozen=True, slots=True)
class Reconciled:
    bits: U8
    leaked_bits: int
    corrected: int
    rounds: int


def reconcile_local(alice: U8, bob: U8, plan: CascadePlan) -> Reconciled:
    """Both sides in one process (benchmarks, tests): Bob's corrected bits and the cost."""
    a = CascadeAlice(alice, plan)
    b = CascadeBob(bob, plan, a.top_parities())
    q = b.next_query()
    while q is not None:
        q = b.next_query(a.answer(q))
    if a.leaked_bits != b.leaked_bits:
        raise AssertionError("Alice and Bob disagree on the leakage")
    return Reconciled(
        bits=b.bits, leaked_bits=a.leaked_bits, corrected=b.corrected, rounds=b.rounds
    )


def efficiency(leaked_bits: int, n: int, qber: float) -> float:
    """f = leaked / (n h(QBER)); inf when the QBER is 0 and something leaked."""
    h = h2(qber)
    if h == 0.0:
        return math.inf if leaked_bits else 1.0
    return leaked_bits / (n * h)
