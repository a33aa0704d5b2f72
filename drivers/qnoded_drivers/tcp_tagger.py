"""A time tagger that streams over TCP: the ``tcp-tagger`` driver and its wire protocol.

Wire protocol, version 1
========================

Two TCP connections to the tagger: *control* (``port``) and *data* (the port
``STRM:PORT?`` names).

Control: ASCII lines ending in ``\\n``, SCPI style.  A query (it ends in
``?``) gets one reply line; a query that fails gets an empty line and queues
its error.  A command gets no reply: its outcome is read from the error queue
with ``SYST:ERR?`` (``0,"No error"`` or ``<code>,"<message>"``, SCPI codes,
oldest first).  The driver sends every command together with a ``SYST:ERR?``,
so each one is a confirmed round trip.

==================  =========================================================
``*IDN?``           ``<vendor>,<model>,<serial>,<firmware>``
``CHAN:LIST?``      the input channels, comma separated (``0,1,2,3``)
``CHAN:DEL c,ps``   input delay of channel ``c``, integer ps (applied by the
                    tagger to that channel's tags before they are sorted)
``CHAN:DEL? c``     that delay
``STRM:PORT?``      the data port
``STRM:START``      stream frames to the data connection (-221 if none)
``STRM:STOP``       stop streaming
``SYST:ERR?``       the oldest queued error, or ``0,"No error"``
==================  =========================================================

Data: on accepting a connection the tagger sends an 8-byte greeting
(``b"QTTD"``, u16 version, u16 zero), then, while streaming, frames; the
client sends nothing.  One data connection at a time: a new one replaces the
old one.  A frame is a 48-byte header, little-endian, then ``count`` records:

======  ====  ================================================================
offset  size  field
======  ====  ================================================================
0       4     magic ``b"QTTF"``
4       1     version (1)
5       1     flags: bit 0 OVERFLOW, the tagger dropped ``lost`` records
              inside this frame's span (its buffer was full); other bits 0
6       2     reserved, 0
8       8     ``seq`` (u64): +1 per frame, continuing across connections; a
              frame the tagger could not deliver still takes its number
16      8     ``t0_ps`` (i64)  the span of tagger time this frame covers,
24      8     ``t1_ps`` (i64)  ``[t0_ps, t1_ps)``
32      4     ``count`` (u32): records that follow, at most 2**20
36      4     ``lost`` (u32): records dropped inside the span (OVERFLOW)
40      4     CRC-32 (zlib) of the records
44      4     CRC-32 of header bytes 0..43
======  ====  ================================================================

A record is 9 bytes: ``time_ps`` (i64, the tagger's clock, channel delay
applied) then ``channel`` (u8); ascending in time, each inside its frame's
span.  Frames tile the tagger's time axis: each starts where the previous
one (by ``seq``) ended, so an empty frame says "no tag in this span"; the
tagger sends one at least every second, which is the stream's heartbeat.

Why absolute 64-bit times rather than a 32-bit wrapping timestamp with
rollover records: every frame is self-contained, so a lost, corrupt or
overflowing frame loses only its own tags, never the time base (with
rollovers, a lost frame hides how many wraps it held, and every loss would
cost the node a fresh clock lock).  It costs 9 bytes a tag instead of 4-5:
27 MB/s at 3e6 tags/s, far above a QKD receiver's count rate and well
within gigabit Ethernet.  Signed, because the node's tags are int64 and a
tagger's clock may read negative times (the simulated clock offset does).

What the driver does with what can go wrong
-------------------------------------------

- Bad framing (magic, version, unknown flags, header CRC, a record count over
  the limit), records out of order, outside their frame's span or on an
  unknown channel, a frame that starts before the previous one ended or spans
  more than ``MAX_FRAME_BATCHES`` batches: :class:`TaggerFrameError`.  The
  stream can no longer be trusted to be in step, so it raises, and the node
  reopens it (a new connection).
- A sequence gap, an OVERFLOW flag or a payload CRC mismatch: tags were lost
  in a span the driver knows exactly (absolute times, tiled frames).  Every
  batch that overlaps the span is *left out*: its ``seq`` is skipped, which
  the node counts as a dropped batch, and a warning names the device, the
  frame and the span.  Leaving it out rather than raising keeps what a
  :class:`TagBatch` promises, that ``[start_ps, stop_ps)`` holds every tag of
  that time (Alice counts the pulses she sent per intensity class over
  exactly that interval for the decoy-state estimate, so a batch with tags
  missing would bias the gains), while raising would make the node reopen the
  stream and take a new time base, and Alice re-lock, for a loss of one
  batch.  ``max_lost_batches`` consecutive batches left out for losses seen
  while streaming raise :class:`TaggerDataLossError`, so a tagger that cannot
  keep up raises an alarm instead of starving the node quietly.
- No frame for ``timeout_s`` (a stalled tagger): :class:`TaggerTimeoutError`;
  a closed data or control connection: :class:`TaggerConnectionError`.  Both
  raise out of :meth:`TcpTimeTagger.stream`; the next call reconnects and
  continues (batch ``seq`` and time go on; what passed meanwhile is a gap).
- A control round trip beyond ``timeout_s``: :class:`TaggerTimeoutError`, and
  the connection is reopened on next use (a late reply would put every later
  one out of step); an error in the queue: :class:`TaggerCommandError`.
- A tagger whose frame ``seq`` goes back has restarted: :class:`TaggerFrameError`,
  and the next stream starts on the new time base.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import zlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar, Self

import numpy as np
import numpy.typing as npt
import structlog

from qnoded.contracts import DeviceError, DeviceKind, DriverContext, TagBatch
from qnoded_drivers.scpi import parse_error_entry

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]

log = structlog.get_logger("qnoded_drivers.tcp_tagger")

PROTOCOL_VERSION = 1
GREETING = struct.Struct("<4sHH")
GREETING_MAGIC = b"QTTD"
HEADER = struct.Struct("<4sBBHQqqIIII")
FRAME_MAGIC = b"QTTF"
RECORD = np.dtype([("t", "<i8"), ("ch", "u1")])  # packed: 9 bytes
FLAG_OVERFLOW = 0x01
MAX_RECORDS = 1 << 20
# Batches one frame may complete: a frame spans about a second (the heartbeat), which is
# 100 batches at the default 10 ms.  One declaring far more is corrupt, and cutting it
# batch by batch would not end (2**62 ps: 4.6e12 batches of 1 us).
MAX_FRAME_BATCHES = 1 << 16
_ERROR_QUEUE_MAX = 32  # SYST:ERR? reads that may be needed to empty a queue on connect

_OPTIONS = ("host", "port", "batch_duration_ps", "timeout_s", "max_lost_batches")


class TaggerError(DeviceError):
    """A failure of a TCP time tagger; the message names the device and what failed."""


class TaggerConnectionError(TaggerError):
    """A control or data connection could not be opened, or closed under us."""


class TaggerTimeoutError(TaggerError):
    """A round trip had no answer, or the stream fell silent, within ``timeout_s``."""


class TaggerCommandError(TaggerError):
    """The tagger refused a command (an error in its queue) or answered nonsense."""


class TaggerFrameError(TaggerError):
    """A frame broke the wire protocol; the stream cannot be trusted to be in step."""


class TaggerDataLossError(TaggerError):
    """Tags were lost in ``max_lost_batches`` consecutive batches."""


# -- the wire format: one definition, used by the driver, the emulator and tests ------------


def encode_frame(
    seq: int,
    t0_ps: int,
    t1_ps: int,
    times_ps: I64,
    channels: U8,
    *,
    flags: int = 0,
    lost: int = 0,
) -> bytes:
    """One frame: header and records, both CRCs filled in."""
    rec = np.empty(times_ps.shape[0], dtype=RECORD)
    rec["t"] = times_ps
    rec["ch"] = channels
    payload = rec.tobytes()
    head = HEADER.pack(
        FRAME_MAGIC,
        PROTOCOL_VERSION,
        flags,
        0,
        seq,
        t0_ps,
        t1_ps,
        rec.shape[0],
        lost,
        zlib.crc32(payload),
        0,
    )[:-4]
    return head + struct.pack("<I", zlib.crc32(head)) + payload


@dataclass(frozen=True, slots=True)
class FrameHeader:
    seq: int
    t0_ps: int
    t1_ps: int
    flags: int
    count: int
    lost: int
    payload_crc: int


def decode_header(data: bytes) -> FrameHeader:
    """Parse and check a header; ``ValueError`` saying what is wrong."""
    if len(data) != HEADER.size:  # else struct.error, which is no ValueError
        raise ValueError(f"header of {len(data)} bytes, expected {HEADER.size}")
    magic, version, flags, _, seq, t0, t1, count, lost, payload_crc, header_crc = HEADER.unpack(
        data
    )
    if magic != FRAME_MAGIC:
        raise ValueError(f"bad magic {magic!r} (expected {FRAME_MAGIC!r})")
    if zlib.crc32(data[: HEADER.size - 4]) != header_crc:
        raise ValueError("header CRC mismatch")
    if version != PROTOCOL_VERSION:
        raise ValueError(f"protocol version {version}, this driver speaks {PROTOCOL_VERSION}")
    if flags & ~FLAG_OVERFLOW:
        raise ValueError(f"unknown flags 0x{flags:02x}")
    if count > MAX_RECORDS:
        raise ValueError(f"{count} records, more than the limit {MAX_RECORDS}")
    if t1 < t0:
        raise ValueError(f"span ends ({t1} ps) before it starts ({t0} ps)")
    return FrameHeader(seq, t0, t1, flags, count, lost, payload_crc)


@dataclass(frozen=True, slots=True)
class Frame:
    """A received frame; ``payload_ok`` False means its records were discarded."""

    seq: int
    t0_ps: int
    t1_ps: int
    flags: int
    lost: int
    times_ps: I64
    channels: U8
    payload_ok: bool


def decode_records(head: FrameHeader, payload: bytes, channels: frozenset[int]) -> Frame:
    """Records of a frame whose header checked out.  A CRC mismatch gives an empty,
    not-ok frame (the span is known, its tags are not); records that break the
    protocol raise ``ValueError``."""
    if len(payload) != head.count * RECORD.itemsize:
        raise ValueError(
            f"{len(payload)} record bytes, the header declares {head.count} records "
            f"({head.count * RECORD.itemsize} bytes)"
        )
    if zlib.crc32(payload) != head.payload_crc:
        e64, e8 = np.empty(0, np.int64), np.empty(0, np.uint8)
        return Frame(head.seq, head.t0_ps, head.t1_ps, head.flags, head.lost, e64, e8, False)
    rec = np.frombuffer(payload, dtype=RECORD)
    t = np.ascontiguousarray(rec["t"], dtype=np.int64)
    ch = np.ascontiguousarray(rec["ch"], dtype=np.uint8)
    if t.shape[0]:
        if t.shape[0] > 1 and int(np.diff(t).min()) < 0:
            bad = int(np.argmax(np.diff(t) < 0)) + 1
            raise ValueError(f"records not in time order at index {bad}")
        if int(t[0]) < head.t0_ps or int(t[-1]) >= head.t1_ps:
            raise ValueError(
                f"records [{int(t[0])}, {int(t[-1])}] ps outside the frame's span "
                f"[{head.t0_ps}, {head.t1_ps})"
            )
        unknown = set(np.unique(ch).tolist()) - channels
        if unknown:
            raise ValueError(f"records on unknown channel(s) {sorted(unknown)}")
    return Frame(head.seq, head.t0_ps, head.t1_ps, head.flags, head.lost, t, ch, True)


# -- frames in, batches out ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LostSpan:
    """Tagger time ``[start_ps, stop_ps)`` whose tags are not all here."""

    start_ps: int
    stop_ps: int
    why: str
    escalates: bool  # lost while streaming (counts towards max_lost_batches)


@dataclass(frozen=True, slots=True)
class LeftOut:
    """``n`` consecutive batches, from ``seq`` and ``start_ps``, not yielded because
    they overlap lost spans."""

    seq: int
    n: int
    start_ps: int
    spans: tuple[LostSpan, ...]


@dataclass(slots=True)
class Assembler:
    """Cuts a tiled stream of frames into batches on the grid ``k * duration_ps``.

    Pure and synchronous (the driver feeds it; tests drive it directly).  It
    lives as long as the driver, so a reopened stream continues batch ``seq``
    and time.  A batch ``[s, s + duration_ps)`` is complete once a frame has
    covered time up to its end; the first batch starts at the first multiple of
    ``duration_ps`` at or after the first frame's start.
    """

    duration_ps: int
    channels: frozenset[int]
    next_frame: int | None = None
    covered_ps: int | None = None
    start_ps: int | None = None
    batch_seq: int = 0
    fresh_session: bool = True
    _t: list[I64] = field(default_factory=list)
    _c: list[U8] = field(default_factory=list)
    _lost: list[LostSpan] = field(default_factory=list)

    def new_session(self) -> None:
        """A new connection: a gap before its first frame was not lost while streaming."""
        self.fresh_session = True

    def restart(self) -> None:
        """Forget the frame stream (the tagger restarted); batch ``seq`` goes on."""
        self.next_frame = self.covered_ps = self.start_ps = None
        self._t.clear()
        self._c.clear()
        self._lost.clear()

    def _lose(self, start: int, stop: int, why: str) -> LostSpan:
        # An empty span (a sequence gap between frames that abut) still taints
        # the batch it falls in: a missing frame's content is unknown.
        span = LostSpan(start, max(stop, start + 1), why, escalates=not self.fresh_session)
        self._lost.append(span)
        return span

    def feed(self, frame: Frame) -> tuple[list[TagBatch | LeftOut], list[LostSpan]]:
        """Take one frame; return the batches it completes (in order) and any new
        lost spans.  ``ValueError`` if the frame cannot follow the previous one;
        :class:`_TaggerRestartedError` if the tagger's frame numbers went back."""
        new: list[LostSpan] = []
        if frame.t1_ps - frame.t0_ps > MAX_FRAME_BATCHES * self.duration_ps:
            raise ValueError(
                f"frame {frame.seq} spans [{frame.t0_ps}, {frame.t1_ps}) ps, more than "
                f"{MAX_FRAME_BATCHES} batches of {self.duration_ps} ps"
            )
        if self.next_frame is not None and self.covered_ps is not None:
            if frame.seq < self.next_frame:
                raise _TaggerRestartedError(
                    f"frame seq went back from {self.next_frame - 1} to {frame.seq}: "
                    "the tagger restarted (a new time base)"
                )
            if frame.t0_ps < self.covered_ps:
                raise ValueError(
                    f"frame {frame.seq} starts at {frame.t0_ps} ps, before the previous frame "
                    f"ended ({self.covered_ps} ps)"
                )
            if frame.seq > self.next_frame:
                missing = f"{self.next_frame}" + (
                    f"..{frame.seq - 1}" if frame.seq - 1 > self.next_frame else ""
                )
                new.append(
                    self._lose(
                        self.covered_ps, frame.t0_ps, f"frame(s) {missing} missing (sequence gap)"
                    )
                )
            elif frame.t0_ps > self.covered_ps:
                new.append(
                    self._lose(
                        self.covered_ps,
                        frame.t0_ps,
                        f"frame {frame.seq} leaves a hole after frame {self.next_frame - 1}",
                    )
                )
        self.fresh_session = False
        if not frame.payload_ok:
            new.append(self._lose(frame.t0_ps, frame.t1_ps, f"frame {frame.seq}: payload CRC"))
        elif frame.flags & FLAG_OVERFLOW:
            why = f"frame {frame.seq}: overflow, {frame.lost} records dropped by the tagger"
            new.append(self._lose(frame.t0_ps, frame.t1_ps, why))
        if frame.times_ps.shape[0]:
            self._t.append(frame.times_ps)
            self._c.append(frame.channels)
        if self.start_ps is None:
            self.start_ps = -(-frame.t0_ps // self.duration_ps) * self.duration_ps
        self.next_frame, self.covered_ps = frame.seq + 1, frame.t1_ps
        return self._cut(), new

    def _cut(self) -> list[TagBatch | LeftOut]:
        assert self.start_ps is not None and self.covered_ps is not None
        dur = self.duration_ps
        if self.covered_ps - self.start_ps < dur:
            return []
        t = np.concatenate(self._t) if self._t else np.empty(0, np.int64)
        c = np.concatenate(self._c) if self._c else np.empty(0, np.uint8)
        pos = int(np.searchsorted(t, self.start_ps))  # before the first batch: not ours
        out: list[TagBatch | LeftOut] = []
        while self.covered_ps - self.start_ps >= dur:
            s, e = self.start_ps, self.start_ps + dur
            spans = tuple(x for x in self._lost if x.start_ps < e and x.stop_ps > s)
            if spans:
                # Whole batches inside one span (a long gap) go in one step.
                inner = max(x.stop_ps for x in spans)
                n = max(1, (min(inner, self.covered_ps) - s) // dur)
                out.append(LeftOut(self.batch_seq, n, s, spans))
                self.batch_seq += n
                self.start_ps = s + n * dur
                pos = int(np.searchsorted(t, self.start_ps))
            else:
                hi = int(np.searchsorted(t, e))
                out.append(
                    TagBatch(
                        seq=self.batch_seq,
                        start_ps=s,
                        stop_ps=e,
                        timestamps_ps=np.ascontiguousarray(t[pos:hi]),
                        channels=np.ascontiguousarray(c[pos:hi]),
                    )
                )
                self.batch_seq += 1
                self.start_ps, pos = e, hi
            self._lost = [x for x in self._lost if x.stop_ps > self.start_ps]
        self._t, self._c = ([t[pos:]], [c[pos:]]) if pos < t.shape[0] else ([], [])
        return out


class _TaggerRestartedError(ValueError):
    """The tagger's frame numbers went back."""


# -- the control connection ------------------------------------------------------------------


class _Control:
    """One control connection: a line protocol, one round trip at a time, each bounded.

    A round trip that times out or fails marks the connection broken: a late
    reply would answer the next query, so the driver reopens it instead.
    """

    def __init__(self, device: str, host: str, port: int, timeout_s: float) -> None:
        self._device, self._host, self._port, self._timeout_s = device, host, port, timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()
        self.broken = False

    @property
    def where(self) -> str:
        return f"{self._device}: control {self._host}:{self._port}"

    @property
    def alive(self) -> bool:
        return (
            self._reader is not None
            and self._writer is not None
            and not self.broken
            # A reset sets the reader's exception without an EOF: check both.
            and not self._reader.at_eof()
            and self._reader.exception() is None
            and not self._writer.is_closing()
        )

    async def open(self) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        except TimeoutError as exc:
            raise TaggerTimeoutError(
                f"{self.where}: no connection within {self._timeout_s} s"
            ) from exc
        except OSError as exc:
            raise TaggerConnectionError(f"{self.where}: cannot connect: {exc}") from exc
        self.broken = False

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(self._timeout_s):
                    await writer.wait_closed()

    async def _round_trip(self, lines: str, command: str) -> str:
        """Send ``lines`` and read one reply line."""
        if self._reader is None or self._writer is None:
            raise TaggerConnectionError(f"{self.where}: {command!r}: not connected")
        try:
            async with asyncio.timeout(self._timeout_s):
                self._writer.write(lines.encode("ascii") + b"\n")
                await self._writer.drain()
                raw = await self._reader.readuntil(b"\n")
        except TimeoutError as exc:
            self.broken = True
            raise TaggerTimeoutError(
                f"{self.where}: no answer to {command!r} within {self._timeout_s} s"
            ) from exc
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            self.broken = True
            raise TaggerConnectionError(
                f"{self.where}: connection lost during {command!r}: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            return raw.decode("ascii").strip()
        except UnicodeDecodeError as exc:
            self.broken = True
            raise TaggerCommandError(
                f"{self.where}: garbled reply to {command!r}: {raw!r}"
            ) from exc

    async def _next_error(self, command: str) -> tuple[int, str]:
        reply = await self._round_trip("SYST:ERR?", f"SYST:ERR? after {command}")
        return _parse_error(reply, f"{self.where}: {command!r}")

    async def query(self, command: str) -> str:
        """A query's reply; an empty reply means it failed: its error is raised."""
        async with self._lock:
            reply = await self._round_trip(command, command)
            if reply:
                return reply
            code, message = await self._next_error(command)
        raise TaggerCommandError(f"{self.where}: {command!r} failed: {code},{message!r}")

    async def command(self, command: str) -> None:
        """A command and ``SYST:ERR?`` in one round trip; an error raises."""
        async with self._lock:
            reply = await self._round_trip(f"{command}\nSYST:ERR?", command)
        code, message = _parse_error(reply, f"{self.where}: {command!r}")
        if code != 0:
            raise TaggerCommandError(f"{self.where}: {command!r} refused: {code},{message!r}")

    async def drain_errors(self) -> None:
        """Empty a queue that an earlier client may have left full."""
        async with self._lock:
            for _ in range(_ERROR_QUEUE_MAX):
                code, _ = await self._next_error("connect")
                if code == 0:
                    return
        raise TaggerCommandError(f"{self.where}: error queue does not empty")


def _parse_error(reply: str, where: str) -> tuple[int, str]:
    try:
        return parse_error_entry(reply)
    except ValueError:
        raise TaggerCommandError(f"{where}: SYST:ERR? answered {reply!r}") from None


# -- the driver ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Session:
    """One streaming session: its data connection and whether STRM:START went through."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    started: bool = False
    closed: bool = False


def _int_option(options: Mapping[str, Any], key: str, default: int | None, lo: int, hi: int) -> int:
    value = options.get(key, default)
    if value is None:
        raise ValueError(f"option {key!r} is required")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # TOML 1e10
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"option {key!r} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


class TcpTimeTagger:
    """A time tagger on the network, speaking the protocol above.

    Options: ``host`` and ``port`` (the control connection; required),
    ``batch_duration_ps`` (default 10 ms), ``timeout_s`` (every round trip and
    the longest silence of the stream, default 2 s), ``max_lost_batches``
    (default 100).  Channel delays are the tagger's own (``CHAN:DEL``); the
    driver reads them on open and writes them back after a reconnect, so a
    tagger that was power-cycled gets them again.
    """

    kind: ClassVar[DeviceKind] = DeviceKind.TIME_TAGGER

    def __init__(self, name: str, options: Mapping[str, Any], context: DriverContext) -> None:
        unknown = set(options) - set(_OPTIONS)
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)}; valid: {', '.join(_OPTIONS)}")
        host = options.get("host")
        if not isinstance(host, str) or not host:
            raise ValueError("option 'host' (the tagger's address) is required")
        timeout_s = options.get("timeout_s", 2.0)
        if (
            isinstance(timeout_s, bool)
            or not isinstance(timeout_s, int | float)
            or not 0 < timeout_s <= 600
        ):
            raise ValueError(f"option 'timeout_s' must be a number in (0, 600], got {timeout_s!r}")
        self.name = name
        self._host = host
        self._port = _int_option(options, "port", None, 1, 65535)
        self._duration_ps = _int_option(options, "batch_duration_ps", 10_000_000_000, 10**6, 10**13)
        self._timeout_s = float(timeout_s)
        self._max_lost = _int_option(options, "max_lost_batches", 100, 1, 10**9)
        self._node = context.node_id
        self._ctl = _Control(name, host, self._port, self._timeout_s)
        self._idn = ""
        self._data_port = 0
        self._channels: tuple[int, ...] = ()
        self._delays: dict[int, int] = {}
        self._asm: Assembler | None = None
        self._session: _Session | None = None
        self._open = False
        self._identified = False
        self._reconnecting = asyncio.Lock()
        self.counts: dict[str, int] = dict.fromkeys(
            ("frames", "lost_spans", "overflow_records", "crc_errors", "batches_left_out"), 0
        )

    # -- lifecycle ---------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        try:
            await self._connect_control()
        except BaseException:
            await self._ctl.close()
            raise
        self._open = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False
        try:
            await self._end_session()
        finally:
            await self._ctl.close()

    async def _connect_control(self) -> None:
        """(Re)open the control connection and learn or restore the tagger's state."""
        await self._ctl.close()
        await self._ctl.open()
        idn = await self._ctl.query("*IDN?")
        if len(idn.split(",")) != 4:
            raise TaggerCommandError(f"{self._ctl.where}: '*IDN?' answered {idn!r}")
        await self._ctl.drain_errors()
        chans = _parse_channels(await self._ctl.query("CHAN:LIST?"), self._ctl.where)
        port = await self._ctl.query("STRM:PORT?")
        try:
            data_port = int(port)
        except ValueError:
            raise TaggerCommandError(f"{self._ctl.where}: 'STRM:PORT?' answered {port!r}") from None
        if not 0 < data_port < 65536:  # else connecting raises OverflowError, not OSError
            raise TaggerCommandError(
                f"{self._ctl.where}: 'STRM:PORT?' answered {port!r}, not a TCP port (1..65535)"
            )
        if self._identified and chans != self._channels:
            raise TaggerCommandError(
                f"{self._ctl.where}: channels changed from {self._channels} to {chans} "
                "since the driver opened"
            )
        self._idn, self._data_port, self._channels = idn, data_port, chans
        if not self._identified:
            for ch in chans:
                self._delays[ch] = await self._read_delay(ch)
            self._asm = Assembler(self._duration_ps, frozenset(chans))
            self._identified = True
        else:
            # The tagger may have been power-cycled: make its delays ours again.
            for ch, delay in self._delays.items():
                await self._write_delay(ch, delay)

    async def _control(self, *, force: bool = False) -> _Control:
        """The control connection, reopened if it died (or ``force``).  Under a lock:
        a ping and a stream that find it dead at once must not both reopen it."""
        async with self._reconnecting:
            if force or not self._ctl.alive:
                await self._connect_control()
        return self._ctl

    async def ping(self) -> bool:
        if not self._open:
            return False  # closed: answering would mean opening a connection nobody closes
        try:
            ctl = await self._control()
            await ctl.query("*IDN?")
        except DeviceError:
            return False
        return True

    def describe(self) -> Mapping[str, Any]:
        return {
            "driver": "tcp-tagger",
            "host": self._host,
            "port": self._port,
            "data_port": self._data_port,
            "idn": self._idn,
            "channels": list(self._channels),
            "batch_duration_ps": self._duration_ps,
            "delays_ps": dict(self._delays),
        } | self.counts

    # -- channels ----------------------------------------------------------------------
    @property
    def channels(self) -> tuple[int, ...]:
        return self._channels

    def delay(self, channel: int) -> int:
        return self._delays[channel]

    async def set_delay(self, channel: int, delay_ps: int) -> None:
        if channel not in self._delays:
            raise ValueError(f"{self.name}: no channel {channel} (have {self._channels})")
        if not self._open:
            raise DeviceError(f"{self.name}: set_delay() on a tagger that is not open")
        await self._control()
        await self._write_delay(channel, int(delay_ps))
        self._delays[channel] = int(delay_ps)

    async def _read_delay(self, channel: int) -> int:
        reply = await self._ctl.query(f"CHAN:DEL? {channel}")
        try:
            return int(reply)
        except ValueError:
            raise TaggerCommandError(
                f"{self._ctl.where}: 'CHAN:DEL? {channel}' answered {reply!r}"
            ) from None

    async def _write_delay(self, channel: int, delay_ps: int) -> None:
        await self._ctl.command(f"CHAN:DEL {channel},{delay_ps}")
        # Read back: a tagger may round to its own resolution without an error.
        got = await self._read_delay(channel)
        if got != delay_ps:
            raise TaggerCommandError(
                f"{self._ctl.where}: channel {channel} delay set to {delay_ps} ps reads back "
                f"{got} ps"
            )

    # -- streaming ---------------------------------------------------------------------
    async def stream(self) -> AsyncIterator[TagBatch]:
        """Batches from where the last stream stopped; raises a :class:`TaggerError`
        when the stream breaks (the next call reconnects)."""
        if not self._open or self._asm is None:
            raise DeviceError(f"{self.name}: stream() on a tagger that is not open")
        await self._end_session()  # one stream at a time: a new call replaces the old one
        session = await self._start_session()
        asm = self._asm
        asm.new_session()
        lost_run = 0
        try:
            while True:
                frame = await self._read_frame(session)
                try:
                    items, spans = asm.feed(frame)
                except _TaggerRestartedError as exc:
                    asm.restart()
                    raise TaggerFrameError(f"{self._data_where}: {exc}") from None
                except ValueError as exc:
                    raise TaggerFrameError(f"{self._data_where}: {exc}") from None
                self._note_losses(frame, spans)
                for item in items:
                    if isinstance(item, TagBatch):
                        lost_run = 0
                        yield item
                        continue
                    self.counts["batches_left_out"] += item.n
                    if any(s.escalates for s in item.spans):
                        lost_run += item.n
                    if lost_run >= self._max_lost:
                        raise TaggerDataLossError(
                            f"{self._data_where}: tags lost in {lost_run} consecutive batches "
                            f"(last: {item.spans[-1].why})"
                        )
        finally:
            await self._end_session()

    @property
    def _data_where(self) -> str:
        return f"{self.name}: data {self._host}:{self._data_port}"

    def _note_losses(self, frame: Frame, spans: list[LostSpan]) -> None:
        self.counts["frames"] += 1
        if not frame.payload_ok:
            self.counts["crc_errors"] += 1
        elif frame.flags & FLAG_OVERFLOW:
            self.counts["overflow_records"] += frame.lost
        for span in spans:
            self.counts["lost_spans"] += 1
            # One line per loss, not per batch: the batches it costs are counted
            # in describe() and show at the node as gaps in the batch sequence.
            log.warning(
                "tags lost, overlapping batches left out",
                device=self.name,
                node=self._node,
                what=span.why,
                span_ps=[span.start_ps, span.stop_ps],
            )

    async def _start_session(self) -> _Session:
        fresh = not self._ctl.alive
        ctl = await self._control()
        where = self._data_where
        try:
            async with asyncio.timeout(self._timeout_s):
                reader, writer = await asyncio.open_connection(self._host, self._data_port)
        except TimeoutError as exc:
            raise TaggerTimeoutError(f"{where}: no connection within {self._timeout_s} s") from exc
        except OSError as exc:
            raise TaggerConnectionError(f"{where}: cannot connect: {exc}") from exc
        session = _Session(reader, writer)
        self._session = session
        try:
            hello = await self._read_exactly(session, GREETING.size, "greeting")
            magic, version, _ = GREETING.unpack(hello)
            if magic != GREETING_MAGIC or version != PROTOCOL_VERSION:
                raise TaggerFrameError(
                    f"{where}: greeting {hello!r} is not a tcp tagger's, version {PROTOCOL_VERSION}"
                )
            try:
                await ctl.command("STRM:START")
            except TaggerConnectionError:
                if fresh:
                    raise
                # The control connection died with the old stream, unnoticed until now.
                ctl = await self._control(force=True)
                await ctl.command("STRM:START")
            session.started = True
        except BaseException:
            await self._end_session()
            raise
        return session

    async def _end_session(self) -> None:
        """Stop streaming and close the data connection; safe to call twice."""
        session, self._session = self._session, None
        if session is None or session.closed:
            return
        session.closed = True
        try:
            if session.started and self._ctl.alive:
                # Best effort: a tagger that is gone needs no stopping, and the
                # error that ended the stream is the one to report.
                with contextlib.suppress(DeviceError):
                    await self._ctl.command("STRM:STOP")
        finally:
            session.writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(self._timeout_s):
                    await session.writer.wait_closed()

    async def _read_exactly(self, session: _Session, n: int, what: str) -> bytes:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await session.reader.readexactly(n)
        except TimeoutError as exc:
            raise TaggerTimeoutError(
                f"{self._data_where}: stream silent for {self._timeout_s} s (waiting for {what})"
            ) from exc
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise TaggerConnectionError(
                f"{self._data_where}: connection closed (waiting for {what}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    async def _read_frame(self, session: _Session) -> Frame:
        asm = self._asm
        assert asm is not None
        after = "" if asm.next_frame is None else f" after frame {asm.next_frame - 1}"
        raw = await self._read_exactly(session, HEADER.size, f"frame header{after}")
        try:
            head = decode_header(raw)
        except ValueError as exc:
            raise TaggerFrameError(f"{self._data_where}: bad frame{after}: {exc}") from None
        payload = await self._read_exactly(
            session, head.count * RECORD.itemsize, f"records of frame {head.seq}"
        )
        try:
            return decode_records(head, payload, asm.channels)
        except ValueError as exc:
            raise TaggerFrameError(f"{self._data_where}: frame {head.seq}: {exc}") from None


def _parse_channels(reply: str, where: str) -> tuple[int, ...]:
    try:
        chans = tuple(int(x) for x in reply.split(","))
    except ValueError:
        raise TaggerCommandError(f"{where}: 'CHAN:LIST?' answered {reply!r}") from None
    if not chans or len(set(chans)) != len(chans) or not all(0 <= c < 256 for c in chans):
        raise TaggerCommandError(f"{where}: 'CHAN:LIST?' answered {reply!r}")
    return chans
