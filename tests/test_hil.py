"""Hardware in the loop: `qnoded run` as systemd runs it, against instruments on the wire.

Bob's node drives a streaming time tagger over TCP and a SCPI detector controller
on a serial line; Alice runs the simulated source.  Bob runs with
``NOTIFY_SOCKET`` pointed at a socket this test reads, as under systemd, and what
an operator would see is read over MQTT.

``--hil-target emulators`` (the default, in CI): the instruments are the
emulators in ``hil/`` (the tagger fed by the simulated physics, the detector on a
pty), which can be told to misbehave.  ``--hil-target bench``: Bob's config comes
from ``--hil-bob-config`` (a node config naming the real ports, see
``hil/README.md``); without one the tests skip, saying so.  The fault drills need
the emulators (on a bench, a person pulls the cable).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_scpi_detector import SerialDetectorEmulator
from test_tcp_tagger import EmulatorProcess, _bb84_args, scpi

from qnoded.broker import free_port
from qnoded.demo import demo_psk, link_parameters, node_config, spawn_node, stop_node
from qnoded.mqtt import Subscriber

pytestmark = pytest.mark.slow

RECOVERY_S = 5.0  # a device back: key generation must be back within this


class Rig:
    """Alice (simulated source), Bob on the wire, the notify socket, the broker."""

    def __init__(self, tmp: Path, broker: tuple[str, int], bob_devices: str) -> None:
        self.tmp, self.broker = tmp, broker
        args = _bb84_args()
        sim = link_parameters(args)
        addr = f"{broker[0]}:{broker[1]}"
        port = free_port()
        demo_psk(tmp)
        self.bob_sim = node_config("bob", args, addr, port, tmp, sim)
        (tmp / "bob-sim.toml").write_text(self.bob_sim)  # the physics the emulator runs
        (tmp / "bob.toml").write_text(self.bob_sim.split("[simulation]")[0] + bob_devices)
        (tmp / "alice.toml").write_text(node_config("alice", args, addr, port, tmp, sim))
        self.sock_path = tmp / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        self.sock.setblocking(False)
        self.notes: list[tuple[float, str]] = []
        self.procs: dict[str, Any] = {}

    def start(self) -> None:
        self.procs["alice"] = spawn_node(self.tmp / "alice.toml", self.tmp / "alice.log")
        env = {"NOTIFY_SOCKET": str(self.sock_path), "WATCHDOG_USEC": "2000000"}
        self.procs["bob"] = spawn_node(
            self.tmp / "bob.toml", self.tmp / "bob.log", dict(os.environ) | env
        )

    def notifications(self) -> list[str]:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                break
            self.notes += [(time.monotonic(), line) for line in data.decode().splitlines()]
        return [n for _, n in self.notes]

    def log(self, role: str) -> list[dict[str, Any]]:
        out = []
        for line in (self.tmp / f"{role}.log").read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def stop(self) -> None:
        for role in ("bob", "alice"):
            proc = self.procs.get(role)
            if proc is not None and proc.poll() is None:
                stop_node(proc, timeout_s=10)
        self.sock.close()


Seen = dict[str, list[tuple[float, dict[str, Any]]]]


async def watch_bob(
    rig: Rig,
    until: Callable[[Seen], bool],
    *,
    fault: Callable[[], Awaitable[None]] | None = None,
    ready: Callable[[Seen], bool] | None = None,
    timeout: float = 40.0,
) -> tuple[Seen, float]:
    """Bob's status, telemetry and alarms (with arrival times) until ``until(seen)``;
    with ``fault``, it is injected once Bob makes key (alarms are not retained, so
    the subscription must be up before).  Returns what was seen and the fault's time."""
    seen: Seen = {"status": [], "telemetry": [], "alarms": []}
    t_fault = 0.0
    async with Subscriber(rig.broker, *(f"qkd/v1/bob/{leaf}" for leaf in seen)) as sub:
        async with asyncio.timeout(timeout):
            async for msg in sub:
                seen[msg.topic.rsplit("/", 1)[1]].append((time.monotonic(), msg.payload))
                rig.notifications()
                for name, proc in rig.procs.items():
                    assert proc.poll() is None, f"{name} exited: {proc.returncode}"
                if fault is not None and not t_fault and (ready or sifting)(seen):
                    t_fault = time.monotonic()
                    await fault()
                elif (fault is None or t_fault) and until(seen):
                    return seen, t_fault
    raise AssertionError("unreachable")


def sifting(seen: Seen, after: float = 0.0) -> bool:
    tele = [t for at, t in seen["telemetry"] if at > after and t.get("qber") is not None]
    return len(tele) >= 2 and tele[-1]["sifted_bits"] > tele[-2]["sifted_bits"] > 0


@pytest.fixture
def rig(
    request: pytest.FixtureRequest, tmp_path: Path, mqtt_broker: tuple[str, int]
) -> Iterator[tuple[Rig, EmulatorProcess | None, SerialDetectorEmulator | None]]:
    target = request.config.getoption("--hil-target")
    if target == "bench":
        config = request.config.getoption("--hil-bob-config")
        if not config:
            pytest.skip("--hil-target bench needs --hil-bob-config BOB.toml (hil/README.md)")
        devices = Path(config).read_text().split("[devices", 1)
        r = Rig(tmp_path, mqtt_broker, "[devices" + devices[1])
        r.start()
        yield r, None, None
        r.stop()
        return
    det = SerialDetectorEmulator(tmp_path / "ttyDET0", "--seed", "3").start()
    r = Rig(tmp_path, mqtt_broker, "")
    tagger = EmulatorProcess(tmp_path / "bob-sim.toml")
    bob = r.bob_sim.split("[simulation]")[0] + (
        f'[devices.tagger]\ndriver = "tcp-tagger"\nhost = "{tagger.host}"\n'
        f"port = {tagger.port}\nbatch_duration_ps = 10000000000\n"
        f'[devices.det0]\ndriver = "scpi-detector"\nport = "{det.link}"\nchannel = 0\n'
    )
    (tmp_path / "bob.toml").write_text(bob)
    try:
        r.start()
        yield r, tagger, det
    finally:
        r.stop()
        tagger.stop()
        det.stop()


def test_ready_after_lock_then_watchdog_then_key_on_real_wires(rig: Any) -> None:
    r, _, _ = rig
    seen, _ = asyncio.run(watch_bob(r, sifting))
    notes = r.notifications()
    assert "READY=1" in notes, notes
    ready = notes.index("READY=1")
    assert any(n.startswith("STATUS=locking") for n in notes[:ready])  # not ready before lock
    assert notes[ready + 1].startswith("STATUS=running")
    tele = seen["telemetry"][-1][1]
    assert tele["locked"] and 0 < tele["qber"] < 0.05
    assert tele["dropped_batches"] == 0 and tele["rejected_batches"] == 0
    (det,) = [d for d in tele["detectors"] if d["name"] == "det0"]
    assert det["count_rate_hz"] > 0 and det["photocurrent_a"] > 0 and not det["latched"]
    time.sleep(2.5)
    assert r.notifications().count("WATCHDOG=1") >= 2  # pings while the pipeline moves


def test_tagger_unplugged_degrades_and_recovers_within_5_s(rig: Any) -> None:
    r, tagger, _ = rig
    if tagger is None:
        pytest.skip("the drill needs the emulator (on a bench: pull the cable)")

    def back(seen: Seen) -> bool:
        cleared = [at for at, a in seen["alarms"] if a["code"] == "tagger-cleared"]
        return bool(cleared) and sifting(seen, after=cleared[0])

    async def unplug() -> None:
        # Every connection aborted, as an unplugged cable; the emulator itself stays
        # up.  Our own control connection goes too, so no SYST:ERR? after it.
        await scpi(tagger, "EMU:FAULT drop")

    seen, t_fault = asyncio.run(watch_bob(r, back, fault=unplug))
    raised = [(at, a) for at, a in seen["alarms"] if a["code"] == "tagger"]
    cleared = [(at, a) for at, a in seen["alarms"] if a["code"] == "tagger-cleared"]
    assert raised and cleared
    assert "tcp-tagger" in raised[0][1]["message"] or "tagger" in raised[0][1]["message"]
    assert cleared[0][0] - t_fault < RECOVERY_S
    states = [s["state"] for _, s in seen["status"]]
    assert "degraded" in states and states[-1] == "running"
    # One line down and one up, not a line per retry.
    faults = [e for e in r.log("bob") if e.get("event") == "fault" and e.get("fault") == "tagger"]
    clears = [e for e in r.log("bob") if e.get("event") == "fault cleared"]
    assert len(faults) == 1 and len([c for c in clears if c.get("fault") == "tagger"]) == 1
    # The tagger's clock ran on: the same time base, no re-lock, no batch out of order.
    assert not [e for e in r.log("alice") if "time base changed" in str(e.get("event"))]
    tele = seen["telemetry"][-1][1]
    assert tele["rejected_batches"] == 0


def test_blinding_on_the_wire_raises_the_alarm(rig: Any) -> None:
    r, _, det = rig
    if det is None:
        pytest.skip("the drill needs the emulator")

    async def blind() -> None:
        det.control("EMU:FAULT BLIND")

    seen, _ = asyncio.run(
        watch_bob(
            r,
            lambda s: any(a["code"] == "detector-blinding" for _, a in s["alarms"]),
            fault=blind,
            # The watch learns the detector's healthy baseline first (3 intervals).
            ready=lambda s: sifting(s) and len(s["telemetry"]) >= 5,
        )
    )
    alarm = next(a for _, a in seen["alarms"] if a["code"] == "detector-blinding")
    assert alarm["severity"] == "critical" and "det0" in alarm["message"]
    assert any(e.get("event") == "key generation halted" for e in r.log("bob"))


def test_detector_garbage_is_an_alarm_naming_device_and_command(rig: Any) -> None:
    r, _, det = rig
    if det is None:
        pytest.skip("the drill needs the emulator")

    async def garbage() -> None:
        det.control("EMU:FAULT GARBAGE 1")  # one answer of line noise

    def cleared(seen: Seen) -> bool:
        return any(a["code"] == "detector-det0-cleared" for _, a in seen["alarms"])

    seen, _ = asyncio.run(watch_bob(r, cleared, fault=garbage))
    alarm = next(a for _, a in seen["alarms"] if a["code"] == "detector-det0")
    assert "det0" in alarm["message"] and "MEAS" in alarm["message"]  # device and command
    assert r.procs["bob"].poll() is None  # no crash: the next reading cleared it
    assert sifting(seen)
