"""Tag batches are checked before the kernel sees them."""

from __future__ import annotations

import numpy as np
import pytest

from qnoded.contracts import TagBatch
from qnoded.ingest import BatchError, BatchValidator


def _batch(
    seq: int,
    t: list[int],
    start: int = 0,
    stop: int = 1000,
    dtype: type = np.int64,
    ch_dtype: type = np.uint8,
) -> TagBatch:
    return TagBatch(
        seq=seq,
        start_ps=start,
        stop_ps=stop,
        timestamps_ps=np.array(t, dtype=dtype),
        channels=np.zeros(len(t), dtype=ch_dtype),
    )


def test_good_batches_pass_and_gaps_count() -> None:
    v = BatchValidator("tagger")
    v.check(_batch(0, [1, 2, 3]))
    v.check(_batch(3, [1500], start=1000, stop=2000))
    assert v.missed_batches == 2


@pytest.mark.parametrize(
    ("batch", "words"),
    [
        (_batch(0, [5, 3, 7]), "not sorted ascending at index 1 (5 then 3 ps)"),
        (_batch(0, [1, 2], dtype=np.float64), "must be a 1-d int64 array, got float64"),
        (_batch(0, [1, 2], ch_dtype=np.int32), "channels must be a 1-d uint8 array"),
        (_batch(0, [1, 2000]), "outside the batch interval"),
        (_batch(0, [], start=10, stop=5), "before start_ps"),
    ],
)
def test_bad_batches_named(batch: TagBatch, words: str) -> None:
    with pytest.raises(BatchError) as info:
        BatchValidator("tagger").check(batch)
    assert "device 'tagger', batch 0" in str(info.value)
    assert words in str(info.value)


def test_overlap_and_replay_rejected() -> None:
    v = BatchValidator("t")
    v.check(_batch(0, [1], stop=1000))
    with pytest.raises(BatchError, match="before the previous batch ended"):
        v.check(_batch(1, [900], start=900, stop=2000))
    with pytest.raises(BatchError, match="repeats or goes back"):
        v.check(_batch(0, [1500], start=1000, stop=2000))
