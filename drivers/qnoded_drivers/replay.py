"""Replay of recorded time tags, as a TimeTagger: ``.npz`` recordings and PicoQuant ``.ptu`` files.

Option ``file`` names the recording; its suffix picks the format.

* ``.npz`` holds ``timestamps_ps`` (int64, ascending), ``channels`` (uint8) and
  ``batch_duration_ps`` (one int64), and is loaded whole.
* ``.ptu`` is a PicoQuant T2 file (HydraHarp, MultiHarp, TimeHarp 260, PicoHarp:
  see :mod:`qnoded_drivers.ptu`), streamed from disk a chunk of records at a
  time, so a multi-GB recording replays in bounded memory.  Options:
  ``channel_map`` (PicoQuant input number -> qnoded channel 0..63, 0..3 being
  the key channels; input 0 is the sync input; default ``{1: 0, 2: 1, 3: 2, 4: 3}``;
  in TOML ``channel_map = { "1" = 0, "2" = 1 }``); ``batch_duration_ps``
  (default 10 ms); ``reorder_window_ps`` (default 0: a file whose events go
  back in time is refused, naming the record; a window sorts out that much
  disorder); ``chunk_records`` (records per read, default 262144 = 1 MiB).
  Markers and events on unmapped inputs are dropped; ``describe()`` counts them.

Batches are cut on the recording's own clock, the first starting at the
multiple of the batch duration at or before the first tag.  After the
recording, time goes on without light: empty batches follow in real time, as a
tagger in the dark would send.  Used for benchmarks and to run recorded data
through the whole pipeline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import numpy.typing as npt

from qnoded.contracts import DeviceError, DeviceKind, DriverContext, TagBatch
from qnoded_drivers.lifecycle import InProcessDevice
from qnoded_drivers.ptu import DEFAULT_CHANNEL_MAP, PTUError, PTUReader

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]

_NPZ_KEYS = frozenset({"file", "realtime"})
_PTU_ONLY = frozenset({"channel_map", "batch_duration_ps", "reorder_window_ps", "chunk_records"})
_PTU_DEFAULT_BATCH_PS = 10_000_000_000


class _Source(Protocol):
    """One recording format: what the batch loop asks of it."""

    batch_duration_ps: int

    def open(self) -> tuple[int, ...]:
        """Load or check the recording; returns its channels."""
        ...

    def close(self) -> None: ...

    def first_ps(self) -> int | None:
        """The first tag's time (before delays), None for a recording with no tag."""
        ...

    def over(self, start_ps: int) -> bool:
        """True when no tag of the recording lies at or after ``start_ps``."""
        ...

    def set_delays(self, delays: Mapping[int, int]) -> None: ...

    def cut(self, start_ps: int, stop_ps: int) -> tuple[I64, U8]:
        """The tags of ``[start_ps, stop_ps)``, delays applied, ascending; called in order."""
        ...

    def describe(self) -> dict[str, Any]: ...


class _NpzSource:
    """A whole ``.npz`` recording in memory; delays re-sort it."""

    def __init__(self, name: str, path: Path) -> None:
        self._name, self._path = name, path
        self._raw_t = self._t = np.empty(0, np.int64)
        self._raw_c = self._c = np.empty(0, np.uint8)
        self.batch_duration_ps = 0

    def open(self) -> tuple[int, ...]:
        try:
            with np.load(self._path) as data:
                self._raw_t = np.ascontiguousarray(data["timestamps_ps"], dtype=np.int64)
                self._raw_c = np.ascontiguousarray(data["channels"], dtype=np.uint8)
                self.batch_duration_ps = int(np.asarray(data["batch_duration_ps"]).reshape(-1)[0])
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"{self._name}: cannot read recording {self._path}: {exc}") from exc
        self._t, self._c = self._raw_t, self._raw_c
        unsorted = np.flatnonzero(np.diff(self._raw_t) < 0)
        if unsorted.shape[0]:
            raise ValueError(
                f"{self._name}: {self._path}: timestamps_ps not ascending at index "
                f"{int(unsorted[0]) + 1}"
            )
        if self._t.shape != self._c.shape or self.batch_duration_ps <= 0:
            raise ValueError(f"{self._name}: {self._path} has mismatched arrays or no batch length")
        return tuple(int(ch) for ch in np.unique(self._c))

    def close(self) -> None:
        return None

    def first_ps(self) -> int | None:
        return int(self._raw_t[0]) if self._raw_t.shape[0] else None

    def over(self, start_ps: int) -> bool:
        return start_ps > int(self._raw_t[-1])

    def set_delays(self, delays: Mapping[int, int]) -> None:
        # Batches not yet sent are cut from the shifted, re-sorted timeline.
        shift = np.zeros(256, dtype=np.int64)
        for ch, d in delays.items():
            shift[ch] = d
        t = self._raw_t + shift[self._raw_c]
        order = np.argsort(t, kind="stable")
        self._t, self._c = t[order], self._raw_c[order]

    def cut(self, start_ps: int, stop_ps: int) -> tuple[I64, U8]:
        lo, hi = np.searchsorted(self._t, [start_ps, stop_ps])
        return self._t[lo:hi], self._c[lo:hi]

    def describe(self) -> dict[str, Any]:
        return {"format": "npz", "tags": int(self._t.shape[0])}


class _PtuSource:
    """A PicoQuant T2 file read a chunk at a time; delays are applied as batches are cut.

    ``_t``/``_c`` hold decoded tags not yet sent, in recording order (before
    delays).  To cut ``[start, stop)`` the reader is read on until the held
    tags reach ``stop - min(delay)``: every tag that a delay can bring before
    ``stop`` is then in hand, and only those before that point are candidates.
    Candidates a positive delay keeps out of this batch wait in ``_late_t``
    (few: those within the delays' spread of ``stop``), so a batch costs its
    own tags, not the whole chunk held.  A tag whose delay puts it before
    ``start`` (a delay lowered mid-stream) belongs to a batch already sent: it
    is dropped and counted, as the npz replay does.
    """

    def __init__(
        self,
        name: str,
        path: Path,
        *,
        channel_map: Mapping[int, int],
        batch_duration_ps: int,
        reorder_window_ps: int,
        chunk_records: int,
    ) -> None:
        self._name, self._path = name, path
        self._map = dict(channel_map)
        self._window = reorder_window_ps
        self._chunk = chunk_records
        self.batch_duration_ps = batch_duration_ps
        self._reader: PTUReader | None = None
        self._t = np.empty(0, np.int64)
        self._c = np.empty(0, np.uint8)
        self._late_t = np.empty(0, np.int64)  # candidates kept back by a delay (unshifted)
        self._late_c = np.empty(0, np.uint8)
        self._shift = np.zeros(256, dtype=np.int64)
        self._min_shift = 0
        self._shifted = False
        self._late_dropped = 0

    def open(self) -> tuple[int, ...]:
        if self._reader is None:  # a reopened device resumes where it was
            try:
                self._reader = PTUReader(
                    self._path,
                    self._map,
                    chunk_records=self._chunk,
                    reorder_window_ps=self._window,
                )
            except PTUError as exc:
                raise ValueError(f"{self._name}: {exc}") from exc
        return self._reader.channels

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()  # the file; the position is kept

    def _reader_or_fail(self) -> PTUReader:
        if self._reader is None:
            raise RuntimeError(f"{self._name}: the device is not open")
        return self._reader

    def _fill(self, until_ps: int | None) -> None:
        """Read on until the held tags reach ``until_ps`` (None: any tag) or the file ends."""
        reader = self._reader_or_fail()
        while not reader.done and (
            not self._t.shape[0] or (until_ps is not None and int(self._t[-1]) < until_ps)
        ):
            try:
                run = reader.read()
            except PTUError as exc:
                # Mid-stream (a bad record deep in the file): the contract's failure.
                raise DeviceError(f"{self._name}: {exc}") from exc
            if run is None:
                break
            if run[0].shape[0]:
                self._t = np.concatenate([self._t, run[0]])
                self._c = np.concatenate([self._c, run[1]])

    def first_ps(self) -> int | None:
        self._fill(None)
        return int(self._t[0]) if self._t.shape[0] else None

    def over(self, start_ps: int) -> bool:
        held = self._t.shape[0] + self._late_t.shape[0]
        return self._reader_or_fail().done and not held

    def set_delays(self, delays: Mapping[int, int]) -> None:
        self._shift[:] = 0
        for ch, d in delays.items():
            self._shift[ch] = d
        self._min_shift = min(0, *delays.values()) if delays else 0
        self._shifted = any(delays.values())

    def cut(self, start_ps: int, stop_ps: int) -> tuple[I64, U8]:
        horizon = stop_ps - self._min_shift
        self._fill(horizon)
        n = int(np.searchsorted(self._t, horizon))
        t, c = self._t[:n], self._c[:n]
        self._t, self._c = self._t[n:], self._c[n:]
        if self._shifted or self._late_t.shape[0]:
            # Kept-back candidates are earlier in the recording: recording order holds.
            raw = np.concatenate([self._late_t, t])
            c = np.concatenate([self._late_c, c])
            shifted = raw + self._shift[c]
            now = shifted < stop_ps
            self._late_t, self._late_c = raw[~now], c[~now]
            t, c = shifted[now], c[now]
            if t.shape[0] > 1 and bool(np.any(t[1:] < t[:-1])):
                order = np.argsort(t, kind="stable")  # ties keep recording order
                t, c = t[order], c[order]
        late = int(np.searchsorted(t, start_ps))
        self._late_dropped += late
        return t[late:], c[late:]

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": "ptu", "channel_map": dict(self._map)}
        if self._reader is not None:
            hdr, counts = self._reader.header, self._reader.counts
            out |= {
                "record_type": f"0x{hdr.record_format.code:08X} ({hdr.record_format.name})",
                "resolution_ps": hdr.resolution_ps,
                "records": hdr.n_records,
                "records_read": counts.records,
                "markers_dropped": counts.markers,
                "unmapped_dropped": counts.unmapped,
                "late_dropped": self._late_dropped,
            }
        return out


def _int_option(options: Mapping[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = options.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"option {key!r} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _channel_map(raw: Any) -> dict[int, int]:
    """``channel_map`` from the config: TOML table keys are strings, so "1" is input 1."""
    if raw is None:
        return dict(DEFAULT_CHANNEL_MAP)
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"option 'channel_map' must be a non-empty table, got {raw!r}")
    out: dict[int, int] = {}
    for key, value in raw.items():
        try:
            inp = int(key)
        except (TypeError, ValueError):
            inp = -1
        if isinstance(key, bool) or inp < 0:
            raise ValueError(f"option 'channel_map': key {key!r} is not an input number >= 0")
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 64:
            raise ValueError(
                f"option 'channel_map': input {inp} maps to {value!r}, not a channel 0..63"
            )
        out[inp] = value
    return out


class ReplayTagger(InProcessDevice):
    """Streams a recording batch by batch, as fast as it is taken or paced."""

    kind: ClassVar[DeviceKind] = DeviceKind.TIME_TAGGER

    def __init__(self, name: str, options: Mapping[str, Any], context: DriverContext) -> None:
        valid = _NPZ_KEYS | _PTU_ONLY
        unknown = set(options) - valid
        if unknown:
            raise ValueError(
                f"unknown option(s) {sorted(unknown)}; valid: {', '.join(sorted(valid))}"
            )
        if not isinstance(options.get("file"), str):
            raise ValueError("option 'file' (a .npz recording or a .ptu file) is required")
        self.name = name
        self._path = Path(options["file"])
        self._realtime = bool(options.get("realtime", False))
        self._source: _Source
        if self._path.suffix.lower() == ".ptu":
            self._source = _PtuSource(
                name,
                self._path,
                channel_map=_channel_map(options.get("channel_map")),
                batch_duration_ps=_int_option(
                    options, "batch_duration_ps", _PTU_DEFAULT_BATCH_PS, 10**6, 10**13
                ),
                reorder_window_ps=_int_option(options, "reorder_window_ps", 0, 0, 10**12),
                chunk_records=_int_option(options, "chunk_records", 1 << 18, 1, 1 << 24),
            )
        else:
            ptu_only = sorted(set(options) & _PTU_ONLY)
            if ptu_only:
                raise ValueError(
                    f"option(s) {ptu_only} apply to .ptu files only; {self._path} is read "
                    "as an .npz recording, which carries its own batch_duration_ps"
                )
            self._source = _NpzSource(name, self._path)
        self._delays: dict[int, int] = {}
        self._first: int | None = None  # start of batch 0, fixed on the first stream
        self._pos = 0  # next batch index: a reopened stream resumes

    @property
    def _dur(self) -> int:
        return self._source.batch_duration_ps

    async def _on_open(self) -> None:
        channels = self._source.open()
        # Delays set before a close stay set (the npz copy reloads unshifted).
        self._delays = {ch: self._delays.get(ch, 0) for ch in channels}
        if any(self._delays.values()):
            self._source.set_delays(self._delays)

    async def _on_close(self) -> None:
        self._source.close()

    def describe(self) -> Mapping[str, Any]:
        # finished: every tag of the recording has been sent; dark batches from here.
        finished = self._first is not None and self._source.over(
            self._first + self._pos * self._dur
        )
        return {
            "driver": "replay-tagger",
            "file": str(self._path),
            "batch_duration_ps": self._dur,
            "finished": finished,
            **self._source.describe(),
        }

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(sorted(self._delays))

    async def set_delay(self, channel: int, delay_ps: int) -> None:
        """Shift one channel's tags; batches not yet sent are cut from the shifted timeline."""
        if channel not in self._delays:
            raise ValueError(f"{self.name}: no channel {channel} in the recording")
        self._delays[channel] = int(delay_ps)
        self._source.set_delays(self._delays)

    def delay(self, channel: int) -> int:
        return self._delays[channel]

    async def stream(self) -> AsyncIterator[TagBatch]:
        dur = self._dur
        if self._first is None:
            first_tag = self._source.first_ps()
            if first_tag is None:
                await asyncio.Event().wait()  # a recording without a tag: nothing, ever
                return
            self._first = first_tag // dur * dur
        first = self._first
        wall0 = time.monotonic() - self._pos * dur * 1e-12
        while True:
            k = self._pos
            start, stop = first + k * dur, first + (k + 1) * dur
            if self._source.over(start):
                # After the recording time goes on in the dark: empty batches,
                # paced to the clock, as a tagger with no light sends.
                await asyncio.sleep(dur * 1e-12)
            elif self._realtime:
                await asyncio.sleep(max(0.0, wall0 + (k + 1) * dur * 1e-12 - time.monotonic()))
            else:
                await asyncio.sleep(0)
            t, c = self._source.cut(start, stop)
            self._pos += 1
            yield TagBatch(seq=k, start_ps=start, stop_ps=stop, timestamps_ps=t, channels=c)
