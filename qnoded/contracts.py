"""Driver contracts: the one place that says what a device of each kind must do.

Every driver of a kind (simulated or real) implements the whole contract; the
contract test suite in ``tests/test_driver_contracts.py`` runs against every
registered driver of that kind.  Times are integer picoseconds in the node's
own clock; rates are in hertz; temperatures in kelvin.

Drivers are async context managers: ``__aenter__`` opens the device (and may
fail loudly), ``__aexit__`` releases it.  The device manager owns them through
an ``AsyncExitStack`` and closes them in reverse order.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Self, runtime_checkable

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from types import TracebackType

TAG_DTYPE = np.dtype(np.int64)
CHANNEL_DTYPE = np.dtype(np.uint8)


class DeviceKind(enum.StrEnum):
    """The kinds of device a node drives; each has one contract below."""

    LASER = "laser"
    TIME_TAGGER = "time-tagger"
    DETECTOR = "detector"


class DeviceError(Exception):
    """A device failed; the message names the device and what it was doing."""


class IntensityClass(enum.IntEnum):
    """Decoy-state BB84 intensity classes (Lo-Ma-Chen 2005)."""

    SIGNAL = 0
    DECOY = 1
    VACUUM = 2
    # A bright pulse of the public synchronisation pattern: disclosed, never key.
    SYNC = 3


class LaserMode(enum.StrEnum):
    """What the source emits.

    ``SYNC`` is a public, sparse pseudo-random pattern of bright pulses used
    for qubit-based clock synchronisation (Calderaro et al., PR Applied 13,
    054041, 2020); ``KEY`` is the decoy-state BB84 stream.
    """

    SYNC = "sync"
    KEY = "key"


@dataclass(frozen=True, slots=True)
class TagBatch:
    """Time tags from one tagger, ascending in time.

    ``timestamps_ps`` is int64 picoseconds in the tagger's clock, sorted
    ascending; ``channels`` is uint8, one per tag.  ``seq`` counts batches from
    0 so a consumer can see gaps; ``start_ps``/``stop_ps`` bound the interval the
    batch covers (every tag lies in ``[start_ps, stop_ps)``), so an empty batch
    still says that time has passed.
    """

    seq: int
    start_ps: int
    stop_ps: int
    timestamps_ps: npt.NDArray[np.int64]
    channels: npt.NDArray[np.uint8]

    def __len__(self) -> int:
        return int(self.timestamps_ps.shape[0])


@dataclass(frozen=True, slots=True)
class EmissionRecord:
    """Alice's choices for a run of consecutive pulse slots.

    Slot ``k`` is emitted at ``k * period_ps`` in Alice's clock.  ``basis``
    (0 = Z, 1 = X), ``bit`` and ``intensity`` (an :class:`IntensityClass`)
    are uint8 arrays of length ``n_slots``.  This is secret until announced.
    """

    first_slot: int
    basis: npt.NDArray[np.uint8]
    bit: npt.NDArray[np.uint8]
    intensity: npt.NDArray[np.uint8]

    @property
    def n_slots(self) -> int:
        return int(self.basis.shape[0])


@dataclass(frozen=True, slots=True)
class DetectorStatus:
    """A snapshot of one single-photon detector."""

    name: str
    channel: int
    mode: str  # "gated" or "free-running"
    bias_v: float
    efficiency: float
    dead_time_ps: int
    temperature_k: float
    latched: bool
    count_rate_hz: float
    dark_count_rate_hz: float
    extra: Mapping[str, float] = field(default_factory=dict)


@runtime_checkable
class Device(Protocol):
    """What every device has: a name, an async lifecycle and a liveness probe."""

    name: str

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def ping(self) -> bool:
        """Return True if the device answers; never raises for a dead device."""
        ...

    def describe(self) -> Mapping[str, Any]:
        """Identity and settings for telemetry (never secrets)."""
        ...


@runtime_checkable
class Laser(Device, Protocol):
    """Alice's pulsed source with intensity and polarisation modulators.

    Choices (basis, bit, intensity class) come from the laser's QRNG source.
    """

    kind: DeviceKind

    @property
    def pulse_rate_hz(self) -> float: ...

    @property
    def period_ps(self) -> int:
        """Slot period; slot ``k`` is emitted at ``k * period_ps``."""
        ...

    @property
    def intensities(self) -> Mapping[IntensityClass, float]:
        """Mean photon number per pulse of each class at the fibre input."""
        ...

    @property
    def class_probabilities(self) -> Mapping[IntensityClass, float]: ...

    @property
    def slot_clock_epoch(self) -> int:
        """Changes whenever the source's slot clock may have restarted (an
        instrument found power-cycled, its patterns gone): slot ``k`` before and
        after are not the same instant, so a clock model made before is stale."""
        ...

    async def set_mode(self, mode: LaserMode) -> None: ...

    async def set_output(self, enabled: bool) -> None: ...

    def sync_slots(self, first_slot: int, n_slots: int) -> npt.NDArray[np.int64]:
        """Slots that were bright in the public sync pattern (where it played), ascending."""
        ...

    def emissions(self, first_slot: int, n_slots: int) -> EmissionRecord:
        """Alice's choices for slots ``[first_slot, first_slot + n_slots)``.

        What the source emitted there: a slot that did not carry the key stream
        (the sync pattern, output off, a mode switch not yet confirmed) is class
        SYNC, so it is never sifted nor counted for the decoy-state bounds.
        """
        ...

    def choices_at(self, slots: npt.NDArray[np.int64]) -> EmissionRecord:
        """Alice's choices for arbitrary slots (for sifting detected slots).

        The returned record's ``first_slot`` is -1 and its arrays align with
        ``slots``.
        """
        ...

    def count_classes(self, first_slot: int, n_slots: int) -> npt.NDArray[np.int64]:
        """How many pulses of each intensity class were sent in the range."""
        ...


@runtime_checkable
class TimeTagger(Device, Protocol):
    """A multichannel time tagger streaming batches of picosecond tags."""

    kind: DeviceKind

    @property
    def channels(self) -> tuple[int, ...]: ...

    async def set_delay(self, channel: int, delay_ps: int) -> None: ...

    def delay(self, channel: int) -> int: ...

    def stream(self) -> AsyncIterator[TagBatch]:
        """Batches in time order until the device closes; raises DeviceError on failure."""
        ...


@runtime_checkable
class Detector(Device, Protocol):
    """A single-photon detector (SPAD or SNSPD) feeding one tagger channel."""

    kind: DeviceKind

    @property
    def channel(self) -> int: ...

    async def set_bias(self, volts: float) -> None: ...

    async def status(self) -> DetectorStatus: ...

    async def reset_latch(self) -> bool:
        """Clear a latched detector; True if it is counting again."""
        ...


KIND_PROTOCOLS: dict[DeviceKind, type[Device]] = {
    DeviceKind.LASER: Laser,
    DeviceKind.TIME_TAGGER: TimeTagger,
    DeviceKind.DETECTOR: Detector,
}


@dataclass(slots=True)
class DriverContext:
    """What a driver factory gets beside its own options.

    ``simulation`` is the config's ``[simulation]`` table (None when absent);
    ``shared`` lets drivers of one node share an object, e.g. the simulated
    quantum link that both the sim tagger and the sim detectors use.
    """

    node_id: str
    role: str  # "alice" or "bob"
    protocol: str  # "bb84" or "bbm92"
    simulation: Mapping[str, Any] | None = None
    shared: dict[str, Any] = field(default_factory=dict)


class DriverFactory(Protocol):
    """An entry point of group ``qnoded.drivers`` resolves to one of these."""

    kind: DeviceKind

    def __call__(self, name: str, options: Mapping[str, Any], context: DriverContext) -> Device: ...
