"""A wire-level emulator of a SCPI single-photon detector controller on a pseudo-terminal.

Run it as ``python hil/serial_detector.py [options]``.  It opens a pty, prints one
readiness line on stdout, ``READY /dev/pts/N`` (the slave device to open with
pyserial, or the ``qnoded`` driver ``scpi-detector``), and then answers the wire
protocol written down in ``drivers/qnoded_drivers/scpi_detector.py``: real
bytes over a real tty, so the driver's serial code runs unchanged against it.

``--link PATH`` also makes ``PATH`` a symlink to the slave, replaced atomically
and removed on exit, the way udev gives a USB adapter a stable
``/dev/serial/by-id/...`` name: an emulator restarted with the same ``--link``
is found again at the same port, as a re-plugged instrument would be.

``--wire-log PATH`` appends every message that arrives on the line to ``PATH``
as it is run, one per line, after the emulator's ``time.monotonic()``
(``12.345678 LATCH:RES``): what the instrument was told and when, for a test
to count (a bench's serial sniffer, in effect).

The physics is small but honest: photons arrive at ``--photon-rate-hz``; the
detection efficiency is a logistic function of the bias; dark counts grow
exponentially with the bias; pulses pass
a discriminator whose trigger level is settable; a non-paralysable dead time
limits the rate; ``MEAS:COUN?`` draws a Poisson count over one counter gate
(``--gate-s``).  The SNSPD latches (goes resistive) when biased above its
switching point, and stays latched until ``LATCH:RES`` with the bias back below.

Misbehaviour, on demand
-----------------------
Each fault is one ``EMU:FAULT <name> [args]`` command.  It is accepted three
ways: on stdin (the tests' control channel: the emulator answers ``OK <command>``
or ``ERR <reason>`` on stdout once it is applied), on the serial line itself
(silent, like every set command; a bad one goes to the error queue), and at
start-up as ``--fault "<name> [args]"`` (repeatable).

``NONE``
    Clear every pending one-shot fault and the blinding light (a latch stays:
    it is the detector's state, cleared by ``LATCH:RES``).
``DROP``
    Close the pty and exit: the driver's next read sees end of file, its next
    write EIO.  ``--link`` is removed, so a reopen fails until a new emulator runs.
``STALL [n]``
    Swallow the next ``n`` (default 1) messages: no answer, no effect.
``GARBAGE [n]``
    Replace the next ``n`` (default 1) answers with line noise (non-ASCII bytes).
``DELAY <seconds>``
    The next message's answer goes out ``seconds`` late (a busy instrument);
    messages arriving meanwhile are run after it, in order.
``ERROR [code [message]]``
    The next message fails: a set command is not applied, a query answers the
    SCPI not-a-number ``9.91E+37``; the error (default
    ``-240,"Hardware error; bias supply tripped"``) goes to the ``SYST:ERR?`` queue.
``LATCH [n]``
    Latch the detector: count rate 0, ``STAT:LATCH?`` 1, until ``LATCH:RES``.
    With ``n``, it latches again at once after each of the next ``n`` resets (a
    detector that keeps coming back latched: running warm, or its bias creeping
    over the switching point); ``NONE`` ends that, the latch itself stays.
``BLIND [watts]``
    Shine bright CW light (default 1e-6 W) on the detector, as in a detector
    blinding attack (Lydersen et al., Nat. Photonics 4, 686, 2010): the count rate
    collapses while the photocurrent (``MEAS:CURR?``) rises.

stdin is the control channel: one command per line.  When stdin is a pipe (the
emulator was started by a program) its end of file ends the emulator, so it
never outlives the process that started it; from ``/dev/null`` there is no
control channel.  SIGTERM and SIGINT end it cleanly (the ``--link`` removed).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import selectors
import signal
import stat
import sys
import time
import tty
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import ClassVar, TextIO

import numpy as np

MAX_LINE = 1024  # longer input without a line end is an input buffer overrun (-363)
QUEUE_LENGTH = 10  # SCPI error queue depth; an overflow replaces the last entry with -350
SCPI_NAN = "9.91E+37"  # what a SCPI instrument answers for a value it could not measure
GARBAGE = b"\x8f\xfe#~!GARBLED\x00\x15"  # line noise: not ASCII, not a number
DEFAULT_ERROR = (-240, "Hardware error; bias supply tripped")
DEFAULT_BLIND_W = 1e-6
# A weak CW background already saturates the detector's recovery; at this
# power the count rate is down to 1/e (a smooth knee, not a switch).
BLIND_KNEE_W = 1e-8


class ScpiError(Exception):
    """An SCPI error: goes into the error queue as ``code,"message"``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f'{code},"{message}"')
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Preset:
    """One kind of detector: the parameters of the physical model."""

    identity_model: str
    mode: str  # "GATED" or "FREE", as SENS:MODE? answers
    bias_default_v: float
    bias_max_v: float  # the bias supply's range; above it: -222
    bias_half_v: float  # efficiency is half its maximum here ...
    bias_width_v: float  # ... and rises over this logistic width
    efficiency_max: float
    dark_rate_hz: float  # at the default bias and temperature
    dark_efold_v: float  # dark counts grow by e per this much bias (field-assisted)
    temperature_k: float
    temperature_noise_k: float
    dead_time_s: float
    latch_bias_v: float | None  # SNSPD switching point; above it the wire goes resistive
    pulse_amplitude_v: float  # mean height of an output pulse at the discriminator
    trigger_default_v: float
    trigger_max_v: float
    charge_per_count_c: float  # charge through the device per detection
    leakage_a: float
    responsivity_a_per_w: float  # linear-mode photocurrent under bright light


PRESETS: dict[str, Preset] = {
    # A free-running NbN SNSPD behind a current-bias source with a series
    # resistor, so the bias is in volts (as in qnoded's simulated SNSPD).
    "snspd": Preset(
        identity_model="SNSPD-1000",
        mode="FREE",
        bias_default_v=1.2,
        bias_max_v=3.0,
        bias_half_v=0.9,
        bias_width_v=0.06,
        efficiency_max=0.85,
        dark_rate_hz=100.0,
        dark_efold_v=0.1,
        temperature_k=2.5,
        temperature_noise_k=0.002,
        dead_time_s=50e-9,
        latch_bias_v=1.6,
        pulse_amplitude_v=0.5,
        trigger_default_v=0.2,
        trigger_max_v=2.0,
        charge_per_count_c=1e-13,
        leakage_a=1e-12,
        responsivity_a_per_w=0.5,
    ),
    # A gated InGaAs/InP SPAD, thermo-electrically cooled to 223 K.
    "spad": Preset(
        identity_model="SPAD-200",
        mode="GATED",
        bias_default_v=70.0,
        bias_max_v=90.0,
        bias_half_v=66.0,
        bias_width_v=1.2,
        efficiency_max=0.12,
        dark_rate_hz=1000.0,
        dark_efold_v=2.0,
        temperature_k=223.0,
        temperature_noise_k=0.05,
        dead_time_s=1e-6,
        latch_bias_v=None,
        pulse_amplitude_v=1.0,
        trigger_default_v=0.3,
        trigger_max_v=2.0,
        charge_per_count_c=1e-13,
        leakage_a=1e-10,
        responsivity_a_per_w=0.9,
    ),
}


@dataclass(slots=True)
class DetectorModel:
    """The detector's physical state and what its meters read."""

    preset: Preset
    photon_rate_hz: float
    gate_s: float
    rng: np.random.Generator
    bias_v: float = 0.0
    trigger_v: float = 0.0
    latched: bool = False
    blind_w: float = 0.0

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """*RST: settings to their defaults (a latch is the device's state, not a setting)."""
        self.bias_v = self.preset.bias_default_v
        self.trigger_v = self.preset.trigger_default_v

    def efficiency(self) -> float:
        p = self.preset
        return p.efficiency_max / (1.0 + math.exp(-(self.bias_v - p.bias_half_v) / p.bias_width_v))

    def dark_rate_hz(self) -> float:
        p = self.preset
        return p.dark_rate_hz * math.exp((self.bias_v - p.bias_default_v) / p.dark_efold_v)

    def avalanche_rate_hz(self) -> float:
        """Detections the device makes (before the discriminator), after dead time."""
        if self.latched:
            return 0.0
        raw = self.efficiency() * self.photon_rate_hz + self.dark_rate_hz()
        # Bright CW light keeps the device from recovering (blinding).
        raw *= math.exp(-self.blind_w / BLIND_KNEE_W)
        return raw / (1.0 + raw * self.preset.dead_time_s)  # non-paralysable dead time

    def trigger_pass(self) -> float:
        """Fraction of pulses above the discriminator: heights ~ N(A, (A/10)^2)."""
        a = self.preset.pulse_amplitude_v
        return 0.5 * math.erfc((self.trigger_v - a) / (math.sqrt(2.0) * 0.1 * a))

    def count_rate_hz(self) -> float:
        """One gate of the counter: a Poisson draw, as a rate."""
        mean = self.avalanche_rate_hz() * self.trigger_pass() * self.gate_s
        return float(self.rng.poisson(mean)) / self.gate_s

    def temperature_k(self) -> float:
        p = self.preset
        return p.temperature_k + float(self.rng.normal(0.0, p.temperature_noise_k))

    def photocurrent_a(self) -> float:
        p = self.preset
        mean = (
            p.leakage_a
            + p.charge_per_count_c * self.avalanche_rate_hz()
            + p.responsivity_a_per_w * self.blind_w
        )
        return mean * (1.0 + float(self.rng.normal(0.0, 0.01)))  # a 1 % current meter

    def set_bias(self, volts: float) -> None:
        self.bias_v = volts
        if self.preset.latch_bias_v is not None and volts > self.preset.latch_bias_v:
            self.latched = True  # above the switching current the wire goes resistive

    def reset_latch(self) -> None:
        """Drop the bias and bring it back: unlatches unless still above switching."""
        limit = self.preset.latch_bias_v
        self.latched = limit is not None and self.bias_v > limit


@dataclass(slots=True)
class Faults:
    """Misbehaviour waiting to happen."""

    stall: int = 0
    garbage: int = 0
    error: tuple[int, str] | None = None
    delay_s: float = 0.0
    drop: bool = False
    relatch: int = 0  # resets after which the detector latches again at once


_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
Handler = Callable[[str], str | None]


def _number(arg: str) -> float:
    if not arg:
        raise ScpiError(-109, "Missing parameter")
    if not _NUMBER.fullmatch(arg):
        raise ScpiError(-104, f"Data type error; not a number: {arg[:20]}")
    return float(arg)


def _no_argument(rest: str) -> None:
    if rest:
        raise ScpiError(-108, "Parameter not allowed")


def _count(rest: str) -> int:
    n = _number(rest) if rest else 1.0
    if not n.is_integer() or n < 1:
        raise ScpiError(-222, "Data out of range; a count must be a whole number >= 1")
    return int(n)


def _nr3(value: float) -> str:
    return f"{value:.6E}"


def _header_matches(spec: str, header: str) -> bool:
    """SCPI mnemonics: ``SOURce:VOLTage`` matches SOUR:VOLT, source:voltage, SOURCE:VOLT."""
    spec_nodes, nodes = spec.split(":"), header.split(":")
    if len(spec_nodes) != len(nodes):
        return False
    for s, h in zip(spec_nodes, nodes, strict=True):
        short = "".join(c for c in s if not c.islower())
        if h.upper() not in (s.upper(), short):
            return False
    return True


@dataclass(slots=True)
class Instrument:
    """The controller: parses messages, runs them on the model, keeps the error queue."""

    model: DetectorModel
    identity: str
    faults: Faults = field(default_factory=Faults)
    errors: list[tuple[int, str]] = field(default_factory=list)
    table: list[tuple[str, bool, Handler]] = field(default_factory=list)
    wire_log: TextIO | None = None  # --wire-log: every message from the line, timed

    def __post_init__(self) -> None:
        m = self.model
        # (mnemonic, is query, handler); a handler raises ScpiError to fail.
        self.table = [
            ("*IDN", True, lambda _: self.identity),
            ("*RST", False, lambda _: m.reset()),
            ("*CLS", False, lambda _: self.errors.clear()),
            ("*OPC", True, lambda _: "1"),
            ("SYSTem:ERRor", True, lambda _: self._next_error()),
            ("SOURce:VOLTage", False, self._set_bias),
            ("SOURce:VOLTage", True, lambda _: _nr3(m.bias_v)),
            ("TRIGger:LEVel", False, self._set_trigger),
            ("TRIGger:LEVel", True, lambda _: _nr3(m.trigger_v)),
            ("SENSe:EFFiciency", True, lambda _: _nr3(m.efficiency())),
            ("SENSe:MODE", True, lambda _: m.preset.mode),
            ("SENSe:DEADtime", True, lambda _: _nr3(m.preset.dead_time_s)),
            ("MEASure:COUNt", True, lambda _: _nr3(m.count_rate_hz())),
            ("MEASure:DARK", True, lambda _: _nr3(m.dark_rate_hz())),
            ("MEASure:TEMPerature", True, lambda _: _nr3(m.temperature_k())),
            ("MEASure:CURRent", True, lambda _: _nr3(m.photocurrent_a())),
            ("STATus:LATCh", True, lambda _: "1" if m.latched else "0"),
            ("LATCh:RESet", False, self._reset_latch),
            ("EMUlator:FAULt", False, self.fault),
        ]

    # -- the error queue ------------------------------------------------------------

    def push_error(self, code: int, message: str) -> None:
        if len(self.errors) >= QUEUE_LENGTH:
            self.errors[-1] = (-350, "Queue overflow")
            return
        self.errors.append((code, message))

    def _next_error(self) -> str:
        code, message = self.errors.pop(0) if self.errors else (0, "No error")
        return f'{code},"{message.replace(chr(34), chr(34) * 2)}"'

    # -- settings -------------------------------------------------------------------

    def _set_bias(self, arg: str) -> None:
        volts = _number(arg)
        limit = self.model.preset.bias_max_v
        if not 0.0 <= volts <= limit:
            raise ScpiError(-222, f"Data out of range; bias 0 to {limit:g} V")
        self.model.set_bias(volts)

    def _set_trigger(self, arg: str) -> None:
        volts = _number(arg)
        limit = self.model.preset.trigger_max_v
        if not 0.0 <= volts <= limit:
            raise ScpiError(-222, f"Data out of range; trigger level 0 to {limit:g} V")
        self.model.trigger_v = volts

    def _reset_latch(self, _: str) -> None:
        self.model.reset_latch()
        if self.faults.relatch:
            self.faults.relatch -= 1
            self.model.latched = True  # LATCH n: back at once

    def fault(self, arg: str) -> None:
        """``EMU:FAULT <name> [args]`` (see the module docstring)."""
        name, _, rest = arg.strip().partition(" ")
        apply = self._FAULTS.get(name.upper())
        if apply is None:
            raise ScpiError(-224, f"Illegal parameter value; no fault {name[:20]!r}")
        apply(self, rest.strip())

    def _fault_none(self, rest: str) -> None:
        _no_argument(rest)
        self.faults = Faults()
        self.model.blind_w = 0.0

    def _fault_drop(self, rest: str) -> None:
        _no_argument(rest)
        self.faults.drop = True

    def _fault_stall(self, rest: str) -> None:
        self.faults.stall += _count(rest)

    def _fault_garbage(self, rest: str) -> None:
        self.faults.garbage += _count(rest)

    def _fault_error(self, rest: str) -> None:
        code_text, _, message = rest.partition(" ")
        if not code_text:
            self.faults.error = DEFAULT_ERROR
            return
        code = _number(code_text)
        if not code.is_integer() or code == 0:
            raise ScpiError(-224, "Illegal parameter value; error code must be non-zero")
        self.faults.error = (int(code), message.strip().strip('"') or "Emulated error")

    def _fault_delay(self, rest: str) -> None:
        seconds = _number(rest)
        if not 0.0 < seconds <= 60.0:
            raise ScpiError(-222, "Data out of range; delay 0 to 60 s")
        self.faults.delay_s = seconds

    def _fault_latch(self, rest: str) -> None:
        self.faults.relatch = _count(rest) if rest else 0
        self.model.latched = True

    def _fault_blind(self, rest: str) -> None:
        watts = _number(rest) if rest else DEFAULT_BLIND_W
        if not watts >= 0.0:
            raise ScpiError(-222, "Data out of range; blinding power must be >= 0 W")
        self.model.blind_w = watts

    _FAULTS: ClassVar[dict[str, Callable[[Instrument, str], None]]] = {
        "NONE": _fault_none,
        "DROP": _fault_drop,
        "STALL": _fault_stall,
        "GARBAGE": _fault_garbage,
        "ERROR": _fault_error,
        "DELAY": _fault_delay,
        "LATCH": _fault_latch,
        "BLIND": _fault_blind,
    }

    # -- messages ---------------------------------------------------------------------

    def handle(self, message: str) -> bytes | None:
        """Run one message (units separated by ``;``); the answer line, or None."""
        is_control = message.lstrip().lstrip(":").upper().startswith("EMU")
        f = self.faults
        if f.stall and not is_control:
            f.stall -= 1
            return None
        injected, f.error = (f.error, None) if not is_control else (None, f.error)
        answers: list[str] = []
        for unit in message.split(";"):
            header, _, arg = unit.strip().removeprefix(":").partition(" ")
            is_query = header.endswith("?")
            if injected is not None:
                # The message fails here; IEEE 488.2 drops the rest of it.
                self.push_error(*injected)
                if is_query:
                    answers.append(SCPI_NAN)
                break
            try:
                answer = self._run(header.removesuffix("?"), is_query, arg.strip())
            except ScpiError as exc:
                self.push_error(exc.code, exc.message)
                break
            if answer is not None:
                answers.append(answer)
        if not answers:
            return None
        if f.garbage and not is_control:
            f.garbage -= 1
            return GARBAGE + b"\n"
        return ";".join(answers).encode("ascii") + b"\n"

    def _run(self, header: str, is_query: bool, arg: str) -> str | None:
        if not header:
            raise ScpiError(-102, "Syntax error; empty message unit")
        for spec, query, handler in self.table:
            if query == is_query and _header_matches(spec, header):
                if is_query and arg:
                    raise ScpiError(-108, "Parameter not allowed")
                return handler(arg)
        raise ScpiError(-113, f"Undefined header; {header[:30]}{'?' if is_query else ''}")

    def take_delay(self, line: bytes) -> float:
        """The pending DELAY, if this line is the message it applies to (not a control one)."""
        text = line.decode("ascii", "replace").strip()
        if not text or text.lstrip(":").upper().startswith("EMU"):
            return 0.0
        delay, self.faults.delay_s = self.faults.delay_s, 0.0
        return delay

    def feed(self, line: bytes) -> bytes | None:
        """One line from the wire (terminator removed)."""
        if self.wire_log is not None:
            text = line.decode("ascii", "backslashreplace")
            self.wire_log.write(f"{time.monotonic():.6f} {text}\n")
            self.wire_log.flush()  # a test reads it while the emulator runs
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            self.push_error(-101, "Invalid character")
            return None
        if not text.strip():
            return None  # a bare line end is not a message
        return self.handle(text)


class _StopSignalError(Exception):
    """SIGTERM/SIGINT: leave the loop and clean up."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _StopSignalError(signal.Signals(signum).name)


@contextlib.contextmanager
def _symlink(link: Path | None, target: str) -> Iterator[None]:
    """``link`` -> ``target`` (atomically replacing an old link) for as long as we run."""
    if link is None:
        yield
        return
    tmp = link.with_name(f".{link.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.replace(link)
    try:
        yield
    finally:
        # Only our own link: a newer emulator may already have replaced it.
        with contextlib.suppress(OSError):
            if os.readlink(link) == target:
                link.unlink()


def _write_master(fd: int, data: bytes) -> None:
    # Non-blocking: with nobody reading the slave its queue fills up, and a real
    # UART with no listener loses bytes too; the emulator must not hang on it.
    with contextlib.suppress(BlockingIOError):
        os.write(fd, data)


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def serve(instrument: Instrument, link: Path | None) -> int:
    """Open the pty, announce it, answer until DROP, stdin EOF or a signal."""
    master, slave = os.openpty()
    # Raw from the start: no echo, no CR/LF mangling before a client sets its own modes.
    # The emulator keeps the slave open, so the master never sees EIO between clients.
    tty.setraw(slave)
    os.set_blocking(master, False)
    path = os.ttyname(slave)
    stdin = sys.stdin.fileno()
    mode = os.fstat(stdin).st_mode
    exit_on_stdin_eof = stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)
    wire, control = _Wire(instrument, master), bytearray()
    sel = selectors.DefaultSelector()
    sel.register(master, selectors.EVENT_READ, "wire")
    # /dev/null or a file: epoll cannot watch either (EPERM), and there is no control channel.
    with contextlib.suppress(PermissionError):
        sel.register(stdin, selectors.EVENT_READ, "control")
    try:
        with _symlink(link, path):
            _say(f"READY {path}")
            while not instrument.faults.drop:
                for key, _ in sel.select(wire.timeout_s()):
                    if key.data == "wire":
                        wire.read()
                    elif not _serve_control(instrument, stdin, control):
                        if exit_on_stdin_eof:
                            return 0
                        sel.unregister(stdin)
                    if instrument.faults.drop:
                        break
                wire.run()
            return 0
    except _StopSignalError:
        return 0
    finally:
        sel.close()
        os.close(master)  # the client's next read sees end of file: the line dropped
        os.close(slave)


class _Wire:
    """The instrument's end of the pty: messages in, answers out, one at a time, in order.

    After a DELAY fault the instrument is busy: that answer goes out late, and
    messages arriving meanwhile wait their turn, as on an instrument that runs
    one command at a time.
    """

    def __init__(self, instrument: Instrument, master: int) -> None:
        self.instrument = instrument
        self.master = master
        self.buffer = bytearray()
        self.backlog: deque[bytes] = deque()
        self.busy_until: float | None = None
        self.late: bytes | None = None

    def timeout_s(self) -> float | None:
        """How long the main loop may wait for input before an answer is due."""
        if self.busy_until is None:
            return None
        return max(0.0, self.busy_until - time.monotonic())

    def read(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self.buffer += os.read(self.master, 4096)
        self.backlog.extend(_lines(self.buffer))
        if len(self.buffer) > MAX_LINE:
            self.buffer.clear()
            self.instrument.push_error(-363, "Input buffer overrun")

    def run(self) -> None:
        """Send an answer that is due; run waiting messages while not busy."""
        if self.busy_until is not None:
            if time.monotonic() < self.busy_until:
                return
            if self.late is not None:
                _write_master(self.master, self.late)
            self.busy_until = self.late = None
        while self.backlog and not self.instrument.faults.drop:
            line = self.backlog.popleft()
            delay_s = self.instrument.take_delay(line)
            answer = self.instrument.feed(line)
            if delay_s > 0:
                self.busy_until, self.late = time.monotonic() + delay_s, answer
                return
            if answer is not None and not self.instrument.faults.drop:
                _write_master(self.master, answer)


def _serve_control(instrument: Instrument, stdin: int, control: bytearray) -> bool:
    """Run the control commands that arrived on stdin; False at its end of file."""
    chunk = os.read(stdin, 4096)
    if not chunk:
        return False
    control += chunk
    for line in _lines(control):
        _say(_control(instrument, line.decode("ascii", "replace").strip()))
    return True


def _lines(buffer: bytearray) -> Iterator[bytes]:
    """Complete lines out of ``buffer`` (consumed), without CR/LF."""
    while (end := buffer.find(b"\n")) >= 0:
        line = bytes(buffer[:end]).rstrip(b"\r")
        del buffer[: end + 1]
        yield line


def _control(instrument: Instrument, command: str) -> str:
    """A stdin control command: applied at once, acknowledged on stdout."""
    header, _, arg = command.partition(" ")
    if not _header_matches("EMUlator:FAULt", header.removeprefix(":")):
        return f"ERR only EMU:FAULT commands are accepted here, got {command!r}"
    try:
        instrument.fault(arg)
    except ScpiError as exc:
        return f"ERR {exc}"
    return f"OK {command}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Emulate a SCPI single-photon detector controller on a pty.",
        epilog="Faults: NONE, DROP, STALL [n], GARBAGE [n], DELAY <s>, ERROR [code [message]], "
        "LATCH [n], BLIND [watts]; as --fault, or 'EMU:FAULT ...' on stdin or the line.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="snspd")
    parser.add_argument("--photon-rate-hz", type=float, default=2e5, help="photons reaching it")
    parser.add_argument("--gate-s", type=float, default=0.1, help="counter gate of MEAS:COUN?")
    parser.add_argument("--seed", type=int, default=None, help="noise seed (default: random)")
    parser.add_argument("--identity", default=None, help="the *IDN? answer (4 fields)")
    parser.add_argument("--link", type=Path, default=None, help="stable symlink to the pty")
    parser.add_argument("--fault", action="append", default=[], help='e.g. "LATCH", "STALL 2"')
    parser.add_argument(
        "--wire-log", type=Path, default=None, help="append every message from the line here"
    )
    args = parser.parse_args(argv)
    if not args.photon_rate_hz >= 0 or not args.gate_s > 0:
        parser.error("--photon-rate-hz must be >= 0 and --gate-s > 0")
    preset = PRESETS[args.preset]
    identity = args.identity or f"QNODED-EMU,{preset.identity_model},EMU0001,1.0"
    if len(identity.split(",")) != 4:
        parser.error("--identity needs 4 comma-separated fields: maker,model,serial,firmware")
    model = DetectorModel(
        preset, args.photon_rate_hz, args.gate_s, np.random.default_rng(args.seed)
    )
    instrument = Instrument(model, identity)
    for spec in args.fault:
        try:
            instrument.fault(spec)
        except ScpiError as exc:
            parser.error(f"--fault {spec!r}: {exc}")
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    with contextlib.ExitStack() as stack:
        if args.wire_log is not None:
            instrument.wire_log = stack.enter_context(args.wire_log.open("a", encoding="ascii"))
        return serve(instrument, args.link)


if __name__ == "__main__":
    sys.exit(main())
