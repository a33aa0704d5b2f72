"""Parameter estimation for decoy-state BB84: how much secret key a block can yield.

Two halves that share the binary entropy and nothing else:

* Finite key, for the daemon: the two-decoy (three-intensity) bounds of Lim, Curty, Walenta, Xu
  and Zbinden, "Concise security bounds for practical decoy-state quantum key distribution",
  Phys. Rev. A 89, 022307 (2014), with Hoeffding fluctuations. Everything here fails closed:
  any bound that cannot be established yields ``key_length <= 0``, malformed input raises.
* Asymptotic, for the planner: infinite decoys and the vacuum + weak decoy method of Ma, Qi, Zhao
  and Lo, "Practical decoy state for quantum key distribution", Phys. Rev. A 72, 012326 (2005),
  on the GLLP key rate.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# Lim et al. set each failure probability that adds up to eps_sec to eps_sec/21, so 21 appears
# in every finite-size term (Hoeffding, phase-error sampling, privacy amplification).
LIM_EPS_SPLIT = 21.0
# The coefficient of log2(21/eps_sec) in Lim's key length, eq. (1).
LIM_PA_EVENTS = 6
# Beyond 1/2 a phase-error bound says nothing (1 - h2 is already 0); it also keeps h2 in range.
PHI_MAX = 0.5
# The error rate of a vacuum (dark-count) detection: the bit is a coin flip.
E0 = 0.5
N_CLASSES = 3

# Planner search ranges: GLLP optimal mean photon numbers sit well below 1, so (0, 1.5] brackets
# them; the grid is fine enough that golden-section only polishes a bracketed maximum.
MU_SEARCH_MAX = 1.5
MU_GRID_POINTS = 300
MU_TOLERANCE = 1e-6
DISTANCE_TOLERANCE_KM = 0.01
DISTANCE_FIRST_PROBE_KM = 50.0
# A lossless link never runs out of key; stop doubling here and call the distance unbounded.
DISTANCE_SEARCH_CAP_KM = 1e5
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


class EstimationError(Exception):
    """A bound cannot be computed: the block is malformed or nonsensical (names the quantity)."""


def h2(p: float) -> float:
    """Binary entropy in bits."""
    if not 0.0 <= p <= 1.0:  # also rejects NaN
        raise ValueError(f"h2 is defined on [0, 1], got {p!r}")
    if p in {0.0, 1.0}:
        return 0.0
    return -p * math.log2(p) - (1.0 - p) * math.log2(1.0 - p)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# --------------------------------------------------------------------------- finite key (Lim 2014)


@dataclass(frozen=True, slots=True)
class Security:
    eps_sec: float = 1e-10
    eps_cor: float = 1e-15

    def __post_init__(self) -> None:
        for name in ("eps_sec", "eps_cor"):
            value = getattr(self, name)
            _require(0.0 < value < 1.0, f"Security.{name} must lie in (0, 1), got {value!r}")


@dataclass(frozen=True, slots=True)
class Intensities:
    """Signal mu1, weak decoy mu2, vacuum-like decoy mu3 and how often Alice sends each."""

    mu1: float
    mu2: float
    mu3: float
    p1: float
    p2: float
    p3: float

    def __post_init__(self) -> None:
        for name in ("mu1", "mu2", "mu3", "p1", "p2", "p3"):
            value = getattr(self, name)
            _require(math.isfinite(value), f"Intensities.{name} must be finite, got {value!r}")
        _require(self.mu3 >= 0.0, f"Intensities.mu3 must be >= 0, got {self.mu3}")
        _require(self.mu2 > self.mu3, f"need mu2 > mu3, got mu2={self.mu2}, mu3={self.mu3}")
        # The s_1 denominator is (mu2 - mu3)(mu1 - mu2 - mu3): it must be positive.
        _require(
            self.mu1 > self.mu2 + self.mu3,
            f"need mu1 > mu2 + mu3, got mu1={self.mu1}, mu2={self.mu2}, mu3={self.mu3}",
        )
        for name in ("p1", "p2", "p3"):
            value = getattr(self, name)
            _require(value > 0.0, f"Intensities.{name} must be > 0, got {value}")
        total = self.p1 + self.p2 + self.p3
        # Counts are rescaled by 1/p_k: unnormalised probabilities would inflate every bound.
        _require(
            math.isclose(total, 1.0, rel_tol=0.0, abs_tol=1e-9),
            f"Intensities p1 + p2 + p3 must be 1, got {total!r}",
        )

    @property
    def mus(self) -> tuple[float, float, float]:
        return (self.mu1, self.mu2, self.mu3)

    @property
    def ps(self) -> tuple[float, float, float]:
        return (self.p1, self.p2, self.p3)

    def tau(self, n: int) -> float:
        """Probability that Alice sends an n-photon state, averaged over the three classes."""
        return sum(
            math.exp(-mu) * mu**n * p / math.factorial(n)
            for mu, p in zip(self.mus, self.ps, strict=True)
        )


def _count_triple(name: str, value: object) -> tuple[int, int, int]:
    items = tuple(value) if isinstance(value, Iterable) else ()
    if len(items) != N_CLASSES:
        raise EstimationError(
            f"cannot bound: {name} must hold one count per class (mu1, mu2, mu3), got {value!r}"
        )
    counts = [_count(f"{name}[{k}]", item) for k, item in enumerate(items)]
    return (counts[0], counts[1], counts[2])


def _count(name: str, item: object) -> int:
    """A non-negative integer count, or an EstimationError naming ``name``."""
    # bool is an int to Python but never a count; numpy integers are welcome.
    if isinstance(item, bool):
        raise EstimationError(f"cannot bound: {name} is a bool, not a count")
    try:
        count = operator.index(item)  # type: ignore[arg-type]  # TypeError handled below
    except TypeError as exc:
        raise EstimationError(
            f"cannot bound: {name} must be an integer count, got {item!r}"
        ) from exc
    if count < 0:
        raise EstimationError(f"cannot bound: {name} = {count} is negative")
    return count


@dataclass(frozen=True, slots=True)
class BlockCounts:
    """One block's detections, per intensity class (mu1, mu2, mu3). Validated on construction."""

    n_z: tuple[int, int, int]
    n_x: tuple[int, int, int]
    m_x: tuple[int, int, int]

    def __post_init__(self) -> None:
        # Normalise (lists, numpy integers) so the frozen value is plain ints the bounds can trust.
        for name in ("n_z", "n_x", "m_x"):
            object.__setattr__(self, name, _count_triple(name, getattr(self, name)))
        for k, (errors, detections) in enumerate(zip(self.m_x, self.n_x, strict=True)):
            if errors > detections:
                raise EstimationError(
                    f"cannot bound: m_x[{k}] = {errors} errors exceed n_x[{k}] = {detections}"
                    " detections"
                )


@dataclass(frozen=True, slots=True)
class FiniteKeyResult:
    """ell and the bounds behind it. key_length <= 0 means no key from this block; the bounds
    are reported clipped at 0 (phi_z at 1/2) so they can be logged as they stand."""

    key_length: int
    s_z0: float
    s_z1: float
    s_x1: float
    v_x1: float
    phi_z: float
    leak_ec: int
    n_z: int

    def ok(self) -> bool:
        return self.key_length > 0


def _hoeffding(
    counts: tuple[int, int, int], inten: Intensities, sec: Security
) -> tuple[list[float], list[float]]:
    """(n^-_k, n^+_k): the counts rescaled to their expected values per class, minus/plus the
    Hoeffding deviation of the whole basis."""
    delta = math.sqrt(sum(counts) / 2.0 * math.log(LIM_EPS_SPLIT / sec.eps_sec))
    scale = [math.exp(mu) / p for mu, p in zip(inten.mus, inten.ps, strict=True)]
    lower = [s * (n - delta) for s, n in zip(scale, counts, strict=True)]
    upper = [s * (n + delta) for s, n in zip(scale, counts, strict=True)]
    return lower, upper


def _vacuum_lower(lower: list[float], upper: list[float], inten: Intensities) -> float:
    mu2, mu3 = inten.mu2, inten.mu3
    bound = inten.tau(0) * (mu2 * lower[2] - mu3 * upper[1]) / (mu2 - mu3)
    # A count cannot be negative; a larger s_0 only tightens s_1, and the true s_0 is >= 0.
    return max(bound, 0.0)


def _single_photon_lower(
    lower: list[float], upper: list[float], s0: float, inten: Intensities
) -> float:
    """Lim eq. (3). May come out <= 0; the caller decides what that means."""
    mu1, mu2, mu3 = inten.mus
    tau0, tau1 = inten.tau(0), inten.tau(1)
    multi_photon = (mu2**2 - mu3**2) / mu1**2 * (upper[0] - s0 / tau0)
    numerator = tau1 * mu1 * (lower[1] - upper[2] - multi_photon)
    return numerator / (mu1 * (mu2 - mu3) - mu2**2 + mu3**2)


def _gamma(a: float, b: float, c: float, d: float) -> float:
    """Lim's sampling deviation of the phase error rate; needs 0 < b < 1 and c, d > 0."""
    spread = (c + d) * (1.0 - b) * b / (c * d * math.log(2.0))
    log_term = math.log2((c + d) / (c * d * (1.0 - b) * b) * LIM_EPS_SPLIT**2 / a**2)
    # A negative log term (huge blocks and a weak eps) means the tail bound already holds at zero
    # deviation; without the clamp sqrt would fail on a valid input.
    return math.sqrt(spread * max(log_term, 0.0))


def finite_key_length(
    counts: BlockCounts, inten: Intensities, leak_ec_bits: int, sec: Security = Security()
) -> FiniteKeyResult:
    """Secret key length of one block, Lim et al. 2014 eq. (1) with the bounds (2)-(5)."""
    leak = _count("leak_ec_bits", leak_ec_bits)

    z_lo, z_hi = _hoeffding(counts.n_z, inten, sec)
    x_lo, x_hi = _hoeffding(counts.n_x, inten, sec)
    m_lo, m_hi = _hoeffding(counts.m_x, inten, sec)

    s_z0 = _vacuum_lower(z_lo, z_hi, inten)
    s_z1 = _single_photon_lower(z_lo, z_hi, s_z0, inten)
    s_x0 = _vacuum_lower(x_lo, x_hi, inten)
    s_x1 = _single_photon_lower(x_lo, x_hi, s_x0, inten)
    v_x1 = inten.tau(1) * (m_hi[1] - m_lo[2]) / (inten.mu2 - inten.mu3)

    # Without single photons in both bases, or without any error evidence (v_x1 <= 0 makes gamma
    # vanish, i.e. a zero phase-error bound from no data), there is no bound to stand on.
    degenerate = s_z1 <= 0.0 or s_x1 <= 0.0 or v_x1 <= 0.0
    s_z1 = max(s_z1, 0.0)
    s_x1 = max(s_x1, 0.0)
    v_x1 = max(v_x1, 0.0)

    phi_z = PHI_MAX
    if not degenerate:
        ratio = v_x1 / s_x1
        # gamma >= 0, so ratio >= 1/2 caps anyway; checking first keeps (1 - b) b positive.
        if ratio < PHI_MAX:
            phi_z = min(ratio + _gamma(sec.eps_sec, ratio, s_z1, s_x1), PHI_MAX)

    length = (
        s_z0
        + s_z1 * (1.0 - h2(phi_z))
        - leak
        - LIM_PA_EVENTS * math.log2(LIM_EPS_SPLIT / sec.eps_sec)
        - math.log2(2.0 / sec.eps_cor)
    )
    key_length = math.floor(length) if math.isfinite(length) else 0
    if degenerate or not math.isfinite(length):
        key_length = min(key_length, 0)
    return FiniteKeyResult(
        key_length=key_length,
        s_z0=s_z0,
        s_z1=s_z1,
        s_x1=s_x1,
        v_x1=v_x1,
        phi_z=phi_z,
        leak_ec=leak,
        n_z=sum(counts.n_z),
    )


def finite_key_length_pairs(
    n_z: int, n_x: int, m_x: int, leak_ec_bits: int, sec: Security = Security()
) -> FiniteKeyResult:
    """Secret key length of one BBM92 (entangled-pair) block.

    Every coincidence counts as a single-photon event (a squashed pair
    source: no decoys), so Lim's bound reduces to the phase error of the Z key
    estimated from the X basis with the same sampling deviation gamma, and the
    same privacy-amplification and correctness terms.
    """
    n_z = _count("n_z", n_z)
    n_x = _count("n_x", n_x)
    m_x = _count("m_x", m_x)
    leak = _count("leak_ec_bits", leak_ec_bits)
    if m_x > n_x:
        raise EstimationError(f"cannot bound: m_x = {m_x} errors exceed n_x = {n_x} detections")
    phi_z = PHI_MAX
    if n_z and n_x:
        e_x = m_x / n_x
        if 0.0 < e_x < PHI_MAX:
            phi_z = min(e_x + _gamma(sec.eps_sec, e_x, n_z, n_x), PHI_MAX)
        elif e_x == 0.0:
            # No error seen: bound with one virtual error, never with zero.
            e1 = 1.0 / n_x
            phi_z = min(e1 + _gamma(sec.eps_sec, e1, n_z, n_x), PHI_MAX)
    length = (
        n_z * (1.0 - h2(phi_z))
        - leak
        - LIM_PA_EVENTS * math.log2(LIM_EPS_SPLIT / sec.eps_sec)
        - math.log2(2.0 / sec.eps_cor)
    )
    key_length = (
        math.floor(length) if n_z and n_x and phi_z < PHI_MAX else min(0, math.floor(length))
    )
    return FiniteKeyResult(
        key_length=key_length,
        s_z0=0.0,
        s_z1=float(n_z),
        s_x1=float(n_x),
        v_x1=float(m_x),
        phi_z=phi_z,
        leak_ec=leak,
        n_z=n_z,
    )


# ------------------------------------------------------------------- asymptotic (Ma et al. 2005)


@dataclass(frozen=True, slots=True)
class Hardware:
    """The link. Defaults: GYS (Gobby, Yuan, Shields 2004) as used by Ma et al. 2005."""

    alpha_db_per_km: float = 0.21
    eta_bob: float = 0.045
    y0: float = 1.7e-6
    e_d: float = 0.033
    f_ec: float = 1.22
    q_sift: float = 0.5

    def __post_init__(self) -> None:
        for name in ("alpha_db_per_km", "eta_bob", "y0", "e_d", "f_ec", "q_sift"):
            value = getattr(self, name)
            _require(math.isfinite(value), f"Hardware.{name} must be finite, got {value!r}")
        _require(self.alpha_db_per_km >= 0.0, "Hardware.alpha_db_per_km must be >= 0")
        _require(0.0 < self.eta_bob <= 1.0, "Hardware.eta_bob must lie in (0, 1]")
        _require(0.0 <= self.y0 < 1.0, "Hardware.y0 must lie in [0, 1)")
        _require(0.0 <= self.e_d <= E0, "Hardware.e_d must lie in [0, 0.5]")
        # Below the Shannon limit error correction cannot work; the rate would be fiction.
        _require(self.f_ec >= 1.0, "Hardware.f_ec must be >= 1")
        _require(0.0 < self.q_sift <= 1.0, "Hardware.q_sift must lie in (0, 1]")

    def eta(self, distance_km: float) -> float:
        """Overall transmittance: channel times Bob's detection efficiency."""
        _require(distance_km >= 0.0, f"distance must be >= 0 km, got {distance_km!r}")
        return self.eta_bob * math.pow(10.0, -self.alpha_db_per_km * distance_km / 10.0)


def gain(hw: Hardware, mu: float, distance_km: float) -> float:
    _require(mu >= 0.0, f"mu must be >= 0, got {mu!r}")
    return hw.y0 + 1.0 - math.exp(-hw.eta(distance_km) * mu)


def qber(hw: Hardware, mu: float, distance_km: float) -> float:
    q_mu = gain(hw, mu, distance_km)
    _require(q_mu > 0.0, "no detections (mu = 0 and y0 = 0): the QBER is undefined")
    return (hw.y0 * E0 + hw.e_d * (1.0 - math.exp(-hw.eta(distance_km) * mu))) / q_mu


def _gllp(*, q_mu: float, e_mu: float, q1: float, e1: float, f_ec: float, q_sift: float) -> float:
    """GLLP rate before clipping: error correction on everything, privacy from single photons."""
    # An error-rate bound above 1/2 carries no information (1 - h2 is 0 there) and must not
    # wrap around h2's symmetry into a positive rate.
    e1 = min(e1, PHI_MAX)
    return q_sift * (-q_mu * f_ec * h2(e_mu) + q1 * (1.0 - h2(e1)))


def _rate_infinite_decoy_raw(hw: Hardware, mu: float, distance_km: float) -> float:
    eta = hw.eta(distance_km)
    # Y1 = Y0 + eta, not Y0 + eta - Y0 eta: gain() sums Y_i = Y0 + 1 - (1 - eta)^i, and only this
    # Y1 keeps the infinite-decoy rate consistent with (and an upper bound on) decoy estimates
    # made from those very gains.
    y1 = hw.y0 + eta
    q1 = y1 * mu * math.exp(-mu)
    e1 = (hw.y0 * E0 + hw.e_d * eta) / y1
    return _gllp(
        q_mu=gain(hw, mu, distance_km),
        e_mu=qber(hw, mu, distance_km),
        q1=q1,
        e1=e1,
        f_ec=hw.f_ec,
        q_sift=hw.q_sift,
    )


def rate_infinite_decoy(hw: Hardware, mu: float, distance_km: float) -> float:
    """Key bits per pulse with perfectly known Y1 and e1 (infinitely many decoys)."""
    return max(_rate_infinite_decoy_raw(hw, mu, distance_km), 0.0)


RateFn = Callable[[Hardware, float, float], float]


def golden_section_max(
    f: Callable[[float], float], lo: float, hi: float, tolerance: float
) -> tuple[float, float]:
    """(argmax, max) of f on [lo, hi] by golden section, to ``tolerance`` (f unimodal there)."""
    a = hi - GOLDEN * (hi - lo)
    b = lo + GOLDEN * (hi - lo)
    fa, fb = f(a), f(b)
    while hi - lo > tolerance:
        if fa >= fb:
            hi, b, fb = b, a, fa
            a = hi - GOLDEN * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + GOLDEN * (hi - lo)
            fb = f(b)
    return (a, fa) if fa >= fb else (b, fb)


def _maximise(f: Callable[[float], float]) -> tuple[float, float]:
    """(argmax, max) of f on (0, MU_SEARCH_MAX]: grid for the bracket, golden section inside."""
    step = MU_SEARCH_MAX / MU_GRID_POINTS
    grid = [step * i for i in range(1, MU_GRID_POINTS + 1)]
    values = [f(mu) for mu in grid]
    best = max(range(len(grid)), key=values.__getitem__)
    lo = grid[best - 1] if best > 0 else grid[0] / 2.0
    hi = grid[best + 1] if best + 1 < len(grid) else grid[best]
    mu_best, f_best = golden_section_max(f, lo, hi, MU_TOLERANCE)
    # Golden section can only improve on the grid if f is unimodal there; keep the grid if not.
    if values[best] > f_best:
        return grid[best], values[best]
    return mu_best, f_best


def optimal_mu(hw: Hardware, distance_km: float) -> tuple[float, float]:
    """(mu, rate) maximising the infinite-decoy rate; rate is 0 beyond the maximum distance."""
    # The unclipped rate keeps a slope where the clipped one is flat at 0, so the search still
    # finds the best mu near the cut-off.
    mu, rate = _maximise(lambda m: _rate_infinite_decoy_raw(hw, m, distance_km))
    return mu, max(rate, 0.0)


def _best_rate(hw: Hardware, distance_km: float, rate_fn: RateFn) -> float:
    if rate_fn is rate_infinite_decoy:
        return _maximise(lambda m: _rate_infinite_decoy_raw(hw, m, distance_km))[1]
    return _maximise(lambda m: rate_fn(hw, m, distance_km))[1]


def max_distance(hw: Hardware, rate_fn: RateFn = rate_infinite_decoy) -> float:
    """Largest distance (km, to 0.01 km) where the rate optimised over mu is still positive.

    ``rate_fn(hw, mu, distance_km)`` is the per-mu rate; returns 0.0 if there is no key even at
    0 km and ``math.inf`` if the rate never vanishes (a lossless link)."""
    if _best_rate(hw, 0.0, rate_fn) <= 0.0:
        return 0.0
    lo, hi = 0.0, DISTANCE_FIRST_PROBE_KM
    while _best_rate(hw, hi, rate_fn) > 0.0:
        lo, hi = hi, 2.0 * hi
        if hi > DISTANCE_SEARCH_CAP_KM:
            return math.inf
    # The optimised rate falls monotonically with distance, so bisection on its sign is sound.
    while hi - lo > DISTANCE_TOLERANCE_KM:
        mid = (lo + hi) / 2.0
        if _best_rate(hw, mid, rate_fn) > 0.0:
            lo = mid
        else:
            hi = mid
    return lo


# Positional by contract: the planner calls it with Ma et al.'s argument order.
def rate_vacuum_weak(  # noqa: PLR0917
    q_mu: float,
    e_mu: float,
    q_nu: float,
    e_nu: float,
    y0: float,
    mu: float,
    nu: float,
    f_ec: float,
    q_sift: float = 0.5,
) -> float:
    """Key bits per pulse from measured signal/decoy gains and QBERs (vacuum + one weak decoy).

    Ma et al. 2005: lower bound Y1 and upper bound e1 from the data, then GLLP; clipped at 0."""
    for name, value in (("q_mu", q_mu), ("e_mu", e_mu), ("q_nu", q_nu), ("e_nu", e_nu)):
        _require(0.0 <= value <= 1.0, f"{name} must lie in [0, 1], got {value!r}")
    _require(0.0 <= y0 <= 1.0, f"y0 must lie in [0, 1], got {y0!r}")
    # The Y1 bound drops the multi-photon tail using nu^i / mu^i <= nu^2 / mu^2 for i >= 2.
    _require(0.0 < nu < mu, f"need 0 < nu < mu, got mu={mu!r}, nu={nu!r}")
    _require(math.isfinite(mu), f"mu must be finite, got {mu!r}")
    _require(f_ec >= 1.0, f"f_ec must be >= 1, got {f_ec!r}")
    _require(0.0 < q_sift <= 1.0, f"q_sift must lie in (0, 1], got {q_sift!r}")

    y1_lower = (
        mu
        / (mu * nu - nu**2)
        * (q_nu * math.exp(nu) - q_mu * math.exp(mu) * nu**2 / mu**2 - (mu**2 - nu**2) / mu**2 * y0)
    )
    if y1_lower <= 0.0:
        return 0.0
    q1_lower = y1_lower * mu * math.exp(-mu)
    e1_upper = (e_nu * q_nu * math.exp(nu) - E0 * y0) / (y1_lower * nu)
    if e1_upper < 0.0:
        # Fewer decoy errors than the dark counts alone must cause: the data contradict the
        # model, so claim nothing rather than a perfect single-photon error rate.
        return 0.0
    rate = _gllp(q_mu=q_mu, e_mu=e_mu, q1=q1_lower, e1=e1_upper, f_ec=f_ec, q_sift=q_sift)
    return max(rate, 0.0)


# ---------------------------------------------------------------- expected blocks (the planner)


def mixed_gain_qber(hw: Hardware, inten: Intensities, distance_km: float) -> tuple[float, float]:
    """(gain, QBER) of Alice's mix of intensity classes: the detection probability per pulse and
    the error rate of those detections. The model is basis-symmetric, so both hold in Z and X."""
    gains = [gain(hw, mu, distance_km) for mu in inten.mus]
    mean_gain = sum(p * g for p, g in zip(inten.ps, gains, strict=True))
    if mean_gain <= 0.0:
        return 0.0, E0
    errors = sum(
        p * g * qber(hw, mu, distance_km)
        for mu, p, g in zip(inten.mus, inten.ps, gains, strict=True)
        if g > 0.0  # qber is undefined without detections, and such a class adds no errors
    )
    return mean_gain, errors / mean_gain


def expected_block_counts(
    hw: Hardware, inten: Intensities, distance_km: float, n_pulses: float, p_z: float
) -> BlockCounts:
    """The detections ``n_pulses`` pulses yield on average on ``hw`` at ``distance_km``, per class.

    Alice and Bob each choose Z with probability ``p_z``: n_Z counts Z-Z pulses, n_X and its
    errors m_X count X-X pulses; mismatched bases are sifted out. Rounded to whole counts, so the
    result goes to ``finite_key_length`` exactly as a measured block would."""
    _require(
        math.isfinite(n_pulses) and n_pulses >= 0.0,
        f"n_pulses must be finite and >= 0, got {n_pulses!r}",
    )
    _require(0.0 <= p_z <= 1.0, f"p_z must lie in [0, 1], got {p_z!r}")
    q_z, q_x = p_z**2, (1.0 - p_z) ** 2
    n_z: list[int] = []
    n_x: list[int] = []
    m_x: list[int] = []
    for mu, p in zip(inten.mus, inten.ps, strict=True):
        g = gain(hw, mu, distance_km)
        n_z.append(round(n_pulses * p * q_z * g))
        n_x.append(round(n_pulses * p * q_x * g))
        m_x.append(round(n_x[-1] * qber(hw, mu, distance_km)) if g > 0.0 else 0)
    return BlockCounts(
        n_z=(n_z[0], n_z[1], n_z[2]), n_x=(n_x[0], n_x[1], n_x[2]), m_x=(m_x[0], m_x[1], m_x[2])
    )
