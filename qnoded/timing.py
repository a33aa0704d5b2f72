"""The clock relation between the two nodes: lock it, then keep it locked.

Bob's tagger clock runs with an unknown offset and a ppm-scale rate error
against Alice's.  We model ``t_bob = t_alice * (1 + drift) + offset`` and map
Bob's tags into Alice's time frame before any matching, so the C kernel only
ever tracks a small residual.  The lock itself is the kernel's coarse-to-fine
cross-correlation; tracking is a proportional-integral loop on the residual
that the kernel reports for each batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from qnoded import kernel


@dataclass(slots=True)
class ClockModel:
    """``t_bob = t_alice * (1 + drift) + offset_ps`` (times in ps)."""

    offset_ps: float
    drift: float
    # Loop gains of the tracking filter: the proportional term moves the
    # offset by this share of each batch's residual; the integral term turns
    # a persistent residual slope into a rate correction.
    kp: float = 0.5
    ki: float = 0.2

    def to_alice(self, t_bob: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Bob's tags in Alice's time frame, as int64 ps."""
        mapped = (t_bob.astype(np.float64) - self.offset_ps) / (1.0 + self.drift)
        return np.rint(mapped).astype(np.int64)

    def alice_interval(self, start_b: int, stop_b: int) -> tuple[int, int]:
        """The Alice-frame interval that a Bob-frame interval maps to."""
        a0 = (start_b - self.offset_ps) / (1.0 + self.drift)
        a1 = (stop_b - self.offset_ps) / (1.0 + self.drift)
        return int(np.floor(a0)), int(np.floor(a1))

    def update(self, residual_ps: float, span_ps: float, at_ps: float) -> None:
        """Fold one batch's residual (Alice frame, ps) into the model.

        A positive residual means Bob's tags landed later than predicted.
        ``span_ps`` is the batch length and ``at_ps`` the Alice-frame time the
        residual belongs to: a rate correction pivots there, so the mapping
        does not jump for the tags already seen.
        """
        self.offset_ps += self.kp * residual_ps * (1.0 + self.drift)
        if span_ps > 0:
            d_drift = self.ki * residual_ps / span_ps
            self.offset_ps -= d_drift * at_ps
            self.drift += d_drift

    @property
    def drift_ppm(self) -> float:
        return self.drift * 1e6


def lock(
    t_alice: npt.NDArray[np.int64],
    t_bob: npt.NDArray[np.int64],
    *,
    max_offset_ps: int,
    resolution_ps: int,
    min_snr: float,
) -> ClockModel:
    """Find offset and drift between two tag streams; :class:`kernel.LockError` if no peak."""
    offset, drift = kernel.find_offset_drift(
        t_alice,
        t_bob,
        max_offset_ps=max_offset_ps,
        resolution_ps=resolution_ps,
        min_snr=min_snr,
    )
    # find_offset_drift reports the offset at Alice time t_alice[0]:
    # t_bob = t_alice[0] + offset + (t_alice - t_alice[0]) * (1 + drift).
    origin = float(t_alice[0])
    return ClockModel(offset_ps=float(offset) - origin * drift, drift=float(drift))
