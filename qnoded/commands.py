"""Operator commands over MQTT: parsing, validation, dispatch and result documents.

A node subscribes to ``qkd/v1/<node_id>/cmd/+`` (QoS 1) and answers every
message there on ``qkd/v1/<node_id>/cmd/<name>/result`` (QoS 1, not retained).
The production ACL (``qnoded/data/mosquitto-acl.conf``) lets only the
``operator`` identity publish commands and read results.

Request payload: a JSON object ``{"id": "<string, echoed>", "args": {...}}``,
both fields optional (``{}`` runs a command without arguments).  An empty
payload is refused, never run: it is how MQTT clears a retained message, and
the broker forwards that clearing publish live to the node.  Result::

    {"id", "node_id", "command", "ok": true,  "result": {...}, "time"}
    {"id", "node_id", "command", "ok": false, "error": "<what is wrong>", "time"}

Every message gets exactly one answer: an unknown command, a payload that is
not JSON, a wrong type, an unknown argument, a full queue or a handler that
fails all answer ``ok: false`` with an error naming what is wrong; nothing is
dropped silently and nothing a client sends can stop the node.

:class:`CommandDesk` is the node's side: the MQTT receive loop hands each
message to :meth:`CommandDesk.offer` (never blocks), the desk's own loop
(:meth:`CommandDesk.run`, a task in the node's ``TaskGroup``) runs them one at
a time from a bounded queue, and every command is an audit event on the
``qnoded.audit`` logger.  What a command does is the node's business
(:mod:`qnoded.node` registers the handlers); this module holds the table of
commands and their arguments, which is all a client can rely on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from qnoded import strictjson

log = structlog.get_logger("qnoded.commands")
audit = structlog.get_logger("qnoded.audit")

# A command is a few words; anything larger is a mistake or an attack, and
# is refused before it is parsed.
MAX_PAYLOAD_BYTES = 4096
MAX_ID_CHARS = 128
# Commands waiting to run: operator actions come at human rates, a burst
# beyond this is answered "busy" at once rather than queued without bound.
QUEUE_SIZE = 8
# A handler only flips the node's state or asks a device one thing.
COMMAND_TIMEOUT_S = 10.0
# MQTT v5 user properties a client may attach to say who it is (audit only).
MAX_USER_PROPERTIES = 8
MAX_USER_PROPERTY_CHARS = 128
LOG_LEVELS = ("debug", "info", "warning", "error")
REQUEST_FIELDS = ("id", "args")


class CommandError(Exception):
    """The node refuses a request; the message becomes the result's ``error``."""


class RequestError(CommandError):
    """A request that could not be parsed or validated; carries the ``id`` if one was read."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


@dataclass(frozen=True, slots=True)
class Arg:
    """One argument of a command: always a JSON string (commands are words, not data)."""

    name: str
    required: bool = True
    choices: tuple[str, ...] = ()
    max_chars: int = 200

    def describe(self) -> str:
        need = "required" if self.required else "optional"
        kind = f"one of {'|'.join(self.choices)}" if self.choices else "string"
        return f"{self.name} ({need}, {kind})"


@dataclass(frozen=True, slots=True)
class Spec:
    """A command a client may send: its name, what it does, the arguments it takes."""

    name: str
    summary: str
    args: tuple[Arg, ...] = ()

    def describe_args(self) -> str:
        if not self.args:
            return f"{self.name} takes no arguments"
        return f"{self.name} takes: " + ", ".join(a.describe() for a in self.args)


SPECS: dict[str, Spec] = {
    s.name: s
    for s in (
        Spec("status", "the node's state, active alarms and summary figures (no key material)"),
        Spec(
            "pause",
            "stop key generation (no new batch is sifted or goes into post-processing; a "
            "block in flight completes); the peer link and telemetry stay up; acts at alice",
            (Arg("reason", required=False),),
        ),
        Spec("resume", "resume key generation after a pause: the clock re-locks; acts at alice"),
        Spec("recalibrate", "drop the clock offset lock and lock afresh; acts at alice"),
        Spec(
            "clear-alarm",
            "clear an active fault or alarm and publish <code>-cleared",
            (Arg("code", max_chars=64),),
        ),
        Spec(
            "rotate-log-level",
            "set the process's log level at runtime",
            (Arg("level", choices=LOG_LEVELS),),
        ),
    )
}


@dataclass(frozen=True, slots=True)
class Incoming:
    """One message on ``cmd/<name>`` as the MQTT layer hands it over."""

    topic: str
    payload: bytes
    retained: bool = False
    # MQTT v5 user properties, as sent: the only say a client has about who it is.
    user_properties: tuple[tuple[str, str], ...] = ()

    @property
    def command(self) -> str:
        """The topic's last level: the name the result is published under."""
        return self.topic.rsplit("/", 1)[-1]

    def client(self) -> dict[str, Any]:
        """Who sent it, as far as MQTT tells a subscriber: the topic and user properties.

        The broker does not pass the publisher's identity on; on the production
        broker the ACL admits only ``operator`` to ``cmd/+``.
        """
        props = [
            [k[:MAX_USER_PROPERTY_CHARS], v[:MAX_USER_PROPERTY_CHARS]]
            for k, v in self.user_properties[:MAX_USER_PROPERTIES]
        ]
        return {"topic": self.topic, "user_properties": props} if props else {"topic": self.topic}


@dataclass(frozen=True, slots=True)
class Request:
    """A parsed, validated command: ``args`` hold exactly the spec's arguments that were given."""

    command: str
    request_id: str | None
    args: Mapping[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[Mapping[str, Any]]]
# (command name, result document): queued by the MQTT layer for publishing.
Publish = Callable[[str, dict[str, Any]], None]


def decode(payload: bytes) -> dict[str, Any]:
    """The request object of a payload; :class:`RequestError` if it is none (or empty)."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise RequestError(
            f"payload is {len(payload)} bytes; a command may be at most {MAX_PAYLOAD_BYTES}"
        )
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"payload is not UTF-8 text (byte {exc.start})") from None
    if not text.strip():
        raise RequestError(
            "an empty payload is not a command: an empty publish is how MQTT clears a "
            "retained message; send {} to run the command without arguments"
        )
    try:
        doc = strictjson.loads(text)
    except ValueError as exc:
        raise RequestError(f"payload is not valid JSON: {exc}") from None
    except RecursionError:  # a few thousand brackets fit in MAX_PAYLOAD_BYTES
        raise RequestError("payload is not valid JSON: arrays or objects nest too deeply") from None
    if not isinstance(doc, dict):
        raise RequestError(
            'payload must be a JSON object such as {"id": "42", "args": {}}, '
            f"not a JSON {strictjson.type_name(doc)}"
        )
    return doc


def _request_id(doc: Mapping[str, Any]) -> str | None:
    value = doc.get("id")
    if value is None:
        return None
    if not isinstance(value, str):
        raise RequestError(f"field 'id' must be a string, not a JSON {strictjson.type_name(value)}")
    if len(value) > MAX_ID_CHARS:
        raise RequestError(f"field 'id' is {len(value)} characters; at most {MAX_ID_CHARS}")
    return value


def validate_args(spec: Spec, raw: Any) -> dict[str, str]:
    """``raw`` (the request's ``args``) checked against ``spec``; :class:`CommandError` if wrong."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise CommandError(
            f"field 'args' must be a JSON object, not a JSON {strictjson.type_name(raw)}"
        )
    known = {a.name: a for a in spec.args}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise CommandError(f"unknown argument(s) {unknown}: {spec.describe_args()}")
    out: dict[str, str] = {}
    for arg in spec.args:
        if arg.name not in raw:
            if arg.required:
                raise CommandError(f"missing argument {arg.name!r}: {spec.describe_args()}")
            continue
        value = raw[arg.name]
        if not isinstance(value, str):
            raise CommandError(
                f"argument {arg.name!r} of {spec.name} must be a string, "
                f"not a JSON {strictjson.type_name(value)}"
            )
        if len(value) > arg.max_chars:
            raise CommandError(
                f"argument {arg.name!r} of {spec.name} is {len(value)} characters; "
                f"at most {arg.max_chars}"
            )
        if arg.choices and value not in arg.choices:
            raise CommandError(
                f"argument {arg.name!r} of {spec.name} is {value!r}; "
                f"use one of {', '.join(arg.choices)}"
            )
        out[arg.name] = value
    return out


def parse(incoming: Incoming, specs: Mapping[str, Spec] = SPECS) -> Request:
    """A validated :class:`Request`; :class:`RequestError` (with the ``id`` once read) if not."""
    doc = decode(incoming.payload)
    request_id = _request_id(doc)
    try:
        if incoming.retained:
            # A retained command would run again at every (re)connect of the node.
            raise CommandError(
                "command refused: it is a retained message (published with retain=true), "
                "which would run again whenever the node reconnects; publish with retain=false"
            )
        unknown = sorted(set(doc) - set(REQUEST_FIELDS))
        if unknown:
            raise CommandError(
                f"unknown field(s) {unknown} in the request; it may have: "
                + ", ".join(REQUEST_FIELDS)
            )
        spec = specs.get(incoming.command)
        if spec is None:
            raise CommandError(
                f"unknown command {incoming.command!r}; commands: {', '.join(sorted(specs))}"
            )
        args = validate_args(spec, doc.get("args"))
    except CommandError as exc:
        raise RequestError(str(exc), request_id) from None
    return Request(command=spec.name, request_id=request_id, args=args)


def result_doc(
    node_id: str,
    command: str,
    request_id: str | None,
    *,
    result: Mapping[str, Any] | None = None,
    error: str | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The answer published on ``cmd/<command>/result``: ``result`` or ``error``, not both."""
    if (result is None) == (error is None):
        raise ValueError("a command result carries either a result or an error")
    doc: dict[str, Any] = {
        "id": request_id,
        "node_id": node_id,
        "command": command,
        "ok": error is None,
    }
    if error is None:
        doc["result"] = dict(result or {})
    else:
        doc["error"] = error
    doc["time"] = time.time() if now is None else now
    return doc


def current_log_level() -> str:
    """The root logger's level, lower case (``info``...)."""
    return logging.getLevelName(logging.getLogger().level).lower()


def set_log_level(level: str) -> dict[str, str]:
    """Set the root logger's level; returns ``{"old", "new"}`` (lower case).

    The ``qnoded.audit`` logger is pinned at INFO first, so turning the level
    up to ``warning`` or ``error`` never silences the audit trail.
    """
    if level not in LOG_LEVELS:
        raise CommandError(f"log level {level!r}; use one of {', '.join(LOG_LEVELS)}")
    old = current_log_level()
    audit_logger = logging.getLogger("qnoded.audit")
    if audit_logger.level == logging.NOTSET or audit_logger.level > logging.INFO:
        audit_logger.setLevel(logging.INFO)
    logging.getLogger().setLevel(level.upper())
    return {"old": old, "new": level}


async def rotate_log_level(request: Request) -> Mapping[str, Any]:
    """The ``rotate-log-level`` handler: the same in every node, it needs no node state."""
    levels = set_log_level(request.args["level"])
    log.warning("log level changed by operator", **levels)
    return levels


class CommandDesk:
    """Takes commands from the MQTT layer, runs them one at a time, answers each.

    ``handlers`` maps command names (each one of :data:`SPECS`) to the node's
    coroutines; ``publish`` queues a result document for publishing (it must
    not block).  Counters: ``received`` (messages offered), ``executed``
    (handlers run), ``refused_busy`` (answered at once: queue full).
    """

    def __init__(
        self,
        node_id: str,
        handlers: Mapping[str, Handler],
        publish: Publish,
        *,
        queue_size: int = QUEUE_SIZE,
        timeout_s: float = COMMAND_TIMEOUT_S,
    ) -> None:
        unknown = sorted(set(handlers) - set(SPECS))
        if unknown:
            raise ValueError(
                f"handlers for commands without a spec: {unknown}; specs: {sorted(SPECS)}"
            )
        self.node_id = node_id
        self.handlers = dict(handlers)
        self.specs = {name: SPECS[name] for name in self.handlers}
        self._publish = publish
        self._queue: asyncio.Queue[Incoming] = asyncio.Queue(maxsize=queue_size)
        self.timeout_s = timeout_s
        self._closed: str | None = None
        self.received = 0
        self.executed = 0
        self.refused_busy = 0

    def offer(self, incoming: Incoming) -> None:
        """A message arrived: queue it, or answer at once if the node cannot take it."""
        self.received += 1
        if self._closed is not None:
            self._refuse(incoming, f"command not run: {self._closed}")
            return
        try:
            self._queue.put_nowait(incoming)
        except asyncio.QueueFull:
            self.refused_busy += 1
            self._refuse(
                incoming,
                f"command not run: {self._queue.maxsize} commands are already waiting at "
                f"{self.node_id}; commands run one at a time, send it again later",
            )

    def _refuse(self, incoming: Incoming, error: str) -> None:
        request_id: str | None = None
        # The refusal is the answer; a malformed id is simply not echoed.
        with contextlib.suppress(RequestError):
            request_id = _request_id(decode(incoming.payload))
        self._answer(incoming, request_id, None, error, args=None, started=time.monotonic())

    def close(self, reason: str = "the node is stopping") -> None:
        """Refuse what is queued and whatever comes later (the node is going away)."""
        if self._closed is not None:
            return
        self._closed = reason
        while not self._queue.empty():
            self._refuse(self._queue.get_nowait(), f"command not run: {reason}")

    async def run(self) -> None:
        """Run queued commands one at a time until cancelled; then refuse the rest."""
        try:
            while True:
                incoming = await self._queue.get()
                await self.execute(incoming)
        finally:
            self.close()

    async def execute(self, incoming: Incoming) -> dict[str, Any]:
        """Parse, validate, run and answer one command; returns the published result."""
        started = time.monotonic()
        try:
            request = parse(incoming, self.specs)
        except RequestError as exc:
            return self._answer(incoming, exc.request_id, None, str(exc), None, started)
        result: Mapping[str, Any] | None = None
        error: str | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await self.handlers[request.command](request)
        except asyncio.CancelledError:
            # The node is stopping under a running command: say so, then stop.
            error = f"{request.command} interrupted: the node is stopping"
            self._answer(incoming, request.request_id, None, error, request.args, started)
            raise
        except CommandError as exc:
            error = str(exc)
        except TimeoutError:
            error = f"{request.command} did not finish within {self.timeout_s:g} s"
        except Exception as exc:  # a failing handler is an answer, never a crash
            log.exception("command handler failed", command=request.command)
            error = f"{request.command} failed at {self.node_id}: {type(exc).__name__}: {exc}"
        if error is None and not isinstance(result, Mapping):
            error = f"{request.command} at {self.node_id} returned no result document"
            result = None
        self.executed += 1
        return self._answer(incoming, request.request_id, result, error, request.args, started)

    def _answer(  # noqa: PLR0917 - one private call shape, every argument distinct
        self,
        incoming: Incoming,
        request_id: str | None,
        result: Mapping[str, Any] | None,
        error: str | None,
        args: Mapping[str, str] | None,
        started: float,
    ) -> dict[str, Any]:
        doc = result_doc(self.node_id, incoming.command, request_id, result=result, error=error)
        # The audit event: what was asked, by whom (as far as MQTT tells), and
        # the outcome.  Arguments are logged only once validated (names from
        # the spec, short strings); a refused payload is logged by its size,
        # never its content, which could be anything.
        audit.info(
            "operator command",
            interface="mqtt",
            command=incoming.command,
            id=request_id,
            args=dict(args) if args is not None else None,
            payload_bytes=len(incoming.payload),
            client=incoming.client(),
            outcome="ok" if error is None else "error",
            error=error,
            duration_ms=round(1000 * (time.monotonic() - started), 3),
        )
        self._publish(incoming.command, doc)
        return doc
