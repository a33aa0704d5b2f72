"""One contract suite per device kind, run against every registered driver of that kind.

A new driver (ours or a third party's, found through the same entry points)
is picked up automatically.  Drivers that need hardware or options this suite
cannot supply declare them in ``CASES``; a driver missing from ``CASES`` is
tried with no options and skipped, with the reason, if that cannot work.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qnoded.contracts import (
    Detector,
    DeviceKind,
    DriverContext,
    IntensityClass,
    Laser,
    LaserMode,
    TimeTagger,
)
from qnoded.ingest import BatchValidator
from qnoded.registry import DriverInfo, discover

SIM = {
    "link_seed": 7,
    "alice_qrng_seed": 8,
    "distance_km": 5.0,
    "pulse_rate_hz": 1e7,
    "pair_rate_hz": 2e5,
    "batch_duration_ps": 2_000_000_000,
    "sync_duration_ps": 1_000_000_000,
}

# driver -> (role, protocol, options, detector channels to add beside it)
CASES: dict[str, tuple[str, str, dict[str, Any], int]] = {
    "sim-laser": ("alice", "bb84", {}, 0),
    "sim-tagger": ("bob", "bb84", {}, 4),
    "sim-spad": ("bob", "bb84", {"channel": 0}, 0),
    "sim-snspd": ("bob", "bbm92", {"channel": 1}, 0),
}

REGISTRY = discover()

# A small recording for the replay driver, made once for this module.
_REPLAY = Path(tempfile.mkdtemp(prefix="qnoded-contract-")) / "rec.npz"
_rng = np.random.default_rng(5)
np.savez(
    _REPLAY,
    timestamps_ps=np.sort(_rng.integers(0, 10**11, 5000)),
    channels=_rng.integers(0, 4, 5000).astype(np.uint8),
    batch_duration_ps=np.array([10**10]),
)
CASES["replay-tagger"] = ("bob", "bbm92", {"file": str(_REPLAY)}, 0)


def _drivers(kind: DeviceKind) -> list[str]:
    return sorted(n for n, info in REGISTRY.items() if info.kind is kind)


def _build(name: str) -> tuple[Any, DriverContext]:
    info: DriverInfo = REGISTRY[name]
    role, protocol, options, n_det = CASES.get(name, ("bob", "bb84", {}, 0))
    ctx = DriverContext(node_id="contract", role=role, protocol=protocol, simulation=dict(SIM))
    for ch in range(n_det):
        REGISTRY["sim-spad"].factory(f"det{ch}", {"channel": ch}, ctx)
    try:
        device = info.factory(name, options, ctx)
    except (ValueError, TypeError, KeyError) as exc:
        if name not in CASES:
            pytest.skip(f"driver {name!r} needs options this suite lacks: {exc}")
        raise
    return device, ctx


def _check_common(device: Any, describe: Mapping[str, Any]) -> None:
    assert isinstance(device.name, str)
    assert isinstance(describe, Mapping)


@pytest.mark.asyncio
@pytest.mark.parametrize("name", _drivers(DeviceKind.LASER))
async def test_laser_contract(name: str) -> None:
    device, _ = _build(name)
    assert isinstance(device, Laser)
    async with device as laser:
        assert await laser.ping()
        _check_common(laser, laser.describe())
        assert isinstance(laser.period_ps, int)
        assert laser.period_ps > 0
        assert laser.pulse_rate_hz == pytest.approx(1e12 / laser.period_ps, rel=1e-6)
        probs = laser.class_probabilities
        assert sum(probs.values()) == pytest.approx(1.0)
        assert laser.intensities[IntensityClass.VACUUM] == 0.0
        await laser.set_mode(LaserMode.SYNC)
        await laser.set_mode(LaserMode.KEY)
        await laser.set_output(True)
        rec = laser.emissions(1000, 5000)
        assert rec.first_slot == 1000
        assert rec.n_slots == 5000
        for arr in (rec.basis, rec.bit, rec.intensity):
            assert arr.dtype == np.uint8
            assert arr.shape == (5000,)
        slots = np.array([1000, 1003, 5999], dtype=np.int64)
        picked = laser.choices_at(slots)
        for a, b in ((picked.basis, rec.basis), (picked.bit, rec.bit)):
            np.testing.assert_array_equal(a, b[slots - 1000])
        np.testing.assert_array_equal(picked.intensity, rec.intensity[slots - 1000])
        counts = laser.count_classes(1000, 5000)
        assert int(counts.sum()) == 5000
        for cls in IntensityClass:
            assert int(counts[cls]) == int(np.count_nonzero(rec.intensity == cls))
        sync = laser.sync_slots(0, 100_000)
        assert sync.dtype == np.int64
        assert np.all(np.diff(sync) > 0)
        await laser.set_output(False)


@pytest.mark.asyncio
@pytest.mark.parametrize("name", _drivers(DeviceKind.TIME_TAGGER))
async def test_time_tagger_contract(name: str) -> None:
    device, _ = _build(name)
    assert isinstance(device, TimeTagger)
    async with device as tagger:
        assert await tagger.ping()
        _check_common(tagger, tagger.describe())
        assert len(tagger.channels) >= 1
        await tagger.set_delay(tagger.channels[0], 1234)
        assert tagger.delay(tagger.channels[0]) == 1234
        await tagger.set_delay(tagger.channels[0], 0)
        validator = BatchValidator(name)
        seen = 0
        async for batch in tagger.stream():
            validator.check(batch)  # sorted, typed, inside its interval, no overlap
            assert set(np.unique(batch.channels).tolist()) <= set(tagger.channels)
            seen += 1
            if seen == 5:
                break
        assert validator.missed_batches == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("name", _drivers(DeviceKind.DETECTOR))
async def test_detector_contract(name: str) -> None:
    device, _ = _build(name)
    assert isinstance(device, Detector)
    async with device as det:
        assert await det.ping()
        _check_common(det, det.describe())
        st = await det.status()
        assert st.channel == det.channel
        assert st.mode in {"gated", "free-running"}
        assert 0.0 < st.efficiency <= 1.0
        assert st.dead_time_ps > 0
        assert st.temperature_k > 0
        await det.set_bias(st.bias_v)
        assert (await det.status()).bias_v == pytest.approx(st.bias_v)
        assert await det.reset_latch()
        assert not (await det.status()).latched
