"""MQTT publishing of status, telemetry and alarms, with reconnect and bounded buffers.

Topics under ``qkd/v1/<node_id>/``: ``status`` (retained; the last will sets
``offline``), ``telemetry`` (QoS 0), ``alarms`` (QoS 1).  The publisher is an
async context manager owning a ``TaskGroup`` with one named connection loop in
aiomqtt's reconnect pattern: connect, publish until an ``MqttError``, sleep a
jittered capped backoff, connect again, republish the status.

Publishing never blocks the pipeline: telemetry goes into a small queue and is
dropped (and counted) when the broker is down or slow; alarms wait in a
bounded deque and are flushed on reconnect.  Nothing grows without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import ssl
import time
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import aiomqtt
import structlog

log = structlog.get_logger("qnoded.mqtt")

TELEMETRY_QUEUE = 16
ALARM_BUFFER = 256
PUBLISH_TIMEOUT_S = 5.0
SEVERITIES = ("info", "warning", "critical")


@dataclass(frozen=True, slots=True)
class MqttSettings:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    keepalive_s: int = 10
    client_id: str | None = None

    def tls_context(self) -> ssl.SSLContext | None:
        if not (self.tls_ca or self.tls_cert):
            return None
        ctx = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        return ctx


def topic(node_id: str, leaf: str) -> str:
    return f"qkd/v1/{node_id}/{leaf}"


class TelemetryPublisher:
    """A node's MQTT voice; see the module docstring."""

    def __init__(self, settings: MqttSettings, node_id: str) -> None:
        self.settings = settings
        self.node_id = node_id
        self._status: dict[str, Any] = {
            "node_id": node_id,
            "state": "starting",
            "since": time.time(),
            "detail": "",
        }
        self._telemetry: asyncio.Queue[bytes] = asyncio.Queue(maxsize=TELEMETRY_QUEUE)
        self._alarms: deque[bytes] = deque(maxlen=ALARM_BUFFER)
        self._wake = asyncio.Event()
        self._status_dirty = True
        self._client: aiomqtt.Client | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._stack = contextlib.AsyncExitStack()
        self._closing = False
        self.connected = False
        self.reconnects = 0
        self.dropped_telemetry = 0
        self.dropped_alarms = 0
        self.published = 0

    # -- API for the node (never blocks on the network) ---------------------------
    async def set_status(self, state: str, detail: str = "") -> None:
        self._status = {
            "node_id": self.node_id,
            "state": state,
            "since": time.time(),
            "detail": detail,
        }
        self._status_dirty = True
        self._wake.set()

    def publish_telemetry(self, payload: dict[str, Any]) -> None:
        data = json.dumps(payload, default=str).encode()
        if not self.connected:
            self.dropped_telemetry += 1
            return
        try:
            self._telemetry.put_nowait(data)
        except asyncio.QueueFull:
            self.dropped_telemetry += 1
        self._wake.set()

    def raise_alarm(self, severity: str, code: str, message: str) -> None:
        if severity not in SEVERITIES:
            raise ValueError(f"alarm severity {severity!r}: use one of {SEVERITIES}")
        if len(self._alarms) == self._alarms.maxlen:
            self.dropped_alarms += 1
        self._alarms.append(
            json.dumps(
                {
                    "node_id": self.node_id,
                    "severity": severity,
                    "code": code,
                    "message": message,
                    "time": time.time(),
                }
            ).encode()
        )
        self._wake.set()

    # -- lifecycle ----------------------------------------------------------------
    async def __aenter__(self) -> Self:
        await self._stack.__aenter__()
        self._tg = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._task = self._tg.create_task(self._connection_loop(), name="mqtt-connection")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Say "stopped" on the way out, if the broker is there to hear it: the
        # connection loop flushes what is queued, publishes it and returns.
        self._status = self._status | {"state": "stopped", "since": time.time()}
        self._status_dirty = True
        self._closing = True
        self._wake.set()
        if self.connected:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await asyncio.shield(self._task)
        self._task.cancel()
        await self._stack.__aexit__(None, None, None)

    def _client_for(self) -> aiomqtt.Client:
        s = self.settings
        will = aiomqtt.Will(
            topic(self.node_id, "status"),
            json.dumps({"node_id": self.node_id, "state": "offline"}).encode(),
            qos=1,
            retain=True,
        )
        return aiomqtt.Client(
            s.host,
            s.port,
            identifier=s.client_id or f"qnoded-{self.node_id}",
            username=s.username,
            password=s.password,
            will=will,
            keepalive=s.keepalive_s,
            tls_context=s.tls_context(),
            protocol=aiomqtt.ProtocolVersion.V5,
            timeout=PUBLISH_TIMEOUT_S,
        )

    async def _connection_loop(self) -> None:
        attempt = 0
        while True:
            try:
                async with self._client_for() as client:
                    self._client = client
                    self.connected = True
                    if attempt or self.reconnects:
                        log.info("mqtt up", broker=f"{self.settings.host}:{self.settings.port}")
                    attempt = 0
                    self._status_dirty = True
                    await self._publish_loop(client)
                    return  # closing: everything is published
            except aiomqtt.MqttError as exc:
                if self.connected or attempt == 0:
                    log.warning(
                        "mqtt down",
                        broker=f"{self.settings.host}:{self.settings.port}",
                        error=str(exc),
                    )
                if self.connected:
                    self.reconnects += 1
                self.connected = False
                self._client = None
                # Telemetry from before the outage is stale: drop it, counted.
                while not self._telemetry.empty():
                    self._telemetry.get_nowait()
                    self.dropped_telemetry += 1
                attempt += 1
                await asyncio.sleep(random.uniform(0, min(5.0, 0.2 * 1.5**attempt)))

    async def _flush(self, client: aiomqtt.Client) -> None:
        if self._status_dirty:
            self._status_dirty = False
            await client.publish(
                topic(self.node_id, "status"), json.dumps(self._status).encode(), qos=1, retain=True
            )
        while self._alarms:
            await client.publish(topic(self.node_id, "alarms"), self._alarms[0], qos=1)
            self._alarms.popleft()
        while not self._telemetry.empty():
            await client.publish(
                topic(self.node_id, "telemetry"), self._telemetry.get_nowait(), qos=0
            )
            self.published += 1

    async def _publish_loop(self, client: aiomqtt.Client) -> None:
        while True:
            await self._flush(client)
            if self._closing:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                # Wake at least once a second so a dead broker is noticed.
                async with asyncio.timeout(1.0):
                    await self._wake.wait()
