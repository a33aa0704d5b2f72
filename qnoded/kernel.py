"""The C kernel, one validating wrapper per entry point.

Inputs are checked here (dtype, contiguity, order) so the C code can trust
them; buffers go to C through ``ffi.from_buffer`` without copies.  A bad
argument raises :class:`KernelInputError` naming the argument and the defect.

Offset convention everywhere: a true pair has ``t_b ≈ t_a + offset``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from qnoded._qkernel import ffi, lib  # built by cffi at install time; no stubs

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]


class KernelInputError(ValueError):
    """An array handed to the kernel has the wrong type, shape or order."""


class LockError(RuntimeError):
    """No significant correlation peak: the two streams cannot be locked yet."""


_ERRORS = {
    lib.QK_EINVAL: "an argument is out of range",
    lib.QK_ENOTSORTED: "an input is not sorted ascending",
    lib.QK_ECAPACITY: "an output buffer is too small",
    lib.QK_ENOTBIT: "a bit array holds a value other than 0 or 1",
}


def _check(rc: int, fn: str) -> None:
    if rc != lib.QK_OK:
        raise KernelInputError(f"{fn}: {_ERRORS.get(rc, f'error {rc}')}")


def _array(name: str, a: Any, dtype: type[np.generic]) -> Any:
    if not isinstance(a, np.ndarray):
        raise KernelInputError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != np.dtype(dtype):
        raise KernelInputError(f"{name} must have dtype {np.dtype(dtype)}, got {a.dtype}")
    if a.ndim != 1:
        raise KernelInputError(f"{name} must be one-dimensional, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise KernelInputError(f"{name} must be C-contiguous (use np.ascontiguousarray)")
    return a


def _sorted(name: str, a: I64) -> I64:
    a = _array(name, a, np.int64)
    if a.shape[0] > 1:
        bad = np.flatnonzero(a[1:] < a[:-1])
        if bad.shape[0]:
            raise KernelInputError(f"{name} is not sorted ascending at index {int(bad[0]) + 1}")
    return a


def _ptr(ctype: str, a: Any) -> Any:
    return ffi.cast(ctype, ffi.from_buffer(a)) if a.shape[0] else ffi.NULL


def diff_histogram(t_a: I64, t_b: I64, *, lo_ps: int, bin_ps: int, nbins: int) -> I64:
    """Counts of ``t_b[j] - t_a[i]`` in ``nbins`` bins of ``bin_ps`` from ``lo_ps``."""
    t_a, t_b = _sorted("t_a", t_a), _sorted("t_b", t_b)
    if bin_ps <= 0 or nbins <= 0:
        raise KernelInputError(f"bin_ps and nbins must be positive, got {bin_ps}, {nbins}")
    counts = np.empty(nbins, dtype=np.int64)
    rc = lib.qk_diff_histogram(
        _ptr("int64_t *", t_a),
        t_a.shape[0],
        _ptr("int64_t *", t_b),
        t_b.shape[0],
        lo_ps,
        bin_ps,
        nbins,
        ffi.cast("int64_t *", ffi.from_buffer(counts)),
    )
    _check(rc, "diff_histogram")
    return counts


def coincidences_tracked(
    t_a: I64, t_b: I64, *, window_ps: int, offset_ps: float = 0.0, track_gain: float = 0.0
) -> tuple[I64, I64, float]:
    """One-to-one pairs ``(i, j)`` with ``|t_b[j] - t_a[i] - offset| <= window_ps/2``.

    Greedy in time order: each ``t_b`` takes the earliest unused ``t_a`` in its
    window.  With ``track_gain > 0`` the offset follows each match
    (``off += gain * (diff - off)``); the final offset is returned.
    """
    t_a, t_b = _sorted("t_a", t_a), _sorted("t_b", t_b)
    if window_ps < 0 or not 0.0 <= track_gain <= 1.0:
        raise KernelInputError("window_ps must be >= 0 and track_gain in [0, 1]")
    cap = min(t_a.shape[0], t_b.shape[0])
    idx_a = np.empty(cap, dtype=np.int64)
    idx_b = np.empty(cap, dtype=np.int64)
    n_out = ffi.new("size_t *")
    off_out = ffi.new("double *")
    rc = lib.qk_coincidences(
        _ptr("int64_t *", t_a),
        t_a.shape[0],
        _ptr("int64_t *", t_b),
        t_b.shape[0],
        window_ps,
        float(offset_ps),
        float(track_gain),
        _ptr("int64_t *", idx_a),
        _ptr("int64_t *", idx_b),
        cap,
        n_out,
        off_out,
    )
    _check(rc, "coincidences")
    n = int(n_out[0])
    return idx_a[:n], idx_b[:n], float(off_out[0])


def coincidences(
    t_a: I64, t_b: I64, *, window_ps: int, offset_ps: float = 0.0, track_gain: float = 0.0
) -> tuple[I64, I64]:
    """Index arrays of one-to-one pairs, both ascending (see :func:`coincidences_tracked`)."""
    ia, ib, _ = coincidences_tracked(
        t_a, t_b, window_ps=window_ps, offset_ps=offset_ps, track_gain=track_gain
    )
    return ia, ib


def assign_slots(
    t: I64, *, t0_ps: float, period_ps: float, window_ps: int, track_gain: float = 0.0
) -> tuple[I64, U8, float]:
    """Pulse slot of each detection, whether it is inside the window, and the tracked t0."""
    t = _array("t", t, np.int64)
    if not period_ps > 0 or window_ps < 0 or not 0.0 <= track_gain <= 1.0:
        raise KernelInputError("period_ps must be > 0, window_ps >= 0, track_gain in [0, 1]")
    slots = np.empty(t.shape[0], dtype=np.int64)
    inside = np.empty(t.shape[0], dtype=np.uint8)
    t0_out = ffi.new("double *")
    rc = lib.qk_assign_slots(
        _ptr("int64_t *", t),
        t.shape[0],
        float(t0_ps),
        float(period_ps),
        window_ps,
        float(track_gain),
        _ptr("int64_t *", slots),
        _ptr("uint8_t *", inside),
        t0_out,
    )
    _check(rc, "assign_slots")
    return slots, inside, float(t0_out[0])


def sift(basis_a: U8, basis_b: U8) -> I64:
    """Indices where Alice's and Bob's bases agree."""
    basis_a, basis_b = _array("basis_a", basis_a, np.uint8), _array("basis_b", basis_b, np.uint8)
    if basis_a.shape != basis_b.shape:
        raise KernelInputError(
            f"basis_a has {basis_a.shape[0]} entries, basis_b {basis_b.shape[0]}"
        )
    keep = np.empty(basis_a.shape[0], dtype=np.int64)
    n = ffi.new("size_t *")
    rc = lib.qk_sift(
        _ptr("uint8_t *", basis_a),
        _ptr("uint8_t *", basis_b),
        basis_a.shape[0],
        _ptr("int64_t *", keep),
        n,
    )
    _check(rc, "sift")
    return keep[: int(n[0])]


def pack_bits(bits: U8) -> U8:
    """0/1 bytes packed MSB first, like ``numpy.packbits``."""
    bits = _array("bits", bits, np.uint8)
    out = np.empty((bits.shape[0] + 7) // 8, dtype=np.uint8)
    rc = lib.qk_pack_bits(_ptr("uint8_t *", bits), bits.shape[0], _ptr("uint8_t *", out))
    _check(rc, "pack_bits")
    return out


def count_errors(a: U8, b: U8) -> int:
    """Number of positions where two bit arrays differ."""
    a, b = _array("a", a, np.uint8), _array("b", b, np.uint8)
    if a.shape != b.shape:
        raise KernelInputError(f"a has {a.shape[0]} bits, b has {b.shape[0]}")
    n = ffi.new("size_t *")
    _check(
        lib.qk_count_errors(_ptr("uint8_t *", a), _ptr("uint8_t *", b), a.shape[0], n),
        "count_errors",
    )
    return int(n[0])


# -- offset search: orchestration over diff_histogram ----------------------------

Histogram = Callable[..., I64]
MAX_BINS = 1 << 14
ZOOM = 16


def _peak(counts: I64, min_snr: float, where: str) -> tuple[int, float]:
    k = int(np.argmax(counts))
    background = float(np.median(counts))
    snr = (float(counts[k]) - background) / math.sqrt(max(background, 1.0))
    if snr < min_snr:
        raise LockError(f"{where}: correlation peak SNR {snr:.1f} below {min_snr:.1f}")
    return k, snr


def find_offset(
    t_a: I64,
    t_b: I64,
    *,
    max_offset_ps: int,
    resolution_ps: int,
    min_snr: float = 6.0,
    histogram: Histogram = diff_histogram,
) -> int:
    """Offset (ps) with ``t_b ≈ t_a + offset``, from cross-correlating arrival times.

    Coarse to fine: a histogram of all differences over ``±max_offset_ps`` with
    at most ``MAX_BINS`` bins, its peak checked against the background by a
    signal-to-noise gate (:class:`LockError` if it fails), then ever finer
    histograms around the peak until the bin width reaches ``resolution_ps``.
    """
    if max_offset_ps <= 0 or resolution_ps <= 0:
        raise KernelInputError("max_offset_ps and resolution_ps must be positive")
    if t_a.shape[0] == 0 or t_b.shape[0] == 0:
        raise LockError("no tags to correlate")
    lo = -max_offset_ps
    span = 2 * max_offset_ps
    bin_ps = max(resolution_ps, -(-span // MAX_BINS))
    nbins = -(-span // bin_ps)
    counts = histogram(t_a, t_b, lo_ps=lo, bin_ps=bin_ps, nbins=nbins)
    k, _ = _peak(counts, min_snr, "coarse search")
    while bin_ps > resolution_ps:
        # Zoom on the peak bin and its neighbours (a peak may straddle two bins).
        lo = lo + (k - 1) * bin_ps
        new_bin = max(resolution_ps, bin_ps // ZOOM)
        nbins = -(-3 * bin_ps // new_bin)
        bin_ps = new_bin
        counts = histogram(t_a, t_b, lo_ps=lo, bin_ps=bin_ps, nbins=nbins)
        k = int(np.argmax(counts))
    # Centroid of the peak bin and its neighbours for sub-bin precision.
    ks = np.arange(max(0, k - 2), min(counts.shape[0], k + 3))
    w = counts[ks].astype(np.float64)
    centre = float((ks * w).sum() / w.sum()) if w.sum() > 0 else float(k)
    return round(lo + (centre + 0.5) * bin_ps)


def find_offset_drift(
    t_a: I64,
    t_b: I64,
    *,
    max_offset_ps: int,
    resolution_ps: int,
    max_drift: float = 50e-6,
    min_snr: float = 6.0,
    histogram: Histogram = diff_histogram,
) -> tuple[int, float]:
    """Offset at ``t_a[0]`` and relative clock drift of Bob against Alice.

    Model: ``t_b ≈ t_a[0] + offset + (t_a - t_a[0]) * (1 + drift)``, with
    ``|drift| <= max_drift`` (quartz clocks: tens of ppm).  After a coarse
    lock over the whole span (drift smears less than a coarse bin), drift and
    offset are searched together, coarse to fine: at each level Bob's tags are
    corrected for every candidate drift on a grid whose step smears the data
    by less than one bin over the span, and the candidate with the highest
    correlation peak wins; then bins and steps shrink around it.
    """
    span = float(t_a[-1] - t_a[0]) if t_a.shape[0] else 0.0
    # Coarse bins no narrower than the drift can smear the peak over the span.
    smear = int(max_drift * span)
    coarse = find_offset(
        t_a,
        t_b,
        max_offset_ps=max_offset_ps,
        resolution_ps=max(resolution_ps, 1000, smear),
        min_snr=min_snr,
        histogram=histogram,
    )
    if span <= 0:
        return coarse, 0.0
    # Pivot the drift correction at mid-span: a small error in the drift then
    # tilts the peak symmetrically and does not shift its centre.
    mid = 0.5 * (float(t_a[0]) + float(t_a[-1]))
    rel_b = (t_b - (mid + coarse)).astype(np.float64)
    bin_ps = max(resolution_ps, -(-2 * max_offset_ps // MAX_BINS))
    reach = 2 * smear + 2 * bin_ps  # how far drift can move the peak
    lo_d, hi_d = -max_drift, max_drift
    best_d, best_off = 0.0, float(coarse)
    while True:
        step = bin_ps / span
        n_cand = int((hi_d - lo_d) / step) + 1
        best_peak = -1
        for d in np.linspace(lo_d, hi_d, max(n_cand, 1)):
            corrected = t_b - np.rint(rel_b * (d / (1 + d))).astype(np.int64)
            nbins = -(-2 * reach // bin_ps)
            lo = round(best_off) - reach
            counts = histogram(t_a, corrected, lo_ps=lo, bin_ps=bin_ps, nbins=nbins)
            k = int(np.argmax(counts))
            if counts[k] > best_peak:
                best_peak = int(counts[k])
                ks = np.arange(max(0, k - 1), min(nbins, k + 2))
                w = counts[ks].astype(np.float64)
                centre = float((ks * w).sum() / w.sum())
                cand_off = lo + (centre + 0.5) * bin_ps
                cand_d = float(d)
        best_d, best_off = cand_d, cand_off
        if bin_ps <= resolution_ps:
            break
        lo_d, hi_d = best_d - 2 * step, best_d + 2 * step
        bin_ps = max(resolution_ps, bin_ps // 8)
        reach = 8 * bin_ps
    # The peak is the offset at mid-span; report it at t_a[0].
    return round(best_off - best_d * (mid - float(t_a[0]))), best_d
