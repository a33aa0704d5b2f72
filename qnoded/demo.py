"""``qnoded demo``: Alice and Bob on simulated hardware, making secret key over MQTT.

Starts a private Mosquitto (unless ``--broker``), writes two node configs,
runs each node as its own ``qnoded run`` process (the same code path as on
hardware: only the device table differs), shows a live view from their MQTT
telemetry and ends with one JSON line that summarises the run.  It also
subscribes to both nodes' key topics, as a key consumer would, and checks that
every key ID delivered by both nodes carries the same bytes (it keeps only a
SHA-256 of each key, never the key).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiomqtt

from qnoded.broker import MosquittoBroker, free_port, terminate
from qnoded.mqtt import Subscriber

STOP_TIMEOUT_S = 10.0
# Coincidence windows: a few times the detectors' combined jitter (SPAD 350 ps,
# SNSPD 30 ps), well inside the 100 ns BB84 slot.
WINDOW_PS = {"bb84": 2_000, "bbm92": 500}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", choices=["bb84", "bbm92"], default="bb84")
    p.add_argument("--seconds", type=float, default=None, help="run time (default: until Ctrl-C)")
    p.add_argument("--distance-km", type=float, default=25.0)
    p.add_argument(
        "--eve",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="intercept-resend eavesdropper on this fraction of pulses",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--broker",
        default=None,
        metavar="HOST:PORT",
        help="use this broker instead of starting one",
    )
    p.add_argument(
        "--clock-offset-ps",
        type=int,
        default=None,
        help="Bob's clock offset (default: random within ±1 ms, from --seed)",
    )
    p.add_argument("--drift-ppm", type=float, default=5.0, help="Bob's clock rate error")
    p.add_argument(
        "--fast",
        action="store_true",
        help="simulate as fast as the pipeline runs instead of in real time",
    )
    p.add_argument("--workdir", default=None, help="keep configs, logs and state here")
    p.add_argument(
        "--mismatch-seeds",
        action="store_true",
        help="give Bob's simulated fibre another QRNG seed than Alice's laser: shows that "
        "Bob learns Alice's bits only through physics (expect ~50%% QBER, no key)",
    )
    p.add_argument("--quiet", action="store_true", help="no live view, only the summary")
    p.add_argument(
        "--block-bits",
        type=int,
        default=1_000_000,
        help="Z-basis sifted bits per post-processing block (finite-key size)",
    )
    p.add_argument(
        "--pulse-rate-hz",
        type=float,
        default=5e7,
        help="BB84 source pulse rate (the simulated physics keeps up in real time to ~5e7)",
    )


def spawn_node(
    config: Path, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``qnoded run`` on a config as its own process, JSON logs to ``log``."""
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "qnoded",
                "--log-format",
                "json",
                "run",
                "--config",
                str(config),
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )


def stop_node(proc: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> float:
    """SIGTERM, then SIGKILL after ``timeout_s``; returns how long the node took."""
    return terminate(proc, timeout_s)


def link_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The [simulation] table both nodes share: the simulated fibre and source."""
    import random

    rng = random.Random(args.seed)
    offset = args.clock_offset_ps
    if offset is None:
        offset = rng.randint(-1_000_000_000, 1_000_000_000)
    common: dict[str, Any] = {
        "link_seed": args.seed,
        "alice_qrng_seed": args.seed + 1000,
        "distance_km": args.distance_km,
        "attenuation_db_per_km": 0.2,
        "misalignment": 0.01,
        "eve_fraction": args.eve,
        "bob_clock_offset_ps": offset,
        "bob_clock_drift_ppm": args.drift_ppm,
        "batch_duration_ps": 10_000_000_000,
        "realtime": not args.fast,
    }
    if args.protocol == "bb84":
        common |= {
            "pulse_rate_hz": args.pulse_rate_hz,
            # Decoy settings for finite blocks (Lim et al. 2014 optimise to
            # similar values): enough decoy and vacuum detections per 1e6-bit
            # block that the single-photon bounds are tight.
            "mu_signal": 0.6,
            "mu_decoy": 0.2,
            "p_signal": 0.5,
            "p_decoy": 0.35,
            "sync_density": 0.05,
            "sync_duration_ps": 1_000_000_000_000,
        }
    else:
        common |= {"pair_rate_hz": 2e5, "alice_local_efficiency": 1.0}
    return common


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        # Raw UTF-8, not \u escapes: TOML refuses the surrogate pairs JSON writes beyond
        # U+FFFF.  JSON escapes the other control characters; TOML wants DEL escaped too.
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    return repr(v)


def _table(name: str, body: dict[str, Any]) -> str:
    lines = [f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n\n"


def demo_psk(workdir: Path) -> Path:
    """The demo's pre-shared authentication key, one file both nodes read.

    On real nodes the same secret is installed at both ends out of band
    (``qnoded psk generate``, then LoadCredential=); here both run on one machine.
    """
    from qnoded.auth import write_psk

    path = workdir / "psk"
    if not path.exists():
        write_psk(path)
    return path


def node_config(  # noqa: PLR0917 - one call site, every argument distinct
    role: str,
    args: argparse.Namespace,
    broker: str,
    peer_port: int,
    workdir: Path,
    sim: dict[str, Any],
) -> str:
    """The TOML a node of the demo runs with."""
    other = "bob" if role == "alice" else "alice"
    peer: dict[str, Any] = {"peer_id": other}
    peer["listen" if role == "alice" else "connect"] = f"127.0.0.1:{peer_port}"
    text = _table("node", {"id": role, "role": role, "protocol": args.protocol})
    text += _table("peer", peer)
    text += _table("mqtt", {"broker": broker, "telemetry_interval_s": 1.0})
    window = WINDOW_PS[args.protocol]
    text += _table("timing", {"coincidence_window_ps": window})
    text += _table("state", {"directory": str(workdir / role)})
    text += _table("auth", {"psk_file": str(demo_psk(workdir))})
    text += _table("postprocessing", {"block_bits": args.block_bits})
    if role == "bob" and args.mismatch_seeds:
        sim = sim | {"alice_qrng_seed": sim["alice_qrng_seed"] + 1}
    text += _table("simulation", sim)
    if args.protocol == "bb84" and role == "alice":
        text += _table("devices.laser", {"driver": "sim-laser"})
        return text
    det = "sim-spad" if args.protocol == "bb84" else "sim-snspd"
    text += _table("devices.tagger", {"driver": "sim-tagger"})
    for ch in range(4):
        text += _table(f"devices.det{ch}", {"driver": det, "channel": ch})
    return text


class KeyLedger:
    """What a key consumer saw on each node's key topic (key ID -> SHA-256 of the
    key) and which alarm codes an operator saw."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[str, str]] = {"alice": {}, "bob": {}}
        self.malformed = 0
        self.alarms: dict[str, list[str]] = {"alice": [], "bob": []}

    def add(self, node: str, doc: Any) -> None:
        try:
            digest = hashlib.sha256(base64.b64decode(doc["key"], validate=True)).hexdigest()
            self.seen.setdefault(node, {})[str(doc["key_ID"])] = digest
        except (KeyError, TypeError, ValueError):
            self.malformed += 1

    def compare(self) -> dict[str, Any]:
        a, b = self.seen.get("alice", {}), self.seen.get("bob", {})
        common = set(a) & set(b)
        mismatched = sum(1 for k in common if a[k] != b[k])
        return {
            "keys_seen_alice": len(a),
            "keys_seen_bob": len(b),
            "keys_compared": len(common),
            "keys_mismatched": mismatched,
            "malformed_key_messages": self.malformed,
            # Every key both delivered is the same key: the promise of the link.
            "keys_identical_by_id": bool(common) and mismatched == 0,
            "alarms": {node: sorted(set(codes)) for node, codes in self.alarms.items()},
        }


async def _live_view(
    host: str, port: int, quiet: bool, last: dict[str, dict[str, Any]], ledger: KeyLedger
) -> None:
    """Print one line per node per telemetry message, and every alarm, forever."""
    topics = ("qkd/v1/+/telemetry", "qkd/v1/+/alarms", "qkd/v1/+/keys/+")
    async with Subscriber((host, port), *topics) as sub:
        async for message in sub:
            data = message.payload
            if not isinstance(data, dict):
                continue  # not one of ours
            node = message.topic.split("/")[2]
            if "/keys/" in message.topic:
                ledger.add(node, data)
                continue
            if message.topic.endswith("alarms"):
                ledger.alarms.setdefault(node, []).append(str(data.get("code")))
                if not quiet:
                    print(
                        f"  ALARM {node}: {data.get('severity')} {data.get('code')}: "
                        f"{data.get('message')}",
                        flush=True,
                    )
                continue
            last[node] = data
            if not quiet:
                print(_view_line(node, data), flush=True)


async def _watch(  # noqa: PLR0917 - internal, one caller
    host: str,
    port: int,
    seconds: float | None,
    quiet: bool,
    procs: dict[str, subprocess.Popen[bytes]],
    last: dict[str, dict[str, Any]],
    ledger: KeyLedger,
) -> None:
    """Run the live view until time is up or a node process has exited."""

    async def exited() -> None:
        # Child processes signal no event we could await; poll them.
        while all(p.poll() is None for p in procs.values()):  # noqa: ASYNC110
            await asyncio.sleep(0.2)

    async def view() -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            await _live_view(host, port, quiet, last, ledger)
        await asyncio.Event().wait()  # without a broker, wait for the clock

    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            tasks = [
                asyncio.create_task(view(), name="demo-view"),
                asyncio.create_task(exited(), name="demo-exit"),
            ]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)


def _view_line(node: str, d: dict[str, Any]) -> str:
    q = d.get("qber")
    off = d.get("offset_ps")
    if off is not None:
        lock = f"lock {off / 1e3:+.3f} ns {d.get('drift_ppm') or 0:+.2f} ppm"
    else:  # Bob knows only whether Alice has locked; she holds the clock model
        lock = "locked" if d.get("locked") else "locking"
    return (
        f"{node:>5} {d.get('state', '?'):9} tags {d.get('tags_per_s', 0):9.0f}/s  "
        f"coinc {d.get('coincidences_per_s', 0):8.0f}/s  "
        f"sifted {d.get('sifted_bits_per_s', 0):8.0f}"
        f" b/s  QBER {'  n/a ' if q is None else f'{100 * q:5.2f}%'}  {lock}  "
        f"blocks {d.get('blocks_accepted', 0)}/{d.get('blocks_rejected', 0)} "
        f"secret {d.get('secret_bits', 0)} b  dropped {d.get('dropped_batches', 0)}"
    )


def run_demo(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="qnoded-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if args.broker:
            broker = args.broker
        else:
            b = MosquittoBroker()
            b.start()
            stack.callback(b.stop)
            broker = f"{b.host}:{b.port}"
        host, _, port = broker.rpartition(":")
        sim = link_parameters(args)
        peer_port = free_port()
        procs: dict[str, subprocess.Popen[bytes]] = {}
        for role in ("alice", "bob"):
            cfg = workdir / f"{role}.toml"
            cfg.write_text(
                node_config(role, args, broker, peer_port, workdir, sim), encoding="utf-8"
            )
            procs[role] = spawn_node(cfg, workdir / f"{role}.log")
        if not args.quiet:
            print(
                f"qnoded demo: {args.protocol}, {args.distance_km} km, eve {args.eve}, "
                f"broker {broker}, files in {workdir}",
                flush=True,
            )
        last: dict[str, dict[str, Any]] = {}
        ledger = KeyLedger()
        started = time.monotonic()
        try:
            asyncio.run(_watch(host, int(port), args.seconds, args.quiet, procs, last, ledger))
        except KeyboardInterrupt:
            pass
        finally:
            # Bob first: he says goodbye to Alice, who then stops cleanly too.
            for role in ("bob", "alice"):
                stop_node(procs[role])
        elapsed = time.monotonic() - started
        summary = build_summary(args, sim, workdir, procs, elapsed, ledger)
        print(json.dumps(summary), flush=True)
        ok = all(p.returncode == 0 for p in procs.values())
        return 0 if ok else 1
    return 1


def build_summary(  # noqa: PLR0917 - one caller
    args: argparse.Namespace,
    sim: dict[str, Any],
    workdir: Path,
    procs: dict[str, subprocess.Popen[bytes]],
    elapsed: float,
    ledger: KeyLedger,
) -> dict[str, Any]:
    nodes: dict[str, Any] = {}
    for role in ("alice", "bob"):
        path = workdir / role / "summary.json"
        nodes[role] = json.loads(path.read_text()) if path.exists() else {"error": "no summary"}
        nodes[role]["exit_code"] = procs[role].returncode
    cmp = ledger.compare()
    for role in ("alice", "bob"):
        nodes[role]["keys_identical_by_id"] = cmp["keys_identical_by_id"]
    from qnoded_drivers.sim.detector import SimSNSPD, SimSPAD

    det = (SimSPAD if args.protocol == "bb84" else SimSNSPD).defaults
    link = {
        k: sim[k]
        for k in (
            "distance_km",
            "attenuation_db_per_km",
            "misalignment",
            "eve_fraction",
            "bob_clock_offset_ps",
            "bob_clock_drift_ppm",
        )
    }
    for k in ("pulse_rate_hz", "mu_signal", "mu_decoy", "p_signal", "p_decoy", "pair_rate_hz"):
        if k in sim:
            link[k] = sim[k]
    link["detector_efficiency"] = det["efficiency"]
    link["dark_count_rate_hz"] = det["dark_count_rate_hz"]
    link["dead_time_ps"] = det["dead_time_ps"]
    link["timing_jitter_ps"] = det["jitter_ps"]
    window_ps = WINDOW_PS[args.protocol]
    # Dark count probability per detection window, for the whole receiver
    # (four detectors); a gated SPAD's dark clicks fall in its gates.
    per_window = (
        det["dark_count_rate_hz"] / sim["pulse_rate_hz"]
        if args.protocol == "bb84"
        else det["dark_count_rate_hz"] * window_ps * 1e-12
    )
    link["dark_count_probability"] = 1 - (1 - per_window) ** 4
    return {
        "protocol": args.protocol,
        "seconds": round(elapsed, 2),
        "link": link,
        "key_comparison": cmp,
        "nodes": nodes,
    }
