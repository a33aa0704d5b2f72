"""The driver registry is explicit and loud."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

from qnoded.contracts import DeviceKind
from qnoded.registry import GROUP, RegistryError, discover


def _ep(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group=GROUP)


def test_builtin_drivers_discovered_through_entry_points() -> None:
    found = discover()
    assert found["sim-laser"].kind is DeviceKind.LASER
    assert found["sim-tagger"].kind is DeviceKind.TIME_TAGGER
    assert found["sim-spad"].kind is DeviceKind.DETECTOR
    assert found["sim-snspd"].kind is DeviceKind.DETECTOR
    assert found["sim-laser"].distribution == "qnoded"


def test_duplicate_name_is_an_error() -> None:
    eps = [
        _ep("sim-laser", "qnoded_drivers.sim.laser:SimLaser"),
        _ep("sim-laser", "somebody_else.lasers:Laser"),
    ]
    with pytest.raises(RegistryError, match="declared twice"):
        discover(eps)


def test_broken_driver_is_named() -> None:
    with pytest.raises(RegistryError, match=r"'broken'.*failed to import"):
        discover([_ep("broken", "no_such_module_xyz:Driver")])


def test_driver_without_kind_is_rejected() -> None:
    with pytest.raises(RegistryError, match="no valid 'kind'"):
        discover([_ep("kindless", "qnoded.config:ConfigError")])
