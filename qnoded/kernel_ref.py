"""Plain numpy reference of the C kernel: the test oracle and the benchmark baseline.

Clarity over speed.  Every function has the same name, arguments and
semantics as its counterpart in :mod:`qnoded.kernel` (see the docstrings
there and ``csrc/qkernel.h`` for the exact rules), but does no input
validation.  Rules that are sequential by nature (the greedy pairing, the
tracking loops) are plain Python loops that repeat the C code's IEEE double
arithmetic step for step, so results are bit-identical.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]

_CHUNK_PAIRS = 1 << 22  # bounds the memory of one diff_histogram step


def diff_histogram(t_a: I64, t_b: I64, *, lo_ps: int, bin_ps: int, nbins: int) -> I64:
    """Counts of all differences ``t_b[j] - t_a[i]`` in ``[lo, lo + bin*nbins)``."""
    counts = np.zeros(nbins, dtype=np.int64)
    hi_ps = lo_ps + bin_ps * nbins
    # d in [lo, hi)  <=>  t_a in (t_b - hi, t_b - lo]: one slice of t_a per t_b.
    first = np.searchsorted(t_a, t_b - hi_ps, side="right")
    stop = np.searchsorted(t_a, t_b - lo_ps, side="right")
    per_b = stop - first
    j = 0
    while j < t_b.shape[0]:
        # Enough t_b to make about _CHUNK_PAIRS pairs (at least one).
        total = np.cumsum(per_b[j:])
        k = j + max(1, int(np.searchsorted(total, _CHUNK_PAIRS, side="right")))
        n = per_b[j:k]
        owner = np.repeat(np.arange(j, k), n)  # which t_b each pair belongs to
        # Position of each pair inside its t_b's slice: 0, 1, ... n-1.
        within = np.arange(owner.shape[0]) - np.repeat(np.cumsum(n) - n, n)
        d = t_b[owner] - t_a[first[owner] + within]
        counts += np.bincount((d - lo_ps) // bin_ps, minlength=nbins)
        j = k
    return counts


def _bounds(off: float, half: float) -> tuple[int, int]:
    """Integer window ``[lo, hi]`` on d for offset ``off`` (clamped as in C)."""
    top = 4.0e18
    return math.ceil(min(max(off - half, -top), top)), math.floor(min(max(off + half, -top), top))


def coincidences_tracked(
    t_a: I64, t_b: I64, *, window_ps: int, offset_ps: float = 0.0, track_gain: float = 0.0
) -> tuple[I64, I64, float]:
    """Greedy one-to-one pairing in time order; the offset follows each pair."""
    half = 0.5 * window_ps
    off = float(offset_ps)
    lo, hi = _bounds(off, half)
    a, b = t_a.tolist(), t_b.tolist()
    ia: list[int] = []
    ib: list[int] = []
    i = 0
    for j, tb in enumerate(b):
        # Pass (for good) every t_a too early for this t_b's window ...
        while i < len(a) and tb - a[i] > hi:
            i += 1
        if i == len(a):
            break
        d = tb - a[i]
        # ... and pair t_b with the first one left if it is inside.
        if d >= lo:
            ia.append(i)
            ib.append(j)
            i += 1
            off += track_gain * (float(d) - off)
            lo, hi = _bounds(off, half)
    return np.array(ia, dtype=np.int64), np.array(ib, dtype=np.int64), off


def coincidences(
    t_a: I64, t_b: I64, *, window_ps: int, offset_ps: float = 0.0, track_gain: float = 0.0
) -> tuple[I64, I64]:
    """Index arrays of :func:`coincidences_tracked`."""
    ia, ib, _ = coincidences_tracked(
        t_a, t_b, window_ps=window_ps, offset_ps=offset_ps, track_gain=track_gain
    )
    return ia, ib


def coincidences_nearest(
    t_a: I64, t_b: I64, *, window_ps: int, offset_ps: int = 0
) -> tuple[I64, I64]:
    """Fixed-offset pairing with numpy primitives only: the benchmark's fair baseline.

    Each ``t_b`` takes the first ``t_a`` at or after the window's start if it is
    inside the window; a ``t_a`` claimed twice keeps its first ``t_b``.  Equal
    to :func:`coincidences` when no two tags of one stream fall within one
    window of each other (sparse streams), not in general.
    """
    half = 0.5 * window_ps
    lo, hi = math.ceil(offset_ps - half), math.floor(offset_ps + half)
    pos = np.searchsorted(t_a, t_b - hi, side="left")
    pos_c = np.minimum(pos, max(t_a.shape[0] - 1, 0))
    ok = pos < t_a.shape[0]
    if t_a.shape[0]:
        ok &= t_b - t_a[pos_c] >= lo
    ib = np.flatnonzero(ok)
    ia = pos_c[ib]
    first = np.ones(ia.shape[0], dtype=bool)
    first[1:] = ia[1:] != ia[:-1]
    return ia[first].astype(np.int64), ib[first].astype(np.int64)


def assign_slots(
    t: I64, *, t0_ps: float, period_ps: float, window_ps: int, track_gain: float = 0.0
) -> tuple[I64, U8, float]:
    """Slot, in-window flag and final t0 (vectorised when t0 does not move)."""
    half = 0.5 * window_ps
    inv = 1.0 / period_ps
    if track_gain == 0.0:
        rel = t.astype(np.float64) - float(t0_ps)
        k = np.floor(rel * inv + 0.5)
        r = rel - k * period_ps
        return k.astype(np.int64), (np.abs(r) <= half).astype(np.uint8), float(t0_ps)
    slots = np.empty(t.shape[0], dtype=np.int64)
    inside = np.empty(t.shape[0], dtype=np.uint8)
    t0 = float(t0_ps)
    for j, tj in enumerate(t.tolist()):
        rel_j = float(tj) - t0
        kj = math.floor(rel_j * inv + 0.5)
        rj = rel_j - float(kj) * period_ps  # C: (double)k, exact for |k| < 2^53
        slots[j] = kj
        inside[j] = abs(rj) <= half
        if inside[j]:
            t0 += track_gain * rj
    return slots, inside, t0


def sift(basis_a: U8, basis_b: U8) -> I64:
    """Ascending indices where the bases agree."""
    return np.flatnonzero(basis_a == basis_b).astype(np.int64)


def pack_bits(bits: U8) -> U8:
    """MSB-first packing; ``ValueError`` for a byte other than 0 or 1."""
    if bits.shape[0] and int(bits.max()) > 1:
        raise ValueError("bits holds a value other than 0 or 1")
    return np.packbits(bits)


def count_errors(a: U8, b: U8) -> int:
    """Positions where the two arrays differ."""
    return int(np.count_nonzero(a != b))
