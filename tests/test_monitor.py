"""``qnoded monitor``: the model fed real-shaped payloads, then the whole command
against a real Mosquitto, fed by qnoded's own ``TelemetryPublisher``, in the
clear and over mutual TLS with the production config and ACL."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pki import Pki, make_pki
from rich.console import Console

from qnoded import cli
from qnoded.broker import MosquittoBroker, TlsFiles, free_port
from qnoded.monitor import (
    MonitorState,
    Staleness,
    render,
    run_monitor,
    sparkline,
    topic_filters,
)
from qnoded.mqtt import MqttSettings, TelemetryPublisher

T = 5.0  # s, bound on anything that should happen at once
WIDTH = 220  # wide enough that rich wraps no cell
RAMP = [1000.0 * i for i in range(8)]  # a rate series whose sparkline is every block once
RAMP_SPARK = "▁▂▃▄▅▆▇█"


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def telemetry(node_id: str, role: str = "bob", **over: Any) -> dict[str, Any]:
    """A telemetry payload shaped like Node._telemetry_loop's (taken from a demo run)."""
    alice = role == "alice"
    doc: dict[str, Any] = {
        "node_id": node_id,
        "role": role,
        "protocol": "bb84",
        "state": "running",
        "tags_processed": 3753528,
        "batches": 810,
        "coincidences": 3719159,
        "sifted_bits": 1830221,
        "raw_key_bits": 916205,
        "qber_sample_bits": 733507,
        "qber_sample_errors": 12757,
        "qber": 0.0173917903987283,
        "locked": True,
        # Alice holds the clock model; Bob's figures are null.
        "offset_ps": -589028258 if alice else None,
        "drift_ppm": 4.999001472437885 if alice else None,
        "lock_offset_ps": -589036290 if alice else None,
        "lock_drift_ppm": 5.0 if alice else None,
        "dropped_batches": 0,
        "rejected_batches": 0,
        "multi_clicks": 0,
        "mqtt_dropped_telemetry": 0,
        "disclosed_bytes": {"HELLO": 105, "TAGS": 33879907},
        "blocks_accepted": 6,
        "blocks_rejected": 1,
        "block_reject_reasons": {"peer: estimation": 1},
        "secret_bits": 6912,
        "secret_keys": 27,
        "ec_leak_bits": 96955,
        "ec_efficiency": 1.057780105251369,
        "auth_key_bits_reserved": 0,
        "last_block": None,
        "stored_keys": 12,
        "stored_key_bits": 3072,
        "keys_delivered": 27,
        "keys_destroyed_undelivered": 0,
        "auth_key_bits_consumed": 22656,
        "auth_key_bits_available": 8249088,
        "auth_failures": {},
        "net_secret_bits": 6912,
        "tags_per_s": 57028.8,
        "coincidences_per_s": 277547.2,
        "sifted_bits_per_s": 138498.0,
        "raw_key_bits_per_s": 69060.3,
        "secret_key_bits_per_s": 1790.0,
        "time": time.time(),
        "interval_s": 1.0014583599999014,
        "qber_interval": 0.01709392773502844,
        "channel_rates_hz": {} if alice else {"0": 131600.0, "1": 133700.0},
        "detectors": []
        if alice
        else [
            {
                "name": f"det{ch}",
                "channel": ch,
                "latched": False,
                "temperature_k": 223.0,
                "bias_v": 70.0,
                "count_rate_hz": 131600.0,
            }
            for ch in range(4)
        ],
    }
    return doc | over


def status(node_id: str, state: str, detail: str = "", since: float = 1.7e9) -> dict[str, Any]:
    return {"node_id": node_id, "state": state, "since": since, "detail": detail}


def alarm(node_id: str, severity: str, code: str, message: str = "") -> dict[str, Any]:
    return {
        "node_id": node_id,
        "severity": severity,
        "code": code,
        "message": message or f"{code} on {node_id}",
        "time": time.time(),
    }


def frame(state: MonitorState) -> str:
    console = Console(file=io.StringIO(), width=WIDTH)
    console.print(render(state))
    out = console.file.getvalue()  # type: ignore[attr-defined]  # the StringIO given above
    assert isinstance(out, str)
    return out


def row(text: str, node_id: str) -> str:
    """The first line of the table row of ``node_id`` (cells on one line at WIDTH)."""
    return next(line for line in text.splitlines() if line.startswith(f"│ {node_id} "))


# -- the model -----------------------------------------------------------------------
def test_status_and_telemetry_become_a_row_with_history() -> None:
    state = MonitorState()
    assert state.update("qkd/v1/bob/status", status("bob", "running", "locked"))
    for rate in RAMP:
        assert state.update(
            "qkd/v1/bob/telemetry",
            telemetry("bob", sifted_bits_per_s=rate, secret_key_bits_per_s=rate / 100),
        )
    view = state.nodes["bob"]
    assert view.state == "running"
    assert list(view.sifted_history) == RAMP
    assert view.telemetry_count == len(RAMP)
    text = frame(state)
    line = row(text, "bob")
    assert "running" in line and "1.74 %" in line and "12 keys" in line
    assert "7 kb/s" in line and "70 b/s" in line  # the last sifted and secret rates
    assert text.count(RAMP_SPARK) == 2  # sifted and secret share the shape
    assert "det3 ok 132 kHz" in text
    assert "last 1.71 %" in text and "max 11.0 %" in text
    assert "no active alarms" in text


def test_a_narrow_terminal_gets_one_card_per_node() -> None:
    state = MonitorState()
    for node_id, role in (("alice", "alice"), ("bob", "bob")):
        state.update(f"qkd/v1/{node_id}/status", status(node_id, "running"))
        for rate in RAMP:
            state.update(
                f"qkd/v1/{node_id}/telemetry", telemetry(node_id, role, sifted_bits_per_s=rate)
            )
    console = Console(file=io.StringIO(), width=80)
    console.print(render(state))
    text = console.file.getvalue()  # type: ignore[attr-defined]  # the StringIO given above
    assert "┃ node" not in text  # no squeezed table...
    assert "╭─ alice" in text and "╭─ bob" in text  # ...but cards, side by side
    assert "│ state     running" in text and "│ detectors det0 ok 132 kHz" in text
    assert text.count(RAMP_SPARK) == 2
    assert max(len(line) for line in text.splitlines()) <= 80


def test_history_keeps_the_last_n_points() -> None:
    state = MonitorState(history=3)
    for rate in RAMP:
        state.update("qkd/v1/bob/telemetry", telemetry("bob", sifted_bits_per_s=rate))
    assert list(state.nodes["bob"].sifted_history) == RAMP[-3:]
    assert sparkline(state.nodes["bob"].sifted_history) == "▆▇█"


def test_sparkline_scales_from_zero_and_shows_gaps() -> None:
    assert sparkline(RAMP) == RAMP_SPARK
    assert sparkline([5.0, 5.0, 5.0]) == "███"  # steady is high, not flat at the bottom
    assert sparkline([0.0, 0.0]) == "▁▁"
    assert sparkline([4.0, None, 8.0]) == "▅ █"
    assert sparkline(RAMP, width=2) == "▇█"
    assert sparkline([]) == ""


def test_an_alarm_stays_active_until_its_cleared_alarm() -> None:
    state = MonitorState()
    state.update("qkd/v1/alice/alarms", alarm("alice", "warning", "peer-link", "peer gone"))
    state.update("qkd/v1/alice/alarms", alarm("alice", "critical", "qber-high", "QBER 0.2"))
    state.update("qkd/v1/alice/alarms", alarm("alice", "critical", "qber-high", "QBER 0.3"))
    active = state.active_alarms()
    assert [(n, a.code, a.count) for n, a in active] == [
        ("alice", "qber-high", 2),  # critical before warning
        ("alice", "peer-link", 1),
    ]
    assert active[0][1].message == "QBER 0.3"
    text = frame(state)
    assert "qber-high" in text and "QBER 0.3" in text and "peer gone" in text

    state.update("qkd/v1/alice/alarms", alarm("alice", "info", "qber-high-cleared"))
    state.update("qkd/v1/alice/alarms", alarm("alice", "info", "never-raised-cleared"))
    assert [a.code for _, a in state.active_alarms()] == ["peer-link"]
    assert state.nodes["alice"].cleared_alarms == 1
    text = frame(state)
    assert "qber-high" not in text and "peer-link" in text


def test_a_restarted_node_forgets_its_old_alarms_but_a_redelivered_status_does_not() -> None:
    state = MonitorState()
    state.update("qkd/v1/bob/status", status("bob", "starting", since=1.0))
    state.update("qkd/v1/bob/alarms", alarm("bob", "warning", "detector-det0"))
    # The broker re-sends the retained status on every (re)subscription.
    state.update("qkd/v1/bob/status", status("bob", "starting", since=1.0))
    assert [a.code for _, a in state.active_alarms()] == ["detector-det0"]
    state.update("qkd/v1/bob/status", status("bob", "starting", since=2.0))
    assert state.active_alarms() == []


def test_staleness_offline_and_waiting() -> None:
    clock = FakeClock()
    state = MonitorState(["alice", "bob", "carol"], clock=clock)
    state.update("qkd/v1/alice/telemetry", telemetry("alice", "alice", interval_s=2.0))
    state.update("qkd/v1/bob/telemetry", telemetry("bob"))
    state.update("qkd/v1/bob/status", status("bob", "offline", "connection lost (last will)"))
    assert state.staleness("alice") is Staleness.FRESH
    assert state.staleness("bob") is Staleness.OFFLINE
    assert state.staleness("carol") is Staleness.WAITING  # asked for, never heard
    clock.now += 5.9  # < 3 intervals of 2 s
    assert state.staleness("alice") is Staleness.FRESH
    clock.now += 0.2
    assert state.staleness("alice") is Staleness.STALE
    text = frame(state)
    assert "STALE 6 s ago" in row(text, "alice")
    assert "OFFLINE" in row(text, "bob") and "connection lost (last will)" in text
    assert "no telemetry" in row(text, "carol")
    # The node's own interval, once telemetry carries it, wins over the measured one.
    state.update("qkd/v1/alice/telemetry", telemetry("alice", "alice", telemetry_interval_s=10.0))
    clock.now += 29.0
    assert state.staleness("alice") is Staleness.FRESH


def test_qber_against_the_threshold_lock_and_detectors() -> None:
    state = MonitorState(qber_threshold=0.05)
    state.update("qkd/v1/alice/telemetry", telemetry("alice", "alice", qber=0.06))
    latched = telemetry("bob", qber=0.02, qber_alarm_threshold=0.011, locked=False)
    latched["detectors"][1]["latched"] = True
    latched["detectors"][2] = {"name": "det2", "error": "serial timeout"}
    state.update("qkd/v1/bob/telemetry", latched)
    assert state.qber_threshold_of("alice") == 0.05  # the monitor's, none in telemetry
    assert state.qber_threshold_of("bob") == 0.011  # the node's own wins
    text = frame(state)
    assert "6.00 %" in row(text, "alice") and "max 5.0 %" in text and "max 1.1 %" in text
    assert "-589.028 µs" in text and "+5.00 ppm" in text  # Alice's clock offset and drift
    assert "unlocked" in row(text, "bob")
    assert "det1 LATCHED" in text and "det2 ERROR serial timeout" in text


def test_unusable_messages_are_counted_not_fatal() -> None:
    state = MonitorState(["alice"])
    assert not state.update("qkd/v1/alice/status", b"\x00 not json".decode("latin-1"))
    assert not state.update("qkd/v1/alice/alarms", {"severity": "warning"})  # no code
    assert not state.update("qkd/v1/alice/status", {"node_id": "alice"})  # no state
    assert not state.update("qkd/v1/alice/keys/bob", {"key": "..."})
    assert state.ignored == 4
    assert "keys/bob" in state.last_ignored
    # A node not asked for is filtered out, silently.
    assert not state.update("qkd/v1/mallory/status", status("mallory", "running"))
    assert state.ignored == 4 and list(state.nodes) == ["alice"]
    assert "4 message(s) ignored" in frame(state)


def test_topic_filters() -> None:
    assert topic_filters([]) == [
        "qkd/v1/+/status",
        "qkd/v1/+/telemetry",
        "qkd/v1/+/alarms",
    ]
    assert topic_filters(["a", "b"])[3:] == [
        "qkd/v1/b/status",
        "qkd/v1/b/telemetry",
        "qkd/v1/b/alarms",
    ]


# -- the command line: bad options ---------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--broker", "localhost"], "'localhost' is not HOST:PORT"),
        (["--broker", "host:99999"], "'host:99999' is not HOST:PORT"),
        (["--broker", "h:1", "a/b"], "'a/b' is not a node id"),
        (["--once", "-1"], "expected a positive number of seconds"),
    ],
)
def test_bad_arguments_exit_2_naming_the_value(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["monitor", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_tls_files_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    missing = tmp_path / "ca.crt"
    assert cli.main(["monitor", "--ca", str(missing), "--once", "1"]) == 2
    assert f"--ca {missing}: no such file" in capsys.readouterr().err
    assert cli.main(["monitor", "--key", str(missing), "--once", "1"]) == 2
    assert "--key needs --cert" in capsys.readouterr().err


def test_unreachable_broker_is_a_message_not_a_traceback(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    port = free_port()  # nothing listens there
    argv = ["monitor", "--broker", f"127.0.0.1:{port}", "--once", "1", "--connect-timeout", "1"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert f"cannot reach the MQTT broker 127.0.0.1:{port} within 1 s" in err
    assert "Connection refused" in err and "is the broker running" in err
    assert "Traceback" not in err


# -- against a real broker ------------------------------------------------------------
def ids(request: pytest.FixtureRequest, *names: str) -> list[str]:
    """Node ids of the test's own: retained status must not leak between tests."""
    tag = zlib.crc32(f"{request.node.name}-{os.getpid()}".encode())
    return [f"{name}-{tag:08x}" for name in names]


class WatchedState(MonitorState):
    """The model with an event set on every change, so a test waits for one, not a time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.changed = asyncio.Event()

    def update(self, topic: str, payload: object) -> bool:
        used = super().update(topic, payload)
        self.changed.set()
        return used

    def connection_up(self) -> None:
        super().connection_up()
        self.changed.set()


async def until(state: WatchedState, condition: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(T):
            while not condition():
                state.changed.clear()
                await state.changed.wait()
    except TimeoutError:
        raise AssertionError(f"not within {T} s: {what}") from None


@pytest.mark.asyncio
async def test_two_nodes_alarms_and_a_cleared_alarm(
    mqtt_broker: tuple[str, int], request: pytest.FixtureRequest
) -> None:
    alice_id, bob_id = ids(request, "alice", "bob")
    settings = MqttSettings(*mqtt_broker)
    console = Console(file=io.StringIO(), width=WIDTH)
    state = MonitorState([alice_id, bob_id], broker="test")
    ready = asyncio.Event()
    async with (
        TelemetryPublisher(settings, alice_id) as alice,
        TelemetryPublisher(settings, bob_id) as bob,
    ):
        await alice.set_status("running")
        await bob.set_status("degraded", "qber-high: QBER above threshold")
        for pub in (alice, bob):
            await asyncio.wait_for(pub.status_published.wait(), T)
        monitor = asyncio.create_task(
            run_monitor(
                settings, [alice_id, bob_id], console, once_after_s=2.0, state=state, ready=ready
            )
        )
        await asyncio.wait_for(ready.wait(), T)
        for i, rate in enumerate(RAMP):
            alice.publish_telemetry(telemetry(alice_id, "alice", sifted_bits_per_s=rate))
            bob.publish_telemetry(telemetry(bob_id, qber=0.025 + i / 1000, sifted_bits_per_s=rate))
            await asyncio.sleep(0.02)  # QoS 0 into a queue of 16: keep it from overflowing
        alice.raise_alarm("critical", "detector-latched", "det1 latched at 13:02")
        bob.raise_alarm("critical", "qber-high", "QBER 0.0320 above threshold 0.0300")
        bob.raise_alarm("info", "qber-high-cleared", "QBER back below threshold")
        for pub in (alice, bob):
            await asyncio.wait_for(pub.idle.wait(), T)
        await asyncio.wait_for(monitor, T)
    assert alice.dropped_telemetry == bob.dropped_telemetry == 0
    text = console.file.getvalue()  # type: ignore[attr-defined]  # the StringIO given above
    assert "running" in row(text, alice_id) and "degraded" in row(text, bob_id)
    assert "3.20 %" in row(text, bob_id)  # the last QBER bob sent
    assert text.count(RAMP_SPARK) == 2  # both nodes' sifted rate over the 8 points
    assert "detector-latched" in text and "det1 latched at 13:02" in text
    assert state.nodes[bob_id].cleared_alarms == 1  # seen, then cleared...
    assert "QBER 0.0320 above" not in text  # ...so no longer shown


@pytest.mark.asyncio
async def test_the_command_prints_one_frame(
    mqtt_broker: tuple[str, int],
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    restore_logging: None,
) -> None:
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    alice_id, bob_id = ids(request, "alice", "bob")
    host, port = mqtt_broker
    settings = MqttSettings(host, port)
    async with (
        TelemetryPublisher(settings, alice_id) as alice,
        TelemetryPublisher(settings, bob_id) as bob,
    ):
        await alice.set_status("running")
        await bob.set_status("locking", "waiting for peer")
        argv = ["monitor", "--broker", f"{host}:{port}", "--once", "1.5", alice_id, bob_id]
        async with asyncio.TaskGroup() as tg:
            command = tg.create_task(asyncio.to_thread(cli.main, argv))
            feeder = tg.create_task(feed({alice_id: alice, bob_id: bob}))
            assert await command == 0
            feeder.cancel()
    text = capsys.readouterr().out
    assert "running" in row(text, alice_id) and "locking" in row(text, bob_id)
    assert "waiting for peer" in text
    assert "1.74 %" in row(text, alice_id)
    assert "▁▂▃" in text  # the feeder's ramp, however much of it the monitor saw
    assert "detector-latched" in text


async def feed(pubs: dict[str, TelemetryPublisher]) -> None:
    """Telemetry every 0.1 s (a repeating ramp of sifted rates) until cancelled; Alice
    also repeats an alarm, since one raised before the monitor subscribed is not seen."""
    i = 0
    while True:
        for node_id, pub in pubs.items():
            role = "alice" if node_id.startswith("alice") else "bob"
            pub.publish_telemetry(telemetry(node_id, role, sifted_bits_per_s=1000.0 * (i % 8)))
            if role == "alice":
                pub.raise_alarm("critical", "detector-latched", "det1 latched")
        i += 1
        await asyncio.sleep(0.1)


@pytest.mark.asyncio
async def test_a_broker_restart_does_not_stop_the_live_view(
    fresh_broker: MosquittoBroker, request: pytest.FixtureRequest
) -> None:
    (node,) = ids(request, "alice")
    settings = MqttSettings(*fresh_broker.address)
    console = Console(file=io.StringIO(), width=WIDTH, force_terminal=True)
    state = WatchedState()
    async with TelemetryPublisher(settings, node) as pub:
        await pub.set_status("running")
        live = asyncio.create_task(run_monitor(settings, [], console, 0.05, state=state))
        await until(state, lambda: node in state.nodes, "the retained status seen")
        await asyncio.to_thread(fresh_broker.restart)
        await until(state, lambda: state.connections >= 2, "the monitor reconnected")
        await pub.wait_connected()
        await pub.set_status("degraded", "after the restart")
        await until(
            state,
            lambda: state.nodes[node].state == "degraded",
            "the new status through the monitor",
        )
        await asyncio.sleep(0.2)  # a few redraws
        live.cancel()
        with pytest.raises(asyncio.CancelledError):
            await live
    assert state.reconnects == 1 and state.connected
    assert "after the restart" in console.file.getvalue()  # type: ignore[attr-defined]


def test_sigterm_ends_the_live_view_cleanly_with_its_last_frame(
    mqtt_broker: tuple[str, int], request: pytest.FixtureRequest
) -> None:
    host, port = mqtt_broker
    (node,) = ids(request, "carol")
    with subprocess.Popen(
        [sys.executable, "-m", "qnoded", "monitor", "--broker", f"{host}:{port}", node],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": str(WIDTH)},
    ) as proc:
        # Outside the process nothing tells when it has connected (the live
        # view draws only at the end on a pipe): give it ample time.
        time.sleep(2.0)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=T)
    assert proc.returncode == 0, err
    assert "connected" in out and "no telemetry" in row(out, node)
    assert "Traceback" not in err


# -- over mutual TLS, the production broker ---------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), ["alice", "monitor", "mallory"])


@pytest.fixture(scope="module")
def tls_broker(pki: Pki) -> Iterator[MosquittoBroker]:
    with MosquittoBroker(tls=TlsFiles(pki.ca_cert, pki.server.cert, pki.server.key)) as b:
        yield b


def tls_argv(broker: MosquittoBroker, pki: Pki, who: str | None) -> list[str]:
    argv = ["monitor", "--broker", f"{broker.host}:{broker.port}", "--ca", str(pki.ca_cert)]
    if who is not None:
        argv += ["--cert", str(pki.client(who).cert), "--key", str(pki.client(who).key)]
    return argv


def alice_settings(broker: MosquittoBroker, pki: Pki) -> MqttSettings:
    """Node alice's side: its own certificate, which the ACL lets write alice's topics."""
    return MqttSettings(
        broker.host,
        broker.port,
        tls_ca=str(pki.ca_cert),
        tls_cert=str(pki.client("alice").cert),
        tls_key=str(pki.client("alice").key),
    )


@pytest.mark.asyncio
async def test_over_tls_with_the_monitor_certificate(
    tls_broker: MosquittoBroker,
    pki: Pki,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    restore_logging: None,
) -> None:
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    async with TelemetryPublisher(alice_settings(tls_broker, pki), "alice") as alice:
        await alice.set_status("running")
        await asyncio.wait_for(alice.status_published.wait(), T)
        argv = [*tls_argv(tls_broker, pki, "monitor"), "--once", "1.5", "alice"]
        async with asyncio.TaskGroup() as tg:
            command = tg.create_task(asyncio.to_thread(cli.main, argv))
            feeder = tg.create_task(feed({"alice": alice}))
            assert await command == 0
            feeder.cancel()
    text = capsys.readouterr().out
    assert "running" in row(text, "alice") and "1.74 %" in row(text, "alice")
    assert "detector-latched" in text
    assert "connected" in text


@pytest.mark.asyncio
async def test_over_tls_an_identity_the_acl_does_not_name_sees_nothing(
    tls_broker: MosquittoBroker,
    pki: Pki,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    restore_logging: None,
) -> None:
    """The dashboard of a certificate without read rights connects, and stays empty."""
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    async with TelemetryPublisher(alice_settings(tls_broker, pki), "alice") as alice:
        await alice.set_status("running")  # retained: a reader allowed would get it
        await asyncio.wait_for(alice.status_published.wait(), T)
    argv = [*tls_argv(tls_broker, pki, "mallory"), "--once", "0.5"]
    assert await asyncio.to_thread(cli.main, argv) == 0
    text = capsys.readouterr().out
    assert "connected" in text and "no node heard from yet" in text


def test_a_key_that_is_not_the_certificates_exits_2(
    tls_broker: MosquittoBroker,
    pki: Pki,
    capsys: pytest.CaptureFixture[str],
    restore_logging: None,
) -> None:
    argv = [*tls_argv(tls_broker, pki, "monitor"), "--once", "1"]
    argv[argv.index("--key") + 1] = str(pki.client("alice").key)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "TLS files" in err and "do not load" in err and "KEY_VALUES_MISMATCH" in err


def test_over_tls_without_a_certificate_fails_clearly(
    tls_broker: MosquittoBroker,
    pki: Pki,
    capsys: pytest.CaptureFixture[str],
    restore_logging: None,
) -> None:
    argv = [*tls_argv(tls_broker, pki, None), "--once", "1", "--connect-timeout", "2"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "cannot reach the MQTT broker" in err
    assert "CERTIFICATE_REQUIRED" in err
    assert "the broker requires a client certificate: pass --cert and --key" in err
    assert "Traceback" not in err
