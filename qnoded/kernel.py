"""The C kernel (``csrc/qkernel.c``), one validating wrapper per entry point.

Inputs are checked here for dtype, shape and contiguity; the C code checks
order (one vectorised pass) and the wrapper turns its status into a
:class:`KernelInputError` naming the argument and the defect, e.g. ``t_b is not
sorted ascending at index 1234``.  Buffers go to C through ``ffi.from_buffer``
without copies.

Conventions:

* times are ``int64`` picoseconds in ``[-2**62, 2**62]`` (see ``QK_T_MAX``);
* a true pair of the two streams has ``t_b ≈ t_a + offset``;
* with drift, ``t_b ≈ t_a[0] + offset + (t_a - t_a[0]) * (1 + drift)``:
  ``offset`` is the offset at Alice's first tag and ``drift`` the relative rate
  error of Bob's clock (``10e-6`` = Bob's clock runs 10 ppm fast).

On top of the C primitives, :func:`find_offset` and :func:`find_offset_drift`
lock two streams blind by coarse-to-fine cross-correlation (pure Python over
:func:`diff_histogram`; pass ``histogram=kernel_ref.diff_histogram`` to run
them over the numpy reference).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

# The cffi-generated extension (built by csrc/build_qkernel.py at install
# time) has no stubs; pyproject's mypy override lets it be Any, and only this
# module touches it.
from qnoded._qkernel import ffi, lib

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]

__all__ = [
    "T_MAX_PS",
    "WINDOW_MAX_PS",
    "KernelInputError",
    "LockError",
    "assign_slots",
    "coincidences",
    "coincidences_tracked",
    "count_errors",
    "diff_histogram",
    "find_offset",
    "find_offset_drift",
    "pack_bits",
    "sift",
    "version",
]

T_MAX_PS: int = int(lib.QK_T_MAX)
"""Largest accepted time (ps); the smallest is ``-T_MAX_PS``."""
WINDOW_MAX_PS: int = int(lib.QK_WINDOW_MAX)
"""Largest coincidence window and ``|offset|`` (ps)."""
MAX_HISTOGRAM_BINS = 1 << 26
"""Most bins of :func:`diff_histogram` (512 MiB of counts); the lock asks for ``MAX_BINS``."""


class KernelInputError(ValueError):
    """An argument handed to the kernel has the wrong type, shape, order or range."""


class LockError(RuntimeError):
    """No significant correlation peak: the two streams cannot be locked (yet)."""


def version() -> int:
    """Version of the C interface."""
    return int(lib.qk_version())


# -- validation ------------------------------------------------------------------


def checked_array(
    name: str, a: object, dtype: type[np.generic], *, make_contiguous: bool = False
) -> Any:
    """``a`` if it is a 1-d numpy array of ``dtype``, else a KernelInputError naming it.

    A strided array is refused, or copied with ``make_contiguous`` (callers
    that keep their own copy anyway).
    """
    if not isinstance(a, np.ndarray):
        raise KernelInputError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != np.dtype(dtype):
        raise KernelInputError(f"{name} must have dtype {np.dtype(dtype)}, got {a.dtype}")
    if a.ndim != 1:
        raise KernelInputError(f"{name} must be one-dimensional, got shape {a.shape}")
    if not a.flags.c_contiguous:
        if make_contiguous:
            return np.ascontiguousarray(a)
        raise KernelInputError(f"{name} must be C-contiguous (use np.ascontiguousarray)")
    return a


def _times_defect(name: str, t: I64, *, need_sorted: bool = True) -> str | None:
    """What is wrong with a time array (slow path, only after C refused it)."""
    if t.shape[0] == 0:
        return None
    if need_sorted:
        bad = np.flatnonzero(t[1:] < t[:-1])
        if bad.shape[0]:
            return f"{name} is not sorted ascending at index {int(bad[0]) + 1}"
    out = np.flatnonzero((t < -T_MAX_PS) | (t > T_MAX_PS))
    if out.shape[0]:
        k = int(out[0])
        return f"{name}[{k}] = {int(t[k])} ps is outside ±{T_MAX_PS} ps"
    return None


def check_status(rc: int, fn: str, times: dict[str, I64] | None = None) -> None:
    """Raise for a non-zero C status, naming the offending array if we can."""
    if rc == lib.QK_OK:
        return
    if rc in (lib.QK_ENOTSORTED, lib.QK_ERANGE) and times:
        for name, t in times.items():
            defect = _times_defect(name, t)
            if defect:
                raise KernelInputError(f"{fn}: {defect}")
    messages = {
        lib.QK_EINVAL: "an argument is out of range",
        lib.QK_ENOTSORTED: "an input is not sorted ascending",
        lib.QK_ECAPACITY: "an output buffer is too small",
        lib.QK_ENOTBIT: "a bit array holds a value other than 0 or 1",
        lib.QK_ERANGE: "a time or offset is outside the kernel's range",
    }
    raise KernelInputError(f"{fn}: {messages.get(rc, f'C kernel error {rc}')}")


_ARRAY_TYPES: dict[str, str] = {}


def pointer(ctype: str, a: Any) -> Any:
    """A ``ctype`` (``"uint8_t *"``) pointer into the array's memory, no copy.

    An empty array has no buffer worth passing, and the C code never reads a
    pointer with n == 0.  ``from_buffer`` typed as an array (not cast from a
    ``char[]``) halves the cost: Cascade makes tens of thousands of these.
    """
    if not a.shape[0]:
        return ffi.NULL
    array_type = _ARRAY_TYPES.get(ctype)
    if array_type is None:
        array_type = _ARRAY_TYPES.setdefault(ctype, ctype.removesuffix("*").strip() + "[]")
    return ffi.from_buffer(array_type, a)


def _gain(track_gain: float) -> float:
    if not 0.0 <= track_gain <= 1.0:
        raise KernelInputError(f"track_gain must be in [0, 1], got {track_gain}")
    return float(track_gain)


# -- the C entry points ------------------------------------------------------------


def diff_histogram(t_a: I64, t_b: I64, *, lo_ps: int, bin_ps: int, nbins: int) -> I64:
    """Cross-correlation: counts of all ``d = t_b[j] - t_a[i]`` in ``nbins`` bins.

    Bin ``k`` holds ``lo_ps + k*bin_ps <= d < lo_ps + (k+1)*bin_ps``.  Both
    inputs sorted ascending.  Cost O(len(t_a) + len(t_b) + pairs in range).
    """
    t_a, t_b = checked_array("t_a", t_a, np.int64), checked_array("t_b", t_b, np.int64)
    if bin_ps <= 0:
        raise KernelInputError(f"bin_ps must be positive, got {bin_ps}")
    if not 0 < nbins <= MAX_HISTOGRAM_BINS:  # more would be a MemoryError, untyped
        raise KernelInputError(f"nbins must be in 1..{MAX_HISTOGRAM_BINS}, got {nbins}")
    if not (lo_ps >= -T_MAX_PS and lo_ps + bin_ps * nbins <= T_MAX_PS):
        raise KernelInputError(
            f"histogram range [{lo_ps}, {lo_ps + bin_ps * nbins}) ps exceeds ±{T_MAX_PS}"
        )
    counts = np.empty(nbins, dtype=np.int64)
    rc = lib.qk_diff_histogram(
        pointer("int64_t *", t_a),
        t_a.shape[0],
        pointer("int64_t *", t_b),
        t_b.shape[0],
        int(lo_ps),
        int(bin_ps),
        int(nbins),
        ffi.cast("int64_t *", ffi.from_buffer(counts)),
    )
    check_status(rc, "diff_histogram", {"t_a": t_a, "t_b": t_b})
    return counts


def coincidences_tracked(
    t_a: I64, t_b: I64, *, window_ps: int, offset_ps: float = 0.0, track_gain: float = 0.0
) -> tuple[I64, I64, float]:
    """One-to-one pairs ``(idx_a, idx_b)`` and the final (tracked) offset in ps.

    Window: with the current offset ``off``, ``d = t_b[j] - t_a[i]`` (exact)
    is accepted when ``ceil(off - window_ps/2) <= d <= floor(off + window_ps/2)``
    (bounds in IEEE double).  Greedy in time order: a cursor walks ``t_a``;
    for each ``t_b[j]`` in turn, ``t_a`` entries whose ``d`` is above the window
    are passed for good, then ``t_b[j]`` pairs with the ``t_a`` at the cursor if
    ``d`` is inside the window.  So each ``t_b`` takes the earliest ``t_a`` in
    its window that no earlier ``t_b`` has used or passed.

    Tracking: after each pair ``off += track_gain * (d - off)`` (first-order
    loop filter), and later pairs use the moved window.  Both index arrays
    are ascending.  Both inputs must be sorted ascending.
    """
    t_a, t_b = checked_array("t_a", t_a, np.int64), checked_array("t_b", t_b, np.int64)
    if not 0 <= window_ps <= WINDOW_MAX_PS:
        raise KernelInputError(f"window_ps must be in [0, {WINDOW_MAX_PS}], got {window_ps}")
    if not abs(offset_ps) <= WINDOW_MAX_PS:
        raise KernelInputError(
            f"offset_ps must be finite and within ±{WINDOW_MAX_PS}, got {offset_ps}"
        )
    gain = _gain(track_gain)
    cap = min(t_a.shape[0], t_b.shape[0])  # one-to-one: never more pairs than this
    idx_a = np.empty(cap, dtype=np.int64)
    idx_b = np.empty(cap, dtype=np.int64)
    n_out = ffi.new("size_t *")
    off_out = ffi.new("double *")
    rc = lib.qk_coincidences(
        pointer("int64_t *", t_a),
        t_a.shape[0],
        pointer("int64_t *", t_b),
        t_b.shape[0],
        int(window_ps),
        float(offset_ps),
        gain,
        pointer("int64_t *", idx_a),
        pointer("int64_t *", idx_b),
        cap,
        n_out,
        off_out,
    )
    check_status(rc, "coincidences", {"t_a": t_a, "t_b": t_b})
    n = int(n_out[0])
    return idx_a[:n], idx_b[:n], float(off_out[0])


def coincidences(
    t_a: I64, t_b: I64, *, window_ps: int, offset_ps: float = 0, track_gain: float = 0.0
) -> tuple[I64, I64]:
    """Index arrays of one-to-one pairs, both ascending (see :func:`coincidences_tracked`)."""
    ia, ib, _ = coincidences_tracked(
        t_a, t_b, window_ps=window_ps, offset_ps=offset_ps, track_gain=track_gain
    )
    return ia, ib


def assign_slots(
    t: I64, *, t0_ps: float, period_ps: float, window_ps: int, track_gain: float = 0.0
) -> tuple[I64, U8, float]:
    """BB84 slots: ``(slot, in_window, final_t0_ps)`` for detection times ``t``.

    In IEEE double: ``r = t - t0``, ``slot = floor(r * (1/period_ps) + 0.5)``,
    ``residual = r - slot*period_ps``, ``in_window = |residual| <= window_ps/2``
    (uint8 0/1; the slot is written either way).  With ``track_gain > 0``, t0
    follows the residual of each in-window detection: ``t0 += gain * residual``.
    ``t`` need not be sorted.
    """
    t = checked_array("t", t, np.int64)
    if not (math.isfinite(period_ps) and period_ps > 0):
        raise KernelInputError(f"period_ps must be positive and finite, got {period_ps}")
    if not math.isfinite(t0_ps):
        raise KernelInputError(f"t0_ps must be finite, got {t0_ps}")
    if not 0 <= window_ps <= WINDOW_MAX_PS:  # an int64 in C: beyond it cffi raises OverflowError
        raise KernelInputError(f"window_ps must be in [0, {WINDOW_MAX_PS}], got {window_ps}")
    gain = _gain(track_gain)
    slots = np.empty(t.shape[0], dtype=np.int64)
    inside = np.empty(t.shape[0], dtype=np.uint8)
    t0_out = ffi.new("double *")
    rc = lib.qk_assign_slots(
        pointer("int64_t *", t),
        t.shape[0],
        float(t0_ps),
        float(period_ps),
        int(window_ps),
        gain,
        pointer("int64_t *", slots),
        pointer("uint8_t *", inside),
        t0_out,
    )
    if rc == lib.QK_ERANGE:
        raise KernelInputError("assign_slots: a slot number does not fit int64 (period too small)")
    check_status(rc, "assign_slots")
    return slots, inside, float(t0_out[0])


def sift(basis_a: U8, basis_b: U8) -> I64:
    """Ascending indices where Alice's and Bob's bases agree."""
    basis_a = checked_array("basis_a", basis_a, np.uint8)
    basis_b = checked_array("basis_b", basis_b, np.uint8)
    if basis_a.shape != basis_b.shape:
        raise KernelInputError(
            f"basis_a has {basis_a.shape[0]} entries, basis_b {basis_b.shape[0]}"
        )
    keep = np.empty(basis_a.shape[0], dtype=np.int64)
    n = ffi.new("size_t *")
    rc = lib.qk_sift(
        pointer("uint8_t *", basis_a),
        pointer("uint8_t *", basis_b),
        basis_a.shape[0],
        pointer("int64_t *", keep),
        n,
    )
    check_status(rc, "sift")
    return keep[: int(n[0])]


def pack_bits(bits: U8) -> U8:
    """0/1 bytes packed MSB first into ``ceil(n/8)`` bytes, like ``numpy.packbits``."""
    bits = checked_array("bits", bits, np.uint8)
    out = np.empty((bits.shape[0] + 7) // 8, dtype=np.uint8)
    rc = lib.qk_pack_bits(pointer("uint8_t *", bits), bits.shape[0], pointer("uint8_t *", out))
    if rc == lib.QK_ENOTBIT:
        k = int(np.flatnonzero(bits > 1)[0])
        raise KernelInputError(f"bits[{k}] = {int(bits[k])} is a value other than 0 or 1")
    check_status(rc, "pack_bits")
    return out


def count_errors(a: U8, b: U8) -> int:
    """Number of positions where two uint8 arrays (bits) differ."""
    a, b = checked_array("a", a, np.uint8), checked_array("b", b, np.uint8)
    if a.shape != b.shape:
        raise KernelInputError(f"a has {a.shape[0]} bits, b has {b.shape[0]}")
    n = ffi.new("size_t *")
    rc = lib.qk_count_errors(pointer("uint8_t *", a), pointer("uint8_t *", b), a.shape[0], n)
    check_status(rc, "count_errors")
    return int(n[0])


# -- blind lock: coarse-to-fine cross-correlation over diff_histogram ----------------

Histogram = Callable[..., I64]
"""``histogram(t_a, t_b, *, lo_ps, bin_ps, nbins) -> counts``: this module's or the reference."""

MAX_BINS = 1 << 14
"""Most bins of the coarse pass."""
ZOOM = 16
"""Each refinement makes the bins this much finer (until ``resolution_ps``)."""
ZOOM_SPAN_BINS = 5
"""A refinement covers the peak bin and two neighbours either side."""


def _snr(counts: I64, k: int) -> float:
    background = float(np.median(counts))
    return (float(counts[k]) - background) / math.sqrt(max(background, 1.0))


def _centroid(counts: I64, k: int, half_width: int) -> float:
    """Background-subtracted centroid (in bins) of ``counts`` around bin ``k``."""
    lo, hi = max(0, k - half_width), min(counts.shape[0], k + half_width + 1)
    ks = np.arange(lo, hi, dtype=np.float64)
    w = np.clip(counts[lo:hi].astype(np.float64) - float(np.median(counts)), 0.0, None)
    total = float(w.sum())
    return float((ks * w).sum() / total) if total > 0 else float(k)


def _peak_sigma(counts: I64, bin_ps: int) -> float:
    """Background-subtracted RMS width (ps) of the peak of ``counts``."""
    k = int(np.argmax(counts))
    background = float(np.median(counts))
    half = 8
    sigma = 0.0
    for _ in range(3):  # the region follows the width it measures
        lo, hi = max(0, k - half), min(counts.shape[0], k + half + 1)
        ks = np.arange(lo, hi, dtype=np.float64)
        w = np.clip(counts[lo:hi].astype(np.float64) - background, 0.0, None)
        if float(w.sum()) <= 0:
            return 0.0
        mean = float((ks * w).sum() / w.sum())
        sigma = math.sqrt(float((w * (ks - mean) ** 2).sum() / w.sum())) * bin_ps
        half = max(3, math.ceil(3 * sigma / bin_ps))
    return sigma


def _lock(
    t_a: I64,
    t_b: I64,
    *,
    lo_ps: int,
    span_ps: int,
    bin_ps: int,
    resolution_ps: int,
    min_snr: float,
    histogram: Histogram,
    where: str,
) -> tuple[float, float]:
    """Peak of the differences in ``[lo_ps, lo_ps + span_ps)``, coarse to fine.

    Returns ``(offset_ps, snr of the first pass)``; :class:`LockError` if that
    SNR is below ``min_snr``.
    """
    nbins = -(-span_ps // bin_ps)
    counts = histogram(t_a, t_b, lo_ps=lo_ps, bin_ps=bin_ps, nbins=nbins)
    k = int(np.argmax(counts))
    snr = _snr(counts, k)
    if snr < min_snr:
        raise LockError(
            f"{where}: correlation peak SNR {snr:.1f} below {min_snr:.1f} "
            f"({t_a.shape[0]} and {t_b.shape[0]} tags, {bin_ps} ps bins)"
        )
    while bin_ps > resolution_ps:
        # Zoom on the peak bin and its neighbours: a peak may straddle bins.
        new_bin = max(resolution_ps, bin_ps // ZOOM)
        lo_ps += (k - ZOOM_SPAN_BINS // 2) * bin_ps
        nbins = -(-ZOOM_SPAN_BINS * bin_ps // new_bin)
        bin_ps = new_bin
        counts = histogram(t_a, t_b, lo_ps=lo_ps, bin_ps=bin_ps, nbins=nbins)
        k = int(np.argmax(counts))
    centre = _centroid(counts, k, 2)
    return lo_ps + (centre + 0.5) * bin_ps, snr


def _check_lock_args(t_a: I64, t_b: I64, max_offset_ps: int, resolution_ps: int) -> None:
    if max_offset_ps <= 0:
        raise KernelInputError(f"max_offset_ps must be positive, got {max_offset_ps}")
    if resolution_ps <= 0:
        raise KernelInputError(f"resolution_ps must be positive, got {resolution_ps}")
    checked_array("t_a", t_a, np.int64)
    checked_array("t_b", t_b, np.int64)
    if t_a.shape[0] == 0 or t_b.shape[0] == 0:
        raise LockError(f"no tags to correlate ({t_a.shape[0]} and {t_b.shape[0]})")


def find_offset(
    t_a: I64,
    t_b: I64,
    *,
    max_offset_ps: int,
    resolution_ps: int,
    min_snr: float = 6.0,
    histogram: Histogram = diff_histogram,
) -> int:
    """Offset (ps) with ``t_b ≈ t_a + offset``, found blind by cross-correlation.

    Coarse pass: a histogram of all differences over ``±max_offset_ps`` with at
    most ``MAX_BINS`` bins (never finer than ``resolution_ps``).  Its peak must
    pass ``(peak - median) / sqrt(max(median, 1)) >= min_snr``, else
    :class:`LockError` (the SNR is in the message).  Then histograms ``ZOOM``
    times finer over the peak bin ±2 until the bin width is ``resolution_ps``;
    the result is the background-subtracted centroid of the final peak ±2 bins.
    """
    _check_lock_args(t_a, t_b, max_offset_ps, resolution_ps)
    span = 2 * max_offset_ps
    bin_ps = max(resolution_ps, -(-span // MAX_BINS))
    offset, _ = _lock(
        t_a,
        t_b,
        lo_ps=-max_offset_ps,
        span_ps=span,
        bin_ps=bin_ps,
        resolution_ps=resolution_ps,
        min_snr=min_snr,
        histogram=histogram,
        where="find_offset",
    )
    return round(offset)


def _drift_corrected(t_b: I64, pivot_ps: int, off_ps: float, drift: float) -> I64:
    """``t_b`` mapped into Alice's frame under the model, as sorted int64.

    Model: ``t_b = pivot + off + (t_a - pivot) * (1 + drift)`` for a true pair,
    so ``t_a = pivot + (t_b - pivot - off) / (1 + drift)``.
    """
    u = (t_b - pivot_ps).astype(np.float64)  # exact int64 difference first
    mapped = np.rint((u - off_ps) / (1.0 + drift)).astype(np.int64) + pivot_ps
    # Rounding cannot break the order for |drift| < 1, but be certain: the
    # histogram refuses unsorted input.
    return np.maximum.accumulate(mapped)


def _segment_residuals(
    t_a: I64,
    corrected: I64,
    a_cuts: I64,
    edges: I64,
    *,
    reach: int,
    bin_ps: int,
    half_width: int,
    min_snr: float,
    histogram: Histogram,
) -> tuple[list[float], list[float], list[float]]:
    """Per segment with a peak: mean tag time (from the pivot), residual and weight."""
    b_cuts = np.searchsorted(corrected, edges - reach)
    b_ends = np.searchsorted(corrected, edges + reach)
    nbins = -(-2 * reach // bin_ps)
    times, residuals, weights = [], [], []
    for s in range(edges.shape[0] - 1):
        a_s = t_a[a_cuts[s] : a_cuts[s + 1]]
        b_s = corrected[b_cuts[s] : b_ends[s + 1]]
        if a_s.shape[0] == 0 or b_s.shape[0] == 0:
            continue
        counts = histogram(a_s, b_s, lo_ps=-reach, bin_ps=bin_ps, nbins=nbins)
        k = int(np.argmax(counts))
        if _snr(counts, k) < min_snr:
            continue
        residuals.append(-reach + (_centroid(counts, k, half_width) + 0.5) * bin_ps)
        times.append(float(np.mean(a_s)))
        weights.append(max(float(counts[k] - np.median(counts)), 1.0))
    return times, residuals, weights


def find_offset_drift(
    t_a: I64,
    t_b: I64,
    *,
    max_offset_ps: int,
    resolution_ps: int,
    segments: int = 4,
    min_snr: float = 6.0,
    max_drift: float = 50e-6,
    histogram: Histogram = diff_histogram,
) -> tuple[int, float]:
    """``(offset_ps, drift)`` of Bob's clock against Alice's, found blind.

    Model: ``t_b ≈ t_a[0] + offset + (t_a - t_a[0]) * (1 + drift)`` for true
    pairs, i.e. ``offset`` is the offset at Alice's first tag and ``drift`` the
    dimensionless rate error (``1e-5``: Bob's clock runs 10 ppm fast), with
    ``|drift| <= max_drift``.

    1. Coarse lock over the whole span as :func:`find_offset` does, with bins no
       narrower than the smear ``max_drift * span`` (the SNR gate applies here).
       The centroid of the smeared peak is the offset at mid-span.
    2. Refine: map ``t_b`` into Alice's frame with the current model, split the
       span into ``segments`` equal time spans, histogram each around zero with
       bins as wide as the residual drift smear of one segment (never finer
       than ``resolution_ps`` or a quarter of the measured peak width, so a
       wide jitter peak is not cut into noise), take the background-subtracted
       centroid as that segment's residual (at the segment's mean tag time),
       and fit a weighted line: the intercept corrects the offset, the slope
       the drift.  Segments whose peak SNR is below
       ``max(min_snr / sqrt(segments), 4)`` are left out; at least two must
       remain.  Repeat with a 4x smaller drift bound until the smear is below
       the bin width twice running.

    :class:`LockError` if the coarse peak fails the SNR gate, if fewer than two
    segments show a peak at the first refinement, or if the fitted drift is
    beyond ``2 * max_drift`` (an inconsistent, not a wrong, answer).
    """
    _check_lock_args(t_a, t_b, max_offset_ps, resolution_ps)
    if segments < 2:
        raise KernelInputError(f"segments must be >= 2, got {segments}")
    if not 0.0 <= max_drift < 0.01:
        raise KernelInputError(f"max_drift must be in [0, 0.01), got {max_drift}")
    t0 = int(t_a[0])
    span = int(t_a[-1]) - t0
    smear = math.ceil(max_drift * span)
    coarse_bin = max(resolution_ps, -(-2 * max_offset_ps // MAX_BINS), smear)
    off_mid, _ = _lock(
        t_a,
        t_b,
        lo_ps=-max_offset_ps,
        span_ps=2 * max_offset_ps,
        bin_ps=coarse_bin,
        resolution_ps=max(resolution_ps, smear),
        min_snr=min_snr,
        histogram=histogram,
        where="find_offset_drift (coarse)",
    )
    if span == 0:
        return round(off_mid), 0.0
    pivot = t0 + span // 2  # the model pivots at mid-span while refining
    drift = 0.0
    bound = max_drift  # how wrong the drift estimate may still be
    err = float(max(resolution_ps, smear, coarse_bin))  # and the offset at the pivot
    # A segment holds 1/segments of the signal; its gate is lower than the
    # whole span's, but not so low that a noise bin among a few hundred passes.
    seg_min_snr = max(min_snr / math.sqrt(segments), 4.0)
    last_bin = 0
    edges = t0 + (np.arange(segments + 1, dtype=np.float64) * span / segments).astype(np.int64)
    edges[-1] = int(t_a[-1]) + 1
    a_cuts = np.searchsorted(t_a, edges)
    sigma = 0.0  # measured width of the peak (jitter), once drift no longer smears it
    level = 0
    while True:
        smear_seg = math.ceil(bound * span / segments)
        # Bins no finer than a quarter of the peak width: finer ones only add noise.
        bin_ps = max(resolution_ps, smear_seg, math.ceil(sigma / 4))
        half_width = max(2, math.ceil(3 * sigma / bin_ps))
        reach = math.ceil(err + bound * span / 2 + 3 * sigma) + 2 * bin_ps
        corrected = _drift_corrected(t_b, pivot, off_mid, drift)
        times, residuals, weights = _segment_residuals(
            t_a,
            corrected,
            a_cuts,
            edges,
            reach=reach,
            bin_ps=bin_ps,
            half_width=half_width,
            min_snr=seg_min_snr,
            histogram=histogram,
        )
        if len(times) < 2:
            if level == 0:
                raise LockError(
                    f"find_offset_drift: only {len(times)} of {segments} segments show a "
                    f"peak at {bin_ps} ps bins"
                )
            break  # keep the last estimate: finer bins only lose the peak in noise
        at = np.array(times) - pivot  # segment times from the pivot
        slope, intercept = np.polyfit(at, residuals, 1, w=np.sqrt(weights))
        # Residuals are in Alice's frame; one ps there is (1 + drift) ps of Bob's.
        off_mid += float(intercept) * (1.0 + drift)
        drift += float(slope) * (1.0 + drift)
        level += 1
        if abs(drift) > 2 * max_drift + 1e-9:
            raise LockError(
                f"find_offset_drift: fitted drift {drift * 1e6:.1f} ppm exceeds the "
                f"{max_drift * 1e6:.0f} ppm bound: no consistent peak"
            )
        if smear_seg <= bin_ps and level > 1 and bin_ps == last_bin:
            break  # the drift smear is below the bin width, twice in a row: done
        last_bin = bin_ps
        # The peak width over the whole span, now that drift hardly smears it.
        whole = histogram(
            t_a,
            _drift_corrected(t_b, pivot, off_mid, drift),
            lo_ps=-reach,
            bin_ps=bin_ps,
            nbins=-(-2 * reach // bin_ps),
        )
        sigma = max(0.0, _peak_sigma(whole, bin_ps) - bin_ps / math.sqrt(12))
        bound /= 4.0
        err = 2.0 * bin_ps
    return round(off_mid - drift * (pivot - t0)), drift
