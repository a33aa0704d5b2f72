"""Verification and privacy amplification: the two hashes that end a block.

**Verification.**  After error correction Alice sends a hash of her key; Bob
compares it with the hash of his.  The hash is a polynomial over GF(2^61 - 1)
evaluated at ``t`` random points (``qp_poly61``): two different keys of ``L``
7-byte chunks collide with probability at most ``((L + 1) / p)^t``, and ``t``
is the least that brings this under ``eps_cor``.

**Privacy amplification.**  The Carter-Wegman family
``h(x) = ((a*x + b) mod p) mod 2^m`` over the Mersenne prime
``p = 2^k - 1`` (``k`` the least Mersenne exponent above the key length) is
universal: two distinct keys collide with probability at most ``2^-m`` over
uniform ``a in [1, p-1]``, ``b in [0, p-1]`` (Carter and Wegman 1979), which is
what the leftover hash lemma needs.  The product ``a*x`` is GMP's FFT
multiplication and the reduction mod ``2^k - 1`` is shifts and additions, so a
1e8-bit block costs one large multiplication (where a Toeplitz matrix over
GF(2) would need a convolution of 2e8 points in floating point).  The seed
``(a, b)`` is public and comes from Alice's random source, fresh per block.

Key bits travel as uint8 0/1 arrays; the hashes see them packed
little-endian (bit ``i`` of the key is bit ``i % 8`` of byte ``i // 8``).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from qnoded._qkernel import lib
from qnoded.kernel import check_status, checked_array, pointer

U8 = npt.NDArray[np.uint8]
U64 = npt.NDArray[np.uint64]

P61 = (1 << 61) - 1
CHUNK_BYTES = 7

# Exponents of all known Mersenne primes 2^k - 1 (GIMPS), ascending.
MERSENNE_EXPONENTS = (
    2, 3, 5, 7, 13, 17, 19, 31, 61, 89, 107, 127, 521, 607, 1279, 2203, 2281, 3217, 4253,
    4423, 9689, 9941, 11213, 19937, 21701, 23209, 44497, 86243, 110503, 132049, 216091,
    756839, 859433, 1257787, 1398269, 2976221, 3021377, 6972593, 13466917, 20996011,
    24036583, 25964951, 30402457, 32582657, 37156667, 42643801, 43112609, 57885161,
    74207281, 77232917, 82589933, 136279841,
)  # fmt: skip
MAX_PA_BITS = MERSENNE_EXPONENTS[-1] - 1


class HashError(ValueError):
    """A key, seed or length given to a hash is out of range."""


def pack_le(bits: U8) -> U8:
    """0/1 bytes to little-endian packed bytes (the hashes' view of a key)."""
    checked = checked_array("key bits", bits, np.uint8, make_contiguous=True)
    return np.packbits(checked, bitorder="little")


# -- verification -----------------------------------------------------------------


def verify_points(nbits: int, eps_cor: float) -> int:
    """How many evaluation points keep a collision of ``nbits``-bit keys under eps_cor."""
    if not 0.0 < eps_cor < 1.0:
        raise HashError(f"eps_cor must lie in (0, 1), got {eps_cor}")
    chunks = math.ceil(math.ceil(nbits / 8) / CHUNK_BYTES) + 1
    per_point = math.log2(chunks / P61)
    return max(1, math.ceil(math.log2(eps_cor) / per_point))


def random_points(t: int) -> U64:
    return np.array([secrets.randbelow(P61) for _ in range(t)], dtype=np.uint64)


def poly61(data: bytes | U8, points: U64) -> U64:
    """The polynomial hash of ``data`` at each point (see ``qp_poly61``)."""
    buf = np.frombuffer(bytes(data), dtype=np.uint8) if isinstance(data, bytes) else data
    pts = np.ascontiguousarray(points, dtype=np.uint64)
    if pts.ndim != 1 or pts.shape[0] == 0 or int(pts.max()) >= P61:
        raise HashError("hash points must be a non-empty array of values below 2^61 - 1")
    out = np.empty(pts.shape[0], dtype=np.uint64)
    check_status(
        lib.qp_poly61(
            pointer("uint8_t *", buf), buf.shape[0], pointer("uint64_t *", pts),
            pts.shape[0], pointer("uint64_t *", out),
        ),
        "qp_poly61",
    )  # fmt: skip
    return out


def verification_tag(bits: U8, points: U64) -> U64:
    return poly61(pack_le(bits), points)


def tag_bits(points: int) -> int:
    """Bits a verification tag discloses (counted as leakage)."""
    return 61 * points


# -- privacy amplification ------------------------------------------------------


def mersenne_exponent(nbits: int) -> int:
    """The least Mersenne exponent k with nbits < k."""
    for k in MERSENNE_EXPONENTS:
        if k > nbits:
            return k
    raise HashError(
        f"a block of {nbits} bits is longer than privacy amplification supports "
        f"({MAX_PA_BITS} bits); use a smaller block size"
    )


@dataclass(frozen=True, slots=True)
class PaSeed:
    """The public choice of hash: ``a`` in [1, p-1], ``b`` in [0, p-1], as k-bit integers."""

    k: int
    a: bytes
    b: bytes

    @classmethod
    def fresh(cls, nbits: int) -> PaSeed:
        k = mersenne_exponent(nbits)
        p = (1 << k) - 1
        nbytes = (k + 7) // 8
        a = 1 + secrets.randbelow(p - 1)
        b = secrets.randbelow(p)
        return cls(k=k, a=a.to_bytes(nbytes, "little"), b=b.to_bytes(nbytes, "little"))

    def check(self, nbits: int) -> None:
        if self.k not in MERSENNE_EXPONENTS or self.k <= nbits:
            raise HashError(f"seed exponent {self.k} does not suit a {nbits}-bit key")
        nbytes = (self.k + 7) // 8
        if len(self.a) != nbytes or len(self.b) != nbytes:
            raise HashError(f"seed halves must be {nbytes} bytes for k = {self.k}")
        p = (1 << self.k) - 1
        a = int.from_bytes(self.a, "little")
        b = int.from_bytes(self.b, "little")
        if not (1 <= a < p and 0 <= b < p):
            raise HashError("seed value out of range for its prime")


def amplify(bits: U8, seed: PaSeed, out_bits: int) -> U8:
    """``((a*x + b) mod p) mod 2^out_bits``, packed little-endian in (out_bits+7)//8 bytes.

    The secret key stays packed: it is stored and delivered as bytes.
    """
    n = int(bits.shape[0])
    seed.check(n)
    if not 0 < out_bits < seed.k:
        raise HashError(f"output length {out_bits} must lie in 1..{seed.k - 1}")
    packed = pack_le(bits)
    a = np.frombuffer(seed.a, dtype=np.uint8)
    b = np.frombuffer(seed.b, dtype=np.uint8)
    out = np.empty((out_bits + 7) // 8, dtype=np.uint8)
    check_status(
        lib.qp_mersenne_hash(
            pointer("uint8_t *", packed), n, pointer("uint8_t *", a), pointer("uint8_t *", b),
            seed.k, out_bits, pointer("uint8_t *", out),
        ),
        "qp_mersenne_hash",
    )  # fmt: skip
    packed.fill(0)  # the packed copy is key material
    return out
