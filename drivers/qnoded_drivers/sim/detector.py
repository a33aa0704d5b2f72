"""Simulated single-photon detectors: a gated InGaAs SPAD and a free-running SNSPD.

Control and state live here (bias, temperature, latch); the clicks they make
come from the link model, which reads each detector's physics at every batch,
so a latched detector goes blind at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

from qnoded.contracts import DetectorStatus, DeviceKind, DriverContext
from qnoded_drivers.lifecycle import InProcessDevice
from qnoded_drivers.sim.common import detector_table, shared_link
from qnoded_drivers.sim.link import DetectorPhysics

_KEYS = (
    "channel",
    "mode",
    "efficiency",
    "dark_count_rate_hz",
    "dead_time_ps",
    "afterpulse_probability",
    "afterpulse_decay_ps",
    "jitter_ps",
    "bias_v",
    "temperature_k",
)


class _SimDetector(InProcessDevice):
    """A simulated detector; the class is its own driver factory.

    Options: ``channel`` (required, the tagger input), ``mode`` ("gated" or
    "free-running"; gates follow the BB84 pulse slots and do not exist under
    BBM92), ``efficiency``, ``dark_count_rate_hz`` (gated: the rate seen when
    gated at the pulse rate), ``dead_time_ps``, ``afterpulse_probability``,
    ``afterpulse_decay_ps``, ``jitter_ps`` (gaussian sigma), ``bias_v``,
    ``temperature_k``; defaults per class in ``defaults``.
    """

    kind: ClassVar[DeviceKind] = DeviceKind.DETECTOR
    defaults: ClassVar[dict[str, float]]
    default_mode: ClassVar[str]

    def __init__(self, name: str, options: Mapping[str, Any], context: DriverContext) -> None:
        unknown = set(options) - set(_KEYS)
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)}; valid: {', '.join(_KEYS)}")
        if "channel" not in options:
            raise ValueError("option 'channel' (the tagger input this detector feeds) is required")
        channel = options["channel"]
        if isinstance(channel, bool) or not isinstance(channel, int) or not 0 <= channel < 64:
            raise ValueError(f"option 'channel' must be an integer 0..63, got {channel!r}")
        mode = options.get("mode", self.default_mode)
        if mode not in ("gated", "free-running"):
            raise ValueError(f"option 'mode' must be 'gated' or 'free-running', got {mode!r}")
        values = dict(self.defaults) | {
            k: v for k, v in options.items() if k not in ("channel", "mode")
        }
        for key, value in values.items():
            if (
                not isinstance(value, int | float)
                or isinstance(value, bool)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"option {key!r} must be a non-negative number, got {value!r}")
        limits = {
            "efficiency": (0 < values["efficiency"] <= 1, "in (0, 1]"),
            "afterpulse_probability": (values["afterpulse_probability"] < 1, "in [0, 1)"),
            "dead_time_ps": (values["dead_time_ps"] >= 1, ">= 1 ps"),
            "temperature_k": (values["temperature_k"] > 0, "> 0 K"),
        }
        for key, (ok, what) in limits.items():
            if not ok:
                raise ValueError(f"option {key!r} must be {what}, got {values[key]!r}")
        self._link = shared_link(context)  # first: a bad [simulation] registers nothing
        table = detector_table(context)
        if channel in table:
            raise ValueError(f"channel {channel} already has detector {table[channel].name!r}")
        self.gated = mode == "gated"
        self.name = name
        self._channel = channel
        self._v = values
        self._latched = False
        self.count_rate_hz = 0.0  # set by the sim tagger from each batch
        table[channel] = self

    def describe(self) -> Mapping[str, Any]:
        return {
            "driver": type(self).__name__,
            "channel": self._channel,
            "mode": "gated" if self.gated else "free-running",
        } | dict(self._v)

    @property
    def channel(self) -> int:
        return self._channel

    def physics(self) -> DetectorPhysics:
        v = self._v
        return DetectorPhysics(
            channel=self._channel,
            efficiency=float(v["efficiency"]),
            dark_count_rate_hz=float(v["dark_count_rate_hz"]),
            dead_time_ps=int(v["dead_time_ps"]),
            afterpulse_probability=float(v["afterpulse_probability"]),
            afterpulse_decay_ps=int(v["afterpulse_decay_ps"]),
            jitter_ps=float(v["jitter_ps"]),
            gated=self.gated,
            latched=self._latched,
        )

    async def set_bias(self, volts: float) -> None:
        if not math.isfinite(volts) or volts < 0:
            raise ValueError(f"{self.name}: bias must be >= 0 V, got {volts}")
        self._v["bias_v"] = float(volts)

    async def status(self) -> DetectorStatus:
        v = self._v
        return DetectorStatus(
            name=self.name,
            channel=self._channel,
            mode="gated" if self.gated else "free-running",
            bias_v=float(v["bias_v"]),
            efficiency=float(v["efficiency"]),
            dead_time_ps=int(v["dead_time_ps"]),
            temperature_k=float(v["temperature_k"]),
            latched=self._latched,
            count_rate_hz=self.count_rate_hz,
            dark_count_rate_hz=float(v["dark_count_rate_hz"]),
        )

    def latch(self) -> None:
        """Fault injection: the detector latches (an SNSPD leaves
        superconductivity, a SPAD sticks in avalanche) and counts nothing
        until :meth:`reset_latch`."""
        self._latched = True
        self.count_rate_hz = 0.0

    async def reset_latch(self) -> bool:
        self._latched = False
        return True


class SimSPAD(_SimDetector):
    """InGaAs SPAD, gated at the pulse slots (dark clicks fall in gates).

    Default dead time 1 us (a gated InGaAs SPAD's hold-off is settable from
    ~0.1 to tens of us; 1 us keeps losses at a few per cent at 1e7 pulses/s
    and 25 km).
    """

    default_mode = "gated"
    defaults: ClassVar[dict[str, float]] = {
        "efficiency": 0.10,
        "dark_count_rate_hz": 1000.0,
        "dead_time_ps": 1_000_000,
        "afterpulse_probability": 0.02,
        "afterpulse_decay_ps": 2_000_000,
        "jitter_ps": 350.0,
        "bias_v": 70.0,
        "temperature_k": 223.0,
    }


class SimSNSPD(_SimDetector):
    """Superconducting nanowire detector, free running."""

    default_mode = "free-running"
    defaults: ClassVar[dict[str, float]] = {
        "efficiency": 0.85,
        "dark_count_rate_hz": 100.0,
        "dead_time_ps": 50_000,
        "afterpulse_probability": 0.0,
        "afterpulse_decay_ps": 1000,
        "jitter_ps": 30.0,
        "bias_v": 1.2,
        "temperature_k": 2.5,
    }
