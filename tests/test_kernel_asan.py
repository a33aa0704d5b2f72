"""The C kernel built with AddressSanitizer and UBSan, exercised on random and edge inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

EXERCISE = r"""
import sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import _qkernel_asan as m
ffi, lib = m.ffi, m.lib
rng = np.random.default_rng(0)

def p(ctype, a):
    return ffi.cast(ctype, ffi.from_buffer(a)) if a.size else ffi.NULL

for trial in range(300):
    na, nb = rng.integers(0, 300, 2)
    a = np.sort(rng.integers(-10**6, 10**6, na)).astype(np.int64)
    b = np.sort(rng.integers(-10**6, 10**6, nb)).astype(np.int64)
    nbins = int(rng.integers(1, 64))
    counts = np.empty(nbins, np.int64)
    assert lib.qk_diff_histogram(p("int64_t *", a), na, p("int64_t *", b), nb,
                                 int(rng.integers(-10**6, 0)), int(rng.integers(1, 10**5)),
                                 nbins, p("int64_t *", counts)) == 0
    cap = int(rng.integers(0, min(na, nb) + 1))
    ia, ib = np.empty(max(cap, 1), np.int64), np.empty(max(cap, 1), np.int64)
    n, off = ffi.new("size_t *"), ffi.new("double *")
    rc = lib.qk_coincidences(p("int64_t *", a), na, p("int64_t *", b), nb, 5000, 0.0, 0.1,
                             p("int64_t *", ia), p("int64_t *", ib), cap, n, off)
    assert rc in (0, lib.QK_ECAPACITY)
    slots, inside = np.empty(nb, np.int64), np.empty(nb, np.uint8)
    assert lib.qk_assign_slots(p("int64_t *", b), nb, 3.0, 997.5, 100, 0.05,
                               p("int64_t *", slots), p("uint8_t *", inside), off) == 0
    x = rng.integers(0, 2, nb).astype(np.uint8)
    y = rng.integers(0, 2, nb).astype(np.uint8)
    keep = np.empty(max(nb, 1), np.int64)
    assert lib.qk_sift(p("uint8_t *", x), p("uint8_t *", y), nb, p("int64_t *", keep), n) == 0
    packed = np.empty((nb + 7) // 8 or 1, np.uint8)
    assert lib.qk_pack_bits(p("uint8_t *", x), nb, p("uint8_t *", packed)) == 0
    assert lib.qk_count_errors(p("uint8_t *", x), p("uint8_t *", y), nb, n) == 0
# unsorted input and bad arguments are refused, not read out of bounds
u = np.array([5, 1], np.int64)
assert lib.qk_diff_histogram(p("int64_t *", u), 2, p("int64_t *", u), 2, 0, 1, 1,
                             p("int64_t *", np.empty(1, np.int64))) == lib.QK_ENOTSORTED
assert lib.qk_assign_slots(ffi.NULL, 0, 0.0, 0.0, 1, 0.0, ffi.NULL, ffi.NULL, off) == lib.QK_EINVAL
print("exercised")
"""


def _libasan() -> str | None:
    out = subprocess.run(
        ["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return out if out and os.path.isabs(out) and os.path.exists(out) else None


def test_kernel_under_address_sanitizer(tmp_path: Path) -> None:
    asan = _libasan()
    if asan is None:
        pytest.skip("gcc's libasan.so is not installed, so no AddressSanitizer build")
    build = (
        "import sys; sys.path.insert(0, 'csrc'); import build_qkernel as b; "
        f"b.make_builder('_qkernel_asan', absolute=True).compile(tmpdir={str(tmp_path)!r})"
    )
    env = dict(os.environ, QNODED_SANITIZE="address")
    res = subprocess.run(
        [sys.executable, "-c", build],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    run_env = dict(
        os.environ,
        LD_PRELOAD=asan,
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
    )
    res = subprocess.run(
        [sys.executable, "-c", EXERCISE, str(tmp_path)],
        env=run_env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert "AddressSanitizer" not in res.stderr
    assert "runtime error:" not in res.stderr
    assert res.returncode == 0, res.stderr[-3000:]
    assert "exercised" in res.stdout
