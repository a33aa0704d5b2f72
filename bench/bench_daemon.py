"""Sustained throughput of two real `qnoded run` processes over TCP and MQTT.

    python bench/bench_daemon.py [--seconds-of-data 4] [--pair-rate 2e7]

Recorded-looking BBM92 tag streams are generated up front and replayed by the
``replay-tagger`` driver at full speed, so the figure is the daemon's: ingest,
framing over the peer TCP link, lock, C coincidences, sifting and QBER
sampling, with telemetry over a private Mosquitto.  Prints tags/s from the
nodes' own telemetry, and dropped batches.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_pipeline import make_streams

from qnoded.broker import MosquittoBroker, free_port
from qnoded.demo import demo_psk, spawn_node, stop_node
from qnoded.mqtt import Subscriber


def config(role: str, broker: str, port: int, state: Path, recording: Path) -> str:
    peer = f'listen = "127.0.0.1:{port}"' if role == "alice" else f'connect = "127.0.0.1:{port}"'
    return f"""
[node]
id = "{role}"
role = "{role}"
protocol = "bbm92"
[peer]
peer_id = "{"bob" if role == "alice" else "alice"}"
{peer}
[mqtt]
broker = "{broker}"
telemetry_interval_s = 0.25
[timing]
coincidence_window_ps = 500
[sifting]
max_batches_in_flight = 32
[state]
directory = "{state / role}"
[auth]
psk_file = "{demo_psk(state)}"
[devices.tagger]
driver = "replay-tagger"
file = "{recording}"
"""


async def follow(
    host: str, port: int, bob_total: int, procs: list[subprocess.Popen[bytes]]
) -> dict[str, Any]:
    """Telemetry until Bob has sent his whole recording and Alice's counts
    stop moving; the run ends at Alice's last message that still moved."""
    last: dict[str, dict[str, Any]] = {}
    first_t: float | None = None
    moved: dict[str, Any] | None = None
    async with Subscriber((host, port), "qkd/v1/+/telemetry") as sub:
        async with asyncio.timeout(300):
            async for msg in sub:
                node = msg.topic.split("/")[2]
                data = msg.payload
                if first_t is None and data.get("tags_processed", 0) > 0:
                    first_t = data["time"] - data["interval_s"]
                if node == "alice":
                    prev = last.get("alice", {})
                    if data.get("tags_processed") != prev.get("tags_processed"):
                        moved = data
                    elif last.get("bob", {}).get("tags_processed", 0) >= bob_total and moved:
                        break
                last[node] = data
                if any(p.poll() is not None for p in procs):
                    raise RuntimeError("a node exited during the benchmark")
    assert first_t is not None and moved is not None
    return {"elapsed": moved["time"] - first_t, "alice": moved, "bob": last["bob"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds-of-data", type=float, default=4.0)
    ap.add_argument("--pair-rate", type=float, default=2e7)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qnoded-bench-"))
    alice_b, bob_b = make_streams(args.seconds_of_data, args.pair_rate)
    files = {}
    for role, batches in (("alice", alice_b), ("bob", bob_b)):
        files[role] = work / f"{role}.npz"
        np.savez(
            files[role],
            timestamps_ps=np.concatenate([b.timestamps_ps for b in batches]),
            channels=np.concatenate([b.channels for b in batches]),
            batch_duration_ps=np.array([batches[0].stop_ps - batches[0].start_ps]),
        )
    n_a, n_b = sum(len(b) for b in alice_b), sum(len(b) for b in bob_b)
    del alice_b, bob_b
    print(
        f"replaying {n_a + n_b:,} tags ({n_a:,} Alice, {n_b:,} Bob), "
        f"{args.seconds_of_data} s of link time"
    )
    with MosquittoBroker() as broker:
        port = free_port()
        procs = []
        for role in ("alice", "bob"):
            cfg = work / f"{role}.toml"
            cfg.write_text(config(role, f"{broker.host}:{broker.port}", port, work, files[role]))
            procs.append(spawn_node(cfg, work / f"{role}.log"))
            time.sleep(0.5 if role == "alice" else 0)
        try:
            r = asyncio.run(follow(broker.host, broker.port, n_b, procs))
        finally:
            for p in reversed(procs):
                stop_node(p)
    a = r["alice"]
    # Alice's count holds her own tags and Bob's that went through the kernel.
    tags = a["tags_processed"]
    rate = tags / r["elapsed"]
    print(
        f"daemon pipeline: {tags:,} tags in {r['elapsed']:.2f} s = {rate / 1e6:.1f} M tags/s "
        f"(two processes, TCP peer link, 2 cores)"
    )
    print(
        f"coincidences {a['coincidences']:,}, sifted {a['sifted_bits']:,}, QBER {a['qber']:.4f}, "
        f"drift {a['drift_ppm']:.3f} ppm, dropped batches alice {a['dropped_batches']} "
        f"bob {r['bob']['dropped_batches']}"
    )
    print(
        f"link real-time rate {(n_a + n_b) / args.seconds_of_data / 1e6:.1f} M tags/s; "
        f"logs in {work}"
    )


if __name__ == "__main__":
    main()
