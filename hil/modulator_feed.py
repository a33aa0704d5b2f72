"""What Alice's modulator emulator played, for the emulated fibre to Bob's detectors.

``hil/tcp_tagger.py --source HOST:PORT`` makes Bob's clicks from the pulses
``hil/visa_modulator.py`` plays, not from the simulation's seeds: a VISA-driven
Alice then makes key with Bob on emulators only, and what her driver uploaded,
switched and timed is what his detectors see.  This module polls the modulator
emulator over its emulator-only queries (``EMU:STAT?``, ``EMU:PATT?``; a real
instrument has none, and they never fire its faults) and answers, for any slot,
what was emitted there (:meth:`ModulatorFeed.emitted`, the
:class:`~qnoded_drivers.sim.link.EmissionSource` of the simulated link).

Time.  Both emulators run on one host and share CLOCK_MONOTONIC.  Slot ``k`` of
the modulator's slot counter leaves Alice at true time ``k * period_ps`` (true
time 0 is its slot 0), as in the simulated link, so Bob's tagger reads
``bob_clock_offset_ps + (1 + drift) * k * period_ps`` for it and the node's lock
finds the instrument's own slot numbers, as the driver's timeline needs.

When the modulator's slot clock is re-anchored (a new pulse rate, or a power
cycle: a new process) ``clock_epoch`` moves; the tagger emulator then restarts
its time base on the new clock, as a bench tagger armed by the modulator's
start marker does, and drops its clients.

What is not known is dark (no light): slots after the last answer (the tagger
emulator generates clicks a little behind real time, see ``LAG_S`` there) and
slots whose pattern could not be fetched.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from visa_modulator import LEVELS  # the emulator's level names, in IntensityClass order

from qnoded.backoff import backoff_s
from qnoded.contracts import IntensityClass

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]
F64 = npt.NDArray[np.float64]

POLL_S = 0.01  # how often the timeline is asked for
RETRY_CAP_S = 1.0  # the longest wait before reconnecting to the modulator emulator
TIMEOUT_S = 2.0  # one round trip
MAX_PATTERNS = 8  # pattern contents kept, by CRC-32 (the driver uploads two per power-on)
HISTORY_S = 10.0  # how far back the changes are kept (the tagger lags by much less)


@dataclass(frozen=True, slots=True)
class _Pattern:
    basis: U8
    bit: U8
    intensity: U8

    @classmethod
    def decode(cls, data: bytes) -> _Pattern:
        codes = np.frombuffer(data, dtype=np.uint8)
        one, two = np.uint8(1), np.uint8(2)
        return cls((codes >> one) & one, codes & one, codes >> two)


class FeedError(Exception):
    """The modulator emulator's answer is not what its emulator-only queries give."""


class ModulatorFeed:
    """The modulator emulator's slot clock, levels and played timeline, kept fresh by
    :meth:`run` (a poll every ``POLL_S``, reconnecting with backoff)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.clock: tuple[int, int, float] | None = None  # anchor ns, anchor slot, rate
        self.clock_epoch = 0  # re-anchors of the slot clock seen
        self.known_until = -1  # slots after this are not known yet
        self.levels = np.zeros(len(IntensityClass))
        self._starts = np.empty(0, dtype=np.int64)
        self._changes: list[tuple[int, str, bool, int]] = []
        self._patterns: dict[int, _Pattern] = {}
        self.polls = 0

    # -- what played --------------------------------------------------------------------
    @property
    def freq_hz(self) -> float:
        if self.clock is None:
            raise FeedError("no answer from the modulator emulator yet")
        return self.clock[2]

    @property
    def period_ps(self) -> int:
        return round(1e12 / self.freq_hz)

    @property
    def mu_max(self) -> float:
        return float(self.levels.max())

    def now_slot(self) -> int:
        """The modulator's slot counter now (from its clock, without asking)."""
        if self.clock is None:
            raise FeedError("no answer from the modulator emulator yet")
        anchor_ns, anchor_slot, freq = self.clock
        return anchor_slot + int((time.monotonic_ns() - anchor_ns) * freq / 1e9)

    def emitted(self, slots: I64) -> tuple[U8, U8, U8, F64]:
        """Basis, bit, class and mean photon number of each slot; dark where the
        output was off or what played is not known."""
        n = slots.shape[0]
        basis, bit = np.zeros(n, np.uint8), np.zeros(n, np.uint8)
        cls = np.full(n, IntensityClass.VACUUM, np.uint8)
        mu = np.zeros(n, np.float64)
        if not n or not self._changes:
            return basis, bit, cls, mu
        at = np.searchsorted(self._starts, slots, side="right") - 1
        at[(slots > self.known_until) | (at < 0)] = -1
        for j in np.unique(at[at >= 0]):
            _, _, output, crc = self._changes[int(j)]
            pattern = self._patterns.get(crc)
            if not output or pattern is None:
                continue
            sel = at == j
            idx = slots[sel] % pattern.intensity.shape[0]
            basis[sel], bit[sel] = pattern.basis[idx], pattern.bit[idx]
            cls[sel] = pattern.intensity[idx]
            mu[sel] = self.levels[cls[sel]]
        return basis, bit, cls, mu

    # -- polling ------------------------------------------------------------------------
    async def run(self) -> None:
        """Poll until cancelled; a lost connection is retried with backoff."""
        attempt = 0
        while True:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), TIMEOUT_S
                )
            except (OSError, TimeoutError):
                attempt += 1
                await asyncio.sleep(backoff_s(attempt, base_s=POLL_S, cap_s=RETRY_CAP_S))
                continue
            try:
                while True:
                    await self.poll_once(reader, writer)
                    attempt = 0
                    await asyncio.sleep(POLL_S)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, FeedError) as exc:
                sys.stderr.write(f"modulator feed: {exc!r}; reconnecting\n")
                attempt += 1
                await asyncio.sleep(backoff_s(attempt, base_s=POLL_S, cap_s=RETRY_CAP_S))
            finally:
                writer.close()

    async def connect_once(self) -> None:
        """One poll on a connection of its own: the clock and levels are known after."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), TIMEOUT_S
        )
        try:
            await self.poll_once(reader, writer)
        finally:
            writer.close()

    async def poll_once(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        since = 0
        if self.clock is not None:
            since = max(0, self.known_until - int(HISTORY_S * self.clock[2]))
        writer.write(f"EMU:STAT? {since}\n".encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), TIMEOUT_S)
        try:
            doc: Any = json.loads(line)
            clock = (int(doc["clock"][0]), int(doc["clock"][1]), float(doc["clock"][2]))
            now = int(doc["now"])
            levels = [float(doc["levels"][name]) for name in LEVELS]
            changes = [(int(a), str(b), bool(c), int(d)) for a, b, c, d in doc["changes"]]
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise FeedError(f"EMU:STAT? answered {line[:80]!r}: {exc}") from None
        if self.clock is not None and clock != self.clock:
            self.clock_epoch += 1
            sys.stderr.write(f"modulator feed: the modulator's slot clock is now {clock}\n")
        for _, mode, _, crc in changes:
            if crc not in self._patterns and crc != 0:
                await self._fetch(reader, writer, mode, crc)
        self.clock, self.levels = clock, np.array(levels)
        self._changes = changes
        self._starts = np.array([c[0] for c in changes], dtype=np.int64)
        self.known_until = now
        self.polls += 1

    async def _fetch(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, mode: str, crc: int
    ) -> None:
        """The pattern memory ``mode`` as a definite-length block; kept by its CRC-32
        if it is the one that played (it may have been replaced since: then not)."""
        writer.write(f"EMU:PATT? {mode}\n".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readexactly(2), TIMEOUT_S)
        if head[:1] != b"#" or not head[1:].isdigit() or head[1:] == b"0":
            raise FeedError(f"EMU:PATT? {mode} answered {head!r}, not a definite-length block")
        size = int(await asyncio.wait_for(reader.readexactly(int(head[1:])), TIMEOUT_S))
        data = await asyncio.wait_for(reader.readexactly(size + 1), TIMEOUT_S)
        if data[-1:] != b"\n":
            raise FeedError(f"EMU:PATT? {mode}: the block is not followed by a newline")
        if zlib.crc32(data[:-1]) == crc:
            if len(self._patterns) >= MAX_PATTERNS:
                del self._patterns[next(iter(self._patterns))]  # the oldest
            self._patterns[crc] = _Pattern.decode(data[:-1])
