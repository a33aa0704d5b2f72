"""``qnoded monitor``: the operator's live terminal dashboard over MQTT.

Three parts, each usable alone:

- :class:`MonitorState`, a pure model: :meth:`MonitorState.update` ingests one
  decoded message (topic and JSON payload) of the ``status``, ``telemetry`` and
  ``alarms`` topics (see :mod:`qnoded.mqtt`) and keeps, per node, the last
  status document, the last telemetry, a short history of the key rates and
  the active alarms.  No network, no clock of its own (one is injected), so
  tests feed it payloads directly.
- :func:`render`, the model as a ``rich`` renderable: a header (broker,
  connection, counts), one table row per node and a table of active alarms.
- :func:`run_monitor`, the async loop: one subscriber connection with
  reconnect and jittered, capped backoff (as :class:`qnoded.mqtt.TelemetryPublisher`
  does), and either a ``rich.live.Live`` view refreshed every ``refresh_s`` or,
  with ``once_after_s``, one frame printed after collecting for that long.

Alarms are events, not retained: a monitor started after an alarm was raised
does not see it, but a node's status ``detail`` lists its current faults, and
the dashboard shows that detail beside the state.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import aiomqtt
from rich.columns import Columns
from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.live import Live
from rich.measure import Measurement
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from qnoded.backoff import backoff_s
from qnoded.mqtt import BACKOFF_BASE_S, BACKOFF_CAP_S, MqttSettings

TOPIC_ROOT = "qkd/v1"
LEAVES = ("status", "telemetry", "alarms")
CLEARED_SUFFIX = "-cleared"  # Node._resolved raises "<code>-cleared" at severity info
# Telemetry older than this many intervals means the node (or its link to the
# broker) has stopped talking: the task's definition of stale.
STALE_INTERVALS = 3.0
# Used until a node's telemetry tells its own interval: the config default.
DEFAULT_INTERVAL_S = 1.0
# The config default of [sifting] qber_alarm_threshold: used (or
# --qber-threshold) until a node's telemetry gives its own "qber_alarm_threshold".
DEFAULT_QBER_THRESHOLD = 0.11
DEFAULT_HISTORY = 16
DEFAULT_REFRESH_S = 1.0
CONNECT_TIMEOUT_S = 10.0
SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}
SEVERITY_STYLE = {"critical": "bold red", "warning": "yellow", "info": "cyan"}
STATE_STYLE = {
    "running": "green",
    "locking": "yellow",
    "starting": "yellow",
    "paused": "yellow",
    "degraded": "bold red",
    "stopped": "dim",
    "offline": "bold red",
}
PASSWORD_ENV = "QNODED_MQTT_PASSWORD"  # noqa: S105 - the variable's name, not a password
# aiomqtt hands paho's log lines to this logger; a refused TLS handshake is
# only ever reported there (the connect itself just times out).
LIBRARY_LOGGER = "mqtt"

# Why a connection failed, in words an operator can act on (matched in order
# against the error text).
_HINTS: tuple[tuple[str, str], ...] = (
    ("CERTIFICATE_REQUIRED", "the broker requires a client certificate: pass --cert and --key"),
    ("UNKNOWN_CA", "the broker does not trust the client certificate's CA"),
    ("BAD_CERTIFICATE", "the broker rejected the client certificate"),
    (
        "CERTIFICATE_VERIFY_FAILED",
        "the broker's certificate does not verify against --ca (wrong CA, or HOST not in it)",
    ),
    ("WRONG_VERSION_NUMBER", "that port does not speak TLS: leave out --ca/--cert"),
    ("Connection refused", "nothing listens there: is the broker running, is the port right?"),
    ("Not authorized", "the broker refused these credentials"),
    ("Bad user name or password", "the broker refused --username/--password"),
)


class MonitorError(Exception):
    """The monitor cannot do its job; the message says why and what to change."""


class MonitorUsageError(MonitorError):
    """Bad options (files, TLS material): exit code 2."""


class BrokerUnreachableError(MonitorError):
    """No connection to the broker within the timeout (``--once`` mode)."""


class Staleness(StrEnum):
    """How current a node's figures are."""

    FRESH = "fresh"
    STALE = "stale"  # telemetry stopped for more than STALE_INTERVALS intervals
    OFFLINE = "offline"  # its last will, or a status of "offline"
    WAITING = "no telemetry"  # nothing heard yet (status only, or listed on the command line)


def _num(doc: Mapping[str, Any], key: str) -> float | None:
    """``doc[key]`` if it is a finite number (not a bool), else None."""
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass(slots=True)
class ActiveAlarm:
    """An alarm code raised and not yet cleared; repeats are counted, not listed."""

    code: str
    severity: str
    message: str
    first_time: float | None  # the node's wall clock (epoch s), as in the payload
    last_time: float | None
    count: int = 1


@dataclass(slots=True)
class NodeView:
    """What the monitor knows of one node."""

    node_id: str
    history: int
    status: dict[str, Any] | None = None
    telemetry: dict[str, Any] | None = None
    telemetry_seen: float | None = None  # monitor's clock at receipt
    telemetry_count: int = 0
    sifted_history: deque[float | None] = field(init=False)
    secret_history: deque[float | None] = field(init=False)
    alarms: dict[str, ActiveAlarm] = field(default_factory=dict)
    cleared_alarms: int = 0

    def __post_init__(self) -> None:
        self.sifted_history = deque(maxlen=self.history)
        self.secret_history = deque(maxlen=self.history)

    @property
    def state(self) -> str | None:
        """The status document's state (the telemetry's while no status has arrived)."""
        for doc in (self.status, self.telemetry):
            if doc is not None and isinstance(doc.get("state"), str):
                return str(doc["state"])
        return None

    @property
    def interval_s(self) -> float:
        """The node's telemetry interval: its own figure if sent, else the measured one."""
        t = self.telemetry or {}
        for key in ("telemetry_interval_s", "interval_s"):
            value = _num(t, key)
            if value is not None and value > 0:
                return value
        return DEFAULT_INTERVAL_S


class MonitorState:
    """The dashboard's model: feed it messages with :meth:`update`.

    ``nodes`` restricts the model to those ids (and shows them even before
    anything is heard); empty means every node seen.  ``clock`` is a
    monotonic clock in seconds, used for telemetry age only.
    """

    def __init__(
        self,
        nodes: Sequence[str] = (),
        *,
        history: int = DEFAULT_HISTORY,
        qber_threshold: float = DEFAULT_QBER_THRESHOLD,
        broker: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if history < 1:
            raise ValueError(f"history {history}: need at least one point")
        self.only = frozenset(nodes)
        self.history = history
        self.qber_threshold = qber_threshold
        self.broker = broker
        self.clock = clock
        self.nodes: dict[str, NodeView] = {n: NodeView(n, history) for n in nodes}
        self.connected = False
        self.connections = 0
        self.broker_error: str | None = None
        self.library_error: str | None = None
        self.ignored = 0
        self.last_ignored = ""

    # -- connection ----------------------------------------------------------------
    def connection_up(self) -> None:
        self.connected = True
        self.connections += 1
        self.broker_error = None
        self.library_error = None

    def connection_down(self, error: str) -> None:
        self.connected = False
        self.broker_error = error

    def note_library_error(self, message: str) -> None:
        """An error the MQTT library logged (a refused TLS handshake shows only there)."""
        self.library_error = message

    @property
    def reconnects(self) -> int:
        return max(0, self.connections - 1)

    def problem(self) -> str | None:
        """Why the broker connection is down, with a hint where one is known."""
        parts = [p for p in (self.broker_error, self.library_error) if p]
        if not parts:
            return None
        text = "; ".join(parts)
        for needle, hint in _HINTS:
            if needle.lower() in text.lower():
                return f"{text} ({hint})"
        return text

    # -- messages ------------------------------------------------------------------
    def _ignore(self, topic: str, why: str) -> bool:
        self.ignored += 1
        self.last_ignored = f"{topic}: {why}"
        return False

    def update(self, topic: str, payload: object) -> bool:
        """Ingest one decoded message; False (counted in ``ignored``) if it was not usable.

        ``payload`` is the JSON-decoded body: a dict for every qnoded topic.
        """
        parts = topic.split("/")
        if len(parts) != 4 or "/".join(parts[:2]) != TOPIC_ROOT or parts[3] not in LEAVES:
            return self._ignore(topic, "not a status, telemetry or alarms topic")
        node_id, leaf = parts[2], parts[3]
        if self.only and node_id not in self.only:
            return False  # not asked for: not an error
        if not isinstance(payload, dict):
            return self._ignore(topic, f"payload is {type(payload).__name__}, not a JSON object")
        view = self.nodes.get(node_id)
        if view is None:
            view = self.nodes[node_id] = NodeView(node_id, self.history)
        if leaf == "status":
            return self._status(view, topic, payload)
        if leaf == "telemetry":
            self._telemetry(view, payload)
            return True
        return self._alarm(view, topic, payload)

    def _status(self, view: NodeView, topic: str, doc: dict[str, Any]) -> bool:
        if not isinstance(doc.get("state"), str):
            return self._ignore(topic, "status without a string 'state'")
        previous = view.status
        view.status = doc
        new_process = doc["state"] == "starting" and (
            previous is None or previous.get("since") != doc.get("since")
        )
        if new_process:
            # A node that (re)starts has forgotten its faults: it raises them
            # again if they persist, and would never clear the old ones.
            view.alarms.clear()
        return True

    def _telemetry(self, view: NodeView, doc: dict[str, Any]) -> None:
        view.telemetry = doc
        view.telemetry_seen = self.clock()
        view.telemetry_count += 1
        view.sifted_history.append(_num(doc, "sifted_bits_per_s"))
        view.secret_history.append(_num(doc, "secret_key_bits_per_s"))

    def _alarm(self, view: NodeView, topic: str, doc: dict[str, Any]) -> bool:
        code = doc.get("code")
        if not isinstance(code, str) or not code:
            return self._ignore(topic, "alarm without a 'code'")
        when = _num(doc, "time")
        if code.endswith(CLEARED_SUFFIX):
            if view.alarms.pop(code.removesuffix(CLEARED_SUFFIX), None) is not None:
                view.cleared_alarms += 1
            return True
        severity = str(doc.get("severity", "warning"))
        message = str(doc.get("message", ""))
        active = view.alarms.get(code)
        if active is None:
            view.alarms[code] = ActiveAlarm(code, severity, message, when, when)
        else:
            active.count += 1
            active.severity, active.message, active.last_time = severity, message, when
        return True

    # -- derived -------------------------------------------------------------------
    def telemetry_age_s(self, node_id: str) -> float | None:
        seen = self.nodes[node_id].telemetry_seen
        return None if seen is None else max(0.0, self.clock() - seen)

    def staleness(self, node_id: str) -> Staleness:
        view = self.nodes[node_id]
        if view.state == "offline":
            return Staleness.OFFLINE
        age = self.telemetry_age_s(node_id)
        if age is None:
            return Staleness.WAITING
        if age > STALE_INTERVALS * view.interval_s:
            return Staleness.STALE
        return Staleness.FRESH

    def qber_threshold_of(self, node_id: str) -> float:
        t = self.nodes[node_id].telemetry or {}
        value = _num(t, "qber_alarm_threshold")
        return self.qber_threshold if value is None else value

    def active_alarms(self) -> list[tuple[str, ActiveAlarm]]:
        """(node_id, alarm) pairs, most severe first, then oldest first."""
        out = [(n, a) for n, v in self.nodes.items() for a in v.alarms.values()]
        out.sort(key=lambda p: (SEVERITY_ORDER.get(p[1].severity, 3), p[1].first_time or 0.0))
        return out


# -- rendering -----------------------------------------------------------------------
def sparkline(values: Sequence[float | None], width: int | None = None) -> str:
    """Unicode blocks, scaled from 0 to the largest value; a missing point is a space.

    Scaling from 0 (not from the minimum) keeps a steady rate a flat line
    high up, and a rate that halves visibly halves.
    """
    points = list(values)[-width:] if width else list(values)
    known = [v for v in points if v is not None and v >= 0]
    top = max(known, default=0.0)
    out = []
    for v in points:
        if v is None:
            out.append(" ")
        elif top <= 0 or v <= 0:
            out.append(SPARK_BLOCKS[0])
        else:
            out.append(SPARK_BLOCKS[min(len(SPARK_BLOCKS) - 1, int(v / top * len(SPARK_BLOCKS)))])
    return "".join(out)


def si(value: float | None, unit: str, digits: int = 3) -> str:
    """``12300, "b/s"`` -> ``"12.3 kb/s"``; None -> ``"-"``."""
    if value is None:
        return "-"
    magnitude = abs(value)
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= factor:
            return f"{value / factor:.{digits}g} {prefix}{unit}"
    return f"{value:.{digits}g} {unit}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def _clock(epoch_s: float | None) -> str:
    return "?" if epoch_s is None else time.strftime("%H:%M:%S", time.localtime(epoch_s))


def _state_cell(state: MonitorState, node_id: str) -> Text:
    view = state.nodes[node_id]
    name = view.state or "unknown"
    text = Text(name, style=STATE_STYLE.get(name, ""))
    detail = (view.status or {}).get("detail")
    if isinstance(detail, str) and detail:
        text.append(f"\n{detail}", style="dim")
    return text


def _fresh_cell(state: MonitorState, node_id: str) -> Text:
    staleness = state.staleness(node_id)
    age = state.telemetry_age_s(node_id)
    age_text = "" if age is None else f" {age:.0f} s ago"
    if staleness is Staleness.FRESH:
        return Text(f"ok{age_text}", style="green")
    if staleness is Staleness.WAITING:
        return Text(str(staleness), style="dim")
    return Text(f"{str(staleness).upper()}{age_text}", style="bold red")


def _qber_style(qber: float | None, threshold: float) -> str:
    if qber is None:
        return "dim"
    return "bold red" if qber > threshold else "yellow" if qber > 0.8 * threshold else "green"


def _qber_cell(state: MonitorState, node_id: str) -> Text:
    """The run's QBER, the last interval's, and the threshold they are held against."""
    t = state.nodes[node_id].telemetry or {}
    threshold = state.qber_threshold_of(node_id)
    qber, last = _num(t, "qber"), _num(t, "qber_interval")
    text = Text(_pct(qber), style=_qber_style(qber, threshold))
    text.append("\nlast ")
    text.append(_pct(last), style=_qber_style(last, threshold))
    text.append(f"\nmax {100 * threshold:.1f} %", style="dim")
    return text


def _rate_cell(value: float | None, history: Sequence[float | None], width: int) -> Text:
    text = Text(si(value, "b/s"))
    text.append("\n" + sparkline(history, width), style="cyan")
    return text


def _lock_cell(t: Mapping[str, Any]) -> Text:
    locked = t.get("locked")
    if locked is None:
        return Text("-")
    if not locked:
        return Text("unlocked", style="yellow")
    text = Text("locked", style="green")
    offset, drift = _num(t, "offset_ps"), _num(t, "drift_ppm")
    # Only Alice holds the clock model: Bob's offset and drift are null.
    if offset is not None:
        text.append(f"\n{offset / 1e6:+.3f} µs", style="dim")
    if drift is not None:
        text.append(f"\n{drift:+.2f} ppm", style="dim")
    return text


def _detector_cell(t: Mapping[str, Any]) -> Text:
    detectors = t.get("detectors")
    if not isinstance(detectors, list) or not detectors:
        return Text("-")
    text = Text()
    for i, det in enumerate(detectors):
        if not isinstance(det, dict):
            continue
        if i:
            text.append("\n")
        text.append(f"{det.get('name', '?')} ")
        if det.get("error"):
            text.append(f"ERROR {det['error']}", style="bold red")
        elif det.get("latched"):
            text.append("LATCHED", style="bold red")
        else:
            text.append("ok", style="green")
            rate = _num(det, "count_rate_hz")
            if rate is not None:
                text.append(f" {si(rate, 'Hz')}", style="dim")
    return text


def _keys_cell(t: Mapping[str, Any]) -> Text:
    keys, bits = _num(t, "stored_keys"), _num(t, "stored_key_bits")
    if keys is None:
        return Text("-")
    text = Text(f"{keys:.0f} keys")
    if bits is not None:
        text.append(f"\n{si(bits, 'bit')}", style="dim")
    return text


def _alarm_count_cell(view: NodeView) -> Text:
    if not view.alarms:
        return Text("none", style="green")
    worst = min(view.alarms.values(), key=lambda a: SEVERITY_ORDER.get(a.severity, 3))
    return Text(str(len(view.alarms)), style=SEVERITY_STYLE.get(worst.severity, ""))


def _header(state: MonitorState) -> Text:
    text = Text("qnoded monitor", style="bold")
    text.append(f"  broker {state.broker or '?'}  ")
    if state.connected:
        text.append("connected", style="green")
        if state.reconnects:
            text.append(f" (reconnected {state.reconnects}x)", style="dim")
    else:
        text.append("DOWN", style="bold red")
        problem = state.problem()
        if problem:
            text.append(f": {problem}", style="red")
    text.append(f"  {len(state.nodes)} node(s)  {time.strftime('%H:%M:%S')}")
    if state.ignored:
        text.append(f"\n{state.ignored} message(s) ignored, last {state.last_ignored}", style="dim")
    return text


# Columns of the node table; wider content wraps, see _table_fits.
WRAP_AT = 16
COLUMNS = (
    "node",
    "state",
    "telemetry",
    "QBER",
    "sifted",
    "secret",
    "clock",
    "detectors",
    "stored",
    "alarms",
)


def _node_rows(state: MonitorState) -> list[list[Text]]:
    """One list of cells (in COLUMNS order) per node: command-line order, else by id."""
    rows = []
    for node_id in sorted(state.nodes) if not state.only else state.nodes:
        view = state.nodes[node_id]
        t = view.telemetry or {}
        name = Text(node_id, style="bold")
        what = [t[k] for k in ("role", "protocol") if isinstance(t.get(k), str)]
        if what:
            name.append("\n" + " ".join(what), style="dim")
        rows.append(
            [
                name,
                _state_cell(state, node_id),
                _fresh_cell(state, node_id),
                _qber_cell(state, node_id),
                _rate_cell(_num(t, "sifted_bits_per_s"), view.sifted_history, state.history),
                _rate_cell(_num(t, "secret_key_bits_per_s"), view.secret_history, state.history),
                _lock_cell(t),
                _detector_cell(t),
                _keys_cell(t),
                _alarm_count_cell(view),
            ]
        )
    return rows


def _alarm_table(state: MonitorState) -> RenderableType:
    alarms = state.active_alarms()
    if not alarms:
        return Text("no active alarms", style="green")
    table = Table(title="active alarms", title_justify="left")
    for column in ("node", "severity", "code", "since", "count", "message"):
        table.add_column(column)
    for node_id, alarm in alarms:
        table.add_row(
            node_id,
            Text(alarm.severity, style=SEVERITY_STYLE.get(alarm.severity, "")),
            alarm.code,
            _clock(alarm.first_time),
            str(alarm.count),
            alarm.message,
        )
    return table


def _node_table(rows: Sequence[Sequence[Text]]) -> Table:
    table = Table(show_lines=True)
    for column in COLUMNS:
        table.add_column(column)
    for cells in rows:
        table.add_row(*cells)
    return table


def _node_cards(rows: Sequence[Sequence[Text]]) -> Columns:
    cards = []
    for cells in rows:
        card = Table.grid(padding=(0, 1))
        card.add_column(style="bold")
        card.add_column()
        for label, cell in zip(COLUMNS[1:], cells[1:], strict=True):
            card.add_row(label, cell)
        cards.append(Panel(card, title=cells[0], title_align="left", expand=False))
    return Columns(cards)


def _table_fits(console: Console, options: ConsoleOptions, rows: Sequence[Sequence[Text]]) -> bool:
    """Whether the node table fits with no column narrower than its content or WRAP_AT.

    Free text (a status detail) may wrap; figures squeezed into one-word
    columns may not, so below this width the cards are more readable.
    """
    # Measured unbounded: Measurement.get clamps to the width it is given.
    wide = options.update_width(1 << 16)
    total = 1 + 3 * len(COLUMNS)  # the table's borders and each column's padding
    for i, title in enumerate(COLUMNS):
        natural = max([len(title)] + [Measurement.get(console, wide, r[i]).maximum for r in rows])
        total += min(natural, WRAP_AT)
    return total <= options.max_width


class Dashboard:
    """One frame: header, nodes, active alarms.

    The nodes are one table row each when the table fits the console's
    width; on a narrower terminal each node becomes a card of label/value
    lines, laid side by side as far as they go.
    """

    def __init__(self, state: MonitorState) -> None:
        self.state = state

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        state = self.state
        yield _header(state)
        rows = _node_rows(state)
        if not rows:
            yield Text("no node heard from yet", style="dim")
        elif _table_fits(console, options, rows):
            yield _node_table(rows)
        else:
            yield _node_cards(rows)
        yield _alarm_table(state)


def render(state: MonitorState) -> RenderableType:
    """One frame of the dashboard for ``state`` (laid out when printed, for the console's width)."""
    return Dashboard(state)


# -- the loop ------------------------------------------------------------------------
def topic_filters(nodes: Sequence[str]) -> list[str]:
    """The subscriptions: each leaf for each node, or for ``+`` (every node)."""
    return [f"{TOPIC_ROOT}/{n}/{leaf}" for n in (nodes or ["+"]) for leaf in LEAVES]


def decode_payload(raw: object) -> object:
    """JSON-decode a message body; text that is not JSON comes back as a str."""
    if isinstance(raw, bytes | bytearray):
        try:
            return json.loads(raw)
        except ValueError:
            return bytes(raw).decode("utf-8", "replace")
    return raw


class _LibraryErrors(logging.Handler):
    """Hands the MQTT library's error lines to the model (shown in the header)."""

    def __init__(self, state: MonitorState) -> None:
        super().__init__(logging.ERROR)
        self.state = state

    def emit(self, record: logging.LogRecord) -> None:
        self.state.note_library_error(record.getMessage())


@contextlib.contextmanager
def _library_errors_to(state: MonitorState) -> Iterator[None]:
    # The dashboard shows them; printed to stderr on every retry they would
    # also scroll through the live view.
    logger = logging.getLogger(LIBRARY_LOGGER)
    handler = _LibraryErrors(state)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


async def _receive_loop(
    settings: MqttSettings,
    filters: Sequence[str],
    state: MonitorState,
    ready: Sequence[asyncio.Event],
) -> None:
    """Subscribe and feed ``state`` until cancelled; reconnect with backoff on any MQTT error.

    State changes (up, down and why) go into the model, which the dashboard
    shows: log lines would scroll through the live view.
    """
    attempt = 0
    while True:
        try:
            async with settings.client() as client:
                for topic_filter in filters:
                    await client.subscribe(topic_filter, qos=1)
                attempt = 0
                state.connection_up()
                for event in ready:
                    event.set()
                async for message in client.messages:
                    state.update(str(message.topic), decode_payload(message.payload))
        except aiomqtt.MqttError as exc:
            state.connection_down(str(exc) or type(exc).__name__)
        for event in ready:
            event.clear()
        attempt += 1
        await asyncio.sleep(backoff_s(attempt, base_s=BACKOFF_BASE_S, cap_s=BACKOFF_CAP_S))


def check_settings(settings: MqttSettings) -> None:
    """Fail early, naming the option, on TLS files that are missing or do not load."""
    for option, path in (("--ca", settings.tls_ca), ("--cert", settings.tls_cert)):
        if path is not None and not Path(path).is_file():
            raise MonitorUsageError(f"{option} {path}: no such file")
    if settings.tls_key is not None:
        if settings.tls_cert is None:
            raise MonitorUsageError("--key needs --cert (the certificate it belongs to)")
        if not Path(settings.tls_key).is_file():
            raise MonitorUsageError(f"--key {settings.tls_key}: no such file")
    # paho loads these files only when it connects, and a reconnect loop
    # would retry a broken key forever: load them once here, as paho will.
    try:
        if settings.tls_ca is not None:
            ssl.create_default_context(cafile=settings.tls_ca)
        if settings.tls_cert is not None:
            context = ssl.create_default_context()
            context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError: bad PEM, key mismatch
        raise MonitorUsageError(
            f"TLS files (--ca {settings.tls_ca}, --cert {settings.tls_cert}, "
            f"--key {settings.tls_key}) do not load: {exc}"
        ) from exc


async def run_monitor(
    settings: MqttSettings,
    nodes: Sequence[str],
    console: Console,
    refresh_s: float = DEFAULT_REFRESH_S,
    once_after_s: float | None = None,
    *,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    state: MonitorState | None = None,
    ready: asyncio.Event | None = None,
) -> MonitorState:
    """Watch ``nodes`` (all when empty) on the broker of ``settings``.

    Without ``once_after_s``: a live dashboard on ``console``, redrawn every
    ``refresh_s``, until cancelled; broker outages show in its header and the
    connection comes back by itself.  With ``once_after_s``: wait up to
    ``connect_timeout_s`` for the broker (:class:`BrokerUnreachableError` if it
    does not answer), collect for ``once_after_s`` from then, print one frame
    and return.  ``ready`` is set whenever the subscriptions are in place.
    """
    check_settings(settings)
    if state is None:
        state = MonitorState(nodes, broker=f"{settings.host}:{settings.port}")
    subscribed = asyncio.Event()
    events = [subscribed] if ready is None else [subscribed, ready]
    filters = topic_filters(nodes)
    with _library_errors_to(state):
        if once_after_s is None:
            await _live(
                settings,
                filters=filters,
                state=state,
                events=events,
                console=console,
                refresh_s=refresh_s,
            )
            return state  # not reached: _live runs until cancelled
        unreachable = False
        async with asyncio.TaskGroup() as tg:
            receiver = tg.create_task(
                _receive_loop(settings, filters, state, events), name="monitor-receive"
            )
            try:
                async with asyncio.timeout(connect_timeout_s):
                    await subscribed.wait()
            except TimeoutError:
                unreachable = True
            else:
                await asyncio.sleep(once_after_s)
                console.print(render(state))
            receiver.cancel()
    if unreachable:
        raise BrokerUnreachableError(
            f"cannot reach the MQTT broker {settings.host}:{settings.port} within "
            f"{connect_timeout_s:g} s: {state.problem() or 'no answer'}"
        )
    return state


async def _live(
    settings: MqttSettings,
    *,
    filters: Sequence[str],
    state: MonitorState,
    events: Sequence[asyncio.Event],
    console: Console,
    refresh_s: float,
) -> None:
    # Redrawn by us, not by Live's thread: the model is only touched from
    # the event loop.  No stdout/stderr redirection: nothing else prints.
    with Live(
        render(state),
        console=console,
        auto_refresh=False,
        redirect_stdout=False,
        redirect_stderr=False,
    ) as live:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(_receive_loop(settings, filters, state, events), name="monitor-receive")
            while True:
                await asyncio.sleep(refresh_s)
                live.update(render(state), refresh=True)


# -- command line -------------------------------------------------------------------
def broker_arg(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:1883`` for IPv6) -> (host, port); argparse error otherwise."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:1883, or broker.example:8883 with TLS)"
        )
    return host, int(port)


def node_arg(text: str) -> str:
    if not text or any(c in text for c in "/+#"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a node id (one topic level: no '/', '+' or '#')"
        )
    return text


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _history(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of points, got {text!r}")
    return int(text)


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 0.5:
        raise argparse.ArgumentTypeError(f"expected a QBER in (0, 0.5], got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Live dashboard of the status, telemetry and alarms of QKD nodes on an MQTT broker: "
        "state, QBER against its threshold, sifted and secret key rates with their recent "
        "history, clock lock, detectors, stored keys, active alarms and stale nodes."
    )
    p.add_argument("nodes", nargs="*", type=node_arg, metavar="NODE", help="node ids (default all)")
    p.add_argument(
        "--broker",
        type=broker_arg,
        default=("127.0.0.1", 1883),
        metavar="HOST:PORT",
        help="MQTT broker (default 127.0.0.1:1883)",
    )
    tls = p.add_argument_group(
        "TLS and credentials (the production broker wants --ca/--cert/--key)"
    )
    tls.add_argument("--ca", metavar="PEM", help="CA certificate of the broker; turns TLS on")
    tls.add_argument("--cert", metavar="PEM", help="client certificate (CN e.g. 'monitor')")
    tls.add_argument("--key", metavar="PEM", help="its private key")
    tls.add_argument("--username", help="MQTT username (a dev broker)")
    tls.add_argument(
        "--password", help=f"MQTT password (better: ${PASSWORD_ENV}, not visible in ps)"
    )
    p.add_argument(
        "--refresh",
        type=_positive,
        default=DEFAULT_REFRESH_S,
        metavar="SECONDS",
        help=f"redraw interval (default {DEFAULT_REFRESH_S:g})",
    )
    p.add_argument(
        "--once",
        type=_positive,
        metavar="SECONDS",
        help="collect for SECONDS once connected, print one frame and exit",
    )
    p.add_argument(
        "--connect-timeout",
        type=_positive,
        default=CONNECT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"with --once: give up if the broker does not answer (default {CONNECT_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--history",
        type=_history,
        default=DEFAULT_HISTORY,
        metavar="N",
        help=f"telemetry points in the rate sparklines (default {DEFAULT_HISTORY})",
    )
    p.add_argument(
        "--qber-threshold",
        type=_threshold,
        default=DEFAULT_QBER_THRESHOLD,
        metavar="Q",
        help="QBER alarm threshold shown for nodes whose telemetry does not carry theirs "
        f"(default {DEFAULT_QBER_THRESHOLD:g}, the config default)",
    )


def monitor_command(args: argparse.Namespace, console: Console | None = None) -> int:
    """``qnoded monitor``: 0 on success, 1 if the broker is unreachable, 2 on bad options."""
    host, port = args.broker
    settings = MqttSettings(
        host,
        port,
        username=args.username,
        password=args.password or os.environ.get(PASSWORD_ENV),
        tls_ca=args.ca,
        tls_cert=args.cert,
        tls_key=args.key,
    )
    state = MonitorState(
        args.nodes,
        history=args.history,
        qber_threshold=args.qber_threshold,
        broker=f"{host}:{port}",
    )
    out = console or Console()

    async def monitor() -> None:
        task = asyncio.current_task()
        assert task is not None
        if threading.current_thread() is threading.main_thread():  # signals reach no other
            # SIGTERM and Ctrl-C cancel: Live then restores the cursor and
            # prints its last frame, the connection is closed cleanly.
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await run_monitor(
                settings,
                args.nodes,
                out,
                args.refresh,
                args.once,
                connect_timeout_s=args.connect_timeout,
                state=state,
            )

    try:
        asyncio.run(monitor())
    except MonitorUsageError as exc:
        sys.stderr.write(f"qnoded monitor: {exc}\n")
        return 2
    except MonitorError as exc:
        sys.stderr.write(f"qnoded monitor: {exc}\n")
        return 1
    return 0
