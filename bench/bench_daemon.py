"""Sustained throughput of two real `qnoded run` processes over TCP and MQTT.

    python bench/bench_daemon.py [--seconds-of-data 4] [--pair-rate 2e7]

Recorded-looking BBM92 tag streams are generated up front and replayed at full
speed, so the figure is the daemon's: ingest, framing over the peer TCP link,
lock, C coincidences, sifting and QBER sampling, with telemetry over a private
Mosquitto.  Two paths in the same run, on the same recordings:

- in-process: both nodes read their recording with the ``replay-tagger`` driver;
- TCP tagger: Bob's tags come from ``hil/tcp_tagger.py --replay`` over loopback
  (control port, framed CRC-checked records on the data port) through the
  ``tcp-tagger`` driver, as from a streaming time tagger on the network.

Prints tags/s from the nodes' own telemetry, dropped batches, and the TCP path
against the in-process one.
"""

from __future__ import annotations

import argparse
import asyncio
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_pipeline import make_streams

from qnoded.broker import MosquittoBroker, free_port
from qnoded.demo import demo_psk, spawn_node, stop_node
from qnoded.mqtt import Subscriber

EMULATOR = Path(__file__).resolve().parent.parent / "hil" / "tcp_tagger.py"
EMULATOR_CMD = (sys.executable, str(EMULATOR))
FRAME_RECORDS = 65536  # tags per frame on the emulator's wire


def replay_table(recording: Path) -> str:
    return f'[devices.tagger]\ndriver = "replay-tagger"\nfile = "{recording}"\n'


def config(role: str, broker: str, port: int, state: Path, tagger: str) -> str:
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
{tagger}"""


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


class TaggerEmulator:
    """hil/tcp_tagger.py replaying a recording, up once it printed its READY line."""

    def __init__(self, recording: Path) -> None:
        self.proc = subprocess.Popen(
            [*EMULATOR_CMD, "--replay", str(recording), "--frame-records", str(FRAME_RECORDS)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30.0)
        line = self.proc.stdout.readline().split() if ready else []
        if not line or line[0] != "READY":
            self.stop()
            raise RuntimeError(f"tagger emulator did not start: {line}")
        self.host, port = line[1].rsplit(":", 1)
        self.port = int(port)

    def table(self, batch_ps: int) -> str:
        return (
            f'[devices.tagger]\ndriver = "tcp-tagger"\nhost = "{self.host}"\n'
            f"port = {self.port}\nbatch_duration_ps = {batch_ps}\n"
        )

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_pair(
    work: Path, broker: MosquittoBroker, tables: dict[str, str], bob_total: int
) -> dict[str, Any]:
    """Alice and Bob on these tagger tables until Bob's recording has gone through."""
    work.mkdir()
    port = free_port()
    procs = []
    for role in ("alice", "bob"):
        cfg = work / f"{role}.toml"
        cfg.write_text(config(role, f"{broker.host}:{broker.port}", port, work, tables[role]))
        procs.append(spawn_node(cfg, work / f"{role}.log"))
        time.sleep(0.5 if role == "alice" else 0)
    try:
        return asyncio.run(follow(broker.host, broker.port, bob_total, procs))
    finally:
        for p in reversed(procs):
            stop_node(p)


def report(path: str, r: dict[str, Any]) -> float:
    a = r["alice"]
    # Alice's count holds her own tags and Bob's that went through the kernel.
    tags = a["tags_processed"]
    rate = tags / r["elapsed"]
    print(
        f"{path}: {tags:,} tags in {r['elapsed']:.2f} s = {rate / 1e6:.1f} M tags/s; "
        f"coincidences {a['coincidences']:,}, sifted {a['sifted_bits']:,}, "
        f"QBER {a['qber']:.4f}, drift {a['drift_ppm']:.3f} ppm; dropped batches "
        f"alice {a['dropped_batches']} bob {r['bob']['dropped_batches']}"
    )
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds-of-data", type=float, default=4.0)
    ap.add_argument("--pair-rate", type=float, default=2e7)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qnoded-bench-"))
    alice_b, bob_b = make_streams(args.seconds_of_data, args.pair_rate)
    batch_ps = alice_b[0].stop_ps - alice_b[0].start_ps
    files = {}
    for role, batches in (("alice", alice_b), ("bob", bob_b)):
        files[role] = work / f"{role}.npz"
        np.savez(
            files[role],
            timestamps_ps=np.concatenate([b.timestamps_ps for b in batches]),
            channels=np.concatenate([b.channels for b in batches]),
            batch_duration_ps=np.array([batch_ps]),
        )
    n_a, n_b = sum(len(b) for b in alice_b), sum(len(b) for b in bob_b)
    del alice_b, bob_b
    print(
        f"replaying {n_a + n_b:,} tags ({n_a:,} Alice, {n_b:,} Bob), "
        f"{args.seconds_of_data} s of link time at "
        f"{(n_a + n_b) / args.seconds_of_data / 1e6:.1f} M tags/s; "
        "two processes, TCP peer link, 2 cores"
    )
    local = {role: replay_table(files[role]) for role in ("alice", "bob")}
    with MosquittoBroker() as broker:
        inproc = report("in-process replay", run_pair(work / "inproc", broker, local, n_b))
        emulator = TaggerEmulator(files["bob"])
        try:
            tables = {"alice": local["alice"], "bob": emulator.table(batch_ps)}
            tcp = report("Bob on the TCP tagger", run_pair(work / "tcp", broker, tables, n_b))
        finally:
            emulator.stop()
    print(f"TCP tagger path / in-process path: {tcp / inproc:.2f}; logs in {work}")


if __name__ == "__main__":
    main()
