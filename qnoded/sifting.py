"""Sifting: from Bob's detections and Alice's choices to two matching bit strings.

Transport-free: the engines take and return messages (dicts of numpy arrays)
so the same code runs in the daemon over TCP, in tests and in the benchmark.

Flow per Bob batch ``seq`` (Alice leads; every message is public):

1. Bob -> Alice ``TAGS``: the batch interval, detection times and each
   detection's basis (never its bit).
2. Alice locks the clocks (first batches), then matches detections to her
   pulse slots (BB84) or her own detections (BBM92), keeps those whose bases
   agree and replies ``SIFT``: indices of kept detections and, for decoy BB84,
   each one's intensity class.
3. Bob -> Alice ``QBER_SAMPLE``: his bits of every kept X-basis detection.
   The X basis is the test basis: all of it is disclosed, none of it is key
   (the phase error of the Z key is bounded from it, Lim et al. 2014).
4. Alice counts the errors per intensity class and replies ``QBER_RESULT``;
   both keep the batch's Z-basis bits, with their classes, as raw key
   (:class:`SiftedBatch`), which :mod:`qnoded.blocks` gathers into blocks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from qnoded import kernel
from qnoded.config import NodeConfig
from qnoded.contracts import IntensityClass, Laser, TagBatch
from qnoded.timing import ClockModel, lock

Message = dict[str, npt.NDArray[Any]]
N_CLASSES = len(IntensityClass)

log = structlog.get_logger("qnoded.sifting")


class ProtocolError(Exception):
    """A peer message is malformed or inconsistent with our state."""


def scalar(msg: Mapping[str, npt.NDArray[Any]], name: str) -> int:
    """An int64 scalar field of a message, with a clear error if absent."""
    try:
        arr = msg[name]
    except KeyError as exc:
        raise ProtocolError(f"message lacks field {name!r}") from exc
    if arr.shape != (1,) or arr.dtype != np.int64:
        raise ProtocolError(f"field {name!r} must be one int64, got {arr.dtype}{arr.shape}")
    return int(arr[0])


def field_of(msg: Mapping[str, npt.NDArray[Any]], name: str, dtype: type[Any]) -> npt.NDArray[Any]:
    try:
        arr = msg[name]
    except KeyError as exc:
        raise ProtocolError(f"message lacks field {name!r}") from exc
    if arr.dtype != np.dtype(dtype) or arr.ndim != 1:
        raise ProtocolError(
            f"field {name!r} must be a 1-d {np.dtype(dtype)} array, got {arr.dtype}"
        )
    return arr


def i64(value: int) -> npt.NDArray[np.int64]:
    return np.array([value], dtype=np.int64)


@dataclass(slots=True)
class SiftStats:
    """Cumulative counters of one node; telemetry derives rates from them."""

    tags: int = 0
    batches: int = 0
    coincidences: int = 0
    sifted_bits: int = 0
    # Z-basis sifted bits (all intensity classes): the raw key blocks are cut from.
    raw_key_bits: int = 0
    # X-basis bits of the signal class and their errors: the QBER operators watch.
    sample_bits: int = 0
    sample_errors: int = 0
    multi_clicks: int = 0
    dropped_batches: int = 0
    rejected_batches: int = 0
    locked: bool = False
    lock_attempts: int = 0
    offset_ps: float = 0.0
    drift_ppm: float = 0.0
    # The clock relation as first found, before tracking refined it.
    lock_offset_ps: float = 0.0
    lock_drift_ppm: float = 0.0
    # BB84 at Alice: pulses sent and detections, per intensity class.
    pulses: list[int] = field(default_factory=lambda: [0] * N_CLASSES)
    detections: list[int] = field(default_factory=lambda: [0] * N_CLASSES)

    @property
    def qber(self) -> float | None:
        return self.sample_errors / self.sample_bits if self.sample_bits else None

    def gain(self, cls: IntensityClass) -> float | None:
        n = self.pulses[cls]
        return self.detections[cls] / n if n else None


@dataclass(slots=True)
class SiftedBatch:
    """One batch's raw key: Z-basis bits, each with its intensity class.

    At Alice it also carries the batch's X-basis (test basis) counts per
    class, ``n_x`` detections and ``m_x`` errors, for the block's estimate.
    """

    seq: int
    bits: npt.NDArray[np.uint8]
    cls: npt.NDArray[np.uint8]
    n_x: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(3, np.int64))
    m_x: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(3, np.int64))


# Decoy BB84 key classes (signal, decoy, vacuum); SYNC pulses are public.
KEY_CLASSES = 3
# A clock model carried over (a restart, a new session) may be off by whole
# pulse periods, which slot matching cannot see: the bits just go random.
# Alice's vacuum pulses can: at the right alignment only dark counts land
# on them.  Detections needed for the check, and the shifts tried.
SLOT_CHECK_MIN = 2000
SLOT_CHECK_SHIFTS = 3


@dataclass(slots=True)
class _Pending:
    bits: npt.NDArray[np.uint8]
    cls: npt.NDArray[np.uint8]
    x_basis: npt.NDArray[np.bool_]


class AliceEngine:
    """Alice's side: lock, match, sift, estimate the QBER."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        laser: Laser | None = None,
        stats: SiftStats | None = None,
    ) -> None:
        self.cfg = config
        self.protocol = config.node.protocol
        if self.protocol == "bb84" and laser is None:
            raise ValueError("BB84 Alice needs a laser device")
        self.laser = laser
        self.stats = stats or SiftStats()
        self.clock: ClockModel | None = None
        # Check the model's slot alignment on the next batch (BB84, see SLOT_CHECK_MIN).
        self.slot_check_due = False
        # Bob's time base the clock model maps from (his TAGS carry it): a
        # changed one means his tagger restarted, and the model is void.
        self.peer_epoch: int | None = None
        self._pending: dict[int, _Pending] = {}
        # Raw key of batches whose sifting completed, in seq order, until a block takes it.
        self.sifted: dict[int, SiftedBatch] = {}
        # Lock accumulation: Bob's tags so far, and the Bob-frame span they cover.
        self._lock_t: list[npt.NDArray[np.int64]] = []
        self._lock_span: tuple[int, int] | None = None
        # BBM92: Alice's own tag batches, oldest first.
        self._own: deque[TagBatch] = deque()
        self.own_stop_ps = 0

    # -- Alice's own tags (BBM92) ------------------------------------------------
    def add_own_batch(self, batch: TagBatch) -> None:
        self._own.append(batch)
        self.own_stop_ps = batch.stop_ps
        self.stats.tags += len(batch)

    def needed_until(self, stop_b: int) -> int:
        """Alice-frame time her own tags must reach before Bob's batch can be handled."""
        t = self.cfg.timing
        if self.clock is None:
            return stop_b + t.max_offset_ps
        return self.clock.alice_interval(stop_b, stop_b)[1] + t.coincidence_window_ps

    def _own_between(
        self, start: int, stop: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
        ts = [b.timestamps_ps for b in self._own if b.stop_ps > start and b.start_ps < stop]
        chs = [b.channels for b in self._own if b.stop_ps > start and b.start_ps < stop]
        if not ts:
            return np.empty(0, np.int64), np.empty(0, np.uint8)
        t = np.concatenate(ts)
        c = np.concatenate(chs)
        lo, hi = np.searchsorted(t, [start, stop])
        return t[lo:hi], c[lo:hi]

    def trim_own(self, before: int) -> None:
        """Drop Alice's own batches (BBM92) that end before ``before``: no batch of
        Bob's still to come can need them."""
        while self._own and self._own[0].stop_ps < before:
            self._own.popleft()

    # -- lock --------------------------------------------------------------------
    def _reference_times(self, start: int, stop: int) -> npt.NDArray[np.int64]:
        """Alice's timing reference over an Alice-frame interval."""
        if self.protocol == "bb84":
            assert self.laser is not None
            period = self.laser.period_ps
            first = max(0, start // period)
            last = max(first, stop // period + 1)
            return self.laser.sync_slots(first, last - first) * np.int64(period)
        return self._own_between(start, stop)[0]

    def _try_lock(self, start_b: int, stop_b: int, t_b: npt.NDArray[np.int64]) -> bool:
        t = self.cfg.timing
        self._lock_t.append(t_b)
        span0 = start_b if self._lock_span is None else self._lock_span[0]
        self._lock_span = (span0, stop_b)
        bob = np.concatenate(self._lock_t)
        if bob.shape[0] < t.lock_min_events:
            return False
        if bob.shape[0] > t.lock_max_events:
            bob = np.ascontiguousarray(bob[:: -(-bob.shape[0] // t.lock_max_events)])
        ref = self._reference_times(span0 - t.max_offset_ps, stop_b + t.max_offset_ps)
        if ref.shape[0] < 2:
            if stop_b - span0 > t.lock_max_duration_ps:
                # Nothing to lock on (BB84: no sync pattern from the source): start
                # over rather than hold Bob's tags without bound, and say why.
                self._lock_t.clear()
                self._lock_span = None
                raise kernel.LockError(
                    f"no reference to lock on in {(stop_b - span0) / 1e12:.1f} s of the "
                    "peer's tags (BB84: the source sent no sync pattern)"
                )
            return False
        self.stats.lock_attempts += 1
        try:
            clock = lock(
                ref,
                bob,
                max_offset_ps=t.max_offset_ps,
                resolution_ps=t.resolution_ps,
                min_snr=t.lock_min_snr,
            )
        except kernel.LockError:
            if stop_b - span0 > t.lock_max_duration_ps:
                # Start over rather than grow without bound; the caller alarms.
                self._lock_t.clear()
                self._lock_span = None
                raise
            return False
        self.clock = clock
        self.stats.locked = True
        self.stats.lock_offset_ps = clock.offset_ps
        self.stats.lock_drift_ppm = clock.drift_ppm
        self._lock_t.clear()
        self._lock_span = None
        return True

    def unlock(self) -> None:
        """Forget the clock relation (peer restarted, or an operator asked)."""
        self.clock = None
        self.stats.locked = False
        self.new_session()

    def clock_state(self) -> dict[str, float | int] | None:
        """The clock model and the time base of Bob's it maps from (public figures)."""
        if self.clock is None or self.peer_epoch is None:
            return None
        return {
            "peer_epoch": self.peer_epoch,
            "offset_ps": self.clock.offset_ps,
            "drift": self.clock.drift,
        }

    def restore_clock(self, doc: Mapping[str, Any]) -> None:
        """Take a saved :meth:`clock_state` back: valid while Bob's time base is the same
        (his TAGS say; a new one voids it), so a restarted Alice need not re-lock."""
        try:
            epoch = int(doc["peer_epoch"])
            clock = ClockModel(offset_ps=float(doc["offset_ps"]), drift=float(doc["drift"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"saved clock state is malformed: {exc!r}") from None
        self.clock, self.peer_epoch = clock, epoch
        self.slot_check_due = True
        self.stats.locked = True
        self.stats.lock_offset_ps = clock.offset_ps
        self.stats.lock_drift_ppm = clock.drift_ppm

    def new_session(self) -> None:
        """A new peer session: batches and raw key of the old one are void (Bob
        forgets his), the clock model stays while Bob's time base does."""
        self._lock_t.clear()
        self._lock_span = None
        self._pending.clear()
        self.sifted.clear()
        self.slot_check_due = self.clock is not None

    # -- per batch ---------------------------------------------------------------
    def skip_reply(self, seq: int) -> Message:
        """SIFT reply for a batch Alice could not handle: no key, counted as dropped."""
        self.stats.dropped_batches += 1
        reply = self.locking_reply(seq)
        reply["locked"] = i64(int(self.clock is not None))
        # Not sifted: Bob must not answer it with a QBER sample Alice never asked for.
        reply["skipped"] = i64(1)
        return reply

    @staticmethod
    def locking_reply(seq: int) -> Message:
        """SIFT reply for a batch that went into the clock lock, not into key."""
        return {
            "seq": i64(seq),
            "locked": i64(0),
            "matched": i64(0),
            "keep": np.empty(0, np.int64),
            "cls": np.empty(0, np.uint8),
        }

    def on_tags(self, msg: Mapping[str, npt.NDArray[Any]]) -> Message:
        """Handle Bob's TAGS; return the SIFT reply."""
        seq = scalar(msg, "seq")
        start_b, stop_b = scalar(msg, "start_ps"), scalar(msg, "stop_ps")
        t_b = field_of(msg, "t", np.int64)
        basis_b = field_of(msg, "basis", np.uint8)
        if basis_b.shape != t_b.shape:
            raise ProtocolError(f"batch {seq}: {t_b.shape[0]} tags but {basis_b.shape[0]} bases")
        if stop_b < start_b:
            raise ProtocolError(f"batch {seq}: stop_ps {stop_b} before start_ps {start_b}")
        if t_b.shape[0] > 1 and bool(np.any(np.diff(t_b) < 0)):
            raise ProtocolError(f"batch {seq}: tag times are not ascending")
        epoch = scalar(msg, "epoch")
        if epoch != self.peer_epoch:
            if self.clock is not None:
                log.info("peer time base changed, locking afresh", batch=seq)
            self.unlock()
            self.peer_epoch = epoch
        self.stats.tags += int(t_b.shape[0])
        if self.clock is None:
            # Batches spent on locking yield no key, even the one that locks.
            locked_now = self._try_lock(start_b, stop_b, t_b)
            if self.protocol == "bbm92" and not locked_now and self._lock_span is not None:
                self.trim_own(self._lock_span[0] - 2 * self.cfg.timing.max_offset_ps)
            return self.locking_reply(seq)
        matched_before = self.stats.coincidences
        if self.protocol == "bb84":
            keep, bits, cls = self._match_bb84(start_b, stop_b, t_b, basis_b)
        else:
            keep, bits = self._match_bbm92(start_b, stop_b, t_b, basis_b)
            cls = np.zeros(keep.shape[0], np.uint8)  # one class: the pair source
        self.stats.batches += 1
        self.stats.offset_ps = self.clock.offset_ps
        self.stats.drift_ppm = self.clock.drift_ppm
        self.stats.sifted_bits += int(keep.shape[0])
        self._pending[seq] = _Pending(bits=bits, cls=cls, x_basis=basis_b[keep] == 1)
        while len(self._pending) > 4 * self.cfg.sifting.max_batches_in_flight:
            self._pending.pop(next(iter(self._pending)))
            self.stats.dropped_batches += 1
        matched = self.stats.coincidences - matched_before
        return {
            "seq": i64(seq),
            "locked": i64(1),
            "matched": i64(matched),
            "keep": keep,
            "cls": cls,
        }

    def _match_bb84(
        self,
        start_b: int,
        stop_b: int,
        t_b: npt.NDArray[np.int64],
        basis_b: npt.NDArray[np.uint8],
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
        assert self.laser is not None and self.clock is not None
        period = self.laser.period_ps
        t_a = self.clock.to_alice(t_b)
        slots, in_window, residual = kernel.assign_slots(
            t_a,
            t0_ps=0,
            period_ps=float(period),
            window_ps=self.cfg.timing.coincidence_window_ps,
            track_gain=self.cfg.timing.track_gain,
        )
        a0, a1 = self.clock.alice_interval(start_b, stop_b)
        first, last = -(-a0 // period), -(-a1 // period)
        counts = self.laser.count_classes(first, max(0, last - first))
        for cls in range(N_CLASSES):
            self.stats.pulses[cls] += int(counts[cls])
        inw = np.flatnonzero(in_window).astype(np.int64)
        det_slots = slots[inw]
        if self.slot_check_due and det_slots.shape[0] >= SLOT_CHECK_MIN:
            self.slot_check_due = False
            shift = self._slot_slip(det_slots)
            if shift:
                # t_a = (t_b - offset) / (1 + drift): moving Bob's tags ``shift``
                # slots later in Alice's frame moves the offset the other way.
                self.clock.offset_ps -= shift * period * (1.0 + self.clock.drift)
                log.warning("clock model was off by whole pulse periods; corrected", slots=shift)
                return self._match_bb84(start_b, stop_b, t_b, basis_b)
        # Two clicks in one slot (multi-photon or a dark count) carry no
        # reliable bit: count them, keep neither (a squashing choice).
        uniq, first_idx, n_in_slot = np.unique(det_slots, return_index=True, return_counts=True)
        single = inw[first_idx[n_in_slot == 1]]
        self.stats.multi_clicks += int(np.count_nonzero(n_in_slot > 1))
        choices = self.laser.choices_at(uniq)
        for cls in range(N_CLASSES):
            self.stats.detections[cls] += int(np.count_nonzero(choices.intensity == cls))
        self.stats.coincidences += int(uniq.shape[0])
        single_mask = n_in_slot == 1
        basis_a = choices.basis[single_mask]
        intensity = choices.intensity[single_mask]
        # Every class but the public sync pattern: decoy and vacuum detections
        # are what bound the single-photon yield; their Z bits are key as well.
        keep_mask = (basis_a == basis_b[single]) & (intensity < KEY_CLASSES)
        self.clock.update(float(residual), float(stop_b - start_b), float(a1))
        return (
            single[keep_mask],
            choices.bit[single_mask][keep_mask],
            intensity[keep_mask].astype(np.uint8),
        )

    def _slot_slip(self, det_slots: npt.NDArray[np.int64]) -> int:
        """The whole-slot shift that puts the fewest detections on vacuum pulses,
        if it is clearly better than none (else 0)."""
        assert self.laser is not None
        vacuum = {
            k: float(
                np.mean(self.laser.choices_at(det_slots + k).intensity == IntensityClass.VACUUM)
            )
            for k in range(-SLOT_CHECK_SHIFTS, SLOT_CHECK_SHIFTS + 1)
        }
        best = min(vacuum, key=vacuum.__getitem__)
        # Aligned, vacuum pulses see dark counts only; off by a slot, they see
        # their share of all detections (p_vacuum, 0.15 in the demo).
        return best if best != 0 and vacuum[0] > 3 * vacuum[best] + 0.01 else 0

    def _match_bbm92(
        self,
        start_b: int,
        stop_b: int,
        t_b: npt.NDArray[np.int64],
        basis_b: npt.NDArray[np.uint8],
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
        assert self.clock is not None
        a0, a1 = self.clock.alice_interval(start_b, stop_b)
        t_own, ch_own = self._own_between(a0, a1)
        ia, ib, residual = kernel.coincidences_tracked(
            t_own,
            self.clock.to_alice(t_b),
            window_ps=self.cfg.timing.coincidence_window_ps,
            offset_ps=0,
            track_gain=self.cfg.timing.track_gain,
        )
        self.trim_own(a0 - self.cfg.timing.coincidence_window_ps)
        self.stats.coincidences += int(ia.shape[0])
        keep_mask = (ch_own[ia] >> 1) == basis_b[ib]
        if ia.shape[0]:
            self.clock.update(float(residual), float(stop_b - start_b), float(a1))
        return ib[keep_mask], (ch_own[ia][keep_mask] & 1).astype(np.uint8)

    def on_sample(self, msg: Mapping[str, npt.NDArray[Any]]) -> Message:
        """Handle Bob's QBER_SAMPLE (his X-basis bits); return QBER_RESULT."""
        seq = scalar(msg, "seq")
        bob_bits = field_of(msg, "bits", np.uint8)
        pending = self._pending.pop(seq, None)
        if pending is None:
            raise ProtocolError(f"QBER sample for batch {seq}, which is not pending")
        x = pending.x_basis
        n_sample = int(np.count_nonzero(x))
        if bob_bits.shape != (n_sample,):
            raise ProtocolError(
                f"batch {seq}: {bob_bits.shape[0]} X-basis bits, expected {n_sample}"
            )
        x_cls = pending.cls[x]
        wrong = pending.bits[x] != bob_bits
        n_x = np.bincount(x_cls, minlength=KEY_CLASSES)[:KEY_CLASSES].astype(np.int64)
        m_x = np.bincount(x_cls[wrong], minlength=KEY_CLASSES)[:KEY_CLASSES].astype(np.int64)
        self.stats.sample_bits += int(n_x[IntensityClass.SIGNAL])
        self.stats.sample_errors += int(m_x[IntensityClass.SIGNAL])
        z = ~x
        batch = SiftedBatch(seq, pending.bits[z], pending.cls[z], n_x=n_x, m_x=m_x)
        self.stats.raw_key_bits += int(batch.bits.shape[0])
        self.sifted[seq] = batch
        return {"seq": i64(seq), "errors": m_x, "n": n_x}


class BobEngine:
    """Bob's side: announce detections and bases, follow Alice's sifting."""

    def __init__(self, config: NodeConfig, *, stats: SiftStats | None = None) -> None:
        self.cfg = config
        self.stats = stats or SiftStats()
        self._pending: dict[int, npt.NDArray[np.uint8]] = {}
        self.sifted: dict[int, SiftedBatch] = {}
        # Names this node's time base: the node draws a new one whenever its
        # tagger stream (re)opens, since a restarted tagger may restart its clock.
        self.epoch = 0

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def on_batch(self, batch: TagBatch) -> Message:
        """A tagger batch becomes a TAGS message; the bits stay here."""
        self.stats.tags += len(batch)
        self._pending[batch.seq] = batch.channels
        return {
            "seq": i64(batch.seq),
            "start_ps": i64(batch.start_ps),
            "stop_ps": i64(batch.stop_ps),
            "epoch": i64(self.epoch),
            "t": batch.timestamps_ps,
            "basis": (batch.channels >> 1).astype(np.uint8),
        }

    def forget(self, *, lost: bool = True) -> int:
        """Drop batches awaiting replies and unblocked raw key; returns how many batches.

        ``lost`` counts them as dropped (the link failed); after an orderly
        goodbye they were simply not finished, and yield no key either way.
        """
        n = len(self._pending)
        self._pending.clear()
        self.sifted.clear()
        return n if lost else 0

    def on_sift(self, msg: Mapping[str, npt.NDArray[Any]]) -> Message | None:
        """Handle SIFT; return the QBER_SAMPLE message, or None while Alice locks."""
        seq = scalar(msg, "seq")
        channels = self._pending.pop(seq, None)
        if channels is None:
            raise ProtocolError(f"SIFT for batch {seq}, which is not pending")
        locked = scalar(msg, "locked") == 1
        self.stats.locked = locked
        if not locked or ("skipped" in msg and scalar(msg, "skipped") == 1):
            return None  # no key from this batch (Alice locking, or she skipped it)
        keep = field_of(msg, "keep", np.int64)
        cls = field_of(msg, "cls", np.uint8)
        if cls.shape != keep.shape:
            raise ProtocolError(
                f"SIFT for batch {seq}: {cls.shape[0]} classes, {keep.shape[0]} kept"
            )
        if keep.shape[0] and (keep.min() < 0 or keep.max() >= channels.shape[0]):
            raise ProtocolError(f"SIFT for batch {seq} keeps detections outside the batch")
        if cls.shape[0] and int(cls.max()) >= KEY_CLASSES:
            raise ProtocolError(f"SIFT for batch {seq}: intensity class out of range")
        kept = channels[keep]
        bits = (kept & 1).astype(np.uint8)
        x = (kept >> 1) == 1
        self.stats.batches += 1
        self.stats.coincidences += scalar(msg, "matched")
        self.stats.sifted_bits += int(keep.shape[0])
        z = ~x
        batch = SiftedBatch(seq, bits[z], cls[z])
        self.stats.raw_key_bits += int(batch.bits.shape[0])
        self.sifted[seq] = batch
        return {"seq": i64(seq), "bits": np.ascontiguousarray(bits[x])}

    def on_result(self, msg: Mapping[str, npt.NDArray[Any]]) -> None:
        errors = field_of(msg, "errors", np.int64)
        n = field_of(msg, "n", np.int64)
        if errors.shape != (KEY_CLASSES,) or n.shape != (KEY_CLASSES,):
            raise ProtocolError("QBER_RESULT must carry one error and one count per class")
        self.stats.sample_errors += int(errors[IntensityClass.SIGNAL])
        self.stats.sample_bits += int(n[IntensityClass.SIGNAL])
