"""Soak: a key-making pair at its highest sustained tag rate, many consumers at once.

    python bench/soak.py --minutes 20 [--consumers 20] [--etsi014-clients 0]
                         [--protocol bbm92] [--distance-km 50] [--pair-rate-hz 2e6]
                         [--block-bits 300000] [--key-bits 256] [--warmup-s 120]
                         [--warmup-blocks 5] [--every-s 60] [--workdir DIR]

Alice and Bob run as two ``qnoded run`` processes on the demo's simulated link at
full speed (``--fast``: the simulator runs as fast as the pipeline takes its
batches) over a private Mosquitto.  ``--consumers`` MQTT clients subscribe to
both nodes' telemetry, status and alarms for the whole run; keys go either to
one MQTT key consumer (per node, key ID -> SHA-256 of the key) or, with
``--etsi014-clients K``, over ETSI GS QKD 014 with mutual TLS to K master SAE
clients at Alice and K slave SAE clients at Bob, polling at once (the nodes then
run with ``publish_keys = false``: a key leaves a node one way only).

Every telemetry message of both nodes is kept (RSS, open files, asyncio tasks,
tags, dropped batches, blocks, keys), and a table row is printed every
``--every-s``.  At the end: RSS drift per node (first sample after the warm-up
against the last, and the least-squares slope), the spread (max - min) of open
files and tasks after the warm-up, dropped batches, and the end check: both
nodes stop on SIGTERM by themselves with exit code 0, every key ID both nodes
delivered is the same key, and what each delivered, destroyed or still holds
adds up at both ends (tests/key_accounting.py, shared with
tests/test_kill_blocks.py).  Exit code 0 only when the end check holds.

Why this link.  The replay tagger (bench/bench_daemon.py) pushes the most tags/s
through the daemon, but a recording ends (an .npz is loaded whole) and after it
the nodes see the dark: no key.  So the soak runs the simulated link at full
speed, which makes key for as long as it runs.  Mean tags/s through Alice's
kernel (under BBM92 it takes both nodes' tags), 1.5-2 minute runs on a busy
2-core machine: BB84 at 25 km 0.16 M/s; BBM92 at the demo's 2e5 pairs/s
0.19 M/s; at 2e6 pairs/s 0.45 M/s at 5 km and 0.8-1.0 M/s at 50 km (fewer of
Bob's tags to simulate and match); 5e6 pairs/s adds little (0.9 M/s) for twice
Alice's memory (540 MB).  At 5-25 km the pair also makes ~190 keys/s, more than
Alice's MQTT key delivery gets through on a saturated event loop, and her
telemetry stops; at 50 km it makes ~50 keys/s, a 3e5-bit block every 15-20 s.
``tests/test_soak.py`` runs the same soak for about a minute and asserts on it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from key_accounting import NODES, Accounting, account, destroyed

from qnoded.broker import MosquittoBroker, free_port
from qnoded.demo import add_arguments, link_parameters, node_config, spawn_node, stop_node
from qnoded.mqtt import MqttSettings, Subscriber

MB = 1e6
MASTER, SLAVE = "sae-master", "sae-slave"
KEYS_PER_REQUEST = 8  # each master SAE's enc_keys asks for this many
STOP_TIMEOUT_S = 15.0  # SIGTERM, then SIGKILL: a node still running after this did not stop
QUIET_TIMEOUT_S = 60.0  # to wait for a moment both nodes have delivered the same keys
MAX_SETTLE_S = 900.0  # after the pause, for a delivery backlog to drain
FLUSH_S = 1.0  # after the nodes stopped, for their last messages to arrive
COMMAND_TIMEOUT_S = 15.0  # the pause command's answer


@dataclass(frozen=True)
class SoakSettings:
    minutes: float
    consumers: int = 20
    etsi014_clients: int = 0  # 0: keys over MQTT to one key consumer
    protocol: str = "bbm92"
    distance_km: float = 50.0
    pair_rate_hz: float = 2e6  # BBM92 source; BB84 uses the demo's pulse rate
    block_bits: int = 300_000
    key_bits: int = 256  # [postprocessing] key_size_bits: one MQTT message or 014 key each
    warmup_s: float = 120.0  # and at least until both nodes accepted warmup_blocks blocks
    warmup_blocks: int = 5
    every_s: float = 60.0  # a table row this often
    # Run on past ``minutes`` (up to ``max_minutes``) until the window after the warm-up
    # is this long: a busy machine makes the blocks, and so the warm-up, come later.
    min_window_s: float = 0.0
    max_minutes: float | None = None
    # End with the operator's `pause` at Alice and wait for the nodes to settle before
    # SIGTERM; False: SIGTERM while key is being made and delivered.
    pause_first: bool = True
    # After the pause, how long nothing may change before the nodes are stopped: longer
    # than the post-processing of the block in flight (3e5 bits: a few s, machine busy).
    settle_s: float = 8.0
    seed: int = 3


@dataclass(frozen=True)
class Sample:
    """One telemetry message, the fields a leak or a stall shows in."""

    t: float  # seconds since the nodes were started, when it arrived
    lag_s: float  # from the node's clock stamp to its arrival here
    rss_bytes: int
    open_fds: int
    asyncio_tasks: int
    tags_processed: int
    tags_per_s: float
    dropped_batches: int
    blocks_accepted: int
    blocks_rejected: int
    keys_delivered: int  # over MQTT and ETSI 014
    stored_keys: int
    dropped_telemetry: int  # telemetry the node's publisher dropped (queue full)
    state: str

    @classmethod
    def of(cls, t: float, doc: dict[str, Any]) -> Sample:
        return cls(
            t=t,
            lag_s=time.time() - float(doc["time"]),
            rss_bytes=int(doc["rss_bytes"]),
            open_fds=int(doc["open_fds"]),
            asyncio_tasks=int(doc["asyncio_tasks"]),
            tags_processed=int(doc["tags_processed"]),
            tags_per_s=float(doc.get("tags_per_s") or 0.0),
            dropped_batches=int(doc["dropped_batches"]),
            blocks_accepted=int(doc["blocks_accepted"]),
            blocks_rejected=int(doc["blocks_rejected"]),
            keys_delivered=int(doc["keys_delivered"]) + int(doc.get("etsi014_keys_delivered", 0)),
            stored_keys=int(doc["stored_keys"]),
            dropped_telemetry=int(doc["mqtt_dropped_telemetry"]),
            state=str(doc["state"]),
        )


# -- the pair ----------------------------------------------------------------------------
def demo_args(settings: SoakSettings) -> argparse.Namespace:
    """The demo's own defaults (a new demo option needs no change here), then ours."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return argparse.Namespace(
        **vars(parser.parse_args([]))
        | {
            "protocol": settings.protocol,
            "distance_km": settings.distance_km,
            "block_bits": settings.block_bits,
            "seed": settings.seed,
            "clock_offset_ps": 250_000_000,
            "drift_ppm": 2.0,
            "fast": True,
        }
    )


class Pair:
    """Alice's and Bob's configs, processes and logs in one folder (the demo's layout,
    which tests/key_accounting.py reads)."""

    def __init__(self, workdir: Path, broker: tuple[str, int], settings: SoakSettings) -> None:
        self.workdir = workdir
        self.peer_port = free_port()
        args = demo_args(settings)
        sim = link_parameters(args)
        if settings.protocol == "bbm92":
            sim["pair_rate_hz"] = settings.pair_rate_hz
        for role in NODES:
            text = node_config(role, args, f"{broker[0]}:{broker[1]}", self.peer_port, workdir, sim)
            table = "[postprocessing]\n"
            assert text.count(table) == 1
            text = text.replace(table, f"{table}key_size_bits = {settings.key_bits}\n")
            (workdir / f"{role}.toml").write_text(text, encoding="utf-8")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def add_etsi014(self, role: str, section: dict[str, str]) -> None:
        """Keys over ETSI 014 instead of MQTT (a node refuses both at once)."""
        path = self.workdir / f"{role}.toml"
        text = path.read_text(encoding="utf-8")
        text = text.replace("[mqtt]\n", "[mqtt]\npublish_keys = false\n", 1)
        text += "[etsi014]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in section.items())
        path.write_text(text, encoding="utf-8")

    def start(self) -> None:
        for role in NODES:
            self.procs[role] = spawn_node(
                self.workdir / f"{role}.toml", self.workdir / f"{role}.log", dict(os.environ)
            )

    def exited(self) -> list[str]:
        return [r for r, p in self.procs.items() if p.poll() is not None]

    def log_tail(self, chars: int = 2000) -> str:
        return "".join(
            f"\n--- {r}.log ---\n" + (self.workdir / f"{r}.log").read_text()[-chars:] for r in NODES
        )

    async def stop(self) -> dict[str, tuple[int | None, float]]:
        """SIGTERM, Bob first (he says goodbye to Alice, who then stops too); in threads,
        so the consumers keep reading while the nodes stop.  Role -> (exit code, s)."""
        out = {}
        for role in ("bob", "alice"):
            seconds = await asyncio.to_thread(stop_node, self.procs[role], STOP_TIMEOUT_S)
            out[role] = (self.procs[role].returncode, seconds)
        return out

    def kill_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


# -- what the consumers see ----------------------------------------------------------------
@dataclass
class Ledger:
    """Per node: each key ID delivered (how often, SHA-256 of the key), and the keys as
    delivered (Base64), to look for in the logs at the end."""

    delivered: dict[str, Counter[str]] = field(
        default_factory=lambda: {n: Counter[str]() for n in NODES}
    )
    digests: dict[str, dict[str, str]] = field(default_factory=lambda: {n: {} for n in NODES})
    material: set[str] = field(default_factory=set)

    def add(self, node: str, key_id: str, key_b64: str) -> None:
        self.delivered[node][key_id] += 1
        self.digests[node][key_id] = hashlib.sha256(base64.b64decode(key_b64)).hexdigest()
        self.material.add(key_b64)

    def compare(self) -> tuple[int, int, int]:
        """Key IDs delivered by both nodes, those with different keys, those delivered by
        one node only."""
        a, b = self.digests["alice"], self.digests["bob"]
        common = set(a) & set(b)
        return len(common), sum(a[k] != b[k] for k in common), len(set(a) ^ set(b))


@dataclass
class Observed:
    samples: dict[str, list[Sample]] = field(default_factory=lambda: {n: [] for n in NODES})
    ledger: Ledger = field(default_factory=Ledger)
    consumer_messages: list[Counter[str]] = field(default_factory=list)  # per consumer, per leaf
    sae_replies: Counter[str] = field(default_factory=Counter)  # "enc_keys 200", ...
    rows: list[str] = field(default_factory=list)
    last_row: dict[str, Sample] = field(default_factory=dict)
    end_notes: list[str] = field(default_factory=list)  # what went wrong winding down
    # Per table row: CPU seconds used so far by Alice, Bob and this harness (with its
    # consumers), to tell a node that does more work per tag from one that gets less CPU.
    cpu: list[dict[str, float]] = field(default_factory=list)
    t0: float = 0.0  # time.monotonic() when the nodes were started
    stopping_at: float = 0.0  # seconds after t0 when the end (drain, stop) began
    settled_s: float | None = None  # from the pause until both nodes had settled


async def _read(sub: Subscriber, on_message: Callable[[str, str, Any], None]) -> None:
    async for msg in sub:
        parts = msg.topic.split("/")  # qkd/v1/<node>/<leaf>[/<peer>]
        if len(parts) >= 4 and isinstance(msg.payload, dict):
            on_message(parts[2], parts[3], msg.payload)


# -- ETSI 014 SAEs ------------------------------------------------------------------------
@dataclass
class Saes:
    """The 014 side: each node's endpoint, the SAEs' TLS contexts, the IDs the masters got
    and the slaves have not fetched yet."""

    ports: dict[str, int]
    master_ctx: ssl.SSLContext
    slave_ctx: ssl.SSLContext
    to_fetch: asyncio.Queue[list[str]] = field(default_factory=asyncio.Queue)
    masters_stop: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def configure(cls, pair: Pair, workdir: Path) -> Saes:
        from pki import make_pki  # tests/pki.py: a throw-away CA (needs `cryptography`)

        pki = make_pki(workdir / "pki", [MASTER, SLAVE])
        ports = {n: free_port() for n in NODES}
        for role, local, remote in (("alice", MASTER, SLAVE), ("bob", SLAVE, MASTER)):
            pair.add_etsi014(
                role,
                {
                    "listen": f"127.0.0.1:{ports[role]}",
                    "cert_file": str(pki.server.cert),
                    "key_file": str(pki.server.key),
                    "ca_file": str(pki.ca_cert),
                    "local_sae": local,
                    "remote_sae": remote,
                },
            )

        def context(sae: str) -> ssl.SSLContext:
            ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
            ctx.load_cert_chain(pki.client(sae).cert, pki.client(sae).key)
            return ctx

        return cls(ports, context(MASTER), context(SLAVE))

    def url(self, node: str, path: str) -> str:
        return f"https://127.0.0.1:{self.ports[node]}/api/v1/keys/{path}"


async def _sae_call(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], what: str, obs: Observed
) -> tuple[int, Any, float]:
    """POST; (status, JSON body, seconds to wait before asking again)."""
    try:
        async with session.post(url, json=body) as r:
            doc = await r.json(content_type=None)
            obs.sae_replies[f"{what} {r.status}"] += 1
            return r.status, doc, min(1.0, float(r.headers.get("Retry-After") or 0.5))
    except (aiohttp.ClientError, TimeoutError) as exc:  # not listening yet, or a busy node
        obs.sae_replies[f"{what} {type(exc).__name__}"] += 1
        return 0, None, 0.5


async def _master(saes: Saes, obs: Observed) -> None:
    """A master SAE at Alice: enc_keys until told to stop; the IDs go to the slaves."""
    connector = aiohttp.TCPConnector(ssl=saes.master_ctx)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=10)
    ) as s:
        while not saes.masters_stop.is_set():
            url = saes.url("alice", f"{SLAVE}/enc_keys")
            status, doc, wait = await _sae_call(
                s, url, {"number": KEYS_PER_REQUEST}, "enc_keys", obs
            )
            if status == 200:
                for k in doc["keys"]:
                    obs.ledger.add("alice", k["key_ID"], k["key"])
                saes.to_fetch.put_nowait([k["key_ID"] for k in doc["keys"]])
            else:  # 503: not that many keys yet
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(saes.masters_stop.wait(), wait)


async def _slave(saes: Saes, obs: Observed) -> None:
    """A slave SAE at Bob: dec_keys for the IDs its master got; retries a 503 (Bob has
    not committed the block yet)."""
    connector = aiohttp.TCPConnector(ssl=saes.slave_ctx)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=10)
    ) as s:
        while True:
            ids = await saes.to_fetch.get()
            try:
                body = {"key_IDs": [{"key_ID": i} for i in ids]}
                while True:
                    url = saes.url("bob", f"{MASTER}/dec_keys")
                    status, doc, wait = await _sae_call(s, url, body, "dec_keys", obs)
                    if status == 200:
                        for k in doc["keys"]:
                            obs.ledger.add("bob", k["key_ID"], k["key"])
                        break
                    if status not in {0, 503}:
                        break  # counted in sae_replies; the end check finds the keys missing
                    await asyncio.sleep(wait)
            finally:
                saes.to_fetch.task_done()


# -- the run ------------------------------------------------------------------------------
async def soak(
    settings: SoakSettings,
    workdir: Path,
    broker: tuple[str, int],
    emit: Callable[[str], None] = print,
) -> SoakResult:
    """Run the pair for ``settings.minutes``, with every consumer at once; stop it and
    check the end.  ``emit`` gets each table row as it is made; every sample is also
    written to ``workdir/samples.json``."""
    pair = Pair(workdir, broker, settings)
    saes = Saes.configure(pair, workdir) if settings.etsi014_clients else None
    obs = Observed()
    stops: dict[str, tuple[int | None, float]] = {}
    quiet = False
    async with contextlib.AsyncExitStack() as stack:
        # Everyone subscribed before the nodes start: nothing they publish is missed.
        tasks = await _consumers(stack, broker, settings, obs, saes)
        pair.start()
        obs.t0 = time.monotonic()
        try:
            await _run(pair, settings, obs, emit)
            obs.stopping_at = time.monotonic() - obs.t0
            if settings.pause_first:
                await _pause(broker, obs, settings.settle_s, keys_over_mqtt=saes is None)
            if saes is not None:
                quiet = await _drain(saes)
            else:
                quiet = await _quiet_moment(obs.ledger, workdir)
        finally:
            obs.stopping_at = obs.stopping_at or time.monotonic() - obs.t0
            stops = await pair.stop()
            pair.kill_all()
            await asyncio.sleep(FLUSH_S)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    if obs.samples["alice"] and obs.samples["bob"]:  # the row the nodes stopped on
        obs.rows.append(table_row({n: obs.samples[n][-1] for n in NODES}, obs.last_row))
        emit(obs.rows[-1])
    (workdir / "samples.json").write_text(
        json.dumps({n: [dataclasses.asdict(x) for x in obs.samples[n]] for n in NODES})
    )
    ledger = obs.ledger
    return SoakResult(
        settings,
        obs,
        stops,
        quiet,
        account(workdir, ledger.delivered, ledger.digests, ledger.material),
    )


async def _consumers(
    stack: contextlib.AsyncExitStack,
    broker: tuple[str, int],
    settings: SoakSettings,
    obs: Observed,
    saes: Saes | None,
) -> list[asyncio.Task[None]]:
    """Subscribe the sampler (telemetry; keys, unless they go over 014) and the extra
    consumers; start the SAE clients.  Returns their tasks."""

    def sample(node: str, leaf: str, doc: Any) -> None:
        if node not in obs.samples:
            return
        if leaf == "telemetry":
            obs.samples[node].append(Sample.of(time.monotonic() - obs.t0, doc))
        elif leaf == "keys":
            obs.ledger.add(node, doc["key_ID"], doc["key"])

    def counter(c: Counter[str]) -> Callable[[str, str, Any], None]:
        def count(node: str, leaf: str, doc: Any) -> None:
            c[leaf] += 1

        return count

    topics = ["qkd/v1/+/telemetry"] + ([] if saes else ["qkd/v1/+/keys/+"])
    main = await stack.enter_async_context(Subscriber(broker, *topics))
    tasks = [asyncio.create_task(_read(main, sample), name="soak-sampler")]
    leaves = ("telemetry", "status", "alarms")
    for i in range(settings.consumers):
        sub = await stack.enter_async_context(
            Subscriber(broker, *(f"qkd/v1/+/{leaf}" for leaf in leaves))
        )
        obs.consumer_messages.append(Counter())
        reader = _read(sub, counter(obs.consumer_messages[-1]))
        tasks.append(asyncio.create_task(reader, name=f"soak-consumer-{i}"))
    for i in range(settings.etsi014_clients if saes else 0):
        assert saes is not None
        tasks.append(asyncio.create_task(_master(saes, obs), name=f"soak-master-{i}"))
        tasks.append(asyncio.create_task(_slave(saes, obs), name=f"soak-slave-{i}"))
    return tasks


def warm_at(settings: SoakSettings, samples: dict[str, list[Sample]]) -> float:
    """End of the warm-up: ``warmup_s``, and both nodes ``warmup_blocks`` blocks in (the
    first blocks take the allocator to its working size); inf while not there."""
    want = settings.warmup_blocks
    firsts = [
        next((s.t for s in samples[n] if s.blocks_accepted >= want), float("inf")) for n in NODES
    ]
    return max(settings.warmup_s, *firsts)


def _done(settings: SoakSettings, obs: Observed, elapsed: float) -> bool:
    """``minutes`` are up and the window after the warm-up is ``min_window_s`` long, or
    ``max_minutes`` are up."""
    if elapsed < settings.minutes * 60:
        return False
    if elapsed >= max(settings.minutes, settings.max_minutes or 0.0) * 60:
        return True
    return elapsed >= warm_at(settings, obs.samples) + settings.min_window_s


async def _run(
    pair: Pair, settings: SoakSettings, obs: Observed, emit: Callable[[str], None]
) -> None:
    """The soak proper: a table row every ``every_s``; a node that exits ends it."""
    emit(table_header())
    next_row = settings.every_s
    while not _done(settings, obs, elapsed := time.monotonic() - obs.t0):
        if pair.exited():
            raise RuntimeError(f"{pair.exited()} exited during the soak{pair.log_tail()}")
        if elapsed >= next_row and all(obs.samples.values()):
            now = {n: obs.samples[n][-1] for n in NODES}
            cpu = cpu_now(pair) | {"t": elapsed}
            before = obs.cpu[-1] if obs.cpu else {"t": 0.0}
            dt = elapsed - before["t"]
            obs.cpu.append(cpu)
            obs.rows.append(f"{table_row(now, obs.last_row)} | {cpu_cells(cpu, before, dt)}")
            emit(obs.rows[-1])
            obs.last_row, next_row = now, next_row + settings.every_s
        await asyncio.sleep(0.2)


async def _pause(
    broker: tuple[str, int], obs: Observed, settle_s: float, *, keys_over_mqtt: bool
) -> None:
    """The operator's orderly end: ``pause`` at Alice (the block in flight completes, no
    new one starts), then wait until both nodes have decided the same blocks, nothing
    changed for ``settle_s`` and (keys over MQTT) every key has left both stores.  What
    goes wrong is noted in ``obs.end_notes`` for the end check."""
    rid = uuid.uuid4().hex
    request = json.dumps({"id": rid, "args": {"reason": "soak: end of run"}}).encode()
    answer: Any = None
    try:
        async with (
            asyncio.timeout(COMMAND_TIMEOUT_S),
            Subscriber(broker, "qkd/v1/alice/cmd/pause/result") as sub,
            MqttSettings(*broker).client() as client,
        ):
            await client.publish("qkd/v1/alice/cmd/pause", request, qos=1)
            async for msg in sub:
                if isinstance(msg.payload, dict) and msg.payload.get("id") == rid:
                    answer = msg.payload
                    break
    except (TimeoutError, aiomqtt.MqttError) as exc:
        obs.end_notes.append(f"pause at alice not answered: {exc!r}")
        return
    if not answer.get("ok"):
        obs.end_notes.append(f"pause at alice refused: {answer.get('error')}")
        return
    paused_at = time.monotonic() - obs.t0

    def backlog() -> int:
        """Keys waiting in both stores, as last reported."""
        return sum(obs.samples[n][-1].stored_keys for n in NODES if obs.samples[n])

    def figures() -> tuple[Any, ...] | None:
        if not all(obs.samples.values()):
            return None
        last = [obs.samples[n][-1] for n in NODES]
        if min(x.t - x.lag_s for x in last) < paused_at:
            return None  # nothing from both yet that was made after the pause
        a, b = last
        if (a.blocks_accepted, a.blocks_rejected) != (b.blocks_accepted, b.blocks_rejected):
            return None
        if keys_over_mqtt and a.stored_keys + b.stored_keys:
            return None
        return a.blocks_accepted, a.blocks_rejected

    # Keys still waiting at the pause (a delivery backlog) leave while we wait: give up
    # only when nothing has moved for QUIET_TIMEOUT_S, or after MAX_SETTLE_S in all.
    start = time.monotonic()
    since, seen = start, figures()
    moved, waiting = start, backlog()
    while seen is None or time.monotonic() - since < settle_s:
        now_t = time.monotonic()
        if now_t - moved > QUIET_TIMEOUT_S or now_t - start > MAX_SETTLE_S:
            obs.end_notes.append(
                f"the nodes did not settle after the pause: {waiting} keys still waiting, "
                f"nothing moved for {now_t - moved:.0f} s ({now_t - start:.0f} s in all)"
            )
            return
        await asyncio.sleep(0.5)
        now = figures()
        if now != seen or now is None:
            since, seen = time.monotonic(), now
        if (left := backlog()) != waiting:
            moved, waiting = time.monotonic(), left
    obs.settled_s = time.monotonic() - start


async def _quiet_moment(ledger: Ledger, workdir: Path) -> bool:
    """Wait for a moment between blocks when both nodes have accounted for the same keys
    (each delivered or, at most once, destroyed undelivered); False if none came."""

    def accounted(node: str) -> set[str]:
        return set(ledger.digests[node]) | destroyed(workdir / f"{node}.log")

    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(QUIET_TIMEOUT_S):
            while accounted("alice") != accounted("bob"):  # noqa: ASYNC110 - readers update it
                await asyncio.sleep(0.2)
            return True
    return False


async def _drain(saes: Saes) -> bool:
    """Masters stop; the slaves fetch what their masters got.  False if they could not."""
    saes.masters_stop.set()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(QUIET_TIMEOUT_S):
            await saes.to_fetch.join()
            return True
    return False


# -- the figures --------------------------------------------------------------------------
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
HARNESS = "harness"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process (Linux /proc: fields 14 and 15)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_now(pair: Pair) -> dict[str, float]:
    mine = os.times()
    out = {HARNESS: mine.user + mine.system}
    for role, proc in pair.procs.items():
        with contextlib.suppress(OSError, IndexError, ValueError):
            out[role] = cpu_seconds(proc.pid)
    return out


def cpu_cells(now: dict[str, float], before: dict[str, float], dt: float) -> str:
    """Each process's share of one core over the row's interval, in %."""
    return " ".join(
        f"{100 * (now.get(k, 0.0) - before.get(k, 0.0)) / dt:4.0f}" if dt > 0 else "   -"
        for k in (*NODES, HARNESS)
    )


COLUMNS = "RSS MB  fds tasks    tags/s drop blk ok/rej    keys"


def table_header() -> str:
    return f"{'elapsed':>8} | {'alice: ' + COLUMNS:58} | bob: {COLUMNS} | cpu% A    B    H"


def table_row(now: dict[str, Sample], before: dict[str, Sample]) -> str:
    """One row; tags/s is each node's tags_processed over the row's interval (Alice's
    count holds both nodes' tags under BBM92: her kernel takes Bob's stream too)."""
    cells = []
    for n in NODES:
        s, b = now[n], before.get(n)
        dt = s.t - b.t if b is not None else s.t
        rate = (s.tags_processed - (b.tags_processed if b else 0)) / dt if dt > 0 else 0.0
        cells.append(
            f"{s.rss_bytes / MB:6.1f} {s.open_fds:4d} {s.asyncio_tasks:5d} {rate:9,.0f} "
            f"{s.dropped_batches:4d} {s.blocks_accepted:6d}/{s.blocks_rejected:<3d} "
            f"{s.keys_delivered:7d}"
        )
    return f"{now['alice'].t / 60:6.1f} m | {'alice: ' + cells[0]:58} | bob: {cells[1]}"


@dataclass(frozen=True)
class Health:
    """One node after its warm-up."""

    warm_at_s: float
    rss_first_mb: float
    rss_last_mb: float
    rss_max_mb: float
    rss_slope_mb_per_h: float  # least squares over the samples after the warm-up
    fds_spread: int  # max - min
    tasks_spread: int
    fds_range: tuple[int, int]
    tasks_range: tuple[int, int]
    # The floor (min) of the window's second half less that of its first: transients
    # (a key batch in flight) lift the max, growth lifts the floor.
    fds_floor_moved: int
    tasks_floor_moved: int
    samples: int
    window_s: float  # from the end of the warm-up to the stop
    # Over the whole run, warm-up included: is the node heard, and does delivery keep up?
    max_gap_s: float  # longest wait for the node's next telemetry message
    max_lag_s: float  # longest from the node's stamp to arrival
    stored_keys_max: int  # keys waiting for delivery: grows if delivery falls behind
    dropped_telemetry: int

    @property
    def rss_drift_mb(self) -> float:
        return self.rss_last_mb - self.rss_first_mb

    @property
    def rss_drift_pct(self) -> float:
        return 100 * self.rss_drift_mb / self.rss_first_mb


def _floor_moved(values: list[int]) -> int:
    half = len(values) // 2
    return min(values[half:]) - min(values[:half]) if half else 0


def _slope(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


@dataclass
class SoakResult:
    settings: SoakSettings
    observed: Observed
    stops: dict[str, tuple[int | None, float]]
    quiet: bool  # the final quiet moment (MQTT) or drain (014) came
    accounting: Accounting
    problems: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.problems = self._end_check()

    @property
    def samples(self) -> dict[str, list[Sample]]:
        return self.observed.samples

    def warm_at(self) -> float:
        return warm_at(self.settings, self.samples)

    def health(self, node: str) -> Health | None:
        warm, end = self.warm_at(), self.observed.stopping_at
        run = [s for s in self.samples[node] if s.t <= end]
        after = [s for s in run if s.t >= warm]
        if not after:
            return None
        rss = [s.rss_bytes / MB for s in after]
        fds = [s.open_fds for s in after]
        tasks = [s.asyncio_tasks for s in after]
        times = [s.t for s in run] + [end]
        return Health(
            warm_at_s=warm,
            rss_first_mb=rss[0],
            rss_last_mb=rss[-1],
            rss_max_mb=max(rss),
            rss_slope_mb_per_h=3600 * _slope([s.t for s in after], rss),
            fds_spread=max(fds) - min(fds),
            tasks_spread=max(tasks) - min(tasks),
            fds_range=(min(fds), max(fds)),
            tasks_range=(min(tasks), max(tasks)),
            fds_floor_moved=_floor_moved(fds),
            tasks_floor_moved=_floor_moved(tasks),
            samples=len(after),
            window_s=end - warm,
            max_gap_s=max(b - a for a, b in itertools.pairwise(times)),
            max_lag_s=max(s.lag_s for s in run),
            stored_keys_max=max(s.stored_keys for s in run),
            dropped_telemetry=run[-1].dropped_telemetry,
        )

    def backlog_at_stop(self) -> int:
        """Keys waiting in both stores at the last sample before the pause."""
        end = self.observed.stopping_at
        return sum(
            next((x.stored_keys for x in reversed(self.samples[n]) if x.t <= end), 0) for n in NODES
        )

    def last(self, node: str) -> Sample | None:
        return self.samples[node][-1] if self.samples[node] else None

    def dropped(self) -> int:
        return sum(s.dropped_batches for n in NODES if (s := self.last(n)) is not None)

    def tags_per_s(self, node: str) -> float:
        """Mean rate of ``tags_processed`` over the run (first to last sample)."""
        ss = self.samples[node]
        if len(ss) < 2 or ss[-1].t <= ss[0].t:
            return 0.0
        return (ss[-1].tags_processed - ss[0].tags_processed) / (ss[-1].t - ss[0].t)

    def _end_check(self) -> list[str]:
        problems = list(self.accounting.problems) + self.observed.end_notes
        for n in NODES:
            code, seconds = self.stops.get(n, (None, 0.0))
            if code != 0 or seconds >= STOP_TIMEOUT_S:
                problems.append(f"{n} did not stop cleanly: exit code {code} after {seconds:.1f} s")
        _, mismatched, one_sided = self.observed.ledger.compare()
        if mismatched:
            problems.append(f"{mismatched} key IDs delivered with different keys")
        if one_sided and self.settings.pause_first:
            # Paused and settled before the stop: nothing was in flight at either end.
            problems.append(f"{one_sided} key IDs delivered by one node only")
        if not self.quiet:
            what = "the slaves' fetch" if self.settings.etsi014_clients else "a quiet moment"
            problems.append(f"{what} never came at the end")
        if self.dropped():
            problems.append(f"{self.dropped()} batches dropped")
        # 503 (no keys yet, or not committed yet) is the spec's "ask again"; a refused
        # connection is a node still starting.  Anything else is a fault.
        expected = {"200", "503", "ClientConnectorError"}
        odd = {k: n for k, n in self.observed.sae_replies.items() if k.split()[1] not in expected}
        if odd:
            problems.append(f"unexpected ETSI 014 replies: {odd}")
        return problems

    def summary(self) -> str:
        lines = [
            f"warm-up until {self.warm_at():.0f} s (at least {self.settings.warmup_s:.0f} s and "
            f"{self.settings.warmup_blocks} blocks accepted at both nodes)"
        ]
        for n in NODES:
            h, s = self.health(n), self.last(n)
            if h is None or s is None:
                lines.append(f"{n}: no sample after the warm-up")
                continue
            lines.append(
                f"{n}: RSS {h.rss_first_mb:.1f} -> {h.rss_last_mb:.1f} MB "
                f"({h.rss_drift_mb:+.1f} MB, {h.rss_drift_pct:+.1f} %; max {h.rss_max_mb:.1f}; "
                f"slope {h.rss_slope_mb_per_h:+.1f} MB/h; "
                f"{h.samples} samples in {h.window_s:.0f} s); "
                f"fds {h.fds_range[0]}..{h.fds_range[1]} (spread {h.fds_spread}, floor "
                f"{h.fds_floor_moved:+d}); tasks {h.tasks_range[0]}..{h.tasks_range[1]} "
                f"(spread {h.tasks_spread}, floor {h.tasks_floor_moved:+d}); "
                f"telemetry: longest gap {h.max_gap_s:.1f} s, lag {h.max_lag_s:.1f} s, "
                f"{h.dropped_telemetry} dropped by the node; keys waiting max {h.stored_keys_max}; "
                f"tags {self.tags_per_s(n):,.0f}/s; dropped {s.dropped_batches}; blocks "
                f"{s.blocks_accepted} accepted, {s.blocks_rejected} rejected; "
                f"keys delivered {s.keys_delivered}"
            )
        common, mismatched, one_sided = self.observed.ledger.compare()
        msgs = [sum(c.values()) for c in self.observed.consumer_messages]
        lines += [
            "after the pause: settled in "
            + (f"{o.settled_s:.1f} s" if (o := self.observed).settled_s is not None else "-")
            + f" (keys waiting at the pause: {self.backlog_at_stop()})",
            "stop (SIGTERM): "
            + ", ".join(f"{n} exit {c} in {t:.2f} s" for n, (c, t) in self.stops.items()),
            f"keys: {common} IDs delivered by both nodes, {mismatched} with different keys, "
            f"{one_sided} by one node only",
            f"stores: {self.accounting.figures()}",
            f"MQTT consumers: {len(msgs)}, messages each {min(msgs, default=0)}.."
            f"{max(msgs, default=0)}",
        ]
        if self.observed.sae_replies:
            lines.append(f"ETSI 014 replies: {dict(sorted(self.observed.sae_replies.items()))}")
        lines.append(
            "end check: OK"
            if not self.problems
            else "end check FAILED:\n  " + "\n  ".join(self.problems)
        )
        return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = SoakSettings(minutes=0)
    ap.add_argument("--minutes", type=float, required=True)
    ap.add_argument("--consumers", type=int, default=d.consumers, help="extra MQTT consumers")
    ap.add_argument(
        "--etsi014-clients",
        type=int,
        default=d.etsi014_clients,
        help="keys over ETSI 014 to this many master and slave SAE clients (0: over MQTT)",
    )
    ap.add_argument("--protocol", choices=["bb84", "bbm92"], default=d.protocol)
    ap.add_argument("--distance-km", type=float, default=d.distance_km)
    ap.add_argument("--pair-rate-hz", type=float, default=d.pair_rate_hz, help="BBM92 only")
    ap.add_argument("--block-bits", type=int, default=d.block_bits)
    ap.add_argument("--key-bits", type=int, default=d.key_bits, help="key_size_bits")
    ap.add_argument("--warmup-s", type=float, default=d.warmup_s)
    ap.add_argument("--warmup-blocks", type=int, default=d.warmup_blocks)
    ap.add_argument("--settle-s", type=float, default=d.settle_s)
    ap.add_argument("--every-s", type=float, default=d.every_s, help="a table row this often")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument(
        "--no-pause",
        dest="pause_first",
        action="store_false",
        help="SIGTERM the nodes while they make and deliver key, without pausing Alice first",
    )
    ap.add_argument("--workdir", default=None, help="keep configs, logs and stores here")
    a = ap.parse_args()
    settings = dataclasses.replace(
        d,
        **{f.name: getattr(a, f.name) for f in dataclasses.fields(d) if hasattr(a, f.name)},
    )
    workdir = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="qnoded-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"soak: {settings}\nfiles in {workdir}; load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores",
        flush=True,
    )
    with MosquittoBroker() as broker:
        result = asyncio.run(
            soak(settings, workdir, (broker.host, broker.port), lambda r: print(r, flush=True))
        )
    print(result.summary())
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0 if not result.problems else 1


if __name__ == "__main__":
    sys.exit(main())
