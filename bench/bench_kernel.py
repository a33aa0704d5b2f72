"""Throughput of the C kernel against the numpy reference, on the same data in one run.

    .venv/bin/python bench/bench_kernel.py [--tags 20000000] [--ref-tags 2000000]

Not a test: prints a table of tags/s (tags of both streams for the two-stream
kernels).  The reference runs on a prefix of the same data when it is slow;
rates are per tag, so they compare.  Everything runs single-threaded (BLAS
threads are capped before numpy loads; the kernels do not use it anyway).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402  (after the thread caps)
import numpy.typing as npt  # noqa: E402

from qnoded import kernel, kernel_ref  # noqa: E402

I64 = npt.NDArray[np.int64]

OFFSET_PS = 1_234_567
WINDOW_PS = 500
JITTER_PS = 50.0


def make_streams(n: int, rng: np.random.Generator) -> tuple[I64, I64]:
    """Two streams of ~n tags each: 50 % of t_b are partners of t_a, the rest dark counts.

    Mean spacing 10 ns (100 MHz detected rate), Gaussian jitter 50 ps.
    """
    t_a = np.cumsum(rng.exponential(10_000.0, n)).astype(np.int64)
    paired = t_a[rng.random(n) < 0.5]
    partners = paired + OFFSET_PS + np.rint(rng.normal(0, JITTER_PS, paired.shape[0]))
    dark = rng.integers(int(t_a[0]), int(t_a[-1]), n - paired.shape[0])
    t_b = np.sort(np.concatenate([partners.astype(np.int64), dark]))
    return t_a, t_b


def best_of(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def row(name: str, n_c: int, s_c: float, n_r: int, s_r: float) -> None:
    rate_c, rate_r = n_c / s_c, n_r / s_r
    print(
        f"{name:<34} {n_c:>11,} {rate_c / 1e6:>10.1f} {n_r:>11,} {rate_r / 1e6:>10.2f}"
        f" {rate_c / rate_r:>8.1f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tags", type=int, default=10_000_000, help="tags per stream for C")
    parser.add_argument("--ref-tags", type=int, default=1_000_000, help="per stream, reference")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(2024)
    t_a, t_b = make_streams(args.tags, rng)
    n_ref = min(args.ref_tags, t_a.shape[0])
    end = t_a[n_ref - 1]
    r_a, r_b = t_a[:n_ref], t_b[: int(np.searchsorted(t_b, end))]
    both, both_ref = t_a.shape[0] + t_b.shape[0], r_a.shape[0] + r_b.shape[0]

    print(f"qkernel v{kernel.version()}; streams of {t_a.shape[0]:,} + {t_b.shape[0]:,} tags")
    print(
        f"{'kernel (rates in M tags/s)':<34} {'C tags':>11} {'C rate':>10} "
        f"{'ref tags':>11} {'ref rate':>10} {'ratio':>9}"
    )

    # coincidences, fixed offset: C vs the exact reference and vs numpy searchsorted
    def c_coinc() -> object:
        return kernel.coincidences(t_a, t_b, window_ps=WINDOW_PS, offset_ps=OFFSET_PS)

    s_c = best_of(c_coinc, args.repeat)
    ia, _ = kernel.coincidences(t_a, t_b, window_ps=WINDOW_PS, offset_ps=OFFSET_PS)
    small = min(n_ref, 200_000)  # the exact reference is a Python loop
    end_s = t_a[small - 1]
    s_a, s_b = t_a[:small], t_b[: int(np.searchsorted(t_b, end_s))]
    s_r = best_of(
        lambda: kernel_ref.coincidences(s_a, s_b, window_ps=WINDOW_PS, offset_ps=OFFSET_PS), 1
    )
    row("coincidences vs exact ref (loop)", both, s_c, s_a.shape[0] + s_b.shape[0], s_r)
    s_v = best_of(
        lambda: kernel_ref.coincidences_nearest(r_a, r_b, window_ps=WINDOW_PS, offset_ps=OFFSET_PS),
        args.repeat,
    )
    row("coincidences vs numpy searchsorted", both, s_c, both_ref, s_v)

    def c_tracked() -> object:
        return kernel.coincidences_tracked(
            t_a, t_b, window_ps=WINDOW_PS, offset_ps=OFFSET_PS, track_gain=0.01
        )

    s_t = best_of(c_tracked, args.repeat)
    s_tr = best_of(
        lambda: kernel_ref.coincidences_tracked(
            s_a, s_b, window_ps=WINDOW_PS, offset_ps=OFFSET_PS, track_gain=0.01
        ),
        1,
    )
    row("coincidences, tracking (gain .01)", both, s_t, s_a.shape[0] + s_b.shape[0], s_tr)

    # assign_slots: 1 GHz pulses, 0.999 ps of clock error per period
    period = 1000.0 + 0.999

    def c_slots(track: float) -> Callable[[], object]:
        return lambda: kernel.assign_slots(
            t_b, t0_ps=0.0, period_ps=period, window_ps=200, track_gain=track
        )

    def r_slots(track: float, t: I64) -> Callable[[], object]:
        return lambda: kernel_ref.assign_slots(
            t, t0_ps=0.0, period_ps=period, window_ps=200, track_gain=track
        )

    row(
        "assign_slots, fixed t0",
        t_b.shape[0],
        best_of(c_slots(0.0), args.repeat),
        r_b.shape[0],
        best_of(r_slots(0.0, r_b), args.repeat),
    )
    row(
        "assign_slots, tracking",
        t_b.shape[0],
        best_of(c_slots(0.001), args.repeat),
        s_b.shape[0],
        best_of(r_slots(0.001, s_b), 1),
    )

    # diff_histogram over +-10 ns (about 2 x 10 ns / 10 ns = 2 pairs per tag) in 50 ps bins
    def hist(fn: kernel.Histogram, a: I64, b: I64) -> Callable[[], object]:
        return lambda: fn(a, b, lo_ps=OFFSET_PS - 10_000, bin_ps=50, nbins=400)

    row(
        "diff_histogram, ±10 ns window",
        both,
        best_of(hist(kernel.diff_histogram, t_a, t_b), args.repeat),
        both_ref,
        best_of(hist(kernel_ref.diff_histogram, r_a, r_b), args.repeat),
    )

    # find_offset: blind lock over ±1 ms, 1e5 tags per side at 1 MHz (0.1 s),
    # 30 % of Bob's tags paired, offset 0.4321 ms, 50 ps jitter.
    n_lock, true_off = 100_000, 432_123_456
    l_a = np.cumsum(rng.exponential(1e6, n_lock)).astype(np.int64)
    kept = l_a[rng.random(n_lock) < 0.3]
    l_b = np.sort(
        np.concatenate(
            [
                kept + true_off + np.rint(rng.normal(0, JITTER_PS, kept.shape[0])).astype(np.int64),
                rng.integers(int(l_a[0]), int(l_a[-1]), n_lock - kept.shape[0]),
            ]
        )
    )

    def lock(fn: kernel.Histogram) -> Callable[[], object]:
        return lambda: kernel.find_offset(
            l_a, l_b, max_offset_ps=1_000_000_000, resolution_ps=20, histogram=fn
        )

    found = kernel.find_offset(l_a, l_b, max_offset_ps=1_000_000_000, resolution_ps=20)
    row(
        f"find_offset ±1 ms (err {found - true_off:+d} ps)",
        l_a.shape[0] + l_b.shape[0],
        best_of(lock(kernel.diff_histogram), args.repeat),
        l_a.shape[0] + l_b.shape[0],
        best_of(lock(kernel_ref.diff_histogram), 1),
    )
    print(f"\n{ia.shape[0]:,} coincidences of {t_a.shape[0]:,}; true offset {OFFSET_PS} ps")


if __name__ == "__main__":
    main()
