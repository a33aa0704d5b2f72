"""The MQTT publisher against a real Mosquitto started from the project's config."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from qnoded import broker as broker_mod
from qnoded.broker import BrokerError, MosquittoBroker, find_mosquitto, free_port
from qnoded.mqtt import (
    TELEMETRY_QUEUE,
    MqttSettings,
    Subscriber,
    TelemetryPublisher,
    collect,
)

T = 5.0
ROOT = Path(__file__).resolve().parents[1]


def node_id(request: pytest.FixtureRequest) -> str:
    """A node id of the test's own, so retained messages of one test don't leak into another."""
    return f"t-{request.node.name.replace('[', '-').rstrip(']')}-{os.getpid()}"


# -- broker helper -------------------------------------------------------------
def test_find_mosquitto_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker_mod.shutil, "which", lambda _: None)
    monkeypatch.setattr(broker_mod, "_FALLBACK_PATHS", ("/nonexistent/mosquitto",))
    with pytest.raises(BrokerError, match="apt-get install -y mosquitto"):
        find_mosquitto()


def test_broker_start_failure_quotes_its_log() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        broker = MosquittoBroker(port=s.getsockname()[1])
        with pytest.raises(BrokerError, match=r"(?s)exited with code.*Address already in use"):
            broker.start()
        broker.stop()


def test_broker_config_and_restart_on_same_port() -> None:
    with MosquittoBroker() as b:
        port = b.port
        conf = (b._dir / "mosquitto.conf").read_text()  # type: ignore[operator]
        assert f"listener {port} 127.0.0.1" in conf
        assert "allow_anonymous true" in conf and "persistence false" in conf
        assert ("user root" in conf) == (os.geteuid() == 0)
        b.restart()
        assert b.running and b.port == port
        socket.create_connection(b.address, timeout=T).close()
    assert not b.running


@pytest.mark.asyncio
async def test_broker_async_context_manager() -> None:
    async with MosquittoBroker() as b:
        assert b.running
    assert not b.running


# -- publisher -----------------------------------------------------------------
@pytest.mark.asyncio
async def test_status_retained_for_late_subscriber(
    mqtt_broker: tuple[str, int], request: pytest.FixtureRequest
) -> None:
    nid = node_id(request)
    async with TelemetryPublisher(MqttSettings(*mqtt_broker), nid) as pub:
        await pub.set_status("running", "locked")
        await asyncio.wait_for(pub.status_published.wait(), T)
        # Subscribed only now: the retained status is still delivered.
        (msg,) = await collect(*mqtt_broker, f"qkd/v1/{nid}/status", count=1, timeout=T)
        assert msg.retain
        assert msg.payload["state"] == "running" and msg.payload["detail"] == "locked"
        assert set(msg.payload) == {"node_id", "state", "since", "detail"}
        assert msg.payload["node_id"] == nid
        with pytest.raises(ValueError, match="state"):
            await pub.set_status("confused")
    # Clean exit: retained "stopped", not the will's "offline".
    (msg,) = await collect(*mqtt_broker, f"qkd/v1/{nid}/status", count=1, timeout=T)
    assert msg.payload["state"] == "stopped"


@pytest.mark.asyncio
async def test_alarms_and_telemetry_rate(
    mqtt_broker: tuple[str, int], request: pytest.FixtureRequest
) -> None:
    nid = node_id(request)
    n = 100
    async with (
        Subscriber(mqtt_broker, f"qkd/v1/{nid}/telemetry", f"qkd/v1/{nid}/alarms") as sub,
        TelemetryPublisher(MqttSettings(*mqtt_broker), nid) as pub,
    ):
        await asyncio.wait_for(pub.wait_connected(), T)
        pub.raise_alarm("critical", "qber-high", "QBER 12% above 11%")
        with pytest.raises(ValueError, match="severity"):
            pub.raise_alarm("fatal", "x", "y")
        t0 = time.monotonic()
        for i in range(n):  # 500 Hz, well above the node's rate
            pub.publish_telemetry({"i": i, "qber": 0.02})
            await asyncio.sleep(0.002)
        got: list[int] = []
        alarms = []
        async with asyncio.timeout(T):
            async for msg in sub:
                if msg.topic.endswith("/alarms"):
                    alarms.append(msg.payload)
                else:
                    got.append(msg.payload["i"])
                if len(got) == n and alarms:
                    break
        rate_hz = n / (time.monotonic() - t0)
        assert got == list(range(n))  # none lost, in order
        assert pub.dropped_telemetry == 0 and pub.published == n
        assert rate_hz > 100
        (alarm,) = alarms
        assert alarm["severity"] == "critical" and alarm["code"] == "qber-high"
        assert alarm["message"] == "QBER 12% above 11%" and alarm["time"] > 0


@pytest.mark.asyncio
async def test_burst_is_bounded_and_counted(
    mqtt_broker: tuple[str, int], request: pytest.FixtureRequest
) -> None:
    async with TelemetryPublisher(MqttSettings(*mqtt_broker), node_id(request)) as pub:
        await asyncio.wait_for(pub.wait_connected(), T)
        for i in range(1000):  # no await: the pipeline never blocks on MQTT
            pub.publish_telemetry({"i": i})
            assert pub.pending_telemetry <= TELEMETRY_QUEUE
        assert pub.dropped_telemetry == 1000 - TELEMETRY_QUEUE
        await asyncio.wait_for(pub.idle.wait(), T)
        assert pub.published == TELEMETRY_QUEUE


LAST_WILL_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from qnoded.mqtt import MqttSettings, TelemetryPublisher

    async def main() -> None:
        host, port, nid = sys.argv[1], int(sys.argv[2]), sys.argv[3]
        async with TelemetryPublisher(MqttSettings(host, port, keepalive_s=5), nid) as pub:
            await pub.set_status("running", "child")
            await pub.status_published.wait()
            print("ready", flush=True)
            await asyncio.Event().wait()

    asyncio.run(main())
    """
)


@pytest.mark.asyncio
async def test_last_will_offline_when_process_dies(
    mqtt_broker: tuple[str, int], request: pytest.FixtureRequest
) -> None:
    nid = node_id(request)
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        LAST_WILL_CHILD,
        mqtt_broker[0],
        str(mqtt_broker[1]),
        nid,
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert line.strip() == b"ready"
        async with Subscriber(mqtt_broker, f"qkd/v1/{nid}/status") as sub:
            async with asyncio.timeout(T):
                first = await anext(sub)
            assert first.retain and first.payload["state"] == "running"
            proc.send_signal(signal.SIGKILL)  # no goodbye: the broker sends the will
            async with asyncio.timeout(T):
                will = await anext(sub)
        assert will.payload["state"] == "offline" and will.payload["node_id"] == nid
        # ...and it is retained for whoever looks later.
        (late,) = await collect(*mqtt_broker, f"qkd/v1/{nid}/status", count=1, timeout=T)
        assert late.retain and late.payload["state"] == "offline"
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


@pytest.mark.asyncio
async def test_broker_outage_reconnect_and_republish(
    fresh_broker: MosquittoBroker, request: pytest.FixtureRequest
) -> None:
    nid = node_id(request)
    addr = fresh_broker.address
    with capture_logs() as logs:
        async with TelemetryPublisher(MqttSettings(*addr), nid) as pub:
            await pub.set_status("running", "locked")
            await asyncio.wait_for(pub.status_published.wait(), T)

            await asyncio.to_thread(fresh_broker.kill)
            await asyncio.wait_for(pub.wait_connected(False), T)  # noticed while idle
            for i in range(50):
                pub.publish_telemetry({"i": i})
            pub.raise_alarm("warning", "mqtt-test", "raised during the outage")
            assert pub.dropped_telemetry >= 50  # dropped and counted, not queued
            assert pub.pending_telemetry == 0 and pub.pending_alarms == 1
            # The outage itself: nothing to wait on but the clock.  The first two
            # backoffs are at most 0.3 s and 0.45 s, so at least two attempts fail.
            await asyncio.sleep(1.0)
            assert pub.failed_connects >= 2

            await asyncio.to_thread(fresh_broker.start)  # same port, empty broker
            t0 = time.monotonic()
            await asyncio.wait_for(pub.wait_connected(), 8)
            recovery_s = time.monotonic() - t0
            await asyncio.wait_for(pub.idle.wait(), T)
            assert recovery_s < 6  # backoff is capped at 5 s
            assert pub.reconnects == 1
            assert pub.pending_alarms == 0 and pub.dropped_alarms == 0  # flushed, PUBACKed
            # The restarted broker had no retained status: the publisher put it back.
            (msg,) = await collect(*addr, f"qkd/v1/{nid}/status", count=1, timeout=T)
            assert msg.payload["state"] == "running"
    events = [e["event"] for e in logs if e["event"].startswith("mqtt")]
    assert events == ["mqtt down", "mqtt up"]  # once each, not once per retry


@pytest.mark.asyncio
async def test_publisher_starts_before_broker(request: pytest.FixtureRequest) -> None:
    port = free_port()
    nid = node_id(request)
    async with TelemetryPublisher(MqttSettings("127.0.0.1", port), nid) as pub:
        await pub.set_status("locking")
        pub.raise_alarm("info", "early", "before the broker")
        pub.publish_telemetry({"x": 1})
        assert pub.dropped_telemetry == 1 and not pub.connected
        async with MosquittoBroker(port=port) as broker:
            await asyncio.wait_for(pub.wait_connected(), 8)
            await asyncio.wait_for(pub.idle.wait(), T)
            assert pub.pending_alarms == 0
            (msg,) = await collect(*broker.address, f"qkd/v1/{nid}/status", count=1, timeout=T)
            assert msg.payload["state"] == "locking"
            # Broker stops cleanly while the publisher is up: it must not hang on exit.
    assert not pub.connected


def test_settings_tls_params() -> None:
    assert MqttSettings("h", 1).tls_params() is None
    tls = MqttSettings("h", 1, tls_ca="/ca.pem", tls_cert="/c.pem", tls_key="/k.pem").tls_params()
    assert tls is not None and tls.ca_certs == "/ca.pem" and tls.keyfile == "/k.pem"


@pytest.mark.asyncio
async def test_key_delivery_cut_mid_batch_destroys_only_the_key_in_flight(
    mqtt_broker: tuple[str, int], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A publication that fails on the 3rd key of a batch: the two acknowledged keys are
    delivered, the 3rd may have reached the broker and is destroyed (at most once, its ID
    in the audit log), the rest of the batch never left and is delivered later."""
    import uuid

    import aiomqtt

    from qnoded.keystore import KeyStore

    nid = node_id(request)
    store = KeyStore(tmp_path / "keys.db")
    ids = store.add_block(uuid.uuid4(), "bob", [os.urandom(32) for _ in range(20)], "ready", {})
    calls = 0

    async with (
        Subscriber(mqtt_broker, f"qkd/v1/{nid}/keys/bob") as sub,
        TelemetryPublisher(MqttSettings(*mqtt_broker), nid) as pub,
    ):
        real = pub._publish

        async def flaky(client: aiomqtt.Client, leaf: str, payload: bytes, **kw: object) -> None:
            nonlocal calls
            if leaf.startswith("keys/"):
                calls += 1
                if calls == 3:
                    raise aiomqtt.MqttError("connection lost (injected)")
            await real(client, leaf, payload, **kw)  # type: ignore[arg-type]

        pub._publish = flaky  # type: ignore[method-assign]
        with capture_logs() as logs:
            pub.attach_keys(store, "bob")
            got: list[str] = []
            async with asyncio.timeout(10):
                async for msg in sub:
                    got.append(msg.payload["key_ID"])
                    if len(got) == 19:
                        break
    assert got == [str(k) for k in ids[:2] + ids[3:]]  # in order, the 3rd never arrived
    assert pub.keys_destroyed == 1 and pub.keys_delivered == 19
    destroyed = [e for e in logs if e["event"] == "key destroyed undelivered"]
    assert [e["key_ids"] for e in destroyed] == [[str(ids[2])]]
    assert store.ready_count() == (0, 0) and store.take(100) == []
    store.close()
