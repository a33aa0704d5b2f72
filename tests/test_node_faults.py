"""Bad input at the node: a peer that sends garbage, a driver that raises or sends bad
batches, a signal to stop.  Each must give a clear logged error, an alarm and a
degraded-then-recovering state; never a crash.

The nodes run as `qnoded run` processes.  The faulty driver is a third-party
package made on the fly (a module plus a ``.dist-info`` with an entry point),
found through the same entry-point group as ours.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple, Self

import aiomqtt
import pytest

from qnoded.broker import free_port
from qnoded.demo import (
    add_arguments,
    demo_psk,
    link_parameters,
    node_config,
    spawn_node,
    stop_node,
)
from qnoded.keystore import key_ids
from qnoded.mqtt import Subscriber, collect

pytestmark = pytest.mark.slow

FAULTY = '''
"""A tagger that misbehaves on purpose, for the fault tests."""
import asyncio

import numpy as np
from qnoded.contracts import DeviceKind, TagBatch
from qnoded_drivers.sim.tagger import SimTimeTagger


class FaultyTagger(SimTimeTagger):
    kind = DeviceKind.TIME_TAGGER

    def __init__(self, name, options, context):
        options = dict(options)
        self.fault = options.pop("fault")
        self.at = options.pop("at", 30)
        self.stall_s = float(options.pop("stall_s", 0.0))
        super().__init__(name, options, context)
        self.failed = False

    async def stream(self):
        async for batch in super().stream():
            if batch.seq == self.at and not self.failed:
                self.failed = True
                if self.fault == "raise":
                    raise RuntimeError("USB transfer failed (injected)")
                if self.fault == "stall":  # a hung USB read: nothing fails, nothing moves
                    await asyncio.sleep(self.stall_s)
                if self.fault == "restart":  # power-cycled: the next stream counts from 0
                    self._cursor = None
                    raise RuntimeError("device reset (injected)")
                if self.fault == "unsorted" and len(batch) > 2:
                    t = batch.timestamps_ps.copy()
                    t[0], t[1] = t[1] + 1, t[0]
                    batch = TagBatch(batch.seq, batch.start_ps, batch.stop_ps, t, batch.channels)
                if self.fault == "dtype":
                    batch = TagBatch(batch.seq, batch.start_ps, batch.stop_ps,
                                     batch.timestamps_ps.astype(np.float64), batch.channels)
            yield batch
'''


def _plugin(tmp: Path) -> Path:
    site = tmp / "plugin"
    site.mkdir()
    (site / "qnoded_faulty.py").write_text(FAULTY)
    info = site / "qnoded_faulty-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qnoded-faulty\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[qnoded.drivers]\nfaulty-tagger = qnoded_faulty:FaultyTagger\n"
    )
    return site


def _args(**kw: Any) -> argparse.Namespace:
    """The demo's own defaults (so a new demo option needs no change here), then ours."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = vars(parser.parse_args([])) | {
        "protocol": "bbm92",
        "distance_km": 10.0,
        "seed": 3,
        "clock_offset_ps": 250_000_000,
        "drift_ppm": 2.0,
    }
    return argparse.Namespace(**(base | kw))


class Nodes:
    """Alice and Bob processes with their configs and logs in one folder."""

    def __init__(
        self,
        tmp: Path,
        broker: tuple[str, int],
        args: argparse.Namespace,
        bob_tagger: dict[str, Any] | None = None,
    ) -> None:
        self.tmp = tmp
        self.peer_port = free_port()
        self.env = dict(os.environ)
        sim = link_parameters(args)
        broker_s = f"{broker[0]}:{broker[1]}"
        for role in ("alice", "bob"):
            text = node_config(role, args, broker_s, self.peer_port, tmp, sim)
            if role == "bob" and bob_tagger is not None:
                body = "".join(f"{k} = {json.dumps(v)}\n" for k, v in bob_tagger.items())
                text = text.replace(
                    '[devices.tagger]\ndriver = "sim-tagger"\n', f"[devices.tagger]\n{body}"
                )
            (tmp / f"{role}.toml").write_text(text)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, role: str) -> None:
        self.procs[role] = spawn_node(self.tmp / f"{role}.toml", self.tmp / f"{role}.log", self.env)

    def stop(self, role: str) -> float:
        """SIGTERM; returns how long the node took to exit."""
        return stop_node(self.procs[role], timeout_s=15)

    def log(self, role: str) -> list[dict[str, Any]]:
        out = []
        for line in (self.tmp / f"{role}.log").read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": line})
        return out

    def kill_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def nodes_factory(tmp_path: Path, mqtt_broker: tuple[str, int]) -> Iterator[Any]:
    made: list[Nodes] = []

    def make(**kw: Any) -> Nodes:
        n = Nodes(tmp_path, mqtt_broker, **kw)
        made.append(n)
        return n

    yield make
    for n in made:
        n.kill_all()


async def watch(
    broker: tuple[str, int], node: str, until: Any, timeout: float = 30.0
) -> dict[str, list[dict[str, Any]]]:
    """Collect a node's telemetry, alarms and status until ``until(seen)`` holds."""
    seen: dict[str, list[dict[str, Any]]] = {"telemetry": [], "alarms": [], "status": []}
    async with Subscriber(broker, *(f"qkd/v1/{node}/{leaf}" for leaf in seen)) as sub:
        async with asyncio.timeout(timeout):
            async for msg in sub:
                seen[msg.topic.rsplit("/", 1)[1]].append(msg.payload)
                if until(seen):
                    break
    return seen


def test_garbage_peer_is_rejected_and_node_recovers(
    nodes_factory: Any, mqtt_broker: tuple[str, int]
) -> None:
    nodes = nodes_factory(args=_args())
    nodes.start("alice")
    deadline = time.monotonic() + 20
    while True:  # wait for Alice's listener
        try:
            with socket.create_connection(("127.0.0.1", nodes.peer_port), timeout=0.5) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: qnoded\r\n\r\n" + os.urandom(200))
                s.settimeout(5)
                assert s.recv(100) == b""  # Alice hangs up on garbage
            break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline, "alice never listened"
            time.sleep(0.2)
    nodes.start("bob")
    seen = asyncio.run(
        watch(
            mqtt_broker,
            "alice",
            lambda s: bool(s["telemetry"]) and s["telemetry"][-1]["sifted_bits"] > 1000,
        )
    )
    tele = seen["telemetry"]
    assert tele[-1]["locked"]
    assert nodes.procs["alice"].poll() is None
    rejected = [e for e in nodes.log("alice") if e.get("event") == "peer rejected"]
    assert rejected
    assert "bad magic" in rejected[0]["error"]
    assert nodes.stop("bob") < 5
    assert nodes.stop("alice") < 5
    assert nodes.procs["alice"].returncode == 0


@pytest.mark.parametrize(
    ("fault", "words"),
    [
        ("raise", "USB transfer failed (injected)"),
        ("unsorted", "not sorted ascending at index 1"),
        ("dtype", "must be a 1-d int64 array, got float64"),
    ],
)
def test_driver_faults_degrade_then_recover(
    fault: str, words: str, nodes_factory: Any, mqtt_broker: tuple[str, int], tmp_path: Path
) -> None:
    site = _plugin(tmp_path)
    nodes = nodes_factory(
        args=_args(), bob_tagger={"driver": "faulty-tagger", "fault": fault, "at": 150}
    )
    nodes.env["PYTHONPATH"] = os.pathsep.join([str(site), nodes.env.get("PYTHONPATH", "")])
    nodes.start("alice")
    nodes.start("bob")

    def recovered(seen: dict[str, list[dict[str, Any]]]) -> bool:
        cleared = any(a["code"].endswith("-cleared") for a in seen["alarms"])
        counted = bool(seen["telemetry"]) and (
            fault == "raise" or seen["telemetry"][-1]["rejected_batches"] > 0
        )
        return cleared and counted and seen["status"][-1]["state"] == "running"

    seen = asyncio.run(watch(mqtt_broker, "bob", recovered))
    fault_alarm = next(a for a in seen["alarms"] if a["severity"] != "info")
    assert words in fault_alarm["message"]
    states = [s["state"] for s in seen["status"]]
    assert "degraded" in states
    assert states[-1] == "running"
    tele = seen["telemetry"]
    # one log line down, one up; the node never crashed
    errors = [e for e in nodes.log("bob") if e.get("level") == "error"]
    assert len(errors) == 1
    assert words in errors[0]["error"]
    assert nodes.procs["bob"].poll() is None
    if fault != "raise":
        assert tele[-1]["rejected_batches"] == 1
        assert tele[-1]["dropped_batches"] >= 1  # the rejected batch is a gap
    assert nodes.stop("bob") < 5
    assert nodes.stop("alice") < 5


def test_systemd_notify_ready_after_lock_then_watchdog_and_stopping(
    nodes_factory: Any, mqtt_broker: tuple[str, int], tmp_path: Path
) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.5)
    try:
        nodes = nodes_factory(args=_args())
        nodes.start("alice")
        nodes.env |= {"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000"}
        nodes.start("bob")
        messages: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and messages.count("WATCHDOG=1") < 3:
            try:
                messages += sock.recv(4096).decode().splitlines()
            except TimeoutError:
                continue
        assert "READY=1" in messages
        ready = messages.index("READY=1")
        # STATUS lines an operator reads in `systemctl status`, locking before ready
        assert any(m.startswith("STATUS=locking") for m in messages[:ready])
        assert messages[ready + 1].startswith("STATUS=running")
        assert messages.count("WATCHDOG=1") >= 3
        assert nodes.stop("bob") < 5
        tail: list[str] = []
        with contextlib.suppress(TimeoutError):
            while True:
                tail += sock.recv(4096).decode().splitlines()
        assert "STOPPING=1" in tail
    finally:
        sock.close()


def test_a_tagger_whose_clock_restarted_is_a_new_time_base(
    nodes_factory: Any, mqtt_broker: tuple[str, int], tmp_path: Path
) -> None:
    """A reopened stream that counts from zero again: the node says so once, takes it
    as a new time base (Bob's TAGS carry a new epoch, Alice's model is void) and its
    batches are accepted, not refused as out of order."""
    site = _plugin(tmp_path)
    nodes = nodes_factory(
        args=_args(), bob_tagger={"driver": "faulty-tagger", "fault": "restart", "at": 150}
    )
    nodes.env["PYTHONPATH"] = os.pathsep.join([str(site), nodes.env.get("PYTHONPATH", "")])
    nodes.start("alice")
    nodes.start("bob")

    def restarted(seen: dict[str, list[dict[str, Any]]]) -> bool:
        cleared = any(a["code"] == "tagger-cleared" for a in seen["alarms"])
        return cleared and bool(seen["telemetry"]) and seen["telemetry"][-1]["batches"] > 0

    seen = asyncio.run(watch(mqtt_broker, "bob", restarted))
    log = nodes.log("bob")
    restarts = [e for e in log if e.get("event", "").startswith("time tagger clock restarted")]
    assert len(restarts) == 1 and restarts[0]["first_start_ps"] < restarts[0]["last_stop_ps"]
    assert not [a for a in seen["alarms"] if a["code"] == "bad-batch"]  # not refused
    assert seen["telemetry"][-1]["rejected_batches"] == 0
    assert nodes.procs["bob"].poll() is None


def test_watchdog_pings_stop_while_the_pipeline_is_stalled(
    nodes_factory: Any, mqtt_broker: tuple[str, int], tmp_path: Path
) -> None:
    """A tagger read that hangs (no error, no batches): the event loop runs on, but
    WATCHDOG=1 stops, so systemd's watchdog would restart the node; pings resume
    once batches move again."""
    site = _plugin(tmp_path)
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    try:
        nodes = nodes_factory(
            args=_args(),
            bob_tagger={"driver": "faulty-tagger", "fault": "stall", "at": 200, "stall_s": 11},
        )
        nodes.env["PYTHONPATH"] = os.pathsep.join([str(site), nodes.env.get("PYTHONPATH", "")])
        nodes.start("alice")
        nodes.env |= {"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000"}
        nodes.start("bob")
        pings: list[float] = []
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            try:
                lines = sock.recv(4096).decode().splitlines()
            except TimeoutError:
                continue
            pings += [time.monotonic()] * lines.count("WATCHDOG=1")
            gaps = [b - a for a, b in itertools.pairwise(pings)]
            if gaps and max(gaps) > 5 and gaps[-1] < 1:
                break  # the stall showed, and pings came back
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert gaps, "no watchdog pings at all"
        # Healthy, pings come every 0.5 s (half of WATCHDOG_USEC).  The stall is
        # 11 s; pings stop once no batch moved for 5 s, so one gap of about 6 s.
        stall = max(gaps)
        assert 4.5 < stall < 9, gaps
        before, after = gaps[: gaps.index(stall)], gaps[gaps.index(stall) + 1 :]
        assert before and max(before) < 1.5 and after and max(after) < 1.5
        assert nodes.procs["bob"].poll() is None  # nothing crashed: only the pings stopped
    finally:
        sock.close()


class Block(NamedTuple):
    state: str
    keys: int
    created: float  # time.time() at the node


def stored_blocks(db: Path) -> dict[str, Block]:
    """A node's key store, read-only while the node writes it: block ID -> its row.
    Delivered keys leave the store, their block's row stays, and the key IDs follow
    from it (``qnoded.keystore.key_ids``).  Empty until the node has made its store."""
    if not db.exists():
        return {}
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
        try:
            rows = con.execute("SELECT block_id, state, n_keys, created FROM blocks").fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
            return {}  # the node is creating it right now
    return {bid: Block(state, n, created) for bid, state, n, created in rows}


def ready_blocks(db: Path) -> dict[str, int]:
    """Committed blocks -> their key counts: equal at two nodes means the same key IDs."""
    return {bid: b.keys for bid, b in stored_blocks(db).items() if b.state == "ready"}


def key_id_set(blocks: dict[str, int]) -> set[str]:
    return {str(k) for bid, n in blocks.items() for k in key_ids(uuid.UUID(bid), n)}


class KeyTap:
    """A key consumer on every node's ``keys/<peer>`` topic, on a thread of its own (it
    spans the test's phases), subscribing again after a broker outage: each node's key
    messages in arrival order, ``keys[node]``."""

    def __init__(self, broker: tuple[str, int]) -> None:
        self.broker = broker
        self.keys: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.subscribed = threading.Event()
        self._stop: Any = None  # the reader's cancel, once it runs
        self._thread = threading.Thread(target=self._main, name="key-tap", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        assert self.subscribed.wait(10), "the key tap did not subscribe within 10 s"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._stop()
        self._thread.join(10)

    def _main(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            asyncio.run(self._read())

    async def _read(self) -> None:
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        assert task is not None
        self._stop = lambda: loop.call_soon_threadsafe(task.cancel)
        while True:
            with contextlib.suppress(aiomqtt.MqttError):  # the broker is away: again
                async with Subscriber(self.broker, "qkd/v1/+/keys/+") as sub:
                    self.subscribed.set()
                    async for msg in sub:
                        self.keys[msg.topic.split("/")[2]].append(msg.payload)
            await asyncio.sleep(0.2)

    def delivered(self, node: str) -> dict[str, str]:
        """Key ID -> key (Base64) for each key seen from ``node``; each at most once."""
        docs = list(self.keys[node])
        twice = [k for k, n in Counter(d["key_ID"] for d in docs).items() if n > 1]
        assert not twice, f"{node} delivered {len(twice)} key(s) twice: {twice[:3]}"
        return {d["key_ID"]: d["key"] for d in docs}


def audit_delivered(nodes: Nodes, role: str) -> list[str]:
    """The key IDs a node's audit trail says it delivered, in order."""
    return [i for e in nodes.log(role) if e.get("event") == "key delivered" for i in e["key_ids"]]


def test_broker_outage_keys_go_on_and_status_returns(tmp_path: Path) -> None:
    from qnoded.broker import MosquittoBroker

    with MosquittoBroker() as broker, KeyTap(broker.address) as tap:
        addr = (broker.host, broker.port)
        nodes = Nodes(tmp_path, addr, _args(block_bits=20_000))  # about a block a second
        try:
            nodes.start("alice")
            nodes.start("bob")
            before = asyncio.run(
                watch(
                    addr,
                    "bob",
                    lambda s: bool(s["telemetry"]) and s["telemetry"][-1]["sifted_bits"] > 0,
                )
            )
            sifted_before = before["telemetry"][-1]["sifted_bits"]
            stores = {role: tmp_path / role / "keys.db" for role in ("alice", "bob")}
            outage = [time.time()]
            broker.kill()
            time.sleep(3)  # the outage itself: nothing to wait on but the clock
            # ... and on until a block was made without the broker (key goes on).
            deadline = time.monotonic() + 30
            while all(b.created < outage[0] for b in stored_blocks(stores["alice"]).values()):
                assert time.monotonic() < deadline, "no block made while the broker was down"
                time.sleep(0.2)
            broker.start()
            outage.append(time.time())
            t0 = time.monotonic()
            after = asyncio.run(
                watch(addr, "bob", lambda s: bool(s["telemetry"]) and bool(s["status"]), timeout=15)
            )
            recovery_s = time.monotonic() - t0
            print(f"\nbroker back -> status and telemetry from bob: {recovery_s:.2f} s")
            # Retained status is back (republished on reconnect), within the
            # backoff cap (3 s) plus one telemetry interval.
            assert after["status"][-1]["state"] == "running"
            assert recovery_s < 5
            tele = after["telemetry"][-1]
            assert tele["sifted_bits"] > sifted_before  # key generation went on
            assert tele["mqtt_dropped_telemetry"] >= 2  # dropped and counted, not queued
            assert nodes.procs["bob"].poll() is None
            assert nodes.procs["alice"].poll() is None
            downs = [e for e in nodes.log("bob") if e.get("event") == "mqtt down"]
            ups = [e for e in nodes.log("bob") if e.get("event") == "mqtt up"]
            assert len(downs) == 1  # one line down, one up: not one per retry
            assert len(ups) == 1

            # Key made in the outage waited in the stores and went out once the broker
            # was back; both stores hold the same blocks, so the same key IDs (polled: for
            # a moment Bob holds pending a block Alice has committed).
            in_outage = {
                bid: b.keys
                for bid, b in stored_blocks(stores["alice"]).items()
                if outage[0] <= b.created <= outage[1]
            }
            deadline = time.monotonic() + 20
            while True:
                alice, bob = (ready_blocks(stores[role]) for role in ("alice", "bob"))
                sent = {role: set(audit_delivered(nodes, role)) for role in ("alice", "bob")}
                ids = [{d["key_ID"] for d in list(tap.keys[r])} for r in ("alice", "bob")]
                seen = ids[0] & ids[1]  # some key on both topics, as a consumer gets them
                if alice == bob and seen and all(key_id_set(in_outage) <= s for s in sent.values()):
                    break
                assert time.monotonic() < deadline, "the key stores do not agree"
                time.sleep(0.2)
            for role in ("alice", "bob"):
                # Each key out at most once, the outage and its reconnect included, and
                # only keys of this node's blocks (its store read last: it only grows).
                audit, tapped = audit_delivered(nodes, role), set(tap.delivered(role))
                made = key_id_set(ready_blocks(stores[role]))
                assert len(audit) == len(set(audit)), f"{role} delivered a key twice"
                assert set(audit) <= made and tapped <= made
            # Both nodes' status is retained again: a dashboard that connects now reads it.
            status = asyncio.run(collect(*addr, "qkd/v1/+/status", count=2, timeout=5))
            assert {m.topic: (m.retain, m.payload["state"]) for m in status} == {
                f"qkd/v1/{role}/status": (True, "running") for role in ("alice", "bob")
            }
            a, b = tap.delivered("alice"), tap.delivered("bob")
            both = a.keys() & b.keys()
            assert both, "no key seen on both key topics"
            differ = [k for k in both if a[k] != b[k]]  # IDs only: no key bytes in a report
            assert not differ, f"{len(differ)} key(s) differ between the nodes: {differ[:3]}"
        finally:
            nodes.kill_all()


def test_peer_killed_alarm_then_relock(nodes_factory: Any, mqtt_broker: tuple[str, int]) -> None:
    nodes = nodes_factory(args=_args())
    nodes.start("alice")
    nodes.start("bob")

    async def scenario() -> tuple[dict[str, Any], float]:
        async with Subscriber(mqtt_broker, "qkd/v1/alice/#") as sub:
            phase, t_back = "up", 0.0
            async with asyncio.timeout(40):
                async for msg in sub:
                    data = msg.payload
                    leaf = msg.topic.rsplit("/", 1)[1]
                    if phase == "up" and leaf == "status" and data["state"] == "running":
                        nodes.procs["bob"].kill()  # no goodbye: the link just drops
                        nodes.procs["bob"].wait()
                        phase = "down"
                    elif phase == "down" and leaf == "alarms":
                        alarm = data
                        nodes.start("bob")  # a new Bob: a new clock, Alice locks afresh
                        phase, t_back = "back", time.monotonic()
                    elif phase == "back" and leaf == "status" and data["state"] == "running":
                        return alarm, time.monotonic() - t_back
        raise AssertionError("unreachable")

    alarm, relock_s = asyncio.run(scenario())
    assert alarm["code"] == "peer"
    assert alarm["severity"] == "warning"
    assert relock_s < 10
    assert nodes.procs["alice"].poll() is None
    assert nodes.stop("bob") < 5
    assert nodes.stop("alice") < 5


def test_quiet_link_stays_up_and_recording_replays(
    tmp_path: Path, mqtt_broker: tuple[str, int]
) -> None:
    """A recording (replay-tagger) runs through the pipeline; when it ends the
    taggers go quiet, and keepalives hold the peer link up past its timeout."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import numpy as np
    from bench_pipeline import make_streams

    alice_b, bob_b = make_streams(1.0, 2e5)
    port = free_port()
    procs = []
    try:
        for role, batches in (("alice", alice_b), ("bob", bob_b)):
            rec = tmp_path / f"{role}.npz"
            np.savez(
                rec,
                timestamps_ps=np.concatenate([b.timestamps_ps for b in batches]),
                channels=np.concatenate([b.channels for b in batches]),
                batch_duration_ps=np.array([10_000_000_000]),
            )
            peer = (
                f'listen = "127.0.0.1:{port}"'
                if role == "alice"
                else f'connect = "127.0.0.1:{port}"'
            )
            cfg = tmp_path / f"{role}.toml"
            cfg.write_text(
                f'[node]\nid = "{role}"\nrole = "{role}"\nprotocol = "bbm92"\n'
                f'[peer]\npeer_id = "{"bob" if role == "alice" else "alice"}"\n{peer}\n'
                "timeout_s = 1.0\n"
                f'[mqtt]\nbroker = "{mqtt_broker[0]}:{mqtt_broker[1]}"\n'
                f"telemetry_interval_s = 0.5\n[timing]\ncoincidence_window_ps = 500\n"
                f'[state]\ndirectory = "{tmp_path / role}"\n'
                f'[auth]\npsk_file = "{demo_psk(tmp_path)}"\n'
                f'[devices.tagger]\ndriver = "replay-tagger"\nfile = "{rec}"\n'
            )
            procs.append(spawn_node(cfg, tmp_path / f"{role}.log"))
        seen = asyncio.run(
            watch(
                mqtt_broker,
                "alice",
                lambda s: bool(s["telemetry"]) and s["telemetry"][-1]["sifted_bits"] > 0,
            )
        )
        time.sleep(4)  # quiet: 4 s > 3 x timeout_s, the receive timeout
        later = asyncio.run(watch(mqtt_broker, "alice", lambda s: len(s["telemetry"]) >= 2))
        assert later["telemetry"][-1]["state"] == "running"
        assert later["telemetry"][-1]["sifted_bits"] >= seen["telemetry"][-1]["sifted_bits"]
        assert later["telemetry"][-1]["qber"] is not None
        assert later["telemetry"][-1]["qber"] < 0.02
        for role in ("alice", "bob"):
            text = (tmp_path / f"{role}.log").read_text()
            assert '"level": "error"' not in text, text[-2000:]
    finally:
        for p in reversed(procs):
            stop_node(p, timeout_s=15)
