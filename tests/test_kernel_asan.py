"""The C kernel built with AddressSanitizer and UBSan, exercised on random and edge inputs.

The extension is compiled into a temporary directory by the project's own cffi
builder with ``QNODED_SANITIZE=address``; a child Python with libasan
preloaded then drives every entry point (through the raw cffi ``lib``, so the
wrappers' checks cannot hide a C bug) and compares results with the numpy
reference.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BUILD = r"""
import sys
sys.path.insert(0, "csrc")
import build_qkernel
build_qkernel.make_builder("_qkernel_asan", absolute=True).compile(tmpdir=sys.argv[1])
"""

EXERCISE = r"""
import sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[2])
import numpy as np
import _qkernel_asan as m
from qnoded import kernel_ref as ref

ffi, lib = m.ffi, m.lib
assert lib.qk_version() >= 1
rng = np.random.default_rng(0)


def p(ctype, a):
    # Exactly sized buffers (no slack), so any overrun is caught; NULL when empty.
    return ffi.cast(ctype, ffi.from_buffer(a)) if a.size else ffi.NULL


def times(n, scale):
    return np.sort(rng.integers(-scale, scale, n)).astype(np.int64)


n_out, off_out, n2 = ffi.new("size_t *"), ffi.new("double *"), ffi.new("size_t *")
for trial in range(400):
    na, nb = (int(x) for x in rng.integers(0, 300, 2))
    scale = int(rng.choice([50, 10**4, 10**6]))
    a, b = times(na, scale), times(nb, scale)
    # diff_histogram
    nbins = int(rng.integers(1, 64))
    lo, width = int(rng.integers(-2 * scale, scale)), int(rng.integers(1, scale))
    counts = np.empty(nbins, np.int64)
    rc = lib.qk_diff_histogram(p("int64_t *", a), na, p("int64_t *", b), nb, lo, width,
                               nbins, p("int64_t *", counts))
    assert rc == 0, rc
    assert (counts == ref.diff_histogram(a, b, lo_ps=lo, bin_ps=width, nbins=nbins)).all()
    # coincidences, with capacities from zero to enough
    window = int(rng.integers(0, scale))
    off = float(rng.integers(-scale // 4, scale // 4 + 1)) + float(rng.choice([0.0, 0.5]))
    gain = float(rng.choice([0.0, 0.1, 1.0]))
    want = ref.coincidences_tracked(a, b, window_ps=window, offset_ps=off, track_gain=gain)
    for cap in sorted({0, max(0, len(want[0]) - 1), len(want[0]), min(na, nb)}):
        ia, ib = np.empty(cap, np.int64), np.empty(cap, np.int64)
        rc = lib.qk_coincidences(p("int64_t *", a), na, p("int64_t *", b), nb, window, off,
                                 gain, p("int64_t *", ia), p("int64_t *", ib), cap, n_out,
                                 off_out)
        if cap < len(want[0]):
            assert rc == lib.QK_ECAPACITY, (rc, cap)
        else:
            assert rc == 0, rc
            assert (ia[: n_out[0]] == want[0]).all() and (ib[: n_out[0]] == want[1]).all()
            assert off_out[0] == want[2]
    # assign_slots (t need not be sorted)
    t = rng.integers(-scale, scale, nb).astype(np.int64)
    slots, inside = np.empty(nb, np.int64), np.empty(nb, np.uint8)
    period = float(rng.uniform(1.0, 2000.0))
    rc = lib.qk_assign_slots(p("int64_t *", t), nb, 3.0, period, 100, gain,
                             p("int64_t *", slots), p("uint8_t *", inside), off_out)
    assert rc == 0, rc
    s_ref, i_ref, t0_ref = ref.assign_slots(t, t0_ps=3.0, period_ps=period, window_ps=100,
                                            track_gain=gain)
    assert (slots == s_ref).all() and (inside == i_ref).all() and off_out[0] == t0_ref
    # bit kernels
    x = rng.integers(0, 2, nb).astype(np.uint8)
    y = rng.integers(0, 2, nb).astype(np.uint8)
    keep = np.empty(nb, np.int64)
    assert lib.qk_sift(p("uint8_t *", x), p("uint8_t *", y), nb, p("int64_t *", keep), n2) == 0
    assert (keep[: n2[0]] == ref.sift(x, y)).all()
    packed = np.empty((nb + 7) // 8, np.uint8)
    assert lib.qk_pack_bits(p("uint8_t *", x), nb, p("uint8_t *", packed)) == 0
    assert (packed == np.packbits(x)).all()
    assert lib.qk_count_errors(p("uint8_t *", x), p("uint8_t *", y), nb, n2) == 0
    assert n2[0] == ref.count_errors(x, y)

# Refusals: unsorted, out of range, bad arguments are reported, not acted on.
u = np.array([5, 1], np.int64)
one = np.empty(1, np.int64)
assert lib.qk_diff_histogram(p("int64_t *", u), 2, p("int64_t *", u), 2, 0, 1, 1,
                             p("int64_t *", one)) == lib.QK_ENOTSORTED
assert lib.qk_coincidences(p("int64_t *", u), 2, p("int64_t *", u), 2, 1, 0.0, 0.0,
                           p("int64_t *", one), p("int64_t *", one), 1, n_out,
                           off_out) == lib.QK_ENOTSORTED
big = np.array([0, lib.QK_T_MAX + 1], np.int64)
assert lib.qk_coincidences(p("int64_t *", big), 2, p("int64_t *", big), 2, 1, 0.0, 0.0,
                           p("int64_t *", one), p("int64_t *", one), 1, n_out,
                           off_out) == lib.QK_ERANGE
assert lib.qk_coincidences(ffi.NULL, 0, ffi.NULL, 0, 1, float("nan"), 0.0, ffi.NULL,
                           ffi.NULL, 0, n_out, off_out) == lib.QK_ERANGE
assert lib.qk_coincidences(ffi.NULL, 0, ffi.NULL, 0, -1, 0.0, 0.0, ffi.NULL, ffi.NULL, 0,
                           n_out, off_out) == lib.QK_EINVAL
assert lib.qk_diff_histogram(ffi.NULL, 0, ffi.NULL, 0, lib.QK_T_MAX - 5, 10, 1,
                             p("int64_t *", one)) == lib.QK_ERANGE
assert lib.qk_diff_histogram(ffi.NULL, 0, ffi.NULL, 0, 0, 0, 1,
                             p("int64_t *", one)) == lib.QK_EINVAL
assert lib.qk_assign_slots(ffi.NULL, 0, 0.0, 0.0, 1, 0.0, ffi.NULL, ffi.NULL,
                           off_out) == lib.QK_EINVAL
far = np.array([lib.QK_T_MAX], np.int64)
s1, w1 = np.empty(1, np.int64), np.empty(1, np.uint8)
assert lib.qk_assign_slots(p("int64_t *", far), 1, 0.0, 0.01, 1, 0.0, p("int64_t *", s1),
                           p("uint8_t *", w1), off_out) == lib.QK_ERANGE
bad_bits = np.array([0, 1, 2], np.uint8)
assert lib.qk_pack_bits(p("uint8_t *", bad_bits), 3, p("uint8_t *", np.empty(1, np.uint8))) \
    == lib.QK_ENOTBIT
# Extreme but valid times: differences near 2^63 must not overflow.
ext = np.array([lib.QK_T_MIN, lib.QK_T_MAX], np.int64)
c2 = np.empty(3, np.int64)
assert lib.qk_diff_histogram(p("int64_t *", ext), 2, p("int64_t *", ext), 2, lib.QK_T_MIN,
                             lib.QK_T_MAX, 2, p("int64_t *", c2[:2])) == 0
i2, j2 = np.empty(2, np.int64), np.empty(2, np.int64)
assert lib.qk_coincidences(p("int64_t *", ext), 2, p("int64_t *", ext[::-1].copy()[:0]), 0,
                           lib.QK_WINDOW_MAX, 0.0, 1.0, p("int64_t *", i2), p("int64_t *", j2),
                           2, n_out, off_out) == 0
assert lib.qk_coincidences(p("int64_t *", ext), 2, p("int64_t *", ext), 2, lib.QK_WINDOW_MAX,
                           float(lib.QK_WINDOW_MAX), 1.0, p("int64_t *", i2),
                           p("int64_t *", j2), 2, n_out, off_out) == 0
# Arbitrary (mostly unsorted) int64 with extreme values: refused, never read or written wrongly.
for trial in range(300):
    na, nb = (int(x) for x in rng.integers(0, 40, 2))
    a = rng.integers(-(2**63), 2**63 - 1, na, dtype=np.int64)
    b = rng.integers(-(2**63), 2**63 - 1, nb, dtype=np.int64)
    if trial % 3 == 0:
        a.sort()
        b.sort()
    cap = min(na, nb)
    ia, ib = np.empty(cap, np.int64), np.empty(cap, np.int64)
    for gain in (0.0, 0.5):
        rc = lib.qk_coincidences(p("int64_t *", a), na, p("int64_t *", b), nb, 1000, 0.0, gain,
                                 p("int64_t *", ia), p("int64_t *", ib), cap, n_out, off_out)
        assert rc in (0, lib.QK_ENOTSORTED, lib.QK_ERANGE), rc
    rc = lib.qk_diff_histogram(p("int64_t *", a), na, p("int64_t *", b), nb, -1000, 10, 200,
                               p("int64_t *", np.empty(200, np.int64)))
    assert rc in (0, lib.QK_ENOTSORTED, lib.QK_ERANGE), rc
# A long run, so the blocked order check and the merge see more than one block.
a, b = times(100_000, 10**9), times(100_000, 10**9)
ia, ib = np.empty(100_000, np.int64), np.empty(100_000, np.int64)
assert lib.qk_coincidences(p("int64_t *", a), a.size, p("int64_t *", b), b.size, 10_000, 0.0,
                           0.0, p("int64_t *", ia), p("int64_t *", ib), ia.size, n_out,
                           off_out) == 0

# Post-processing kernels (qpost.c): a whole Cascade run driven from here with
# exactly sized buffers, on keys of awkward lengths, then both hashes.
for n, k1, k2, frame in ((2, 1, 2, 2), (37, 2, 8, 8), (1000, 8, 64, 128), (5000, 16, 256, 1024)):
    a = rng.integers(0, 2, n, dtype=np.uint8)
    bob = a ^ (rng.random(n) < 0.05).astype(np.uint8)
    ks = np.array([k1, k2, k2], np.int64)
    npass = ks.size
    perms, invs = [], []
    for q in range(npass):
        perm, inv = np.empty(n, np.uint32), np.empty(n, np.uint32)
        assert lib.qp_permutation(q + 1, n, frame, p("uint32_t *", perm), p("uint32_t *", inv)) == 0
        assert np.array_equal(np.sort(perm), np.arange(n))
        perms.append(perm)
        invs.append(inv)
    nbs = [-(-n // int(k)) for k in ks]
    tops, pres = [], []
    for q in range(npass):
        top = np.empty(nbs[q], np.uint8)
        assert lib.qp_block_parity(p("uint8_t *", a), p("uint32_t *", perms[q]), n, int(ks[q]),
                                   p("uint8_t *", top)) == 0
        pre = np.empty(n + 1, np.uint8)
        assert lib.qp_prefix_parity(p("uint8_t *", a), p("uint32_t *", perms[q]), n,
                                    p("uint8_t *", pre)) == 0
        tops.append(top)
        pres.append(pre)
    cap = sum(nbs)
    bob_perm = [np.empty(n, np.uint8) for _ in range(npass)]
    bob_par = [np.empty(nb, np.uint8) for nb in nbs]
    known = [np.empty(nb * 2 * (1 << max(0, int(k - 1).bit_length())), np.uint8)
             for nb, k in zip(nbs, ks)]
    slot = [np.empty(nb, np.int64) for nb in nbs]
    search = [np.empty(cap, np.int64) for _ in range(4)]
    pending = np.empty(cap, np.uint8)
    qs = [np.empty(cap, np.int64) for _ in range(3)]
    owned = []  # a struct field does not keep its ffi.new() array alive: this list does

    def arrays(ctype, xs):
        owned.append(ffi.new(ctype + " *[]", [p(ctype + " *", x) for x in xs]))
        return owned[-1]

    c = ffi.new("qp_cascade *")
    c.n, c.npass, c.ks, c.cap = n, npass, p("int64_t *", ks), cap
    c.perms, c.invs = arrays("uint32_t", perms), arrays("uint32_t", invs)
    c.alice_top, c.bits = arrays("uint8_t", tops), p("uint8_t *", bob)
    c.bob_perm, c.bob_par = arrays("uint8_t", bob_perm), arrays("uint8_t", bob_par)
    c.known, c.slot = arrays("uint8_t", known), arrays("int64_t", slot)
    c.s_pass, c.s_blk, c.s_node, c.work = (p("int64_t *", x) for x in search)
    c.s_pending, c.max_corrected = p("uint8_t *", pending), n
    nq = ffi.new("int64_t *")
    pre_ptrs = arrays("uint8_t", pres)
    ans = np.empty(0, np.uint8)
    for _ in range(10_000):
        assert lib.qp_cascade_round(c, p("uint8_t *", ans), ans.size,
                                    *(p("int64_t *", x) for x in qs), nq) == 0
        if nq[0] == 0:
            break
        ask = [x[:nq[0]].copy() for x in qs]
        if ask[0].size > 1:  # a wrong count and a non-bit are refused, nothing changed
            assert lib.qp_cascade_round(c, p("uint8_t *", ans[:0]), 0,
                                        *(p("int64_t *", x) for x in qs), nq) == lib.QK_EINVAL
            nq[0] = ask[0].size
        ans = np.empty(ask[0].size, np.uint8)
        assert lib.qp_range_parity(pre_ptrs, npass, n, *(p("int64_t *", x) for x in ask),
                                   ask[0].size, p("uint8_t *", ans)) == 0
        bad = ans.copy()
        bad[-1] = 2
        assert lib.qp_cascade_round(c, p("uint8_t *", bad), bad.size,
                                    *(p("int64_t *", x) for x in qs), nq) == lib.QK_ENOTBIT
    else:
        raise AssertionError("Cascade did not finish")
    for q in range(npass):
        chk = np.empty(nbs[q], np.uint8)
        lib.qp_block_parity(p("uint8_t *", bob), p("uint32_t *", perms[q]), n, int(ks[q]),
                            p("uint8_t *", chk))
        assert np.array_equal(chk, tops[q])
    one = np.array([0], np.int64)
    assert lib.qp_range_parity(pre_ptrs, npass, n, p("int64_t *", one), p("int64_t *", one),
                               p("int64_t *", one), 1, p("uint8_t *", np.empty(1, np.uint8))) \
        == lib.QK_EINVAL
for length in (0, 1, 7, 8, 1000):
    data = rng.integers(0, 256, length, dtype=np.uint8)
    pts = np.array([3, 2**61 - 2], np.uint64)
    assert lib.qp_poly61(p("uint8_t *", data), length, p("uint64_t *", pts), 2,
                         p("uint64_t *", np.empty(2, np.uint64))) == 0
for nbits, k, m in ((1, 2, 1), (100, 107, 50), (5000, 9689, 4000), (5003, 61, 50),
                    (4_100_003, 1279, 1000)):
    x = rng.integers(0, 256, (nbits + 7) // 8, dtype=np.uint8)
    kb = (k + 7) // 8
    chunks = -(-nbits // (k - 1)) if nbits > k - 1 else 1
    av = np.zeros(kb * chunks, np.uint8)
    av[::kb] = 2  # every a_i = 2, below every p here (p = 3 for k = 2)
    bv = np.zeros(kb, np.uint8)
    out = np.empty((m + 7) // 8, np.uint8)
    assert lib.qp_mersenne_hash(p("uint8_t *", x), nbits, p("uint8_t *", av), chunks,
                                p("uint8_t *", bv), k, m, p("uint8_t *", out)) == 0
    assert lib.qp_mersenne_hash(p("uint8_t *", x), nbits, p("uint8_t *", av), chunks + 1,
                                p("uint8_t *", bv), k, m, p("uint8_t *", out)) == lib.QK_EINVAL
print("exercised")
"""


def _libasan() -> str | None:
    try:
        out = subprocess.run(
            ["gcc", "-print-file-name=libasan.so"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except FileNotFoundError:
        return None
    # gcc echoes the bare name back when it has no such library.
    return out if os.path.isabs(out) and os.path.exists(out) else None


def test_kernel_under_address_sanitizer(tmp_path: Path) -> None:
    asan = _libasan()
    if asan is None:
        pytest.skip("gcc's libasan.so is not installed, so no AddressSanitizer build")
    build = subprocess.run(
        [sys.executable, "-c", BUILD, str(tmp_path)],
        cwd=ROOT,
        env=dict(os.environ, QNODED_SANITIZE="address"),
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    assert list(tmp_path.glob("_qkernel_asan*.so")), "the sanitized extension was not built"
    run = subprocess.run(
        [sys.executable, "-c", EXERCISE, str(tmp_path), str(ROOT)],
        env=dict(
            os.environ,
            LD_PRELOAD=asan,
            ASAN_OPTIONS="detect_leaks=0",
            UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
        ),
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert "ERROR: AddressSanitizer" not in run.stderr, run.stderr[-3000:]
    assert "runtime error:" not in run.stderr, run.stderr[-3000:]
    assert run.returncode == 0, run.stderr[-3000:]
    assert "exercised" in run.stdout
