"""The physics of a simulated QKD link, shared by the simulated drivers of one node.

Alice and Bob run in separate processes.  Each builds a :class:`SimulatedLink`
from the same ``[simulation]`` table, and shared *seeds* play the fibre:

- ``alice_qrng_seed`` drives Alice's choices (basis, bit, intensity class) for
  every pulse slot, and the hidden bits of every entangled pair, through a
  counter-based hash, so any slot can be evaluated on its own;
- ``link_seed`` drives the public parts (sync pattern, pair emission times,
  which pulses Eve intercepts) and each node's local noise.

Bob's process derives the photons that reach his detectors from those seeds;
his node code sees only detector clicks.  Give Bob another
``alice_qrng_seed`` and his clicks no longer carry Alice's bits (~50 % QBER),
while timing, which is public, still locks.

Model (Ma et al., PRA 72, 012326, 2005): channel transmittance
``eta_ch = 10^(-alpha*L/10)``; a pulse of mean photon number ``mu`` gives a
Poisson(``eta*mu``) number of detected photons.  Bob chooses his basis
passively (50/50 beamsplitter); each detected photon ends in the detector of
its basis and bit, flipped with probability ``misalignment``.  Dark counts,
afterpulses, dead time, timing jitter and Bob's clock (offset, ppm drift)
follow each detector's own parameters.

Clocks: Alice's is the reference.  Slot ``k`` leaves Alice at ``k*period_ps``;
a photon reaches Bob ``flight_ps = L*n/c`` later; Bob's tagger reads
``offset + (1 + drift) * t_true``.

Sync schedule (qubit-based synchronisation, Calderaro et al. 2020): during
true time ``[0, sync_duration_ps)`` the source emits the public sync pattern
(slot bright with probability ``sync_density``, vacuum otherwise); after it,
the decoy-state BB84 stream.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from qnoded.contracts import IntensityClass

C_M_PER_S = 299_792_458.0
I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]
F64 = npt.NDArray[np.float64]

# Stream identifiers for the counter-based hash: one per independent use.
_CHOICE, _SYNC, _EVE, _EVE_BASIS, _EVE_BIT = 1, 2, 3, 4, 5
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """SplitMix64 finaliser (Steele et al. 2014), vectorised; wraps mod 2^64."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def hash_bits(seed: int, stream: int, index: I64) -> npt.NDArray[np.uint64]:
    """64 random bits for each index, a pure function of (seed, stream, index)."""
    key = _splitmix64(
        np.array([(seed * 1_000_003 + stream) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64)
    )[0]
    with np.errstate(over="ignore"):
        return _splitmix64(index.astype(np.uint64) ^ key)


def hash_uniform(seed: int, stream: int, index: I64) -> F64:
    """Uniform floats in [0, 1) from the top 53 hash bits."""
    return (hash_bits(seed, stream, index) >> np.uint64(11)).astype(np.float64) * 2.0**-53


@dataclass(frozen=True, slots=True)
class LinkParams:
    """The ``[simulation]`` table, validated.  Units are in the names."""

    link_seed: int = 1
    alice_qrng_seed: int = 2
    distance_km: float = 25.0
    attenuation_db_per_km: float = 0.2
    fibre_index: float = 1.468
    pulse_rate_hz: float = 1e7
    mu_signal: float = 0.5
    mu_decoy: float = 0.1
    p_signal: float = 0.8
    p_decoy: float = 0.1
    sync_density: float = 0.01
    sync_duration_ps: int = 1_000_000_000_000
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
        table = dict(table or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key not in fields:
                raise ValueError(
                    f"[simulation] {key}: unknown key (valid: {', '.join(sorted(fields))})"
                )
            default = fields[key].default
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, int):
                ok = isinstance(value, int) and not isinstance(value, bool)
            else:
                ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not ok:
                raise ValueError(
                    f"[simulation] {key}: expected {type(default).__name__}, got {value!r}"
                )
            values[key] = float(value) if isinstance(default, float) else value
        p = cls(**values)
        p.validate()
        return p

    def validate(self) -> None:
        checks = [
            ("distance_km", self.distance_km >= 0),
            ("attenuation_db_per_km", self.attenuation_db_per_km >= 0),
            ("pulse_rate_hz", 1e3 <= self.pulse_rate_hz <= 1e10),
            ("mu_signal", self.mu_signal > 0),
            ("mu_decoy", 0 <= self.mu_decoy < self.mu_signal),
            ("p_signal", 0 < self.p_signal <= 1),
            ("p_decoy", self.p_decoy >= 0 and self.p_signal + self.p_decoy <= 1),
            ("sync_density", 0 < self.sync_density <= 1),
            ("misalignment", 0 <= self.misalignment <= 0.5),
            ("eve_fraction", 0 <= self.eve_fraction <= 1),
            ("bob_clock_drift_ppm", abs(self.bob_clock_drift_ppm) <= 1000),
            ("pair_rate_hz", 0 < self.pair_rate_hz <= 1e9),
            ("alice_local_efficiency", 0 < self.alice_local_efficiency <= 1),
            ("batch_duration_ps", self.batch_duration_ps >= 1_000_000),
        ]
        for key, ok in checks:
            if not ok:
                raise ValueError(f"[simulation] {key}: value {getattr(self, key)!r} out of range")

    @property
    def period_ps(self) -> int:
        return round(1e12 / self.pulse_rate_hz)

    @property
    def transmittance(self) -> float:
        return 10 ** (-self.attenuation_db_per_km * self.distance_km / 10)

    @property
    def flight_ps(self) -> int:
        return round(self.distance_km * 1e3 * self.fibre_index / C_M_PER_S * 1e12)

    @property
    def drift(self) -> float:
        return self.bob_clock_drift_ppm * 1e-6


@dataclass(frozen=True, slots=True)
class DetectorPhysics:
    """What the link needs to know of one detector."""

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


class SimulatedLink:
    """Alice's choices and the clicks each node's detectors see."""

    def __init__(self, params: LinkParams, protocol: str, role: str) -> None:
        if protocol not in ("bb84", "bbm92"):
            raise ValueError(f"protocol {protocol!r}: the simulation knows bb84 and bbm92")
        self.p = params
        self.protocol = protocol
        self.role = role
        self._mu = np.array([params.mu_signal, params.mu_decoy, 0.0, params.mu_signal])
        # last click time per channel (true ps), for dead time across chunks
        self.last_click: dict[int, int] = {}

    # -- Alice's choices (pure functions of the seed and the slot) -----------------
    def choices(self, slots: I64) -> tuple[U8, U8, U8]:
        """Basis, bit and intensity class of each slot, as emitted."""
        p = self.p
        h = hash_bits(p.alice_qrng_seed, _CHOICE, slots)
        basis = (h & np.uint64(1)).astype(np.uint8)
        bit = ((h >> np.uint64(1)) & np.uint64(1)).astype(np.uint8)
        u = (h >> np.uint64(11)).astype(np.float64) * 2.0**-53
        intensity = np.full(slots.shape[0], IntensityClass.VACUUM, dtype=np.uint8)
        intensity[u < p.p_signal + p.p_decoy] = IntensityClass.DECOY
        intensity[u < p.p_signal] = IntensityClass.SIGNAL
        in_sync = slots * p.period_ps < p.sync_duration_ps
        if np.any(in_sync):
            bright = hash_uniform(p.link_seed, _SYNC, slots) < p.sync_density
            intensity[in_sync] = np.where(
                bright[in_sync], IntensityClass.SYNC, IntensityClass.VACUUM
            )
            basis[in_sync] = 0
        return basis, bit, intensity

    def sync_slots(self, first: int, n: int) -> I64:
        """Bright slots of the public sync pattern in ``[first, first + n)``."""
        p = self.p
        last = min(first + n, -(-p.sync_duration_ps // p.period_ps))
        if last <= first:
            return np.empty(0, dtype=np.int64)
        out = []
        for lo in range(first, last, 1 << 22):  # chunks bound the memory
            slots = np.arange(lo, min(last, lo + (1 << 22)), dtype=np.int64)
            out.append(slots[hash_uniform(p.link_seed, _SYNC, slots) < p.sync_density])
        return np.concatenate(out)

    # -- what reaches one node's detectors ----------------------------------------
    def clicks(
        self, t0: int, t1: int, detectors: Mapping[int, DetectorPhysics], rng: np.random.Generator
    ) -> Clicks:
        """Clicks (true time, channel) in true-time interval ``[t0, t1)``, before
        dead time and jitter."""
        if self.protocol == "bb84":
            if self.role != "bob":
                raise ValueError("in BB84 only Bob's node has detectors")
            photons = self._bb84_photons(t0, t1, detectors, rng)
        else:
            photons = self._bbm92_photons(t0, t1, detectors, rng)
        return self._add_noise(photons, t0, t1, detectors, rng)

    def _bb84_photons(
        self, t0: int, t1: int, detectors: Mapping[int, DetectorPhysics], rng: np.random.Generator
    ) -> Clicks:
        p = self.p
        period, flight = p.period_ps, p.flight_ps
        k0, k1 = -(-(t0 - flight) // period), -(-(t1 - flight) // period)
        k0 = max(k0, 0)
        if k1 <= k0:
            return Clicks(np.empty(0, np.int64), np.empty(0, np.uint8))
        eta_det = float(np.mean([d.efficiency for d in detectors.values()])) if detectors else 0.0
        eta = p.transmittance * eta_det
        p_max = 1 - math.exp(-eta * float(self._mu.max()))
        n_slots = k1 - k0
        if p_max <= 0:
            return Clicks(np.empty(0, np.int64), np.empty(0, np.uint8))
        # Candidate slots at the highest intensity's click probability
        # (geometric gaps), then thinned to each slot's own probability: an
        # exact per-slot Bernoulli at a cost that grows with clicks, not slots.
        expect = n_slots * p_max
        gaps = rng.geometric(p_max, size=int(expect + 6 * math.sqrt(expect) + 16))
        pos = np.cumsum(gaps) - 1
        while pos[-1] < n_slots - 1:
            more = rng.geometric(p_max, size=max(16, int(0.1 * expect)))
            pos = np.concatenate([pos, pos[-1] + np.cumsum(more)])
        slots = k0 + pos[pos < n_slots].astype(np.int64)
        basis_a, bit_a, cls = self.choices(slots)
        lam = eta * self._mu[cls]
        accept = rng.random(slots.shape[0]) * p_max < 1 - np.exp(-lam)
        slots, basis_a, bit_a, lam = slots[accept], basis_a[accept], bit_a[accept], lam[accept]
        # Intercept-resend: Eve measures in a random basis and resends what she saw.
        if p.eve_fraction > 0:
            hit = hash_uniform(p.link_seed, _EVE, slots) < p.eve_fraction
            eve_basis = (hash_bits(p.link_seed, _EVE_BASIS, slots) & np.uint64(1)).astype(np.uint8)
            eve_rand = (hash_bits(p.link_seed, _EVE_BIT, slots) & np.uint64(1)).astype(np.uint8)
            eve_bit = np.where(eve_basis == basis_a, bit_a, eve_rand)
            basis_a = np.where(hit, eve_basis, basis_a).astype(np.uint8)
            bit_a = np.where(hit, eve_bit, bit_a).astype(np.uint8)
        n_ph = _zero_truncated_poisson(lam, rng)
        times: list[I64] = []
        chans: list[U8] = []
        t_arr = slots * period + flight
        for j in range(int(n_ph.max()) if n_ph.shape[0] else 0):
            m = n_ph > j
            b_basis = rng.integers(0, 2, int(m.sum())).astype(np.uint8)
            same = b_basis == basis_a[m]
            flip = (rng.random(size=int(b_basis.shape[0])) < p.misalignment).astype(np.uint8)
            rand = rng.integers(0, 2, b_basis.shape[0]).astype(np.uint8)
            b_bit = np.where(same, bit_a[m] ^ flip, rand)
            times.append(t_arr[m])
            chans.append((b_basis * 2 + b_bit).astype(np.uint8))
        return _merge(times, chans)

    def _pairs(self, t0: int, t1: int) -> tuple[I64, U8, U8, I64]:
        """Pairs emitted in true ``[t0, t1)``: times, hidden Z and X bits, ids.

        Pairs are generated per chunk of ``batch_duration_ps`` of true time
        from ``link_seed`` so both processes draw the same ones.  |Phi+> is
        perfectly correlated in Z and in X; a hidden bit per basis reproduces
        exactly the Z/X statistics that BBM92 sifting uses (not a Bell test).
        """
        p = self.p
        d = p.batch_duration_ps
        out_t, out_z, out_x, out_id = [], [], [], []
        for c in range(max(0, t0 // d), -(-t1 // d)):  # the source starts at t = 0
            g = np.random.Generator(np.random.Philox(key=p.link_seed, counter=c))
            n = g.poisson(p.pair_rate_hz * d * 1e-12)
            t = np.sort(g.integers(c * d, (c + 1) * d, n))
            ids = c * (1 << 32) + np.arange(n, dtype=np.int64)
            h = hash_bits(p.alice_qrng_seed, _CHOICE, ids)
            m = (t >= t0) & (t < t1)
            out_t.append(t[m])
            out_z.append((h[m] & np.uint64(1)).astype(np.uint8))
            out_x.append(((h[m] >> np.uint64(1)) & np.uint64(1)).astype(np.uint8))
            out_id.append(ids[m])
        if not out_t:
            e = np.empty(0, np.int64)
            return e, e.astype(np.uint8), e.astype(np.uint8), e
        return (
            np.concatenate(out_t),
            np.concatenate(out_z),
            np.concatenate(out_x),
            np.concatenate(out_id),
        )

    def _bbm92_photons(
        self, t0: int, t1: int, detectors: Mapping[int, DetectorPhysics], rng: np.random.Generator
    ) -> Clicks:
        p = self.p
        eta_det = float(np.mean([d.efficiency for d in detectors.values()])) if detectors else 0.0
        # The source sits at Alice: her photon is detected locally, Bob's
        # crosses the fibre and arrives flight_ps later.
        if self.role == "alice":
            shift, eta = 0, p.alice_local_efficiency * eta_det
        else:
            shift, eta = p.flight_ps, p.transmittance * eta_det
        t, zbit, xbit, ids = self._pairs(t0 - shift, t1 - shift)
        if self.role == "bob" and p.eve_fraction > 0:
            hit = hash_uniform(p.link_seed, _EVE, ids) < p.eve_fraction
            eve_x = (hash_bits(p.link_seed, _EVE_BASIS, ids) & np.uint64(1)).astype(bool)
            rand = (hash_bits(p.link_seed, _EVE_BIT, ids) & np.uint64(1)).astype(np.uint8)
            # Eve measured one basis: that hidden bit survives, the other is random.
            zbit = np.where(hit & eve_x, rand, zbit).astype(np.uint8)
            xbit = np.where(hit & ~eve_x, rand, xbit).astype(np.uint8)
        seen = rng.random(size=int(t.shape[0])) < eta
        basis = rng.integers(0, 2, int(seen.sum())).astype(np.uint8)
        bit = np.where(basis == 0, zbit[seen], xbit[seen]).astype(np.uint8)
        if self.role == "bob":
            bit ^= (rng.random(size=int(bit.shape[0])) < p.misalignment).astype(np.uint8)
        return Clicks(t[seen] + shift, (basis * 2 + bit).astype(np.uint8))

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
        for ch, det in detectors.items():
            if det.latched:
                continue  # a latched detector is blind: no photon or dark clicks
            t_ch = photons.t[photons.ch == ch]
            # Photons are detected with the link's mean efficiency; a detector
            # below the mean loses the difference here.
            mean_eff = float(np.mean([d.efficiency for d in detectors.values()]))
            if det.efficiency < mean_eff:
                t_ch = t_ch[rng.random(t_ch.shape[0]) < det.efficiency / mean_eff]
            n_dark = rng.poisson(det.dark_count_rate_hz * (t1 - t0) * 1e-12)
            dark = rng.integers(t0, t1, n_dark)
            if det.gated and self.protocol == "bb84":
                # A gated detector only clicks inside its gates, at the slots.
                dark = (dark - p.flight_ps) // p.period_ps * p.period_ps + p.flight_ps
                dark = dark[dark >= t0]
            t_ch = np.sort(np.concatenate([t_ch, dark]))
            t_ch = self._dead_time(ch, t_ch, det.dead_time_ps)
            if det.afterpulse_probability > 0 and t_ch.shape[0]:
                parent = t_ch[rng.random(t_ch.shape[0]) < det.afterpulse_probability]
                after = (
                    parent
                    + det.dead_time_ps
                    + rng.exponential(det.afterpulse_decay_ps, parent.shape[0]).astype(np.int64)
                )
                after = after[after < t1]
                if after.shape[0]:
                    # re-filter with the afterpulses in (an afterpulse is a click too)
                    t_ch = np.sort(np.concatenate([t_ch, after]))
                    t_ch = _dead_filter(t_ch, det.dead_time_ps)
                    self.last_click[ch] = int(t_ch[-1])
            times.append(t_ch)
            chans.append(np.full(t_ch.shape[0], ch, dtype=np.uint8))
        return _merge(times, chans)

    def _dead_time(self, ch: int, t: I64, dead_ps: int) -> I64:
        last = self.last_click.get(ch)
        if last is not None:
            t = t[t >= last + dead_ps]
        t = _dead_filter(t, dead_ps)
        if t.shape[0]:
            self.last_click[ch] = int(t[-1])
        return t


def _zero_truncated_poisson(lam: F64, rng: np.random.Generator, k_max: int = 12) -> I64:
    """Poisson(lam) conditioned on >= 1, by inverse transform over k = 1..k_max.

    Rejection would loop ~1/lam times at the small lam of a lossy link.
    """
    if lam.shape[0] == 0:
        return np.empty(0, dtype=np.int64)
    k = np.arange(1, k_max + 1, dtype=np.float64)
    log_fact = np.cumsum(np.log(k))
    # P(n = k | n >= 1) = lam^k / k! * e^-lam / (1 - e^-lam)
    logp = (
        k[None, :] * np.log(lam[:, None])
        - log_fact[None, :]
        - lam[:, None]
        - np.log(-np.expm1(-lam))[:, None]
    )
    cdf = np.cumsum(np.exp(logp), axis=1)
    u = rng.random(size=int(lam.shape[0]))[:, None]
    n: I64 = (1 + np.count_nonzero(u > cdf[:, :-1], axis=1)).astype(np.int64)
    return n


def _dead_filter(t: I64, dead_ps: int) -> I64:
    """Drop clicks within ``dead_ps`` after a kept click (sorted input)."""
    keep = np.ones(t.shape[0], dtype=bool)
    while True:
        idx = np.flatnonzero(keep)
        if idx.shape[0] < 2:
            return t[keep]
        bad = np.flatnonzero(np.diff(t[idx]) < dead_ps) + 1
        if not bad.shape[0]:
            return t[keep]
        # Only the first of a run is surely dead; later ones may be revived
        # once it is gone, so drop firsts and look again.
        is_bad = np.zeros(idx.shape[0], dtype=bool)
        is_bad[bad] = True
        firsts = bad[~is_bad[bad - 1]]
        keep[idx[firsts]] = False


def _merge(times: list[I64], chans: list[U8]) -> Clicks:
    if not times:
        return Clicks(np.empty(0, np.int64), np.empty(0, np.uint8))
    t = np.concatenate(times).astype(np.int64)
    c = np.concatenate(chans).astype(np.uint8)
    order = np.argsort(t, kind="stable")
    return Clicks(t[order], c[order])
