"""SIGKILL either node at random moments over many blocks: nothing lost, nothing twice.

Two `qnoded run` processes make key over the simulated BB84 link (``--fast``,
3e5-bit blocks, a block every second or two).  A seeded random schedule kills
Alice or Bob with SIGKILL (no goodbye, no flush) at a random moment, restarts
it, and waits until the restarted node has accepted a block again; a key
consumer reads both nodes' key topics throughout.  At the end, with both
stopped, what must hold (checked by tests/key_accounting.py, which bench/soak.py
shares):

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
import contextlib
import hashlib
import random
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from key_accounting import account, destroyed
from test_node_faults import Nodes, _args, audit_delivered

from qnoded.mqtt import Subscriber

pytestmark = pytest.mark.slow

KILLS = 6
LINK_UP_S = 5.0
SEED = 20261125


async def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    async with asyncio.timeout(timeout):
        while not cond():  # noqa: ASYNC110 - the consumer task updates what cond reads
            await asyncio.sleep(0.05)
    if not cond():
        raise AssertionError(what)


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
    link_up: list[float] = []  # restart -> the restarted node's peer channel up (its log)

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
                restarted_at = time.time()
                nodes.start(victim)
                back = time.monotonic()
                await until(lambda v=victim: accepted[v] >= 1, 60, f"{victim} made no key again")
                recoveries.append(round(time.monotonic() - back, 2))
                ups = [
                    t
                    for e in nodes.log(victim)
                    if e.get("event") == "peer channel up"
                    and (t := datetime.fromisoformat(e["timestamp"]).timestamp()) > restarted_at
                ]
                link_up.append(round(min(ups) - restarted_at, 2))

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
            # What a node delivered just before it stopped may still be on its way to
            # the consumer: wait (up to 10 s) for every key its audit names; what never
            # comes, the accounting below reports.
            with contextlib.suppress(TimeoutError):
                await until(
                    lambda: all(
                        set(audit_delivered(nodes, role)) <= set(digests[role]) for role in digests
                    ),
                    10,
                    "delivered keys never reached the consumer",
                )
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)

    result = account(tmp_path, delivered, digests, material)
    print(
        f"\nkills {kills}\nlink_up_s (restart -> peer channel up at the restarted node, "
        f"process start included) {link_up}\nrecovery_s (restart -> a block accepted at the "
        f"restarted node) {recoveries}\n{result.figures()}"
    )
    # Nothing twice, nothing lost, the stores agree, no key in a log: key_accounting.
    assert not result.problems, "\n".join(result.problems)
    assert len(result.stores["alice"].in_state("ready")) >= KILLS  # many blocks, not one
    assert len(kills) == KILLS and {v for v, _ in kills} == {"alice", "bob"}
    # The link is back within 5 s of the restart; key follows once a block is sifted.
    assert max(link_up) < LINK_UP_S, link_up
