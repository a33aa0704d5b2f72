"""Verification and privacy-amplification hashes against plain big-integer arithmetic."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qnoded import amplify
from qnoded.amplify import HashError, PaSeed


def as_int(bits: np.ndarray) -> int:
    return int.from_bytes(np.packbits(bits, bitorder="little").tobytes(), "little")


def mod_mersenne(y: int, k: int) -> int:
    # Folding, as the C code does; Python's % on numbers of millions of bits is slow.
    p = (1 << k) - 1
    while y > p:
        y = (y & p) + (y >> k)
    return 0 if y == p else y


@pytest.mark.parametrize(("n", "m"), [(1, 1), (100, 40), (5000, 1234), (4_100_000, 1_000_003)])
def test_pa_is_the_carter_wegman_hash(n: int, m: int) -> None:
    # 5e6 bits takes the two-thread split inside the C code.
    rng = np.random.default_rng(n)
    x = rng.integers(0, 2, n, dtype=np.uint8)
    seed = PaSeed.fresh(n)
    out = amplify.amplify(x, seed, m)
    a, b = int.from_bytes(seed.a, "little"), int.from_bytes(seed.b, "little")
    expected = mod_mersenne(a * as_int(x) + b, seed.k) % (1 << m)
    assert out.shape == ((m + 7) // 8,)
    assert int.from_bytes(out.tobytes(), "little") == expected


def test_pa_seed_and_length_are_checked() -> None:
    x = np.ones(100, dtype=np.uint8)
    seed = PaSeed.fresh(100)
    assert seed.k == 107  # the least Mersenne exponent above 100
    with pytest.raises(HashError, match="output length"):
        amplify.amplify(x, seed, 0)
    with pytest.raises(HashError, match="does not suit"):
        amplify.amplify(np.ones(200, dtype=np.uint8), seed, 10)
    zero_a = PaSeed(k=seed.k, a=bytes(len(seed.a)), b=seed.b)
    with pytest.raises(HashError, match="out of range"):
        amplify.amplify(x, zero_a, 10)
    with pytest.raises(HashError, match="longer than"):
        amplify.mersenne_exponent(amplify.MAX_PA_BITS + 1)


def poly_ref(data: bytes, r: int) -> int:
    acc = 0
    for i in range(0, len(data), 7):
        acc = (acc + int.from_bytes(data[i : i + 7], "little")) * r % amplify.P61
    return (acc + len(data)) * r % amplify.P61


@pytest.mark.parametrize("length", [0, 1, 6, 7, 8, 100, 1001])
def test_poly61_matches_horner_reference(length: int) -> None:
    rng = np.random.default_rng(length)
    data = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
    points = amplify.random_points(3)
    got = amplify.poly61(data, points)
    assert [int(v) for v in got] == [poly_ref(data, int(r)) for r in points]


def test_verification_tells_keys_apart() -> None:
    rng = np.random.default_rng(1)
    key = rng.integers(0, 2, 10_000, dtype=np.uint8)
    points = amplify.random_points(amplify.verify_points(key.shape[0], 1e-15))
    other = key.copy()
    other[1234] ^= 1
    tag = amplify.verification_tag(key, points)
    assert np.array_equal(tag, amplify.verification_tag(key, points))
    assert not np.array_equal(
        amplify.verification_tag(key, points), amplify.verification_tag(other, points)
    )
    # A trailing zero bit changes the length, and so the tag.
    longer = np.concatenate([key, np.zeros(8, dtype=np.uint8)])
    assert not np.array_equal(
        amplify.verification_tag(key, points), amplify.verification_tag(longer, points)
    )


def test_verify_points_meet_eps_cor() -> None:
    for nbits in (1000, 10**6, 10**8):
        t = amplify.verify_points(nbits, 1e-15)
        chunks = math.ceil(math.ceil(nbits / 8) / 7) + 1
        assert (chunks / amplify.P61) ** t <= 1e-15
        assert t == 1 or (chunks / amplify.P61) ** (t - 1) > 1e-15
    with pytest.raises(HashError, match="points"):
        amplify.poly61(b"x", np.array([amplify.P61], dtype=np.uint64))
