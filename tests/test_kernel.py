"""The C kernel: smoke, known answers, hypothesis against the numpy reference, bad input."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from qnoded._qkernel import lib

from qnoded import kernel, kernel_ref
from qnoded.amplify import PaSeed, amplify
from qnoded.kernel import pointer
from qnoded.reconcile import CascadeAlice, CascadeBob, CascadePlan, ReconcileError

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]

# Sorted int64 times, empty included; a narrow value range forces duplicates.
times = st.one_of(
    hnp.arrays(np.int64, st.integers(0, 60), elements=st.integers(-300, 300)),
    hnp.arrays(np.int64, st.integers(0, 200), elements=st.integers(-10_000, 10_000)),
).map(np.sort)
bit_pairs = st.integers(0, 300).flatmap(
    lambda n: st.tuples(
        hnp.arrays(np.uint8, n, elements=st.integers(0, 1)),
        hnp.arrays(np.uint8, n, elements=st.integers(0, 1)),
    )
)


def i64(*values: int) -> I64:
    return np.array(values, dtype=np.int64)


def u8(*values: int) -> U8:
    return np.array(values, dtype=np.uint8)


# -- smoke ---------------------------------------------------------------------------


def test_smoke() -> None:
    assert kernel.version() >= 1
    t = np.arange(0, 1000, 10, dtype=np.int64)
    ia, ib = kernel.coincidences(t, t + 3, window_ps=10)
    np.testing.assert_array_equal(ia, np.arange(100))
    np.testing.assert_array_equal(ib, np.arange(100))
    assert kernel.diff_histogram(t, t, lo_ps=0, bin_ps=1, nbins=1).tolist() == [100]


def test_empty_inputs() -> None:
    e = np.empty(0, np.int64)
    t = i64(1, 2, 3)
    for a, b in ((e, e), (e, t), (t, e)):
        ia, ib, off = kernel.coincidences_tracked(a, b, window_ps=10, offset_ps=2.5)
        assert ia.shape == ib.shape == (0,)
        assert off == 2.5
        assert kernel.diff_histogram(a, b, lo_ps=-5, bin_ps=2, nbins=5).tolist() == [0] * 5
    slots, inside, t0 = kernel.assign_slots(e, t0_ps=1.5, period_ps=10.0, window_ps=2)
    assert slots.shape == inside.shape == (0,)
    assert t0 == 1.5
    assert kernel.sift(u8(), u8()).shape == (0,)
    assert kernel.pack_bits(u8()).shape == (0,)
    assert kernel.count_errors(u8(), u8()) == 0


# -- known answers (computed by hand) ----------------------------------------------------


def test_coincidences_known_answers() -> None:
    a = i64(0, 100, 200, 300)
    b = i64(5, 96, 150, 420)
    # window 20 -> d in [-10, 10]: (0,5) d=5, (100,96) d=-4; 150 and 420 have no partner
    ia, ib = kernel.coincidences(a, b, window_ps=20)
    assert (ia.tolist(), ib.tolist()) == ([0, 1], [0, 1])
    # offset 120 -> d in [110, 130]: 420-300 = 120 only
    ia, ib = kernel.coincidences(a, b, window_ps=20, offset_ps=120)
    assert (ia.tolist(), ib.tolist()) == ([3], [3])
    # The window is closed: window 10 accepts d = -5 and +5, not +6.
    ia, ib = kernel.coincidences(i64(0, 100, 200), i64(-5, 105, 206), window_ps=10)
    assert (ia.tolist(), ib.tolist()) == ([0, 1], [0, 1])
    # Odd window, fractional offset: window 5, off 0.5 -> d in [ceil(-2), floor(3)] = [-2, 3]
    ia, ib = kernel.coincidences(
        i64(0, 100, 200, 300), i64(-3, 98, 203, 304), window_ps=5, offset_ps=0.5
    )
    assert (ia.tolist(), ib.tolist()) == ([1, 2], [1, 2])


def test_coincidences_greedy_rule() -> None:
    # Two t_b compete for one t_a: the earlier t_b wins; the later one takes
    # the next t_a in its window.
    ia, ib = kernel.coincidences(i64(10, 12), i64(9, 11), window_ps=4)
    assert (ia.tolist(), ib.tolist()) == ([0, 1], [0, 1])
    # The first t_b takes the EARLIEST t_a in its window, not the nearest,
    # and duplicates pair one to one.
    ia, ib = kernel.coincidences(i64(8, 10, 10), i64(10, 10, 10), window_ps=4)
    assert (ia.tolist(), ib.tolist()) == ([0, 1, 2], [0, 1, 2])
    ia, ib = kernel.coincidences(i64(5, 5), i64(5, 5, 5), window_ps=0)
    assert (ia.tolist(), ib.tolist()) == ([0, 1], [0, 1])


def test_coincidences_tracking_known_answer() -> None:
    # gain 0.5, window 10: off 0 -> d=4 pairs, off = 2 -> window [-3, 7];
    # d=7 pairs, off = 4.5 -> window [0, 9] (ceil(-0.5) = 0); d=0 pairs, off = 2.25
    ia, ib, off = kernel.coincidences_tracked(
        i64(0, 100, 200), i64(4, 107, 200), window_ps=10, track_gain=0.5
    )
    assert (ia.tolist(), ib.tolist()) == ([0, 1, 2], [0, 1, 2])
    assert off == 2.25
    # Without tracking the second pair (d = 7 > 5) is lost.
    ia, _, off = kernel.coincidences_tracked(i64(0, 100, 200), i64(4, 107, 200), window_ps=10)
    assert ia.tolist() == [0, 2]
    assert off == 0.0


def test_tracking_follows_a_drifting_offset() -> None:
    a = np.arange(0, 10_000_000, 1000, dtype=np.int64)
    walk = (np.arange(a.shape[0]) * 0.05).astype(np.int64)  # 0.05 ps per tag, 500 ps in all
    b = a + 200 + walk
    ia, _ = kernel.coincidences(a, b, window_ps=40, offset_ps=200)
    assert ia.shape[0] < a.shape[0] // 2  # a fixed window loses the pairs
    ia, _, off = kernel.coincidences_tracked(a, b, window_ps=40, offset_ps=200, track_gain=0.1)
    assert ia.shape[0] == a.shape[0]
    assert off == pytest.approx(200 + walk[-1], abs=5)


def test_diff_histogram_known_answer() -> None:
    # d = b - 0 over [-100, 100) in 4 bins of 50: [-100,-50) [-50,0) [0,50) [50,100)
    h = kernel.diff_histogram(
        i64(0), i64(-101, -60, -10, 0, 49, 50, 99, 100), lo_ps=-100, bin_ps=50, nbins=4
    )
    assert h.tolist() == [1, 1, 2, 2]
    # all pairs of two streams: differences 1-0=1, 1-2=-1, 5-0=5, 5-2=3
    h = kernel.diff_histogram(i64(0, 2), i64(1, 5), lo_ps=-2, bin_ps=2, nbins=4)
    assert h.tolist() == [1, 1, 1, 1]


def test_assign_slots_known_answer() -> None:
    slots, inside, t0 = kernel.assign_slots(
        i64(0, 98, 260, 351, -49, -51), t0_ps=0, period_ps=100.0, window_ps=20
    )
    # residuals 0, -2, -40, -49, -49, 49 ; k = floor(t/100 + 0.5)
    assert slots.tolist() == [0, 1, 3, 4, 0, -1]
    assert inside.tolist() == [1, 1, 0, 0, 0, 0]
    assert t0 == 0.0
    # tracking: residuals 4 (t0 -> 2), 104-2-100 = 2 (t0 -> 3)
    slots, inside, t0 = kernel.assign_slots(
        i64(4, 104), t0_ps=0, period_ps=100.0, window_ps=10, track_gain=0.5
    )
    assert slots.tolist() == [0, 1]
    assert inside.tolist() == [1, 1]
    assert t0 == 3.0


def test_bit_kernels_known_answers() -> None:
    assert kernel.sift(u8(0, 1, 1, 0), u8(0, 0, 1, 1)).tolist() == [0, 2]
    assert kernel.pack_bits(u8(1, 0, 1, 1, 0, 0, 0, 0, 1)).tolist() == [176, 128]
    assert kernel.pack_bits(u8(1, 1, 1, 1, 1, 1, 1, 1)).tolist() == [255]
    assert kernel.count_errors(u8(1, 0, 1), u8(1, 1, 0)) == 2


# -- hypothesis: C == numpy reference -----------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(
    times,
    times,
    st.integers(0, 500),
    st.one_of(st.integers(-300, 300), st.floats(-300, 300)),
    st.sampled_from([0.0, 0.1, 0.5, 1.0]),
)
def test_coincidences_equal_reference(
    a: I64, b: I64, window: int, offset: float, gain: float
) -> None:
    got = kernel.coincidences_tracked(a, b, window_ps=window, offset_ps=offset, track_gain=gain)
    ref = kernel_ref.coincidences_tracked(a, b, window_ps=window, offset_ps=offset, track_gain=gain)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])
    assert got[2] == ref[2]  # same IEEE operations in the same order
    assert np.all(np.diff(got[0]) > 0)
    assert np.all(np.diff(got[1]) > 0)
    if gain == 0.0 and got[0].shape[0]:
        d = b[got[1]] - a[got[0]]
        assert np.all(np.abs(d - offset) <= window / 2)


@settings(max_examples=500, deadline=None)
@given(times, times, st.integers(-12_000, 5000), st.integers(1, 700), st.integers(1, 40))
def test_diff_histogram_equals_reference(a: I64, b: I64, lo: int, width: int, nbins: int) -> None:
    got = kernel.diff_histogram(a, b, lo_ps=lo, bin_ps=width, nbins=nbins)
    np.testing.assert_array_equal(
        got, kernel_ref.diff_histogram(a, b, lo_ps=lo, bin_ps=width, nbins=nbins)
    )
    # and the brute-force definition
    d = (b[None, :] - a[:, None]).ravel()
    d = d[(d >= lo) & (d < lo + width * nbins)]
    np.testing.assert_array_equal(got, np.bincount((d - lo) // width, minlength=nbins))


@settings(max_examples=500, deadline=None)
@given(
    hnp.arrays(np.int64, st.integers(0, 200), elements=st.integers(-100_000, 100_000)),
    st.floats(-500, 500),
    st.floats(1, 1000),
    st.integers(0, 1000),
    st.sampled_from([0.0, 0.05, 1.0]),
)
def test_assign_slots_equals_reference(
    t: I64, t0: float, period: float, window: int, gain: float
) -> None:
    got = kernel.assign_slots(t, t0_ps=t0, period_ps=period, window_ps=window, track_gain=gain)
    ref = kernel_ref.assign_slots(t, t0_ps=t0, period_ps=period, window_ps=window, track_gain=gain)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])
    assert got[2] == ref[2]


@settings(max_examples=300, deadline=None)
@given(bit_pairs)
def test_bit_kernels_equal_reference(ab: tuple[U8, U8]) -> None:
    a, b = ab
    np.testing.assert_array_equal(kernel.sift(a, b), kernel_ref.sift(a, b))
    np.testing.assert_array_equal(kernel.pack_bits(a), kernel_ref.pack_bits(a))
    assert kernel.count_errors(a, b) == kernel_ref.count_errors(a, b)


# -- blind lock ----------------------------------------------------------------------


def _streams(
    rng: np.random.Generator,
    *,
    n: int,
    span_ps: int,
    offset_ps: int,
    paired: float,
    drift: float = 0.0,
    jitter_ps: float = 50.0,
) -> tuple[I64, I64]:
    """n tags each; a share ``paired`` of t_b are t_a's partners, the rest uncorrelated."""
    t_a = np.sort(rng.integers(0, span_ps, n))
    kept = t_a[rng.random(n) < paired]
    start = float(t_a[0])
    partners = start + offset_ps + (kept - start) * (1 + drift)
    partners += rng.normal(0, jitter_ps, kept.shape[0])
    noise = rng.integers(offset_ps, span_ps + offset_ps, n - kept.shape[0])
    return t_a, np.sort(np.concatenate([np.rint(partners).astype(np.int64), noise]))


@pytest.mark.parametrize("offset", [-999_000_000, -1_000_000, 123_456, 1_000_000_000])
def test_find_offset_blind_1ms(offset: int) -> None:
    rng = np.random.default_rng(abs(offset) % 997)
    t_a, t_b = _streams(rng, n=20_000, span_ps=50_000_000_000, offset_ps=offset, paired=0.5)
    found = kernel.find_offset(t_a, t_b, max_offset_ps=1_000_000_000, resolution_ps=50)
    assert found == pytest.approx(offset, abs=20)


@pytest.mark.parametrize("histogram", [kernel.diff_histogram, kernel_ref.diff_histogram])
def test_find_offset_sparse_pairs_in_dense_noise(histogram: kernel.Histogram) -> None:
    # 2 % of 1e5 Bob tags are partners; the rest are uncorrelated.
    rng = np.random.default_rng(7)
    offset = 765_432_109
    t_a, t_b = _streams(rng, n=100_000, span_ps=100_000_000_000, offset_ps=offset, paired=0.02)
    found = kernel.find_offset(
        t_a, t_b, max_offset_ps=1_000_000_000, resolution_ps=50, histogram=histogram
    )
    assert found == pytest.approx(offset, abs=30)


def test_no_correlation_raises_lock_error() -> None:
    rng = np.random.default_rng(3)
    a = np.sort(rng.integers(0, 10**10, 5000))
    b = np.sort(rng.integers(0, 10**10, 5000))
    with pytest.raises(kernel.LockError, match=r"SNR \d+\.\d below 6\.0"):
        kernel.find_offset(a, b, max_offset_ps=10**9, resolution_ps=50)
    with pytest.raises(kernel.LockError):
        kernel.find_offset_drift(a, b, max_offset_ps=10**9, resolution_ps=50)
    with pytest.raises(kernel.LockError, match="no tags"):
        kernel.find_offset(a, np.empty(0, np.int64), max_offset_ps=10**9, resolution_ps=50)


@pytest.mark.parametrize(
    ("span_ps", "drift", "offset", "jitter_ps"),
    [
        (100_000_000_000, 10e-6, 123_456_789, 50.0),
        (100_000_000_000, -10e-6, -987_654_321, 50.0),
        (1_000_000_000_000, 10e-6, -5_000_000, 50.0),
        (1_000_000_000_000, -37e-6, 999_000_000, 50.0),
        (200_000_000_000, 0.0, 42, 50.0),
        # a wide peak (350 ps jitter) must not be cut into noise by fine bins
        (400_000_000_000, 5e-6, -589_036_000, 350.0),
    ],
)
def test_find_offset_drift(span_ps: int, drift: float, offset: int, jitter_ps: float) -> None:
    rng = np.random.default_rng(span_ps % 1009 + abs(offset) % 101)
    t_a, t_b = _streams(
        rng,
        n=40_000,
        span_ps=span_ps,
        offset_ps=offset,
        paired=0.3,
        drift=drift,
        jitter_ps=jitter_ps,
    )
    found, d = kernel.find_offset_drift(t_a, t_b, max_offset_ps=1_000_000_000, resolution_ps=50)
    assert d == pytest.approx(drift, abs=0.05e-6)  # the brief asks for 0.5 ppm
    assert found == pytest.approx(offset, abs=200)  # offset at t_a[0]


def test_find_offset_drift_refuses_an_inconsistent_peak() -> None:
    # 2 % pairs in dense noise and 10 ppm drift: too weak to lock; never a wrong answer.
    rng = np.random.default_rng(5)
    t_a, t_b = _streams(
        rng, n=100_000, span_ps=100_000_000_000, offset_ps=123, paired=0.02, drift=10e-6
    )
    try:
        found, d = kernel.find_offset_drift(t_a, t_b, max_offset_ps=1_000_000_000, resolution_ps=50)
    except kernel.LockError:
        return
    assert d == pytest.approx(10e-6, abs=0.5e-6)
    assert found == pytest.approx(123, abs=500)


def test_find_offset_drift_over_the_reference() -> None:
    rng = np.random.default_rng(11)
    t_a, t_b = _streams(
        rng, n=10_000, span_ps=100_000_000_000, offset_ps=-3_000_000, paired=0.3, drift=10e-6
    )
    got = kernel.find_offset_drift(t_a, t_b, max_offset_ps=10_000_000, resolution_ps=50)
    ref = kernel.find_offset_drift(
        t_a,
        t_b,
        max_offset_ps=10_000_000,
        resolution_ps=50,
        histogram=kernel_ref.diff_histogram,
    )
    assert got == ref


# -- bad input is refused, naming the argument --------------------------------------------

Call = Callable[[], object]
BAD: list[tuple[Call, str]] = [
    (
        lambda: kernel.coincidences(i64(3, 1), i64(0), window_ps=1),
        "t_a is not sorted ascending at index 1",
    ),
    (
        lambda: kernel.coincidences(i64(0, 1), i64(0, 5, 4, 6), window_ps=1),
        "t_b is not sorted ascending at index 2",
    ),
    (
        lambda: kernel.diff_histogram(i64(0), i64(9, 8), lo_ps=0, bin_ps=1, nbins=1),
        "t_b is not sorted ascending at index 1",
    ),
    (
        lambda: kernel.coincidences(np.zeros(2, np.float64), i64(0), window_ps=1),
        "t_a must have dtype int64, got float64",
    ),
    (
        lambda: kernel.coincidences(i64(0), np.zeros(2, np.int32), window_ps=1),
        "t_b must have dtype int64, got int32",
    ),
    (
        lambda: kernel.coincidences(np.zeros(4, np.int64)[::2], i64(0), window_ps=1),
        "t_a must be C-contiguous",
    ),
    (
        lambda: kernel.coincidences(np.zeros((2, 2), np.int64), i64(0), window_ps=1),
        "t_a must be one-dimensional",
    ),
    (
        # a list on purpose: the wrapper must refuse it at run time
        lambda: kernel.coincidences([1, 2], i64(0), window_ps=1),  # type: ignore[arg-type]
        "t_a must be a numpy array",
    ),
    (lambda: kernel.coincidences(i64(0), i64(0), window_ps=-1), "window_ps"),
    (lambda: kernel.coincidences(i64(0), i64(0), window_ps=1, track_gain=2.0), "track_gain"),
    (lambda: kernel.coincidences(i64(2**62 + 1), i64(0), window_ps=1), "t_a[0]"),
    (lambda: kernel.diff_histogram(i64(0), i64(0), lo_ps=0, bin_ps=0, nbins=1), "bin_ps"),
    (lambda: kernel.diff_histogram(i64(0), i64(0), lo_ps=0, bin_ps=1, nbins=0), "nbins"),
    (
        lambda: kernel.assign_slots(i64(0), t0_ps=0, period_ps=0.0, window_ps=1),
        "period_ps must be positive",
    ),
    (
        lambda: kernel.assign_slots(np.zeros(3, np.uint64), t0_ps=0, period_ps=1.0, window_ps=1),
        "t must have dtype int64, got uint64",
    ),
    (lambda: kernel.pack_bits(u8(0, 1, 2)), "bits[2] = 2 is a value other than 0 or 1"),
    (lambda: kernel.pack_bits(np.zeros(3, bool)), "bits must have dtype uint8, got bool"),
    (lambda: kernel.sift(u8(0, 0), u8(0, 0, 0)), "basis_a has 2 entries, basis_b 3"),
    (lambda: kernel.sift(u8(0, 0), np.zeros(2, np.int8)), "basis_b must have dtype uint8"),
    (lambda: kernel.count_errors(u8(0), u8(0, 1)), "a has 1 bits, b has 2"),
    (
        lambda: kernel.find_offset(i64(0), i64(0), max_offset_ps=0, resolution_ps=1),
        "max_offset_ps must be positive",
    ),
]


@pytest.mark.parametrize(("call", "words"), BAD)
def test_bad_input_is_named(call: Call, words: str) -> None:
    with pytest.raises(kernel.KernelInputError) as info:
        call()
    assert words in str(info.value)
    assert isinstance(info.value, ValueError)


def test_inputs_are_not_copied_or_changed() -> None:
    a = np.arange(0, 100, 10, dtype=np.int64)
    b = a + 1
    a.flags.writeable = False  # read-only input buffers are fine
    before = (a.copy(), b.copy())
    kernel.coincidences(a, b, window_ps=4)
    kernel.diff_histogram(a, b, lo_ps=-5, bin_ps=1, nbins=10)
    np.testing.assert_array_equal(a, before[0])
    np.testing.assert_array_equal(b, before[1])


@pytest.mark.parametrize("where", [1, 2, 500, 4095, 4096, 4097, 9_997, 9_998])
@pytest.mark.parametrize("stream", ["t_a", "t_b"])
@pytest.mark.parametrize("gain", [0.0, 0.5])
def test_unsorted_found_anywhere(where: int, stream: str, gain: float) -> None:
    # The C code checks order while it merges; a defect anywhere must be caught.
    rng = np.random.default_rng(where)
    a = np.sort(rng.integers(0, 10**7, 10_000))
    b = np.sort(a + rng.integers(-20, 20, a.shape[0]))
    bad = a if stream == "t_a" else b
    bad[where] = bad[where - 1] - 1
    with pytest.raises(kernel.KernelInputError, match=f"{stream} is not sorted ascending at index"):
        kernel.coincidences(a, b, window_ps=40, track_gain=gain)
    with pytest.raises(kernel.KernelInputError, match=f"{stream} is not sorted"):
        kernel.diff_histogram(a, b, lo_ps=-10, bin_ps=1, nbins=20)


@settings(max_examples=300, deadline=None)
@given(
    hnp.arrays(np.int64, st.integers(0, 80), elements=st.integers(-100, 100)),
    hnp.arrays(np.int64, st.integers(0, 80), elements=st.integers(-100, 100)),
    st.integers(0, 50),
)
def test_order_check_is_exact(a: I64, b: I64, window: int) -> None:
    # Sorted or not, arbitrary arrays: an error exactly when one is out of order.
    unsorted = bool(np.any(a[1:] < a[:-1]) or np.any(b[1:] < b[:-1]))
    if unsorted:
        with pytest.raises(kernel.KernelInputError, match="not sorted"):
            kernel.coincidences(a, b, window_ps=window)
    else:
        got = kernel.coincidences(a, b, window_ps=window)
        ref = kernel_ref.coincidences(a, b, window_ps=window)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])


# -- regressions found by the libFuzzer harnesses (csrc/fuzz/, make fuzz) -------------------


def test_permutation_frame_beyond_half_the_int64_range() -> None:
    """qp_permutation computed 2 * frame, which overflows int64 for a frame above
    2^62 - 1 (UBSan; in a plain build the wrapped bound made one frame of 2^62 bits
    and the shuffle wrote far past the buffers).  A frame that large is one frame;
    a plan (what a peer's BLOCK_START names) refuses it before C sees it."""
    perm, inv = np.empty(10, np.uint32), np.empty(10, np.uint32)
    rc = lib.qp_permutation(1, 10, 2**62, pointer("uint32_t *", perm), pointer("uint32_t *", inv))
    assert rc == lib.QK_OK
    assert sorted(perm.tolist()) == list(range(10))
    np.testing.assert_array_equal(inv[perm], np.arange(10))
    with pytest.raises(ReconcileError, match="frame"):
        CascadePlan(n=10, block_sizes=(2,), seed=1, frame=2**62)


def test_cascade_round_refuses_a_search_moved_to_another_block() -> None:
    """A caller that broke the state (a search's block changed to the block of
    another running search) made qp_cascade_round end one search twice and read
    s_pass[-1] (ASan: heap-buffer-overflow); the header promises QK_EINVAL."""
    n = 256
    rng = np.random.default_rng(7)
    alice = rng.integers(0, 2, n, dtype=np.uint8)
    bob_bits = alice.copy()
    bob_bits[rng.choice(n, 40, replace=False)] ^= 1
    plan = CascadePlan(n=n, block_sizes=(16, 64), seed=3, frame=256)
    a = CascadeAlice(alice, plan)
    bob = CascadeBob(bob_bits, plan, a.top_parities())
    query = bob.next_query()
    assert query is not None and len(query) >= 2
    c = bob._c  # the C state, broken here on purpose
    c.s_blk[0] = c.s_blk[1]
    c.s_pass[0] = c.s_pass[1]
    with pytest.raises(kernel.KernelInputError, match="out of range"):
        bob.next_query(a.answer(query))


def test_mersenne_hash_of_an_empty_key() -> None:
    """An empty key reaches qp_mersenne_hash as NULL with 0 bits, and the kernel
    computed NULL + 0 (undefined; UBSan flagged it).  The hash of no bits is b."""
    seed = PaSeed.fresh(0, 16)
    out = amplify(np.zeros(0, np.uint8), seed, 16)
    assert out.tobytes() == seed.b[:2]
