"""The link planner: expected secret key rate versus distance for given hardware.

``qnoded plan`` answers "what key rate will I get at 60 km with these detectors?" with the
estimation code the daemon uses (``qnoded.estimation``), on the average link:

* the asymptotic curve: infinitely many decoys and an infinite block (Ma, Qi, Zhao and Lo 2005,
  GLLP), the signal intensity optimised at each distance unless fixed;
* one finite-key curve per block size: Lim et al. 2014 (three intensities, Hoeffding, the bound
  the daemon applies to each block) fed with the counts such a block shows on average, the
  error-correction leak ``f n_Z h(E_Z)`` and the signal intensity again optimised per distance.

Both curves count key from Z-basis pulses only (Alice and Bob each pick Z with probability
``p_Z``, so a pulse sifts into the key with ``p_Z**2``), as the daemon's blocks do, so that the
finite-key curve closes in on the asymptotic one as the block grows. Ma et al. draw their
figures with both bases in the key (factor 1/2): their rates are ``0.5 / p_Z**2`` times ours; the
maximum distance does not depend on it.

The finite key stays below the asymptotic curve but for one credit that Ma et al.'s formula
leaves out: Lim's bound counts detections of vacuum pulses as secret (s_Z0), worth at most
``p_Z**2 * Y0`` bits per pulse. It shows only for large blocks (about 1e9 sifted bits and up
for GYS) near the maximum distance, where they reach a little past the asymptotic cut-off;
the report says so when it happens. What remains of the gap for large blocks is the protocol,
not the block size: three intensities instead of infinitely many decoys, and key from decoy
pulses too.

A block is ``n_Z`` sifted Z-basis bits summed over the intensity classes, the unit of the
daemon's ``[postprocessing] block_bits``; the pulses it takes follow from the link.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, TextIO

from qnoded.config import ConfigError
from qnoded.estimation import (
    DISTANCE_FIRST_PROBE_KM,
    DISTANCE_SEARCH_CAP_KM,
    DISTANCE_TOLERANCE_KM,
    MU_SEARCH_MAX,
    Hardware,
    Intensities,
    Security,
    expected_block_counts,
    finite_key_length,
    golden_section_max,
    h2,
    max_distance,
    mixed_gain_qber,
    optimal_mu,
    rate_infinite_decoy,
)

# ConfigError's "where": a command-line mistake has no file to point at.
SOURCE = "qnoded plan"
PLOT_EXTRA_HINT = "pip install 'qnoded[plot]'"

# The finite key is a whole number of bits, so its optimum over mu is a plateau: a coarser grid
# than the asymptotic search (estimation.MU_GRID_POINTS) brackets it, and golden section stops
# well before the steps of one bit would make it wander.
FINITE_MU_GRID_POINTS = 40
FINITE_MU_TOLERANCE = 1e-4
# Bounds that keep one run to seconds and the float counts exact.
MAX_DISTANCES = 5001
MAX_BLOCK_SIZES = 8
MAX_BLOCK_BITS = 10**15
# A printed table longer than a screen is no longer read; the CSV has every row.
MAX_TABLE_ROWS = 25
TABLE_STRIDES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
DEFAULT_DISTANCES_KM = "0:200:1"
DEFAULT_BLOCK_BITS = (1_000_000,)


@dataclass(frozen=True, slots=True)
class Preset:
    description: str
    hardware: Hardware


PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        "gys": Preset(
            "the GYS detectors of Gobby, Yuan and Shields 2004, as in Ma et al. 2005",
            Hardware(),  # estimation.Hardware's defaults are exactly Ma et al.'s GYS column
        ),
        "metro": Preset(
            "gated InGaAs SPADs on standard fibre: typical values, not a measured system",
            Hardware(alpha_db_per_km=0.2, eta_bob=0.1, y0=1e-6, e_d=0.01, f_ec=1.1),
        ),
    }
)
DEFAULT_PRESET = "metro"


@dataclass(frozen=True, slots=True)
class HardwareFlag:
    """A command-line flag that overrides one field of the preset's Hardware."""

    flag: str
    field: str  # of estimation.Hardware
    metavar: str
    meaning: str
    valid: Callable[[float], bool]
    rule: str

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


HARDWARE_FLAGS = (
    HardwareFlag(
        "--alpha-db-per-km", "alpha_db_per_km", "DB", "fibre attenuation in dB/km",
        lambda v: v >= 0.0, "must be >= 0 dB/km",
    ),
    HardwareFlag(
        "--detector-efficiency", "eta_bob", "ETA",
        "Bob's detection efficiency, his optics' loss included",
        lambda v: 0.0 < v <= 1.0, "must lie in (0, 1]",
    ),
    HardwareFlag(
        "--dark-count-prob", "y0", "P",
        "background click probability per pulse, all of Bob's detectors together",
        lambda v: 0.0 <= v < 1.0, "must lie in [0, 1) (a probability per pulse)",
    ),
    HardwareFlag(
        "--misalignment", "e_d", "P", "probability that a photon hits the wrong detector",
        lambda v: 0.0 <= v <= 0.5, "must lie in [0, 0.5]",
    ),
    HardwareFlag(
        "--ec-efficiency", "f_ec", "F", "error correction leak over the Shannon limit",
        lambda v: v >= 1.0, "must be >= 1 (no code beats the Shannon limit)",
    ),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Link:
    """Everything the planner needs besides the distances and block sizes."""

    preset: str
    # q_sift = p_z**2: the asymptotic rate counts Z-Z pulses only, like the finite key.
    hardware: Hardware
    pulse_rate_hz: float
    mu_signal: float | None  # None: optimised at each distance (and block size)
    mu_decoy: float
    mu_vacuum: float
    p_signal: float
    p_decoy: float
    p_z: float
    security: Security

    def intensities(self, mu_signal: float) -> Intensities:
        return Intensities(
            mu1=mu_signal,
            mu2=self.mu_decoy,
            mu3=self.mu_vacuum,
            p1=self.p_signal,
            p2=self.p_decoy,
            p3=1.0 - self.p_signal - self.p_decoy,
        )


@dataclass(frozen=True, slots=True)
class FiniteKey:
    """The average block of ``block_bits`` sifted Z bits at one distance."""

    block_bits: int
    mu_signal: float | None  # None where there is no key
    secret_bits: int  # per block, >= 0
    pulses_per_block: float  # NaN where there is no key

    @property
    def bits_per_pulse(self) -> float:
        return self.secret_bits / self.pulses_per_block if self.secret_bits > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Point:
    distance_km: float
    mu_asymptotic: float | None  # None where there is no key
    asymptotic_bits_per_pulse: float
    finite: tuple[FiniteKey, ...]  # one per block size, in Plan.block_bits order


@dataclass(frozen=True, slots=True)
class Plan:
    link: Link
    block_bits: tuple[int, ...]
    points: tuple[Point, ...]
    max_distance_km: float  # asymptotic; math.inf on a lossless link
    finite_max_distance_km: tuple[float, ...]  # per block size
    at: Point | None  # the --at-km answer


# --------------------------------------------------------------------------------- the physics


def _raw_finite(link: Link, distance_km: float, block_bits: int, mu_signal: float) -> FiniteKey:
    """Lim's key length for the average block, unclipped (negative: no key, and by how much)."""
    hw = link.hardware
    inten = link.intensities(mu_signal)
    mean_gain, mean_qber = mixed_gain_qber(hw, inten, distance_km)
    z_fraction = link.p_z**2 * mean_gain  # sifted Z bits per pulse
    if z_fraction <= 0.0:  # nothing arrives (transmittance underflows): no block ever fills
        return FiniteKey(block_bits, mu_signal, -1, math.inf)
    n_pulses = block_bits / z_fraction
    counts = expected_block_counts(hw, inten, distance_km, n_pulses, link.p_z)
    # Error correction leaks f (--ec-efficiency) times the Shannon limit of the Z bits' error
    # rate; the X bits cost nothing more, they are disclosed for the phase-error estimate.
    leak = math.ceil(hw.f_ec * sum(counts.n_z) * h2(mean_qber))
    result = finite_key_length(counts, inten, leak, link.security)
    return FiniteKey(block_bits, mu_signal, result.key_length, n_pulses)


def _per_pulse(key: FiniteKey) -> float:
    return key.secret_bits / key.pulses_per_block


def best_finite(link: Link, distance_km: float, block_bits: int) -> FiniteKey:
    """The finite key at the best signal intensity (or the fixed one), clipped at no key."""
    if link.mu_signal is not None:
        best = _raw_finite(link, distance_km, block_bits, link.mu_signal)
    else:
        # Lim's bounds need mu1 > mu2 + mu3, so the search starts above that (not at 0 as
        # estimation.optimal_mu does); a grid first, because near the cut-off the key length is
        # flat or stepped and golden section alone could stall on a plateau.
        lo = link.mu_decoy + link.mu_vacuum
        step = (MU_SEARCH_MAX - lo) / FINITE_MU_GRID_POINTS
        grid = [
            _raw_finite(link, distance_km, block_bits, lo + step * i)
            for i in range(1, FINITE_MU_GRID_POINTS + 1)
        ]
        k = max(range(len(grid)), key=lambda i: _per_pulse(grid[i]))
        best = grid[k]
        mu, _ = golden_section_max(
            lambda m: _per_pulse(_raw_finite(link, distance_km, block_bits, m)),
            lo + step * max(k, 0.5),  # the bracket's lower end must stay above lo
            lo + step * min(k + 2, FINITE_MU_GRID_POINTS),
            FINITE_MU_TOLERANCE,
        )
        polished = _raw_finite(link, distance_km, block_bits, mu)
        if _per_pulse(polished) > _per_pulse(best):
            best = polished
    if best.secret_bits <= 0:
        # No key: the intensity and the block's duration would describe nothing.
        return replace(best, mu_signal=None, secret_bits=0, pulses_per_block=math.nan)
    return best


def asymptotic(link: Link, distance_km: float) -> tuple[float | None, float]:
    """(mu, bits per pulse) with infinite decoys; mu is None where there is no key."""
    if link.mu_signal is None:
        mu, rate = optimal_mu(link.hardware, distance_km)
    else:
        mu, rate = link.mu_signal, rate_infinite_decoy(link.hardware, link.mu_signal, distance_km)
    return (mu if rate > 0.0 else None), rate


def asymptotic_max_distance(link: Link) -> float:
    if link.mu_signal is None:
        return max_distance(link.hardware)
    mu = link.mu_signal
    # max_distance maximises rate_fn over mu; a fixed mu is a rate_fn that ignores it.
    return max_distance(link.hardware, lambda hw, _mu, km: rate_infinite_decoy(hw, mu, km))


def finite_max_distance(link: Link, block_bits: int, first_probe_km: float) -> float:
    """Largest distance (to estimation.DISTANCE_TOLERANCE_KM) with a finite key, as
    estimation.max_distance finds it for the asymptotic rate; 0.0 if none even at 0 km."""

    def has_key(km: float) -> bool:
        return best_finite(link, km, block_bits).secret_bits > 0

    if not has_key(0.0):
        return 0.0
    lo = 0.0
    # Start at the asymptotic limit, where the finite key usually ends already; 0 or inf there
    # says nothing (and doubling 0 would never stop).
    hi = first_probe_km if 0.0 < first_probe_km < math.inf else DISTANCE_FIRST_PROBE_KM
    while has_key(hi):
        lo, hi = hi, 2.0 * hi
        if hi > DISTANCE_SEARCH_CAP_KM:
            return math.inf
    while hi - lo > DISTANCE_TOLERANCE_KM:
        mid = (lo + hi) / 2.0
        if has_key(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _point(link: Link, distance_km: float, blocks: Sequence[int], limits: Sequence[float]) -> Point:
    mu, rate = asymptotic(link, distance_km)
    finite = tuple(
        best_finite(link, distance_km, n)
        if distance_km <= limit
        # Past the block's maximum distance there is no key; skip the search.
        else FiniteKey(n, None, 0, math.nan)
        for n, limit in zip(blocks, limits, strict=True)
    )
    return Point(distance_km, mu, rate, finite)


def compute_plan(
    link: Link,
    distances_km: Sequence[float],
    block_bits: Sequence[int],
    at_km: float | None = None,
) -> Plan:
    """The rates at each distance and block size, the maximum distances and the --at-km row."""
    blocks = tuple(block_bits)
    limit = asymptotic_max_distance(link)
    finite_limits = tuple(finite_max_distance(link, n, limit) for n in blocks)
    points = tuple(_point(link, km, blocks, finite_limits) for km in distances_km)
    at = None if at_km is None else _point(link, at_km, blocks, finite_limits)
    return Plan(link, blocks, points, limit, finite_limits, at)


# ------------------------------------------------------------------------------------ output


def block_label(n: int) -> str:
    """1000000 -> '1e6', 2500000 -> '2.5e6', 1234 -> '1234': short, exact, unique."""
    digits = str(n)
    if n < 10_000:
        return digits
    significant = digits.rstrip("0")
    mantissa = significant[0] + ("." + significant[1:] if len(significant) > 1 else "")
    return f"{mantissa}e{len(digits) - 1}"


def si(value: float, unit: str, *, exact: bool = False) -> str:
    """A quantity for people: si(68004.2, 'bit/s') == '68.0 kbit/s' (three significant digits,
    an estimate); si(1e9, 'Hz', exact=True) == '1 GHz' (a setting, no invented zeros)."""
    if value <= 0.0:
        return f"0 {unit}"
    scale, prefix = next(
        ((s, p) for s, p in ((1e9, "G"), (1e6, "M"), (1e3, "k")) if value >= s), (1.0, "")
    )
    if exact:
        return f"{value / scale:g} {prefix}{unit}"
    # '#' keeps the trailing zeros that carry the precision ("68.0"), and a dot ("100.") too.
    return f"{value / scale:#.3g}".rstrip(".") + f" {prefix}{unit}"


def si_rate(bits_per_s: float) -> str:
    return si(bits_per_s, "bit/s")


def _km(km: float) -> str:
    return "unbounded" if math.isinf(km) else f"{km:.1f} km"


def _duration(seconds: float) -> str:
    for scale, unit in ((86400.0, "d"), (3600.0, "h"), (60.0, "min"), (1.0, "s")):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e3:.3g} ms"


def describe_link(link: Link) -> list[str]:
    hw = link.hardware
    mu = "optimised" if link.mu_signal is None else f"{link.mu_signal:g}"
    p_vacuum = 1.0 - link.p_signal - link.p_decoy
    return [
        f"link: preset {link.preset} ({PRESETS[link.preset].description})",
        f"  fibre {hw.alpha_db_per_km:g} dB/km, detector efficiency {hw.eta_bob:g}, "
        f"dark counts {hw.y0:g}/pulse, misalignment {hw.e_d:g}, EC efficiency {hw.f_ec:g}",
        f"  source {si(link.pulse_rate_hz, 'Hz', exact=True)}; mu signal {mu}, "
        f"decoy {link.mu_decoy:g}, vacuum {link.mu_vacuum:g}, "
        f"sent with p {link.p_signal:g}/{link.p_decoy:g}/{p_vacuum:.3g}",
        f"  key from Z-basis pulses only: p_Z {link.p_z:g} at Alice and Bob, sifting factor "
        f"{link.p_z**2:.3g}",
        "asymptotic: infinite decoys and blocks (Ma et al. 2005)",
        f"finite key: Lim et al. 2014, eps_sec {link.security.eps_sec:g}, "
        f"eps_cor {link.security.eps_cor:g}, block = n_Z sifted Z bits",
    ]


def _table_stride(n_rows: int) -> int:
    for stride in TABLE_STRIDES:
        if math.ceil(n_rows / stride) <= MAX_TABLE_ROWS:
            return stride
    return math.ceil(n_rows / MAX_TABLE_ROWS)


def _mu_cell(mu: float | None) -> str:
    return "-" if mu is None else f"{mu:.3f}"


def _rate_cell(value: float) -> str:
    return "0" if value <= 0.0 else f"{value:.3e}"


def format_table(plan: Plan) -> str:
    rate_hz = plan.link.pulse_rate_hz
    # (group, column, width) in display order; the group header spans its columns.
    columns: list[tuple[str, str, int]] = [
        ("", "km", 7),
        ("asymptotic", "mu", 6),
        ("asymptotic", "bit/pulse", 10),
        ("asymptotic", "bit/s", 10),
    ]
    for n in plan.block_bits:
        group = f"n_Z = {block_label(n)} bits"
        columns += [(group, "mu", 6), (group, "bit/s", 10)]
    groups: list[tuple[str, int]] = []
    for group, _name, width in columns:
        if groups and groups[-1][0] == group:
            groups[-1] = (group, groups[-1][1] + width + 2)
        else:
            groups.append((group, width))
    lines = [
        "  ".join(group.center(width) for group, width in groups).rstrip(),
        "  ".join(name.rjust(width) for _group, name, width in columns),
    ]
    stride = _table_stride(len(plan.points))
    for point in plan.points[::stride]:
        cells = [
            f"{point.distance_km:g}",
            _mu_cell(point.mu_asymptotic),
            _rate_cell(point.asymptotic_bits_per_pulse),
            _rate_cell(point.asymptotic_bits_per_pulse * rate_hz),
        ]
        for key in point.finite:
            cells += [_mu_cell(key.mu_signal), _rate_cell(key.bits_per_pulse * rate_hz)]
        lines.append(
            "  ".join(
                cell.rjust(width) for cell, (_g, _n, width) in zip(cells, columns, strict=True)
            )
        )
    if stride > 1:
        lines.append(
            f"(one row in {stride} of {len(plan.points)} distances; --csv writes them all)"
        )
    return "\n".join(lines)


def format_max_distance(plan: Plan) -> str:
    parts = [f"{_km(plan.max_distance_km)} asymptotic"]
    parts += [
        f"{_km(km)} with {block_label(n)}-bit blocks"
        if km > 0.0
        else f"no key with {block_label(n)}-bit blocks"
        for n, km in zip(plan.block_bits, plan.finite_max_distance_km, strict=True)
    ]
    return "maximum distance: " + ", ".join(parts)


def format_at(plan: Plan) -> str:
    """The one-line answer to --at-km."""
    assert plan.at is not None
    point, rate_hz = plan.at, plan.link.pulse_rate_hz
    where = f"at {point.distance_km:g} km"
    if point.mu_asymptotic is None:
        return f"{where}: no key (beyond the {_km(plan.max_distance_km)} maximum distance)"
    parts = [
        f"{si_rate(point.asymptotic_bits_per_pulse * rate_hz)} asymptotic "
        f"(mu {point.mu_asymptotic:.3f})"
    ]
    for key in point.finite:
        label = f"{block_label(key.block_bits)}-bit blocks"
        if key.mu_signal is None:
            parts.append(f"no key with {label}")
        else:
            seconds = key.pulses_per_block / rate_hz
            parts.append(
                f"{si_rate(key.bits_per_pulse * rate_hz)} with {label} "
                f"(mu {key.mu_signal:.3f}, a block every {_duration(seconds)})"
            )
    return f"{where}: " + ", ".join(parts)


def notes(plan: Plan) -> list[str]:
    """What a reader could take for a bug in the numbers, explained."""
    past = [
        block_label(n)
        for n, km in zip(plan.block_bits, plan.finite_max_distance_km, strict=True)
        if km > plan.max_distance_km
    ]
    if not past:
        return []
    return [
        f"note: {', '.join(past)}-bit blocks reach past the asymptotic maximum distance: Lim's "
        "bound credits detections of vacuum pulses as secret (s_Z0, at most p_Z^2 Y0 bits per "
        "pulse), which Ma et al.'s infinite-decoy rate leaves out; near the cut-off that credit "
        "is all the key there is"
    ]


def format_report(plan: Plan) -> str:
    lines = [*describe_link(plan.link), "", format_table(plan), "", format_max_distance(plan)]
    if plan.at is not None:
        lines.append(format_at(plan))
    lines += notes(plan)
    return "\n".join(lines) + "\n"


def _finite_or_none(value: float) -> float | None:
    # JSON has no infinity: an unbounded distance or a never-filled block is null.
    return value if math.isfinite(value) else None


def _point_json(point: Point, rate_hz: float) -> dict[str, Any]:
    return {
        "distance_km": point.distance_km,
        "mu_signal_asymptotic": point.mu_asymptotic,
        "rate_asymptotic_bits_per_pulse": point.asymptotic_bits_per_pulse,
        "rate_asymptotic_bits_per_s": point.asymptotic_bits_per_pulse * rate_hz,
        "finite": [
            {
                "block_bits": key.block_bits,
                "mu_signal": key.mu_signal,
                "rate_bits_per_pulse": key.bits_per_pulse,
                "rate_bits_per_s": key.bits_per_pulse * rate_hz,
                "secret_bits_per_block": key.secret_bits,
                "block_duration_s": _finite_or_none(key.pulses_per_block / rate_hz),
            }
            for key in point.finite
        ],
    }


def plan_json(plan: Plan) -> dict[str, Any]:
    link, hw = plan.link, plan.link.hardware
    rate_hz = link.pulse_rate_hz
    out: dict[str, Any] = {
        "parameters": {
            "preset": link.preset,
            "alpha_db_per_km": hw.alpha_db_per_km,
            "detector_efficiency": hw.eta_bob,
            "dark_count_prob": hw.y0,
            "misalignment": hw.e_d,
            "ec_efficiency": hw.f_ec,
            "pulse_rate_hz": rate_hz,
            "mu_signal": link.mu_signal,  # null: optimised
            "mu_decoy": link.mu_decoy,
            "mu_vacuum": link.mu_vacuum,
            "p_signal": link.p_signal,
            "p_decoy": link.p_decoy,
            "p_z": link.p_z,
            "eps_sec": link.security.eps_sec,
            "eps_cor": link.security.eps_cor,
            "block_bits": list(plan.block_bits),
        },
        "max_distance_km": {
            "asymptotic": _finite_or_none(plan.max_distance_km),
            "finite": {
                str(n): _finite_or_none(km)
                for n, km in zip(plan.block_bits, plan.finite_max_distance_km, strict=True)
            },
        },
        "points": [_point_json(p, rate_hz) for p in plan.points],
        "notes": notes(plan),
    }
    if plan.at is not None:
        out["at"] = _point_json(plan.at, rate_hz) | {"summary": format_at(plan)}
    return out


def csv_header(plan: Plan) -> list[str]:
    header = [
        "distance_km",
        "mu_signal_asymptotic",
        "rate_asymptotic_bits_per_pulse",
        "rate_asymptotic_bits_per_s",
        "max_distance_asymptotic_km",
    ]
    for n in plan.block_bits:
        tag = f"nz_{block_label(n)}"
        header += [
            f"mu_signal_finite_{tag}",
            f"rate_finite_{tag}_bits_per_pulse",
            f"rate_finite_{tag}_bits_per_s",
            f"secret_bits_per_block_{tag}",
            f"block_duration_{tag}_s",
            f"max_distance_finite_{tag}_km",
        ]
    return header


def write_csv(plan: Plan, path: Path) -> None:
    """One row per distance; units in the column names; no key is rate 0 and an empty mu."""

    def cell(value: float | None) -> str:
        # Empty where there is no key; an unbounded distance stays "inf", which float() reads.
        return "" if value is None or math.isnan(value) else repr(value)

    rate_hz = plan.link.pulse_rate_hz
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(csv_header(plan))
        for point in plan.points:
            row = [
                cell(point.distance_km),
                cell(point.mu_asymptotic),
                cell(point.asymptotic_bits_per_pulse),
                cell(point.asymptotic_bits_per_pulse * rate_hz),
                cell(plan.max_distance_km),
            ]
            for key, limit in zip(point.finite, plan.finite_max_distance_km, strict=True):
                row += [
                    cell(key.mu_signal),
                    cell(key.bits_per_pulse),
                    cell(key.bits_per_pulse * rate_hz),
                    str(key.secret_bits),
                    cell(key.pulses_per_block / rate_hz),
                    cell(limit),
                ]
            writer.writerow(row)


def plot_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def write_png(plan: Plan, path: Path) -> None:
    """Key rate (log scale) versus distance: asymptotic, finite-key curves, maximum distances."""
    # Figure without pyplot: no GUI backend, no global figure registry, just Agg into a file.
    # Imported here because matplotlib is an optional extra that only --png needs.
    from matplotlib.figure import Figure  # noqa: PLC0415

    rate_hz = plan.link.pulse_rate_hz
    km = [p.distance_km for p in plan.points]
    fig = Figure(figsize=(8.0, 5.0), layout="constrained")
    ax = fig.add_subplot()
    curves = [
        (
            "asymptotic (infinite decoys)",
            "-",
            [p.asymptotic_bits_per_pulse for p in plan.points],
            plan.max_distance_km,
        )
    ]
    curves += [
        (
            f"finite key, n_Z = {block_label(n)} bits",
            "--",
            [p.finite[i].bits_per_pulse for p in plan.points],
            limit,
        )
        for i, (n, limit) in enumerate(
            zip(plan.block_bits, plan.finite_max_distance_km, strict=True)
        )
    ]
    any_key = False
    for label, style, per_pulse, limit in curves:
        # No key is not a point on a log scale: leave a gap instead of plotting 0.
        y = [r * rate_hz if r > 0.0 else math.nan for r in per_pulse]
        any_key = any_key or any(r > 0.0 for r in per_pulse)
        # The maximum distance goes in the legend: labels on the plot collide when the curves
        # end close together, as large blocks and the asymptote do.
        ends = f"max {_km(limit)}" if limit > 0.0 else "no key"
        (line,) = ax.plot(km, y, style, label=f"{label}: {ends}")
        if math.isfinite(limit) and limit > 0.0:
            ax.axvline(limit, color=line.get_color(), linestyle=":", linewidth=1.0)
    if any_key:  # a log axis with nothing positive on it only warns
        ax.set_yscale("log")
    ax.set_xlabel("distance (km)")
    ax.set_ylabel("secret key rate (bit/s)")
    ax.set_title(
        f"qnoded plan: preset {plan.link.preset}, {si(rate_hz, 'Hz', exact=True)} source, "
        f"key from Z pulses (p_Z = {plan.link.p_z:g})",
        fontsize=10,
    )
    ax.grid(visible=True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------- command line


@dataclass(frozen=True, slots=True)
class Request:
    link: Link
    distances_km: tuple[float, ...]
    block_bits: tuple[int, ...]
    at_km: float | None
    csv_path: Path | None
    png_path: Path | None
    as_json: bool


def _mu_signal_arg(text: str) -> float | None:
    if text.strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {text!r}") from None


def _range_arg(text: str) -> tuple[float, float, float]:
    parts = text.split(":")
    try:
        start, stop, step = (float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected START:STOP:STEP in km (e.g. {DEFAULT_DISTANCES_KM}), got {text!r}"
        ) from None
    return start, stop, step


def _list_arg(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated distances in km (e.g. 10,25,60), got {text!r}"
        ) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Expected secret key rate versus distance: asymptotic (infinite decoys, Ma et al. 2005) "
        "and finite-key (Lim et al. 2014, per block of n_Z sifted Z bits) curves, the maximum "
        "distance and the optimal signal intensity, computed with the daemon's estimation code. "
        "Hardware flags left out take the preset's value."
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--distance-km",
        type=_range_arg,
        metavar="START:STOP:STEP",
        help=f"distance grid, stop included (default {DEFAULT_DISTANCES_KM})",
    )
    where.add_argument("--distances", type=_list_arg, metavar="KM,KM,...", help="distance list")
    p.add_argument("--at-km", type=float, metavar="KM", help="answer for one distance, one line")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=DEFAULT_PRESET,
        help="; ".join(f"{name}: {pr.description}" for name, pr in PRESETS.items())
        + f" (default {DEFAULT_PRESET})",
    )
    hw = p.add_argument_group("hardware (default: the preset's)")
    for item in HARDWARE_FLAGS:
        values = ", ".join(
            f"{name} {getattr(pr.hardware, item.field):g}" for name, pr in PRESETS.items()
        )
        hw.add_argument(
            item.flag, type=float, metavar=item.metavar, help=f"{item.meaning} ({values})"
        )
    src = p.add_argument_group("source and protocol")
    src.add_argument("--pulse-rate-hz", type=float, default=1e9, metavar="HZ", help="default 1e9")
    src.add_argument(
        "--mu-signal",
        type=_mu_signal_arg,
        default=None,
        metavar="auto|MU",
        help="signal mean photon number; auto optimises it per distance (default)",
    )
    src.add_argument("--mu-decoy", type=float, default=0.1, metavar="MU", help="default 0.1")
    src.add_argument("--mu-vacuum", type=float, default=0.0, metavar="MU", help="default 0.0")
    src.add_argument("--p-signal", type=float, default=0.8, metavar="P", help="default 0.8")
    src.add_argument(
        "--p-decoy",
        type=float,
        default=0.1,
        metavar="P",
        help="default 0.1; the vacuum gets the rest",
    )
    src.add_argument(
        "--p-z",
        type=float,
        default=0.5,
        metavar="P",
        help="probability that Alice (and Bob) choose Z, the key basis (default 0.5)",
    )
    fin = p.add_argument_group("finite key")
    fin.add_argument(
        "--block-bits",
        type=float,
        nargs="+",
        metavar="N",
        help="block size(s) in sifted Z bits, as [postprocessing] block_bits (default 1e6)",
    )
    fin.add_argument("--eps-sec", type=float, default=1e-10, metavar="EPS", help="default 1e-10")
    fin.add_argument("--eps-cor", type=float, default=1e-15, metavar="EPS", help="default 1e-15")
    outp = p.add_argument_group("output")
    outp.add_argument("--csv", type=Path, metavar="FILE", help="write every row as CSV")
    outp.add_argument(
        "--png", type=Path, metavar="FILE", help=f"write a plot (needs {PLOT_EXTRA_HINT})"
    )
    outp.add_argument("--json", action="store_true", help="print JSON instead of the table")


def _bad(flag: str, problem: str, fix: str = "") -> ConfigError:
    return ConfigError(SOURCE, flag, problem, fix)


def _check(ok: bool, flag: str, value: object, rule: str) -> None:
    if not ok:
        raise _bad(flag, f"{value!r} {rule}")


def _finite(flag: str, value: float) -> None:
    _check(math.isfinite(value), flag, value, "must be a finite number")


def _distances(args: argparse.Namespace) -> tuple[float, ...]:
    if args.distances is not None:
        distances: tuple[float, ...] = args.distances
        flag = "--distances"
        _check(bool(distances), flag, "", "must list at least one distance")
    else:
        flag = "--distance-km"
        start, stop, step = args.distance_km or _range_arg(DEFAULT_DISTANCES_KM)
        for value in (start, stop, step):
            _finite(flag, value)
        _check(step > 0.0, flag, step, "step must be > 0")
        _check(stop >= start, flag, stop, f"stop must be >= start {start!r}")
        count = math.floor((stop - start) / step + 1e-9) + 1
        _check(count <= MAX_DISTANCES, flag, count, f"distances exceed {MAX_DISTANCES}")
        distances = tuple(start + i * step for i in range(count))
    for km in distances:
        _finite(flag, km)
        _check(km >= 0.0, flag, km, "must be >= 0 km")
    _check(len(distances) <= MAX_DISTANCES, flag, len(distances), f"exceeds {MAX_DISTANCES}")
    return distances


def _blocks(values: Sequence[float] | None) -> tuple[int, ...]:
    flag = "--block-bits"
    if values is None:
        return DEFAULT_BLOCK_BITS
    for value in values:
        _check(
            math.isfinite(value) and value == int(value) and 1 <= value <= MAX_BLOCK_BITS,
            flag,
            value,
            f"must be a whole number of bits in 1..{MAX_BLOCK_BITS:.0e}",
        )
    blocks = tuple(sorted({int(v) for v in values}))
    _check(len(blocks) <= MAX_BLOCK_SIZES, flag, len(blocks), f"sizes exceed {MAX_BLOCK_SIZES}")
    return blocks


def _hardware(args: argparse.Namespace, p_z: float) -> Hardware:
    base = PRESETS[args.preset].hardware
    chosen: dict[str, float] = {}
    for item in HARDWARE_FLAGS:
        given: float | None = getattr(args, item.dest)
        value = getattr(base, item.field) if given is None else given
        _finite(item.flag, value)
        _check(item.valid(value), item.flag, value, item.rule)
        chosen[item.field] = value
    return Hardware(**chosen, q_sift=p_z**2)


def request_from_args(args: argparse.Namespace) -> Request:
    """Validate the command line; a ConfigError names the offending flag."""
    numbers = {
        "--pulse-rate-hz": args.pulse_rate_hz,
        "--mu-decoy": args.mu_decoy,
        "--mu-vacuum": args.mu_vacuum,
        "--p-signal": args.p_signal,
        "--p-decoy": args.p_decoy,
        "--p-z": args.p_z,
        "--eps-sec": args.eps_sec,
        "--eps-cor": args.eps_cor,
    }
    if args.mu_signal is not None:
        numbers["--mu-signal"] = args.mu_signal
    if args.at_km is not None:
        numbers["--at-km"] = args.at_km
    for flag, value in numbers.items():
        _finite(flag, value)
    _check(args.pulse_rate_hz > 0.0, "--pulse-rate-hz", args.pulse_rate_hz, "must be > 0")
    _check(args.mu_vacuum >= 0.0, "--mu-vacuum", args.mu_vacuum, "must be >= 0")
    _check(
        args.mu_decoy > args.mu_vacuum,
        "--mu-decoy",
        args.mu_decoy,
        f"must exceed --mu-vacuum {args.mu_vacuum!r}",
    )
    decoys = args.mu_decoy + args.mu_vacuum
    if args.mu_signal is None:
        _check(
            decoys < MU_SEARCH_MAX,
            "--mu-decoy",
            args.mu_decoy,
            f"leaves no room to optimise the signal: --mu-decoy + --mu-vacuum must stay "
            f"below {MU_SEARCH_MAX}",
        )
    else:
        # Lim's single-photon bound divides by mu1 - mu2 - mu3.
        _check(
            args.mu_signal > decoys,
            "--mu-signal",
            args.mu_signal,
            f"must exceed --mu-decoy + --mu-vacuum = {decoys!r}",
        )
    for flag in ("--p-signal", "--p-decoy", "--p-z"):
        _check(0.0 < numbers[flag] < 1.0, flag, numbers[flag], "must lie in (0, 1)")
    _check(
        args.p_signal + args.p_decoy < 1.0,
        "--p-decoy",
        args.p_decoy,
        f"leaves no vacuum pulses: --p-signal + --p-decoy must stay below 1 "
        f"(--p-signal is {args.p_signal!r})",
    )
    for flag in ("--eps-sec", "--eps-cor"):
        _check(0.0 < numbers[flag] < 1.0, flag, numbers[flag], "must lie in (0, 1)")
    if args.at_km is not None:
        _check(args.at_km >= 0.0, "--at-km", args.at_km, "must be >= 0 km")
    for flag, path in (("--csv", args.csv), ("--png", args.png)):
        if path is not None and not path.parent.is_dir():
            raise _bad(flag, f"directory {str(path.parent)!r} does not exist")
    # Fail before minutes of computing, not after.
    if args.png is not None and not plot_available():
        raise _bad("--png", "plotting needs matplotlib, which is not installed", PLOT_EXTRA_HINT)
    link = Link(
        preset=args.preset,
        hardware=_hardware(args, args.p_z),
        pulse_rate_hz=args.pulse_rate_hz,
        mu_signal=args.mu_signal,
        mu_decoy=args.mu_decoy,
        mu_vacuum=args.mu_vacuum,
        p_signal=args.p_signal,
        p_decoy=args.p_decoy,
        p_z=args.p_z,
        security=Security(eps_sec=args.eps_sec, eps_cor=args.eps_cor),
    )
    return Request(
        link=link,
        distances_km=_distances(args),
        block_bits=_blocks(args.block_bits),
        at_km=args.at_km,
        csv_path=args.csv,
        png_path=args.png,
        as_json=args.json,
    )


def run_plan(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``qnoded plan``: compute, print, write the files. Raises ConfigError on bad flags."""
    stream = sys.stdout if out is None else out  # looked up now, so redirection is honoured
    request = request_from_args(args)
    plan = compute_plan(request.link, request.distances_km, request.block_bits, request.at_km)
    written: list[Path] = []
    if request.csv_path is not None:
        write_csv(plan, request.csv_path)
        written.append(request.csv_path)
    if request.png_path is not None:
        write_png(plan, request.png_path)
        written.append(request.png_path)
    if request.as_json:
        stream.write(json.dumps(plan_json(plan), indent=2) + "\n")
    else:
        stream.write(format_report(plan))
        for path in written:
            stream.write(f"wrote {path}\n")
    return 0
