"""Watching the single-photon detectors: latch recovery and the blinding signature.

Every telemetry interval the node reads each detector's status and hands it
to :meth:`DetectorWatch.review`, which reports through the node's own alarm
calls (:class:`WatchActions`):

- **Latch.**  An SNSPD driven normal-conducting, or a SPAD in overload, counts
  nothing until it is reset.  The watch calls ``reset_latch()``, at most
  :data:`MAX_RESETS` times in a row (one per interval, each one logged); if the
  detector is still latched after that, a critical ``detector-latched-<name>``
  fault, key generation halts (a receiver with a dead detector gives a biased
  raw key: in BB84 each detector is one bit value of one basis), and no further
  automatic reset until it counts again (a detector that re-latches at once
  would otherwise be cycled forever).  The fault clears by itself when the
  detector is back; the halt lasts until it does (:attr:`WatchActions.halt`).
- **Blinding signature** (Lydersen et al., Nat. Photonics 4, 686, 2010): bright
  light drives the detector into linear mode, where an eavesdropper controls
  its clicks; what shows is the photon count rate collapsing while the
  photocurrent rises.  When a detector that reports a photocurrent
  (``status().extra["photocurrent_a"]``) counts below
  :data:`BLIND_RATE_FRACTION` of its healthy baseline while its photocurrent
  is above :data:`BLIND_CURRENT_FACTOR` times its baseline, a critical
  ``detector-blinding`` fault, and key generation halts (no block starts)
  until an operator clears it (``clear-alarm detector-blinding``): whether
  the light was an attack is for a person to judge, not for the next
  telemetry interval.

- **No answer.**  A detector whose status cannot be read (a dropped line,
  garbage, an instrument error) raises a ``detector-<name>`` fault with the
  driver's message, which names the device and the command; it clears by itself
  at the next good reading.

Baselines are moving averages over intervals that look healthy, after
:data:`WARMUP` of them; a detector without a photocurrent reading gets the
latch logic only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from qnoded.contracts import Detector, DetectorStatus

log = structlog.get_logger("qnoded.detectors")

MAX_RESETS = 3
WARMUP = 3  # healthy intervals before a baseline counts
BASELINE_WEIGHT = 0.2  # of each new healthy interval in the moving average
BLIND_RATE_FRACTION = 0.1
BLIND_CURRENT_FACTOR = 10.0
BLINDING = "detector-blinding"


def latch_code(name: str) -> str:
    return f"detector-latched-{name}"


def silent_code(name: str) -> str:
    return f"detector-{name}"


@dataclass(slots=True)
class WatchActions:
    """What the watch may do: the node's fault, recovery and halt calls."""

    problem: Callable[[str, str, str], Awaitable[None]]  # code, message, severity
    resolved: Callable[[str], Awaitable[None]]
    halt: Callable[[str], None]  # stop starting blocks until the fault of this code clears


@dataclass(slots=True)
class _Track:
    healthy: int = 0
    rate_hz: float = 0.0
    current_a: float = 0.0
    resets: int = 0  # automatic resets since it last counted
    given_up: bool = False
    silent: bool = False  # its last status read failed


@dataclass(slots=True)
class DetectorWatch:
    actions: WatchActions
    max_resets: int = MAX_RESETS
    _tracks: dict[str, _Track] = field(default_factory=dict)

    async def unanswered(self, det: Detector, exc: BaseException) -> None:
        """``det.status()`` failed with ``exc``."""
        track = self._tracks.setdefault(det.name, _Track())
        track.silent = True
        await self.actions.problem(
            silent_code(det.name), f"detector {det.name} gives no status: {exc}", "warning"
        )

    async def review(self, det: Detector, st: DetectorStatus) -> None:
        track = self._tracks.setdefault(st.name, _Track())
        if track.silent:
            track.silent = False
            await self.actions.resolved(silent_code(st.name))
        if st.latched:
            await self._latched(det, st, track)
            return
        if track.resets or track.given_up:
            log.info("detector counting again", detector=st.name, resets=track.resets)
            track.resets, track.given_up = 0, False
            await self.actions.resolved(latch_code(st.name))
        current = st.extra.get("photocurrent_a")
        if current is None:
            return
        if track.healthy >= WARMUP and self._blinded(st.count_rate_hz, current, track):
            message = (
                f"detector {st.name} (channel {st.channel}): count rate "
                f"{st.count_rate_hz:.3g} Hz, {st.count_rate_hz / track.rate_hz:.1%} of its "
                f"{track.rate_hz:.3g} Hz baseline, while its photocurrent is "
                f"{current:.3g} A, {current / track.current_a:.0f}x its baseline: the "
                "signature of a blinding attack; key generation halted until an operator "
                f"clears {BLINDING}"
            )
            self.actions.halt(BLINDING)
            await self.actions.problem(BLINDING, message, "critical")
            return
        self._learn(st.count_rate_hz, current, track)

    @staticmethod
    def _blinded(rate: float, current: float, track: _Track) -> bool:
        return (
            rate < BLIND_RATE_FRACTION * track.rate_hz
            and current > BLIND_CURRENT_FACTOR * track.current_a
        )

    @staticmethod
    def _learn(rate: float, current: float, track: _Track) -> None:
        if track.healthy == 0:
            track.rate_hz, track.current_a = rate, current
        else:
            w = BASELINE_WEIGHT
            track.rate_hz += w * (rate - track.rate_hz)
            track.current_a += w * (current - track.current_a)
        track.healthy += 1

    async def _latched(self, det: Detector, st: DetectorStatus, track: _Track) -> None:
        if track.given_up:
            return
        if track.resets >= self.max_resets:
            track.given_up = True
            self.actions.halt(latch_code(st.name))
            await self.actions.problem(
                latch_code(st.name),
                f"detector {st.name} (channel {st.channel}) stays latched after "
                f"{track.resets} automatic resets; key generation halted; check its bias "
                "and cooling, then reset it",
                "critical",
            )
            return
        track.resets += 1
        try:
            ok = await det.reset_latch()
        except Exception as exc:  # noqa: BLE001 - a driver may raise anything; the retry is bounded
            ok = False
            log.warning("detector latch reset failed", detector=st.name, error=str(exc))
        log.warning(
            "detector latched, reset",
            detector=st.name,
            attempt=track.resets,
            of=self.max_resets,
            reset_accepted=ok,
        )
