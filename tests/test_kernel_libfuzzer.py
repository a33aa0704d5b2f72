"""Every C entry point under libFuzzer, AddressSanitizer and UBSan: the short CI run.

The harnesses are ``csrc/fuzz/fuzz_*.c`` (one per entry point: its arguments decoded
from the fuzzer's bytes, legal and not, into exactly sized buffers; the result checked
against a plain reference in C).  ``csrc/fuzz/fuzz.py`` builds and runs them, here for
a few thousand executions each with a fixed seed, so that a run is repeatable; ``make
fuzz`` runs the same harnesses for a million executions each.

clang and its libFuzzer runtime come from ``make deps``, which ``make test`` runs
first.  Without them the test skips on a developer's machine and fails in CI
(``CI=true``), where a skipped fuzz run would pass unnoticed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FUZZ = ROOT / "csrc" / "fuzz" / "fuzz.py"

# Executions per harness: about 20 s of fuzzing in all on two cores after a build
# of about 15 s, and enough to reach every harness's input modes.
CI_RUNS = 10_000
# A guard per harness: a harness slowed down to this is a finding of its own kind.
CI_MAX_TIME_S = 60


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


@pytest.mark.slow
def test_every_entry_point_survives_a_short_fuzz_run(tmp_path: Path) -> None:
    check = subprocess.run(
        [sys.executable, str(FUZZ), "--check"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if check.returncode != 0:
        why = check.stderr.strip() or f"fuzz.py --check exited {check.returncode}"
        if _in_ci():
            pytest.fail(f"CI has no libFuzzer toolchain: {why}")
        pytest.skip(why)
    report = tmp_path / "report.json"
    run = subprocess.run(
        [
            sys.executable,
            str(FUZZ),
            "--runs",
            str(CI_RUNS),
            "--max-time",
            str(CI_MAX_TIME_S),
            "--seed",
            "1",
            "--build-dir",
            str(tmp_path / "fuzz"),
            "--report",
            str(report),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    output = run.stdout[-6000:] + run.stderr[-6000:]
    assert run.returncode == 0, output
    results = json.loads(report.read_text())
    harnesses = {p.stem.removeprefix("fuzz_") for p in FUZZ.parent.glob("fuzz_*.c")}
    assert {r["target"] for r in results} == harnesses, output
    for r in results:
        assert r["crashes"] == 0, f"{r['target']}: {r['finding']}\n{output}"
        assert r["executions"] == CI_RUNS, f"{r['target']} ran {r['executions']} times\n{output}"
