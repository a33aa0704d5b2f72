"""A single-photon detector controller speaking SCPI over a serial line (real I/O).

Options (a ``[devices.NAME]`` row with ``driver = "scpi-detector"``):

``port``
    required: ``/dev/ttyUSB0``, a stable ``/dev/serial/by-id/...`` name, or a pty.
``channel``
    required: the tagger input this detector feeds, 0..63.
``baudrate``
    115200 by default (8 data bits, no parity, 1 stop bit, no flow control).
``timeout_s``
    1.0 by default: the bound on every round trip (the handshake on open included).
``bias_v``, ``trigger_level_v``
    optional: applied on every open, so a power-cycled controller gets them back.
``reset_on_open``
    false by default: send ``*RST`` on the first open.  Off because a daemon
    restart must not re-bias a detector that is counting.

The wire protocol
-----------------
ASCII lines; each message ends with LF (the instrument accepts CR LF and ends
its answers with LF).  Headers are SCPI (IEEE 488.2, SCPI-99): case-insensitive,
short or long form (``SOUR:VOLT`` is ``SOURce:VOLTage``); several message units
go in one line separated by ``;``, each after the first with a leading ``:``
(an absolute header).  A query answers one line, the answers of its units
separated by ``;``.  A set command answers nothing: whether it worked is read
from the error queue.  Numbers are NR1, NR2 or NR3 (``1``, ``1.2``,
``1.200000E+00``); ``9.91E+37`` is SCPI's not-a-number (the value could not be
measured, and an error is queued).  After an error the rest of the message is
not run.

====================  ===============================================================
``*IDN?``             ``maker,model,serial,firmware``
``*RST``              settings (bias, trigger level) to their defaults; a latch stays
``*CLS``              clear the error queue
``*OPC?``             ``1``: a round trip that changes nothing (``ping``)
``SYST:ERR?``         the oldest queued error, ``code,"message"``; ``0,"No error"``
``SOUR:VOLT <v>``     set the bias, volts (out of range: -222)
``SOUR:VOLT?``        the bias, volts
``TRIG:LEV <v>``      set the discriminator trigger level, volts (out of range: -222)
``TRIG:LEV?``         the trigger level, volts
``SENS:EFF?``         detection efficiency at the present bias (calibration), 0..1
``SENS:MODE?``        ``GATED`` or ``FREE`` (free running)
``SENS:DEAD?``        dead time, seconds
``MEAS:COUN?``        count rate over the counter's last gate, Hz
``MEAS:DARK?``        calibrated dark-count rate at the present bias, Hz
``MEAS:TEMP?``        detector temperature, kelvin
``MEAS:CURR?``        photocurrent (DC through the detector), amperes: it rises
                      while the count rate collapses when bright light blinds the
                      detector (Lydersen et al., Nat. Photonics 4, 686, 2010)
``STAT:LATCH?``       ``1`` while latched (counting nothing), else ``0``
``LATCH:RES``         try to unlatch (an SNSPD: bias down and back up); still
                      latched afterwards if the cause remains (bias too high)
====================  ===============================================================

Error codes are SCPI's: -1xx command errors (-113 undefined header, -104 data
type), -2xx execution errors (-222 data out of range, -240 hardware error), -3xx
and positive codes device-specific (-350 queue overflow), -4xx query errors.  The
queue holds 10.  The emulator (``hil/serial_detector.py``) also takes
``EMU:FAULT ...``, which this driver never sends.

How the driver uses it: on open ``*IDN?``, ``*CLS``, ``SENS:MODE?`` (then
``*RST`` if asked, and its own setpoints); after every set command ``SYST:ERR?``
until ``0``, then the value read back (a set command lost on the line reports
no error); ``status()`` is one compound query, so its figures belong together.
After a timeout, the next round trip first sends ``*IDN?`` and drops every line
before its answer: a late answer to the query that timed out is never read as
another query's.

Failures are :class:`~qnoded.contracts.DeviceError` subclasses naming the
device, its port and the command: :class:`InstrumentError` (with SCPI-class
subclasses) carries the instrument's own code and message; :class:`BadAnswerError`
an answer that does not parse; :class:`SettingNotAppliedError` a value that does
not read back; :class:`ScpiTimeoutError` a round trip over ``timeout_s``;
:class:`LineDownError` a port that dropped (end of file, EIO) or will not open.
The driver does not retry in a loop of its own: the next call reopens a dropped
line (and re-applies this driver's setpoints), so the node's periodic status
reads are the reconnect loop, and a failed reopen costs one ``open()``.  The
line going down and coming back are logged once each.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import termios
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, ClassVar, Protocol, Self

# pyserial ships no type information (no py.typed, and types-pyserial is not a
# dependency); the untyped surface is confined to _open_port below.
import serial  # type: ignore[import-untyped]
import structlog

from qnoded.contracts import DetectorStatus, DeviceError, DeviceKind, DriverContext
from qnoded_drivers.scpi import parse_error_entry

log = structlog.get_logger("qnoded_drivers.scpi_detector")

_KEYS = frozenset(
    {"port", "channel", "baudrate", "timeout_s", "bias_v", "trigger_level_v", "reset_on_open"}
)
MAX_ANSWER = 4096  # bytes without a line end: the answer is garbage, not slow
ERROR_QUEUE_LENGTH = 10
# Read-back tolerance of a setpoint (relative, and absolute in volts): a 16-bit DAC
# over a few volts resolves ~0.1 mV, so 1e-3 is well above quantisation.
SETPOINT_TOLERANCE = 1e-3
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_MODES = {"GATED": "gated", "FREE": "free-running"}


# -- errors ----------------------------------------------------------------------------


class ScpiError(DeviceError):
    """A round trip with the controller failed; names the device, its port and the command."""

    def __init__(self, device: str, port: str, command: str, detail: str) -> None:
        super().__init__(f"detector {device!r} on {port}: {command}: {detail}")
        self.device = device
        self.port = port
        self.command = command


class LineDownError(ScpiError):
    """The serial line dropped (end of file, EIO) or would not open; the next call reopens."""


class ScpiTimeoutError(ScpiError):
    """No complete answer within ``timeout_s``; the line stays open."""


class BadAnswerError(ScpiError):
    """The answer does not parse as what the command returns (line noise, wrong device)."""


class SettingNotAppliedError(ScpiError):
    """A set command reported no error but its value does not read back (lost on the line)."""


class InstrumentError(ScpiError):
    """The controller reported an error in its queue: ``code`` and its own ``message``.

    ``errors`` holds every error read after the command, oldest first.
    """

    def __init__(
        self, device: str, port: str, command: str, errors: Sequence[tuple[int, str]]
    ) -> None:
        code, message = errors[0]
        detail = f'instrument error {code},"{message}"'
        if len(errors) > 1:
            detail += " (then " + "; ".join(f'{c},"{m}"' for c, m in errors[1:]) + ")"
        super().__init__(device, port, command, detail)
        self.code = code
        self.instrument_message = message
        self.errors = tuple(errors)


class CommandSyntaxError(InstrumentError):
    """SCPI -1xx: the controller did not understand the command (wrong device or firmware)."""


class ExecutionError(InstrumentError):
    """SCPI -2xx: understood but not done (out of range, hardware error, settings conflict)."""


class DeviceSpecificError(InstrumentError):
    """SCPI -3xx and positive codes: the controller's own faults."""


class QueryError(InstrumentError):
    """SCPI -4xx: an answer was lost or interrupted."""


def instrument_error(
    device: str, port: str, command: str, errors: Sequence[tuple[int, str]]
) -> InstrumentError:
    """The typed exception for a list of queued errors, chosen by the first code's class."""
    code = errors[0][0]
    cls: type[InstrumentError]
    if -199 <= code <= -100:
        cls = CommandSyntaxError
    elif -299 <= code <= -200:
        cls = ExecutionError
    elif -399 <= code <= -300 or code > 0:
        cls = DeviceSpecificError
    elif -499 <= code <= -400:
        cls = QueryError
    else:  # -5xx..-8xx are events (power on, operation complete), not failures
        cls = InstrumentError
    return cls(device, port, command, errors)


# -- parsing answers ---------------------------------------------------------------------


def parse_number(text: str) -> float:
    """An NR1/NR2/NR3 number; ValueError for anything else, SCPI's NaN included."""
    if not _NUMBER.fullmatch(text):
        raise ValueError(f"{text[:40]!r} is not a number")
    value = float(text)
    if abs(value) >= 9.9e37:  # SCPI's NaN is 9.91E+37, its infinities +-9.9E+37
        raise ValueError(f"{text} is SCPI's not-a-number (the value could not be measured)")
    return value


def _flag(text: str) -> float:
    if text not in ("0", "1"):
        raise ValueError(f"{text[:40]!r} is not 0 or 1")
    return float(text)


def _at_least(low: float, *, above: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = parse_number(text)
        if value < low or (above and value == low):
            raise ValueError(f"{text} is implausible (must be {'>' if above else '>='} {low:g})")
        return value

    return parse


def _fraction(text: str) -> float:
    value = parse_number(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{text} is not an efficiency in [0, 1]")
    return value


parse_error = parse_error_entry  # a SYST:ERR? answer (qnoded_drivers.scpi)


# One status snapshot in one round trip, so the figures belong together.
_STATUS: tuple[tuple[str, Callable[[str], float]], ...] = (
    ("SOUR:VOLT?", _at_least(0.0)),
    ("SENS:EFF?", _fraction),
    ("SENS:DEAD?", _at_least(0.0, above=True)),
    ("MEAS:TEMP?", _at_least(0.0, above=True)),
    ("STAT:LATCH?", _flag),
    ("MEAS:COUN?", _at_least(0.0)),
    ("MEAS:DARK?", _at_least(0.0)),
    ("MEAS:CURR?", parse_number),  # a current meter may read a small negative offset
    ("TRIG:LEV?", _at_least(0.0)),
)


# -- the serial line: the driver's only I/O --------------------------------------------------


class _Port(Protocol):
    """What this driver uses of a ``serial.Serial``."""

    def fileno(self) -> int: ...

    def reset_input_buffer(self) -> None: ...

    def reset_output_buffer(self) -> None: ...

    def close(self) -> None: ...


def _open_port(path: str, baudrate: int) -> _Port:
    # pyserial opens with O_NONBLOCK and configures with tcsetattr(TCSANOW): neither
    # waits on the line, so this is safe on the event loop.  exclusive=True takes
    # flock() on the port: two daemons (or a stray terminal) on one controller
    # would steal each other's answers.
    port: _Port = serial.Serial(
        port=path,
        baudrate=baudrate,
        bytesize=serial.EIGHTBITS,
        parity=serial.PARITY_NONE,
        stopbits=serial.STOPBITS_ONE,
        timeout=0,
        exclusive=True,
    )
    return port


class _SerialLine:
    """One open serial port, read by the event loop through ``loop.add_reader``.

    THE place where this driver does I/O.  Why not pyserial's blocking calls in a
    single-thread executor: a round trip that times out would leave the thread
    blocked in ``read()`` holding the port, cancelling it is impossible, and the
    next command would queue behind it.  Here the fd is non-blocking: the loop
    reads whatever arrives into a buffer (end of file and EIO are noted the
    moment they happen), ``asyncio.timeout`` bounds every wait exactly, and a
    cancelled wait leaves nothing running.  pyserial still opens and configures
    the port (baud rate, 8N1, raw mode, exclusive lock) and closes it.  POSIX
    only, as qnoded is.
    """

    def __init__(self, path: str, baudrate: int) -> None:
        port: _Port | None = None
        try:
            port = _open_port(path, baudrate)
            fd = port.fileno()
            # pyserial leaves the fd blocking after its open; the loop needs it not to.
            os.set_blocking(fd, False)
            port.reset_input_buffer()  # bytes from before we opened answer nobody
        except (OSError, termios.error, ValueError) as exc:  # SerialException is an OSError
            if port is not None:
                with contextlib.suppress(OSError, termios.error):
                    port.close()
            raise ConnectionError(f"cannot open: {exc}") from exc
        self._port = port
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._arrived = asyncio.Event()
        self._closed = False
        self.failure: str | None = None
        self._loop.add_reader(self._fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(f"read failed: {exc}")
            return
        if not data:
            self._fail("end of file: the device went away")
            return
        self._buffer += data
        self._arrived.set()

    def _fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
        self._loop.remove_reader(self._fd)
        self._arrived.set()

    def discard_input(self) -> None:
        """Drop unread bytes: a late answer to a timed-out query must not answer the next."""
        self._buffer.clear()
        with contextlib.suppress(OSError, termios.error):  # a dead line: the write will say
            self._port.reset_input_buffer()

    async def write(self, data: bytes) -> None:
        """All of ``data``; :class:`_NotSentError` if the line was dead before any of it left."""
        view = memoryview(data)
        while view:
            lost = _NotSentError if len(view) == len(data) else ConnectionError
            if self.failure is not None:
                raise lost(self.failure)
            try:
                written = os.write(self._fd, view)
            except BlockingIOError:
                await self._writable()
                continue
            except OSError as exc:
                self._fail(f"write failed: {exc}")
                raise lost(self.failure) from exc
            view = view[written:]

    async def _writable(self) -> None:
        ready: asyncio.Future[None] = self._loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        self._loop.add_writer(self._fd, wake)
        try:
            await ready
        finally:
            self._loop.remove_writer(self._fd)

    async def readline(self) -> bytes:
        """The next line without its terminator; ConnectionError if the line dropped."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return line.removesuffix(b"\r")
            if self.failure is not None:
                raise ConnectionError(self.failure)
            if len(self._buffer) > MAX_ANSWER:
                raise _OverlongAnswerError(bytes(self._buffer[:60]))
            self._arrived.clear()
            await self._arrived.wait()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.failure is None:
            self._loop.remove_reader(self._fd)
        with contextlib.suppress(OSError, termios.error):  # EIO on a dropped line
            # Unsent output would make close() wait for the UART to drain it.
            self._port.reset_output_buffer()
        with contextlib.suppress(OSError):
            self._port.close()


class _NotSentError(ConnectionError):
    """The line was dead before any byte of a message left: the message is not lost."""


class _OverlongAnswerError(Exception):
    def __init__(self, head: bytes) -> None:
        super().__init__(head)
        self.head = head


# -- the driver ----------------------------------------------------------------------------


class ScpiDetector:
    """A detector controller on a serial port; the class is its own driver factory.

    Implements the whole :class:`~qnoded.contracts.Detector` contract.  Beyond
    it: :meth:`set_trigger_level`, and ``status().extra`` carries
    ``photocurrent_a`` and ``trigger_level_v`` (blinding shows as the count rate
    collapsing while the photocurrent rises).  Reusable, not reentrant; every
    round trip holds one lock, so concurrent callers take turns on the line.
    """

    kind: ClassVar[DeviceKind] = DeviceKind.DETECTOR

    def __init__(self, name: str, options: Mapping[str, Any], context: DriverContext) -> None:
        unknown = set(options) - _KEYS
        if unknown:
            raise ValueError(
                f"unknown option(s) {sorted(unknown)}; valid: {', '.join(sorted(_KEYS))}"
            )
        port = options.get("port")
        if not isinstance(port, str) or not port:
            raise ValueError("option 'port' (the serial device, e.g. /dev/ttyUSB0) is required")
        if "channel" not in options:
            raise ValueError("option 'channel' (the tagger input this detector feeds) is required")
        channel = options["channel"]
        if isinstance(channel, bool) or not isinstance(channel, int) or not 0 <= channel < 64:
            raise ValueError(f"option 'channel' must be an integer 0..63, got {channel!r}")
        baudrate = options.get("baudrate", 115200)
        if isinstance(baudrate, bool) or not isinstance(baudrate, int) or baudrate <= 0:
            raise ValueError(f"option 'baudrate' must be a positive integer, got {baudrate!r}")
        timeout_s = _option_number(options, "timeout_s", 1.0)
        if timeout_s is None or timeout_s <= 0:
            raise ValueError(f"option 'timeout_s' must be > 0, got {options['timeout_s']!r}")
        reset = options.get("reset_on_open", False)
        if not isinstance(reset, bool):
            raise ValueError(f"option 'reset_on_open' must be true or false, got {reset!r}")
        self.name = name
        self._port = port
        self._channel = channel
        self._baudrate = baudrate
        self._timeout_s = timeout_s
        self._reset_on_open = reset
        # Setpoints this driver made: re-applied on every (re)open.
        self._bias_v = _option_number(options, "bias_v", None)
        self._trigger_v = _option_number(options, "trigger_level_v", None)
        self._identity: tuple[str, str, str, str] | None = None
        self._idn = ""  # the *IDN? answer as sent: the resynchronisation sentinel
        self._resync = False  # a round trip timed out: its answer may yet arrive
        self._mode = ""  # "gated" or "free-running": hardware, read once per open
        self._line: _SerialLine | None = None
        self._entered = False
        self._down = False  # logged once when the line drops, once when it is back
        self._opened_before = False
        self._lock = asyncio.Lock()

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError(f"detector {self.name!r} is already open")
        async with self._lock:
            self._entered = True
            try:
                await self._connect()
            except BaseException:
                self._entered = False
                raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        async with self._lock:  # never close the fd under a round trip in flight
            self._entered = False
            self._drop_line()

    async def ping(self) -> bool:
        try:
            async with self._lock:
                return await self._query("*OPC?") == "1"
        except DeviceError:
            return False

    def describe(self) -> Mapping[str, Any]:
        maker, model, serial_no, firmware = self._identity or ("", "", "", "")
        return {
            "driver": "scpi-detector",
            "port": self._port,
            "baudrate": self._baudrate,
            "channel": self._channel,
            "identity": ",".join(self._identity) if self._identity else "",
            "manufacturer": maker,
            "model": model,
            "serial_number": serial_no,
            "firmware": firmware,
            "mode": self._mode,
        }

    # -- the Detector contract ---------------------------------------------------------------

    @property
    def channel(self) -> int:
        return self._channel

    async def set_bias(self, volts: float) -> None:
        if not math.isfinite(volts) or volts < 0:
            raise ValueError(f"{self.name}: bias must be >= 0 V, got {volts}")
        async with self._lock:
            await self._set("SOUR:VOLT", volts)
            self._bias_v = float(volts)

    async def set_trigger_level(self, volts: float) -> None:
        """The discriminator threshold: too high and real detections are missed."""
        if not math.isfinite(volts) or volts < 0:
            raise ValueError(f"{self.name}: trigger level must be >= 0 V, got {volts}")
        async with self._lock:
            await self._set("TRIG:LEV", volts)
            self._trigger_v = float(volts)

    async def status(self) -> DetectorStatus:
        async with self._lock:
            values = await self._query_fields(_STATUS)
        bias, eff, dead_s, temp, latched, rate, dark, current, trigger = values
        return DetectorStatus(
            name=self.name,
            channel=self._channel,
            mode=self._mode,
            bias_v=bias,
            efficiency=eff,
            dead_time_ps=round(dead_s * 1e12),
            temperature_k=temp,
            latched=latched == 1.0,
            count_rate_hz=rate,
            dark_count_rate_hz=dark,
            extra={"photocurrent_a": current, "trigger_level_v": trigger},
        )

    async def reset_latch(self) -> bool:
        async with self._lock:
            await self._command("LATCH:RES")
            latched = await self._query("STAT:LATCH?")
            try:
                return _flag(latched) == 0.0
            except ValueError as exc:
                raise self._bad("STAT:LATCH?", str(exc)) from exc

    # -- round trips (the lock is held by the caller) -------------------------------------------

    async def _connect(self, why: str = "open") -> None:
        try:
            self._line = _SerialLine(self._port, self._baudrate)
        except ConnectionError as exc:
            raise LineDownError(self.name, self._port, why, str(exc)) from exc
        self._resync = False  # a new line: what was buffered on the old one is gone
        try:
            answer = await self._query("*IDN?")
            fields = tuple(f.strip() for f in answer.split(","))
            if len(fields) != 4 or not all(fields[:2]):
                raise self._bad("*IDN?", f"{answer[:80]!r} is not maker,model,serial,firmware")
            identity = (fields[0], fields[1], fields[2], fields[3])
            if self._identity is not None and identity[:3] != self._identity[:3]:
                # Another instrument on this port: its calibration and limits are not
                # the ones this node was set up for.  An operator must decide.
                raise ScpiError(
                    self.name,
                    self._port,
                    "*IDN?",
                    f"a different instrument answers: {answer!r}, was "
                    f"{','.join(self._identity)!r}; restart the node if the swap is intended",
                )
            await self._command("*CLS")  # errors queued before we came are nobody's
            mode = await self._query("SENS:MODE?")
            if mode.upper() not in _MODES:
                raise self._bad("SENS:MODE?", f"{mode[:40]!r} is not GATED or FREE")
            if self._reset_on_open and not self._opened_before:
                await self._command("*RST")
            if self._bias_v is not None:
                await self._set("SOUR:VOLT", self._bias_v)
            if self._trigger_v is not None:
                await self._set("TRIG:LEV", self._trigger_v)
        except BaseException:
            self._drop_line()
            raise
        self._identity = identity
        self._idn = answer
        self._mode = _MODES[mode.upper()]
        self._opened_before = True
        if self._down:
            self._down = False
            log.info("detector line up", device=self.name, port=self._port, identity=answer)

    def _line_lost(self, reason: str) -> None:
        self._drop_line()
        if not self._down:  # log the state change, not every failed reopen
            self._down = True
            log.warning("detector line down", device=self.name, port=self._port, reason=reason)

    def _drop_line(self) -> None:
        if self._line is not None:
            self._line.close()
            self._line = None

    async def _open_line(self, label: str) -> _SerialLine:
        """The open line, reopened first if it dropped since the last round trip."""
        if self._line is not None and self._line.failure is not None:
            self._line_lost(self._line.failure)
        if self._line is None:
            if not self._entered:
                raise LineDownError(self.name, self._port, label, "the device is not open")
            await self._connect(f"reopen for {label}")
        assert self._line is not None  # _connect either set it or raised
        return self._line

    async def _exchange(self, message: str, *, answer: bool, label: str) -> str | None:
        """Send one message; for a query read one answer line.  ``label`` names it in errors."""
        data = message.encode("ascii") + b"\n"
        raw: bytes | None = None
        for resend in (False, True):
            line = await self._open_line(label)
            if self._resync:
                await self._resynchronise(line, label)
            line.discard_input()
            try:
                async with asyncio.timeout(self._timeout_s):
                    await line.write(data)
                    if answer:
                        raw = await line.readline()
                break
            except _NotSentError as exc:
                # The line had dropped before this message (the loop had not yet
                # seen its end of file): nothing went out, so reopen and send it again.
                self._line_lost(str(exc))
                if resend:
                    raise self._line_down(label, exc) from exc
            except TimeoutError as exc:
                self._resync = self._identity is not None
                raise ScpiTimeoutError(
                    self.name, self._port, label, f"no answer within {self._timeout_s:g} s"
                ) from exc
            except ConnectionError as exc:
                self._line_lost(str(exc))
                raise self._line_down(label, exc) from exc
            except _OverlongAnswerError as exc:
                raise self._bad(
                    label, f"answered {MAX_ANSWER}+ bytes without a line end: {exc.head!r}..."
                ) from exc
        if raw is None:
            return None
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            text = ""
        if not text.isprintable() or not text.strip():
            raise self._bad(label, f"answered garbage {raw[:60]!r}")
        return text.strip()

    async def _resynchronise(self, line: _SerialLine, label: str) -> None:
        """Bring the line back in step after a timeout.

        A busy instrument may still answer the query that timed out, and that
        answer would be read as the next query's.  Discarding input is not
        enough (it may come later), so ask for the identity, which no other query
        answers, and drop every line before it.  Its own timeout: a still-busy
        instrument fails this call, and the next call tries again.
        """
        command = f"*IDN? (resynchronising before {label})"
        expected = self._idn.encode("ascii")
        line.discard_input()
        try:
            async with asyncio.timeout(self._timeout_s):
                await line.write(b"*IDN?\n")
                while (await line.readline()).strip() != expected:
                    pass  # a late answer to an earlier query
        except TimeoutError as exc:
            raise ScpiTimeoutError(
                self.name,
                self._port,
                command,
                f"no answer within {self._timeout_s:g} s: the instrument is still busy",
            ) from exc
        except ConnectionError as exc:
            self._line_lost(str(exc))
            raise self._line_down(command, exc) from exc
        except _OverlongAnswerError as exc:
            raise self._bad(command, f"{MAX_ANSWER}+ bytes without a line end") from exc
        self._resync = False

    def _line_down(self, label: str, exc: ConnectionError) -> LineDownError:
        return LineDownError(
            self.name, self._port, label, f"serial line dropped ({exc}); the next call reopens it"
        )

    async def _query(self, query: str, *, label: str | None = None) -> str:
        text = await self._exchange(query, answer=True, label=label or query)
        assert text is not None  # a query always returns a line or raises
        return text

    async def _command(self, command: str) -> None:
        """A set command, then the error queue: raises the instrument's error if it failed."""
        await self._exchange(command, answer=False, label=command)
        errors = await self._read_errors(command)
        if errors:
            raise instrument_error(self.name, self._port, command, errors)

    async def _set(self, header: str, value: float) -> None:
        """Set a value, check the error queue, and read it back.

        A set command answers nothing, so one lost on the line (noise, a busy
        controller) would pass unnoticed; the readback catches it.  The tolerance
        allows for the instrument's DAC resolution.
        """
        command = f"{header} {value:.9G}"
        await self._command(command)
        query = f"{header}?"
        answer = await self._query(query, label=f"{query} after {command}")
        try:
            actual = parse_number(answer)
        except ValueError as exc:
            raise self._bad(f"{query} after {command}", str(exc)) from exc
        if not math.isclose(actual, value, rel_tol=SETPOINT_TOLERANCE, abs_tol=SETPOINT_TOLERANCE):
            raise SettingNotAppliedError(
                self.name, self._port, command, f"reads back {answer}: the setting was not applied"
            )

    async def _read_errors(self, after: str) -> list[tuple[int, str]]:
        """Empty the instrument's error queue (oldest first)."""
        errors: list[tuple[int, str]] = []
        label = f"SYST:ERR? after {after}"
        for _ in range(ERROR_QUEUE_LENGTH + 1):
            answer = await self._query("SYST:ERR?", label=label)
            try:
                code, message = parse_error(answer)
            except ValueError as exc:
                raise self._bad(label, str(exc)) from exc
            if code == 0:
                return errors
            errors.append((code, message))
        raise self._bad(label, f"the error queue does not empty: {errors}")

    async def _query_fields(
        self, fields: Sequence[tuple[str, Callable[[str], float]]]
    ) -> list[float]:
        """One compound query; each answer parsed.  A short or bad answer is explained by
        the error queue when the instrument has queued an error, else it is garbage."""
        query = ";:".join(header for header, _ in fields)
        answer = await self._query(query)
        parts = answer.split(";")
        try:
            if len(parts) != len(fields):
                raise ValueError(
                    f"{len(parts)} value(s) for {len(fields)} queries: {answer[:80]!r}"
                )
            return [parse(part.strip()) for (_, parse), part in zip(fields, parts, strict=True)]
        except ValueError as exc:
            bad = self._bad(query, str(exc))
            try:
                errors = await self._read_errors(query)
            except ScpiError:
                raise bad from exc  # the queue cannot be read either: report the first fault
            if errors:
                raise instrument_error(self.name, self._port, query, errors) from exc
            raise bad from exc

    def _bad(self, command: str, detail: str) -> BadAnswerError:
        return BadAnswerError(self.name, self._port, command, detail)


def _option_number(options: Mapping[str, Any], key: str, default: float | None) -> float | None:
    value = options.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"option {key!r} must be a number, got {value!r}")
    if value < 0:
        raise ValueError(f"option {key!r} must be >= 0, got {value!r}")
    return float(value)
