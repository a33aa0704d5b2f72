"""Replay of recorded time tags from a ``.npz`` file, as a TimeTagger.

The file holds ``timestamps_ps`` (int64, ascending), ``channels`` (uint8) and
``batch_duration_ps`` (one int64).  Batches are cut on the recording's own
clock.  After the recording, time goes on without light: empty batches follow
in real time, as a tagger in the dark would send.  Used for benchmarks and to
run recorded data through the whole pipeline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from qnoded.contracts import DeviceKind, DriverContext, TagBatch
from qnoded_drivers.lifecycle import InProcessDevice

_KEYS = frozenset({"file", "realtime"})


class ReplayTagger(InProcessDevice):
    """Streams a recording batch by batch, as fast as it is taken or paced."""

    kind: ClassVar[DeviceKind] = DeviceKind.TIME_TAGGER

    def __init__(self, name: str, options: Mapping[str, Any], context: DriverContext) -> None:
        unknown = set(options) - _KEYS
        if unknown:
            raise ValueError(
                f"unknown option(s) {sorted(unknown)}; valid: {', '.join(sorted(_KEYS))}"
            )
        if not isinstance(options.get("file"), str):
            raise ValueError("option 'file' (a .npz recording) is required")
        self.name = name
        self._path = Path(options["file"])
        self._realtime = bool(options.get("realtime", False))
        self._delays: dict[int, int] = {}
        self._raw_t = self._t = np.empty(0, np.int64)
        self._raw_c = self._c = np.empty(0, np.uint8)
        self._dur = 0
        self._pos = 0  # next batch index: a reopened stream resumes

    async def _on_open(self) -> None:
        try:
            with np.load(self._path) as data:
                self._raw_t = np.ascontiguousarray(data["timestamps_ps"], dtype=np.int64)
                self._raw_c = np.ascontiguousarray(data["channels"], dtype=np.uint8)
                self._dur = int(np.asarray(data["batch_duration_ps"]).reshape(-1)[0])
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"{self.name}: cannot read recording {self._path}: {exc}") from exc
        self._t, self._c = self._raw_t, self._raw_c
        unsorted = np.flatnonzero(np.diff(self._raw_t) < 0)
        if unsorted.shape[0]:
            raise ValueError(
                f"{self.name}: {self._path}: timestamps_ps not ascending at index "
                f"{int(unsorted[0]) + 1}"
            )
        if self._t.shape != self._c.shape or self._dur <= 0:
            raise ValueError(f"{self.name}: {self._path} has mismatched arrays or no batch length")
        self._delays = {int(ch): 0 for ch in np.unique(self._c)}

    def describe(self) -> Mapping[str, Any]:
        return {
            "driver": "replay-tagger",
            "file": str(self._path),
            "tags": int(self._t.shape[0]),
            "batch_duration_ps": self._dur,
        }

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(sorted(self._delays))

    async def set_delay(self, channel: int, delay_ps: int) -> None:
        """Shift one channel's tags; the recording is re-sorted, and batches
        not yet sent are cut from the shifted timeline."""
        if channel not in self._delays:
            raise ValueError(f"{self.name}: no channel {channel} in the recording")
        self._delays[channel] = int(delay_ps)
        shift = np.zeros(256, dtype=np.int64)
        for ch, d in self._delays.items():
            shift[ch] = d
        t = self._raw_t + shift[self._raw_c]
        order = np.argsort(t, kind="stable")
        self._t, self._c = t[order], self._raw_c[order]

    def delay(self, channel: int) -> int:
        return self._delays[channel]

    async def stream(self) -> AsyncIterator[TagBatch]:
        if not self._raw_t.shape[0]:
            await asyncio.Event().wait()
        first = int(self._raw_t[0]) // self._dur * self._dur
        n_batches = (int(self._raw_t[-1]) - first) // self._dur + 1
        wall0 = time.monotonic() - self._pos * self._dur * 1e-12
        while True:
            k = self._pos
            start, stop = first + k * self._dur, first + (k + 1) * self._dur
            if k >= n_batches:
                # After the recording time goes on in the dark: empty batches,
                # paced to the clock, as a tagger with no light sends.
                await asyncio.sleep(self._dur * 1e-12)
            elif self._realtime:
                await asyncio.sleep(
                    max(0.0, wall0 + (k + 1) * self._dur * 1e-12 - time.monotonic())
                )
            else:
                await asyncio.sleep(0)
            lo, hi = np.searchsorted(self._t, [start, stop])
            self._pos += 1
            yield TagBatch(
                seq=k,
                start_ps=start,
                stop_ps=stop,
                timestamps_ps=self._t[lo:hi],
                channels=self._c[lo:hi],
            )
