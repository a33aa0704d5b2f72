"""Plain numpy (and plain Python where the rule is sequential) reference of the C kernel.

The test oracle: clarity over speed.  Every function has the same name and
semantics as its counterpart in :mod:`qnoded.kernel`.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]


def diff_histogram(t_a: I64, t_b: I64, *, lo_ps: int, bin_ps: int, nbins: int) -> I64:
    """Histogram of all differences ``t_b[j] - t_a[i]`` in ``[lo, lo + bin*nbins)``."""
    counts = np.zeros(nbins, dtype=np.int64)
    hi = lo_ps + bin_ps * nbins
    for tb in t_b.tolist():
        # t_a in (tb - hi, tb - lo]
        i0 = np.searchsorted(t_a, tb - hi, side="right")
        i1 = np.searchsorted(t_a, tb - lo_ps, side="right")
        d = tb - t_a[i0:i1]
        np.add.at(counts, (d - lo_ps) // bin_ps, 1)
    return counts


def coincidences_tracked(
    t_a: I64, t_b: I64, *, window_ps: int, offset_ps: float = 0.0, track_gain: float = 0.0
) -> tuple[I64, I64, float]:
    """Greedy one-to-one pairing in time order, offset following each match."""
    half = 0.5 * window_ps
    off = float(offset_ps)
    ia: list[int] = []
    ib: list[int] = []
    i = 0
    a = t_a.tolist()
    for j, tb in enumerate(t_b.tolist()):
        target = float(tb) - off
        while i < len(a) and float(a[i]) < target - half:
            i += 1
        if i == len(a):
            break
        d = float(tb) - float(a[i])
        if abs(d - off) <= half:
            ia.append(i)
            ib.append(j)
            i += 1
            off += track_gain * (d - off)
    return np.array(ia, dtype=np.int64), np.array(ib, dtype=np.int64), off


def coincidences(
    t_a: I64, t_b: I64, *, window_ps: int, offset_ps: float = 0.0, track_gain: float = 0.0
) -> tuple[I64, I64]:
    ia, ib, _ = coincidences_tracked(
        t_a, t_b, window_ps=window_ps, offset_ps=offset_ps, track_gain=track_gain
    )
    return ia, ib


def coincidences_fixed_vectorised(
    t_a: I64, t_b: I64, *, window_ps: int, offset_ps: int = 0
) -> tuple[I64, I64]:
    """Fixed-offset pairing with numpy primitives, for the benchmark's baseline.

    Equal to :func:`coincidences` when no two tags of one stream fall within one
    window of each other (sparse streams); each t_b takes its nearest t_a.
    """
    shifted = t_b - offset_ps
    pos = np.searchsorted(t_a, shifted - window_ps // 2, side="left")
    ok = pos < t_a.shape[0]
    pos_c = np.minimum(pos, t_a.shape[0] - 1)
    ok &= np.abs(t_a[pos_c] - shifted) * 2 <= window_ps
    ib = np.flatnonzero(ok)
    ia = pos_c[ib]
    first = np.ones(ia.shape[0], dtype=bool)
    first[1:] = ia[1:] != ia[:-1]
    return ia[first].astype(np.int64), ib[first].astype(np.int64)


def assign_slots(
    t: I64, *, t0_ps: float, period_ps: float, window_ps: int, track_gain: float = 0.0
) -> tuple[I64, U8, float]:
    slots = np.empty(t.shape[0], dtype=np.int64)
    inside = np.empty(t.shape[0], dtype=np.uint8)
    t0 = float(t0_ps)
    half = 0.5 * window_ps
    inv = 1.0 / period_ps
    for j, tj in enumerate(t.tolist()):
        rel = float(tj) - t0
        k = np.floor(rel * inv + 0.5)
        r = rel - k * period_ps
        slots[j] = int(k)
        inside[j] = abs(r) <= half
        if inside[j]:
            t0 += track_gain * r
    return slots, inside, t0


def sift(basis_a: U8, basis_b: U8) -> I64:
    return np.flatnonzero(basis_a == basis_b).astype(np.int64)


def pack_bits(bits: U8) -> U8:
    if bits.shape[0] and int(bits.max()) > 1:
        raise ValueError("bits holds a value other than 0 or 1")
    return np.packbits(bits)


def count_errors(a: U8, b: U8) -> int:
    return int(np.count_nonzero(a != b))
