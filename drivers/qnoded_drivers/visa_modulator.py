"""Alice's source as a VISA modulator / pattern generator (kind LASER, driver ``visa-modulator``).

The instrument drives the intensity and polarisation modulators of a pulsed
laser from a pattern memory: slot ``k`` of its free-running slot clock emits
``pattern[k mod L]`` of the pattern selected by the mode.  The driver makes the
patterns itself, uploads them, and answers the Laser contract's questions about
Alice's choices (``emissions``, ``choices_at``, ``count_classes``,
``sync_slots``) from the copy it uploaded, which the instrument's checksum
confirms after every upload.

Options (the ``[devices.NAME]`` table)::

    resource          VISA resource string (required), e.g. "TCPIP::10.0.0.7::5025::SOCKET"
    backend           pyvisa backend, "@py" (pyvisa-py, default) or e.g. "model.yaml@sim"
    timeout_s         bound on every round trip (default 2.0)
    opc_timeout_s     bound on *OPC? after an upload or a mode switch (default 10.0)
    read_termination, write_termination   default "\\n" (pyvisa-py sockets need both)
    pulse_rate_hz     default 1e8 (the instrument may round: its read-back is used)
    mu_signal, mu_decoy, mu_sync   mean photon numbers at the fibre input
                      (defaults 0.5, 0.1, mu_signal); the vacuum level is 0
    p_signal, p_decoy class probabilities (defaults 0.8, 0.1; vacuum the rest)
    pattern_length    slots per pattern, both patterns (default 1048576)
    sync_density      fraction of bright slots in the sync pattern (default 1e-3)
    seed              tests only: a seeded generator instead of the OS CSPRNG

Wire protocol (SCPI over the VISA session; every message ends with the write
termination, every answer with the read termination)::

    *IDN?                        -> "<maker>,<model>,<serial>,<firmware>"
    *RST                         settings to defaults, both pattern memories cleared,
                                 output off (the slot clock keeps running)
    *CLS                         clear the error queue
    *OPC?                        -> "1" once pending operations (a pattern switch
                                 waits for the address to wrap) have completed
    SYST:ERR?                    -> '<code>,"<message>"'; '0,"No error"' when empty
    SOUR:FREQ <Hz> / SOUR:FREQ?  pulse (slot) rate; NR3 answers ("1.000000000E+08")
    SOUR:LEV:SIGN|DEC|VAC|SYNC <mu> / ...?
                                 level of each intensity class, as a mean photon
                                 number per pulse at the output (the instrument
                                 holds the calibration to drive voltages)
    PATT:DATA KEY|SYNC,#<n><len><bytes>
                                 upload a pattern as an IEEE 488.2 definite-length
                                 block, one byte per slot:
                                 ``class << 2 | basis << 1 | bit`` (class
                                 0 signal, 1 decoy, 2 vacuum, 3 sync; basis 0 Z, 1 X)
    PATT:LENG? KEY|SYNC          -> slots held
    PATT:CHEC? KEY|SYNC          -> CRC-32 (zlib / IEEE 802.3) of the pattern held, decimal
    PATT:MEM?                    -> pattern memory, slots per pattern
    PATT:MODE KEY|SYNC / PATT:MODE?
                                 which pattern plays; takes effect at the next wrap
                                 of the pattern address, so slot k always plays
                                 ``pattern[k mod L]`` of one pattern
    PATT:SWIT?                   -> "<slot>,KEY|SYNC": the slot from which the
                                 selected pattern plays (ahead of the slot counter
                                 while a switch waits for its wrap)
    OUTP ON|OFF / OUTP?          -> "1" / "0"; a switch takes effect at the next slot
    OUTP:SWIT?                   -> "<slot>,1|0": the slot from which the output is so
    SOUR:SLOT?                   -> the slot counter now (NR1): slots since the
                                 instrument's slot clock started (power-on)

Every setting is followed by ``SYST:ERR?`` until the queue is empty; uploads and
mode switches by ``*OPC?`` first.

What played when.  Slot numbers here are the instrument's slot counter.  Around
every mode or output switch the driver reads ``SOUR:SLOT?`` before and
``PATT:SWIT?``/``OUTP:SWIT?`` after, and keeps a timeline: which slots played the
key pattern, which the sync pattern, which none (output off).  The Laser
contract's answers follow it: only slots that played the key pattern carry
Alice's choices; every other slot, and every slot from a switch on whose slot
the instrument has not yet confirmed (a switch under way, or one that failed),
is class SYNC (never sifted, never counted for the decoy-state bounds), and
``sync_slots`` gives bright slots only where the sync pattern played.  So raw key
sifted just before the switch to KEY took effect is not sifted against the key
pattern.  This needs the node's clock lock to find the instrument's slot counter,
not a slot off by whole pattern periods: the offset of Bob's tagger against the
counter must lie within ``[timing] max_offset_ps`` (on a bench, start the
tagger's time base from the modulator's start marker), or the lock, which can
only resolve it modulo ``L * period_ps``, puts the switches whole periods off.

An instrument error becomes
:class:`InstrumentError` with the instrument's code and message, naming the
device and the command; a silent instrument :class:`InstrumentTimeoutError`; an
answer that is not what the protocol allows :class:`InstrumentProtocolError`; a
refused or lost connection :class:`InstrumentConnectionError` (all
:class:`~qnoded.contracts.DeviceError`).  After any of the last three the
session is closed, since an answer may still be in flight; the next call
reopens it and restores the settings, the patterns (re-uploaded only if the
instrument's checksum differs), the mode and the output the node asked for.

Blocking I/O: pyvisa blocks, so every VISA call runs on this device's single
I/O thread, through :meth:`VisaModulator._io`, the only place that submits work
to it; each round trip is bounded by the VISA timeout, and the whole job by an
``asyncio.timeout`` backstop.

Security caveat: the instrument repeats a pattern of ``pattern_length`` slots,
so Alice's choices at slots ``k`` and ``k + L`` are the same.  Sifting discloses
the basis (and, in the X basis, the bit) of detected slots, which then holds for
every repetition, and the Z-basis raw key repeats with period ``L``: the
finite-key bound, which assumes independent choices per pulse, does not hold
once a key block spans more than one period (at 100 MHz and the default length
that is 10 ms).  This driver is for benches, integration and HIL tests.  In
production the pattern must not repeat within the lifetime of the key it
carries: regenerate and upload a fresh pattern per block (with a double-buffered
memory that reports the slot at which it switched) or use a modulator driven by
a QRNG in real time.  The driver logs a warning with the repeat period on open.

Sync pattern: public, periodic with the same period; the clock lock can only
resolve offsets modulo ``L * period_ps``, so choose ``pattern_length`` with
``L * period_ps > 2 * [timing] max_offset_ps``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import secrets
import socket
import zlib
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar, Self, TypeVar

import numpy as np
import numpy.typing as npt
import pyvisa
import pyvisa.errors
import structlog
from pyvisa.constants import VI_TRUE, ResourceAttribute, StatusCode
from pyvisa.resources import MessageBasedResource, TCPIPSocket

from qnoded.contracts import (
    DeviceError,
    DeviceKind,
    DriverContext,
    EmissionRecord,
    IntensityClass,
    LaserMode,
)
from qnoded_drivers.scpi import parse_error_entry

log = structlog.get_logger("qnoded_drivers.visa_modulator")

T = TypeVar("T")
U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]

N_CLASSES = len(IntensityClass)
MAX_ERRORS_PER_CHECK = 32  # an error queue that never empties is itself a fault
MIN_SYNC_PULSES = 16  # fewer bright slots per period give the clock lock nothing to find
# IEEE 488.2 definite-length blocks carry at most 9 length digits.
MAX_PATTERN_LENGTH = 999_999_999
_MODE_WORD = {LaserMode.SYNC: "SYNC", LaserMode.KEY: "KEY"}
_LEVEL_NODES = {
    IntensityClass.SIGNAL: "SIGN",
    IntensityClass.DECOY: "DEC",
    IntensityClass.VACUUM: "VAC",
    IntensityClass.SYNC: "SYNC",
}


# -- errors ------------------------------------------------------------------------
class VisaDeviceError(DeviceError):
    """A VISA instrument failed; names the device, its resource and the command."""

    def __init__(self, device: str, resource: str, command: str, detail: str) -> None:
        super().__init__(f"{device} ({resource}): {command}: {detail}")
        self.device = device
        self.resource = resource
        self.command = command
        self.detail = detail


class InstrumentError(VisaDeviceError):
    """The instrument reported an error (SCPI error queue); the session is still good.

    ``code`` and ``message`` are the first entry; ``entries`` all of them.
    """

    def __init__(
        self, device: str, resource: str, command: str, entries: list[tuple[int, str]]
    ) -> None:
        text = "; ".join(f'{code},"{msg}"' for code, msg in entries)
        super().__init__(device, resource, command, f"instrument error {text}")
        self.code, self.message = entries[0]
        self.entries = entries


class InstrumentTimeoutError(VisaDeviceError):
    """No answer within the bound: the instrument stalled or the connection is gone."""


class InstrumentProtocolError(VisaDeviceError):
    """An answer the protocol does not allow (garbage, wrong type, lost framing)."""


class InstrumentConnectionError(VisaDeviceError):
    """The session could not be opened, or the connection broke."""


# -- options -----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ModulatorOptions:
    """The driver's options, validated; see the module docstring."""

    resource: str
    backend: str = "@py"
    timeout_s: float = 2.0
    opc_timeout_s: float = 10.0
    read_termination: str = "\n"
    write_termination: str = "\n"
    pulse_rate_hz: float = 1e8
    mu_signal: float = 0.5
    mu_decoy: float = 0.1
    mu_sync: float | None = None
    p_signal: float = 0.8
    p_decoy: float = 0.1
    pattern_length: int = 1 << 20
    sync_density: float = 1e-3
    seed: int | None = None

    @classmethod
    def from_mapping(cls, name: str, options: Mapping[str, Any]) -> ModulatorOptions:
        """Validate a config table; ``ValueError`` names the option and the fix."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"{name}: unknown option(s) {unknown} (valid: {', '.join(sorted(known))})"
            )
        if "resource" not in options:
            raise ValueError(f"{name}: option 'resource' (a VISA resource string) is required")
        values: dict[str, Any] = {}
        for key, raw in options.items():
            default = cls.__dataclass_fields__[key].default
            is_number = isinstance(raw, int | float) and not isinstance(raw, bool)
            if key in ("resource", "backend", "read_termination", "write_termination"):
                ok = isinstance(raw, str) and (key.endswith("termination") or bool(raw))
            elif key in ("pattern_length", "seed"):
                ok = isinstance(raw, int) and not isinstance(raw, bool)
            elif key == "mu_sync" or isinstance(default, float):
                ok = is_number and math.isfinite(raw)
            else:  # pragma: no cover - every field is listed above
                ok = False
            if not ok:
                raise ValueError(f"{name}: option {key!r} has a bad value {raw!r}")
            # TOML writes 100000000 for a rate: an int where a float is meant.
            values[key] = float(raw) if isinstance(default, float) or key == "mu_sync" else raw
        opt = cls(**values)
        opt._check_ranges(name)
        return opt

    def _check_ranges(self, name: str) -> None:
        checks = [
            ("timeout_s", 0 < self.timeout_s <= 600),
            ("opc_timeout_s", 0 < self.opc_timeout_s <= 600),
            ("pulse_rate_hz", 1e3 <= self.pulse_rate_hz <= 1e10),
            ("mu_signal", 0 < self.mu_signal <= 100),
            ("mu_decoy", 0 <= self.mu_decoy < self.mu_signal),
            ("mu_sync", self.mu_sync is None or 0 < self.mu_sync <= 100),
            ("p_signal", 0 < self.p_signal <= 1),
            ("p_decoy", self.p_decoy >= 0 and self.p_signal + self.p_decoy <= 1),
            ("pattern_length", 1 <= self.pattern_length <= MAX_PATTERN_LENGTH),
            ("sync_density", 0 < self.sync_density <= 1),
            ("seed", self.seed is None or self.seed >= 0),
        ]
        for key, ok in checks:
            if not ok:
                raise ValueError(f"{name}: option {key!r} = {getattr(self, key)!r} is out of range")
        if self.sync_density * self.pattern_length < MIN_SYNC_PULSES:
            raise ValueError(
                f"{name}: sync_density * pattern_length = "
                f"{self.sync_density * self.pattern_length:g} bright sync slots per pattern; "
                f"need at least {MIN_SYNC_PULSES} for the clock lock: raise either"
            )

    @property
    def levels(self) -> dict[IntensityClass, float]:
        """The levels to program, by class."""
        return {
            IntensityClass.SIGNAL: self.mu_signal,
            IntensityClass.DECOY: self.mu_decoy,
            IntensityClass.VACUUM: 0.0,
            IntensityClass.SYNC: self.mu_signal if self.mu_sync is None else self.mu_sync,
        }


# -- patterns ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Pattern:
    """One pattern memory's contents and Alice's choices decoded from it."""

    codes: U8  # the wire bytes: class << 2 | basis << 1 | bit
    basis: U8 = field(init=False)
    bit: U8 = field(init=False)
    intensity: U8 = field(init=False)
    period_counts: I64 = field(init=False)  # pulses of each class in one period
    crc32: int = field(init=False)

    def __post_init__(self) -> None:
        codes = np.ascontiguousarray(self.codes, dtype=np.uint8)
        object.__setattr__(self, "codes", codes)
        object.__setattr__(self, "bit", codes & np.uint8(1))
        object.__setattr__(self, "basis", (codes >> np.uint8(1)) & np.uint8(1))
        object.__setattr__(self, "intensity", codes >> np.uint8(2))
        counts = np.bincount(self.intensity, minlength=N_CLASSES).astype(np.int64)
        object.__setattr__(self, "period_counts", counts)
        object.__setattr__(self, "crc32", zlib.crc32(codes.tobytes()))

    def __len__(self) -> int:
        return int(self.codes.shape[0])


def _encode(cls: U8, basis: U8, bit: U8) -> U8:
    return ((cls << np.uint8(2)) | (basis << np.uint8(1)) | bit).astype(np.uint8)


def _threshold(p: float) -> np.uint64:
    """``u < threshold`` has probability ``p`` for ``u`` uniform on 32 bits."""
    return np.uint64(min(1 << 32, round(p * 2.0**32)))


def make_patterns(opt: ModulatorOptions) -> tuple[Pattern, Pattern]:
    """The key pattern (decoy-state BB84) and the public sync pattern.

    Randomness comes from the OS CSPRNG (``secrets``), or from a seeded numpy
    generator when ``seed`` is set (tests).  Each slot takes 64 random bits:
    the low two are the bit and the basis (1/2 each), the high 32 pick the
    intensity class against the class probabilities.
    """
    n = opt.pattern_length
    if opt.seed is None:
        random_bytes: Callable[[int], bytes] = secrets.token_bytes
    else:
        random_bytes = np.random.default_rng(opt.seed).bytes
    words = np.frombuffer(random_bytes(8 * n), dtype="<u8")
    bit = (words & np.uint64(1)).astype(np.uint8)
    basis = ((words >> np.uint64(1)) & np.uint64(1)).astype(np.uint8)
    u = words >> np.uint64(32)
    cls = np.full(n, IntensityClass.VACUUM, dtype=np.uint8)
    cls[u < _threshold(opt.p_signal + opt.p_decoy)] = IntensityClass.DECOY
    cls[u < _threshold(opt.p_signal)] = IntensityClass.SIGNAL
    key = Pattern(_encode(cls, basis, bit))
    # Sync: bright (class SYNC, basis Z, bit 0: it is public) with probability
    # sync_density, vacuum otherwise, as the simulated link defines it.
    u_sync = np.frombuffer(random_bytes(4 * n), dtype="<u4").astype(np.uint64)
    sync_cls = np.where(
        u_sync < _threshold(opt.sync_density), IntensityClass.SYNC, IntensityClass.VACUUM
    ).astype(np.uint8)
    zeros = np.zeros(n, dtype=np.uint8)
    return key, Pattern(_encode(sync_cls, zeros, zeros))


# -- what played when ----------------------------------------------------------------
class Played(enum.IntEnum):
    """What the source emitted in a slot, as far as the driver can vouch for it."""

    DARK = 0  # output off, before the driver's first switch, or not known (a switch pending)
    SYNC = 1  # the sync pattern
    KEY = 2  # the key pattern


MAX_SWITCHES = 1024  # per setting; the node asks about the last minutes at most


@dataclass(frozen=True, slots=True)
class Timeline:
    """What the source played from which slot on, in the instrument's slot counter.

    ``starts`` ascend; ``states[i]`` (a :class:`Played`) holds from ``starts[i]``
    up to the next start; before the first start the source was dark.
    """

    starts: I64
    states: U8

    @classmethod
    def build(
        cls,
        modes: list[tuple[int, LaserMode | None]],
        outputs: list[tuple[int, bool | None]],
        pending_from: int | None,
    ) -> Timeline:
        """From the slots at which the mode and the output changed (each ascending;
        None: not known from there).  From ``pending_from`` on a switch is under way
        whose slot the instrument has not told yet.  Whatever is not known is dark,
        so that nothing there is sifted or counted."""
        points = sorted({s for s, _ in modes} | {s for s, _ in outputs})
        starts: list[int] = []
        states: list[int] = []
        m = o = -1
        for slot in points:
            while m + 1 < len(modes) and modes[m + 1][0] <= slot:
                m += 1
            while o + 1 < len(outputs) and outputs[o + 1][0] <= slot:
                o += 1
            if pending_from is not None and slot >= pending_from:
                break
            state = Played.DARK
            if m >= 0 and o >= 0 and outputs[o][1] and modes[m][1] is not None:
                state = Played.KEY if modes[m][1] is LaserMode.KEY else Played.SYNC
            if not states or states[-1] != state:
                starts.append(slot)
                states.append(state)
        if pending_from is not None and (not states or states[-1] != Played.DARK):
            starts.append(pending_from)
            states.append(Played.DARK)
        return cls(np.array(starts, dtype=np.int64), np.array(states, dtype=np.uint8))

    def at(self, slots: I64) -> U8:
        i = np.searchsorted(self.starts, slots, side="right") - 1
        out = np.full(np.shape(slots), Played.DARK, dtype=np.uint8)
        known = i >= 0
        out[known] = self.states[i[known]]
        return out

    def runs(self, first: int, last: int) -> Iterator[tuple[int, int, Played]]:
        """``[first, last)`` cut where the state changes: ``(lo, hi, state)``."""
        i = int(np.searchsorted(self.starts, first, side="right")) - 1
        lo = first
        while lo < last:
            state = Played(int(self.states[i])) if i >= 0 else Played.DARK
            hi = int(self.starts[i + 1]) if i + 1 < len(self.starts) else last
            yield lo, min(hi, last), state
            lo, i = min(hi, last), i + 1


# -- the VISA session (blocking; runs on the device's I/O thread only) ------------
def _disable_nagle(res: MessageBasedResource) -> None:
    """Send each message at once on a raw socket (TCP_NODELAY).

    A setting is followed at once by ``SYST:ERR?``: with Nagle's algorithm the
    second message waits for the instrument's delayed ACK of the first, 40 ms
    per setting on Linux.  ``VI_ATTR_TCPIP_NODELAY`` is the VISA way; pyvisa-py
    0.8 refuses to set it, so fall back to its session's socket.
    """
    if not isinstance(res, TCPIPSocket):
        return
    try:
        res.set_visa_attribute(ResourceAttribute.tcpip_nodelay, VI_TRUE)
    # Backends signal an unsupported attribute each their own way (pyvisa-py: a
    # bare Exception subclass); any failure here only costs latency.
    except Exception:  # noqa: BLE001
        sock = _pyvisa_py_socket(res)
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _pyvisa_py_socket(res: MessageBasedResource) -> socket.socket | None:
    """The socket under a pyvisa-py ``TCPIP::...::SOCKET`` session, else None."""
    sessions = getattr(res.visalib, "sessions", None)
    if not isinstance(res, TCPIPSocket) or not isinstance(sessions, dict):
        return None
    sock = getattr(sessions.get(res.session), "interface", None)
    return sock if isinstance(sock, socket.socket) else None


def _peer_closed(res: MessageBasedResource) -> bool:
    """Whether a raw-socket instrument has closed its end.

    pyvisa-py reports a closed connection as a read timeout (it keeps polling
    the dead socket); peeking tells a dropped connection from a silent
    instrument, so the error says which.
    """
    sock = _pyvisa_py_socket(res)
    if sock is None:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False  # open, nothing to read: the instrument is silent
    except OSError:
        return True  # reset: gone as well


class ScpiSession:
    """One VISA session to the instrument.

    Every method blocks and must run on the owning device's I/O thread.  A
    transport failure (timeout, lost connection, unparseable answer) closes the
    session before raising, because a late answer would otherwise be read as
    the answer to the next query.
    """

    def __init__(self, device: str, opt: ModulatorOptions) -> None:
        self.device = device
        self.opt = opt
        self._rm: pyvisa.ResourceManager | None = None
        self._res: MessageBasedResource | None = None
        # Set once the node's settings are on the instrument; a session that
        # failed half-way through restoring them is open but not ready.
        self.ready = False

    def _err(self, kind: type[VisaDeviceError], command: str, detail: str) -> VisaDeviceError:
        return kind(self.device, self.opt.resource, command, detail)

    @property
    def is_open(self) -> bool:
        return self._res is not None

    def open(self) -> None:
        self.close()
        ms = round(self.opt.timeout_s * 1000)
        try:
            self._rm = pyvisa.ResourceManager(self.opt.backend)
            res = self._rm.open_resource(
                self.opt.resource,
                open_timeout=ms,
                timeout=ms,
                read_termination=self.opt.read_termination,
                write_termination=self.opt.write_termination,
            )
        # pyvisa-py raises a bare Exception when a socket cannot connect, and the
        # backends raise ValueError, OSError, LibraryError...: every one means "cannot open".
        except Exception as exc:
            self.close()
            raise self._err(
                InstrumentConnectionError,
                "open",
                f"cannot open with backend {self.opt.backend!r}: {type(exc).__name__}: {exc}",
            ) from exc
        if not isinstance(res, MessageBasedResource):
            res.close()
            self.close()
            raise self._err(
                InstrumentConnectionError, "open", "not a message-based resource (SCPI needs one)"
            )
        _disable_nagle(res)
        self._res = res

    def close(self) -> None:
        res, rm = self._res, self._rm
        self._res = self._rm = None
        self.ready = False
        # Closing is best effort: the session may already be dead, which is why
        # we close it; nothing useful can be done with a failure here.
        if res is not None:
            with contextlib.suppress(Exception):
                res.close()
        if rm is not None:
            with contextlib.suppress(Exception):
                rm.close()

    @contextlib.contextmanager
    def _transport(self, command: str, step: str, timeout_s: float) -> Iterator[None]:
        """Map VISA and socket failures of one round trip to typed errors."""
        try:
            yield
        except pyvisa.errors.VisaIOError as exc:
            closed_by_peer = self._res is not None and _peer_closed(self._res)
            self.close()
            if exc.error_code == StatusCode.error_timeout and closed_by_peer:
                raise self._err(
                    InstrumentConnectionError,
                    command,
                    f"the instrument closed the connection (no answer to {step}); "
                    "session closed, the next call reopens it",
                ) from exc
            if exc.error_code == StatusCode.error_timeout:
                raise self._err(
                    InstrumentTimeoutError,
                    command,
                    f"no answer to {step} within {timeout_s:g} s (instrument stalled or "
                    "connection lost); session closed, the next call reopens it",
                ) from exc
            raise self._err(
                InstrumentConnectionError, command, f"{step} failed: {exc.description}"
            ) from exc
        except (OSError, pyvisa.errors.Error) as exc:
            self.close()
            during = "" if step == command else f"{step}: "
            raise self._err(
                InstrumentConnectionError,
                command,
                f"{during}connection lost ({type(exc).__name__}: {exc}); "
                "session closed, the next call reopens it",
            ) from exc

    def _resource(self, command: str) -> MessageBasedResource:
        if self._res is None:
            raise self._err(InstrumentConnectionError, command, "session is not open")
        return self._res

    def write(self, command: str, text: str) -> None:
        res = self._resource(command)
        with self._transport(command, text, self.opt.timeout_s):
            res.write(text)

    def write_block(self, command: str, prefix: str, data: bytes) -> None:
        """``prefix`` then ``data`` as an IEEE 488.2 definite-length block."""
        res = self._resource(command)
        size = str(len(data))
        message = (
            prefix.encode("ascii")
            + f"#{len(size)}{size}".encode("ascii")
            + data
            + self.opt.write_termination.encode("ascii")
        )
        with self._transport(command, f"{prefix}#<{len(data)} bytes>", self.opt.timeout_s):
            res.write_raw(message)

    def query(self, command: str, text: str, *, timeout_s: float | None = None) -> str:
        """One round trip; the answer as text without its termination."""
        res = self._resource(command)
        bound = self.opt.timeout_s if timeout_s is None else timeout_s
        with self._transport(command, text, bound):
            if timeout_s is not None:
                res.timeout = round(timeout_s * 1000)
            try:
                res.write(text)
                raw = res.read_raw()
            finally:
                if timeout_s is not None:
                    res.timeout = round(self.opt.timeout_s * 1000)
        term = self.opt.read_termination.encode("ascii")
        if term and raw.endswith(term):
            raw = raw[: -len(term)]
        try:
            answer = raw.decode("ascii")
        except UnicodeDecodeError:
            self.close()
            raise self._err(
                InstrumentProtocolError,
                command,
                f"{text} answered {raw[:64]!r}, which is not ASCII text (garbage on the "
                "line?); session closed, the next call reopens it",
            ) from None
        if not answer.isprintable():
            self.close()
            raise self._err(
                InstrumentProtocolError,
                command,
                f"{text} answered {answer[:64]!r} with control characters; session closed",
            )
        return answer.strip()

    def _bad_answer(self, command: str, text: str, answer: str, expected: str) -> VisaDeviceError:
        self.close()  # an answer of the wrong kind may be another query's: resync
        return self._err(
            InstrumentProtocolError,
            command,
            f"{text} answered {answer[:64]!r}, expected {expected}; session closed",
        )

    def query_float(self, command: str, text: str) -> float:
        answer = self.query(command, text)
        try:
            value = float(answer)
        except ValueError:
            raise self._bad_answer(command, text, answer, "a number") from None
        if not math.isfinite(value):
            raise self._bad_answer(command, text, answer, "a finite number")
        return value

    def query_int(self, command: str, text: str) -> int:
        answer = self.query(command, text)
        try:
            return int(answer)
        except ValueError:
            raise self._bad_answer(command, text, answer, "an integer") from None

    def query_word(self, command: str, text: str, allowed: tuple[str, ...]) -> str:
        answer = self.query(command, text)
        if answer.upper() not in allowed:
            raise self._bad_answer(command, text, answer, " or ".join(allowed))
        return answer.upper()

    def query_switch(self, command: str, text: str, allowed: tuple[str, ...]) -> tuple[int, str]:
        """``<slot>,<word>``: from which slot a setting plays (``PATT:SWIT?``, ``OUTP:SWIT?``)."""
        answer = self.query(command, text)
        slot, _, word = answer.partition(",")
        try:
            first = int(slot)
        except ValueError:
            first = -1
        if first < 0 or word.strip().upper() not in allowed:
            raise self._bad_answer(command, text, answer, f"'<slot>,{'|'.join(allowed)}'")
        return first, word.strip().upper()

    def identify(self) -> str:
        idn = self.query("*IDN?", "*IDN?")
        if len(idn.split(",")) != 4:
            raise self._bad_answer("*IDN?", "*IDN?", idn, "'maker,model,serial,firmware'")
        return idn

    def wait_complete(self, command: str) -> None:
        """``*OPC?``: wait (bounded by ``opc_timeout_s``) until the instrument is done."""
        answer = self.query(command, "*OPC?", timeout_s=self.opt.opc_timeout_s)
        if answer.lstrip("+") != "1":
            raise self._bad_answer(command, "*OPC?", answer, "1")

    def _drain_errors(self, command: str) -> list[tuple[int, str]]:
        entries: list[tuple[int, str]] = []
        for _ in range(MAX_ERRORS_PER_CHECK):
            answer = self.query(command, "SYST:ERR?")
            try:
                code, message = parse_error_entry(answer)
            except ValueError:
                raise self._bad_answer(
                    command, "SYST:ERR?", answer, "'<code>,\"<message>\"'"
                ) from None
            if code == 0:
                break
            entries.append((code, message))
        else:
            entries.append((0, f"error queue still not empty after {MAX_ERRORS_PER_CHECK} reads"))
        return entries

    def check_errors(self, command: str) -> None:
        """Drain ``SYST:ERR?``; raise :class:`InstrumentError` if ``command`` left any."""
        entries = self._drain_errors(command)
        if entries:
            raise InstrumentError(self.device, self.opt.resource, command, entries)

    def clear_errors(self) -> None:
        """``*CLS``, then drain what is left: errors from before this session
        (another client, a previous run) must not be blamed on our first command."""
        self.write("*CLS", "*CLS")
        stale = self._drain_errors("*CLS")
        if stale:
            log.warning("stale instrument errors discarded", device=self.device, errors=stale)

    def command(self, text: str, *, wait: bool = False) -> None:
        """A setting: send it, optionally ``*OPC?``, then require an empty error queue."""
        self.write(text, text)
        if wait:
            self.wait_complete(text)
        self.check_errors(text)


@dataclass(frozen=True, slots=True)
class _Readback:
    """What the instrument says it applied (it may round)."""

    rate_hz: float
    levels: Mapping[IntensityClass, float]


# -- the driver ---------------------------------------------------------------------
class VisaModulator:
    """Alice's source: a SCPI modulator / pattern generator over VISA (see module docstring)."""

    kind: ClassVar[DeviceKind] = DeviceKind.LASER

    def __init__(self, name: str, options: Mapping[str, Any], context: DriverContext) -> None:
        self.name = name
        self.options = ModulatorOptions.from_mapping(name, options)
        # What the node asked for: a reopened session restores it.
        self.mode = LaserMode.SYNC
        self.output = False
        self.idn = ""
        self._open = False
        self._key: Pattern | None = None
        self._sync: Pattern | None = None
        self._sync_positions = np.empty(0, dtype=np.int64)
        self._readback: _Readback | None = None
        self._epoch = 0  # sessions that found the patterns gone (power cycles)
        # What played when, from the instrument's answers (written on the I/O
        # thread; the event loop reads ``_timeline``, replaced whole).
        # Steps (first slot, value); None: not known from that slot on.
        self._modes: list[tuple[int, LaserMode | None]] = []
        self._outputs: list[tuple[int, bool | None]] = []
        self._pending: dict[str, int] = {}  # setting -> slot from which a switch is under way
        self._unsure: dict[str, int] = {}  # setting -> slot since which a switch failed
        self._timeline = Timeline.build([], [], None)
        self._executor: ThreadPoolExecutor | None = None
        self._link: ScpiSession | None = None
        o = self.options
        # The backstop on one job: longer than every VISA-bounded round trip a
        # job can make (a reopen restores everything: ~30 round trips, 4 waits,
        # two uploads at >= 1 MB/s), so normally a typed error comes first.
        self._job_budget_s = (
            30 * o.timeout_s + 4 * o.opc_timeout_s + 2 * o.pattern_length / 1e6 + 1.0
        )

    # -- the one place VISA work is submitted --------------------------------------
    async def _io(self, command: str, job: Callable[[ScpiSession], T]) -> T:
        """Run ``job`` on this device's single I/O thread, under a backstop timeout.

        pyvisa blocks; nothing else in this driver touches the session.  One
        thread per device serialises the jobs, so a query's answer cannot be
        read by another caller.
        """
        if self._executor is None or self._link is None:
            raise DeviceError(f"{self.name}: {command}: the device is not open")
        link = self._link
        future = asyncio.get_running_loop().run_in_executor(self._executor, job, link)
        guard = asyncio.timeout(self._job_budget_s)
        try:
            async with guard:
                return await future
        except TimeoutError:
            if not guard.expired():
                raise
            self._abandon_io_thread()
            raise InstrumentTimeoutError(
                self.name,
                self.options.resource,
                command,
                f"VISA call did not return within {self._job_budget_s:g} s; "
                "its thread is abandoned and a new session will be opened",
            ) from None

    def _start_io_thread(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"visa-{self.name}")
        self._link = ScpiSession(self.name, self.options)

    def _abandon_io_thread(self) -> None:
        """A VISA call ignored its own timeout: leave its thread, start a fresh one."""
        old_executor, old_link = self._executor, self._link
        self._start_io_thread()
        if old_executor is not None and old_link is not None:
            old_executor.submit(old_link.close)
            old_executor.shutdown(wait=False)
        log.error("visa I/O thread wedged; abandoned", device=self.name)

    # -- jobs (run on the I/O thread) -------------------------------------------------
    def _apply_settings(self, link: ScpiSession, *, after_reset: bool) -> None:
        """Program rate, levels, both patterns, mode and output; read back what applies."""
        o = self.options
        link.command(f"SOUR:FREQ {o.pulse_rate_hz:.9E}")
        rate = link.query_float("SOUR:FREQ", "SOUR:FREQ?")
        levels: dict[IntensityClass, float] = {}
        for cls, mu in o.levels.items():
            node = _LEVEL_NODES[cls]
            link.command(f"SOUR:LEV:{node} {mu:.9E}")
            levels[cls] = link.query_float(f"SOUR:LEV:{node}", f"SOUR:LEV:{node}?")
        self._readback = _Readback(rate_hz=rate, levels=levels)
        assert self._key is not None and self._sync is not None
        reloaded = [
            which
            for which, pattern in (("SYNC", self._sync), ("KEY", self._key))
            if self._upload(link, which, pattern)
        ]
        if reloaded and not after_reset:
            self._epoch += 1  # read on the event loop's thread: one int, under the GIL
            self._forget_timeline()  # its slot counter restarted: old slots mean nothing
            log.warning(
                "instrument no longer held the uploaded patterns (power-cycled?); "
                "re-uploaded them. Its slot clock may have restarted: a clock "
                "model made before is stale",
                device=self.name,
                slot_clock_epoch=self._epoch,
                patterns=reloaded,
            )
        self._apply_mode(link)
        self._apply_output(link)

    def _upload(self, link: ScpiSession, which: str, pattern: Pattern) -> bool:
        """Upload unless the instrument already holds exactly this pattern; verify by CRC."""
        command = f"PATT:DATA {which}"

        def held() -> tuple[int, int]:
            return (
                link.query_int(command, f"PATT:LENG? {which}"),
                link.query_int(command, f"PATT:CHEC? {which}"),
            )

        if held() == (len(pattern), pattern.crc32):
            return False
        link.write_block(command, f"PATT:DATA {which},", pattern.codes.tobytes())
        link.wait_complete(command)
        link.check_errors(command)
        got = held()
        if got != (len(pattern), pattern.crc32):
            link.close()
            raise InstrumentProtocolError(
                self.name,
                self.options.resource,
                command,
                f"instrument holds {got[0]} slots with CRC-32 {got[1]}, the driver "
                f"uploaded {len(pattern)} slots with CRC-32 {pattern.crc32} "
                "(corrupted transfer); session closed",
            )
        return True

    def _apply_mode(self, link: ScpiSession) -> None:
        word = _MODE_WORD[self.mode]
        command = f"PATT:MODE {word}"
        self._switching("mode", link, command)
        link.command(command, wait=True)
        first, got = link.query_switch(command, "PATT:SWIT?", ("SYNC", "KEY"))
        if got != word:
            raise InstrumentProtocolError(
                self.name, self.options.resource, command, f"instrument reports {got}"
            )
        self._switched("mode", first, self.mode)

    def _apply_output(self, link: ScpiSession) -> None:
        command = f"OUTP {'ON' if self.output else 'OFF'}"
        self._switching("output", link, command)
        link.command(command)
        first, got = link.query_switch(command, "OUTP:SWIT?", ("0", "1", "ON", "OFF"))
        if (got in ("1", "ON")) != self.output:
            raise InstrumentProtocolError(
                self.name, self.options.resource, command, f"instrument reports {got}"
            )
        self._switched("output", first, self.output)

    # -- the timeline (I/O thread) ------------------------------------------------------
    def _switching(self, setting: str, link: ScpiSession, command: str) -> None:
        """Before a switch: from the slot playing now, what plays is uncertain until
        the instrument tells the slot the switch took effect (a failed switch
        leaves it so: no key from slots the driver cannot vouch for)."""
        now = link.query_int(command, "SOUR:SLOT?")
        if setting in self._pending:  # an earlier switch failed: unknown since then
            self._unsure.setdefault(setting, self._pending[setting])
        else:
            self._pending[setting] = now
        self._publish_timeline()

    def _switched(self, setting: str, first: int, value: LaserMode | bool) -> None:
        """The instrument says ``value`` holds from slot ``first``.  Before it, back
        to where a failed switch of the same setting began, is not known."""
        steps: list[Any] = self._modes if setting == "mode" else self._outputs
        self._pending.pop(setting, None)
        since = self._unsure.pop(setting, first)
        for slot, v in ((min(since, first), None), (first, value)):
            while steps and steps[-1][0] >= slot:
                steps.pop()
            steps.append((slot, v))
        del steps[:-MAX_SWITCHES]
        self._publish_timeline()

    def _forget_timeline(self) -> None:
        self._modes.clear()
        self._outputs.clear()
        self._pending.clear()
        self._unsure.clear()
        self._publish_timeline()

    def _publish_timeline(self) -> None:
        pending = min(self._pending.values(), default=None)
        self._timeline = Timeline.build(self._modes, self._outputs, pending)

    def _ensure_session(self, link: ScpiSession) -> None:
        """Reopen a session a failure closed, and restore the node's settings on it."""
        if link.is_open and link.ready:
            return
        if not link.is_open:
            link.open()
            self.idn = link.identify()
            link.clear_errors()
        self._apply_settings(link, after_reset=False)
        link.ready = True
        log.info("instrument session reopened, settings restored", device=self.name, idn=self.idn)

    def _open_job(self, link: ScpiSession) -> None:
        self._forget_timeline()
        link.open()
        self.idn = link.identify()
        # Start from a known state: stale errors gone, settings and memories at
        # their defaults, then every setting programmed explicitly.
        link.clear_errors()
        link.command("*RST", wait=True)
        self._apply_settings(link, after_reset=True)
        link.ready = True

    def _close_job(self, link: ScpiSession) -> None:
        try:
            if link.is_open:
                link.command("OUTP OFF")  # a closed source does not emit
        finally:
            link.close()

    # -- lifecycle -------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        # Generating a long pattern is CPU work: keep it off the event loop too.
        key, sync = await asyncio.to_thread(make_patterns, self.options)
        self._key, self._sync = key, sync
        self._sync_positions = np.flatnonzero(sync.intensity == IntensityClass.SYNC).astype(
            np.int64
        )
        self.mode, self.output = LaserMode.SYNC, False
        self._start_io_thread()
        try:
            await self._io("open", self._open_job)
        except BaseException:
            await self._stop_io_thread()
            raise
        self._open = True
        repeat_s = self.options.pattern_length * self.period_ps * 1e-12
        log.warning(
            "the modulator repeats its pattern: key from blocks longer than one "
            "period is not secure (see the driver's security caveat)",
            device=self.name,
            pattern_slots=self.options.pattern_length,
            repeat_period_s=repeat_s,
        )
        log.info("modulator open", device=self.name, idn=self.idn, pulse_rate_hz=self.pulse_rate_hz)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False
        self.output = False
        try:
            await self._io("OUTP OFF", self._close_job)
        except DeviceError as err:
            # Leaving must not fail: the session goes either way.
            log.warning(
                "could not switch the output off on close", device=self.name, error=str(err)
            )
        finally:
            await self._stop_io_thread()

    async def _stop_io_thread(self) -> None:
        executor, link = self._executor, self._link
        self._executor = self._link = None
        if executor is not None and link is not None:
            # Close on the I/O thread, after any job still running there (an open
            # that was cancelled), then let the thread end.  Waiting is bounded:
            # such a job is itself bounded by its VISA timeouts, and the close runs
            # after it whether or not we are still waiting.
            closed = asyncio.wrap_future(executor.submit(link.close))
            executor.shutdown(wait=False)
            try:
                await asyncio.wait_for(closed, timeout=2 * self.options.timeout_s)
            except TimeoutError:
                log.warning("visa session still closing in the background", device=self.name)

    async def ping(self) -> bool:
        """``*IDN?``; reopens (and restores) a session a failure closed.  Never raises."""
        if not self._open:
            return False

        def job(link: ScpiSession) -> None:
            self._ensure_session(link)
            link.identify()

        try:
            await self._io("*IDN?", job)
        except DeviceError as err:
            log.debug("ping failed", device=self.name, error=str(err))
            return False
        return True

    def describe(self) -> Mapping[str, Any]:
        o = self.options
        levels = self.intensities
        return {
            "driver": "visa-modulator",
            "resource": o.resource,
            "idn": self.idn,
            "connected": self._link is not None and self._link.is_open,
            "pulse_rate_hz": self.pulse_rate_hz,
            "period_ps": self.period_ps,
            "mu_signal": levels[IntensityClass.SIGNAL],
            "mu_decoy": levels[IntensityClass.DECOY],
            "mu_sync": levels[IntensityClass.SYNC],
            "p_signal": o.p_signal,
            "p_decoy": o.p_decoy,
            "pattern_length": o.pattern_length,
            "pattern_repeat_s": o.pattern_length * self.period_ps * 1e-12,
            "sync_pulses_per_pattern": int(self._sync_positions.shape[0]),
            "mode": str(self.mode),
            "output": self.output,
        }

    # -- settings ------------------------------------------------------------------------
    @property
    def pulse_rate_hz(self) -> float:
        return 1e12 / self.period_ps

    @property
    def slot_clock_epoch(self) -> int:
        return self._epoch

    @property
    def period_ps(self) -> int:
        rate = self._readback.rate_hz if self._readback else self.options.pulse_rate_hz
        return round(1e12 / rate)

    @property
    def intensities(self) -> Mapping[IntensityClass, float]:
        """The levels the instrument reports it applies (the options before opening)."""
        return dict(self._readback.levels if self._readback else self.options.levels)

    @property
    def class_probabilities(self) -> Mapping[IntensityClass, float]:
        o = self.options
        return {
            IntensityClass.SIGNAL: o.p_signal,
            IntensityClass.DECOY: o.p_decoy,
            IntensityClass.VACUUM: max(0.0, 1.0 - o.p_signal - o.p_decoy),
        }

    async def set_mode(self, mode: LaserMode) -> None:
        self.mode = LaserMode(mode)

        def job(link: ScpiSession) -> None:
            self._ensure_session(link)
            self._apply_mode(link)

        await self._io(f"PATT:MODE {_MODE_WORD[self.mode]}", job)

    async def set_output(self, enabled: bool) -> None:
        self.output = bool(enabled)

        def job(link: ScpiSession) -> None:
            self._ensure_session(link)
            self._apply_output(link)

        await self._io(f"OUTP {'ON' if self.output else 'OFF'}", job)

    def pattern_crc32(self, mode: LaserMode) -> int:
        """CRC-32 of the pattern uploaded for ``mode``: what ``PATT:CHEC?`` must answer."""
        return self._pattern(LaserMode(mode)).crc32

    # -- Alice's choices (from the uploaded patterns; no I/O) -----------------------------
    def _pattern(self, mode: LaserMode = LaserMode.KEY) -> Pattern:
        pattern = self._key if mode is LaserMode.KEY else self._sync
        if pattern is None:
            raise DeviceError(f"{self.name}: no pattern before the device is opened")
        return pattern

    def sync_slots(self, first_slot: int, n_slots: int) -> I64:
        """Bright slots of the sync pattern in the range, where it played, ascending."""
        length = len(self._pattern(LaserMode.SYNC))
        out = [np.empty(0, dtype=np.int64)]
        if not self._sync_positions.shape[0]:
            return out[0]
        for lo, hi, state in self._timeline.runs(first_slot, first_slot + max(0, n_slots)):
            if state is not Played.SYNC:
                continue
            starts = np.arange(lo // length, (hi - 1) // length + 1, dtype=np.int64) * length
            slots = (starts[:, None] + self._sync_positions[None, :]).ravel()
            out.append(slots[(slots >= lo) & (slots < hi)])
        return np.concatenate(out)

    def emissions(self, first_slot: int, n_slots: int) -> EmissionRecord:
        """Alice's choices for a run of slots (see :meth:`choices_at`)."""
        if n_slots < 0:
            raise ValueError(f"{self.name}: n_slots must be >= 0, got {n_slots}")
        idx = np.arange(first_slot, first_slot + n_slots, dtype=np.int64)
        rec = self.choices_at(idx)
        return EmissionRecord(
            first_slot=first_slot, basis=rec.basis, bit=rec.bit, intensity=rec.intensity
        )

    def choices_at(self, slots: I64) -> EmissionRecord:
        """The key pattern's choices where it played; every other slot (the sync
        pattern, output off, a switch not yet confirmed) is class SYNC, basis Z,
        bit 0: never sifted, never counted as a decoy-state class."""
        p = self._pattern()
        slots = np.asarray(slots, dtype=np.int64)
        idx = np.mod(slots, len(p))
        basis, bit, intensity = p.basis[idx], p.bit[idx], p.intensity[idx]
        other = self._timeline.at(slots) != Played.KEY
        if np.any(other):
            basis[other] = bit[other] = 0
            intensity[other] = IntensityClass.SYNC
        return EmissionRecord(first_slot=-1, basis=basis, bit=bit, intensity=intensity)

    def count_classes(self, first_slot: int, n_slots: int) -> I64:
        """Pulses of each class in the range; slots where the key pattern did not
        play count as SYNC (see :meth:`choices_at`)."""
        counts = np.zeros(N_CLASSES, dtype=np.int64)
        for lo, hi, state in self._timeline.runs(first_slot, first_slot + max(0, n_slots)):
            if state is Played.KEY:
                counts += self._key_counts(lo, hi - lo)
            else:
                counts[IntensityClass.SYNC] += hi - lo
        return counts

    def _key_counts(self, first_slot: int, n_slots: int) -> I64:
        """Pulses of each class of the key pattern: whole periods times the
        per-period counts, plus the partial period (at most two slices)."""
        p = self._pattern()
        length = len(p)
        periods, rest = divmod(max(0, n_slots), length)
        counts = periods * p.period_counts
        start = first_slot % length
        stop = start + rest
        pieces = (
            [p.intensity[start:stop]]
            if stop <= length
            else [
                p.intensity[start:],
                p.intensity[: stop - length],
            ]
        )
        for piece in pieces:
            counts = counts + np.bincount(piece, minlength=N_CLASSES)[:N_CLASSES]
        return counts.astype(np.int64)
