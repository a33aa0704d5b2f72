"""Simulated time tagger: the node's detectors' clicks, timestamped on the node's clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from qnoded.contracts import DeviceError, DeviceKind, DriverContext, TagBatch
from qnoded_drivers.lifecycle import InProcessDevice
from qnoded_drivers.sim.common import detector_table, shared_link
from qnoded_drivers.sim.link import JITTER_CLIP, Clicks

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]

# Look-ahead beyond the largest shift a click can get after generation
# (jitter, channel delay): a safety margin for the clock map's rounding.
_MARGIN_PS = 1_000_000


@dataclass(slots=True)
class _Cursor:
    """Where the stream is: next batch, generated true time, carry buffer."""

    start: int
    gen_until: int
    seq: int = 0
    chunk: int = 0
    pend_t: I64 = field(default_factory=lambda: np.empty(0, np.int64))
    pend_c: U8 = field(default_factory=lambda: np.empty(0, np.uint8))


class SimTimeTagger(InProcessDevice):
    """Streams :class:`TagBatch` es of ``batch_duration_ps`` of the node's own clock.

    Alice's clock is the reference; Bob's reads
    ``bob_clock_offset_ps + (1 + drift) * t_true``.  The first batch starts at
    the first multiple of ``batch_duration_ps`` at or after the clock's reading
    of true time 0 (when the source starts).  Clicks are generated per chunk
    of true time with a look-ahead and kept in a carry buffer, so a click
    jittered across a batch boundary lands in the right batch and none is lost
    or repeated.  Detectors register in ``context.shared`` and are read at
    every chunk; a latched detector's channel is also cut from every batch
    from the moment it latches.

    Options: ``channels`` (list of int, default ``[0, 1, 2, 3]``).
    """

    kind: ClassVar[DeviceKind] = DeviceKind.TIME_TAGGER

    def __init__(self, name: str, options: Mapping[str, Any], context: DriverContext) -> None:
        unknown = set(options) - {"channels"}
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)}; valid: channels")
        if context.protocol == "bb84" and context.role != "bob":
            raise ValueError(
                "sim-tagger: under BB84 only Bob's node has a tagger (Alice has the laser)"
            )
        self.name = name
        self._ctx = context
        self._link = shared_link(context)
        chans = options.get("channels", [0, 1, 2, 3])
        if (
            not isinstance(chans, list | tuple)
            or not chans
            or not all(isinstance(c, int) and not isinstance(c, bool) for c in chans)
            or not all(0 <= c < 64 for c in chans)
            or len(set(chans)) != len(chans)
        ):
            raise ValueError(
                f"option 'channels' must be a list of distinct integers 0..63, got {chans!r}"
            )
        self._channels = tuple(int(c) for c in chans)
        self._delays = dict.fromkeys(self._channels, 0)
        bob = context.role == "bob"
        p = self._link.p
        self._offset = p.bob_clock_offset_ps if bob else 0
        self._drift = p.drift if bob else 0.0
        self._seed = (p.link_seed, 2 if bob else 1)
        self._cursor: _Cursor | None = None

    def describe(self) -> Mapping[str, Any]:
        p = self._link.p
        return {
            "driver": "sim-tagger",
            "channels": list(self._channels),
            "batch_duration_ps": p.batch_duration_ps,
            "realtime": p.realtime,
            "delays_ps": dict(self._delays),
        }

    @property
    def channels(self) -> tuple[int, ...]:
        return self._channels

    async def set_delay(self, channel: int, delay_ps: int) -> None:
        if channel not in self._delays:
            raise ValueError(f"{self.name}: no channel {channel} (have {self._channels})")
        self._delays[channel] = int(delay_ps)

    def delay(self, channel: int) -> int:
        return self._delays[channel]

    # -- clock ---------------------------------------------------------------------
    def to_clock(self, t_true: I64) -> I64:
        """This node's clock reading of true times (integer arithmetic for the
        large part, so picoseconds stay exact over long runs)."""
        t: I64 = np.asarray(t_true, dtype=np.int64) + np.int64(self._offset)
        if self._drift != 0.0:
            t += np.rint(self._drift * (t - np.int64(self._offset))).astype(np.int64)
        return t

    def to_true(self, t_clock: int) -> int:
        """The true time at which this node's clock reads ``t_clock`` (to ~1 ps)."""
        return round((t_clock - self._offset) / (1.0 + self._drift))

    # -- streaming -----------------------------------------------------------------
    def _margin(self, dets: Mapping[int, Any]) -> int:
        jitter = max((float(d.physics().jitter_ps) for d in dets.values()), default=0.0)
        delay = max(map(abs, self._delays.values()), default=0)
        return _MARGIN_PS + int(JITTER_CLIP * jitter) + delay

    def _new_cursor(self) -> _Cursor:
        dur = self._link.p.batch_duration_ps
        start = -(-int(self.to_clock(np.array([0], np.int64))[0]) // dur) * dur
        self._link.reset()
        # Generation starts one chunk plus a margin before the first batch, on
        # a grid that does not depend on the delays, so the noise draws (one
        # generator per chunk) are the same whatever the delays are.
        return _Cursor(start=start, gen_until=self.to_true(start) - dur - _MARGIN_PS)

    async def stream(self) -> AsyncIterator[TagBatch]:
        """Batches from where the last stream stopped (a reopened stream
        continues ``seq`` and time), or from the start."""
        if not self._open:
            raise DeviceError(f"{self.name}: stream() on a tagger that is not open")
        if self._cursor is None:
            self._cursor = self._new_cursor()
        cur = self._cursor
        p = self._link.p
        dur = p.batch_duration_ps
        dets = detector_table(self._ctx)
        wall0, seq0 = time.monotonic(), cur.seq
        while self._open:
            start, stop = cur.start, cur.start + dur
            need = self.to_true(stop) + self._margin(dets)
            new_t, new_c = [cur.pend_t], [cur.pend_c]
            while cur.gen_until < need:
                hi = cur.gen_until + dur
                rng = np.random.default_rng([*self._seed, cur.chunk])
                cur.chunk += 1
                physics = {c: d.physics() for c, d in dets.items()}
                try:
                    clicks = self._link.clicks(cur.gen_until, hi, physics, rng)
                except ValueError as exc:
                    raise DeviceError(f"{self.name}: simulation failed: {exc}") from exc
                t_new, c_new = self._timestamp(clicks)
                new_t.append(t_new)
                new_c.append(c_new)
                cur.gen_until = hi
            pend_t, pend_c = np.concatenate(new_t), np.concatenate(new_c)
            order = np.argsort(pend_t, kind="stable")
            pend_t, pend_c = pend_t[order], pend_c[order]
            lo = int(np.searchsorted(pend_t, start))  # earlier ones: a delay moved back
            cut = int(np.searchsorted(pend_t, stop))
            t_b, c_b = pend_t[lo:cut], pend_c[lo:cut]
            cur.pend_t, cur.pend_c = pend_t[cut:], pend_c[cut:]
            blind = [c for c, d in dets.items() if d.physics().latched]
            if blind:
                live = ~np.isin(c_b, blind)
                t_b, c_b = t_b[live], c_b[live]
            for ch, det in dets.items():
                det.count_rate_hz = float(np.count_nonzero(c_b == ch)) / (dur * 1e-12)
            batch = TagBatch(
                seq=cur.seq,
                start_ps=start,
                stop_ps=stop,
                timestamps_ps=np.ascontiguousarray(t_b, dtype=np.int64),
                channels=np.ascontiguousarray(c_b, dtype=np.uint8),
            )
            cur.seq += 1
            cur.start = stop
            if p.realtime:
                due = wall0 + (cur.seq - seq0) * dur * 1e-12
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            else:
                await asyncio.sleep(0)
            yield batch

    def _timestamp(self, clicks: Clicks) -> tuple[I64, U8]:
        """Channel delays and the node's clock; channels the tagger lacks are dropped."""
        keep = np.isin(clicks.ch, self._channels)
        t, ch = clicks.t[keep], clicks.ch[keep]
        delay = np.zeros(256, dtype=np.int64)
        for c, d in self._delays.items():
            delay[c] = d
        return self.to_clock(t + delay[ch]), ch
