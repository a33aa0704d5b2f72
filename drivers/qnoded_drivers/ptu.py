"""PicoQuant PTU files: a streaming reader of T2 time tags, and an encoder.

The format is PicoQuant's (their public "PicoQuant-Time-Tagged-File-Format-Demos"
repository: ``doc/apx_tttrrecords.html`` and the demo readers ``PTU/C/ptudemo.cc``
and ``PTU/Python/Read_PTU.py``, which are the specification in practice):

* ``PQTTTR\\0\\0`` magic, an 8-byte version string, then tags of 48 bytes each
  (``ident[32]``, ``idx`` int32, ``type`` uint32, an 8-byte value), little end;
  for AnsiString, WideString, Float8Array and BinaryBlob the value is the byte
  length of data that follows the tag.  ``Header_End`` closes the header.
* ``TTResultFormat_TTTRRecType`` names the record format; ``MeasDesc_GlobalResolution``
  (seconds) is the unit of the time tag.  Then 32-bit records, little end.
* HydraHarp, MultiHarp and TimeHarp 260 T2: ``special:1 | channel:6 | timetag:25``
  from the MSB.  Special records: channel 63 is a time-tag overflow (HydraHarp V1,
  0x00010204: one period of 33,552,000 per record; all later types: ``timetag``
  periods of 2**25, 0 meaning one), channel 0 the sync input, 1..15 markers.
* PicoHarp T2 (0x00010203): ``channel:4 | timetag:28``; channel 15 is special,
  an overflow (period 210,698,240) when the low 4 bits of ``timetag`` are 0,
  markers otherwise.

Input numbers are PicoQuant's, as their demo readers print them: on HydraHarp,
MultiHarp and TimeHarp 0 is the sync input and 1..64 the detector inputs (the
record's channel field + 1); on PicoHarp the record's channel field (0..4) as it
is.  A channel map takes input numbers to the reader's output channels; events
on unmapped inputs (by default the sync input) are dropped and counted, and so
are markers: their time is coarse (a few ns), the format allows them slightly
out of order, and they carry no photon.

The reader decodes a chunk of records at a time with numpy (overflows summed
with ``cumsum``), so memory is bounded by the chunk, not the file.  Events come
out in time order; a file whose events go back in time is an error naming the
record, unless ``reorder_window_ps`` allows that much disorder, which is then
sorted out.  Every error names the file and the byte offset or record number.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Final, Literal, Self

import numpy as np
import numpy.typing as npt

MAGIC: Final = b"PQTTTR\0\0"
_TAG = struct.Struct("<32siI8s")  # ident, idx, type, value (raw 8 bytes)
_HEADER_END: Final = "Header_End"
_RECORD_BYTES: Final = 4


class PTUError(ValueError):
    """A PTU file is malformed or unsupported; the message names the file and where."""


class TagType(enum.IntEnum):
    """Tag types of the PTU header (``ptudemo.cc``, ``ty...`` constants)."""

    EMPTY8 = 0xFFFF0008
    BOOL8 = 0x00000008
    INT8 = 0x10000008
    BITSET64 = 0x11000008
    COLOR8 = 0x12000008
    FLOAT8 = 0x20000008
    TDATETIME = 0x21000008
    FLOAT8_ARRAY = 0x2001FFFF
    ANSI_STRING = 0x4001FFFF
    WIDE_STRING = 0x4002FFFF
    BINARY_BLOB = 0xFFFFFFFF


# Types whose 8-byte value is the length of data that follows the tag.
_VARIABLE = frozenset(
    {TagType.FLOAT8_ARRAY, TagType.ANSI_STRING, TagType.WIDE_STRING, TagType.BINARY_BLOB}
)

TagValue = bool | int | float | str | bytes | datetime | tuple[float, ...] | None

# TDateTime is Delphi's: days since 1899-12-30.
_DELPHI_EPOCH: Final = datetime(1899, 12, 30, tzinfo=UTC)

RT_PICOHARP_T2: Final = 0x00010203
RT_HYDRAHARP_T2: Final = 0x00010204
RT_HYDRAHARP2_T2: Final = 0x01010204
RT_TIMEHARP260N_T2: Final = 0x00010205
RT_TIMEHARP260P_T2: Final = 0x00010206
RT_MULTIHARP_T2: Final = 0x00010207

HT2_V1_PERIOD: Final = 33_552_000
HT2_V2_PERIOD: Final = 1 << 25
PT2_PERIOD: Final = 210_698_240
# The largest overflow count one v2 overflow record carries (its 25-bit time tag).
_MAX_COUNT: Final = (1 << 25) - 1


@dataclass(frozen=True, slots=True)
class RecordFormat:
    """One T2 record format: bit layout and overflow rule."""

    code: int
    name: str
    layout: Literal["ht2", "pt2"]
    overflow_period: int  # time-tag ticks per overflow
    counted_overflows: bool  # the overflow record's time tag holds the count (0 meaning 1)

    @property
    def max_input(self) -> int:
        return 64 if self.layout == "ht2" else 4


def _ht2(code: int, name: str) -> RecordFormat:
    return RecordFormat(code, name, "ht2", HT2_V2_PERIOD, counted_overflows=True)


FORMATS: Final[Mapping[int, RecordFormat]] = {
    f.code: f
    for f in (
        RecordFormat(RT_PICOHARP_T2, "PicoHarp T2", "pt2", PT2_PERIOD, counted_overflows=False),
        RecordFormat(
            RT_HYDRAHARP_T2, "HydraHarp V1 T2", "ht2", HT2_V1_PERIOD, counted_overflows=False
        ),
        _ht2(RT_HYDRAHARP2_T2, "HydraHarp V2 T2"),
        _ht2(RT_TIMEHARP260N_T2, "TimeHarp 260N T2"),
        _ht2(RT_TIMEHARP260P_T2, "TimeHarp 260P T2"),
        _ht2(RT_MULTIHARP_T2, "MultiHarp T2"),
        # apx_tttrrecords.html lists these three in its T2 format table, while the
        # list of codes on the same page and every PicoQuant demo reader use
        # 0x0001020x; both spellings decode the same way, so both are accepted.
        _ht2(0x01010205, "TimeHarp 260N T2 (0x01010205)"),
        _ht2(0x01010206, "TimeHarp 260P T2 (0x01010206)"),
        _ht2(0x01010207, "MultiHarp T2 (0x01010207)"),
    )
}

_T3_NAMES: Final[Mapping[int, str]] = {
    0x00010303: "PicoHarp T3",
    0x00010304: "HydraHarp V1 T3",
    0x01010304: "HydraHarp V2 T3",
    0x00010305: "TimeHarp 260N T3",
    0x00010306: "TimeHarp 260P T3",
    0x00010307: "MultiHarp T3",
}

# Sync input (0) off, detector inputs 1..4 onto qnoded's channels 0..3.
DEFAULT_CHANNEL_MAP: Final[Mapping[int, int]] = {1: 0, 2: 1, 3: 2, 4: 3}


@dataclass(frozen=True, slots=True)
class PTUHeader:
    """What the reader needs from a PTU header, and every tag in it.

    ``tags`` is keyed ``Ident`` for tags with index -1 and ``Ident(idx)``
    otherwise, as PicoQuant's demos print them.
    """

    path: Path
    version: str
    tags: Mapping[str, TagValue]
    record_format: RecordFormat
    resolution_ps: int
    data_offset: int  # byte offset of record 0
    n_records: int


def _where(path: Path, offset: int) -> str:
    return f"{path}: byte {offset}"


def _cstr(raw: bytes, encoding: str = "utf-8") -> str:
    text = raw.split(b"\0", 1)[0]
    try:
        return text.decode(encoding)
    except UnicodeDecodeError:
        # PicoQuant's Windows software writes the ANSI code page.
        return text.decode("latin-1")


def _tag_value(ttype: TagType, raw: bytes, data: bytes) -> TagValue:  # noqa: PLR0911 - one per tag type
    if ttype is TagType.EMPTY8:
        return None
    if ttype is TagType.BOOL8:
        return int.from_bytes(raw, "little", signed=True) != 0
    if ttype in (TagType.INT8, TagType.BITSET64, TagType.COLOR8):
        return int.from_bytes(raw, "little", signed=True)
    if ttype is TagType.FLOAT8:
        return float(struct.unpack("<d", raw)[0])
    if ttype is TagType.TDATETIME:
        days = float(struct.unpack("<d", raw)[0])
        try:
            return _DELPHI_EPOCH + timedelta(days=days)
        except (OverflowError, ValueError):
            return days  # not a representable date: keep the number
    if ttype is TagType.FLOAT8_ARRAY:
        n = len(data) // 8
        return tuple(float(x) for x in struct.unpack(f"<{n}d", data[: 8 * n]))
    if ttype is TagType.ANSI_STRING:
        return _cstr(data)
    if ttype is TagType.WIDE_STRING:
        return data.decode("utf-16-le", errors="replace").split("\0", 1)[0]
    return bytes(data)  # BINARY_BLOB


def _parse_tags(fh: BinaryIO, path: Path, size: int) -> tuple[str, dict[str, TagValue], int]:
    head = fh.read(16)
    if len(head) < 8 or head[:8] != MAGIC:
        raise PTUError(
            f"{path}: not a PTU file: the first 8 bytes are {head[:8]!r}, expected {MAGIC!r}"
        )
    if len(head) < 16:
        raise PTUError(f"{_where(path, len(head))}: header truncated inside the version string")
    version = _cstr(head[8:16], "ascii")
    tags: dict[str, TagValue] = {}
    offset = 16
    entry = 0
    while True:
        raw_tag = fh.read(_TAG.size)
        if len(raw_tag) < _TAG.size:
            raise PTUError(
                f"{_where(path, offset)}: header truncated: tag entry {entry} needs "
                f"{_TAG.size} bytes, {len(raw_tag)} left, and no {_HEADER_END} tag was seen"
            )
        ident_raw, idx, type_code, raw = _TAG.unpack(raw_tag)
        ident = _cstr(ident_raw)
        try:
            ttype = TagType(type_code)
        except ValueError:
            raise PTUError(
                f"{_where(path, offset)}: tag {ident!r} has unknown type 0x{type_code:08X}"
            ) from None
        data = b""
        if ttype in _VARIABLE:
            length = int.from_bytes(raw, "little", signed=True)
            left = size - offset - _TAG.size
            if not 0 <= length <= left:
                raise PTUError(
                    f"{_where(path, offset)}: tag {ident!r} declares {length} bytes of data, "
                    f"but {left} bytes remain in the file"
                )
            data = fh.read(length)
        key = ident if idx < 0 else f"{ident}({idx})"
        tags[key] = _tag_value(ttype, raw, data)
        offset += _TAG.size + len(data)
        entry += 1
        if ident == _HEADER_END:
            return version, tags, offset


def read_header(path: str | os.PathLike[str]) -> PTUHeader:
    """Parse and check a PTU file's header; raises :class:`PTUError` naming the defect.

    Checks beside the tags themselves: the record type is a supported T2 type,
    the global resolution is a whole number of picoseconds, and the data after
    the header is whole 32-bit records, as many as ``TTResult_NumberOfRecords``
    declares (when present).
    """
    p = Path(path)
    try:
        with p.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            version, tags, data_offset = _parse_tags(fh, p, size)
    except OSError as exc:
        raise PTUError(f"{p}: cannot read: {exc}") from exc
    rtype = tags.get("TTResultFormat_TTTRRecType")
    if not isinstance(rtype, int) or isinstance(rtype, bool):
        raise PTUError(f"{p}: header has no TTResultFormat_TTTRRecType (Int8) tag")
    if (rtype >> 8) & 0xFF == 0x03:
        name = _T3_NAMES.get(rtype, "a T3 format")
        raise PTUError(
            f"{p}: record type 0x{rtype:08X} ({name}) is a T3 file: its times count sync "
            "periods, not absolute time; only T2 recordings can be replayed as time tags"
        )
    fmt = FORMATS.get(rtype)
    if fmt is None:
        known = ", ".join(f"0x{c:08X} {f.name}" for c, f in FORMATS.items())
        raise PTUError(f"{p}: unknown record type 0x{rtype:08X}; supported T2 types: {known}")
    bits = tags.get("TTResultFormat_BitsPerRecord")
    if bits is not None and bits != 32:
        raise PTUError(f"{p}: TTResultFormat_BitsPerRecord is {bits!r}; {fmt.name} records are 32")
    res = tags.get("MeasDesc_GlobalResolution")
    # In picoseconds it must fit int64: 1e300 s is finite, yet round(1e312) overflows.
    if not isinstance(res, float) or not 0 < res * 1e12 < 2**63:
        raise PTUError(f"{p}: MeasDesc_GlobalResolution (Float8, seconds) missing or {res!r}")
    res_ps = round(res * 1e12)
    # Tags are integer picoseconds end to end; a fractional unit would need
    # rounding that grows with the time stamp, so it is refused, not guessed.
    if res_ps < 1 or abs(res * 1e12 - res_ps) > 1e-6 * res_ps:
        raise PTUError(
            f"{p}: MeasDesc_GlobalResolution {res!r} s is not a whole number of picoseconds"
        )
    data_bytes = size - data_offset
    n_records, tail = divmod(data_bytes, _RECORD_BYTES)
    declared = tags.get("TTResult_NumberOfRecords")
    if tail:
        raise PTUError(
            f"{_where(p, data_offset + _RECORD_BYTES * n_records)}: truncated record "
            f"{n_records}: {tail} of {_RECORD_BYTES} bytes (header declares {declared!r} records)"
        )
    if isinstance(declared, int) and declared != n_records:
        if declared > n_records:
            raise PTUError(
                f"{_where(p, size)}: file truncated: it ends after record {n_records - 1} but the "
                f"header (TTResult_NumberOfRecords) declares {declared} records"
            )
        raise PTUError(
            f"{_where(p, data_offset + _RECORD_BYTES * declared)}: {n_records - declared} records "
            f"after the {declared} that the header (TTResult_NumberOfRecords) declares"
        )
    return PTUHeader(
        path=p,
        version=version,
        tags=tags,
        record_format=fmt,
        resolution_ps=res_ps,
        data_offset=data_offset,
        n_records=n_records,
    )


@dataclass(slots=True)
class PTUCounts:
    """What a reader has decoded so far, for telemetry and checks."""

    records: int = 0
    overflow_records: int = 0
    overflow_periods: int = 0
    markers: int = 0
    unmapped: int = 0  # events on inputs the channel map leaves out (dropped)
    per_input: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(65, np.int64))


@dataclass(frozen=True, slots=True)
class _Decoded:
    ticks: npt.NDArray[np.int64]  # absolute time tag of every record (overflows: their own)
    inputs: npt.NDArray[np.int16]  # input number; -1 for overflow and marker records
    marker: npt.NDArray[np.bool_]
    overflow: npt.NDArray[np.bool_]
    periods: int  # overflow periods in this chunk


def _decode(words: npt.NDArray[np.uint32], hdr: PTUHeader, base_ticks: int, first: int) -> _Decoded:
    """Decode records ``first...`` of a file; ``base_ticks`` is the overflow sum before them."""
    fmt = hdr.record_format
    w = words.astype(np.int64)
    if fmt.layout == "ht2":
        special = (w >> 31) != 0
        code = (w >> 25) & 0x3F
        tag = w & 0x1FFFFFF
        overflow = special & (code == 63)
        marker = special & (code >= 1) & (code <= 15)
        bad = special & (code >= 16) & (code <= 62)
        what = "special record with undefined channel code"
        inputs = np.where(special, 0, code + 1)  # special channel 0 is the sync input
    else:
        code = w >> 28
        tag = w & 0x0FFFFFFF
        special = code == 15
        overflow = special & ((tag & 0xF) == 0)
        marker = special & ((tag & 0xF) != 0)
        bad = ~special & (code > 4)
        what = "record with undefined channel"
        inputs = code
    if bad.any():
        i = int(np.argmax(bad))
        raise PTUError(
            f"{_where(hdr.path, hdr.data_offset + _RECORD_BYTES * (first + i))}: record "
            f"{first + i} (0x{int(words[i]):08X}) is a {what} {int(code[i])}, "
            f"which the {fmt.name} format does not define"
        )
    if fmt.counted_overflows:
        count = np.where(overflow, np.maximum(tag, 1), 0)
    else:
        count = overflow.astype(np.int64)
    periods = np.cumsum(count)  # at most 2**25 per record: no int64 overflow here
    # Times must stay inside int64 picoseconds; only overflow records can push
    # them out (a corrupt file), so find the first that does before multiplying.
    max_ticks = (np.iinfo(np.int64).max // hdr.resolution_ps) - (1 << 28)
    limit = (max_ticks - base_ticks) // fmt.overflow_period
    if periods.shape[0] and int(periods[-1]) > limit:
        i = int(np.argmax(periods > limit))
        raise PTUError(
            f"{_where(hdr.path, hdr.data_offset + _RECORD_BYTES * (first + i))}: record "
            f"{first + i}: the overflows so far put the time past the int64 picosecond "
            "range (corrupt overflow records?)"
        )
    ticks = (base_ticks + periods * fmt.overflow_period) + tag
    inputs = np.where(overflow | marker, -1, inputs).astype(np.int16)
    total = int(periods[-1]) if periods.shape[0] else 0
    return _Decoded(ticks, inputs, marker, overflow, total)


def _channel_lut(
    channel_map: Mapping[int, int], fmt: RecordFormat, path: Path
) -> npt.NDArray[np.int16]:
    lut = np.full(65, -1, dtype=np.int16)
    for inp, ch in channel_map.items():
        if not 0 <= inp <= fmt.max_input:
            sync = ", 0 = sync" if fmt.layout == "ht2" else ""
            raise PTUError(
                f"{path}: channel map input {inp} does not exist in {fmt.name} "
                f"(inputs 0..{fmt.max_input}{sync})"
            )
        if not 0 <= ch <= 255:
            raise PTUError(f"{path}: channel map sends input {inp} to {ch}, not a uint8 channel")
        lut[inp] = ch
    return lut


class PTUReader:
    """Streams the T2 events of one PTU file, in time order, in bounded memory.

    ``read()`` returns the next run of events (int64 ps, uint8 mapped channels),
    each no earlier than any returned before, or None once the file is done.
    The file is opened on the first read and closed by ``close()`` (or leaving
    the ``with`` block); a later read reopens it where it left off.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        channel_map: Mapping[int, int] | None = None,
        *,
        chunk_records: int = 1 << 18,
        reorder_window_ps: int = 0,
    ) -> None:
        if chunk_records < 1:
            raise ValueError(f"chunk_records must be >= 1, got {chunk_records}")
        if reorder_window_ps < 0:
            raise ValueError(f"reorder_window_ps must be >= 0, got {reorder_window_ps}")
        self.header = read_header(path)
        self.path = self.header.path
        cmap = DEFAULT_CHANNEL_MAP if channel_map is None else channel_map
        self._lut = _channel_lut(cmap, self.header.record_format, self.path)
        self.channels: tuple[int, ...] = tuple(sorted(set(cmap.values())))
        self._chunk = chunk_records
        self._window = reorder_window_ps
        self.counts = PTUCounts()
        self._next = 0  # next record to read
        self._base_ticks = 0  # overflow periods before it, in ticks
        self._max_ps: int | None = None  # latest mapped event so far
        self._held_t = np.empty(0, np.int64)  # events inside the reorder window
        self._held_c = np.empty(0, np.uint8)
        self._fh: BinaryIO | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    @property
    def done(self) -> bool:
        """Every record decoded and every event returned."""
        return self._next >= self.header.n_records and not self._held_t.shape[0]

    def __iter__(self) -> Iterator[tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]]:
        while (run := self.read()) is not None:
            yield run

    def _words(self, n: int) -> npt.NDArray[np.uint32]:
        hdr = self.header
        offset = hdr.data_offset + _RECORD_BYTES * self._next
        if self._fh is None:
            try:
                self._fh = hdr.path.open("rb")
            except OSError as exc:
                raise PTUError(f"{hdr.path}: cannot reopen: {exc}") from exc
        self._fh.seek(offset)
        buf = self._fh.read(_RECORD_BYTES * n)
        if len(buf) < _RECORD_BYTES * n:
            # The header check saw whole records; the file shrank since.
            got = len(buf) // _RECORD_BYTES
            raise PTUError(
                f"{_where(hdr.path, offset + len(buf))}: file ends inside record "
                f"{self._next + got} of {hdr.n_records} (it shrank while being read)"
            )
        return np.frombuffer(buf, dtype="<u4")

    def read(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]] | None:
        hdr = self.header
        if self.done:
            return None
        n = min(self._chunk, hdr.n_records - self._next)
        new_t = np.empty(0, np.int64)
        new_c = np.empty(0, np.uint8)
        if n:
            first = self._next
            d = _decode(self._words(n), hdr, self._base_ticks, first)
            event = d.inputs >= 0
            ch = np.where(event, self._lut[np.maximum(d.inputs, 0)], -1)
            mapped = ch >= 0
            c = self.counts
            c.records += n
            c.overflow_records += int(np.count_nonzero(d.overflow))
            c.overflow_periods += d.periods
            c.markers += int(np.count_nonzero(d.marker))
            c.per_input += np.bincount(d.inputs[event], minlength=65).astype(np.int64)
            c.unmapped += int(np.count_nonzero(event & ~mapped))
            new_t = d.ticks[mapped] * hdr.resolution_ps
            new_c = ch[mapped].astype(np.uint8)
            self._check_order(new_t, first + np.flatnonzero(mapped))
            self._next += n
            self._base_ticks += d.periods * hdr.record_format.overflow_period
        return self._release(new_t, new_c)

    def _check_order(self, t: npt.NDArray[np.int64], records: npt.NDArray[np.intp]) -> None:
        """Refuse an event earlier than one before it by more than the window.

        Each event is compared with the latest of all events before it, across
        chunks, so the outcome does not depend on where chunks end.
        """
        if not t.shape[0]:
            return
        # The first event of the file has nothing before it: compare it with itself.
        floor = int(t[0]) if self._max_ps is None else self._max_ps
        before = np.empty_like(t)
        before[0] = floor
        np.maximum.accumulate(t[:-1], out=before[1:])
        np.maximum(before, floor, out=before)
        late = t < before - self._window
        if late.any():
            i = int(np.argmax(late))
            rec = int(records[i])
            lag = int(before[i] - t[i])
            raise PTUError(
                f"{_where(self.path, self.header.data_offset + _RECORD_BYTES * rec)}: "
                f"record {rec} is {lag} ps earlier than an event before it, more than "
                f"reorder_window_ps = {self._window}; a window of at least {lag} sorts it"
            )
        self._max_ps = max(floor, int(t.max()))

    def _release(
        self, t: npt.NDArray[np.int64], c: npt.NDArray[np.uint8]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
        if self._held_t.shape[0]:
            t = np.concatenate([self._held_t, t])
            c = np.concatenate([self._held_c, c])
        if t.shape[0] > 1 and bool(np.any(t[1:] < t[:-1])):
            order = np.argsort(t, kind="stable")  # ties keep record order
            t, c = t[order], c[order]
        if self._next >= self.header.n_records or self._max_ps is None:
            cut = t.shape[0]
        else:
            # Every later event is at or after max - window (else _check_order
            # refuses it), so events up to there are final.
            cut = int(np.searchsorted(t, self._max_ps - self._window, side="right"))
        self._held_t, self._held_c = t[cut:], c[cut:]
        return t[:cut], c[:cut]


def read_events(
    path: str | os.PathLike[str],
    channel_map: Mapping[int, int] | None = None,
    **kwargs: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
    """All events of a file at once: for tests and small files (it holds them all)."""
    with PTUReader(path, channel_map, **kwargs) as reader:
        runs = list(reader)
    if not runs:
        return np.empty(0, np.int64), np.empty(0, np.uint8)
    return np.concatenate([r[0] for r in runs]), np.concatenate([r[1] for r in runs])


# -- encoder ---------------------------------------------------------------------------

Tag = tuple[str, int, TagType, TagValue]


def _tag_bytes(  # noqa: PLR0912 - one branch per tag type reads best flat
    ident: str, ttype: TagType, value: TagValue
) -> tuple[bytes, bytes]:
    """The 8-byte value field and the data after the tag, for one tag."""

    def wrong() -> TypeError:
        return TypeError(f"tag {ident!r} of type {ttype.name}: unsuitable value {value!r}")

    if ttype is TagType.EMPTY8:
        return bytes(8), b""
    if ttype is TagType.BOOL8:
        return (-1 if value else 0).to_bytes(8, "little", signed=True), b""
    if ttype in (TagType.INT8, TagType.BITSET64, TagType.COLOR8):
        if not isinstance(value, int):
            raise wrong()
        return value.to_bytes(8, "little", signed=True), b""
    if ttype is TagType.FLOAT8:
        if not isinstance(value, float | int):
            raise wrong()
        return struct.pack("<d", float(value)), b""
    if ttype is TagType.TDATETIME:
        if not isinstance(value, datetime):
            raise wrong()
        return struct.pack("<d", (value - _DELPHI_EPOCH) / timedelta(days=1)), b""
    if ttype is TagType.FLOAT8_ARRAY and isinstance(value, tuple):
        data = struct.pack(f"<{len(value)}d", *value)
    elif ttype is TagType.ANSI_STRING and isinstance(value, str):
        data = value.encode("utf-8") + b"\0"
    elif ttype is TagType.WIDE_STRING and isinstance(value, str):
        data = (value + "\0").encode("utf-16-le")
    elif ttype is TagType.BINARY_BLOB and isinstance(value, bytes):
        data = value
    else:
        raise wrong()
    if ttype in (TagType.ANSI_STRING, TagType.WIDE_STRING):
        data = data.ljust(-(-len(data) // 8) * 8, b"\0")
    return len(data).to_bytes(8, "little", signed=True), data


def encode_header(tags: Sequence[Tag], version: str = "1.0.00") -> bytes:
    """Magic, version and the given tags (``Header_End`` is appended).

    Strings are NUL-terminated and padded to a multiple of 8 bytes, as
    PicoQuant's software writes them.
    """
    out = [MAGIC, version.encode("ascii").ljust(8, b"\0")[:8]]
    for ident, idx, ttype, value in [*tags, (_HEADER_END, -1, TagType.EMPTY8, None)]:
        name = ident.encode("ascii")
        if len(name) > 31:
            raise ValueError(f"tag name {ident!r} is longer than 31 bytes")
        raw, data = _tag_bytes(ident, ttype, value)
        out.append(_TAG.pack(name, idx, int(ttype), raw) + data)
    return b"".join(out)


def encode_records(
    times_ps: npt.ArrayLike,
    inputs: npt.ArrayLike,
    fmt: RecordFormat,
    resolution_ps: int,
    *,
    markers: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
    old_style_overflows: bool = False,
) -> npt.NDArray[np.uint32]:
    """T2 records for events (input numbers as the reader's) and markers, with overflows.

    ``times_ps`` must be ascending multiples of ``resolution_ps``; ``markers``
    is (times_ps, marker bits 1..15).  Overflows go in just before the event
    that needs them: counted formats carry up to 2**25 - 1 periods a record
    (``old_style_overflows``: one record with count 0 per period, as old
    HydraHarp firmware wrote), the others one record per period.
    """
    t = np.asarray(times_ps, dtype=np.int64)
    inp = np.asarray(inputs, dtype=np.int64)
    if t.shape != inp.shape or t.ndim != 1:
        raise ValueError(f"times_ps {t.shape} and inputs {inp.shape} must be equal 1-d arrays")
    if t.shape[0] and (int(t[0]) < 0 or bool(np.any(np.diff(t) < 0))):
        raise ValueError("times_ps must be >= 0 and ascending")
    if bool(np.any((inp < 0) | (inp > fmt.max_input))):
        raise ValueError(f"inputs must be 0..{fmt.max_input} for {fmt.name}")
    if markers is not None:
        mt = np.asarray(markers[0], dtype=np.int64)
        mb = np.asarray(markers[1], dtype=np.int64)
        if mt.shape != mb.shape or bool(np.any((mb < 1) | (mb > 15))) or bool(np.any(mt < 0)):
            raise ValueError("markers: equal arrays of times >= 0 and marker bits 1..15")
        order = np.argsort(np.concatenate([t, mt]), kind="stable")
        t = np.concatenate([t, mt])[order]
        inp = np.concatenate([inp, -mb])[order]  # negative: marker bits
    if bool(np.any(t % resolution_ps)):
        raise ValueError(f"times_ps must be multiples of resolution_ps = {resolution_ps}")
    ticks = t // resolution_ps
    period = fmt.overflow_period
    k, rem = np.divmod(ticks, period)
    gap = np.diff(k, prepend=0)  # overflow periods needed before each event
    single = not fmt.counted_overflows or old_style_overflows
    n_ofl = gap if single else -(-gap // _MAX_COUNT)
    n_ev = t.shape[0]
    out = np.empty(n_ev + int(n_ofl.sum()), dtype=np.int64)
    ev_pos = np.arange(n_ev) + np.cumsum(n_ofl)
    is_ofl = np.ones(out.shape[0], dtype=bool)
    is_ofl[ev_pos] = False
    marker = inp < 0
    if fmt.layout == "ht2":
        ev = np.where(
            marker, (1 << 31) | (-inp << 25), np.where(inp == 0, 1 << 31, (inp - 1) << 25)
        )
        ofl_word = (1 << 31) | (63 << 25)
        if single:
            # V1 ignores the field; count 0 is the old firmware's "one period".
            counts = np.zeros(int(n_ofl.sum()), np.int64)
        else:
            # Per event: n_ofl records, all full but the last, which carries the rest.
            owner = np.repeat(np.arange(n_ev), n_ofl)
            start = np.cumsum(n_ofl) - n_ofl
            last = (np.arange(owner.shape[0]) - start[owner]) == n_ofl[owner] - 1
            counts = np.where(last, gap[owner] - _MAX_COUNT * (n_ofl[owner] - 1), _MAX_COUNT)
        out[is_ofl] = ofl_word | counts
        out[ev_pos] = ev | rem
    else:
        ev = np.where(marker, (15 << 28) | (rem & ~0xF) | -inp, (inp << 28) | rem)
        out[is_ofl] = 15 << 28
        out[ev_pos] = ev
    return out.astype("<u4")


def write_ptu(
    path: str | os.PathLike[str],
    times_ps: npt.ArrayLike,
    inputs: npt.ArrayLike,
    *,
    record_type: int = RT_HYDRAHARP2_T2,
    resolution_ps: int = 1,
    markers: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
    old_style_overflows: bool = False,
    extra_tags: Sequence[Tag] = (),
) -> int:
    """Write a T2 PTU file that PicoQuant's readers and :class:`PTUReader` read.

    For tests and fixtures; it holds the records in memory.  Returns the number
    of records written.
    """
    fmt = FORMATS.get(record_type)
    if fmt is None:
        raise ValueError(f"record type 0x{record_type:08X} is not a supported T2 type")
    if resolution_ps < 1:
        raise ValueError(f"resolution_ps must be >= 1, got {resolution_ps}")
    records = encode_records(
        times_ps,
        inputs,
        fmt,
        resolution_ps,
        markers=markers,
        old_style_overflows=old_style_overflows,
    )
    res_s = resolution_ps * 1e-12
    tags: list[Tag] = [
        ("CreatorSW_Name", -1, TagType.ANSI_STRING, "qnoded"),
        ("File_CreatingTime", -1, TagType.TDATETIME, datetime.now(UTC)),
        ("Measurement_Mode", -1, TagType.INT8, 2),
        ("Measurement_SubMode", -1, TagType.INT8, 0),
        ("TTResultFormat_TTTRRecType", -1, TagType.INT8, record_type),
        ("TTResultFormat_BitsPerRecord", -1, TagType.INT8, 32),
        ("MeasDesc_Resolution", -1, TagType.FLOAT8, res_s),
        ("MeasDesc_GlobalResolution", -1, TagType.FLOAT8, res_s),
        *extra_tags,
        ("TTResult_NumberOfRecords", -1, TagType.INT8, int(records.shape[0])),
    ]
    with Path(path).open("wb") as fh:
        fh.write(encode_header(tags))
        fh.write(records.tobytes())
    return int(records.shape[0])
