"""Verification and privacy amplification: the two hashes that end a block.

**Verification.**  After error correction Alice sends a hash of her key; Bob
compares it with the hash of his.  The hash is a polynomial over GF(2^61 - 1)
evaluated at ``t`` random points (``qp_poly61``): two different keys of ``L``
7-byte chunks collide with probability at most ``((L + 1) / p)^t``, and ``t``
is the least that brings this under ``eps_cor``.

**Privacy amplification.**  A multilinear Carter-Wegman family over the
Mersenne prime ``p = 2^k - 1``: the key ``x`` is cut into chunks ``x_1..x_L``
of ``k - 1`` bits and ``h(x) = ((sum a_i x_i + b) mod p) mod 2^m``, with the
``a_i`` uniform in ``[1, p-1]`` and ``b`` in ``[0, p-1]``.  Two distinct keys
differ in some chunk ``j``, and ``a_j (x_j - y_j)`` then takes every nonzero
residue once, so they collide mod ``p`` with probability at most
``1/(p-1)``, and after the cut to ``m`` bits at most
``ceil(p / 2^m)/(p-1)`` = ``2^-m (1 + 2^-(k-m) + ...)`` (Carter and Wegman
1979; Wegman and Carter 1981 for the inner product): with ``k`` the least
Mersenne exponent above ``m + 64`` that is ``2^-m`` to within ``2^-64``, what
the leftover hash lemma needs.  Sizing ``p`` by the output rather than by the
input makes the products small: a 1e8-bit block hashed to 5e7 bits is two
products of 5.8e7-bit numbers on two cores (GMP's FFT multiplication),
where one prime above 1e8 bits would cost a 1.4e8 x 1e8-bit product.  The
seed ``(a_1..a_L, b)`` is public and comes from Alice's random source,
fresh per block.

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
from qnoded.kernel import KernelInputError, check_status, checked_array, pointer

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
    if checked.shape[0] and int(checked.max()) > 1:  # packbits would take any nonzero as 1
        k = int(np.flatnonzero(checked > 1)[0])
        raise KernelInputError(f"key bits[{k}] = {int(checked[k])} is a value other than 0 or 1")
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
    if isinstance(data, bytes):
        buf = np.frombuffer(data, dtype=np.uint8)
    else:  # the C call takes buf.shape[0] bytes: another dtype would be hashed in part
        buf = checked_array("data", data, np.uint8, make_contiguous=True)
    pts = checked_array("points", points, np.uint64, make_contiguous=True)
    if pts.shape[0] == 0 or int(pts.max()) >= P61:
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


# Bits the prime exceeds the output by: the cut to m bits then costs at most
# a factor 1 + 2^-64 on the collision probability.
PA_MARGIN_BITS = 64


def mersenne_exponent(nbits: int) -> int:
    """The least Mersenne exponent k with nbits < k."""
    for k in MERSENNE_EXPONENTS:
        if k > nbits:
            return k
    raise HashError(
        f"an output of {nbits} bits is longer than privacy amplification supports "
        f"({MAX_PA_BITS - PA_MARGIN_BITS} bits); use a smaller block size"
    )


def pa_chunks(nbits: int, k: int) -> int:
    """How many ``k - 1``-bit chunks a key of ``nbits`` bits is cut into."""
    return -(-nbits // (k - 1)) if nbits > k - 1 else 1


@dataclass(frozen=True, slots=True)
class PaSeed:
    """The public choice of hash: the ``a_i`` in [1, p-1] (``a``, one k-bit
    little-endian integer per chunk, back to back) and ``b`` in [0, p-1]."""

    k: int
    a: bytes
    b: bytes

    @classmethod
    def fresh(cls, nbits: int, out_bits: int) -> PaSeed:
        """A seed for hashing ``nbits`` key bits to ``out_bits``."""
        k = mersenne_exponent(out_bits + PA_MARGIN_BITS)
        p = (1 << k) - 1
        nbytes = (k + 7) // 8
        a = b"".join(
            (1 + secrets.randbelow(p - 1)).to_bytes(nbytes, "little")
            for _ in range(pa_chunks(nbits, k))
        )
        return cls(k=k, a=a, b=secrets.randbelow(p).to_bytes(nbytes, "little"))

    def check(self, nbits: int, out_bits: int) -> None:
        """Shape checks; the values' ranges are checked where they are used (in C)."""
        if self.k not in MERSENNE_EXPONENTS or self.k <= out_bits + PA_MARGIN_BITS:
            raise HashError(
                f"seed exponent {self.k} does not suit an output of {out_bits} bits "
                f"(needs a Mersenne exponent above {out_bits + PA_MARGIN_BITS})"
            )
        nbytes = (self.k + 7) // 8
        chunks = pa_chunks(nbits, self.k)
        if len(self.a) != chunks * nbytes or len(self.b) != nbytes:
            raise HashError(
                f"a {nbits}-bit key needs {chunks} coefficients of {nbytes} bytes and a "
                f"{nbytes}-byte b for k = {self.k}; the seed has {len(self.a)} and {len(self.b)}"
            )


def amplify(bits: U8, seed: PaSeed, out_bits: int) -> U8:
    """``((sum a_i x_i + b) mod p) mod 2^out_bits``, packed little-endian in (out_bits+7)//8 bytes.

    The secret key stays packed: it is stored and delivered as bytes.
    """
    bits = checked_array("key bits", bits, np.uint8, make_contiguous=True)
    n = int(bits.shape[0])
    if out_bits <= 0:
        raise HashError(f"output length {out_bits} must be positive")
    seed.check(n, out_bits)
    packed = pack_le(bits)
    a = np.frombuffer(seed.a, dtype=np.uint8)
    b = np.frombuffer(seed.b, dtype=np.uint8)
    out = np.empty((out_bits + 7) // 8, dtype=np.uint8)
    rc = lib.qp_mersenne_hash(
        pointer("uint8_t *", packed), n, pointer("uint8_t *", a), pa_chunks(n, seed.k),
        pointer("uint8_t *", b), seed.k, out_bits, pointer("uint8_t *", out),
    )  # fmt: skip
    if rc == lib.QK_EINVAL:  # the shapes were checked above: a value is out of range
        packed.fill(0)
        raise HashError(f"seed value out of range for the prime 2^{seed.k} - 1")
    check_status(rc, "qp_mersenne_hash")
    packed.fill(0)  # the packed copy is key material
    return out
