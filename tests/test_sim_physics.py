"""The simulated link against the textbook model, and the sim drivers' behaviour.

Textbook (Ma et al., PRA 72, 012326, 2005): ``eta = eta_det * 10^(-alpha L / 10)``,
gain ``Q_mu = Y0 + 1 - exp(-eta mu)``, error ``E_mu Q_mu = Y0/2 + e_d (1 - exp(-eta mu))``
with ``Y0`` the dark-click probability per slot of the whole receiver.
Intercept-resend on a fraction ``p`` adds ``p (1/4 - e_d/2)`` (about ``p/4``).

Every figure is compared within 5 standard deviations of its own statistics,
with fixed seeds.  Sifting here is plain numpy from Alice's ``choices_at``
and Bob's tags with the known clock (the real lock is the kernel's job).
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from qnoded_drivers.sim.common import LINK_KEY
from qnoded_drivers.sim.detector import SimSNSPD, SimSPAD
from qnoded_drivers.sim.laser import SimLaser
from qnoded_drivers.sim.link import LinkParams, hash_uniform
from qnoded_drivers.sim.tagger import SimTimeTagger

from qnoded.contracts import DriverContext, IntensityClass, TagBatch
from qnoded.ingest import BatchValidator

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]

# Detector settings for the textbook checks: dead time shorter than a slot and
# no afterpulses (the textbook model has neither); a dark rate high enough that
# Y0 matters.
TEXTBOOK_SPAD = {
    "efficiency": 0.10,
    "dark_count_rate_hz": 10_000.0,
    "dead_time_ps": 5_000,
    "afterpulse_probability": 0.0,
    "jitter_ps": 350.0,
}
BASE_BB84: dict[str, Any] = {
    "link_seed": 11,
    "alice_qrng_seed": 22,
    "pulse_rate_hz": 1e8,
    "sync_duration_ps": 0,  # key stream from the start
    "misalignment": 0.01,
    "bob_clock_offset_ps": 123_456_789,
}


def _bob(
    sim: dict[str, Any],
    det_options: dict[str, Any] | None = None,
    *,
    protocol: str = "bb84",
    role: str = "bob",
    det_cls: type[SimSPAD] | type[SimSNSPD] = SimSPAD,
) -> tuple[SimTimeTagger, list[SimSPAD | SimSNSPD], DriverContext]:
    ctx = DriverContext(node_id=role, role=role, protocol=protocol, simulation=dict(sim))
    dets = [det_cls(f"det{ch}", {"channel": ch, **(det_options or {})}, ctx) for ch in range(4)]
    return SimTimeTagger("tagger", {}, ctx), dets, ctx


def _laser(sim: dict[str, Any]) -> SimLaser:
    ctx = DriverContext(node_id="alice", role="alice", protocol="bb84", simulation=dict(sim))
    return SimLaser("laser", {}, ctx)


async def _acollect(tagger: SimTimeTagger, n: int) -> list[TagBatch]:
    out: list[TagBatch] = []
    async with tagger:
        async for batch in tagger.stream():
            out.append(batch)
            if len(out) == n:
                break
    return out


def _collect(tagger: SimTimeTagger, n: int) -> list[TagBatch]:
    return asyncio.run(_acollect(tagger, n))


def _cat(batches: list[TagBatch]) -> tuple[I64, U8]:
    return (
        np.concatenate([b.timestamps_ps for b in batches]),
        np.concatenate([b.channels for b in batches]),
    )


def _true_time(t_bob: I64, p: LinkParams) -> npt.NDArray[np.float64]:
    return (t_bob - p.bob_clock_offset_ps) / (1.0 + p.drift)


def _slot_range(batches: list[TagBatch], p: LinkParams) -> tuple[int, int]:
    """Slots whose photons arrive within the batches' span (Bob's clock)."""
    t0 = (batches[0].start_ps - p.bob_clock_offset_ps) / (1 + p.drift)
    t1 = (batches[-1].stop_ps - p.bob_clock_offset_ps) / (1 + p.drift)
    return math.ceil((t0 - p.flight_ps) / p.period_ps), math.ceil((t1 - p.flight_ps) / p.period_ps)


def _squash(t_bob: I64, ch: U8, p: LinkParams, rng: np.random.Generator) -> tuple[I64, U8, U8]:
    """Detected slots, Bob's basis and bit; a multi-click slot keeps one
    random click (the squashing of the textbook's threshold detector)."""
    slot = np.rint((_true_time(t_bob, p) - p.flight_ps) / p.period_ps).astype(np.int64)
    order = np.lexsort((rng.random(int(slot.shape[0])), slot))
    slot, ch = slot[order], ch[order]
    first = np.ones(slot.shape[0], dtype=bool)
    first[1:] = slot[1:] != slot[:-1]
    return slot[first], (ch[first] // 2).astype(np.uint8), (ch[first] % 2).astype(np.uint8)


def _within(measured: float, expected: float, sigma: float, k: float = 5.0) -> None:
    assert abs(measured - expected) <= k * sigma, (
        f"measured {measured:.6g}, expected {expected:.6g} +- {sigma:.3g} "
        f"({(measured - expected) / sigma:+.1f} sigma)"
    )


def _bb84_run(sim: dict[str, Any], n_batches: int, seed_bob: int | None = None) -> dict[str, Any]:
    """Stream Bob, sift against Alice's laser; gains per class and signal QBER."""
    bob_sim = dict(sim) if seed_bob is None else sim | {"alice_qrng_seed": seed_bob}
    tagger, _, ctx = _bob(bob_sim, TEXTBOOK_SPAD)
    laser = _laser(sim)
    p: LinkParams = ctx.shared[LINK_KEY].p
    batches = _collect(tagger, n_batches)
    k0, k1 = _slot_range(batches, p)
    slots, b_basis, b_bit = _squash(*_cat(batches), p, np.random.default_rng(5))
    inside = (slots >= k0) & (slots < k1)
    slots, b_basis, b_bit = slots[inside], b_basis[inside], b_bit[inside]
    pulses = laser.count_classes(k0, k1 - k0)
    alice = laser.choices_at(slots)
    out: dict[str, Any] = {"p": p, "pulses": pulses}
    for cls in (IntensityClass.SIGNAL, IntensityClass.DECOY, IntensityClass.VACUUM):
        out[f"det_{cls.name}"] = int(np.count_nonzero(alice.intensity == cls))
    sift = (alice.intensity == IntensityClass.SIGNAL) & (alice.basis == b_basis)
    out["sifted"] = int(np.count_nonzero(sift))
    out["errors"] = int(np.count_nonzero(alice.bit[sift] != b_bit[sift]))
    return out


def _textbook(p: LinkParams, mu: float, eve: float = 0.0) -> tuple[float, float, float]:
    """Y0, Q_mu and E_mu (with intercept-resend on a fraction ``eve``)."""
    eff = TEXTBOOK_SPAD["efficiency"]
    eta = eff * p.transmittance
    y0 = 1 - (1 - TEXTBOOK_SPAD["dark_count_rate_hz"] * p.period_ps * 1e-12) ** 4
    signal = -math.expm1(-eta * mu)
    e_photon = (1 - eve) * p.misalignment + eve * (0.25 + p.misalignment / 2)
    q = y0 + signal
    return y0, q, (y0 / 2 + e_photon * signal) / q


# -- BB84 against the textbook ---------------------------------------------------------
@pytest.mark.parametrize("distance_km", [25.0, 50.0])
def test_bb84_gain_and_qber_match_textbook(distance_km: float) -> None:
    sim = BASE_BB84 | {"distance_km": distance_km}
    r = _bb84_run(sim, 40)
    p = r["p"]
    y0, q_sig, e_sig = _textbook(p, p.mu_signal)
    _, q_dec, _ = _textbook(p, p.mu_decoy)
    n_sig = int(r["pulses"][IntensityClass.SIGNAL])
    n_dec = int(r["pulses"][IntensityClass.DECOY])
    n_vac = int(r["pulses"][IntensityClass.VACUUM])
    for det, n, q in (
        (r["det_SIGNAL"], n_sig, q_sig),
        (r["det_DECOY"], n_dec, q_dec),
        (r["det_VACUUM"], n_vac, y0),
    ):
        _within(det / n, q, math.sqrt(q * (1 - q) / n))
    e = r["errors"] / r["sifted"]
    _within(e, e_sig, math.sqrt(e_sig * (1 - e_sig) / r["sifted"]))
    # and the sifted fraction is 1/2 (passive basis choice)
    _within(r["sifted"] / r["det_SIGNAL"], 0.5, math.sqrt(0.25 / r["det_SIGNAL"]))


@pytest.mark.parametrize("eve", [0.5, 1.0])
def test_intercept_resend_adds_a_quarter_of_its_fraction(eve: float) -> None:
    sim = BASE_BB84 | {"distance_km": 25.0, "eve_fraction": eve}
    r = _bb84_run(sim, 15)
    p = r["p"]
    _, _, e_expected = _textbook(p, p.mu_signal, eve)
    _, _, e_clean = _textbook(p, p.mu_signal)
    e = r["errors"] / r["sifted"]
    sigma = math.sqrt(e_expected * (1 - e_expected) / r["sifted"])
    _within(e, e_expected, sigma)
    assert abs((e - e_clean) - eve / 4) < 0.01 + 5 * sigma
    # Eve does not change the loss: the gain is the textbook one
    _, q_sig, _ = _textbook(p, p.mu_signal)
    n_sig = int(r["pulses"][IntensityClass.SIGNAL])
    _within(r["det_SIGNAL"] / n_sig, q_sig, math.sqrt(q_sig / n_sig))


def test_other_alice_seed_at_bob_gives_half_errors_but_timing_still_locks() -> None:
    sim = BASE_BB84 | {"distance_km": 25.0}
    r = _bb84_run(sim, 10, seed_bob=sim["alice_qrng_seed"] + 1)
    e = r["errors"] / r["sifted"]
    _within(e, 0.5, math.sqrt(0.25 / r["sifted"]))
    # The sync pattern is public (link_seed): Bob's clicks still follow it.
    sync_sim = sim | {"sync_duration_ps": 10**12, "sync_density": 0.05}
    tagger, _, ctx = _bob(sync_sim | {"alice_qrng_seed": 999}, {"dead_time_ps": 5_000})
    p = ctx.shared[LINK_KEY].p
    slots, _, _ = _squash(*_cat(_collect(tagger, 5)), p, np.random.default_rng(1))
    slots = slots[slots >= 0]
    sync = _laser(sync_sim).sync_slots(int(slots.min()), int(slots.max() - slots.min() + 1))
    on_pattern = np.isin(slots, sync).mean()
    assert on_pattern > 0.9, on_pattern  # the rest: dark clicks in other gates


def test_gain_works_from_1e6_to_1e9_pulses_per_second() -> None:
    for rate, n_batches in ((1e6, 20), (1e9, 2)):
        sim = BASE_BB84 | {"pulse_rate_hz": rate, "batch_duration_ps": 10**10}
        tagger, _, ctx = _bob(sim, TEXTBOOK_SPAD | {"dead_time_ps": min(5000, int(5e11 / rate))})
        p = ctx.shared[LINK_KEY].p
        batches = _collect(tagger, n_batches)
        k0, k1 = _slot_range(batches, p)
        slots, _, _ = _squash(*_cat(batches), p, np.random.default_rng(2))
        n_det = int(np.count_nonzero((slots >= k0) & (slots < k1)))
        # all classes together: sum of p_class * Q_class
        y0 = 1 - (1 - TEXTBOOK_SPAD["dark_count_rate_hz"] / rate) ** 4
        eta = 0.1 * p.transmittance
        q = sum(
            pc * (y0 + -math.expm1(-eta * mu))
            for pc, mu in ((p.p_signal, p.mu_signal), (p.p_decoy, p.mu_decoy), (0.1, 0.0))
        )
        n = k1 - k0
        _within(n_det / n, q, math.sqrt(q / n))


# -- clocks, batches, determinism ------------------------------------------------------
@pytest.mark.parametrize(("offset", "drift"), [(10**9, 50.0), (-(10**9), -80.0), (0, 0.0)])
def test_bob_clock_offset_and_drift_are_applied(offset: int, drift: float) -> None:
    sim = BASE_BB84 | {"bob_clock_offset_ps": offset, "bob_clock_drift_ppm": drift}
    tagger, _, ctx = _bob(sim, TEXTBOOK_SPAD)
    p = ctx.shared[LINK_KEY].p
    batches = _collect(tagger, 10)
    dur = p.batch_duration_ps
    assert batches[0].start_ps == -(-offset // dur) * dur  # first batch: at true time ~0
    t, _ = _cat(batches)
    # the known clock map puts every click at its gate, within the jitter
    rel = _true_time(t, p) - p.flight_ps
    resid = rel - np.rint(rel / p.period_ps) * p.period_ps
    assert np.mean(np.abs(resid) < 5 * 350) > 0.999
    assert np.std(resid) == pytest.approx(350, rel=0.1)
    if drift:
        # ignoring the drift scatters the clicks over the slot (0.1 s * 50 ppm = 5 us)
        rel = t - offset - p.flight_ps
        resid = rel - np.rint(rel / p.period_ps) * p.period_ps
        assert np.mean(np.abs(resid) < 5 * 350) < 0.5


def test_batches_are_sorted_contiguous_and_inside_their_interval() -> None:
    sim = BASE_BB84 | {"batch_duration_ps": 1_000_000_000, "bob_clock_offset_ps": -777_777_777}
    tagger, _, _ = _bob(sim, {"jitter_ps": 2000.0})
    batches = _collect(tagger, 40)
    validator = BatchValidator("sim")
    for i, b in enumerate(batches):
        validator.check(b)
        assert b.seq == i
        assert b.stop_ps - b.start_ps == 1_000_000_000
        assert b.timestamps_ps.dtype == np.int64
        assert b.channels.dtype == np.uint8
        assert np.all(np.diff(b.timestamps_ps) >= 0)
        if len(b):
            assert b.start_ps <= b.timestamps_ps[0]
            assert b.timestamps_ps[-1] < b.stop_ps
        if i:
            assert b.start_ps == batches[i - 1].stop_ps
    assert validator.missed_batches == 0
    assert sum(len(b) for b in batches) > 1000


def test_a_reopened_stream_continues_where_it_stopped() -> None:
    sim = BASE_BB84 | {"batch_duration_ps": 1_000_000_000}
    whole = _collect(_bob(sim)[0], 6)
    tagger = _bob(sim)[0]

    async def twice() -> list[TagBatch]:
        out: list[TagBatch] = []
        async with tagger:
            for _ in range(2):
                async for batch in tagger.stream():
                    out.append(batch)
                    if len(out) % 3 == 0:
                        break
        return out

    parts = asyncio.run(twice())
    assert [b.seq for b in parts] == list(range(6))
    for a, b in zip(whole, parts, strict=True):
        assert (a.start_ps, a.stop_ps) == (b.start_ps, b.stop_ps)
        np.testing.assert_array_equal(a.timestamps_ps, b.timestamps_ps)
        np.testing.assert_array_equal(a.channels, b.channels)


def test_same_seeds_give_identical_batches_and_other_seeds_do_not() -> None:
    sim = BASE_BB84 | {"batch_duration_ps": 2_000_000_000}
    a = _collect(_bob(sim)[0], 3)
    b = _collect(_bob(sim)[0], 3)
    c = _collect(_bob(sim | {"link_seed": 12})[0], 3)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.timestamps_ps, y.timestamps_ps)
        np.testing.assert_array_equal(x.channels, y.channels)
    assert not np.array_equal(_cat(a)[0], _cat(c)[0])


def test_channel_delay_shifts_only_that_channel_across_batch_boundaries() -> None:
    sim = BASE_BB84 | {"batch_duration_ps": 1_000_000_000}
    plain = _collect(_bob(sim)[0], 12)
    tagger = _bob(sim)[0]
    delay = 2_500_000  # 2.5 batches' worth of nothing: tags move into later batches
    asyncio.run(tagger.set_delay(0, delay))
    assert tagger.delay(0) == delay
    shifted = _collect(tagger, 12)
    t0, c0 = _cat(plain)
    t1, c1 = _cat(shifted)
    lo, hi = plain[0].start_ps, plain[-1].stop_ps
    for ch in (1, 2, 3):
        np.testing.assert_array_equal(t0[c0 == ch], t1[c1 == ch])
    want = t0[c0 == 0] + delay
    np.testing.assert_array_equal(t1[c1 == 0], want[(want >= lo) & (want < hi)])


# -- detector physics ------------------------------------------------------------------
def test_dead_time_is_respected_with_afterpulses_on() -> None:
    dead = 1_000_000
    sim = BASE_BB84 | {"distance_km": 0.0, "batch_duration_ps": 1_000_000_000}
    opts = {"dead_time_ps": dead, "afterpulse_probability": 0.2, "afterpulse_decay_ps": 500_000}
    tagger, _, _ = _bob(sim, opts)
    t, ch = _cat(_collect(tagger, 20))
    for c in range(4):
        tc = t[ch == c]
        assert tc.shape[0] > 1000  # saturated: ~ 1 click per dead time
        assert int(np.diff(tc).min()) >= dead
    # afterpulses add clicks: compare with none, at a low light level
    low = BASE_BB84 | {"distance_km": 100.0, "batch_duration_ps": 1_000_000_000}
    none = sum(len(b) for b in _collect(_bob(low, opts | {"afterpulse_probability": 0.0})[0], 20))
    some = sum(len(b) for b in _collect(_bob(low, opts)[0], 20))
    # each click makes a cascade of 1/(1-p) - 1 = 0.25 afterpulses on average
    _within(some / none, 1.25, 1.25 * math.sqrt(2 / none) + 0.02)


@pytest.mark.asyncio
async def test_latched_detector_goes_blind_and_recovers() -> None:
    sim = BASE_BB84 | {"distance_km": 5.0, "batch_duration_ps": 1_000_000_000}
    tagger, dets, _ = _bob(sim)
    counts = []
    async with tagger:
        async for batch in tagger.stream():
            per_ch = np.bincount(batch.channels, minlength=4)
            counts.append(per_ch)
            if batch.seq == 2:
                dets[1].latch()
                st = await dets[1].status()
                assert st.latched
                assert st.count_rate_hz == 0.0
            if batch.seq == 6:
                assert await dets[1].reset_latch()
                assert not (await dets[1].status()).latched
            if batch.seq == 9:
                break
    assert all(c[1] > 0 for c in counts[:3])
    assert all(c[1] == 0 for c in counts[3:7])  # from the very next batch
    assert all(c[0] > 0 for c in counts[3:7])  # the others keep counting
    assert counts[-1][1] > 0  # counting again after the reset
    st = await dets[1].status()
    assert st.count_rate_hz == pytest.approx(counts[-1][1] / 1e-3)


# -- BBM92 -----------------------------------------------------------------------------
BBM92: dict[str, Any] = {
    "link_seed": 31,
    "alice_qrng_seed": 32,
    "distance_km": 25.0,
    "pair_rate_hz": 1e6,
    "misalignment": 0.02,
    "bob_clock_offset_ps": -400_000_000,
    "bob_clock_drift_ppm": 3.0,
}
SNSPD = {"dead_time_ps": 1_000, "jitter_ps": 30.0, "dark_count_rate_hz": 100.0}


def _bbm92(sim: dict[str, Any], n: int, bob_sim: dict[str, Any] | None = None) -> dict[str, float]:
    """Alice's and Bob's taggers (separate links, as in two processes); the
    coincidences found with the known clock and flight time."""
    ta, _, _ = _bob(sim, SNSPD, protocol="bbm92", role="alice", det_cls=SimSNSPD)
    tb, _, ctx = _bob(bob_sim or sim, SNSPD, protocol="bbm92", role="bob", det_cls=SimSNSPD)
    p: LinkParams = ctx.shared[LINK_KEY].p
    a_batches, b_batches = _collect(ta, n), _collect(tb, n)
    t_a, c_a = _cat(a_batches)
    t_b, c_b = _cat(b_batches)
    # Bob's tags to Alice's frame (known clock), then nearest Alice tag
    t_b_true = _true_time(t_b, p) - p.flight_ps
    t_end = min(a_batches[-1].stop_ps, _true_time(np.array([b_batches[-1].stop_ps]), p)[0])
    t_start = max(0.0, _true_time(np.array([b_batches[0].start_ps]), p)[0])
    keep_b = (t_b_true >= t_start) & (t_b_true < t_end - p.flight_ps)
    t_b_true, c_b = t_b_true[keep_b], c_b[keep_b]
    keep_a = (t_a >= t_start) & (t_a < t_end - p.flight_ps)
    t_a, c_a = t_a[keep_a], c_a[keep_a]
    window = 300.0
    i = np.clip(np.searchsorted(t_a, t_b_true), 1, t_a.shape[0] - 1)
    near = np.where(np.abs(t_a[i - 1] - t_b_true) < np.abs(t_a[i] - t_b_true), i - 1, i)
    coinc = np.abs(t_a[near] - t_b_true) < window
    ca, cb = c_a[near[coinc]], c_b[coinc]
    same = ca // 2 == cb // 2
    seconds = (t_end - p.flight_ps - t_start) * 1e-12
    return {
        "seconds": seconds,
        "coincidences": float(np.count_nonzero(coinc)),
        "singles_a": t_a.shape[0] / seconds,
        "singles_b": t_b_true.shape[0] / seconds,
        "sifted": float(np.count_nonzero(same)),
        "errors": float(np.count_nonzero(ca[same] % 2 != cb[same] % 2)),
        "window": 2 * window,
        "eta_b": 0.85 * p.transmittance,
    }


@pytest.mark.parametrize("eve", [0.0, 1.0])
def test_bbm92_coincidences_and_qber(eve: float) -> None:
    r = _bbm92(BBM92 | {"eve_fraction": eve}, 20)
    eta_a, eta_b = 0.85, r["eta_b"]
    # singles: pairs seen on each side (+ dark counts)
    _within(r["singles_a"], 1e6 * eta_a + 400, math.sqrt(1e6 * eta_a / r["seconds"]))
    _within(r["singles_b"], 1e6 * eta_b + 400, math.sqrt(1e6 * eta_b / r["seconds"]))
    accidental = r["singles_a"] * r["singles_b"] * r["window"] * 1e-12
    want = (1e6 * eta_a * eta_b + accidental) * r["seconds"]
    _within(r["coincidences"], want, math.sqrt(want))
    _within(r["sifted"] / r["coincidences"], 0.5, math.sqrt(0.25 / r["coincidences"]))
    e_d = BBM92["misalignment"]
    acc_frac = accidental * r["seconds"] / r["coincidences"]
    e_true = (1 - eve) * e_d + eve * (0.25 + e_d / 2)
    e_want = e_true * (1 - acc_frac) + 0.5 * acc_frac
    e = r["errors"] / r["sifted"]
    _within(e, e_want, math.sqrt(e_want * (1 - e_want) / r["sifted"]))


def test_bbm92_other_alice_seed_at_bob_gives_half_errors() -> None:
    r = _bbm92(BBM92, 5, bob_sim=BBM92 | {"alice_qrng_seed": 33})
    # timing is public (link_seed): the coincidences are all there ...
    assert r["coincidences"] > 0.9 * 1e6 * 0.85 * r["eta_b"] * r["seconds"]
    # ... but Bob's hidden bits are not Alice's
    e = r["errors"] / r["sifted"]
    _within(e, 0.5, math.sqrt(0.25 / r["sifted"]))


# -- the laser and the hash ------------------------------------------------------------
def test_laser_choices_are_the_links_and_counts_are_exact() -> None:
    sim = BASE_BB84 | {"sync_duration_ps": 5_000_000_000, "sync_density": 0.01}
    laser = _laser(sim)
    p = LinkParams.from_mapping(sim)
    assert laser.period_ps == 10_000
    end = p.sync_end_slot
    rec = laser.emissions(end - 200_000, 1_000_000)  # straddles the sync/key switch
    counts = laser.count_classes(end - 200_000, 1_000_000)
    np.testing.assert_array_equal(counts, np.bincount(rec.intensity, minlength=4))
    sync = laser.sync_slots(end - 200_000, 1_000_000)
    assert sync.min() >= end - 200_000 and sync.max() < end
    # Every slot of the window is SYNC to Alice's record, the dark ones too: they
    # are public, so they may be neither key nor decoy-state vacuum pulses.
    assert np.all(rec.intensity[:200_000] == IntensityClass.SYNC)
    assert not np.any(rec.intensity[200_000:] == IntensityClass.SYNC)
    _within(sync.shape[0] / 200_000, 0.01, math.sqrt(0.01 / 200_000))
    assert np.all(rec.basis[:200_000][rec.intensity[:200_000] == IntensityClass.SYNC] == 0)
    key = rec.intensity[200_000:]
    n = key.shape[0]
    for cls, prob in ((0, 0.8), (1, 0.1), (2, 0.1)):
        _within(float(np.mean(key == cls)), prob, math.sqrt(prob * (1 - prob) / n))
    for arr in (rec.basis[200_000:], rec.bit[200_000:]):
        _within(float(arr.mean()), 0.5, math.sqrt(0.25 / n))
    # bits independent of bases and classes
    _within(float(np.mean(rec.bit[200_000:] ^ rec.basis[200_000:])), 0.5, math.sqrt(0.25 / n))
    # choices_at at arbitrary slots agree with emissions
    slots = np.array([end - 1, end, end + 7, end - 199_999], dtype=np.int64)
    picked = laser.choices_at(slots)
    base = end - 200_000
    np.testing.assert_array_equal(picked.intensity, rec.intensity[slots - base])
    np.testing.assert_array_equal(picked.bit, rec.bit[slots - base])
    u = hash_uniform(1, 2, np.arange(100_000, dtype=np.int64))
    assert u.min() >= 0.0 and u.max() < 1.0
    _within(float(u.mean()), 0.5, math.sqrt(1 / 12 / 100_000))


def test_periodic_sync_windows_come_back() -> None:
    """With sync_period_ps the pattern returns every period: a lock dropped later
    (recalibration, a restarted tagger) finds it again at the next window."""
    sim = BASE_BB84 | {
        "sync_duration_ps": 1_000_000_000,
        "sync_period_ps": 4_000_000_000,
        "sync_density": 0.01,
    }
    laser = _laser(sim)
    p = LinkParams.from_mapping(sim)
    period, window = p.sync_period_slots, p.sync_end_slot
    assert (period, window) == (400_000, 100_000)
    first, n = 350_000, 900_000  # the end of window 0's period, windows 1 and 2, into 3
    rec = laser.emissions(first, n)
    slots = np.arange(first, first + n, dtype=np.int64)
    in_window = (slots % period) < window
    is_sync = rec.intensity == IntensityClass.SYNC
    np.testing.assert_array_equal(is_sync, in_window)
    bright = laser.sync_slots(first, n)
    assert bright.shape[0] and np.all(in_window[bright - first])
    np.testing.assert_array_equal(
        laser.count_classes(first, n), np.bincount(rec.intensity, minlength=4)
    )
    assert p.sync_ranges(first, first + n) == [
        (400_000, 500_000),
        (800_000, 900_000),
        (1_200_000, 1_250_000),
    ]
    with pytest.raises(ValueError, match="sync_period_ps"):
        LinkParams.from_mapping(BASE_BB84 | {"sync_duration_ps": 10**9, "sync_period_ps": 10**9})


# -- configuration ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"distnce_km": 3.0}, "distnce_km"),
        ({"distance_km": -1.0}, "distance_km"),
        ({"distance_km": "far"}, "distance_km"),
        ({"mu_signal": True}, "mu_signal"),
        ({"p_signal": 0.95, "p_decoy": 0.1}, "p_decoy"),
        ({"mu_decoy": 0.6}, "mu_decoy"),
        ({"batch_duration_ps": 1.5e9 + 0.5}, "batch_duration_ps"),
        ({"realtime": 1}, "realtime"),
        ({"misalignment": float("nan")}, "misalignment"),
        ({"pulse_rate_hz": 1e12}, "pulse_rate_hz"),
    ],
)
def test_bad_simulation_table_names_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        LinkParams.from_mapping(table)


def test_simulation_table_defaults_and_integral_floats() -> None:
    p = LinkParams.from_mapping({"batch_duration_ps": 1e10, "distance_km": 10})
    assert p.batch_duration_ps == 10_000_000_000
    assert isinstance(p.batch_duration_ps, int)
    assert p.distance_km == 10.0
    assert p.flight_ps == round(10e3 * 1.468 / 299_792_458.0 * 1e12)
    assert LinkParams.from_mapping(None) == LinkParams()


def test_detector_options_are_validated() -> None:
    ctx = DriverContext(node_id="b", role="bob", protocol="bb84", simulation={})
    with pytest.raises(ValueError, match="efficiency"):
        SimSPAD("d", {"channel": 0, "efficiency": 1.5}, ctx)
    with pytest.raises(ValueError, match="mode"):
        SimSPAD("d", {"channel": 0, "mode": "sometimes"}, ctx)
    with pytest.raises(ValueError, match="colour"):
        SimSNSPD("d", {"channel": 0, "colour": "blue"}, ctx)
    det = SimSPAD("d", {"channel": 0, "mode": "free-running"}, ctx)
    assert not det.physics().gated
    with pytest.raises(ValueError, match="channel 0"):
        SimSNSPD("e", {"channel": 0}, ctx)
    with pytest.raises(ValueError, match="tagger"):
        SimTimeTagger("t", {}, DriverContext("a", "alice", "bb84", simulation={}))


def test_realtime_tagger_paces_to_the_wall_clock() -> None:
    sim = BASE_BB84 | {"batch_duration_ps": 5_000_000_000, "realtime": True}
    tagger = _bob(sim)[0]
    t0 = time.monotonic()
    batches = _collect(tagger, 10)
    elapsed = time.monotonic() - t0
    assert [b.seq for b in batches] == list(range(10))
    assert elapsed >= 0.9 * 10 * 5e-3
