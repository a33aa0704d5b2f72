#!/usr/bin/env python3
"""Build and run the libFuzzer harnesses of the C kernel (csrc/fuzz/fuzz_*.c).

The one place that knows how the harnesses are built and run: ``make fuzz``
(the long run) and ``tests/test_kernel_libfuzzer.py`` (the short CI run) both
call this script.  Standard library only, so it runs before any venv exists.

Each harness is linked with the kernel's own sources (csrc/qkernel.c,
csrc/qpost.c), all compiled by clang with libFuzzer, AddressSanitizer and
UndefinedBehaviorSanitizer, no recovery: the first finding stops that
harness.  Each runs for ``--runs`` executions, or until ``--max-time``
seconds, whichever comes first; the figures printed are libFuzzer's own
("Done N runs in S second(s)").

    python3 csrc/fuzz/fuzz.py --runs 1000000           # every harness
    python3 csrc/fuzz/fuzz.py --only sift poly61       # some of them
    python3 csrc/fuzz/fuzz.py --check                  # is clang + libFuzzer here?

Exit status: 0 no finding, 1 a finding (crash, sanitizer report, broken
invariant, timeout) or a harness that did not run, 2 no toolchain or a build
failure.  Findings are saved under BUILD/artifacts/ for replay:
``BUILD/fuzz_<name> BUILD/artifacts/<name>-crash-...``.
"""

# ruff: noqa: T201 - a command-line tool: its output is the table it prints
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent
ROOT = CSRC.parent
SOURCES = (CSRC / "qkernel.c", CSRC / "qpost.c")
HEADERS = (CSRC / "qkernel.h", CSRC / "qpost.h", HERE / "fuzz_input.h")

# The flags the task fixes, plus the language level and warnings of the real
# build (csrc/build_qkernel.py) and frame pointers for readable stacks.
CFLAGS = [
    "-g",
    "-O1",
    "-fsanitize=fuzzer,address,undefined",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
    "-std=c99",
    "-Wall",
    "-Wextra",
    f"-I{CSRC}",
]
LIBS = ["-lgmp", "-lm", "-pthread"]  # as the cffi build links: GMP for qp_mersenne_hash

# print_stacktrace: a UBSan report names the line; leaks are findings too.
SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}

FINDING = re.compile(
    r"ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error:|fuzz invariant failed"
)
DONE = re.compile(r"^Done (\d+) runs in (\d+) second", re.MULTILINE)


@dataclass
class Result:
    target: str
    entry_point: str
    executions: int | None
    seconds: int | None  # libFuzzer's, whole seconds
    wall_seconds: float
    exec_per_s: float | None
    crashes: int
    finding: str  # the first report line, "" when none
    artifact: str
    time_limited: bool


def targets() -> dict[str, str]:
    """Harness name -> the entry point it fuzzes (from its "Fuzz target:" line)."""
    found = {}
    for src in sorted(HERE.glob("fuzz_*.c")):
        m = re.search(r"Fuzz target: (\w+)", src.read_text())
        found[src.stem.removeprefix("fuzz_")] = m.group(1) if m else "?"
    return found


def find_clang() -> str | None:
    return shutil.which(os.environ.get("CLANG", "clang"))


def missing_toolchain() -> str | None:
    """What to install, or None when clang and its libFuzzer runtime are here."""
    clang = find_clang()
    if clang is None:
        return "clang is not installed (Debian: apt-get install clang; `make deps` does it)"
    runtime = f"libclang_rt.fuzzer-{platform.machine()}.a"
    path = subprocess.run(
        [clang, f"-print-file-name={runtime}"], capture_output=True, text=True, check=False
    ).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        major = subprocess.run(
            [clang, "-dumpversion"], capture_output=True, text=True, check=False
        ).stdout.split(".")[0]
        return (
            f"clang has no libFuzzer runtime ({runtime}); Debian 12: "
            f"apt-get install libclang-rt-{major}-dev (`make deps` does it)"
        )
    return None


def _stale(out: Path, inputs: list[Path], stamp: str) -> bool:
    flags = out.with_name(out.name + ".flags")
    if not out.exists() or not flags.exists() or flags.read_text() != stamp:
        return True
    built = out.stat().st_mtime
    return any(p.stat().st_mtime > built for p in inputs)


def _compile(cmd: list[str], out: Path, inputs: list[Path]) -> str | None:
    """Run cmd to make out unless it is up to date; an error message on failure."""
    stamp = " ".join(cmd)
    if not _stale(out, inputs, stamp):
        return None
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        return f"{' '.join(cmd)}\n{run.stderr}"
    if run.stderr.strip():  # warnings: shown, not fatal
        print(run.stderr, file=sys.stderr)
    out.with_name(out.name + ".flags").write_text(stamp)
    return None


def build(names: list[str], build_dir: Path, jobs: int) -> list[str]:
    """Compile the kernel once and link every harness; the errors, if any."""
    clang = find_clang()
    assert clang is not None
    obj_dir = build_dir / "obj"
    obj_dir.mkdir(parents=True, exist_ok=True)
    headers = [h for h in HEADERS if h.exists()]
    with ThreadPoolExecutor(jobs) as pool:
        objs = [obj_dir / (src.stem + ".o") for src in SOURCES]
        errors = [
            e
            for e in pool.map(
                lambda so: _compile(
                    [clang, *CFLAGS, "-c", str(so[0]), "-o", str(so[1])], so[1], [so[0], *headers]
                ),
                zip(SOURCES, objs, strict=True),
            )
            if e
        ]
        if errors:
            return errors

        def link(name: str) -> str | None:
            src, out = HERE / f"fuzz_{name}.c", build_dir / f"fuzz_{name}"
            cmd = [clang, *CFLAGS, str(src), *map(str, objs), *LIBS, "-o", str(out)]
            return _compile(cmd, out, [src, *headers, *objs])

        return [e for e in pool.map(link, names) if e]


def run_one(
    name: str, entry: str, build_dir: Path, *, runs: int, max_time: int, seed: int, corpus: bool
) -> Result:
    artifacts = build_dir / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(build_dir / f"fuzz_{name}"),
        f"-runs={runs}",
        f"-max_total_time={max_time}",
        "-timeout=20",  # one input running this long is a hang: a finding
        "-rss_limit_mb=4096",
        # Slow inputs (the hash's multi-megabit modes) get fewer mutations.
        "-entropic_scale_per_exec_time=1",
        f"-artifact_prefix={artifacts}/{name}-",
        "-print_final_stats=1",
    ]
    if seed:
        cmd.append(f"-seed={seed}")
    if corpus:  # kept between long runs (build/ is not committed)
        corpus_dir = build_dir / "corpus" / name
        corpus_dir.mkdir(parents=True, exist_ok=True)
        cmd.append(str(corpus_dir))
    env = dict(os.environ, **SANITIZER_ENV)
    t0 = time.monotonic()
    # A harness that hangs outside libFuzzer's watch is killed well after its budget.
    try:
        run = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=max_time + 120, check=False
        )
        out, rc = run.stdout + run.stderr, run.returncode
    except subprocess.TimeoutExpired as exc:
        out, rc = f"killed after {max_time + 120} s\n{exc.stderr or ''}", -9
    wall = time.monotonic() - t0
    log = build_dir / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(out)
    done = DONE.search(out)
    finding = FINDING.search(out)
    first = ""
    if finding or rc != 0 or not done:
        lines = [ln for ln in out.splitlines() if FINDING.search(ln) or "SUMMARY" in ln]
        first = lines[0].strip() if lines else f"exit status {rc}, no 'Done' line (see {log})"
    artifact = re.search(r"Test unit written to (\S+)", out)
    executions = int(done.group(1)) if done else None
    seconds = int(done.group(2)) if done else None
    return Result(
        target=name,
        entry_point=entry,
        executions=executions,
        seconds=seconds,
        wall_seconds=round(wall, 1),
        exec_per_s=round(executions / wall) if executions else None,
        crashes=1 if first else 0,
        finding=first,
        artifact=artifact.group(1) if artifact else "",
        time_limited=executions is not None and executions < runs,
    )


def table(results: list[Result]) -> str:
    rows = [
        ("harness", "entry point", "executions", "s (libFuzzer)", "s (wall)", "exec/s", "crashes")
    ]
    for r in results:
        rows.append(
            (
                r.target,
                r.entry_point,
                f"{r.executions:,}" if r.executions is not None else "-",
                str(r.seconds) if r.seconds is not None else "-",
                f"{r.wall_seconds:.1f}",
                f"{r.exec_per_s:,.0f}" if r.exec_per_s else "-",
                str(r.crashes) + (" (time limit)" if r.time_limited else ""),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in results:
        if r.finding:
            lines.append(
                f"{r.target}: {r.finding}" + (f"\n  input: {r.artifact}" if r.artifact else "")
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1_000_000, help="executions per harness")
    parser.add_argument("--max-time", type=int, default=3600, help="seconds per harness, at most")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="harnesses at once")
    parser.add_argument("--seed", type=int, default=0, help="libFuzzer's seed (0: random)")
    parser.add_argument(
        "--corpus", action="store_true", help="keep a corpus per harness in BUILD/corpus"
    )
    parser.add_argument("--build-dir", type=Path, default=ROOT / "build" / "fuzz")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="these harnesses (fuzz_NAME.c)")
    parser.add_argument("--report", type=Path, help="write the results as JSON here")
    parser.add_argument("--check", action="store_true", help="only check the toolchain")
    parser.add_argument("--build-only", action="store_true")
    args = parser.parse_args(argv)

    missing = missing_toolchain()
    if missing:
        print(f"fuzz: {missing}", file=sys.stderr)
        return 2
    if args.check:
        return 0
    known = targets()
    names = args.only or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"fuzz: no harness {unknown}; there are {sorted(known)}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    errors = build(names, args.build_dir, args.jobs)
    if errors:
        print("fuzz: build failed\n" + "\n".join(errors), file=sys.stderr)
        return 2
    print(
        f"built {len(names)} harnesses in {args.build_dir} ({time.monotonic() - t0:.1f} s)",
        flush=True,
    )
    if args.build_only:
        return 0
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(
            pool.map(
                lambda n: run_one(
                    n,
                    known[n],
                    args.build_dir,
                    runs=args.runs,
                    max_time=args.max_time,
                    seed=args.seed,
                    corpus=args.corpus,
                ),
                names,
            )
        )
    print(table(results))
    print(f"total {time.monotonic() - t0:.1f} s")
    if args.report:
        args.report.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 1 if any(r.crashes or r.executions is None for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
