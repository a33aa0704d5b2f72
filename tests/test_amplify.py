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


def reference_pa(x: np.ndarray, seed: PaSeed, m: int) -> int:
    """((sum a_i x_i + b) mod p) mod 2^m with Python integers, chunks of k - 1 bits."""
    k, kb = seed.k, (seed.k + 7) // 8
    chunks = amplify.pa_chunks(x.shape[0], k)
    xs = as_int(x)
    acc = int.from_bytes(seed.b, "little")
    for i in range(chunks):
        a_i = int.from_bytes(seed.a[i * kb : (i + 1) * kb], "little")
        acc += a_i * ((xs >> (i * (k - 1))) & ((1 << (k - 1)) - 1))
    return mod_mersenne(acc, k) % (1 << m)


@pytest.mark.parametrize(
    ("n", "m", "chunks"),
    [
        (1, 1, 1),
        (100, 40, 1),  # k = 107: one chunk, the plain Carter-Wegman hash
        (5000, 1234, 3),  # k = 2203: 3 chunks, the last one short
        (4_100_000, 1_000_003, 4),  # k = 1257787, over 4e6 bits: chunks on two threads
        (300_000, 299_000, 1),  # k = 756839 above the key too: one chunk, split in halves
        (5_000_000, 200, 9_616),  # a tiny output: k = 521, many small chunks
    ],
)
def test_pa_is_the_multilinear_carter_wegman_hash(n: int, m: int, chunks: int) -> None:
    rng = np.random.default_rng(n)
    x = rng.integers(0, 2, n, dtype=np.uint8)
    seed = PaSeed.fresh(n, m)
    assert amplify.pa_chunks(n, seed.k) == chunks
    assert seed.k > m + amplify.PA_MARGIN_BITS
    out = amplify.amplify(x, seed, m)
    assert out.shape == ((m + 7) // 8,)
    assert int.from_bytes(out.tobytes(), "little") == reference_pa(x, seed, m)


def test_pa_output_depends_on_every_chunk() -> None:
    """One flipped key bit in any chunk changes the output (with these seeds)."""
    n, m = 20_000, 1000
    rng = np.random.default_rng(3)
    x = rng.integers(0, 2, n, dtype=np.uint8)
    seed = PaSeed.fresh(n, m)
    base = amplify.amplify(x, seed, m).tobytes()
    for pos in (0, seed.k - 2, seed.k - 1, n - 1):  # both sides of a chunk edge, and the end
        y = x.copy()
        y[pos] ^= 1
        assert amplify.amplify(y, seed, m).tobytes() != base


def test_pa_seed_and_length_are_checked() -> None:
    x = np.ones(100, dtype=np.uint8)
    seed = PaSeed.fresh(100, 10)
    assert seed.k == 89  # the least Mersenne exponent above 10 + 64
    with pytest.raises(HashError, match="output length"):
        amplify.amplify(x, seed, 0)
    with pytest.raises(HashError, match="does not suit an output of 30 bits"):
        amplify.amplify(x, seed, 30)  # 30 + 64 > 89: the margin would be lost
    with pytest.raises(HashError, match="needs 3 coefficients"):
        amplify.amplify(np.ones(200, dtype=np.uint8), seed, 10)  # 200 bits: 3 chunks of 88
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
