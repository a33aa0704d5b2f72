"""MQTT publishing of status, telemetry and alarms, with reconnect and bounded buffers.

Topics under ``qkd/v1/<node_id>/``:

- ``status``: retained JSON ``{"node_id", "state", "since", "detail"}``, state one
  of :data:`STATES`; the last will sets a retained ``"offline"``.
- ``telemetry``: JSON, QoS 0.
- ``alarms``: JSON ``{"node_id", "severity", "code", "message", "time"}``, QoS 1.
- ``keys/<peer_id>``: one message per key, QoS 1, never retained: JSON
  ``{"key_ID", "key" (Base64), "length_bits", "block_id", "node_id", "peer_id"}``.
  Keys come from the key store (:meth:`TelemetryPublisher.attach_keys`),
  ``KEY_BATCH`` in flight at once, and are deleted there once the broker has
  acknowledged them; a key whose publication failed half-way may have reached
  the broker, so it is destroyed, never sent again (at most once).  Only
  authorised clients may read the topic (the production broker's ACL,
  ``qnoded/data/mosquitto-acl.conf``).
- ``cmd/<name>``: operator commands, read (QoS 1) once the node attaches a
  handler (:meth:`TelemetryPublisher.attach_commands`); each is answered on
  ``cmd/<name>/result`` (QoS 1, not retained), see :mod:`qnoded.commands`.

:class:`TelemetryPublisher` is an async context manager owning a ``TaskGroup``
with one named connection loop in aiomqtt 2.x's reconnect pattern: connect,
subscribe to the commands, publish until an ``MqttError``, sleep a jittered
capped backoff, connect again, subscribe again and republish the status.
Publishing never blocks the pipeline: telemetry goes into a small queue and is
dropped (and counted) while the broker is down or slow; alarms and command
results wait in bounded deques and are flushed on reconnect.  Nothing grows
without bound.

:class:`Subscriber` and :func:`collect` read JSON messages back (tests, the
demo's live view).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import aiomqtt
import structlog

from qnoded.backoff import backoff_s
from qnoded.commands import Incoming
from qnoded.durable import StorageError

if TYPE_CHECKING:
    from collections.abc import Callable

    from qnoded.keystore import Key, KeyStore

log = structlog.get_logger("qnoded.mqtt")
audit = structlog.get_logger("qnoded.audit")

TELEMETRY_QUEUE = 16
ALARM_BUFFER = 256
# Command results waiting for the broker; commands run one at a time, so this
# only fills if the broker stays away while refusals of a burst pile up.
RESULT_BUFFER = 64
# Keys taken from the store per round: a failed publication destroys at most these.
KEY_BATCH = 16
# Batches per pass of the publish loop; between passes the rest of the queue goes out.
KEY_BATCHES_PER_FLUSH = 4
PUBLISH_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 2.0
BACKOFF_BASE_S = 0.2
BACKOFF_CAP_S = 3.0  # a restarted broker hears from the node within 3 s (recovery < 5 s)
SEVERITIES = ("info", "warning", "critical")
STATES = ("starting", "locking", "running", "paused", "degraded", "stopped")


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """Where and how to reach the broker.  TLS is on when ``tls_ca`` or ``tls_cert`` is set."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    keepalive_s: int = 10
    client_id: str | None = None

    def tls_params(self) -> aiomqtt.TLSParameters | None:
        if not (self.tls_ca or self.tls_cert):
            return None
        return aiomqtt.TLSParameters(
            ca_certs=self.tls_ca, certfile=self.tls_cert, keyfile=self.tls_key
        )

    def client(
        self, *, identifier: str | None = None, will: aiomqtt.Will | None = None
    ) -> aiomqtt.Client:
        """A fresh aiomqtt client (MQTT v5) for these settings; reusable, not reentrant."""
        client = aiomqtt.Client(
            self.host,
            self.port,
            identifier=identifier or self.client_id,
            username=self.username,
            password=self.password,
            will=will,
            keepalive=self.keepalive_s,
            tls_params=self.tls_params(),
            protocol=aiomqtt.ProtocolVersion.V5,
            timeout=PUBLISH_TIMEOUT_S,
        )
        # aiomqtt warns (a log line per publish) past 10 publishes awaiting their
        # acknowledgement; a key batch has KEY_BATCH in flight on purpose.
        client.pending_calls_threshold = 2 * KEY_BATCH
        return client


def topic(node_id: str, leaf: str) -> str:
    return f"qkd/v1/{node_id}/{leaf}"


class TelemetryPublisher:
    """A node's MQTT voice; see the module docstring.

    Counters: ``connected``, ``reconnects`` (connections after the first),
    ``published`` (telemetry messages sent), ``dropped_telemetry``,
    ``dropped_alarms``, ``dropped_results``.
    """

    def __init__(self, settings: MqttSettings, node_id: str) -> None:
        self.settings = settings
        self.node_id = node_id
        self._status: dict[str, Any] = self._status_doc("starting", "")
        self._telemetry: asyncio.Queue[bytes] = asyncio.Queue(maxsize=TELEMETRY_QUEUE)
        self._alarms: deque[bytes] = deque(maxlen=ALARM_BUFFER)
        self._wake = asyncio.Event()
        self._status_dirty = True
        self._stack: contextlib.AsyncExitStack | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._ever_connected = False
        self.connected = False
        self._up = asyncio.Event()
        self._down = asyncio.Event()
        self._down.set()
        self.idle = asyncio.Event()  # connected and nothing left to publish
        self.failed_connects = 0
        self.reconnects = 0
        self.dropped_telemetry = 0
        self.dropped_alarms = 0
        self.published = 0
        self.status_published = asyncio.Event()  # set each time the status reaches the broker
        self._keys: KeyStore | None = None
        self._store_refusing = False
        self._key_peer = ""
        self.keys_delivered = 0
        self.keys_destroyed = 0  # taken for delivery, publication not confirmed
        self._on_command: Callable[[Incoming], None] | None = None
        self._cmd_subscribed = False  # on the current connection
        self._results: deque[tuple[str, bytes]] = deque(maxlen=RESULT_BUFFER)
        self.dropped_results = 0

    def attach_commands(self, handler: Callable[[Incoming], None]) -> None:
        """Subscribe to ``cmd/+`` (now and after every reconnect) and hand each message
        to ``handler``, which must not block (:meth:`qnoded.commands.CommandDesk.offer`)."""
        self._on_command = handler
        self._cmd_subscribed = False
        self.wake()

    def publish_result(self, command: str, doc: dict[str, Any]) -> None:
        """Queue a command's result for ``cmd/<command>/result`` (QoS 1, not retained);
        kept while the broker is down, the oldest dropped (counted) past the buffer."""
        if len(self._results) == self._results.maxlen:
            self.dropped_results += 1
        self._results.append((f"cmd/{command}/result", json.dumps(doc, default=str).encode()))
        self.wake()

    def attach_keys(self, store: KeyStore, peer_id: str) -> None:
        """Deliver this store's ready keys on ``keys/<peer_id>`` while connected."""
        self._keys = store
        self._key_peer = peer_id
        self.wake()

    def wake(self) -> None:
        """Something new to publish (keys committed): flush now."""
        self.idle.clear()
        self._wake.set()

    def _status_doc(self, state: str, detail: str) -> dict[str, Any]:
        return {"node_id": self.node_id, "state": state, "since": time.time(), "detail": detail}

    # -- API for the node (never blocks on the network) ---------------------------
    @property
    def status(self) -> dict[str, Any]:
        return dict(self._status)

    async def set_status(self, state: str, detail: str = "") -> None:
        """Remember the node's state; published retained now and on every reconnect."""
        if state not in STATES:
            raise ValueError(f"status state {state!r}: use one of {STATES}")
        self._status = self._status_doc(state, detail)
        self._status_dirty = True
        self.status_published.clear()
        self.idle.clear()
        self._wake.set()

    def publish_telemetry(self, payload: dict[str, Any]) -> None:
        """Queue one telemetry message; dropped (counted) while down or when the queue is full."""
        if not self.connected:
            self.dropped_telemetry += 1
            return
        try:
            self._telemetry.put_nowait(json.dumps(payload, default=str).encode())
        except asyncio.QueueFull:
            self.dropped_telemetry += 1
            return
        self.idle.clear()
        self._wake.set()

    def raise_alarm(self, severity: str, code: str, message: str) -> None:
        """Queue an alarm (QoS 1); kept while the broker is down, the oldest dropped past 256."""
        if severity not in SEVERITIES:
            raise ValueError(f"alarm severity {severity!r}: use one of {SEVERITIES}")
        if len(self._alarms) == self._alarms.maxlen:
            self.dropped_alarms += 1  # the deque drops the oldest
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
        self.idle.clear()
        self._wake.set()

    def _set_connected(self, up: bool) -> None:
        self.connected = up
        (self._up if up else self._down).set()
        (self._down if up else self._up).clear()
        if not up:
            self.idle.clear()

    async def wait_connected(self, connected: bool = True) -> None:
        """Wait until the publisher is connected (or, with ``False``, disconnected)."""
        await (self._up if connected else self._down).wait()

    @property
    def pending_alarms(self) -> int:
        return len(self._alarms)

    @property
    def pending_telemetry(self) -> int:
        return self._telemetry.qsize()

    # -- lifecycle ----------------------------------------------------------------
    async def __aenter__(self) -> Self:
        if self._stack is not None:
            raise RuntimeError("TelemetryPublisher is not reentrant")
        self._closing = False
        self._stack = contextlib.AsyncExitStack()
        tg = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._task = tg.create_task(self._connection_loop(), name="mqtt-connection")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._stack is not None and self._task is not None
        # Say "stopped" on the way out if the broker is there to hear it: the
        # connection loop flushes what is queued, publishes it, disconnects
        # cleanly (so the will is not sent) and returns.
        self._status = self._status_doc("stopped", self._status.get("detail", ""))
        self._status_dirty = True
        self._closing = True
        self._wake.set()
        if self.connected:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await asyncio.shield(self._task)
        self._task.cancel()
        stack, self._stack = self._stack, None
        try:
            await stack.aclose()
        finally:
            self._set_connected(False)

    def _will(self) -> aiomqtt.Will:
        offline = self._status_doc("offline", "connection lost (last will)")
        return aiomqtt.Will(
            topic(self.node_id, "status"), json.dumps(offline).encode(), qos=1, retain=True
        )

    async def _connection_loop(self) -> None:
        attempt = 0
        down = False
        broker = f"{self.settings.host}:{self.settings.port}"
        while True:
            error: aiomqtt.MqttError | None = None
            try:
                client = self.settings.client(
                    identifier=self.settings.client_id or f"qnoded-{self.node_id}",
                    will=self._will(),
                )
                async with client:
                    self._set_connected(True)
                    attempt = 0
                    if self._ever_connected:
                        self.reconnects += 1
                    self._ever_connected = True
                    if down:
                        log.info("mqtt up", broker=broker, reconnects=self.reconnects)
                        down = False
                    self._status_dirty = True
                    self._cmd_subscribed = False  # a new session: subscribe again
                    async with asyncio.TaskGroup() as tg:
                        receive = tg.create_task(self._receive(client), name="mqtt-receive")
                        await self._publish_loop(client)
                        receive.cancel()
                    return  # closing: everything is published
            except* aiomqtt.MqttError as group:
                error = group.exceptions[0]  # type: ignore[assignment]  # split keeps the type
            if not self.connected:  # a failed attempt, not a dropped connection
                self.failed_connects += 1
            self._set_connected(False)
            if not down:
                log.warning("mqtt down", broker=broker, error=str(error))
                down = True
            # Telemetry from before the outage is stale: drop it, counted.
            while not self._telemetry.empty():
                self._telemetry.get_nowait()
                self.dropped_telemetry += 1
            attempt += 1
            await asyncio.sleep(backoff_s(attempt, base_s=BACKOFF_BASE_S, cap_s=BACKOFF_CAP_S))

    async def _receive(self, client: aiomqtt.Client) -> None:
        """Hand commands to the node's handler; raise MqttError as soon as the
        connection drops, even while idle."""
        commands = topic(self.node_id, "cmd/+")
        async for message in client.messages:
            handler = self._on_command
            # cmd/+ is the only subscription; anything else is not ours to act on.
            if handler is None or not message.topic.matches(commands):
                continue
            raw = message.payload
            if isinstance(raw, str):
                payload = raw.encode()
            elif isinstance(raw, bytes | bytearray):
                payload = bytes(raw)
            else:  # paho hands bytes; None or a number only from a local publish
                payload = b"" if raw is None else str(raw).encode()
            props = getattr(message.properties, "UserProperty", None) or []
            incoming = Incoming(
                topic=str(message.topic),
                payload=payload,
                retained=bool(message.retain),
                user_properties=tuple((str(k), str(v)) for k, v in props),
            )
            try:
                handler(incoming)
            except Exception:  # a fault of the node's handler must not take the link down
                log.exception("command handler raised", topic=incoming.topic)

    async def _subscribe_commands(self, client: aiomqtt.Client) -> None:
        if self._on_command is None or self._cmd_subscribed or self._closing:
            return
        leaf = topic(self.node_id, "cmd/+")
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                codes = await client.subscribe(leaf, qos=1)
        except TimeoutError as exc:
            raise aiomqtt.MqttError(f"subscribe to {leaf} timed out") from exc
        self._cmd_subscribed = True
        # MQTT v5 SUBACK: 0-2 is the granted QoS, 128 and up a refusal.  Said
        # once per connection; retrying would not change the broker's mind.
        values = [c if isinstance(c, int) else int(c.value) for c in codes]
        refused = [v for v in values if v >= 128]
        if refused:
            log.error("command subscription refused by the broker", topic=leaf, reasons=refused)

    async def _publish(
        self, client: aiomqtt.Client, leaf: str, payload: bytes, *, qos: int, retain: bool = False
    ) -> None:
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                await client.publish(topic(self.node_id, leaf), payload, qos=qos, retain=retain)
        except TimeoutError as exc:
            raise aiomqtt.MqttError(f"publish to {leaf} timed out") from exc

    async def _flush(self, client: aiomqtt.Client) -> None:
        await self._subscribe_commands(client)
        if self._status_dirty:
            self._status_dirty = False
            status = self._status
            await self._publish(client, "status", json.dumps(status).encode(), qos=1, retain=True)
            if status is self._status:
                self.status_published.set()
        while self._alarms:
            await self._publish(client, "alarms", self._alarms[0], qos=1)
            self._alarms.popleft()  # only once the broker has it
        while self._results:
            leaf, payload = self._results[0]
            await self._publish(client, leaf, payload, qos=1)
            self._results.popleft()
        while not self._telemetry.empty():
            await self._publish(client, "telemetry", self._telemetry.get_nowait(), qos=0)
            self.published += 1
        await self._deliver_keys(client)

    def _take(self, store: KeyStore) -> list[Key]:
        """The next keys to publish; none while the store refuses writes (disk full).
        One log line when it starts refusing and one when it stops, not one per try."""
        try:
            keys = store.take(KEY_BATCH)
        except StorageError as exc:
            if not self._store_refusing:
                log.error("key store refuses to hand out keys", error=str(exc))
                self._store_refusing = True
            return []
        if self._store_refusing:
            log.info("key store hands out keys again")
            self._store_refusing = False
        return keys

    async def _deliver_keys(self, client: aiomqtt.Client) -> None:
        store = self._keys
        if store is None or self._closing:
            return
        leaf = f"keys/{self._key_peer}"
        # A few batches per flush, then status, alarms and telemetry get their
        # turn (a backlog of keys starved them for minutes); closing stops
        # between batches, so no batch is cut mid-flight by the close timeout.
        for _ in range(KEY_BATCHES_PER_FLUSH):
            if self._closing or not (keys := self._take(store)):
                return
            done: list[Any] = []
            started = 0  # keys whose publication began
            failure: BaseException | None = None
            try:
                payloads = [self._key_payload(key) for key in keys]
                started = len(keys)
                # The whole batch in flight at once (QoS 1, one PUBACK each):
                # one broker round trip per batch, not per key.
                results = await asyncio.gather(
                    *(self._publish(client, leaf, p, qos=1) for p in payloads),
                    return_exceptions=True,
                )
                done = [k.key_id for k, r in zip(keys, results, strict=True) if r is None]
                failure = next((r for r in results if isinstance(r, BaseException)), None)
            finally:
                # What was acknowledged is delivered; a key whose publication
                # began but was not confirmed may have reached the broker, so
                # it is destroyed (at most once); the rest never left: back to
                # ready, for the next connection.
                try:
                    store.release(k.key_id for k in keys[started:])
                    store.delivered(k.key_id for k in keys[:started])
                except StorageError as exc:
                    # They stay marked in delivery, never handed out again; the
                    # next start destroys them (at most once), as after a crash.
                    log.error("key store refused the delivery record", error=str(exc))
                self.keys_delivered += len(done)
                confirmed = set(done)
                lost = [k.key_id for k in keys[:started] if k.key_id not in confirmed]
                self.keys_destroyed += len(lost)
                if done:
                    audit.info(
                        "key delivered",
                        interface="mqtt",
                        consumer=topic(self.node_id, leaf),
                        key_ids=[str(k) for k in done],
                    )
                if lost:
                    log.warning("keys destroyed: publication not confirmed", keys=len(lost))
                    audit.info(
                        "key destroyed undelivered",
                        interface="mqtt",
                        reason="publication not confirmed",
                        key_ids=[str(k) for k in lost],
                    )
            if failure is not None:
                raise failure  # the connection loop reconnects
        self._wake.set()  # maybe more ready: come back after the rest of the flush

    def _key_payload(self, key: Key) -> bytes:
        doc = {
            "key_ID": str(key.key_id),
            "key": base64.b64encode(key.material).decode(),
            "length_bits": key.bits,
            "block_id": str(key.block_id),
            "node_id": self.node_id,
            "peer_id": self._key_peer,
        }
        return json.dumps(doc).encode()

    async def _publish_loop(self, client: aiomqtt.Client) -> None:
        while True:
            self._wake.clear()
            await self._flush(client)
            # Closing may have been asked during that flush: leave only once
            # the final status (and any alarm) has gone out too.
            if self._closing and not self._status_dirty and not self._alarms and not self._results:
                return
            if not self._wake.is_set():
                self.idle.set()
            await self._wake.wait()


@dataclass(frozen=True, slots=True)
class Received:
    """One message read back: JSON-decoded payload (raw text if not JSON)."""

    topic: str
    payload: Any
    retain: bool


def _decode(message: aiomqtt.Message) -> Received:
    raw = message.payload
    data: Any
    if isinstance(raw, bytes | bytearray):
        try:
            data = json.loads(raw)
        except ValueError:
            data = bytes(raw).decode("utf-8", "replace")
    else:
        data = raw
    return Received(str(message.topic), data, bool(message.retain))


class Subscriber:
    """Subscribe to topic filters; ``async for msg in sub`` yields :class:`Received`.

    Subscribed once ``async with`` has entered, so nothing published after
    that is missed.  No reconnect: this is a viewer and a test helper.
    """

    def __init__(
        self,
        settings: MqttSettings | tuple[str, int],
        *topics: str,
        qos: int = 1,
    ) -> None:
        if isinstance(settings, tuple):
            settings = MqttSettings(*settings)
        if not topics:
            raise ValueError("Subscriber needs at least one topic filter")
        self.settings = settings
        self.topics = topics
        self.qos = qos
        self._client: aiomqtt.Client | None = None

    async def __aenter__(self) -> Self:
        client = self.settings.client()
        await client.__aenter__()
        try:
            for t in self.topics:
                await client.subscribe(t, qos=self.qos)
        except BaseException:
            await client.__aexit__(None, None, None)
            raise
        self._client = client
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.__aexit__(exc_type, exc, tb)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Received:
        """The next message; ``MqttError`` if the connection drops."""
        if self._client is None:
            raise RuntimeError("use `async with Subscriber(...)` before iterating")
        return _decode(await anext(self._client.messages))


async def collect(
    host: str,
    port: int,
    topic_filter: str,
    *,
    count: int,
    timeout: float,
) -> list[Received]:
    """Up to ``count`` messages on ``topic_filter``, or fewer if ``timeout`` (s) runs out."""
    out: list[Received] = []
    async with Subscriber((host, port), topic_filter) as sub:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                async for msg in sub:
                    out.append(msg)
                    if len(out) >= count:
                        break
    return out
