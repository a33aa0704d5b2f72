"""Parameter estimation: published asymptotic figures, finite-key convergence, failing closed.

Every expected value is computed here from the model or from the formulas, never pasted in,
so a wrong sign or a swapped bound in qnoded/estimation.py makes these tests fail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from qnoded.estimation import (
    BlockCounts,
    EstimationError,
    Hardware,
    Intensities,
    Security,
    finite_key_length,
    gain,
    h2,
    max_distance,
    optimal_mu,
    qber,
    rate_infinite_decoy,
    rate_vacuum_weak,
)

# Lim et al. 2014 size their leak as a fixed inefficiency over the Shannon limit.
LEAK_FACTOR = 1.1
GYS = Hardware()
# A metro link: 25 km of standard fibre, a good detector, little misalignment.
METRO = Hardware(alpha_db_per_km=0.2, eta_bob=0.1, e_d=0.01, y0=1e-6)
METRO_KM = 25.0
INTEN = Intensities(mu1=0.5, mu2=0.1, mu3=0.0002, p1=0.8, p2=0.15, p3=0.05)
# Each party picks Z with this probability; only Z-Z pulses make key, only X-X ones test it.
P_Z = 0.7


# ------------------------------------------------------------------------------------- helpers


def vacuum_weak_from_model(hw: Hardware, mu: float, nu: float, distance_km: float) -> float:
    """Ma 2005's vacuum + weak bound fed with what an ideal experiment on ``hw`` would measure."""
    return rate_vacuum_weak(
        gain(hw, mu, distance_km),
        qber(hw, mu, distance_km),
        gain(hw, nu, distance_km),
        qber(hw, nu, distance_km),
        hw.y0,
        mu,
        nu,
        hw.f_ec,
        hw.q_sift,
    )


@dataclass(frozen=True)
class Block:
    counts: BlockCounts
    leak_ec: int
    n_pulses: float


def model_block(
    n_pulses: float,
    *,
    hw: Hardware = METRO,
    distance_km: float = METRO_KM,
    inten: Intensities = INTEN,
    p_z: float = P_Z,
    qber_x: float | None = None,
    qber_z: float | None = None,
) -> Block:
    """The expected counts of ``n_pulses`` pulses on the link (errors at the model QBER unless
    overridden), with the error-correction leak sized from the Z-basis QBER."""
    q_z, q_x = p_z**2, (1.0 - p_z) ** 2
    n_z: list[int] = []
    n_x: list[int] = []
    m_x: list[int] = []
    z_errors = 0.0
    for mu, p in zip(inten.mus, inten.ps, strict=True):
        g, e = gain(hw, mu, distance_km), qber(hw, mu, distance_km)
        n_z.append(round(n_pulses * p * q_z * g))
        n_x.append(round(n_pulses * p * q_x * g))
        m_x.append(round(n_x[-1] * (e if qber_x is None else qber_x)))
        z_errors += n_z[-1] * (e if qber_z is None else qber_z)
    e_z = z_errors / sum(n_z)
    leak = math.ceil(LEAK_FACTOR * sum(n_z) * h2(e_z))
    counts = BlockCounts(
        n_z=(n_z[0], n_z[1], n_z[2]), n_x=(n_x[0], n_x[1], n_x[2]), m_x=(m_x[0], m_x[1], m_x[2])
    )
    return Block(counts, leak, n_pulses)


def single_photon_truth(
    hw: Hardware, distance_km: float, inten: Intensities
) -> tuple[float, float]:
    """(Y1, e1) implied by the gain/QBER model: Y_i = Y0 + 1 - (1 - eta)^i."""
    eta = hw.eta(distance_km)
    y1 = hw.y0 + eta
    return y1, (hw.y0 / 2 + hw.e_d * eta) / y1


def asymptotic_rate(
    hw: Hardware = METRO,
    distance_km: float = METRO_KM,
    inten: Intensities = INTEN,
    p_z: float = P_Z,
) -> float:
    """Key per pulse of the same protocol with infinitely many pulses and perfectly known
    vacuum and single-photon yields: what Lim's finite key must stay below."""
    q_z = p_z**2
    y1, e1 = single_photon_truth(hw, distance_km, inten)
    tau0 = sum(math.exp(-mu) * p for mu, p in zip(inten.mus, inten.ps, strict=True))
    tau1 = sum(mu * math.exp(-mu) * p for mu, p in zip(inten.mus, inten.ps, strict=True))
    gains = [gain(hw, mu, distance_km) for mu in inten.mus]
    q_avg = sum(p * g for p, g in zip(inten.ps, gains, strict=True))
    e_avg = (
        sum(
            p * g * qber(hw, mu, distance_km)
            for mu, p, g in zip(inten.mus, inten.ps, gains, strict=True)
        )
        / q_avg
    )
    return q_z * (tau0 * hw.y0 + tau1 * y1 * (1 - h2(e1)) - LEAK_FACTOR * q_avg * h2(e_avg))


# ------------------------------------------------------------------------------------- entropy


def test_h2_values_and_domain() -> None:
    assert h2(0.0) == 0.0
    assert h2(1.0) == 0.0
    assert h2(0.5) == pytest.approx(1.0)
    for p in (0.01, 0.11, 0.3):
        assert h2(p) == pytest.approx(h2(1 - p))
        assert h2(p) == pytest.approx(-p * math.log2(p) - (1 - p) * math.log2(1 - p))
    # The BB84 one-way threshold: 1 - 2 h2(e) = 0 near e = 11 %.
    assert 1 - 2 * h2(0.11) == pytest.approx(0.0, abs=1e-3)
    for bad in (-1e-12, 1.0 + 1e-12, math.nan, math.inf):
        with pytest.raises(ValueError, match="h2"):
            h2(bad)


# ---------------------------------------------------------------------------------- asymptotic


def test_gain_and_qber_match_closed_forms() -> None:
    distance, mu = 50.0, 0.48
    eta = 0.045 * 10 ** (-0.21 * distance / 10)
    q = 1.7e-6 + 1 - math.exp(-eta * mu)
    assert GYS.eta(distance) == pytest.approx(eta, rel=1e-12)
    assert gain(GYS, mu, distance) == pytest.approx(q, rel=1e-12)
    assert qber(GYS, mu, distance) == pytest.approx(
        (1.7e-6 / 2 + 0.033 * (1 - math.exp(-eta * mu))) / q, rel=1e-12
    )
    # Dark counts alone are coin flips.
    assert qber(GYS, 0.0, distance) == pytest.approx(0.5)


def test_gys_infinite_decoy_reaches_ma_2005_distance() -> None:
    # Ma, Qi, Zhao, Lo 2005, Fig. 1: the infinite-decoy GYS curve ends near 142 km.
    distance = max_distance(GYS)
    assert 140.0 < distance < 144.0
    assert optimal_mu(GYS, distance)[1] > 0.0
    assert optimal_mu(GYS, distance + 0.05)[1] == 0.0


def test_optimal_mu_beats_a_grid() -> None:
    for distance in (0.0, 50.0, 120.0):
        mu, rate = optimal_mu(GYS, distance)
        assert rate == pytest.approx(rate_infinite_decoy(GYS, mu, distance))
        grid_best = max(rate_infinite_decoy(GYS, m, distance) for m in np.linspace(0.01, 1.5, 150))
        assert rate >= grid_best
        # The GLLP optimum for GYS-like links is mu of order 0.5 (Ma 2005).
        assert 0.3 < mu < 0.6


def test_vacuum_weak_approaches_infinite_decoy_from_below() -> None:
    distance = 50.0
    mu, _ = optimal_mu(GYS, distance)
    ideal = rate_infinite_decoy(GYS, mu, distance)
    assert vacuum_weak_from_model(GYS, mu, 0.01, distance) == pytest.approx(ideal, rel=0.10)
    # Tighter as nu -> 0, and never above what perfect knowledge of Y1 and e1 gives.
    ratios = [
        vacuum_weak_from_model(GYS, mu, nu, distance) / ideal
        for nu in (0.2, 0.1, 0.05, 0.01, 0.001)
    ]
    assert ratios == sorted(ratios)
    assert ratios[-1] > 0.99
    for distance_km in (0.0, 25.0, 50.0, 100.0, 130.0, 141.0):
        for mu_ in (0.2, 0.48, 0.8):
            bound = rate_infinite_decoy(GYS, mu_, distance_km)
            for nu in (0.001, 0.01, 0.05, 0.1, 0.15):
                assert vacuum_weak_from_model(GYS, mu_, nu, distance_km) <= bound * (1 + 1e-12)


def test_vacuum_weak_distance_below_infinite_decoy() -> None:
    nu = 0.05

    def rate(hw: Hardware, mu: float, distance_km: float) -> float:
        return vacuum_weak_from_model(hw, mu, nu, distance_km) if mu > nu else 0.0

    assert 135.0 < max_distance(GYS, rate) <= max_distance(GYS)


def test_vacuum_weak_fails_closed_on_contradictory_data() -> None:
    mu, nu, distance = 0.48, 0.05, 50.0
    args = (gain(GYS, mu, distance), qber(GYS, mu, distance), gain(GYS, nu, distance))
    # Decoy errors below what the dark counts alone must produce: no positive rate.
    assert rate_vacuum_weak(*args, 0.0, GYS.y0, mu, nu, GYS.f_ec) == 0.0
    # A decoy gain that cannot hold any single photons: no positive rate.
    assert rate_vacuum_weak(args[0], args[1], GYS.y0, 0.5, GYS.y0, mu, nu, GYS.f_ec) == 0.0
    # Decoy errors near 90 %: e1 bounded above 1/2 says nothing, it must not fold back through
    # h2's symmetry into a small phase error (the signal QBER of 1 % keeps the leak small).
    assert rate_vacuum_weak(args[0], 0.01, args[2], 0.9, GYS.y0, mu, nu, GYS.f_ec) == 0.0
    with pytest.raises(ValueError, match="nu < mu"):
        rate_vacuum_weak(*args, 0.02, GYS.y0, nu, mu, GYS.f_ec)


def test_hardware_validation() -> None:
    with pytest.raises(ValueError, match="eta_bob"):
        Hardware(eta_bob=0.0)
    with pytest.raises(ValueError, match="f_ec"):
        Hardware(f_ec=0.9)
    with pytest.raises(ValueError, match="distance"):
        GYS.eta(-1.0)
    assert max_distance(Hardware(alpha_db_per_km=0.0)) == math.inf


# --------------------------------------------------------------------------------- finite key


def lim_by_hand(block: Block, inten: Intensities, sec: Security) -> float:
    """Lim et al. 2014 eqs. (1)-(5) written out once more, plainly, for one non-degenerate block."""
    ln = math.log(21 / sec.eps_sec)
    mus, ps = inten.mus, inten.ps

    def pm(counts: tuple[int, int, int]) -> tuple[list[float], list[float]]:
        d = math.sqrt(sum(counts) / 2 * ln)
        lo = [math.exp(mus[k]) / ps[k] * (counts[k] - d) for k in range(3)]
        hi = [math.exp(mus[k]) / ps[k] * (counts[k] + d) for k in range(3)]
        return lo, hi

    t0 = sum(ps[k] * math.exp(-mus[k]) for k in range(3))
    t1 = sum(ps[k] * math.exp(-mus[k]) * mus[k] for k in range(3))
    m1, m2, m3 = mus

    def s0_s1(counts: tuple[int, int, int]) -> tuple[float, float]:
        lo, hi = pm(counts)
        s0 = max(0.0, t0 * (m2 * lo[2] - m3 * hi[1]) / (m2 - m3))
        s1 = (
            t1
            * m1
            * (lo[1] - hi[2] - (m2**2 - m3**2) / m1**2 * (hi[0] - s0 / t0))
            / (m1 * (m2 - m3) - m2**2 + m3**2)
        )
        return s0, s1

    sz0, sz1 = s0_s1(block.counts.n_z)
    _, sx1 = s0_s1(block.counts.n_x)
    m_lo, m_hi = pm(block.counts.m_x)
    vx1 = t1 * (m_hi[1] - m_lo[2]) / (m2 - m3)
    b = vx1 / sx1
    c, d = sz1, sx1
    gamma = math.sqrt(
        (c + d)
        * (1 - b)
        * b
        / (c * d * math.log(2))
        * math.log2((c + d) / (c * d * (1 - b) * b) * 21**2 / sec.eps_sec**2)
    )
    phi = min(b + gamma, 0.5)
    return (
        sz0
        + sz1 * (1 - h2(phi))
        - block.leak_ec
        - 6 * math.log2(21 / sec.eps_sec)
        - math.log2(2 / sec.eps_cor)
    )


# With METRO's dark counts the vacuum class never clears the Hoeffding margin and s_0 clips to
# 0; noisier detectors and a more frequent vacuum-like decoy make s_0 positive, so its part in
# s_1 and in the key length is exercised too.
NOISY = Hardware(alpha_db_per_km=0.2, eta_bob=0.1, e_d=0.01, y0=1e-5)
INTEN_VACUUM_HEAVY = Intensities(mu1=0.5, mu2=0.1, mu3=0.0002, p1=0.6, p2=0.2, p3=0.2)


@pytest.mark.parametrize(
    ("n_pulses", "hw", "inten"),
    [
        (1e9, METRO, INTEN),
        (1e11, METRO, INTEN),
        (1e11, NOISY, INTEN_VACUUM_HEAVY),
        (1e12, NOISY, INTEN_VACUUM_HEAVY),
    ],
)
def test_finite_key_matches_the_paper_formulas(
    n_pulses: float, hw: Hardware, inten: Intensities
) -> None:
    block = model_block(n_pulses, hw=hw, inten=inten)
    sec = Security()
    result = finite_key_length(block.counts, inten, block.leak_ec, sec)
    assert result.key_length == math.floor(lim_by_hand(block, inten, sec))
    if hw is NOISY:
        assert 0.0 < result.s_z0 < inten.tau(0) * n_pulses * P_Z**2 * hw.y0
    assert result.leak_ec == block.leak_ec
    assert result.n_z == sum(block.counts.n_z)
    assert result.ok()


def test_finite_key_converges_to_asymptotic_rate_from_below() -> None:
    asymptotic = asymptotic_rate()
    assert asymptotic > 0.0
    rates = []
    for n_pulses in (1e9, 1e10, 1e11, 1e12):
        block = model_block(n_pulses)
        result = finite_key_length(block.counts, INTEN, block.leak_ec)
        assert result.ok()
        rates.append(result.key_length / n_pulses)
    assert all(0.0 < r < asymptotic for r in rates)
    assert rates == sorted(rates)
    assert len(set(rates)) == len(rates)
    # Two decoys cannot pin Y1 down exactly, so the limit sits a few per cent below.
    assert rates[-1] > 0.85 * asymptotic


def test_finite_bounds_bracket_the_truth() -> None:
    y1, e1 = single_photon_truth(METRO, METRO_KM, INTEN)
    q_z, q_x = P_Z**2, (1 - P_Z) ** 2
    tau1 = INTEN.tau(1)
    for n_pulses in (1e9, 1e10, 1e12):
        result = finite_key_length(*_args(model_block(n_pulses)))
        assert 0.0 < result.s_z1 < tau1 * n_pulses * q_z * y1
        assert 0.0 < result.s_x1 < tau1 * n_pulses * q_x * y1
        assert result.v_x1 > tau1 * n_pulses * q_x * y1 * e1
        assert e1 < result.phi_z <= 0.5
        assert 0.0 <= result.s_z0 <= INTEN.tau(0) * n_pulses * q_z * METRO.y0
    big = finite_key_length(*_args(model_block(1e12)))
    assert big.s_z1 > 0.9 * tau1 * 1e12 * q_z * y1


def _args(block: Block) -> tuple[BlockCounts, Intensities, int]:
    return block.counts, INTEN, block.leak_ec


def test_small_blocks_give_no_key() -> None:
    for n_pulses in (1e6, 1e7):
        result = finite_key_length(*_args(model_block(n_pulses)))
        assert result.key_length <= 0
        assert not result.ok()


def test_weaker_security_gives_longer_keys() -> None:
    block = model_block(1e10)
    lengths = [
        finite_key_length(*_args(block), Security(eps_sec=eps)).key_length
        for eps in (1e-15, 1e-10, 1e-5)
    ]
    assert lengths == sorted(lengths)
    assert lengths[0] < lengths[-1]


# ------------------------------------------------------------------------------- fail closed


@pytest.mark.parametrize("n_pulses", [1e9, 1e12])
def test_intercept_resend_gives_no_key(n_pulses: float) -> None:
    # Eve measuring every pulse in a random basis causes 25 % errors in both bases.
    block = model_block(n_pulses, qber_x=0.25, qber_z=0.25)
    result = finite_key_length(*_args(block))
    assert result.key_length <= 0
    assert result.phi_z >= 0.25


@pytest.mark.parametrize("n_pulses", [1e9, 1e12])
def test_random_test_basis_gives_no_key_even_with_a_clean_key_basis(n_pulses: float) -> None:
    # A quiet Z basis (small leak) must not buy key when X shows no correlation at all.
    block = model_block(n_pulses, qber_x=0.5)
    result = finite_key_length(*_args(block))
    assert result.phi_z == 0.5
    assert result.key_length <= 0


def test_missing_test_basis_data_gives_no_key() -> None:
    good = model_block(1e11)
    no_x = BlockCounts(n_z=good.counts.n_z, n_x=(0, 0, 0), m_x=(0, 0, 0))
    result = finite_key_length(no_x, INTEN, good.leak_ec)
    assert result.s_z1 > 0.0
    assert result.s_x1 == 0.0
    assert result.key_length <= 0
    # Error-free X data give no phase-error evidence: v_x1 = 0 would make gamma vanish.
    no_errors = BlockCounts(n_z=good.counts.n_z, n_x=good.counts.n_x, m_x=(0, 0, 0))
    assert finite_key_length(no_errors, INTEN, good.leak_ec).key_length <= 0
    # Nothing detected at all.
    empty = BlockCounts(n_z=(0, 0, 0), n_x=(0, 0, 0), m_x=(0, 0, 0))
    assert finite_key_length(empty, INTEN, 0).key_length <= 0


def test_starved_test_basis_decoy_gives_no_key() -> None:
    # X errors exist (v_x1 > 0) but no weak-decoy X detections: s_x1 cannot be bounded.
    good = model_block(1e11)
    starved = BlockCounts(
        n_z=good.counts.n_z,
        n_x=(good.counts.n_x[0], 0, good.counts.n_x[2]),
        m_x=(good.counts.m_x[0], 0, good.counts.m_x[2]),
    )
    result = finite_key_length(starved, INTEN, good.leak_ec)
    assert result.v_x1 > 0.0
    assert result.s_x1 == 0.0
    assert result.key_length <= 0


def test_starved_decoy_gives_no_key() -> None:
    # No weak-decoy detections in Z: the single-photon bound has nothing to stand on, and even
    # with a zero leak the result must not be positive.
    good = model_block(1e11).counts
    starved = BlockCounts(n_z=(good.n_z[0], 0, good.n_z[2]), n_x=good.n_x, m_x=good.m_x)
    result = finite_key_length(starved, INTEN, 0)
    assert result.s_z1 == 0.0
    assert result.key_length <= 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n_z": (10, -1, 0)}, r"n_z\[1\]"),
        ({"n_x": (10, 5, -3)}, r"n_x\[2\]"),
        ({"m_x": (1, 6, 0)}, r"m_x\[1\]"),
        ({"m_x": (1, 0, 1)}, r"m_x\[2\]"),
        ({"n_z": (10, 5)}, "n_z"),
        ({"n_x": (10, 5.0, 1)}, r"n_x\[1\]"),
        ({"m_x": (True, 0, 0)}, r"m_x\[0\]"),
    ],
)
def test_malformed_counts_raise_naming_the_field(kwargs: dict[str, object], field: str) -> None:
    fields: dict[str, object] = {"n_z": (10, 5, 0), "n_x": (10, 5, 0), "m_x": (1, 0, 0)}
    fields.update(kwargs)
    with pytest.raises(EstimationError, match=field):
        BlockCounts(**fields)  # type: ignore[arg-type]


def test_counts_accept_numpy_integers() -> None:
    arr = np.array([1000, 200, 3], dtype=np.int64)
    counts = BlockCounts(n_z=tuple(arr), n_x=tuple(arr), m_x=(10, 2, 1))
    # Plain ints after validation: numpy scalars would leak into arithmetic and JSON telemetry.
    assert all(type(n) is int for n in (*counts.n_z, *counts.n_x))
    assert counts.n_z == (1000, 200, 3)


def test_negative_leak_raises() -> None:
    block = model_block(1e10)
    with pytest.raises(EstimationError, match="leak_ec_bits"):
        finite_key_length(block.counts, INTEN, -1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"eps_sec": 0.0},
        {"eps_sec": 1.0},
        {"eps_cor": 0.0},
        {"eps_cor": -1e-9},
        {"eps_sec": math.nan},
    ],
)
def test_security_parameters_validated(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="eps_"):
        Security(**kwargs)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ((0.5, 0.3, 0.25, 0.8, 0.15, 0.05), "mu1 > mu2"),
        ((0.5, 0.1, 0.1, 0.8, 0.15, 0.05), "mu2 > mu3"),
        ((0.5, 0.1, -0.01, 0.8, 0.15, 0.05), "mu3"),
        ((0.5, 0.1, 0.0, 0.8, 0.2, 0.0), "p3"),
        ((0.5, 0.1, 0.0, 0.8, 0.15, 0.1), "p1 \\+ p2 \\+ p3"),
        ((math.inf, 0.1, 0.0, 0.8, 0.15, 0.05), "mu1"),
    ],
)
def test_intensities_validated(values: tuple[float, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Intensities(*values)
