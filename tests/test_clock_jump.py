"""Clock jump on one node: its wall clock steps back an hour, then forward two; later
the other node's steps back.  Key goes on, nothing lost, nothing twice.

A node's wall clock can step at any moment: NTP correcting a bad start, an operator
setting the date, a VM restored from a snapshot.  The monotonic clock does not move.
qnoded must take every timing decision (timeouts, pacing, backoff, the watchdog)
from the monotonic clock and use the wall clock only to stamp what it reports.

The step is real at the process: tests/wallclock_shift.c, loaded with LD_PRELOAD
into each `qnoded run`, adds an offset that the test rewrites while the node runs to
CLOCK_REALTIME, gettimeofday() and time() (Python's time.time(), datetime, SQLite,
OpenSSL all read the clock through these), and leaves CLOCK_MONOTONIC alone.

What must hold, each step:
- the step took effect: the node's telemetry ``time`` moved by the step;
- key goes on: a block started after the step gives keys at both nodes within
  RECOVERY_S of the step (the figure is printed), with no alarm, no status change
  and no block rejected (but at verification, which is no clock trouble);
and at the end, both nodes stopped (tests/key_accounting.py): no key ID delivered
twice, every key ID the same bytes wherever seen, the key stores agree block by
block, no key in a log.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from key_accounting import account
from test_node_faults import Nodes, _args, audit_delivered

from qnoded.mqtt import Subscriber

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
CC = ("cc", "-std=c99", "-O2", "-Wall", "-Werror", "-shared", "-fPIC")
HOUR_NS = 3600 * 10**9
RECOVERY_S = 5.0  # the step -> keys of a block started after it, at both nodes
HOLD_S = 12.0  # each step lasts this long before the next
# (node, its wall clock's offset from true time after the step, in hours)
STEPS = [("bob", -1), ("bob", +1), ("alice", -1)]


def build_shim(tmp: Path) -> Path:
    lib = tmp / "libwallclock_shift.so"
    subprocess.run(
        [*CC, "-o", str(lib), str(HERE / "wallclock_shift.c"), "-ldl"],
        check=True,
    )
    return lib


class WallClock:
    """One process's wall-clock offset, in the file the shim maps."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_bytes(struct.pack("<q", 0))
        self.offset_h = 0

    def set(self, hours: int) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, struct.pack("<q", hours * HOUR_NS), 0)  # 8 aligned bytes
        finally:
            os.close(fd)
        self.offset_h = hours


def test_the_shim_steps_the_wall_clock_and_not_the_monotonic_one(tmp_path: Path) -> None:
    clock = WallClock(tmp_path / "shift")
    env = os.environ | {
        "LD_PRELOAD": str(build_shim(tmp_path)),
        "QNODED_WALLCLOCK_SHIFT_FILE": str(clock.path),
    }
    probe = (
        "import sys, time, datetime; w, m = time.time(), time.monotonic(); "
        "print('read', flush=True); sys.stdin.readline(); time.sleep(0.05); "
        "print(time.time() - w, time.monotonic() - m, "
        "datetime.datetime.now().timestamp() - w)"
    )
    proc = subprocess.Popen(
        ["python3", "-c", probe], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline() == "read\n"
    clock.set(-2)  # while it runs, between its two readings
    out, _ = proc.communicate("go\n", timeout=30)
    wall, mono, dt = (float(x) for x in out.split())
    assert abs(wall + 7200) < 1.0 and abs(dt + 7200) < 1.0, out
    assert 0.05 <= mono < 1.0, out


async def until(cond: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # the consumer task updates what cond reads
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout:.0f} s: {what()}")
        await asyncio.sleep(0.05)


@pytest.mark.asyncio
async def test_a_stepped_wall_clock_loses_nothing_and_key_goes_on(
    tmp_path: Path, mqtt_broker: tuple[str, int]
) -> None:
    shim = build_shim(tmp_path)
    nodes = Nodes(tmp_path, mqtt_broker, _args(block_bits=20_000))  # about a block a second
    clocks = {role: WallClock(tmp_path / f"{role}.shift") for role in ("alice", "bob")}
    delivered: dict[str, Counter[str]] = {"alice": Counter(), "bob": Counter()}
    digests: dict[str, dict[str, str]] = {"alice": {}, "bob": {}}
    material: set[str] = set()
    first_seen: dict[str, float] = {}  # block ID -> when its first key came (monotonic)
    blocks_of: dict[str, set[str]] = {"alice": set(), "bob": set()}
    telemetry: dict[str, dict[str, Any]] = {}
    told_at: dict[str, float] = {}  # node -> our wall clock when its telemetry came
    alarms: list[tuple[str, str, str]] = []
    status: list[tuple[str, str]] = []

    async def consume(sub: Subscriber) -> None:
        async for msg in sub:
            parts = msg.topic.split("/")
            node, leaf, doc = parts[2], parts[3], msg.payload
            if leaf == "keys":
                kid = doc["key_ID"]
                delivered[node][kid] += 1
                material.add(doc["key"])
                digests[node][kid] = hashlib.sha256(base64.b64decode(doc["key"])).hexdigest()
                block = str(doc["block_id"])
                first_seen.setdefault(block, time.monotonic())
                blocks_of[node].add(block)
            elif leaf == "telemetry":
                telemetry[node], told_at[node] = doc, time.time()
            elif leaf == "alarms":
                alarms.append((node, doc["code"], doc["message"]))
            elif leaf == "status":
                status.append((node, doc["state"]))

    def new_blocks(node: str, since: float) -> list[float]:
        return sorted(first_seen[b] - since for b in blocks_of[node] if first_seen[b] > since)

    def offset_seen(node: str) -> float:
        """The node's wall clock less ours, in hours, from its latest telemetry."""
        return (telemetry[node]["time"] - told_at[node]) / 3600 if node in telemetry else 0.0

    topics = ("qkd/v1/+/keys/+", "qkd/v1/+/telemetry", "qkd/v1/+/alarms", "qkd/v1/+/status")
    recoveries: list[tuple[str, int, dict[str, float]]] = []
    async with Subscriber(mqtt_broker, *topics) as sub:
        consumer = asyncio.create_task(consume(sub), name="key-consumer")
        for role in ("alice", "bob"):
            nodes.env = os.environ | {
                "LD_PRELOAD": str(shim),
                "QNODED_WALLCLOCK_SHIFT_FILE": str(clocks[role].path),
            }
            nodes.start(role)
        try:
            await until(
                lambda: all(len(blocks_of[n]) >= 2 for n in blocks_of) and len(telemetry) == 2,
                60,
                lambda: f"no key yet: blocks {blocks_of}",
            )
            alarms_before, status_before = len(alarms), len(status)
            for node, hours in STEPS:
                clocks[node].set(hours)
                stepped = time.monotonic()
                await until(
                    lambda n=node, h=hours: abs(offset_seen(n) - h) < 0.01,
                    10,
                    lambda n=node: f"{n}'s telemetry shows no step: {offset_seen(n):.3f} h",
                )
                # Two blocks after the step: the first may have begun before it.
                await until(
                    lambda s=stepped: all(len(new_blocks(n, s)) >= 2 for n in blocks_of),
                    30,
                    lambda s=stepped: f"key stopped after the step: {blocks_of}",
                )
                first = {n: round(new_blocks(n, stepped)[0], 2) for n in blocks_of}
                recoveries.append((node, hours, first))
                # Live past the step longer than the peer timeout (10 s): a deadline
                # taken from the wall clock would fire, or never fire, meanwhile.
                await asyncio.sleep(max(0.0, stepped + HOLD_S - time.monotonic()))
            # A block lost at verification (Cascade left an error: rare, and the check
            # that catches it is the point) is no clock trouble; any other reason is.
            rejected = [
                (role, e.get("reason", ""))
                for role in ("alice", "bob")
                for e in nodes.log(role)
                if e.get("event") == "block rejected"
            ]
            assert all("hashes differ" in why for _, why in rejected), rejected
            assert alarms[alarms_before:] == [], alarms[alarms_before:]
            assert status[status_before:] == [], status[status_before:]
            # A quiet moment: both nodes have delivered the same keys.
            await until(
                lambda: set(digests["alice"]) == set(digests["bob"]),
                30,
                lambda: "the nodes' deliveries never matched",
            )
        finally:
            for role in ("bob", "alice"):
                if role in nodes.procs and nodes.procs[role].poll() is None:
                    assert nodes.stop(role) < 15
            nodes.kill_all()
            # What the nodes delivered just before they stopped is still on its way here.
            await until(
                lambda: all(set(audit_delivered(nodes, r)) <= set(digests[r]) for r in digests),
                10,
                lambda: "keys the nodes' audit says they delivered never came",
            )
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)

    result = account(tmp_path, delivered, digests, material)
    print("\nwall clock steps (node, offset after, s from the step to a new block's first key):")
    for node, hours, first in recoveries:
        print(f"  {node} -> {hours:+d} h: {first}")
    print(result.figures())
    assert not result.problems, "\n".join(result.problems)
    for node, hours, first in recoveries:
        assert max(first.values()) < RECOVERY_S, (node, hours, first)
