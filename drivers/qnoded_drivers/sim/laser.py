"""Simulated pulsed source with intensity and polarisation modulators (Alice, BB84)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from qnoded.contracts import DeviceKind, DriverContext, EmissionRecord, IntensityClass, LaserMode
from qnoded_drivers.lifecycle import InProcessDevice
from qnoded_drivers.sim.common import shared_link


class SimLaser(InProcessDevice):
    """Alice's source; her choices are the link's counter-based QRNG stream.

    The emission schedule (sync pattern first, then decoy-state BB84) is the
    shared ``[simulation]`` table's ``sync_duration_ps``, because Bob's process
    must derive the same photons; ``set_mode`` records what the node asked for.
    """

    kind: ClassVar[DeviceKind] = DeviceKind.LASER

    def __init__(self, name: str, options: Mapping[str, Any], context: DriverContext) -> None:
        if options:
            raise ValueError(
                f"unknown option(s) {sorted(options)}: the sim laser takes its "
                "settings from [simulation]"
            )
        self.name = name
        self._link = shared_link(context)
        self.mode = LaserMode.SYNC
        self.output = False

    async def _on_close(self) -> None:
        self.output = False  # a closed source does not emit

    def describe(self) -> Mapping[str, Any]:
        p = self._link.p
        return {
            "driver": "sim-laser",
            "pulse_rate_hz": p.pulse_rate_hz,
            "mu_signal": p.mu_signal,
            "mu_decoy": p.mu_decoy,
            "period_ps": p.period_ps,
            "sync_duration_ps": p.sync_duration_ps,
            "sync_period_ps": p.sync_period_ps,
            "mode": str(self.mode),
        }

    @property
    def pulse_rate_hz(self) -> float:
        return 1e12 / self._link.p.period_ps

    @property
    def slot_clock_epoch(self) -> int:
        return 0  # the simulated slot clock is true time: it never restarts

    @property
    def period_ps(self) -> int:
        return self._link.p.period_ps

    @property
    def intensities(self) -> Mapping[IntensityClass, float]:
        p = self._link.p
        return {
            IntensityClass.SIGNAL: p.mu_signal,
            IntensityClass.DECOY: p.mu_decoy,
            IntensityClass.VACUUM: 0.0,
            IntensityClass.SYNC: p.mu_signal,
        }

    @property
    def class_probabilities(self) -> Mapping[IntensityClass, float]:
        p = self._link.p
        return {
            IntensityClass.SIGNAL: p.p_signal,
            IntensityClass.DECOY: p.p_decoy,
            IntensityClass.VACUUM: 1.0 - p.p_signal - p.p_decoy,
        }

    async def set_mode(self, mode: LaserMode) -> None:
        self.mode = LaserMode(mode)

    async def set_output(self, enabled: bool) -> None:
        self.output = bool(enabled)

    def sync_slots(self, first_slot: int, n_slots: int) -> npt.NDArray[np.int64]:
        return self._link.sync_slots(first_slot, n_slots)

    def emissions(self, first_slot: int, n_slots: int) -> EmissionRecord:
        if n_slots < 0:
            raise ValueError(f"{self.name}: n_slots must be >= 0, got {n_slots}")
        basis, bit, cls = self._link.choices(
            np.arange(first_slot, first_slot + n_slots, dtype=np.int64)
        )
        return EmissionRecord(first_slot=first_slot, basis=basis, bit=bit, intensity=cls)

    def choices_at(self, slots: npt.NDArray[np.int64]) -> EmissionRecord:
        basis, bit, cls = self._link.choices(np.asarray(slots, dtype=np.int64))
        return EmissionRecord(first_slot=-1, basis=basis, bit=bit, intensity=cls)

    def count_classes(self, first_slot: int, n_slots: int) -> npt.NDArray[np.int64]:
        """Exact counts per class, computed in chunks of the vectorised hash."""
        return self._link.count_classes(first_slot, n_slots)
