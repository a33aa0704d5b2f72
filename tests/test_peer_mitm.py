"""A man in the middle on the peer link of two running nodes: modify, replay,
reorder, inject, drop, stall, truncate.

Two `qnoded run` processes (BBM92 in real time, 20 kbit blocks: a block every
second or two) make key through :class:`mitm.FrameProxy`, Bob dialling the
proxy.  One pair serves every test here: each arms one attack on the proxy's
:class:`mitm.Mitm` hook, waits for it to act, and checks

- what caught it: the node that received the frame refuses it and drops the
  session, counts it by kind (telemetry ``auth_failures``, one failure) and
  raises ``authentication-failure``; the other node counts nothing.  A stall or
  a truncated frame is no authentication failure but a peer fault (the ``peer``
  alarm, which both nodes raise for every attack: the session is gone);
- no key from a block the attack touched (the one in flight, one whose frame
  it changed, one started after it on the same connection), at either node,
  unless that block's PREPARED had reached Alice intact before the attack (she
  committed it then, and Bob's RECOVER in the next session does);
- the link recovers by itself: from the end of the fault to the link being up
  again at both nodes (their ``peer-cleared`` alarm: the node took a new session)
  within ``RECOVERY_S``, and to the first key of a block started after the
  fault, at both nodes;
- both nodes have delivered the same keys, ID by ID.

One authentication failure is tolerated (and counted): a "stale" HELLO at
Alice while the link comes back.  When a session ends with a tagged frame of
Alice's that Bob never accepted (a dropped or refused VERIFY, say), Bob's pad
floor is behind hers; she refuses his next HELLO as stale, announces her floor
and he dials again above it.  The node counts that by kind but raises no
authentication-failure alarm for it: nothing was forged.

An attacker who leaves the sequence numbers as they were is caught by the
sequence check (kind ``seq``); one who renumbers every frame after the one it
dropped, added or moved leaves only the pad index (``pad``) and the MAC
(``mac``, also for a bulk frame: the sender's next tag covers it; or
``missing-mac`` where the frame must carry one, or where an added bulk frame
makes the untagged run longer than allowed) to catch it.
The last test stops both nodes and checks the whole run with
tests/key_accounting.py: both key stores agree block by block, no key was
delivered twice, every key ID is the same key wherever it was seen; no touched
block is in either store.  It prints each attack's figures.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from key_accounting import NODES, account
from mitm import Cut, Direction, FrameProxy, Mitm, Wire, WireFrame
from test_node_faults import Nodes, _args

from qnoded.auth import TAG_LEN
from qnoded.mqtt import Received, Subscriber
from qnoded.peer import MsgType, encode_arrays

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

BLOCK_BITS = 20_000
# [peer] timeout_s: a node gives up on a silent peer after 3x this (the default, 10 s,
# would make the stall half a minute); Bob pings an idle link every timeout_s / 2.
PEER_TIMEOUT_S = 2.0
STALL_S = 3 * PEER_TIMEOUT_S + 1.5  # longer than that: both nodes time out
RECOVERY_S = 5.0  # fault over -> link up again at both nodes
FIRST_BLOCK_S = 15.0  # fault over -> keys of a new block at both (~2 s of sifting + Cascade)
ATTACK_DEADLINE_S = 40.0  # for the attack to meet its frame
RECOVERED_DEADLINE_S = 45.0  # for the nodes to recover and make key again
TOPICS = ("qkd/v1/+/keys/+", "qkd/v1/+/alarms", "qkd/v1/+/telemetry", "qkd/v1/+/status")
AUTH_FAILED = "peer frame failed authentication, closing"


# -- what a key consumer and an operator see ------------------------------------------
@dataclass(frozen=True)
class Alarm:
    node: str
    code: str
    message: str
    time: float  # the node's wall clock


@dataclass
class Watch:
    """Keys, alarms, telemetry and status of both nodes, as they arrive."""

    delivered: dict[str, Counter[str]] = field(
        default_factory=lambda: {n: Counter() for n in NODES}
    )
    digests: dict[str, dict[str, str]] = field(default_factory=lambda: {n: {} for n in NODES})
    material: set[str] = field(default_factory=set)
    # (node, block) -> when its first key arrived here (wall clock)
    first_key: dict[tuple[str, str], float] = field(default_factory=dict)
    alarms: list[Alarm] = field(default_factory=list)
    telemetry: dict[str, dict[str, Any]] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)

    async def consume(self, sub: Subscriber) -> None:
        async for msg in sub:
            self.take(msg)

    def take(self, msg: Received) -> None:
        parts = msg.topic.split("/")
        node, leaf, doc = parts[2], parts[3], msg.payload
        if leaf == "keys":
            kid = str(doc["key_ID"])
            self.delivered[node][kid] += 1
            self.material.add(doc["key"])
            self.digests[node][kid] = hashlib.sha256(base64.b64decode(doc["key"])).hexdigest()
            self.first_key.setdefault((node, str(doc["block_id"])), time.time())
        elif leaf == "alarms":
            self.alarms.append(Alarm(node, doc["code"], doc["message"], doc["time"]))
        elif leaf == "telemetry":
            self.telemetry[node] = doc
        elif leaf == "status":
            self.status[node] = doc.get("state", "")

    def blocks(self, node: str) -> set[str]:
        """Blocks of which ``node`` delivered keys."""
        return {b for n, b in self.first_key if n == node}

    def same_keys(self) -> bool:
        """Both nodes delivered the same key IDs, each the same key (between blocks)."""
        a, b = self.digests["alice"], self.digests["bob"]
        return bool(a) and a == b

    def auth_failures(self, node: str) -> Counter[str]:
        return Counter(self.telemetry.get(node, {}).get("auth_failures") or {})

    def since(self, t: float, code: str, node: str | None = None) -> list[Alarm]:
        return [a for a in self.alarms if a.time > t and a.code == code and node in (None, a.node)]


@dataclass
class Result:
    """One attack's figures, for the report."""

    name: str
    caught_by: str
    link_up_s: dict[str, float]
    first_block_s: dict[str, float]
    touched: set[str]
    doomed: set[str]
    peer_faults: dict[str, str] = field(default_factory=dict)  # node -> its peer alarm
    stale: int = 0  # Alice's "stale" refusals of Bob's HELLO while reconnecting

    def line(self) -> str:
        up = ", ".join(f"{n} {s:.2f}" for n, s in self.link_up_s.items())
        blk = ", ".join(f"{n} {s:.2f}" for n, s in self.first_block_s.items())
        return (
            f"{self.name}: caught by {self.caught_by}; fault end -> link up [{up}] s, "
            f"-> first new block's keys [{blk}] s; blocks touched {len(self.touched)}, "
            f"kept from them {len(self.touched - self.doomed)}; stale HELLOs {self.stale}"
        )


@dataclass
class Link:
    nodes: Nodes
    proxy: FrameProxy
    mitm: Mitm
    watch: Watch
    workdir: Path
    results: list[Result] = field(default_factory=list)
    doomed: set[str] = field(default_factory=set)  # blocks that must never give key


async def until(cond: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    """Poll ``cond`` (the consumer task feeds what it reads) until it holds, or fail."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"after {timeout:.0f} s: {what()}")
        await asyncio.sleep(0.05)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def link(
    tmp_path_factory: pytest.TempPathFactory, mqtt_broker: tuple[str, int]
) -> AsyncIterator[Link]:
    """Alice and Bob through the proxy, making key; shared by every test here."""
    workdir = tmp_path_factory.mktemp("mitm")
    nodes = Nodes(workdir, mqtt_broker, _args(block_bits=BLOCK_BITS))
    mitm = Mitm()
    watch = Watch()
    async with FrameProxy(nodes.peer_port, mitm) as proxy, Subscriber(mqtt_broker, *TOPICS) as sub:
        for role in NODES:
            toml = workdir / f"{role}.toml"
            text = toml.read_text().replace("[peer]\n", f"[peer]\ntimeout_s = {PEER_TIMEOUT_S}\n")
            toml.write_text(
                text.replace(
                    f'connect = "127.0.0.1:{nodes.peer_port}"',
                    f'connect = "127.0.0.1:{proxy.port}"',
                )
            )
        consumer = asyncio.create_task(watch.consume(sub), name="key-consumer")
        nodes.start("alice")
        nodes.start("bob")
        try:
            await until(
                lambda: all(watch.blocks(n) for n in NODES) and watch.same_keys(),
                60,
                lambda: f"no key yet: status {watch.status}",
            )
            yield Link(nodes, proxy, mitm, watch, workdir)
        finally:
            for role in ("bob", "alice"):
                if nodes.procs[role].poll() is None:
                    await asyncio.to_thread(nodes.stop, role)
            nodes.kill_all()
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)


# -- the attacks ------------------------------------------------------------------------
def _prepared(block: str) -> bytes:
    """A PREPARED's payload as Bob would send it for ``block`` (qnoded/blocks.py)."""
    return encode_arrays({"block_id": np.frombuffer(uuid.UUID(block).bytes, dtype=np.uint8)})


_commit = _prepared  # a COMMIT names its block the same way


@dataclass
class InBlock:
    """An attack on the ``nth`` frame of a type in a block: the first block started
    after it is armed, or the next if that one ends without such a frame."""

    target: MsgType
    nth: int = 1
    block: str | None = None
    count: int = 0

    def hit(self, frame: WireFrame) -> bool:
        if frame.msg_type is MsgType.BLOCK_START:
            self.block, self.count = frame.block_id, 0
        if frame.msg_type is not self.target or self.block is None:
            return False
        if frame.block_id != self.block:
            return False
        self.count += 1
        return self.count == self.nth


@dataclass
class Flip(InBlock):
    """Modify: flip the last payload bit of the frame (a parity, a block ID's bit)."""

    mac_len: int = -1

    def __call__(self, wire: Wire, d: Direction, frame: WireFrame) -> list[bytes] | None:
        if not self.hit(frame):
            return None
        self.mac_len = frame.mac_len
        wire.fired(frame.block_id)
        return [frame.flipped(-1)]


@dataclass
class Replay:
    """Re-send the last earlier frame of a type in this session just before the next one."""

    target: MsgType
    renumber: bool
    replayed: WireFrame | None = None

    def __call__(self, wire: Wire, d: Direction, frame: WireFrame) -> list[bytes] | None:
        earlier = wire.earlier(d, self.target)
        if frame.msg_type is not self.target or not earlier:
            return None
        self.replayed = earlier[-1]
        wire.renumber = self.renumber
        wire.fired(frame.block_id)
        return [wire.replay(d, self.replayed), wire.forward(d, frame)]


@dataclass
class Swap:
    """Reorder: hold a ``first`` frame; if the next one in its direction is a
    ``second``, that goes first (with ``renumber``, each with the other's seq)."""

    direction: Direction
    first: MsgType
    second: MsgType
    renumber: bool
    held: WireFrame | None = None

    def __call__(self, wire: Wire, d: Direction, frame: WireFrame) -> list[bytes] | None:
        if d != self.direction:
            return None
        held, self.held = self.held, None
        if held is not None and held.conn == frame.conn and frame.msg_type is self.second:
            wire.renumber = self.renumber
            wire.fired(frame.block_id, held.block_id)
            return [wire.forward(d, frame), wire.forward(d, held)]
        out = [] if held is None or held.conn != frame.conn else [wire.forward(d, held)]
        if frame.msg_type is self.first:
            self.held = frame
        else:
            out.append(wire.forward(d, frame))
        return out


@dataclass
class ForgedPrepared:
    """Inject: after Bob's EC_DONE, a PREPARED Bob never sent, with the pad index
    Alice expects next and a random tag (seq renumbered)."""

    def __call__(self, wire: Wire, d: Direction, frame: WireFrame) -> list[bytes] | None:
        if frame.msg_type is not MsgType.EC_DONE or frame.block_id is None:
            return None
        wire.renumber = True
        wire.fired(frame.block_id)
        done = wire.forward(d, frame)
        return [done, wire.inject(d, MsgType.PREPARED, _prepared(frame.block_id), mac=True)]


@dataclass
class UntaggedCommit:
    """Inject: just before Alice's VERIFY, a COMMIT of that block with no MAC."""

    def __call__(self, wire: Wire, d: Direction, frame: WireFrame) -> list[bytes] | None:
        if frame.msg_type is not MsgType.VERIFY or frame.block_id is None:
            return None
        wire.renumber = True
        wire.fired(frame.block_id)
        forged = wire.inject(d, MsgType.COMMIT, _commit(frame.block_id), mac=False)
        return [forged, wire.forward(d, frame)]


@dataclass
class Drop(InBlock):
    """Drop the frame silently (with ``renumber``, the frames after it close the gap)."""

    renumber: bool = False

    def __call__(self, wire: Wire, d: Direction, frame: WireFrame) -> list[bytes] | None:
        if not self.hit(frame):
            return None
        wire.renumber = self.renumber
        wire.fired(frame.block_id)
        return []


@dataclass
class Stall(InBlock):
    """Hold the whole link (new connections too) from this frame on, for ``STALL_S``;
    :func:`strike` ends it."""

    proxy: FrameProxy | None = None
    wire: Wire | None = None

    def __call__(self, wire: Wire, d: Direction, frame: WireFrame) -> list[bytes] | None:
        if self.wire is None and self.hit(frame):
            assert self.proxy is not None
            self.proxy.stall()
            wire.mitm.taint(wire)
            self.wire = wire
        return None


@dataclass
class Truncate(InBlock):
    """Forward the first half of the frame, then close the connection."""

    def __call__(self, wire: Wire, d: Direction, frame: WireFrame) -> list[bytes] | None:
        if not self.hit(frame):
            return None
        wire.fired(frame.block_id)
        raise Cut(frame.half())


# -- one attack, start to finish ---------------------------------------------------------
def _other(node: str) -> str:
    return "bob" if node == "alice" else "alice"


def _auth_log(link: Link, node: str, since: int) -> list[dict[str, Any]]:
    return [e for e in link.nodes.log(node)[since:] if e.get("event") == AUTH_FAILED]


def _idle_s(link: Link, node: str, after: float) -> float:
    """From the link layer's new channel ("peer channel up") to the node taking it
    (its peer fault cleared), after wall time ``after``: the node's own backoff."""
    when: dict[str, float] = {}
    for e in link.nodes.log(node):
        t = datetime.fromisoformat(e.get("timestamp", "1970-01-01T00:00:00Z")).timestamp()
        if t <= after:
            continue
        if e.get("event") == "peer channel up":
            when.setdefault("up", t)
        elif e.get("event") == "fault cleared" and e.get("fault") == "peer" and "up" in when:
            return t - when["up"]
    return float("nan")


async def strike(
    link: Link, name: str, attack: Any, *, catcher: str, kinds: tuple[str, ...] = ()
) -> Result:
    """Arm ``attack``, wait for it to act and for the link to recover; check what
    caught it (one authentication failure at ``catcher``, of one of ``kinds``; none:
    a peer fault there, no authentication failure anywhere) and that no touched
    block gave key."""
    watch, mitm, proxy = link.watch, link.mitm, link.proxy
    await until(watch.same_keys, 30, lambda: "the nodes' keys differ before the attack")
    before = {n: watch.auth_failures(n) for n in NODES}
    logs = {n: len(link.nodes.log(n)) for n in NODES}
    armed = time.time()
    mitm.arm(attack)
    await until(
        lambda: mitm.fired_at is not None or proxy.stalled,
        ATTACK_DEADLINE_S,
        lambda: f"{name}: the attack never met its frame ({proxy.connections} connections)",
    )
    if isinstance(attack, Stall):
        await asyncio.sleep(STALL_S)  # the fault itself: nothing to wait on but the clock
        assert attack.wire is not None
        mitm.fired(attack.wire)
        proxy.release()
    fault_end = mitm.fired_at
    assert fault_end is not None

    def up(node: str) -> float | None:
        cleared = watch.since(fault_end, "peer-cleared", node)
        return cleared[0].time - fault_end if cleared else None

    def first_block(node: str) -> float | None:
        new = [
            t
            for (n, b), t in watch.first_key.items()
            if n == node and mitm.started.get(b, 0.0) > fault_end
        ]
        return min(new) - fault_end if new else None

    def fresh(node: str) -> bool:  # telemetry counts everything up to the link's return
        link_up = up(node)
        seen = watch.telemetry.get(node, {}).get("time", 0.0)
        return link_up is not None and seen > fault_end + link_up

    def recovered() -> bool:
        caught = not kinds or watch.auth_failures(catcher).total() > before[catcher].total()
        return (
            caught
            and all(fresh(n) and first_block(n) is not None for n in NODES)
            and watch.same_keys()
        )

    await until(
        recovered,
        RECOVERED_DEADLINE_S,
        lambda: (
            f"{name}: no recovery: link up {[up(n) for n in NODES]}, first new block "
            f"{[first_block(n) for n in NODES]}, auth failures "
            f"{[dict(watch.auth_failures(n)) for n in NODES]}, status {watch.status}, alarms "
            f"{[(a.node, a.code) for a in watch.alarms if a.time > armed]}, keys "
            f"{[len(watch.digests[n]) for n in NODES]}"
        ),
    )
    touched = set(mitm.touched)
    doomed = touched - mitm.prepared
    link.doomed |= doomed
    result = Result(
        name,
        caught_by="",
        link_up_s={n: round(up(n) or 0.0, 2) for n in NODES},
        first_block_s={n: round(first_block(n) or 0.0, 2) for n in NODES},
        touched=touched,
        doomed=doomed,
    )

    # No key from a block the attack touched, unless Alice had committed it before.
    for n in NODES:
        assert not watch.blocks(n) & doomed, f"{name}: {n} delivered key from touched blocks"
    assert all(c == 1 for n in NODES for c in watch.delivered[n].values()), "a key came twice"
    # What caught it.
    for n in NODES:
        assert watch.since(armed, "peer", n), f"{name}: no peer fault at {n}: session kept"
        result.peer_faults[n] = watch.since(armed, "peer", n)[0].message
    failed = {n: watch.auth_failures(n) - before[n] for n in NODES}
    # Alice refuses a HELLO below her pad floor as "stale" and announces the floor; Bob
    # dials again above it.  A session that ends with a tagged frame of hers unread at
    # Bob leaves his floor below hers, so the reconnect after an attack may meet this:
    # counted by the node but not alarmed (see the module docstring), tolerated and
    # counted here.
    result.stale = failed["alice"].pop("stale", 0)
    assert not failed[_other(catcher)], (name, failed)
    if kinds:
        assert failed[catcher].total() == 1, (name, failed)
        assert set(failed[catcher]) <= set(kinds), (name, failed, kinds)
    else:
        assert not failed[catcher], (name, failed)
    kind = next(iter(failed[catcher]), None)
    entries = {n: _auth_log(link, n, logs[n]) for n in NODES}
    named = {n: [e["kind"] for e in entries[n] if e["kind"] != "stale"] for n in NODES}
    assert named == {catcher: [kind] if kind else [], _other(catcher): []}, named
    alarmed = {catcher} if kind else set()  # a stale HELLO alone raises none
    await until(
        lambda: {a.node for a in watch.since(armed, "authentication-failure")} == alarmed,
        5,
        lambda: (
            f"{name}: authentication-failure alarms {watch.since(armed, 'authentication-failure')}"
        ),
    )
    if kind is None:
        result.caught_by = f"{catcher}: peer fault ({result.peer_faults[catcher]})"
    else:
        error = next(e["error"] for e in entries[catcher] if e["kind"] == kind)
        result.caught_by = f"{catcher}: {kind} ({error})"

    link.results.append(result)
    print(f"\n{result.line()}")
    # The link is back soon, and makes key.
    for n in NODES:
        assert result.link_up_s[n] < RECOVERY_S, (
            f"{name}: link up at {n} {result.link_up_s[n]} s after the fault; the node took "
            f"the channel its link had made {_idle_s(link, n, fault_end):.2f} s late"
        )
        assert result.first_block_s[n] < FIRST_BLOCK_S, (name, result.first_block_s)
    assert not proxy.errors, proxy.errors
    return result


# -- the tests -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("target", "nth", "catcher"),
    [(MsgType.EC_ANSWER, 3, "bob"), (MsgType.PREPARED, 1, "alice")],
    ids=["ec-answer-bulk", "prepared-tagged"],
)
async def test_a_flipped_bit_drops_its_block(
    link: Link, target: MsgType, nth: int, catcher: str
) -> None:
    """A Cascade answer (untagged, covered by Alice's next tag) or Bob's PREPARED
    (tagged; Bob already holds the block pending) with one bit changed."""
    flip = Flip(target, nth)
    logs = len(link.nodes.log(catcher))
    result = await strike(link, f"modify {target.name}", flip, catcher=catcher, kinds=("mac",))
    assert flip.mac_len == (0 if target is MsgType.EC_ANSWER else TAG_LEN)
    assert flip.block in result.doomed
    if target is MsgType.EC_ANSWER:  # caught by the tag that covers it
        assert "untagged frames before it" in _auth_log(link, catcher, logs)[0]["error"]


@pytest.mark.parametrize(
    ("target", "renumber", "catcher", "kinds"),
    [
        (MsgType.VERIFY, False, "bob", ("seq",)),
        (MsgType.PREPARED, True, "alice", ("pad",)),
        # Caught by Alice's next tag, or before it: one more untagged frame than she
        # sent may take Bob's run past the 256 allowed (qnoded.auth.MAX_DEFERRED_FRAMES).
        (MsgType.QBER_RESULT, True, "bob", ("mac", "missing-mac")),
    ],
    ids=["verify-as-sent", "prepared-renumbered", "qber-result-bulk-renumbered"],
)
async def test_a_replayed_frame_is_refused(
    link: Link, target: MsgType, renumber: bool, catcher: str, kinds: tuple[str, ...]
) -> None:
    """An earlier frame of this session sent again before the next of its kind."""
    replay = Replay(target, renumber)
    result = await strike(link, f"replay {target.name}", replay, catcher=catcher, kinds=kinds)
    assert replay.replayed is not None
    if replay.replayed.block_id is not None:  # an earlier block: its keys came once
        old = replay.replayed.block_id
        assert old not in result.touched
        assert all(old in link.watch.blocks(n) for n in NODES)


@pytest.mark.parametrize(
    ("swap", "catcher", "kind"),
    [
        (Swap("to_alice", MsgType.QBER_SAMPLE, MsgType.TAGS, renumber=False), "alice", "seq"),
        (Swap("to_bob", MsgType.QBER_RESULT, MsgType.BLOCK_START, renumber=True), "bob", "mac"),
    ],
    ids=["qber-sample-tags-as-sent", "qber-result-block-start-renumbered"],
)
async def test_two_swapped_frames_are_refused(
    link: Link, swap: Swap, catcher: str, kind: str
) -> None:
    name = f"reorder {swap.first.name}/{swap.second.name}"
    await strike(link, name, swap, catcher=catcher, kinds=(kind,))


@pytest.mark.parametrize(
    ("forgery", "catcher", "kind"),
    [(ForgedPrepared(), "alice", "mac"), (UntaggedCommit(), "bob", "missing-mac")],
    ids=["prepared-guessed-pad-random-tag", "commit-without-mac"],
)
async def test_an_injected_frame_is_refused(
    link: Link, forgery: Any, catcher: str, kind: str
) -> None:
    """A forged frame with valid framing and the next sequence number: a wrong tag
    on the pad the receiver expects, or no MAC on a frame that must carry one."""
    result = await strike(
        link, f"inject {type(forgery).__name__}", forgery, catcher=catcher, kinds=(kind,)
    )
    assert result.doomed  # the block it named never gives key


@pytest.mark.parametrize(
    ("drop", "catcher", "kind"),
    [
        (Drop(MsgType.VERIFY), "bob", "seq"),
        (Drop(MsgType.EC_ANSWER, nth=2, renumber=True), "bob", "mac"),
        (Drop(MsgType.COMMIT, renumber=True), "bob", "pad"),
    ],
    ids=["verify-as-sent", "ec-answer-bulk-renumbered", "commit-renumbered"],
)
async def test_a_dropped_frame_is_noticed(link: Link, drop: Drop, catcher: str, kind: str) -> None:
    """The receiver waits for the frame; the next one (a keepalive's answer at the
    latest) shows the gap: by its sequence number, or by its tag's pad index or
    transcript when the attacker closed the gap."""
    result = await strike(link, f"drop {drop.target.name}", drop, catcher=catcher, kinds=(kind,))
    assert drop.block is not None and drop.block in result.touched
    if drop.target is MsgType.COMMIT:
        # Alice had committed it: Bob's RECOVER in the next session commits it too.
        assert drop.block in link.mitm.committed and drop.block not in result.doomed
        await until(
            lambda: all(drop.block in link.watch.blocks(n) for n in NODES),
            10,
            lambda: "the block whose COMMIT was dropped was not delivered at both nodes",
        )
    else:
        assert drop.block in result.doomed


async def test_a_stalled_link_times_out_and_recovers(link: Link) -> None:
    """Nothing crosses (new connections neither) for longer than the peer timeout,
    from the first Cascade query of a block on; then the link flows again."""
    stall = Stall(MsgType.EC_QUERY, proxy=link.proxy)
    result = await strike(link, "stall", stall, catcher="alice")
    for n in NODES:  # each gave up on its silent peer: nothing else can tell it
        assert "TimeoutError" in result.peer_faults[n], result.peer_faults
    assert stall.block in result.touched


@pytest.mark.parametrize(
    ("target", "catcher"),
    [(MsgType.VERIFY, "bob"), (MsgType.PREPARED, "alice")],
    ids=["verify", "prepared"],
)
async def test_a_truncated_frame_ends_the_session(
    link: Link, target: MsgType, catcher: str
) -> None:
    """Half a frame, then the connection closes: the receiver names the truncation."""
    cut = Truncate(target)
    result = await strike(link, f"truncate {target.name}", cut, catcher=catcher)
    assert "truncated" in result.caught_by
    assert cut.block in result.doomed


async def test_after_every_attack_both_stores_agree(link: Link) -> None:
    """Both nodes stopped: the stores agree block by block, no key delivered twice,
    every key ID the same key wherever seen, no touched block in either store."""
    watch, nodes = link.watch, link.nodes
    await until(watch.same_keys, 30, lambda: "the nodes' keys differ")
    for role in ("bob", "alice"):
        await asyncio.to_thread(nodes.stop, role)

    def all_read() -> bool:  # every key a node's audit log says it delivered reached us
        return all(
            {k for e in nodes.log(n) if e.get("event") == "key delivered" for k in e["key_ids"]}
            <= set(watch.delivered[n])
            for n in NODES
        )

    await until(all_read, 15, lambda: "keys delivered never reached the consumer")
    result = account(link.workdir, watch.delivered, watch.digests, watch.material)
    print(f"\n{result.figures()}")
    for r in link.results:
        print(r.line())
    assert not result.problems, "\n".join(result.problems)
    for n in NODES:
        assert not link.doomed & set(result.stores[n].blocks), n
    assert len(result.stores["alice"].in_state("ready")) > len(link.results)
    assert not link.proxy.errors, link.proxy.errors
