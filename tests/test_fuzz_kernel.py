"""Fuzzing the Python wrappers of the C kernel (``qnoded.kernel``), the hashes
(``qnoded.amplify``) and Cascade's peer-facing calls (``qnoded.reconcile``).

``tests/test_kernel.py`` holds C == numpy reference (``qnoded.kernel_ref``) for every
kernel entry point on valid input.  This feeds every wrapper what it must refuse: arrays
of another dtype (big-endian int64 included), ndim, strides or type (lists, scalars,
None); time arrays unsorted or beyond ``T_MAX_PS``; scalar arguments out of range (huge
ints, NaN, infinities).  Each call either equals the reference or raises the wrapper's
typed error (:class:`KernelInputError`, :class:`HashError`, :class:`ReconcileError`)
naming the argument.  The hashes a peer's VERIFY message drives (``poly61`` at the
peer's points, ``amplify`` with the peer's seed) are checked against big-integer
references written here from the C header's definitions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from fuzzing import bounded, budget, refused
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qnoded import amplify, kernel, kernel_ref
from qnoded.amplify import P61, HashError, PaSeed
from qnoded.kernel import T_MAX_PS, KernelInputError
from qnoded.reconcile import CascadeAlice, CascadeBob, CascadePlan, Query, ReconcileError

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]

# -- arrays, good and bad ------------------------------------------------------------------------

BAD_DTYPES = [np.int32, np.uint64, np.int8, np.bool_, np.float64, np.dtype(">i8"), np.uint16]


@st.composite
def arrays_for(draw: st.DrawFn, dtype: Any, *, times: bool = False, bits: bool = False) -> Any:
    """Mostly a valid argument (1-d, C-contiguous, ``dtype``; sorted times, 0/1 bits),
    sometimes something a wrapper must refuse."""
    kind = draw(
        st.sampled_from(["ok"] * 6 + ["dtype", "ndim", "strided", "list", "scalar", "values"])
    )
    n = draw(st.integers(0, 40))
    if dtype == np.uint8:
        elements = st.integers(0, 1) if bits else st.integers(0, 255)
    else:
        elements = st.integers(-3000, 3000)
    a = draw(hnp.arrays(dtype, n, elements=elements))
    if times:
        a = np.sort(a)
    if kind == "dtype":
        return a.astype(draw(st.sampled_from(BAD_DTYPES)))
    if kind == "ndim":
        return np.zeros(draw(st.sampled_from([(), (2, 2), (1, 3, 1)])), dtype=dtype)
    if kind == "strided":
        return np.repeat(a, 2)[::2]
    if kind == "list":
        return a.tolist()
    if kind == "scalar":
        return draw(st.sampled_from([None, 0, 1.5, "abc", b"\x00"]))
    if kind == "values" and n:
        if dtype == np.uint8:
            a[draw(st.integers(0, n - 1))] = draw(st.integers(2, 255))
        elif draw(st.booleans()):
            a[draw(st.integers(0, n - 1))] = draw(
                st.sampled_from([T_MAX_PS + 1, -T_MAX_PS - 1, 2**63 - 1, -(2**63)])
            )
        elif n > 1:
            i = draw(st.integers(1, n - 1))
            a[i] = a[i - 1] - draw(st.integers(1, 10))  # unsorted at i
    return a


def is_ok(
    a: Any, dtype: Any, *, times: bool = False, bits: bool = False, copies: bool = False
) -> bool:
    """What the wrapper accepts (``copies``: it copies a strided array rather than refuse)."""
    if not isinstance(a, np.ndarray) or a.dtype != np.dtype(dtype) or a.ndim != 1:
        return False
    if not (a.flags.c_contiguous or copies):
        return False
    out_of_range = (a < -T_MAX_PS) | (a > T_MAX_PS)
    if times and a.shape[0] and (np.any(np.diff(a) < 0) or np.any(out_of_range)):
        return False
    return not (bits and a.shape[0] and int(a.max()) > 1)


def call_or_refusal(fn: Callable[[], Any], typed: type[Exception], *names: str) -> Any:
    """``fn()``, or None after checking the refusal is ``typed`` and names an argument."""
    try:
        with bounded(getattr(fn, "__name__", "kernel call")):
            return fn()
    except Exception as exc:  # noqa: BLE001 - the property is about which exception
        text = refused(exc, typed)
        assert not names or any(n in text for n in names), text
        return None


ints = st.one_of(st.integers(-50, 3000), st.integers(-(2**70), 2**70))
floats = st.one_of(
    st.floats(-300, 300), st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e300, -0.0])
)
gains = st.one_of(st.sampled_from([0.0, 0.1, 0.5, 1.0]), floats)
times = arrays_for(np.int64, times=True)


@budget(120)
@given(times, times, ints, floats, gains)
@example(np.array([[0]]), np.array([0]), 1, 0.0, 0.0)
def test_coincidences(a: Any, b: Any, window: int, offset: float, gain: float) -> None:
    got = call_or_refusal(
        lambda: kernel.coincidences_tracked(
            a, b, window_ps=window, offset_ps=offset, track_gain=gain
        ),
        KernelInputError,
        "t_a",
        "t_b",
        "window_ps",
        "offset_ps",
        "track_gain",
        "coincidences",
    )
    valid = is_ok(a, np.int64, times=True) and is_ok(b, np.int64, times=True)
    valid = valid and 0 <= window <= kernel.WINDOW_MAX_PS and abs(offset) <= kernel.WINDOW_MAX_PS
    valid = valid and 0.0 <= gain <= 1.0
    # Against an empty stream nothing pairs, and C does not look at the other's range.
    lenient = is_ok(a, np.int64) and is_ok(b, np.int64) and not (a.shape[0] and b.shape[0])
    assert (got is not None) == valid or lenient
    if got is not None:
        ref = kernel_ref.coincidences_tracked(
            a, b, window_ps=window, offset_ps=offset, track_gain=gain
        )
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
        assert got[2] == ref[2]


@budget(100)
@given(
    times, times, ints, ints, st.one_of(st.integers(-2, 50), st.sampled_from([2**40, 2**62, 2**70]))
)
@example(np.array([0]), np.array([0]), 0, 1, 2**40)  # 8 TiB of counts: MemoryError
def test_diff_histogram(a: Any, b: Any, lo: int, width: int, nbins: int) -> None:
    got = call_or_refusal(
        lambda: kernel.diff_histogram(a, b, lo_ps=lo, bin_ps=width, nbins=nbins),
        KernelInputError,
        "t_a",
        "t_b",
        "bin_ps",
        "nbins",
        "range",
    )
    if got is not None:
        assert is_ok(a, np.int64, times=True) and is_ok(b, np.int64, times=True)
        np.testing.assert_array_equal(
            got, kernel_ref.diff_histogram(a, b, lo_ps=lo, bin_ps=width, nbins=nbins)
        )


@budget(100)
@given(arrays_for(np.int64), floats, st.one_of(floats, st.floats(1e-300, 1e6)), ints, gains)
@example(np.array([5]), 0.0, 100.0, 2**63, 0.0)  # window beyond int64: cffi OverflowError
@example(np.array([5]), 0.0, 1e-300, 10, 0.0)
def test_assign_slots(t: Any, t0: float, period: float, window: int, gain: float) -> None:
    got = call_or_refusal(
        lambda: kernel.assign_slots(
            t, t0_ps=t0, period_ps=period, window_ps=window, track_gain=gain
        ),
        KernelInputError,
        "t ",
        "t must",
        "t0_ps",
        "period_ps",
        "window_ps",
        "track_gain",
        "slot",
    )
    if got is not None:
        assert is_ok(t, np.int64)
        ref = kernel_ref.assign_slots(
            t, t0_ps=t0, period_ps=period, window_ps=window, track_gain=gain
        )
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
        assert got[2] == ref[2]


@budget(120)
@given(arrays_for(np.uint8, bits=True), arrays_for(np.uint8, bits=True))
def test_bit_kernels(a: Any, b: Any) -> None:
    for name, fn, ref, args in (
        ("sift", kernel.sift, kernel_ref.sift, (a, b)),
        ("pack_bits", kernel.pack_bits, kernel_ref.pack_bits, (a,)),
        ("count_errors", kernel.count_errors, kernel_ref.count_errors, (a, b)),
    ):
        got = call_or_refusal(
            lambda fn=fn, args=args: fn(*args),
            KernelInputError,
            "basis_a",
            "basis_b",
            "bits",
            "a ",
            "a has",
            "a must",
            "b must",
        )
        valid = all(is_ok(x, np.uint8, bits=name == "pack_bits") for x in args)
        valid = valid and (len(args) == 1 or args[0].shape == args[1].shape)
        assert (got is not None) == valid, name
        if got is not None:
            np.testing.assert_array_equal(got, ref(*args))


@budget(80)
@given(
    times,
    times,
    st.one_of(st.integers(-5, 10**6), st.sampled_from([2**62, 2**70])),
    st.one_of(st.integers(-5, 1000), st.sampled_from([2**62])),
)
def test_find_offset(a: Any, b: Any, max_offset: int, resolution: int) -> None:
    for fn in (kernel.find_offset, kernel.find_offset_drift):
        try:
            with bounded(fn.__name__):
                fn(a, b, max_offset_ps=max_offset, resolution_ps=resolution)
        except kernel.LockError as exc:
            assert str(exc).strip()
        except Exception as exc:  # noqa: BLE001 - the property is about which exception
            refused(exc, KernelInputError)


# -- the hashes ------------------------------------------------------------------------------------


def poly61_ref(data: bytes, r: int) -> int:
    """qp_poly61 from its header comment: 7-byte LE chunks, then the length, Horner."""
    acc = 0
    for i in range(0, len(data), 7):
        acc = (acc + int.from_bytes(data[i : i + 7], "little")) * r % P61
    return (acc + len(data)) * r % P61


point_arrays = st.one_of(
    hnp.arrays(np.uint64, st.integers(1, 4), elements=st.integers(0, P61 - 1)),
    hnp.arrays(np.uint64, st.integers(0, 3)),
    hnp.arrays(np.int64, st.integers(1, 3)),  # what a VERIFY message carries
    st.just(np.zeros((2, 2), np.uint64)),
)
data_args = st.one_of(
    st.binary(max_size=100),
    arrays_for(np.uint8),
)


@budget(120)
@given(data_args, point_arrays)
@example(np.arange(4, dtype=np.int64), np.array([3], np.uint64))  # int64 "bytes": read as 4 of 32
def test_poly61(data: Any, points: Any) -> None:
    got = call_or_refusal(
        lambda: amplify.poly61(data, points),
        (HashError, KernelInputError),  # type: ignore[arg-type]
        "points",
        "data",
    )
    if got is None:
        return
    raw = data if isinstance(data, bytes) else data.tobytes()
    assert isinstance(data, bytes) or is_ok(data, np.uint8, copies=True)
    assert got.tolist() == [poly61_ref(raw, int(p)) for p in np.asarray(points).astype(np.uint64)]


def mersenne_ref(bits: U8, seed: PaSeed, out_bits: int) -> bytes:
    """qp_mersenne_hash from its header comment, in Python integers."""
    k, p = seed.k, (1 << seed.k) - 1
    x = int.from_bytes(np.packbits(bits, bitorder="little").tobytes(), "little")
    nbytes = (k + 7) // 8
    chunks = amplify.pa_chunks(int(bits.shape[0]), k)
    acc = int.from_bytes(seed.b, "little")
    for i in range(chunks):
        xi = (x >> (i * (k - 1))) & ((1 << (k - 1)) - 1)
        acc += int.from_bytes(seed.a[i * nbytes : (i + 1) * nbytes], "little") * xi
    h = (acc % p) % (1 << out_bits)
    return h.to_bytes((out_bits + 7) // 8, "little")


@st.composite
def seeds(draw: st.DrawFn, nbits: int, out_bits: int) -> PaSeed:  # noqa: PLR0911 - one per change
    """A fresh seed, or one a peer changed: exponent, lengths or values out of range."""
    seed = PaSeed.fresh(nbits, max(out_bits, 1)) if out_bits <= 600 else PaSeed(89, b"", b"")
    change = draw(st.sampled_from(["", "", "k", "a", "b", "a-zero", "a-big", "b-big"]))
    nb = (seed.k + 7) // 8
    if change == "k":
        return PaSeed(
            draw(st.sampled_from([*amplify.MERSENNE_EXPONENTS[:14], 0, -1, 4, 2**40])),
            seed.a,
            seed.b,
        )
    if change == "a":
        return PaSeed(seed.k, draw(st.binary(max_size=3 * nb)), seed.b)
    if change == "b":
        return PaSeed(seed.k, seed.a, draw(st.binary(max_size=2 * nb)))
    if change == "a-zero" and seed.a:
        return PaSeed(seed.k, bytes(nb) + seed.a[nb:], seed.b)
    if change in ("a-big", "b-big"):
        p_bytes = ((1 << seed.k) - 1).to_bytes(nb, "little")  # p itself: out of range
        if change == "a-big" and seed.a:
            return PaSeed(seed.k, p_bytes + seed.a[nb:], seed.b)
        return PaSeed(seed.k, seed.a, p_bytes)
    return seed


@st.composite
def amplify_cases(draw: st.DrawFn) -> tuple[Any, PaSeed, int]:
    n = draw(st.integers(0, 700))
    bits = draw(
        st.one_of(hnp.arrays(np.uint8, n, elements=st.integers(0, 1)), arrays_for(np.uint8))
    )
    out_bits = draw(st.one_of(st.integers(1, 300), st.sampled_from([0, -8, 2**40])))
    return bits, draw(seeds(n, out_bits)), out_bits


@budget(100)
@given(amplify_cases())
@example((np.array([0, 1, 2], np.uint8), PaSeed.fresh(3, 8), 8))  # a 2 among the key bits
@example(([0, 1, 1], PaSeed.fresh(3, 8), 8))  # a list: AttributeError on .shape
def test_amplify(case: tuple[Any, PaSeed, int]) -> None:
    bits, seed, out_bits = case
    got = call_or_refusal(
        lambda: amplify.amplify(bits, seed, out_bits),
        (HashError, KernelInputError),
        "seed",
        "output",
        "key bits",
        "bits",
        "exponent",
        "coefficients",
    )
    if got is None:
        return
    assert is_ok(bits, np.uint8, bits=True, copies=True)
    assert got.tobytes() == mersenne_ref(bits, seed, out_bits)


# -- Cascade: what a peer's EC messages put into the C calls ------------------------------------


PLAN = CascadePlan(n=300, block_sizes=(8, 32, 64), seed=7, frame=64)
ALICE_BITS = np.random.default_rng(3).integers(0, 2, PLAN.n).astype(np.uint8)
query_arrays = st.one_of(
    hnp.arrays(np.int64, st.integers(0, 6), elements=st.integers(-5, 310)),
    hnp.arrays(np.int64, st.integers(0, 3)),
    st.just(np.zeros((2, 2), np.int64)),
)


@budget(120)
@given(query_arrays, query_arrays, query_arrays)
def test_cascade_answers_any_query(passes: I64, start: I64, end: I64) -> None:
    alice = CascadeAlice(ALICE_BITS, PLAN)
    got = call_or_refusal(
        lambda: alice.answer(Query(passes, start, end)), ReconcileError, "query", "pass", "range"
    )
    if got is None:
        return
    assert got.shape == start.shape and set(got.tolist()) <= {0, 1}
    top = alice.top_parities()
    for p, s, e, parity in zip(
        passes.tolist(), start.tolist(), end.tolist(), got.tolist(), strict=True
    ):
        k = PLAN.block_sizes[p]
        if s % k == 0 and e == min(s + k, PLAN.n):  # a whole block: its top-level parity
            assert parity == top[p][s // k]


@budget(100)
@given(
    st.lists(
        st.one_of(
            hnp.arrays(np.uint8, st.integers(0, 60), elements=st.integers(0, 2)),
            hnp.arrays(np.int64, st.integers(0, 40), elements=st.integers(0, 1)),
        ),
        max_size=4,
    ),
    st.one_of(st.none(), hnp.arrays(np.uint8, st.integers(0, 8), elements=st.integers(0, 3))),
)
def test_cascade_bob_reads_any_parities(tops: list[Any], answers: Any) -> None:
    bits = ALICE_BITS.copy()
    bits[::17] ^= 1
    try:
        with bounded("CascadeBob"):
            bob = CascadeBob(bits, PLAN, tops)
            query = bob.next_query()
            if query is not None:
                bob.next_query(answers)
    except Exception as exc:  # noqa: BLE001 - the property is about which exception
        refused(exc, ReconcileError)
