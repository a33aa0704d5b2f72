"""Post-processing throughput and efficiency, against plain numpy references in one run.

    .venv/bin/python bench/bench_post.py [--ec-bits 1000000] [--pa-bits 100000000]

Not a test: prints

* Cascade's efficiency f = leaked / (n h(QBER)) at QBER 1, 2, 3, 5 % and its
  throughput in sifted Mb/s, both sides in one process (no network), with the
  round trips it needs (each one a network round trip in the daemon); then
  the throughput with one block per core on all cores (independent blocks in
  worker processes, as a post-processing engine that pipelines blocks runs;
  the daemon today runs one block at a time);
* privacy amplification in input Mb/s: the multilinear Carter-Wegman hash over
  a Mersenne prime (GMP, two threads) at 1e8 bits, and a plain numpy FFT Toeplitz hash at
  sizes numpy can do in seconds, with ours at the same sizes for the ratio;
* the verification hash, and the whole chain EC + verification + PA per
  secret bit produced.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import numpy.typing as npt

from qnoded import amplify, reconcile
from qnoded.estimation import h2

U8 = npt.NDArray[np.uint8]


def noisy(n: int, qber: float, rng: np.random.Generator) -> tuple[U8, U8, float]:
    a = rng.integers(0, 2, n, dtype=np.uint8)
    e = (rng.random(n) < qber).astype(np.uint8)
    return a, a ^ e, float(e.mean())


def toeplitz_numpy(bits: U8, seed: U8, m: int) -> U8:
    """y = T x over GF(2), T the m x n Toeplitz matrix of seed (n + m - 1 bits), by FFT."""
    n = bits.shape[0]
    size = 1 << (n + m - 1 + n - 1).bit_length()
    spec = np.fft.rfft(seed.astype(np.float64), size)
    spec *= np.fft.rfft(bits[::-1].astype(np.float64), size)
    conv = np.fft.irfft(spec, size)
    return (np.rint(conv[n - 1 : n - 1 + m]).astype(np.int64) & 1).astype(np.uint8)


def _ec_worker(job: tuple[int, float, int, int]) -> tuple[int, float]:
    """Reconcile ``blocks`` fresh blocks in this process; bits done and seconds taken."""
    n, qber, blocks, seed = job
    rng = np.random.default_rng(seed)
    plan = reconcile.CascadePlan.for_qber(n, qber, seed=seed)
    pairs = [noisy(n, qber, rng)[:2] for _ in range(blocks + 1)]
    reconcile.reconcile_local(*pairs[0], plan)  # warm: the plan's shuffles, once
    t0 = time.perf_counter()
    for a, b in pairs[1:]:
        out = reconcile.reconcile_local(a, b, plan)
        assert np.array_equal(out.bits, a), "a block left errors"
    return n * blocks, time.perf_counter() - t0


def ec_all_cores(n: int, qber: float, blocks: int, workers: int) -> float:
    """Sifted Mb/s with ``workers`` processes each reconciling its own blocks."""
    with ProcessPoolExecutor(workers) as pool:
        results = list(pool.map(_ec_worker, [(n, qber, blocks, 100 + w) for w in range(workers)]))
    # Throughput of the slowest worker bounds the whole; sum of bits over the longest time.
    return sum(bits for bits, _ in results) / max(dt for _, dt in results) / 1e6


def timed(fn, *args):  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ec-bits", type=int, default=1_000_000)
    ap.add_argument("--pa-bits", type=int, default=100_000_000)
    args = ap.parse_args()
    rng = np.random.default_rng(2026)

    n = args.ec_bits
    print(f"Cascade on {n} bits (frame {reconcile.DEFAULT_FRAME}), both sides in one process")
    print(f"{'QBER':>6} {'f':>7} {'rounds':>7} {'Mb/s':>7} {'residual':>9}")
    for q in (0.01, 0.02, 0.03, 0.05):
        a, b, actual = noisy(n, q, rng)
        plan = reconcile.CascadePlan.for_qber(n, q, seed=int(rng.integers(2**62)))
        reconcile.reconcile_local(a, b, plan)  # warm: shuffles are computed once per plan
        out, dt = timed(reconcile.reconcile_local, a, b, plan)
        f = reconcile.efficiency(out.leaked_bits, n, actual)
        resid = int(np.count_nonzero(out.bits != a))
        print(f"{q:6.2%} {f:7.4f} {out.rounds:7d} {n / dt / 1e6:7.1f} {resid:9d}")

    cores = len(os.sched_getaffinity(0))
    print(f"\nCascade, one block per core on {cores} cores (worker processes, 6 blocks each)")
    print(f"{'QBER':>6} {'1 core Mb/s':>12} {f'{cores} cores Mb/s':>14}")
    for q in (0.01, 0.02, 0.05):
        one = ec_all_cores(n, q, 6, 1)
        every = ec_all_cores(n, q, 6, cores)
        print(f"{q:6.2%} {one:12.1f} {every:14.1f}")

    print("\nPrivacy amplification (output = half the input), input Mb/s")
    print(f"{'bits':>11} {'ours':>9} {'numpy Toeplitz':>15} {'ratio':>7}")
    for size in (1_000_000, 4_000_000):
        x = rng.integers(0, 2, size, dtype=np.uint8)
        seed = amplify.PaSeed.fresh(size, size // 2)
        _, ours = timed(amplify.amplify, x, seed, size // 2)
        tseed = rng.integers(0, 2, size + size // 2 - 1, dtype=np.uint8)
        _, ref = timed(toeplitz_numpy, x, tseed, size // 2)
        print(f"{size:11d} {size / ours / 1e6:9.1f} {size / ref / 1e6:15.2f} {ref / ours:6.0f}x")
    size = args.pa_bits
    x = rng.integers(0, 2, size, dtype=np.uint8)
    seed = amplify.PaSeed.fresh(size, size // 2)
    _, ours = timed(amplify.amplify, x, seed, size // 2)
    print(f"{size:11d} {size / ours / 1e6:9.1f} {'(too slow)':>15}")

    points = amplify.random_points(amplify.verify_points(size, 1e-15))
    _, dv = timed(amplify.verification_tag, x, points)
    rate = size / dv / 1e6
    print(f"\nVerification hash ({points.shape[0]} points) at {size} bits: {rate:.0f} Mb/s")

    q = 0.02
    a, b, actual = noisy(n, q, rng)
    plan = reconcile.CascadePlan.for_qber(n, q, seed=1)
    reconcile.reconcile_local(a, b, plan)
    t0 = time.perf_counter()
    out = reconcile.reconcile_local(a, b, plan)
    pts = amplify.random_points(amplify.verify_points(n, 1e-15))
    same = np.array_equal(amplify.verification_tag(a, pts), amplify.verification_tag(out.bits, pts))
    # Secret fraction at this QBER with a perfect single-photon source, for scale only.
    m = int(n * (1 - h2(actual))) - out.leaked_bits
    amplify.amplify(out.bits, amplify.PaSeed.fresh(n, m), m)
    dt = time.perf_counter() - t0
    print(
        f"EC + verification + PA, {n} bits at QBER {q:.0%}: {dt:.3f} s, "
        f"{n / dt / 1e6:.1f} sifted Mb/s, {m / dt / 1e6:.1f} secret Mb/s, verified={same}"
    )


if __name__ == "__main__":
    main()
