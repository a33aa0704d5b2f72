"""Soak, shortened for CI: bench/soak.py's run for about a minute, asserted on.

Alice and Bob run as ``qnoded run`` processes on the simulated BBM92 link at full
speed (the bench soak's link: see bench/soak.py for why), with 20 extra MQTT
consumers on telemetry, status and alarms and one key consumer on both key topics.
After a warm-up the nodes must hold their memory, open files and asyncio tasks
level, drop no batch, and at the end stop on SIGTERM with every key accounted for
at both ends (tests/key_accounting.py, as after tests/test_kill_blocks.py).  The
bench script runs the same soak for hours and prints the figures.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import soak  # bench/soak.py: the soak harness, shared with the benchmark

from qnoded.mqtt import KEY_BATCH

pytestmark = pytest.mark.slow

SETTINGS = soak.SoakSettings(
    minutes=0.9,
    consumers=20,
    block_bits=100_000,  # blocks three times as often as the bench soak's: a warm-up in reach
    warmup_s=30.0,
    warmup_blocks=4,
    # The four blocks come at 30-50 s, later the busier the machine: run on until 20 s
    # after them, within the 90 s a CI job gives this test (start and stop take ~15 s).
    min_window_s=20.0,
    max_minutes=70 / 60,
    settle_s=4.0,  # a 1e5-bit block's post-processing takes a second or two
    every_s=15.0,
)
WINDOW_MIN_S = 15.0  # after the warm-up, to judge growth on
SAMPLES_MIN = 5  # telemetry comes once a second, late and in bursts while keys go out
# Bounds, from runs of this soak on a busy 2-core machine.  RSS: after four blocks
# Alice's RSS still climbs 12-15 MB to where it then stays (+11.7 and +12.0 MB over
# the CI window, measured; then within +-4 MB for 16 minutes in the bench soak), Bob's
# 2 MB.  A leak of the tag stream (Alice takes ~9 MB/s of tags: int64 time + channel)
# passes 25 MB within seconds even if it kept one batch in ten; a slow leak per block
# is for the bench soak's hours, not for a minute of CI.
RSS_GROWTH_MAX_MB = 25.0
RSS_GROWTH_MAX_PCT = 12.0
# A file is open only while used (SQLite's journal during a commit): one at a time.
FDS_SPREAD_MAX = 2
# A batch of KEY_BATCH keys is published at once, each publish a gather task plus
# asyncio.wait_for's task inside aiomqtt: a telemetry sample taken meanwhile counts
# 2 * KEY_BATCH more.  Growth shows in the floor, which must not rise by more than
# that (a leak of one task per block goes past it within the CI window's 30-odd blocks;
# the bench soak's hours show slower ones).
TASKS_SPREAD_MAX = 2 * KEY_BATCH + 2
# Telemetry waits behind a block's key deliveries on a saturated loop (see the report);
# it must still come, not stop.
TELEMETRY_GAP_MAX_S = 30.0


@pytest.mark.asyncio
async def test_soak_holds_memory_files_tasks_and_keys(
    tmp_path: Path, mqtt_broker: tuple[str, int]
) -> None:
    result = await soak.soak(SETTINGS, tmp_path, mqtt_broker)
    print(result.summary())  # the table's rows were printed as they came
    assert not result.problems, result.summary()  # clean stop, keys, stores, no drops
    for node in ("alice", "bob"):
        last = result.last(node)
        health = result.health(node)
        assert last is not None and health is not None, f"{node}: no sample after the warm-up"
        assert last.blocks_accepted >= 1
        assert last.dropped_batches == 0
        assert health.window_s >= WINDOW_MIN_S and health.samples >= SAMPLES_MIN, health
        assert health.rss_drift_mb < RSS_GROWTH_MAX_MB, health
        assert health.rss_drift_pct < RSS_GROWTH_MAX_PCT, health
        assert health.fds_spread <= FDS_SPREAD_MAX, health
        assert health.tasks_spread <= TASKS_SPREAD_MAX, health
        # A minute holds a few dozen samples, and a half of them may catch no quiet
        # moment between key batches: the floor may rise by one batch in flight.
        assert health.tasks_floor_moved <= 2 * KEY_BATCH, health
        assert health.max_gap_s < TELEMETRY_GAP_MAX_S, health
    common, mismatched, _ = result.observed.ledger.compare()
    assert common > 0 and mismatched == 0
    # Every consumer heard both nodes throughout: as many messages as the busiest.
    heard = [sum(c.values()) for c in result.observed.consumer_messages]
    assert len(heard) == SETTINGS.consumers and min(heard) >= 0.95 * max(heard) > 0
