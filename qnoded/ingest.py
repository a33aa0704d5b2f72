"""Ingest: every tag batch from a driver is checked before it reaches the kernel.

The C kernel trusts its inputs (sorted int64 times, uint8 channels); this is
where that trust is earned.  A bad batch is rejected with an error naming the
device and the defect, and counted; it never reaches sifting.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qnoded.contracts import CHANNEL_DTYPE, TAG_DTYPE, TagBatch


class BatchError(ValueError):
    """A tag batch violates the TimeTagger contract."""


@dataclass(slots=True)
class BatchValidator:
    """Checks batches of one tagger in stream order; counts gaps in ``seq``."""

    device: str
    last_seq: int = -1
    last_stop_ps: int | None = None
    missed_batches: int = 0

    def check(self, batch: TagBatch) -> TagBatch:
        where = f"device {self.device!r}, batch {batch.seq}"
        t, ch = batch.timestamps_ps, batch.channels
        if not isinstance(t, np.ndarray) or t.dtype != TAG_DTYPE or t.ndim != 1:
            got = getattr(t, "dtype", type(t).__name__)
            raise BatchError(f"{where}: timestamps must be a 1-d int64 array, got {got}")
        if not isinstance(ch, np.ndarray) or ch.dtype != CHANNEL_DTYPE or ch.ndim != 1:
            got = getattr(ch, "dtype", type(ch).__name__)
            raise BatchError(f"{where}: channels must be a 1-d uint8 array, got {got}")
        if t.shape != ch.shape:
            raise BatchError(f"{where}: {t.shape[0]} timestamps but {ch.shape[0]} channels")
        if batch.stop_ps < batch.start_ps:
            raise BatchError(
                f"{where}: stop_ps {batch.stop_ps} is before start_ps {batch.start_ps}"
            )
        if t.shape[0]:
            steps = np.diff(t)
            if steps.shape[0] and int(steps.min()) < 0:
                bad = int(np.argmax(steps < 0)) + 1
                raise BatchError(
                    f"{where}: timestamps not sorted ascending at index {bad} "
                    f"({int(t[bad - 1])} then {int(t[bad])} ps)"
                )
            if int(t[0]) < batch.start_ps or int(t[-1]) >= batch.stop_ps:
                raise BatchError(
                    f"{where}: tags [{int(t[0])}, {int(t[-1])}] ps fall outside the batch "
                    f"interval [{batch.start_ps}, {batch.stop_ps})"
                )
        if self.last_stop_ps is not None and batch.start_ps < self.last_stop_ps:
            raise BatchError(
                f"{where}: starts at {batch.start_ps} ps, before the previous batch ended "
                f"({self.last_stop_ps} ps)"
            )
        if batch.seq <= self.last_seq:
            raise BatchError(
                f"{where}: sequence number repeats or goes back (after {self.last_seq})"
            )
        self.missed_batches += batch.seq - self.last_seq - 1
        self.last_seq = batch.seq
        self.last_stop_ps = batch.stop_ps
        return batch
