"""One contract suite per device kind, run against every registered driver of that kind.

A new driver (ours or a third party's, found through the same entry points)
is picked up automatically.  Drivers that need hardware or options this suite
cannot supply declare them in ``CASES``; a driver missing from ``CASES`` is
tried with no options and skipped, with the reason, if that cannot work.
A key ``driver[variant]`` in ``CASES`` runs the same driver once more with other options.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qnoded_drivers.ptu import write_ptu
from test_scpi_detector import SerialDetectorEmulator
from test_tcp_tagger import start_emulator
from test_visa_modulator import Emulator as VisaModulatorEmulator

from qnoded.broker import free_port
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
# The same driver on a PicoQuant T2 file (HydraHarp V2 records; inputs 1..4 map to 0..3).
_PTU = _REPLAY.with_suffix(".ptu")
write_ptu(_PTU, np.sort(_rng.integers(0, 10**11, 5000)), _rng.integers(1, 5, 5000))
CASES["replay-tagger[ptu]"] = ("bob", "bbm92", {"file": str(_PTU), "batch_duration_ps": 10**10}, 0)
# The SCPI detector controller speaks to its wire-level emulator (hil/serial_detector.py),
# which the fixture below runs on a pty behind this stable port name for the whole module.
_SCPI_PORT = _REPLAY.with_name("ttySCPI0")
CASES["scpi-detector"] = ("bob", "bb84", {"port": str(_SCPI_PORT), "channel": 2}, 0)


@pytest.fixture(scope="module", autouse=True)
def _scpi_detector_emulator() -> Iterator[None]:
    with SerialDetectorEmulator(_SCPI_PORT):
        yield


# The TCP time tagger streams from its emulator (hil/tcp_tagger.py), which the fixture
# below runs on this module's SIM table and this control port for the whole module.
_TCP_PORT = free_port()
CASES["tcp-tagger"] = (
    "bob",
    "bb84",
    {"host": "127.0.0.1", "port": _TCP_PORT, "batch_duration_ps": SIM["batch_duration_ps"]},
    0,
)


@pytest.fixture(scope="module", autouse=True)
def _tcp_tagger_emulator() -> Iterator[None]:
    emu = start_emulator(_REPLAY.with_name("tcp-tagger.json"), SIM, "--port", str(_TCP_PORT))
    yield
    assert emu.stop() == 0


# The VISA modulator drives its TCP emulator (hil/visa_modulator.py) over pyvisa-py,
# which the fixture below runs on this port for the whole module.
_VISA_PORT = free_port()
CASES["visa-modulator"] = (
    "alice",
    "bb84",
    {
        "resource": f"TCPIP::127.0.0.1::{_VISA_PORT}::SOCKET",
        "seed": 11,
        "pattern_length": 1 << 16,
        "sync_density": 0.01,
    },
    0,
)


@pytest.fixture(scope="module", autouse=True)
def _visa_modulator_emulator() -> Iterator[None]:
    emu = VisaModulatorEmulator(port=_VISA_PORT)
    emu.start()
    yield
    emu.kill()


def _drivers(kind: DeviceKind) -> list[str]:
    names = [n for n, info in REGISTRY.items() if info.kind is kind]
    return sorted(names + [c for c in CASES if "[" in c and c.partition("[")[0] in names])


def _build(name: str) -> tuple[Any, DriverContext]:
    info: DriverInfo = REGISTRY[name.partition("[")[0]]
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
        epoch = laser.slot_clock_epoch
        assert isinstance(epoch, int)
        await laser.set_mode(LaserMode.SYNC)
        await laser.set_mode(LaserMode.KEY)
        await laser.set_output(True)
        assert await laser.ping()
        assert laser.slot_clock_epoch == epoch  # nothing restarted meanwhile
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
