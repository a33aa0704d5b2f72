"""Error correction: Cascade, with Alice answering and Bob asking.

Alice's side is stateless: from her bits and the public plan she sends the
top-level parity of every block of every pass at once, then answers parities
of ranges of permuted positions (O(1) each, from prefix parities).  Bob's side
is a state machine in C (``qp_cascade_round``, one call per round trip):
binary searches in every odd block of every pass begun, all asking in the same
round trip, remembering every parity Alice has disclosed (per block, as a
binary tree) so that none is asked for twice.  An error found is flipped at
once, not at the end of a wave of searches: the blocks that hold it change
parity, searches running there start again from their roots (free where the
tree is known) and the cascade goes on in the same round.  Against waves of
searches with flips between them, this saves 6-12 % of the round trips for
0.001-0.006 more in f (means over 8 blocks of 1e6 bits at QBER 1, 2, 3, 5 %).
The next pass begins when no block of any pass begun is odd; Cascade ends
after the last.

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
# ... and at least this many blocks per late pass: a pass of one or two blocks
# over a short key finds almost nothing.  Measured on 300 keys of 1e4 bits at
# 1 % QBER (late blocks of 8192): 71 kept errors, each a block lost at
# verification; with blocks of at most n/4 (2048), none, for f 1.09 -> 1.14.
# The second pass keeps to the same cap.  From about 5e4 bits on it changes nothing.
LATE_MIN_BLOCKS = 4
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
        if self.frame < 2 or self.frame > 2**32 or self.frame & (self.frame - 1):
            # 2^32: keys are indexed by uint32 in C, so no frame is longer.
            raise ReconcileError(f"frame {self.frame} is not a power of two in 2..2^32")
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
        short = 1 << max(0, (n // LATE_MIN_BLOCKS).bit_length() - 1)  # a power of two
        k2 = max(min(2 ** math.ceil((alpha + 12.0) / 2.0), half, short), k1)
        late = max(min(LATE_BLOCK_FACTOR * k2, half, short), k2)
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
        self._prefix: list[U8] = []
        self._prefix_ptrs: object = None

    def top_parities(self) -> list[U8]:
        """Every block's parity in every pass: differences of the prefix parities
        at block ends (one pass over the key per pass, shared with the answers)."""
        out = []
        for p, pre in enumerate(self._prefixes()):
            k = self.plan.block_sizes[p]
            starts = np.arange(self.plan.n_blocks(p)) * k
            out.append(pre[np.minimum(starts + k, self.plan.n)] ^ pre[starts])
        self.leaked_bits += sum(int(a.shape[0]) for a in out)
        return out

    def _prefixes(self) -> list[U8]:
        """Prefix parities of every pass (made on the first question; Cascade asks in all)."""
        if not self._prefix:
            for perm, _ in self.plan.shuffles():
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
                self._prefix.append(pre)
            self._prefix_ptrs = ffi.new(
                "uint8_t *[]", [pointer("uint8_t *", pre) for pre in self._prefix]
            )
        return self._prefix

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
        nq = int(start.shape[0])
        out = np.empty(nq, dtype=np.uint8)
        self._prefixes()
        rc = lib.qp_range_parity(
            self._prefix_ptrs,
            npass,
            self.plan.n,
            pointer("int64_t *", passes),
            pointer("int64_t *", start),
            pointer("int64_t *", end),
            nq,
            pointer("uint8_t *", out),
        )
        if rc == lib.QK_EINVAL:
            bad = (passes < 0) | (passes >= npass)
            if bad.any():
                raise ReconcileError(f"query for pass {int(passes[bad][0])}, the plan has {npass}")
            raise ReconcileError(f"a query asks for a range outside 0..{self.plan.n}")
        check_status(rc, "qp_range_parity")
        self.leaked_bits += nq
        return out


class CascadeBob:
    """Bob: corrects his copy by asking for parities until no block is odd.

    The state machine is C's (``qp_cascade_round``, one call per round trip);
    this class owns its buffers, checks Alice's messages against the plan and
    counts what she disclosed.
    """

    def __init__(
        self, bits: U8, plan: CascadePlan, alice_top: list[U8], *, max_corrected: int | None = None
    ) -> None:
        self.plan = plan
        self.bits = _bits("Bob's key", bits, plan.n).copy()
        npass = len(plan.block_sizes)
        if len(alice_top) != npass:
            raise ReconcileError(f"{len(alice_top)} parity arrays for a plan of {npass} passes")
        tops: list[U8] = []
        for p, top in enumerate(alice_top):
            if top.dtype != np.uint8 or top.shape != (plan.n_blocks(p),):
                raise ReconcileError(
                    f"pass {p}: expected {plan.n_blocks(p)} block parities, got {top.shape}"
                )
            if top.shape[0] and int(top.max()) > 1:
                raise ReconcileError(f"pass {p}: a block parity is not 0 or 1")
            tops.append(np.ascontiguousarray(top))
        self.leaked_bits = sum(int(t.shape[0]) for t in tops)
        self.rounds = 0
        nbs = [plan.n_blocks(p) for p in range(npass)]
        cap = sum(nbs)
        shuffles = plan.shuffles()
        trees = [
            nb * 2 * (1 << max(0, (k - 1).bit_length()))
            for nb, k in zip(nbs, plan.block_sizes, strict=True)
        ]
        # Every buffer the C state machine touches, owned here for the block's lifetime.
        self._ks = np.array(plan.block_sizes, dtype=np.int64)
        self._tops = tops
        per_pass: dict[str, list[U8] | list[I64]] = {
            "bob_par": [np.empty(nb, dtype=np.uint8) for nb in nbs],
            "known": [np.empty(t, dtype=np.uint8) for t in trees],  # Alice's tree node parities
            "bob_perm": [np.empty(plan.n, dtype=np.uint8) for _ in nbs],
            "slot": [np.empty(nb, dtype=np.int64) for nb in nbs],
        }
        self._per_pass = per_pass
        self._search = [np.empty(cap, dtype=np.int64) for _ in range(4)]
        self._pending = np.empty(cap, dtype=np.uint8)
        self._questions = [np.empty(cap, dtype=np.int64) for _ in range(3)]
        # The C struct's arrays of per-pass pointers (cffi owns these).
        self._ptrs = {
            "perms": ffi.new("uint32_t *[]", [pointer("uint32_t *", p) for p, _ in shuffles]),
            "invs": ffi.new("uint32_t *[]", [pointer("uint32_t *", i) for _, i in shuffles]),
            "alice_top": ffi.new("uint8_t *[]", [pointer("uint8_t *", a) for a in tops]),
        } | {
            name: ffi.new(
                f"{'uint8_t' if arrays[0].dtype == np.uint8 else 'int64_t'} *[]",
                [
                    pointer(f"{'uint8_t' if a.dtype == np.uint8 else 'int64_t'} *", a)
                    for a in arrays
                ],
            )
            for name, arrays in per_pass.items()
        }
        c = ffi.new("qp_cascade *")
        c.n = plan.n
        c.npass = npass
        c.active = 0
        c.ks = pointer("int64_t *", self._ks)
        for name, ptrs in self._ptrs.items():
            setattr(c, name, ptrs)
        c.cap = cap
        c.ns = 0
        c.s_pass, c.s_blk, c.s_node, c.work = (pointer("int64_t *", a) for a in self._search)
        c.s_pending = pointer("uint8_t *", self._pending)
        c.corrected = 0
        # Wrong parities (a bug, or answers changed on the way) can make the
        # cascade flip bits forever, even without asking anything: cached
        # parities let searches end locally.  Past this many flips, give up.
        c.max_corrected = plan.n if max_corrected is None else max_corrected
        c.bits = pointer("uint8_t *", self.bits)
        self._c = c
        self._q_ptrs = [pointer("int64_t *", a) for a in self._questions]
        self._nq = ffi.new("int64_t *")

    @property
    def corrected(self) -> int:
        """Bits of Bob's key flipped so far."""
        return int(self._c.corrected)

    @property
    def max_corrected(self) -> int:
        return int(self._c.max_corrected)

    def next_query(self, answers: U8 | None = None) -> Query | None:
        """The next question for Alice, given her answers to the last; None when done."""
        c = self._c
        expected = int(c.ns)
        if answers is None:
            if expected:
                raise ReconcileError(f"{expected} questions are open and no answers came")
            ans = ffi.NULL
        else:
            if not expected:
                raise ReconcileError("answers arrived but no question is open")
            if answers.dtype != np.uint8 or answers.shape != (expected,):
                raise ReconcileError(f"expected {expected} answers, got {answers.shape}")
            answers = np.ascontiguousarray(answers)
            ans = pointer("uint8_t *", answers)
        rc = lib.qp_cascade_round(c, ans, expected, *self._q_ptrs, self._nq)
        if rc == lib.QK_ENOTBIT:  # C checks the answers before it changes any state
            raise ReconcileError("an answer is not a parity (0 or 1)")
        if answers is not None:
            self.leaked_bits += expected
            self.rounds += 1
        if rc == lib.QP_ENOTCONVERGED:
            raise NotConvergingError(
                f"did not converge: {self.corrected} corrections, at most "
                f"{self.max_corrected} expected"
            )
        check_status(rc, "qp_cascade_round")
        nq = int(self._nq[0])
        if nq == 0:
            return None
        q_pass, q_start, q_end = (a[:nq].copy() for a in self._questions)
        return Query(pass_index=q_pass, start=q_start, end=q_end)


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
