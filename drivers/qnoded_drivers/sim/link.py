"""The physics of a simulated QKD link, shared by the simulated drivers of one node.

Alice and Bob run in separate processes.  Each builds a :class:`SimulatedLink`
from the same ``[simulation]`` table, and shared *seeds* play the fibre:

- ``alice_qrng_seed`` drives Alice's choices (basis, bit, intensity class) for
  every pulse slot, and the hidden bits of every entangled pair, through a
  counter-based hash, so any slot can be evaluated on its own;
- ``link_seed`` drives the public parts (sync pattern, pair emission times,
  which pulses Eve intercepts and how) and, with the node's role, each node's
  local noise (Bob's passive basis choice, dark counts, jitter, afterpulses).

Bob's process derives the photons that reach his detectors from those seeds;
his node code sees only detector clicks.  Give Bob another
``alice_qrng_seed`` and his clicks no longer carry Alice's bits (~50 % QBER),
while timing, which is public (``link_seed``), still locks.

Model (Ma et al., PRA 72, 012326, 2005): channel transmittance
``eta_ch = 10^(-alpha*L/10)``, ``eta = eta_ch * eta_det``; a pulse of mean
photon number ``mu`` gives a Poisson(``eta*mu``) number of detected photons.
Bob chooses his basis passively (50/50 beamsplitter) per photon; each detected
photon ends in the detector of its basis and bit (Alice's bit when the bases
agree, flipped with probability ``misalignment``; random otherwise).  Dark
counts, afterpulses, dead time, timing jitter and Bob's clock (offset, ppm
drift) follow each detector's own parameters.

Cost grows with detections, not pulse slots: candidate slots are drawn with
geometric gaps at the click probability of the brightest class and thinned to
each slot's own class (an exact per-slot Bernoulli), so 1 GHz sources work.

Clocks: Alice's is the reference.  Slot ``k`` leaves Alice at ``k*period_ps``;
a photon reaches Bob ``flight_ps = L*n/c`` later; Bob's tagger reads
``offset + (1 + drift) * t_true``.

Sync schedule (qubit-based synchronisation, Calderaro et al. 2020): the laser's
mode is not visible in Bob's process, so the schedule is part of the shared
config.  During true time ``[0, sync_duration_ps)`` (by emission time, i.e.
slots ``k < ceil(sync_duration_ps / period_ps)``) the source emits the public
sync pattern: slot ``k`` is bright (class SYNC, mean photon number
``mu_signal``, basis Z, bit from Alice's QRNG) iff
``hash(link_seed, SYNC, k) < sync_density``, vacuum otherwise.  From
``sync_duration_ps`` on it emits the decoy-state BB84 stream.  With
``sync_period_ps`` > 0 the sync window comes back every period (true time
``[j*period, j*period + duration)``), so a node that drops its lock (an
operator's recalibration, a restarted tagger) locks again at the next
window, as a real source would after Alice puts it back into SYNC mode.
Alice records every slot of a window as class SYNC, bright or dark: the pattern
is public, so Eve knows which slots are dark, and a vacuum pulse she can tell
apart is no decoy (the decoy-state bound needs classes she cannot see).  So no
slot of a window is sifted or counted by the estimator.

Gated detectors (BB84 only: the gates follow the pulse slots) have
``dark_count_rate_hz * period`` dark-click probability per gate, i.e. the
configured rate is what the detector shows when gated at the pulse rate; their
dark clicks and afterpulses fall at gate times.  Under BBM92 there are no gates
and every detector runs free.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from qnoded.contracts import IntensityClass

C_M_PER_S = 299_792_458.0
I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]
U64 = npt.NDArray[np.uint64]
F64 = npt.NDArray[np.float64]

# Stream identifiers for the counter-based hash: one per independent use.
_CHOICE, _SYNC, _EVE = 1, 2, 3
_M = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
CHUNK = 1 << 22  # slots per vectorised step: bounds memory for long ranges
JITTER_CLIP = 10.0  # gaussian jitter is cut at this many sigma (never reached in practice)


def _mix_int(z: int) -> int:
    """The SplitMix64 output function on a Python int (for keys)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M
    return z ^ (z >> 31)


def _mix(z: U64) -> U64:
    """The SplitMix64 output function (Steele et al. 2014), vectorised, in place."""
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def stream_key(seed: int, stream: int) -> int:
    """A 64-bit key per (seed, stream)."""
    return _mix_int((_mix_int((seed + _GAMMA) & _M) ^ stream) + _GAMMA & _M)


def hash_bits(seed: int, stream: int, index: I64) -> U64:
    """64 random bits per index, a pure function of (seed, stream, index).

    It is SplitMix64's ``index + 1``-th output from state ``stream_key``: a
    counter-based generator, so any index is evaluated on its own.
    """
    key = np.uint64(stream_key(seed, stream))
    with np.errstate(over="ignore"):
        z = np.asarray(index).astype(np.uint64) * np.uint64(_GAMMA)
        z += key
        z += np.uint64(_GAMMA)
        return _mix(z)


def hash_uniform(seed: int, stream: int, index: I64) -> F64:
    """Uniform floats in [0, 1) from the top 53 hash bits."""
    return (hash_bits(seed, stream, index) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _threshold(p: float) -> int | None:
    """``h < threshold`` has probability ``p`` for uniform 64-bit ``h``; None for p >= 1."""
    return None if p >= 1.0 else min(_M, int(p * 2.0**64))


def _below(h: U64, thr: int | None) -> npt.NDArray[np.bool_]:
    if thr is None:
        return np.ones(h.shape, dtype=bool)
    return h < np.uint64(thr)


@dataclass(frozen=True, slots=True)
class LinkParams:
    """The ``[simulation]`` table, validated.  Units are in the names.

    Integer keys accept integral floats (TOML ``1e10``).
    """

    link_seed: int = 1
    alice_qrng_seed: int = 2
    distance_km: float = 25.0
    attenuation_db_per_km: float = 0.2
    fibre_index: float = 1.468
    pulse_rate_hz: float = 1e8
    mu_signal: float = 0.5
    mu_decoy: float = 0.1
    p_signal: float = 0.8
    p_decoy: float = 0.1
    sync_density: float = 1e-3
    sync_duration_ps: int = 1_000_000_000_000
    sync_period_ps: int = 0  # 0: one sync window, at the start
    misalignment: float = 0.01
    eve_fraction: float = 0.0
    bob_clock_offset_ps: int = 0
    bob_clock_drift_ppm: float = 0.0
    pair_rate_hz: float = 1e6
    alice_local_efficiency: float = 1.0
    batch_duration_ps: int = 10_000_000_000
    realtime: bool = False

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any] | None) -> LinkParams:
        """Build from a config table; an unknown key or a bad value raises
        ``ValueError`` naming the key."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in dict(table or {}).items():
            if key not in fields:
                raise ValueError(
                    f"[simulation] {key}: unknown key (valid: {', '.join(sorted(fields))})"
                )
            default = fields[key].default
            number = isinstance(raw, int | float) and not isinstance(raw, bool)
            value: Any = raw
            if isinstance(default, bool):
                ok = isinstance(raw, bool)
            elif isinstance(default, int):
                ok = number and math.isfinite(raw) and float(raw).is_integer()
                value = int(raw) if ok else raw
            else:
                ok = number and math.isfinite(raw)
                value = float(raw) if ok else raw
            if not ok:
                raise ValueError(
                    f"[simulation] {key}: expected a finite {type(default).__name__}, got {raw!r}"
                )
            values[key] = value
        p = cls(**values)
        p.validate()
        return p

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first key out of range."""
        checks = [
            ("link_seed", 0 <= self.link_seed <= _M),
            ("alice_qrng_seed", 0 <= self.alice_qrng_seed <= _M),
            ("distance_km", 0 <= self.distance_km <= 1e5),
            ("attenuation_db_per_km", self.attenuation_db_per_km >= 0),
            ("fibre_index", 1.0 <= self.fibre_index <= 5.0),
            ("pulse_rate_hz", 1e3 <= self.pulse_rate_hz <= 1e10),
            ("mu_signal", 0 < self.mu_signal <= 100),
            ("mu_decoy", 0 <= self.mu_decoy < self.mu_signal),
            ("p_signal", 0 < self.p_signal <= 1),
            ("p_decoy", 0 <= self.p_decoy <= 1 and self.p_signal + self.p_decoy <= 1 + 1e-12),
            ("sync_density", 0 < self.sync_density <= 1),
            ("sync_duration_ps", self.sync_duration_ps >= 0),
            (
                "sync_period_ps",
                self.sync_period_ps == 0 or self.sync_period_ps > self.sync_duration_ps,
            ),
            ("misalignment", 0 <= self.misalignment <= 0.5),
            ("eve_fraction", 0 <= self.eve_fraction <= 1),
            ("bob_clock_offset_ps", abs(self.bob_clock_offset_ps) <= 10**15),
            ("bob_clock_drift_ppm", abs(self.bob_clock_drift_ppm) <= 1000),
            ("pair_rate_hz", 0 < self.pair_rate_hz <= 1e9),
            ("alice_local_efficiency", 0 < self.alice_local_efficiency <= 1),
            ("batch_duration_ps", 1_000_000 <= self.batch_duration_ps <= 10**13),
        ]
        for key, ok in checks:
            if not ok:
                raise ValueError(f"[simulation] {key}: value {getattr(self, key)!r} out of range")

    @property
    def period_ps(self) -> int:
        """Slot period, ``1e12 / pulse_rate_hz`` rounded to the picosecond.

        The true pulse rate is then ``1e12 / period_ps`` (what the laser reports).
        """
        return round(1e12 / self.pulse_rate_hz)

    @property
    def transmittance(self) -> float:
        """Fibre transmittance ``10^(-alpha L / 10)``."""
        return float(10 ** (-self.attenuation_db_per_km * self.distance_km / 10))

    @property
    def flight_ps(self) -> int:
        """Time of flight ``L n / c``."""
        return round(self.distance_km * 1e3 * self.fibre_index / C_M_PER_S * 1e12)

    @property
    def drift(self) -> float:
        return self.bob_clock_drift_ppm * 1e-6

    @property
    def sync_end_slot(self) -> int:
        """Slots per sync window: the first ``sync_end_slot`` of each carry the pattern."""
        return -(-self.sync_duration_ps // self.period_ps)

    @property
    def sync_period_slots(self) -> int:
        """Slots from one sync window to the next (0: a single window at the start)."""
        return -(-self.sync_period_ps // self.period_ps) if self.sync_period_ps else 0

    def in_sync(self, slots: I64) -> npt.NDArray[np.bool_]:
        """Which slots fall in a sync window."""
        if self.sync_period_slots:
            return np.mod(slots, self.sync_period_slots) < self.sync_end_slot
        return slots < self.sync_end_slot

    def sync_ranges(self, first: int, last: int) -> list[tuple[int, int]]:
        """The parts of slots ``[first, last)`` inside sync windows, ascending."""
        end, period = self.sync_end_slot, self.sync_period_slots
        if not period:
            return [(first, min(last, end))] if first < min(last, end) else []
        out = []
        for j in range(first // period, -(-last // period) + 1):
            lo, hi = max(first, j * period), min(last, j * period + end)
            if lo < hi:
                out.append((lo, hi))
        return out


class EmissionSource(Protocol):
    """Alice's pulses from elsewhere than the seeds: what an instrument played
    (``hil/modulator_feed.py`` follows the modulator emulator), for Bob's side."""

    @property
    def mu_max(self) -> float:
        """The brightest mean photon number any slot may carry."""
        ...

    def emitted(self, slots: I64) -> tuple[U8, U8, U8, F64]:
        """Basis, bit, intensity class and mean photon number of each slot."""
        ...


@dataclass(frozen=True, slots=True)
class DetectorPhysics:
    """What the link needs to know of one detector (a snapshot per chunk)."""

    channel: int
    efficiency: float
    dark_count_rate_hz: float
    dead_time_ps: int
    afterpulse_probability: float
    afterpulse_decay_ps: int
    jitter_ps: float
    gated: bool
    latched: bool = False


@dataclass(slots=True)
class Clicks:
    """Clicks of one generation step: true times (ps) and channels."""

    t: I64
    ch: U8


def _empty() -> Clicks:
    return Clicks(np.empty(0, np.int64), np.empty(0, np.uint8))


class SimulatedLink:
    """Alice's choices and the clicks each node's detectors see.

    ``clicks`` is called for consecutive true-time chunks; the link keeps
    per-channel state between chunks (last click for dead time, afterpulses
    that fall in a later chunk).  ``reset`` forgets it.
    """

    def __init__(self, params: LinkParams, protocol: str, role: str) -> None:
        if protocol not in ("bb84", "bbm92"):
            raise ValueError(f"protocol {protocol!r}: the simulation knows bb84 and bbm92")
        if role not in ("alice", "bob"):
            raise ValueError(f"role {role!r}: expected 'alice' or 'bob'")
        self.p = params
        self.protocol = protocol
        self.role = role
        self._mu = np.array([params.mu_signal, params.mu_decoy, 0.0, params.mu_signal])
        self._thr_signal = _threshold(params.p_signal)
        self._thr_decoy = _threshold(params.p_signal + params.p_decoy)
        self._thr_sync = _threshold(params.sync_density)
        self._thr_eve = _threshold(params.eve_fraction)
        # last click per channel (true ps), for dead time across chunks
        self.last_click: dict[int, int] = {}
        # afterpulses that fall after the chunk that made them, per channel
        self._after: dict[int, I64] = {}
        self._pair_cache: dict[int, tuple[I64, U8, U8, I64]] = {}
        # BB84: Alice's pulses from an instrument instead of the seeds (a HIL emulator).
        self.source: EmissionSource | None = None

    def reset(self) -> None:
        """Forget the detector state carried between chunks (a new stream)."""
        self.last_click.clear()
        self._after.clear()

    # -- Alice's choices (pure functions of the seeds and the slot) ----------------
    def choices(self, slots: I64) -> tuple[U8, U8, U8]:
        """Basis, bit and intensity class of each slot, as Alice records them
        (every slot of a sync window is class SYNC)."""
        basis, bit, cls, _ = self._emitted(slots)
        return basis, bit, cls

    def _emitted(self, slots: I64) -> tuple[U8, U8, U8, F64]:
        """Alice's record of each slot, and its mean photon number as emitted."""
        if self.source is not None:
            return self.source.emitted(np.asarray(slots, dtype=np.int64))
        p = self.p
        slots = np.asarray(slots, dtype=np.int64)
        h = hash_bits(p.alice_qrng_seed, _CHOICE, slots)
        basis = (h & np.uint64(1)).astype(np.uint8)
        bit = ((h >> np.uint64(1)) & np.uint64(1)).astype(np.uint8)
        # classes from the high bits: SIGNAL below p_signal, DECOY below p_s + p_d
        intensity = (~_below(h, self._thr_signal)).astype(np.uint8)
        intensity += ~_below(h, self._thr_decoy)
        mu = self._mu[intensity]
        in_sync = p.in_sync(slots)
        if np.any(in_sync):
            bright = _below(hash_bits(p.link_seed, _SYNC, slots[in_sync]), self._thr_sync)
            mu[in_sync] = np.where(bright, p.mu_signal, 0.0)
            intensity[in_sync] = IntensityClass.SYNC
            basis[in_sync] = 0
        return basis, bit, intensity, mu

    def count_classes(self, first: int, n: int) -> I64:
        """Exact number of pulses of each class in slots ``[first, first + n)``."""
        p = self.p
        counts = np.zeros(len(IntensityClass), dtype=np.int64)
        last = first + max(0, n)
        at = first
        for s_lo, s_hi in [*p.sync_ranges(first, last), (last, last)]:
            for lo in range(at, s_lo, CHUNK):  # the decoy-state stream
                hi = min(s_lo, lo + CHUNK)
                h = hash_bits(p.alice_qrng_seed, _CHOICE, np.arange(lo, hi, dtype=np.int64))
                n_sig = int(np.count_nonzero(_below(h, self._thr_signal)))
                n_low = int(np.count_nonzero(_below(h, self._thr_decoy)))
                counts[IntensityClass.SIGNAL] += n_sig
                counts[IntensityClass.DECOY] += n_low - n_sig
                counts[IntensityClass.VACUUM] += hi - lo - n_low
            counts[IntensityClass.SYNC] += max(0, s_hi - max(at, s_lo))  # the sync pattern
            at = max(at, s_hi)
        return counts

    def sync_slots(self, first: int, n: int) -> I64:
        """Bright slots of the public sync pattern in ``[first, first + n)``, ascending."""
        p = self.p
        out = [np.empty(0, dtype=np.int64)]
        for s_lo, s_hi in p.sync_ranges(first, first + max(0, n)):
            for lo in range(s_lo, s_hi, CHUNK):  # chunks bound the memory
                slots = np.arange(lo, min(s_hi, lo + CHUNK), dtype=np.int64)
                out.append(slots[_below(hash_bits(p.link_seed, _SYNC, slots), self._thr_sync)])
        return np.concatenate(out)

    def _eve(self, index: I64) -> tuple[npt.NDArray[np.bool_], U8, U8]:
        """Which of these slots/pairs Eve intercepts, her basis and a random bit."""
        h = hash_bits(self.p.link_seed, _EVE, index)
        hit = _below(h, self._thr_eve)
        basis = (h & np.uint64(1)).astype(np.uint8)
        rand = ((h >> np.uint64(1)) & np.uint64(1)).astype(np.uint8)
        return hit, basis, rand

    # -- what reaches one node's detectors ----------------------------------------
    def clicks(
        self, t0: int, t1: int, detectors: Mapping[int, DetectorPhysics], rng: np.random.Generator
    ) -> Clicks:
        """Clicks (true time, channel) in true-time interval ``[t0, t1)``.

        Jitter, dark counts, afterpulses and dead time are applied (dead time
        on the jittered click times, so consecutive clicks of a channel are
        at least ``dead_time_ps`` apart).  Call for consecutive chunks.
        """
        if self.protocol == "bb84":
            if self.role != "bob":
                raise ValueError("in BB84 only Bob's node has detectors")
            photons = self._bb84_photons(t0, t1, detectors, rng)
        else:
            photons = self._bbm92_photons(t0, t1, detectors, rng)
        return self._add_noise(photons, t0, t1, detectors, rng)

    def _slot_range(self, t0: int, t1: int) -> tuple[int, int]:
        """Slots whose photons arrive in true ``[t0, t1)`` (the source starts at 0)."""
        period, flight = self.p.period_ps, self.p.flight_ps
        k0 = max(0, -(-(t0 - flight) // period))
        k1 = max(k0, -(-(t1 - flight) // period))
        return k0, k1

    def _bb84_photons(
        self, t0: int, t1: int, detectors: Mapping[int, DetectorPhysics], rng: np.random.Generator
    ) -> Clicks:
        p = self.p
        k0, k1 = self._slot_range(t0, t1)
        if k1 <= k0 or not detectors:
            return _empty()
        eff_max = max(d.efficiency for d in detectors.values())
        eta = p.transmittance * eff_max
        mu_max = self.source.mu_max if self.source is not None else float(self._mu.max())
        p_max = -math.expm1(-eta * mu_max)
        if p_max <= 0:
            return _empty()
        n_slots = k1 - k0
        # Candidate slots at the brightest class's click probability (geometric
        # gaps), then thinned to each slot's own probability: an exact per-slot
        # Bernoulli at a cost that grows with clicks, not slots.
        expect = n_slots * p_max
        parts = [np.cumsum(rng.geometric(p_max, size=int(expect + 6 * math.sqrt(expect) + 16)))]
        while parts[-1][-1] < n_slots:
            more = rng.geometric(p_max, size=int(0.1 * expect) + 16)
            parts.append(parts[-1][-1] + np.cumsum(more))
        pos = np.concatenate(parts) - 1
        slots = k0 + pos[pos < n_slots].astype(np.int64)
        basis_a, bit_a, _, mu = self._emitted(slots)
        lam = eta * mu
        accept = rng.random(slots.shape[0]) * p_max < -np.expm1(-lam)
        slots, basis_a, bit_a, lam = slots[accept], basis_a[accept], bit_a[accept], lam[accept]
        if p.eve_fraction > 0:
            # Intercept-resend: Eve measures in a random basis and resends what
            # she saw; her result is Alice's bit when her basis matches, else
            # random.  Loss is unchanged (she resends through a lossless line).
            hit, eve_basis, eve_rand = self._eve(slots)
            eve_bit = np.where(eve_basis == basis_a, bit_a, eve_rand)
            basis_a = np.where(hit, eve_basis, basis_a).astype(np.uint8)
            bit_a = np.where(hit, eve_bit, bit_a).astype(np.uint8)
        # Detected photons per slot: zero-truncated Poisson; each photon picks
        # Bob's basis at the beamsplitter on its own.
        n_ph = _zero_truncated_poisson(lam, rng)
        idx = np.repeat(np.arange(slots.shape[0]), n_ph)
        b_basis = rng.integers(0, 2, idx.shape[0]).astype(np.uint8)
        flip = (rng.random(idx.shape[0]) < p.misalignment).astype(np.uint8)
        rand = rng.integers(0, 2, idx.shape[0]).astype(np.uint8)
        b_bit = np.where(b_basis == basis_a[idx], bit_a[idx] ^ flip, rand)
        t = slots[idx] * p.period_ps + p.flight_ps
        photons = Clicks(t, (2 * b_basis + b_bit).astype(np.uint8))
        return self._efficiency_thin(photons, detectors, rng)

    @staticmethod
    def _efficiency_thin(
        photons: Clicks, detectors: Mapping[int, DetectorPhysics], rng: np.random.Generator
    ) -> Clicks:
        """Photons were drawn at the best detector's efficiency; each detector
        keeps its share ``efficiency / max efficiency`` (an exact thinning)."""
        eff = np.zeros(256)
        for ch, d in detectors.items():
            eff[ch] = d.efficiency
        ratio = eff[photons.ch] / max(eff.max(), 1e-300)
        if np.all(ratio == 1.0):
            return photons
        keep = rng.random(photons.t.shape[0]) < ratio
        return Clicks(photons.t[keep], photons.ch[keep])

    def _pair_chunk(self, c: int) -> tuple[I64, U8, U8, I64]:
        """Pairs emitted in true ``[c*d, (c+1)*d)``, ``d = batch_duration_ps``.

        Drawn from ``Philox(key=link_seed, counter=c)`` so both processes get
        the same ones.  |Phi+> is perfectly correlated in Z and in X; a hidden
        bit per basis (from ``alice_qrng_seed`` and the pair id) reproduces
        exactly the Z/X statistics that BBM92 sifting uses (it is a local
        hidden-variable model: no Bell test can be run on it).
        """
        hit = self._pair_cache.get(c)
        if hit is not None:
            return hit
        p = self.p
        d = p.batch_duration_ps
        g = np.random.Generator(np.random.Philox(key=p.link_seed, counter=c))
        n = int(g.poisson(p.pair_rate_hz * d * 1e-12))
        t = np.sort(g.integers(c * d, (c + 1) * d, n, dtype=np.int64))
        ids = c * (1 << 32) + np.arange(n, dtype=np.int64)
        h = hash_bits(p.alice_qrng_seed, _CHOICE, ids)
        out = (
            t,
            (h & np.uint64(1)).astype(np.uint8),
            ((h >> np.uint64(1)) & np.uint64(1)).astype(np.uint8),
            ids,
        )
        if len(self._pair_cache) >= 4:
            self._pair_cache.pop(next(iter(self._pair_cache)))
        self._pair_cache[c] = out
        return out

    def _pairs(self, t0: int, t1: int) -> tuple[I64, U8, U8, I64]:
        """Pairs emitted in true ``[t0, t1)``: times, hidden Z and X bits, ids."""
        d = self.p.batch_duration_ps
        chunks = [self._pair_chunk(c) for c in range(max(0, t0 // d), max(0, -(-t1 // d)))]
        if not chunks:
            e = np.empty(0, np.int64)
            return e, e.astype(np.uint8), e.astype(np.uint8), e
        t, z, x, ids = (np.concatenate(a) for a in zip(*chunks, strict=True))
        m = (t >= t0) & (t < t1)
        return t[m], z[m], x[m], ids[m]

    def _bbm92_photons(
        self, t0: int, t1: int, detectors: Mapping[int, DetectorPhysics], rng: np.random.Generator
    ) -> Clicks:
        p = self.p
        if not detectors:
            return _empty()
        eff_max = max(d.efficiency for d in detectors.values())
        # The source sits at Alice: her photon is detected locally, Bob's
        # crosses the fibre and arrives flight_ps later.
        if self.role == "alice":
            shift, eta = 0, p.alice_local_efficiency * eff_max
        else:
            shift, eta = p.flight_ps, p.transmittance * eff_max
        t, zbit, xbit, ids = self._pairs(t0 - shift, t1 - shift)
        if self.role == "bob" and p.eve_fraction > 0:
            hit, eve_basis, rand = self._eve(ids)
            # Eve measured one basis: that hidden bit survives, the other is random.
            eve_x = eve_basis.astype(bool)
            zbit = np.where(hit & eve_x, rand, zbit).astype(np.uint8)
            xbit = np.where(hit & ~eve_x, rand, xbit).astype(np.uint8)
        seen: npt.NDArray[np.bool_] = rng.random(int(t.shape[0])) < eta
        basis = rng.integers(0, 2, int(np.count_nonzero(seen))).astype(np.uint8)
        bit = np.where(basis == 0, zbit[seen], xbit[seen]).astype(np.uint8)
        if self.role == "bob":
            bit ^= (rng.random(int(bit.shape[0])) < p.misalignment).astype(np.uint8)
        photons = Clicks(t[seen] + shift, (2 * basis + bit).astype(np.uint8))
        return self._efficiency_thin(photons, detectors, rng)

    def _gate(self, t: I64) -> I64:
        """The next gate (photon arrival time of a slot) at or after each time."""
        period, flight = self.p.period_ps, self.p.flight_ps
        return -(-(t - flight) // period) * period + flight

    def _add_noise(
        self,
        photons: Clicks,
        t0: int,
        t1: int,
        detectors: Mapping[int, DetectorPhysics],
        rng: np.random.Generator,
    ) -> Clicks:
        p = self.p
        times: list[I64] = []
        chans: list[U8] = []
        for ch, det in sorted(detectors.items()):
            if det.latched:
                # A latched detector is blind: no photon, dark or after clicks.
                self._after.pop(ch, None)
                continue
            gated = det.gated and self.protocol == "bb84"
            if gated:
                k0, k1 = self._slot_range(t0, t1)
                n_dark = rng.poisson(det.dark_count_rate_hz * p.period_ps * 1e-12 * (k1 - k0))
                dark = rng.integers(k0, max(k1, k0 + 1), n_dark) * p.period_ps + p.flight_ps
            else:
                n_dark = rng.poisson(det.dark_count_rate_hz * (t1 - t0) * 1e-12)
                dark = rng.integers(t0, t1, n_dark, dtype=np.int64)
            raw = np.concatenate([photons.t[photons.ch == ch], dark])
            raw = raw + _jitter(det.jitter_ps, raw.shape[0], rng)
            carried = self._after.pop(ch, np.empty(0, np.int64))
            later = carried[carried >= t1]
            t_ch = np.sort(np.concatenate([raw, carried[carried < t1]]))
            prev = self.last_click.get(ch)
            if prev is not None:
                t_ch = t_ch[t_ch >= prev + det.dead_time_ps]
            t_ch = _dead_filter(t_ch, det.dead_time_ps)
            if det.afterpulse_probability > 0:
                t_ch, more = self._afterpulses(
                    t_ch, t1=t1, det=det, gated=gated, prev=prev, rng=rng
                )
                later = np.concatenate([later, more])
            if later.shape[0]:
                self._after[ch] = np.sort(later)
            if t_ch.shape[0]:
                self.last_click[ch] = int(t_ch[-1])
            times.append(t_ch)
            chans.append(np.full(t_ch.shape[0], ch, dtype=np.uint8))
        return _merge(times, chans)

    def _afterpulses(
        self,
        t_ch: I64,
        *,
        t1: int,
        det: DetectorPhysics,
        gated: bool,
        prev: int | None,
        rng: np.random.Generator,
    ) -> tuple[I64, I64]:
        """Add afterpulses: after each click, with probability
        ``afterpulse_probability``, another one ``dead_time + Exp(decay)``
        later (at the next gate if gated); afterpulses make afterpulses too.
        Returns the clicks of this chunk and the afterpulses beyond ``t1``."""
        later: list[I64] = []
        parents = t_ch
        for _ in range(64):  # a cascade dies out geometrically
            src = parents[rng.random(parents.shape[0]) < det.afterpulse_probability]
            if not src.shape[0]:
                break
            delay = rng.exponential(max(det.afterpulse_decay_ps, 1), src.shape[0])
            ap = src + det.dead_time_ps + delay.astype(np.int64)
            if gated:
                ap = self._gate(ap) + _jitter(det.jitter_ps, ap.shape[0], rng)
            later.append(ap[ap >= t1])
            ap = ap[ap < t1]
            if not ap.shape[0]:
                break
            merged = np.sort(np.concatenate([t_ch, ap]))
            if prev is not None:
                merged = merged[merged >= prev + det.dead_time_ps]
            t_ch = _dead_filter(merged, det.dead_time_ps)
            parents = ap[np.isin(ap, t_ch)]
        return t_ch, (np.concatenate(later) if later else np.empty(0, np.int64))


def _jitter(sigma_ps: float, n: int, rng: np.random.Generator) -> I64:
    """Gaussian timing jitter in integer ps, cut at ``JITTER_CLIP`` sigma."""
    if sigma_ps <= 0 or n == 0:
        return np.zeros(n, dtype=np.int64)
    j = np.clip(rng.normal(0.0, sigma_ps, n), -JITTER_CLIP * sigma_ps, JITTER_CLIP * sigma_ps)
    return np.rint(j).astype(np.int64)


def _zero_truncated_poisson(lam: F64, rng: np.random.Generator) -> I64:
    """Poisson(lam) conditioned on >= 1, by inverse transform.

    ``lam`` takes a few distinct values (one per intensity class), so one CDF
    table per value; rejection would loop ~1/lam times at a lossy link's lam.
    """
    n_out = np.ones(lam.shape[0], dtype=np.int64)
    if lam.shape[0] == 0:
        return n_out
    u = rng.random(int(lam.shape[0]))
    values, inverse = np.unique(lam, return_inverse=True)
    for i, lv in enumerate(values.tolist()):
        k_max = int(lv + 12 * math.sqrt(lv) + 12)
        k = np.arange(1, k_max + 1, dtype=np.float64)
        # P(n = k | n >= 1) = lam^k / k! * e^-lam / (1 - e^-lam)
        logp = k * math.log(lv) - np.cumsum(np.log(k)) - lv - math.log(-math.expm1(-lv))
        cdf = np.cumsum(np.exp(logp))
        m = inverse == i
        n_out[m] = 1 + np.minimum(np.searchsorted(cdf, u[m], side="right"), k_max - 1)
    return n_out


def _dead_filter(t: I64, dead_ps: int) -> I64:
    """Drop clicks within ``dead_ps`` after a kept click (sorted input).

    Vectorised: drop the first too-close click of each run and look again;
    that converges in a few rounds when rate * dead time << 1.  A saturated
    detector instead walks the chain of kept clicks (one step per kept click).
    """
    keep = np.ones(t.shape[0], dtype=bool)
    for _ in range(8):
        idx = np.flatnonzero(keep)
        if idx.shape[0] < 2:
            return t[keep]
        bad = np.flatnonzero(np.diff(t[idx]) < dead_ps) + 1
        if not bad.shape[0]:
            return t[keep]
        # Only the first of a run is surely dead (its predecessor stays kept);
        # later ones may be revived once it is gone, so drop firsts and repeat.
        is_bad = np.zeros(idx.shape[0], dtype=bool)
        is_bad[bad] = True
        firsts = bad[~is_bad[bad - 1]]
        keep[idx[firsts]] = False
    rest = t[keep]
    nxt = np.searchsorted(rest, rest + dead_ps, side="left").tolist()
    chain = []
    i, n = 0, int(rest.shape[0])
    while i < n:
        chain.append(i)
        i = nxt[i]
    return rest[np.array(chain, dtype=np.int64)]


def _merge(times: list[I64], chans: list[U8]) -> Clicks:
    if not times:
        return _empty()
    t = np.concatenate(times).astype(np.int64)
    c = np.concatenate(chans).astype(np.uint8)
    order = np.argsort(t, kind="stable")
    return Clicks(t[order], c[order])
