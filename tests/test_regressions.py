"""Regressions: inputs that once slipped past the peer decoder or the MQTT shutdown."""

from __future__ import annotations

import asyncio
import json
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from qnoded.broker import MosquittoBroker
from qnoded.mqtt import MqttSettings, TelemetryPublisher, topic
from qnoded.peer import FrameError, decode_arrays


def _one(name: bytes, code: int, shape: tuple[int, ...], data: bytes) -> bytes:
    return (
        b"\x01\x00" + bytes([len(name)]) + name + bytes([code, len(shape)])
        + struct.pack(f"<{len(shape)}Q", *shape) + data
    )  # fmt: skip


@pytest.mark.parametrize("shape", [(0, 2**63), (0, 2**64 - 1), (0, 2**62)])
def test_decode_arrays_zero_size_huge_dimension(shape: tuple[int, ...]) -> None:
    with pytest.raises(FrameError):
        decode_arrays(_one(b"x", 1, shape, b""))


@pytest.fixture(scope="module")
def broker() -> Iterator[tuple[str, int]]:
    with MosquittoBroker() as b:
        yield b.host, b.port


async def _retained_state(host: str, port: int, node_id: str) -> str:
    async with aiomqtt.Client(host, port) as c:
        await c.subscribe(topic(node_id, "status"), qos=1)
        async with asyncio.timeout(5):
            async for m in c.messages:
                assert m.retain
                return str(json.loads(m.payload)["state"])
    raise AssertionError("unreachable")


@pytest.mark.asyncio
async def test_exit_during_status_publish_still_says_stopped(broker: tuple[str, int]) -> None:
    node_id = f"race-{uuid.uuid4().hex[:8]}"
    async with TelemetryPublisher(MqttSettings(*broker), node_id) as pub:
        async with asyncio.timeout(5):
            await pub.wait_connected()
            await pub.idle.wait()
        await pub.set_status("running", "about to stop")
        await asyncio.sleep(0)  # the loop starts publishing "running" (QoS 1, PUBACK pending)
    assert await _retained_state(*broker, node_id) == "stopped"


@pytest.mark.asyncio
async def test_exit_when_idle_says_stopped(broker: tuple[str, int]) -> None:
    """Control: the same exit with nothing in flight works."""
    node_id = f"idle-{uuid.uuid4().hex[:8]}"
    async with TelemetryPublisher(MqttSettings(*broker), node_id) as pub:
        await pub.set_status("running")
        async with asyncio.timeout(5):
            await pub.wait_connected()
            await pub.status_published.wait()
            await pub.idle.wait()
    assert await _retained_state(*broker, node_id) == "stopped"


def test_notify_never_blocks_on_a_receiver_that_does_not_read(tmp_path: Path) -> None:
    """A NOTIFY_SOCKET nobody reads (its queue holds about 10 datagrams): sending
    went on blocking, which froze the daemon's event loop (found by a HIL drill
    whose test stopped reading for 8 s).  Now a message without room is dropped."""
    import socket
    import time

    from qnoded.notify import Notifier

    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        notifier = Notifier(str(path))
        t0 = time.monotonic()
        sent = [notifier.watchdog() for _ in range(200)]
        assert time.monotonic() - t0 < 1.0
        assert any(sent) and not all(sent)  # some queued, the rest dropped, none waited
        assert receiver.recv(64) == b"WATCHDOG=1"
