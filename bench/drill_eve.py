"""Eavesdropper drills: intercept-resend on a fraction of the pulses, block by block.

    python bench/drill_eve.py [--fractions 0,0.05,0.1,0.2,0.5,1] [--blocks 5]
                              [--block-bits 300000] [--deadline-s 240] [--seed 1]

For each fraction, Alice and Bob run as two ``qnoded run`` processes on
simulated BB84 hardware (the demo's link, ``--fast``) over a private
Mosquitto, with the simulated fibre's intercept-resend eavesdropper on that
fraction of the pulses, until ``--blocks`` blocks have been decided.  Then it
prints one row per fraction: the X-basis QBER of the nodes' sample, the
Z-basis QBER error correction found, blocks decided and blocks with key,
secret bits, the finite-key length of each block (min/max), the alarms both
nodes published, whether the keys both delivered agree ID by ID, and how many
times the drill's promise was broken (:func:`violations`; each one is printed).

Everything is read where an operator or a key consumer reads it: each block's
finite-key length from Alice's JSON log ("block accepted" and "block rejected"
carry ``key_length``), its other figures from her telemetry's ``last_block``
and her key store; outcomes from both nodes' logs; alarms, telemetry and keys
from MQTT; what was kept from both key stores.  ``tests/test_eve_drills.py``
runs the same drill, shorter, and asserts on it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import sqlite3
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qnoded.blocks import BlockOutcome
from qnoded.broker import MosquittoBroker, free_port
from qnoded.config import AuthSection, PostprocessingSection
from qnoded.demo import add_arguments, link_parameters, node_config, spawn_node, stop_node
from qnoded.keystore import key_ids
from qnoded.mqtt import Subscriber

FRACTIONS = (0.0, 0.05, 0.10, 0.20, 0.50, 1.00)
# The demo's nodes run with the defaults of these.
KEY_BYTES = PostprocessingSection().key_size_bits // 8
AUTH_RESERVE_BYTES = AuthSection().reserve_bytes
# Once the nodes have stopped, how long to wait for their last messages.
FLUSH_S = 10.0
# Names Alice's log lines share with BlockOutcome (and so with last_block and the stats).
_FIGURES = {f.name for f in dataclasses.fields(BlockOutcome)}


# -- what the drill saw ----------------------------------------------------------------
@dataclass
class BlockRecord:
    """One block started by Alice, as every observer saw it."""

    block_id: str
    # Alice's BlockOutcome figures (n, qber_x, qber_z, key_length, secret_bits,
    # keys, ...): her telemetry's last_block if one carried this block, her
    # store's stats, her log line.
    alice: dict[str, Any] = field(default_factory=dict)
    outcome: dict[str, str] = field(default_factory=dict)  # node -> "accepted" or the reason
    alarms: dict[str, list[str]] = field(default_factory=dict)  # node -> alarm codes
    keys: dict[str, dict[str, str]] = field(default_factory=dict)  # node -> key ID -> SHA-256
    stored: dict[str, str] = field(default_factory=dict)  # node -> block state in its store
    stored_keys: dict[str, int] = field(default_factory=dict)  # node -> n_keys in its store
    secret_bits: dict[str, int] = field(default_factory=dict)  # node -> per its store

    def __str__(self) -> str:
        """The block in one line, keys counted rather than listed."""
        a = self.alice
        keys = {node: len(ids) for node, ids in self.keys.items()}
        return (
            f"block {self.block_id}: length {self.key_length} ({self.stage}), n {a.get('n')}, "
            f"QBER X {a.get('qber_x')} Z {a.get('qber_z')}, outcome {self.outcome}, "
            f"alarms {self.alarms}, keys {keys}, stored {self.stored} {self.stored_keys}, "
            f"secret bits {self.secret_bits}, auth reserve {self.reserve_bytes} B"
        )

    @property
    def key_length(self) -> int | None:
        """Alice's finite-key length for the block, in bits, as she logged it."""
        return self.alice.get("key_length")

    @property
    def stage(self) -> str:
        """Where Alice decided: "precheck" (refused before error correction, the
        length at the Shannon limit) or "final" (after it)."""
        return "precheck" if "no secret key possible" in self.outcome.get("alice", "") else "final"

    @property
    def reserve_bytes(self) -> int:
        """The authentication reserve taken before keys: what an accepted block
        made beyond its keys; 0 for a refused one (see :func:`violations`)."""
        if self.outcome.get("alice") != "accepted":
            return 0
        a = self.alice
        return int(a.get("secret_bits", 0)) // 8 - int(a.get("keys", 0)) * KEY_BYTES

    @property
    def whole_keys(self) -> int:
        """Keys the length leaves after the authentication reserve (blocks.py: whole keys only)."""
        if self.key_length is None or self.key_length <= 0:
            return 0
        return max(0, (self.key_length // 8 - self.reserve_bytes) // KEY_BYTES)

    @property
    def decided(self) -> bool:
        """Alice accepted it or the finite-key bound refused it (not cut off by the stop)."""
        a = self.outcome.get("alice", "")
        return a == "accepted" or a.startswith("estimation")


@dataclass
class KeyMessage:
    topic: str
    node_id: str
    peer_id: str
    key_id: str
    block_id: str
    digest: str


@dataclass
class DrillResult:
    fraction: float
    seconds: float
    workdir: Path
    exit_codes: dict[str, int | None]
    blocks: dict[str, BlockRecord]
    telemetry: dict[str, dict[str, Any]]  # node -> last telemetry (the final one if seen)
    alarms: dict[str, list[dict[str, Any]]]  # node -> every alarm published
    key_messages: list[KeyMessage]
    unreadable_keys: list[str]  # topics of key messages that did not parse
    pool_min_bits: int | None  # the least authentication key Alice's telemetry reported
    condition_met: bool  # the blocks were decided before the deadline

    def decided(self) -> list[BlockRecord]:
        return [b for b in self.blocks.values() if b.decided]

    def with_key(self) -> list[BlockRecord]:
        return [b for b in self.blocks.values() if b.outcome.get("alice") == "accepted"]

    def alarm_codes(self, node: str) -> list[str]:
        return [str(a.get("code")) for a in self.alarms.get(node, [])]

    def keys_by_node(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {"alice": {}, "bob": {}}
        for k in self.key_messages:
            out.setdefault(k.node_id, {})[k.key_id] = k.digest
        return out

    def log_tail(self, chars: int = 3000) -> str:
        return "".join(
            f"\n--- {p.name}\n" + p.read_text(errors="replace")[-chars:]
            for p in sorted(self.workdir.glob("*.log"))
        )


# -- the promise ------------------------------------------------------------------------
KEY_TOPICS = {("alice", "bob"), ("bob", "alice")}


def _block_violations(b: BlockRecord) -> list[str]:
    """Key iff the length allows a whole key; else nothing kept and an alarm from both."""
    if b.key_length is None:
        return [f"decided without a logged key length: {b}"]
    bad: list[str] = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            bad.append(f"{what}: {b}")

    if b.whole_keys:
        need(b.outcome == {"alice": "accepted", "bob": "accepted"}, "key possible, not accepted")
        need(b.stored == {"alice": "ready", "bob": "ready"}, "accepted, not ready in both stores")
        n_keys = b.stored_keys.get("alice", 0)
        need(n_keys == b.stored_keys.get("bob") and n_keys > 0, "stores hold different keys")
        need(n_keys == b.whole_keys, "not every whole key the length leaves was kept")
        # Never more secret output than the bound, and all of it whole keys.
        secret = b.secret_bits.get("alice", 0)
        need(secret == b.secret_bits.get("bob"), "the stores record different secret bits")
        need(0 < secret <= b.key_length, "more secret bits than the finite-key length")
        need(secret >= 8 * n_keys * KEY_BYTES, "fewer secret bits than the keys hold")
        # Every key of the block delivered by both nodes, the same bytes under each ID.
        expected = {str(k) for k in key_ids(uuid.UUID(b.block_id), n_keys)}
        need(set(b.keys.get("alice", {})) == expected, "Alice did not deliver the block's keys")
        need(b.keys.get("alice") == b.keys.get("bob"), "the nodes delivered different keys")
        alarms = b.alarms.get("alice", []) + b.alarms.get("bob", [])
        need("no-secret-key" not in alarms, "a no-secret-key alarm for a block with key")
        return bad
    # No key: refused by both, nothing stored or delivered anywhere, and said so.
    reason = b.outcome.get("alice", "")
    need(reason.startswith("estimation"), "Alice's reason is not the bound")
    need(b.outcome.get("bob", "").startswith("peer: estimation"), "Bob's reason is not the bound")
    need(not b.stored, "stored without a key length")
    need(not b.keys, "keys delivered without a key length")
    for node in ("alice", "bob"):
        need("no-secret-key" in b.alarms.get(node, []), f"no no-secret-key alarm from {node}")
    # The reason quotes the length Alice logged: after error correction, or
    # at the Shannon limit for the pre-check (nothing disclosed, no Cascade).
    need(f"length {b.key_length} bits" in reason, "the reason does not quote the logged length")
    if b.stage == "precheck":
        need(b.alice.get("qber_z") is None, "error correction ran after the pre-check refused")
    return bad


def violations(r: DrillResult) -> list[str]:
    """Every way this drill broke the promise: key, at both nodes and identical ID
    by ID, exactly from the blocks whose finite-key length leaves a whole key;
    from every other block nothing stored, nothing delivered and a
    ``no-secret-key`` alarm from both nodes; keys only to each node's own
    consumer for its one peer, once each."""
    bad: list[str] = []
    # What a refused block would have reserved is not published; it is 0 while
    # Alice's pool holds [auth] reserve_bytes (AuthPool.wanted_bytes).
    if r.pool_min_bits is None or r.pool_min_bits < 8 * AUTH_RESERVE_BYTES:
        bad.append(f"Alice's authentication pool went below the reserve: {r.pool_min_bits} bits")
    for b in r.blocks.values():
        if b.decided:
            bad += _block_violations(b)
        elif b.keys or "alice" in b.stored or b.stored.get("bob") not in {None, "pending"}:
            # Cut off by the stop: Bob may hold it pending (RECOVER settles that).
            bad.append(f"undecided block kept or delivered: {b}")
    bad += [f"unreadable key message on {t}" for t in r.unreadable_keys]
    allowed = {b.block_id for b in r.blocks.values() if b.whole_keys and b.decided}
    seen: set[tuple[str, str]] = set()
    for k in r.key_messages:
        if (k.node_id, k.peer_id) not in KEY_TOPICS:
            bad.append(f"key for a party that is not this link's: {k}")
        if k.topic != f"qkd/v1/{k.node_id}/keys/{k.peer_id}":
            bad.append(f"key on the wrong topic: {k}")
        if k.block_id not in allowed:
            bad.append(f"key from a block the bound refused or never decided: {k}")
        if (k.node_id, k.key_id) in seen:
            bad.append(f"key delivered twice: {k}")
        seen.add((k.node_id, k.key_id))
    keys = r.keys_by_node()
    if keys["alice"] != keys["bob"]:
        bad.append("the nodes delivered different key sets or bytes")
    for node in ("alice", "bob"):
        told = r.telemetry.get(node, {}).get("secret_bits")
        stored = sum(b.secret_bits.get(node, 0) for b in r.with_key())
        if told != stored:
            bad.append(f"{node} reports {told} secret bits, its store {stored}")
    return bad


# -- running it --------------------------------------------------------------------------
class _Observer:
    """Everything published on the broker while the drill runs (retained messages
    left by an earlier run are skipped)."""

    def __init__(self, target_blocks: int) -> None:
        self.target = target_blocks
        self.telemetry: dict[str, dict[str, Any]] = {}
        self.last_blocks: dict[str, dict[str, Any]] = {}  # Alice's, by block ID
        self.pool_min_bits: int | None = None
        self.final: set[str] = set()
        self.alarms: dict[str, list[dict[str, Any]]] = {"alice": [], "bob": []}
        self.keys: list[KeyMessage] = []
        self.unreadable: list[str] = []
        self.done = asyncio.Event()
        self.flushed = asyncio.Event()

    def add(self, topic: str, payload: Any) -> None:
        parts = topic.split("/")
        node = parts[2] if len(parts) > 2 and parts[:2] == ["qkd", "v1"] else "?"
        if "keys" in parts:
            self._key(topic, payload)
        elif not isinstance(payload, dict):
            return
        elif parts[-1] == "alarms":
            self.alarms.setdefault(node, []).append(payload)
        elif parts[-1] == "telemetry":
            self._telemetry(node, payload)
        if self._blocks_done():
            self.done.set()

    def _telemetry(self, node: str, doc: dict[str, Any]) -> None:
        self.telemetry[node] = doc
        if node == "alice":
            if isinstance(last := doc.get("last_block"), dict):
                self.last_blocks[str(last.get("block_id"))] = last
            if (pool := doc.get("auth_key_bits_available")) is not None:
                least = self.pool_min_bits
                self.pool_min_bits = pool if least is None else min(pool, least)
        if doc.get("final"):
            self.final.add(node)
            if {"alice", "bob"} <= self.final:
                self.flushed.set()

    def _key(self, topic: str, doc: Any) -> None:
        try:
            material = base64.b64decode(doc["key"], validate=True)
            self.keys.append(
                KeyMessage(
                    topic=topic,
                    node_id=str(doc["node_id"]),
                    peer_id=str(doc["peer_id"]),
                    key_id=str(doc["key_ID"]),
                    block_id=str(doc["block_id"]),
                    digest=hashlib.sha256(material).hexdigest(),
                )
            )
        except (KeyError, TypeError, ValueError):
            self.unreadable.append(topic)

    def _blocks_done(self) -> bool:
        """``target`` blocks ended at both nodes (as many at each), the same ones
        accepted, and every key of the accepted ones delivered by both."""
        a, b = self.telemetry.get("alice"), self.telemetry.get("bob")
        if a is None or b is None:
            return False
        ended = a["blocks_accepted"] + a["blocks_rejected"]
        # The same count at both: a block Alice has decided and Bob not yet (her
        # abort on its way) would be judged without Bob's side if we stopped now.
        if ended < self.target or b["blocks_accepted"] + b["blocks_rejected"] != ended:
            return False
        if a["blocks_accepted"] != b["blocks_accepted"]:
            return False
        seen = {"alice": 0, "bob": 0}
        for k in self.keys:
            seen[k.node_id] = seen.get(k.node_id, 0) + 1
        return bool(seen["alice"] >= a["secret_keys"] and seen["bob"] >= b["secret_keys"])


def drill_args(fraction: float, block_bits: int, seed: int) -> argparse.Namespace:
    """The demo's own defaults (so a new demo option needs no change here), then the drill's."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    drill = {"protocol": "bb84", "eve": fraction, "fast": True, "block_bits": block_bits}
    drill |= {"seed": seed, "quiet": True}
    return argparse.Namespace(**(vars(parser.parse_args([])) | drill))


async def _watch(
    broker: tuple[str, int],
    obs: _Observer,
    start: Callable[[], dict[str, subprocess.Popen[bytes]]],
    deadline_s: float,
) -> tuple[dict[str, subprocess.Popen[bytes]], bool]:
    """Start the nodes under observation, stop them once the blocks are decided
    (or at the deadline, or when one exits), then wait for their last words."""

    async with Subscriber(broker, "#") as sub:

        async def receive() -> None:
            async for msg in sub:
                if not msg.retain:
                    obs.add(msg.topic, msg.payload)

        async with asyncio.TaskGroup() as tg:
            receiver = tg.create_task(receive(), name="drill-receive")
            procs = start()
            met = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline_s):
                    # Child processes signal no event we could await; poll them.
                    while all(p.poll() is None for p in procs.values()):
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(0.5):
                                await obs.done.wait()
                        if obs.done.is_set():
                            met = True
                            break
            # Bob first: he says goodbye to Alice, who then stops cleanly too.
            for role in ("bob", "alice"):
                await asyncio.to_thread(stop_node, procs[role], 20.0)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FLUSH_S):
                    await obs.flushed.wait()
            receiver.cancel()
    return procs, met


def _read_log(role: str, path: Path, recs: dict[str, BlockRecord]) -> None:
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        event = doc.get("event")
        if event not in {"block accepted", "block rejected"} or "block" not in doc:
            continue
        rec = recs.setdefault(doc["block"], BlockRecord(doc["block"]))
        rec.outcome[role] = "accepted" if event == "block accepted" else str(doc.get("reason"))
        if role == "alice":
            rec.alice.update({k: v for k, v in doc.items() if k in _FIGURES})


def _read_store(role: str, path: Path, recs: dict[str, BlockRecord]) -> None:
    if not path.exists():
        return
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT block_id, state, n_keys, stats FROM blocks").fetchall()
    for block_id, state, n_keys, stats_json in rows:
        rec = recs.setdefault(block_id, BlockRecord(block_id))
        stats = json.loads(stats_json)
        rec.stored[role] = state
        rec.stored_keys[role] = int(n_keys)
        rec.secret_bits[role] = int(stats.get("secret_bits", 0))
        if role == "alice":
            rec.alice.update(stats)


def _collect(obs: _Observer, workdir: Path) -> dict[str, BlockRecord]:
    """Every block by ID, from the telemetry, both logs and stores, the alarms and keys."""
    recs = {bid: BlockRecord(bid, alice=dict(last)) for bid, last in obs.last_blocks.items()}
    for role in ("alice", "bob"):
        _read_log(role, workdir / f"{role}.log", recs)
        _read_store(role, workdir / role / "keys.db", recs)
    for node, docs in obs.alarms.items():
        for doc in docs:
            for bid, rec in recs.items():
                if bid in str(doc.get("message", "")):
                    rec.alarms.setdefault(node, []).append(str(doc.get("code")))
    for k in obs.keys:
        rec = recs.setdefault(k.block_id, BlockRecord(k.block_id))
        rec.keys.setdefault(k.node_id, {})[k.key_id] = k.digest
    return recs


def run_drill(
    fraction: float,
    *,
    broker: tuple[str, int],
    workdir: Path,
    target_blocks: int = 1,
    block_bits: int = 300_000,
    deadline_s: float = 120.0,
    seed: int = 1,
) -> DrillResult:
    """One drill: the link with Eve on ``fraction`` of the pulses until
    ``target_blocks`` blocks are decided (or ``deadline_s``), and everything the observers saw."""
    workdir.mkdir(parents=True, exist_ok=True)
    args = drill_args(fraction, block_bits, seed)
    sim = link_parameters(args)
    peer_port = free_port()
    for role in ("alice", "bob"):
        text = node_config(role, args, f"{broker[0]}:{broker[1]}", peer_port, workdir, sim)
        (workdir / f"{role}.toml").write_text(text, encoding="utf-8")

    def start() -> dict[str, subprocess.Popen[bytes]]:
        return {
            role: spawn_node(workdir / f"{role}.toml", workdir / f"{role}.log")
            for role in ("alice", "bob")
        }

    obs = _Observer(target_blocks)
    t0 = time.monotonic()
    procs, met = asyncio.run(_watch(broker, obs, start, deadline_s))
    return DrillResult(
        fraction=fraction,
        seconds=time.monotonic() - t0,
        workdir=workdir,
        exit_codes={role: p.returncode for role, p in procs.items()},
        blocks=_collect(obs, workdir),
        telemetry=obs.telemetry,
        alarms=obs.alarms,
        key_messages=obs.keys,
        unreadable_keys=obs.unreadable,
        pool_min_bits=obs.pool_min_bits,
        condition_met=met,
    )


# -- the report --------------------------------------------------------------------------
def summarise(r: DrillResult) -> dict[str, Any]:
    """One row of the table: the figures of one drill."""
    decided = r.decided()
    lengths = [b.key_length for b in decided if b.key_length is not None]
    z = [b.alice["qber_z"] for b in decided if b.alice.get("qber_z") is not None]
    keys = r.keys_by_node()
    common = set(keys["alice"]) & set(keys["bob"])
    mismatched = sum(1 for k in common if keys["alice"][k] != keys["bob"][k])
    alice = r.telemetry.get("alice", {})
    return {
        "fraction": r.fraction,
        "qber_x": alice.get("qber"),
        "qber_z": sum(z) / len(z) if z else None,
        "blocks": len(decided),
        "blocks_with_key": len(r.with_key()),
        "secret_bits": alice.get("secret_bits", 0),
        "length_min": min(lengths, default=None),
        "length_max": max(lengths, default=None),
        "no_key_alarms": {n: r.alarm_codes(n).count("no-secret-key") for n in ("alice", "bob")},
        "qber_alarms": {n: r.alarm_codes(n).count("qber-high") for n in ("alice", "bob")},
        "keys_alice": len(keys["alice"]),
        "keys_bob": len(keys["bob"]),
        "keys_compared": len(common),
        "keys_mismatched": mismatched,
        "keys_identical": bool(common) and keys["alice"] == keys["bob"],
        "violations": len(violations(r)),
        "seconds": round(r.seconds, 1),
        "exit_codes": r.exit_codes,
    }


def _pct(q: float | None) -> str:
    return "—" if q is None else f"{100 * q:.2f}%"


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'Eve':>5} {'QBER X':>7} {'QBER Z':>7} {'blocks':>6} {'w/ key':>6} "
        f"{'secret b':>9} {'len min':>9} {'len max':>9} {'alarms A/B':>10} "
        f"{'qber-high':>9} {'keys identical':>22} {'viol.':>5} {'run s':>6}"
    )
    lines = [head, "-" * len(head)]
    for s in rows:
        lmin = "—" if s["length_min"] is None else f"{s['length_min']:,}"
        lmax = "—" if s["length_max"] is None else f"{s['length_max']:,}"
        alarms = f"{s['no_key_alarms']['alice']}/{s['no_key_alarms']['bob']}"
        qhigh = f"{s['qber_alarms']['alice']}/{s['qber_alarms']['bob']}"
        if s["keys_alice"] or s["keys_bob"]:
            ident = f"{'yes' if s['keys_identical'] else 'NO'} ({s['keys_compared']} keys)"
        else:
            ident = "— (no keys)"
        lines.append(
            f"{100 * s['fraction']:4.0f}% {_pct(s['qber_x']):>7} {_pct(s['qber_z']):>7} "
            f"{s['blocks']:>6} {s['blocks_with_key']:>6} {s['secret_bits']:>9,} "
            f"{lmin:>9} {lmax:>9} {alarms:>10} {qhigh:>9} {ident:>22} "
            f"{s['violations']:>5} {s['seconds']:>6}"
        )
    return "\n".join(lines)


def block_lines(r: DrillResult) -> list[str]:
    """One line per decided block."""
    return [
        f"{100 * r.fraction:4.0f}% {b.block_id[:8]} n {b.alice.get('n')} "
        f"QBER X {_pct(b.alice.get('qber_x'))} Z {_pct(b.alice.get('qber_z'))} "
        f"length {b.key_length} ({b.stage}) -> {b.outcome.get('alice')}, "
        f"{len(b.keys.get('alice', {}))} keys, "
        f"alarms A {b.alarms.get('alice', [])} B {b.alarms.get('bob', [])}"
        for b in r.decided()
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--fractions",
        type=lambda s: [float(x) for x in s.split(",")],
        default=list(FRACTIONS),
        help="comma-separated intercept-resend fractions",
    )
    ap.add_argument("--blocks", type=int, default=5, help="blocks to decide per fraction")
    ap.add_argument("--block-bits", type=int, default=300_000)
    ap.add_argument("--deadline-s", type=float, default=240.0, help="per fraction")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", default=None, help="keep configs, logs and stores here")
    ap.add_argument("--json", action="store_true", help="also print each row as JSON")
    ap.add_argument("--per-block", action="store_true", help="also print every block")
    args = ap.parse_args()

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="qnoded-eve-"))
    print(
        f"intercept-resend drills: bb84, 25 km, {args.block_bits:,}-bit blocks, "
        f"{args.blocks} blocks per fraction, seed {args.seed}; files in {work}",
        flush=True,
    )
    rows = []
    details: list[str] = []
    with MosquittoBroker() as broker:
        for f in args.fractions:
            r = run_drill(
                f,
                broker=(broker.host, broker.port),
                workdir=work / f"eve-{f:g}",
                target_blocks=args.blocks,
                block_bits=args.block_bits,
                deadline_s=args.deadline_s,
                seed=args.seed,
            )
            row = summarise(r)
            rows.append(row)
            details += block_lines(r)
            details += [f"  VIOLATION {v}" for v in violations(r)]
            if not r.condition_met:
                print(f"  eve {f:g}: deadline reached before {args.blocks} blocks", flush=True)
            if args.json:
                print(json.dumps(row), flush=True)
    print(table(rows))
    if args.per_block or any(row["violations"] for row in rows):
        print("\n".join(details))


if __name__ == "__main__":
    main()
