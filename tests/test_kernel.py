"""The C kernel: smoke, known answers, hypothesis against the numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qnoded import kernel, kernel_ref

times = hnp.arrays(np.int64, st.integers(0, 200), elements=st.integers(-10_000, 10_000)).map(
    np.sort
)
bits = st.integers(0, 300).flatmap(
    lambda n: st.tuples(
        hnp.arrays(np.uint8, n, elements=st.integers(0, 1)),
        hnp.arrays(np.uint8, n, elements=st.integers(0, 1)),
    )
)


def test_smoke() -> None:
    t = np.arange(0, 1000, 10, dtype=np.int64)
    ia, ib = kernel.coincidences(t, t + 3, window_ps=10)
    np.testing.assert_array_equal(ia, np.arange(100))
    np.testing.assert_array_equal(ib, np.arange(100))


def test_known_answers() -> None:
    a = np.array([0, 100, 200, 300], dtype=np.int64)
    b = np.array([5, 96, 150, 420], dtype=np.int64)
    ia, ib = kernel.coincidences(a, b, window_ps=20)
    assert ia.tolist() == [0, 1]
    assert ib.tolist() == [0, 1]
    ia, ib = kernel.coincidences(a, b, window_ps=20, offset_ps=120)
    assert ia.tolist() == [3]
    assert ib.tolist() == [3]
    # d = b - a over [-100, 100) in 4 bins of 50
    h = kernel.diff_histogram(
        np.array([0], np.int64),
        np.array([-60, -10, 0, 49, 50, 99, 100], np.int64),
        lo_ps=-100,
        bin_ps=50,
        nbins=4,
    )
    assert h.tolist() == [1, 1, 2, 2]
    slots, inside, t0 = kernel.assign_slots(
        np.array([0, 98, 260, 351], np.int64), t0_ps=0, period_ps=100.0, window_ps=20
    )
    assert slots.tolist() == [0, 1, 3, 4]
    assert inside.tolist() == [1, 1, 0, 0]
    assert t0 == 0.0
    assert kernel.sift(
        np.array([0, 1, 1, 0], np.uint8), np.array([0, 0, 1, 1], np.uint8)
    ).tolist() == [0, 2]
    assert kernel.pack_bits(np.array([1, 0, 1, 1, 0, 0, 0, 0, 1], np.uint8)).tolist() == [176, 128]
    assert kernel.count_errors(np.array([1, 0, 1], np.uint8), np.array([1, 1, 0], np.uint8)) == 2


def test_tracking_follows_a_drifting_offset() -> None:
    a = np.arange(0, 10_000_000, 1000, dtype=np.int64)
    drift = (np.arange(a.shape[0]) * 0.05).astype(np.int64)  # 0.05 ps per tag
    b = a + 200 + drift
    ia, _ = kernel.coincidences(a, b, window_ps=40, offset_ps=200)
    assert ia.shape[0] < a.shape[0]  # a fixed offset loses the pairs
    ia, _, off = kernel.coincidences_tracked(a, b, window_ps=40, offset_ps=200, track_gain=0.1)
    assert ia.shape[0] == a.shape[0]
    assert off == pytest.approx(200 + drift[-1], abs=5)


@settings(max_examples=300, deadline=None)
@given(times, times, st.integers(0, 500), st.integers(-300, 300), st.sampled_from([0.0, 0.1, 0.5]))
def test_coincidences_equal_reference(
    a: np.ndarray, b: np.ndarray, window: int, offset: int, gain: float
) -> None:
    got = kernel.coincidences_tracked(a, b, window_ps=window, offset_ps=offset, track_gain=gain)
    ref = kernel_ref.coincidences_tracked(a, b, window_ps=window, offset_ps=offset, track_gain=gain)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])
    assert got[2] == pytest.approx(ref[2])
    assert np.all(np.diff(got[0]) > 0)
    assert np.all(np.diff(got[1]) > 0)


@settings(max_examples=300, deadline=None)
@given(times, times, st.integers(-5000, 5000), st.integers(1, 700), st.integers(1, 40))
def test_diff_histogram_equals_reference(
    a: np.ndarray, b: np.ndarray, lo: int, width: int, nbins: int
) -> None:
    np.testing.assert_array_equal(
        kernel.diff_histogram(a, b, lo_ps=lo, bin_ps=width, nbins=nbins),
        kernel_ref.diff_histogram(a, b, lo_ps=lo, bin_ps=width, nbins=nbins),
    )


@settings(max_examples=300, deadline=None)
@given(
    times,
    st.integers(-500, 500),
    st.floats(50, 1000),
    st.integers(0, 100),
    st.sampled_from([0.0, 0.05]),
)
def test_assign_slots_equals_reference(
    t: np.ndarray, t0: int, period: float, window: int, gain: float
) -> None:
    got = kernel.assign_slots(t, t0_ps=t0, period_ps=period, window_ps=window, track_gain=gain)
    ref = kernel_ref.assign_slots(t, t0_ps=t0, period_ps=period, window_ps=window, track_gain=gain)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])
    assert got[2] == pytest.approx(ref[2])


@settings(max_examples=300, deadline=None)
@given(bits)
def test_bit_kernels_equal_reference(ab: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = ab
    np.testing.assert_array_equal(kernel.sift(a, b), kernel_ref.sift(a, b))
    np.testing.assert_array_equal(kernel.pack_bits(a), kernel_ref.pack_bits(a))
    assert kernel.count_errors(a, b) == kernel_ref.count_errors(a, b)


@pytest.mark.parametrize("drift", [0.0, 10e-6, -10e-6])
@pytest.mark.parametrize("offset", [-999_000_000, 123_456, 998_765_432])
def test_find_offset_and_drift_lock_blind(offset: int, drift: float) -> None:
    rng = np.random.default_rng(abs(offset) % 1000)
    span = 200_000_000_000  # 0.2 s of data
    pairs = np.sort(rng.integers(0, span, 4000))
    t_a = np.sort(np.concatenate([pairs, rng.integers(0, span, 20000)]))
    kept = pairs[rng.random(pairs.shape[0]) < 0.3]
    t_b = np.rint(kept * (1 + drift) + offset + rng.normal(0, 50, kept.shape[0])).astype(np.int64)
    t_b = np.sort(np.concatenate([t_b, rng.integers(offset, span + offset, 5000)]))
    found, d = kernel.find_offset_drift(t_a, t_b, max_offset_ps=1_000_000_000, resolution_ps=50)
    # 0.2 s of data pins the drift to ~1e-9, which leaves ~100 ps at t_a[0].
    assert found == pytest.approx(offset + drift * t_a[0], abs=500)
    assert d == pytest.approx(drift, abs=0.01e-6)
    # the reference histogram gives the same answer
    assert kernel.find_offset(
        t_a,
        t_b,
        max_offset_ps=1_000_000_000,
        resolution_ps=1000,
        histogram=kernel_ref.diff_histogram,
    ) == pytest.approx(
        kernel.find_offset(t_a, t_b, max_offset_ps=1_000_000_000, resolution_ps=1000), abs=1
    )


def test_no_correlation_raises_lock_error() -> None:
    rng = np.random.default_rng(3)
    a = np.sort(rng.integers(0, 10**10, 5000))
    b = np.sort(rng.integers(0, 10**10, 5000))
    with pytest.raises(kernel.LockError, match="SNR"):
        kernel.find_offset(a, b, max_offset_ps=10**9, resolution_ps=50)


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (
            lambda: kernel.coincidences(
                np.array([3, 1], np.int64), np.zeros(1, np.int64), window_ps=1
            ),
            "t_a is not sorted ascending at index 1",
        ),
        (
            lambda: kernel.coincidences(
                np.zeros(2, np.float64),
                np.zeros(1, np.int64),  # type: ignore[arg-type]
                window_ps=1,
            ),
            "t_a must have dtype int64, got float64",
        ),
        (
            lambda: kernel.coincidences(
                np.zeros(4, np.int64)[::2], np.zeros(1, np.int64), window_ps=1
            ),
            "C-contiguous",
        ),
        (lambda: kernel.pack_bits(np.array([0, 2], np.uint8)), "other than 0 or 1"),
        (lambda: kernel.sift(np.zeros(2, np.uint8), np.zeros(3, np.uint8)), "basis_a has 2"),
    ],
)
def test_bad_input_is_named(call: object, words: str) -> None:
    with pytest.raises(kernel.KernelInputError) as info:
        call()  # type: ignore[operator]
    assert words in str(info.value)
