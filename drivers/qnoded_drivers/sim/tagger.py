"""Simulated time tagger: the node's detectors' clicks, timestamped on the node's clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any, ClassVar, Self

import numpy as np

from qnoded.contracts import DeviceKind, DriverContext, TagBatch
from qnoded_drivers.sim.common import detector_table, shared_link
from qnoded_drivers.sim.link import Clicks


class SimTimeTagger:
    """Streams :class:`TagBatch` es of ``batch_duration_ps`` of the node's own clock.

    Alice's clock is the reference; Bob's runs with the configured offset and
    drift.  Clicks are generated per chunk of true time with a look-ahead, so a
    click jittered across a batch boundary lands in the right batch and none is
    lost or repeated.
    """

    kind: ClassVar[DeviceKind] = DeviceKind.TIME_TAGGER

    def __init__(self, name: str, options: Mapping[str, Any], context: DriverContext) -> None:
        unknown = set(options) - {"channels"}
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)}; valid: channels")
        self.name = name
        self._ctx = context
        self._link = shared_link(context)
        chans = options.get("channels", [0, 1, 2, 3])
        if not isinstance(chans, list) or not all(isinstance(c, int) for c in chans):
            raise ValueError(f"option 'channels' must be a list of integers, got {chans!r}")
        self._channels = tuple(chans)
        self._delays = dict.fromkeys(self._channels, 0)
        bob = context.role == "bob"
        p = self._link.p
        self._offset = p.bob_clock_offset_ps if bob else 0
        self._drift = p.drift if bob else 0.0
        role_id = 2 if bob else 1
        self._seed = (p.link_seed, role_id)
        self._open = False

    async def __aenter__(self) -> Self:
        self._open = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False

    async def ping(self) -> bool:
        return self._open

    def describe(self) -> Mapping[str, Any]:
        p = self._link.p
        return {
            "driver": "sim-tagger",
            "channels": list(self._channels),
            "batch_duration_ps": p.batch_duration_ps,
            "realtime": p.realtime,
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

    def _to_clock(self, t_true: np.ndarray) -> np.ndarray:
        return np.rint(self._offset + (1.0 + self._drift) * t_true.astype(np.float64)).astype(
            np.int64
        )

    def _to_true(self, t_clock: int) -> int:
        return int((t_clock - self._offset) / (1.0 + self._drift))

    async def stream(self) -> AsyncIterator[TagBatch]:
        p = self._link.p
        dur = p.batch_duration_ps
        dets = detector_table(self._ctx)
        # Largest possible time shift of a click after generation: jitter (6
        # sigma), delays and the detector dead time, so look that far ahead.
        margin = (
            1_000_000
            + max((int(6 * d.physics().jitter_ps) for d in dets.values()), default=0)
            + max(map(abs, self._delays.values()), default=0)
        )
        # The first batch starts at the node clock's reading of true time 0.
        start = (
            int(np.ceil(self._offset / dur)) * dur
            if self._offset > 0
            else (-(-self._offset // dur) * dur)
        )
        gen_until = self._to_true(start) - margin
        self._link.last_click.clear()
        pend_t = np.empty(0, np.int64)
        pend_c = np.empty(0, np.uint8)
        seq = 0
        chunk = 0
        wall0 = time.monotonic()
        while True:
            stop = start + dur
            need = self._to_true(stop) + margin
            while gen_until < need:
                hi = gen_until + dur
                rng = np.random.default_rng([*self._seed, chunk])
                chunk += 1
                clicks = self._link.clicks(
                    gen_until, hi, {c: d.physics() for c, d in dets.items()} if dets else {}, rng
                )
                t_new, c_new = self._timestamp(clicks, dets, rng)
                pend_t = np.concatenate([pend_t, t_new])
                pend_c = np.concatenate([pend_c, c_new])
                gen_until = hi
            order = np.argsort(pend_t, kind="stable")
            pend_t, pend_c = pend_t[order], pend_c[order]
            lo = int(np.searchsorted(pend_t, start))
            cut = int(np.searchsorted(pend_t, stop))
            t_b, c_b = pend_t[lo:cut], pend_c[lo:cut]
            pend_t, pend_c = pend_t[cut:], pend_c[cut:]
            for ch, det in dets.items():
                det.count_rate_hz = float(np.count_nonzero(c_b == ch)) / (dur * 1e-12)
            if p.realtime:
                await asyncio.sleep(max(0.0, wall0 + (seq + 1) * dur * 1e-12 - time.monotonic()))
            else:
                await asyncio.sleep(0)
            yield TagBatch(
                seq=seq, start_ps=start, stop_ps=stop, timestamps_ps=t_b.copy(), channels=c_b.copy()
            )
            seq += 1
            start = stop

    def _timestamp(
        self, clicks: Clicks, dets: Mapping[int, Any], rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        t = clicks.t.astype(np.float64)
        for ch, det in dets.items():
            m = clicks.ch == ch
            t[m] += rng.normal(0.0, det.physics().jitter_ps, int(m.sum())) + self._delays.get(ch, 0)
        keep = np.isin(clicks.ch, self._channels)
        return self._to_clock(t[keep]), clicks.ch[keep]
