"""SIGKILL either node at random moments over many blocks: nothing lost, nothing twice.

Two `qnoded run` processes make key over the simulated BB84 link (``--fast``,
3e5-bit blocks, a block every second or two).  A seeded random schedule kills
Alice or Bob with SIGKILL (no goodbye, no flush) at a random moment, restarts
it, and waits until the restarted node has accepted a block again; a key
consumer reads both nodes' key topics throughout.  At the end, with both
stopped, what must hold:

- no key ID was delivered twice by a node, and every key ID seen anywhere (on
  either key topic, or still in either key store) has the same bytes there;
- a key still in a node's store was never also delivered by that node;
- the key stores agree block by block: every block ready at Bob is ready at
  Alice, and every block ready at Alice is ready at Bob or pending there (the
  next session's RECOVER commits it), with the same number of keys.

The figures (kills, moments, recovery times, blocks) are printed for the
reliability report.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from test_node_faults import Nodes, _args

from qnoded.mqtt import Subscriber

pytestmark = pytest.mark.slow

KILLS = 6
SEED = 20261125


async def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    async with asyncio.timeout(timeout):
        while not cond():  # noqa: ASYNC110 - the consumer task updates what cond reads
            await asyncio.sleep(0.05)
    if not cond():
        raise AssertionError(what)


def read_store(
    path: Path,
) -> tuple[dict[str, tuple[str, int]], dict[str, str], dict[str, str]]:
    """A key store's blocks (id -> state, key count) and remaining keys (id -> SHA-256,
    id -> block id)."""
    db = sqlite3.connect(path)
    try:
        blocks = {
            r[0]: (r[1], int(r[2]))
            for r in db.execute("SELECT block_id, state, n_keys FROM blocks")
        }
        rows = db.execute("SELECT key_id, material, block_id FROM keys").fetchall()
    finally:
        db.close()
    digests = {r[0]: hashlib.sha256(bytes(r[1])).hexdigest() for r in rows}
    return blocks, digests, {r[0]: r[2] for r in rows}


def destroyed(log: Path) -> set[str]:
    """Key IDs a node destroyed undelivered (at most once: a crash or an unconfirmed
    publication), from its audit log lines."""
    out: set[str] = set()
    for line in log.read_text(encoding="utf-8").splitlines():
        if '"key destroyed undelivered"' in line:
            out.update(json.loads(line)["key_ids"])
    return out


@pytest.mark.asyncio
async def test_sigkill_at_random_moments_loses_and_repeats_nothing(
    tmp_path: Path, mqtt_broker: tuple[str, int]
) -> None:
    rng = random.Random(SEED)
    nodes = Nodes(
        tmp_path,
        mqtt_broker,
        _args(protocol="bb84", distance_km=25.0, fast=True, block_bits=300_000),
    )
    delivered: dict[str, Counter[str]] = {"alice": Counter(), "bob": Counter()}
    digests: dict[str, dict[str, str]] = {"alice": {}, "bob": {}}
    accepted = {"alice": 0, "bob": 0}  # blocks accepted by the node's current process
    kills: list[tuple[str, float]] = []
    material: set[str] = set()  # the keys as delivered (Base64), to look for in the logs
    recoveries: list[float] = []

    async def consume(sub: Subscriber) -> None:
        async for msg in sub:
            node, leaf = msg.topic.split("/")[2], msg.topic.split("/")[3]
            if leaf == "keys":
                kid = msg.payload["key_ID"]
                delivered[node][kid] += 1
                material.add(msg.payload["key"])
                digests[node][kid] = hashlib.sha256(
                    base64.b64decode(msg.payload["key"])
                ).hexdigest()
            elif leaf == "telemetry":
                accepted[node] = msg.payload["blocks_accepted"]

    async with Subscriber(mqtt_broker, "qkd/v1/+/keys/+", "qkd/v1/+/telemetry") as sub:
        consumer = asyncio.create_task(consume(sub), name="key-consumer")
        nodes.start("alice")
        nodes.start("bob")
        started = time.monotonic()
        try:
            await until(lambda: min(accepted.values()) >= 1, 60, "no first block")
            for _ in range(KILLS):
                await asyncio.sleep(rng.uniform(0.1, 3.0))  # somewhere in or between blocks
                victim = rng.choice(["alice", "bob"])
                nodes.procs[victim].kill()
                nodes.procs[victim].wait()
                kills.append((victim, round(time.monotonic() - started, 2)))
                await asyncio.sleep(rng.uniform(0.0, 0.5))
                accepted[victim] = 0
                nodes.start(victim)
                back = time.monotonic()
                await until(lambda v=victim: accepted[v] >= 1, 60, f"{victim} made no key again")
                recoveries.append(round(time.monotonic() - back, 2))

            # A quiet moment between blocks: both nodes have accounted for the same
            # keys, each delivered or (at most once) destroyed undelivered.
            def accounted(node: str) -> set[str]:
                return set(digests[node]) | destroyed(tmp_path / f"{node}.log")

            await until(
                lambda: accounted("alice") == accounted("bob"), 30, "deliveries never matched"
            )
        finally:
            for role in ("bob", "alice"):
                if nodes.procs[role].poll() is None:
                    nodes.stop(role)
            nodes.kill_all()
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)

    blocks_a, left_a, _ = read_store(tmp_path / "alice" / "keys.db")
    blocks_b, left_b, block_of_b = read_store(tmp_path / "bob" / "keys.db")
    gone_a, gone_b = destroyed(tmp_path / "alice.log"), destroyed(tmp_path / "bob.log")
    print(
        f"\nkills {kills}\nrecovery_s (restart -> a block accepted at the restarted node) "
        f"{recoveries}\nblocks ready alice {sum(s == 'ready' for s, _ in blocks_a.values())}, "
        f"bob {sum(s == 'ready' for s, _ in blocks_b.values())}, pending bob "
        f"{sum(s == 'pending' for s, _ in blocks_b.values())}; keys delivered alice "
        f"{len(delivered['alice'])}, bob {len(delivered['bob'])}; destroyed undelivered "
        f"alice {len(gone_a)}, bob {len(gone_b)}; left alice {len(left_a)}, bob {len(left_b)}"
    )
    # Nothing twice.
    for node in ("alice", "bob"):
        assert max(delivered[node].values()) == 1, f"{node} delivered a key twice"
    assert not set(delivered["alice"]) & set(left_a), "alice still holds a key it delivered"
    assert not set(delivered["bob"]) & set(left_b), "bob still holds a key he delivered"
    # One key per ID, wherever it was seen.
    seen: dict[str, set[str]] = {}
    for source in (digests["alice"], digests["bob"], left_a, left_b):
        for kid, digest in source.items():
            seen.setdefault(kid, set()).add(digest)
    assert all(len(d) == 1 for d in seen.values()), "a key ID with two different keys"
    # The stores agree block by block (a block pending at Bob waits for RECOVER).
    ready_a = {b for b, (s, _) in blocks_a.items() if s == "ready"}
    ready_b = {b for b, (s, _) in blocks_b.items() if s == "ready"}
    pending_b = {b for b, (s, _) in blocks_b.items() if s == "pending"}
    assert ready_b <= ready_a
    assert ready_a <= ready_b | pending_b
    assert all(blocks_a[b][1] == blocks_b[b][1] for b in ready_a)
    assert len(ready_a) >= KILLS  # many blocks, not one
    # Key by key: what each node delivered, destroyed or still holds is the same set of IDs
    # (less a block pending at Bob that Alice never committed: RECOVER discards it).
    held_b = {k for k, b in block_of_b.items() if b in ready_a}
    everything_a = set(delivered["alice"]) | gone_a | set(left_a)
    everything_b = set(delivered["bob"]) | gone_b | held_b
    assert everything_a == everything_b
    assert not (gone_a | gone_b) & (set(left_a) | set(left_b))  # destroyed means gone
    assert len(kills) == KILLS and {v for v, _ in kills} == {"alice", "bob"}
    # Not one key, in Base64 or hex, in either node's log (crashes included).
    logs = (tmp_path / "alice.log").read_text() + (tmp_path / "bob.log").read_text()
    hexes = {base64.b64decode(k).hex() for k in material}
    assert not [k for k in material | hexes if k in logs]
