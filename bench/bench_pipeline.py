"""Sustained throughput of the node pipeline, Alice and Bob in one process.

Every stage the daemon runs per batch runs here, in the daemon's own code:
batch validation (ingest), Bob's TAGS message, its wire encoding and
decoding (peer framing payloads), Alice's clock lock, mapping into her frame,
the C coincidence kernel with tracking, sifting, the QBER sample round trip and
the key record.  What is left out is the TCP socket and the simulator: tags are
generated up front (BBM92-like pairs with offset, drift, jitter and
uncorrelated singles) so the figure is the pipeline's, not the generator's.

    python bench/bench_pipeline.py [--seconds-of-data 4] [--pair-rate 2e7]

Prints tags/s (both nodes' tags) and the number of dropped batches.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from qnoded import peer
from qnoded.config import parse_config
from qnoded.contracts import TagBatch
from qnoded.ingest import BatchValidator
from qnoded.sifting import AliceEngine, BobEngine

CONFIG = """
[node]
id = "{role}"
role = "{role}"
protocol = "bbm92"
[peer]
peer_id = "x"
listen = "127.0.0.1:1"
connect = "127.0.0.1:1"
[timing]
coincidence_window_ps = 500
lock_min_events = 2000
[state]
directory = "/tmp/qnoded-bench"
"""


def make_streams(seconds: float, pair_rate: float, seed: int = 5) -> tuple[list[TagBatch], ...]:
    rng = np.random.default_rng(seed)
    batch_ps = 10_000_000_000
    offset_ps, drift = 123_456_789, 7e-6
    eta_a, eta_b, singles = 0.5, 0.3, 0.2  # singles: uncorrelated share
    alice: list[TagBatch] = []
    bob: list[TagBatch] = []
    n_batches = round(seconds * 1e12 / batch_ps)
    for k in range(n_batches):
        t0 = k * batch_ps
        n = rng.poisson(pair_rate * batch_ps * 1e-12)
        pairs = np.sort(rng.integers(t0, t0 + batch_ps, n))
        bits = rng.integers(0, 2, n).astype(np.uint8)
        ba, bb = rng.integers(0, 2, n).astype(np.uint8), rng.integers(0, 2, n).astype(np.uint8)
        ma, mb = rng.random(n) < eta_a, rng.random(n) < eta_b
        ta = pairs[ma] + rng.normal(0, 30, ma.sum()).astype(np.int64)
        ca = (ba[ma] << 1) | bits[ma]
        tb_true = pairs[mb] + rng.normal(0, 30, mb.sum()).astype(np.int64)
        cb = (bb[mb] << 1) | np.where(bb[mb] == ba[mb], bits[mb], rng.integers(0, 2, mb.sum()))
        extra = int(singles * ta.shape[0])
        ta = np.concatenate([ta, rng.integers(t0, t0 + batch_ps, extra)])
        ca = np.concatenate([ca, rng.integers(0, 4, extra)]).astype(np.uint8)
        order = np.argsort(ta, kind="stable")
        ta, ca = np.clip(ta[order], t0, t0 + batch_ps - 1), ca[order]
        alice.append(TagBatch(k, t0, t0 + batch_ps, ta.astype(np.int64), ca))
        tb = np.rint(tb_true * (1 + drift) + offset_ps).astype(np.int64)
        bob.append((tb, cb.astype(np.uint8)))  # type: ignore[arg-type]
    # Bob's batches are cut on his own clock.
    tb_all = np.concatenate([b[0] for b in bob])  # type: ignore[index]
    cb_all = np.concatenate([b[1] for b in bob])  # type: ignore[index]
    order = np.argsort(tb_all, kind="stable")
    tb_all, cb_all = tb_all[order], cb_all[order]
    start = int(tb_all[0])
    edges = start + np.arange(n_batches + 1, dtype=np.int64) * batch_ps
    idx = np.searchsorted(tb_all, edges)
    bob_batches = [
        TagBatch(
            k,
            int(edges[k]),
            int(edges[k + 1]),
            tb_all[idx[k] : idx[k + 1]].copy(),
            cb_all[idx[k] : idx[k + 1]].copy(),
        )
        for k in range(n_batches)
    ]
    return alice, bob_batches


def wire(msg: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return peer.decode_arrays(peer.encode_arrays(msg))


def run(alice_batches: list[TagBatch], bob_batches: list[TagBatch]) -> dict[str, float]:
    alice = AliceEngine(parse_config(CONFIG.format(role="alice"), "bench"))
    bob = BobEngine(parse_config(CONFIG.format(role="bob"), "bench"))
    va, vb = BatchValidator("alice-tagger"), BatchValidator("bob-tagger")
    ai = 0
    t_start = time.perf_counter()
    for b in bob_batches:
        need = alice.needed_until(b.stop_ps)
        while alice.own_stop_ps < need and ai < len(alice_batches):
            alice.add_own_batch(va.check(alice_batches[ai]))
            ai += 1
        if alice.own_stop_ps < need:
            break
        sift = wire(alice.on_tags(wire(bob.on_batch(vb.check(b)))))
        sample = bob.on_sift(sift)
        if sample is not None:
            bob.on_result(wire(alice.on_sample(wire(sample))))
    elapsed = time.perf_counter() - t_start
    tags = sum(len(x) for x in alice_batches[:ai]) + bob.stats.tags
    return {
        "tags": tags,
        "seconds": elapsed,
        "tags_per_s": tags / elapsed,
        "coincidences": alice.stats.coincidences,
        "sifted": alice.stats.sifted_bits,
        "qber": alice.stats.qber or float("nan"),
        "dropped": alice.stats.dropped_batches
        + bob.stats.dropped_batches
        + va.missed_batches
        + vb.missed_batches,
        "drift_ppm": alice.stats.drift_ppm,
        "locked": float(alice.stats.locked),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds-of-data", type=float, default=2.0)
    ap.add_argument("--pair-rate", type=float, default=2e7, help="pairs/s at the source")
    args = ap.parse_args()
    t = time.perf_counter()
    a, b = make_streams(args.seconds_of_data, args.pair_rate)
    gen = time.perf_counter() - t
    n_a, n_b = sum(len(x) for x in a), sum(len(x) for x in b)
    print(
        f"generated {n_a + n_b:,} tags ({n_a:,} Alice, {n_b:,} Bob) over "
        f"{args.seconds_of_data} s of link time in {gen:.1f} s"
    )
    r = run(a, b)
    print(
        f"pipeline: {r['tags']:,.0f} tags in {r['seconds']:.2f} s = "
        f"{r['tags_per_s'] / 1e6:.1f} M tags/s on one core"
    )
    print(
        f"coincidences {r['coincidences']:,.0f}, sifted {r['sifted']:,.0f}, "
        f"QBER {r['qber']:.4f}, drift {r['drift_ppm']:.2f} ppm, locked {bool(r['locked'])}, "
        f"dropped batches {r['dropped']:.0f}"
    )
    realtime = r["tags_per_s"] / ((n_a + n_b) / args.seconds_of_data)
    print(f"keeps up with {realtime:.1f}x the link's real-time tag rate")


if __name__ == "__main__":
    main()
