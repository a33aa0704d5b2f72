"""`qnoded plan`, used as a user would: the command line in process and as ``python -m qnoded``.

Expected values come from qnoded.estimation called directly (or from closed forms), never pasted
from the planner's own output, so the planner must agree with the code the daemon uses.
"""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qnoded import cli
from qnoded.estimation import (
    BlockCounts,
    Hardware,
    Intensities,
    expected_block_counts,
    gain,
    max_distance,
    mixed_gain_qber,
    optimal_mu,
    qber,
    rate_infinite_decoy,
)
from qnoded.plan import block_label, si_rate

# Ma, Qi, Zhao and Lo 2005, Fig. 1: the GYS infinite-decoy curve ends near 142 km.
MA_2005_GYS_KM = 142.0
PULSE_RATE_HZ = 1e9  # the planner's default source
P_Z = 0.5  # the planner's default basis choice: the daemon's balanced source, Bob's 50/50 split
GYS_Z_KEY = Hardware(q_sift=P_Z**2)  # GYS, key from Z-Z pulses only, as the planner counts it
EXIT_CONFIG = 2
# cli.main configures logging for the whole process: every test gets it back.
pytestmark = pytest.mark.usefixtures("restore_logging")


def plan(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["--log-format", "console", "plan", *args])
    out, err = capsys.readouterr()
    return code, out, err


def plan_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    code, out, err = plan(capsys, *args, "--json")
    assert code == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def km_in(text: str, pattern: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in:\n{text}"
    return float(match.group(1))


# ------------------------------------------------------------------- the published GYS curve


def test_gys_maximum_distance_in_table_and_csv(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_csv = tmp_path / "gys.csv"
    code, out, _ = plan(
        capsys, "--preset", "gys", "--distance-km", "0:150:5", "--csv", str(out_csv)
    )
    assert code == 0

    printed = km_in(out, r"maximum distance: ([\d.]+) km asymptotic")
    assert printed == pytest.approx(MA_2005_GYS_KM, abs=1.0)
    assert printed == pytest.approx(max_distance(Hardware()), abs=0.05)  # the daemon's code

    rows = read_csv(out_csv)
    assert [float(r["distance_km"]) for r in rows] == [5.0 * i for i in range(31)]
    (csv_km,) = {float(r["max_distance_asymptotic_km"]) for r in rows}  # one value, every row
    assert csv_km == pytest.approx(printed, abs=0.05)
    # The curve itself ends there: key at 140 km, none at 145 km.
    by_km = {float(r["distance_km"]): r for r in rows}
    assert float(by_km[140.0]["rate_asymptotic_bits_per_s"]) > 0.0
    assert float(by_km[145.0]["rate_asymptotic_bits_per_s"]) == 0.0
    assert by_km[145.0]["mu_signal_asymptotic"] == ""
    # Finite blocks end earlier, and the CSV says where.
    finite_km = float(rows[0]["max_distance_finite_nz_1e6_km"])
    assert 0.0 < finite_km < printed
    assert finite_km == pytest.approx(km_in(out, r"([\d.]+) km with 1e6-bit blocks"), abs=0.05)


def test_at_km_answer_agrees_with_rate_infinite_decoy(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = plan(capsys, "--preset", "gys", "--at-km", "60", "--distances", "60")
    assert code == 0
    line = next(x for x in out.splitlines() if x.startswith("at 60 km:"))
    mu, bits_per_pulse = optimal_mu(GYS_Z_KEY, 60.0)
    assert bits_per_pulse == pytest.approx(rate_infinite_decoy(GYS_Z_KEY, mu, 60.0))
    expected = si_rate(bits_per_pulse * PULSE_RATE_HZ)
    assert expected.endswith("kbit/s")  # tens of kbit/s: the scale a metro user expects
    assert line.startswith(f"at 60 km: {expected} asymptotic (mu {mu:.3f}), ")
    assert re.search(r", [\d.]+ kbit/s with 1e6-bit blocks \(mu [\d.]+, a block every ", line)

    # The JSON carries the unrounded numbers.
    at = plan_json(capsys, "--preset", "gys", "--at-km", "60", "--distances", "60")["at"]
    assert at["summary"] == line
    assert at["rate_asymptotic_bits_per_s"] == pytest.approx(
        rate_infinite_decoy(GYS_Z_KEY, at["mu_signal_asymptotic"], 60.0) * PULSE_RATE_HZ,
        rel=1e-12,
    )


def test_key_basis_probability_scales_the_rate_not_the_distance(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Ma et al.'s figures key from both bases (q = 1/2); with p_Z**2 = 1/2 ours is theirs.
    p_z = math.sqrt(0.5)
    doc = plan_json(capsys, "--preset", "gys", "--p-z", repr(p_z), "--distances", "0,50,100")
    for point in doc["points"]:
        _, ma_rate = optimal_mu(Hardware(), point["distance_km"])
        assert point["rate_asymptotic_bits_per_pulse"] == pytest.approx(ma_rate, rel=1e-9)
    assert doc["max_distance_km"]["asymptotic"] == pytest.approx(max_distance(Hardware()))


def test_flags_override_the_preset(capsys: pytest.CaptureFixture[str]) -> None:
    # Twice the detector efficiency is 3.01 dB less loss: the same curve shifted by 3.01 dB of
    # fibre, since every rate depends on the transmittance only.
    base = plan_json(capsys, "--preset", "gys", "--distances", "0")
    better = plan_json(
        capsys, "--preset", "gys", "--detector-efficiency", "0.09", "--distances", "0"
    )
    shift_km = 10.0 * math.log10(2.0) / 0.21
    assert better["parameters"]["detector_efficiency"] == 0.09
    assert better["parameters"]["misalignment"] == 0.033  # the rest still GYS
    assert better["max_distance_km"]["asymptotic"] == pytest.approx(
        base["max_distance_km"]["asymptotic"] + shift_km, abs=0.05
    )


def test_fixed_signal_intensity_is_used_for_both_curves(capsys: pytest.CaptureFixture[str]) -> None:
    doc = plan_json(capsys, "--preset", "gys", "--mu-signal", "0.3", "--distances", "20,80")
    for point in doc["points"]:
        assert point["mu_signal_asymptotic"] == 0.3
        assert point["rate_asymptotic_bits_per_pulse"] == pytest.approx(
            rate_infinite_decoy(GYS_Z_KEY, 0.3, point["distance_km"]), rel=1e-12
        )
        finite = point["finite"][0]
        assert finite["mu_signal"] == (0.3 if finite["secret_bits_per_block"] > 0 else None)
    assert doc["points"][0]["finite"][0]["mu_signal"] == 0.3  # 20 km: key
    fixed_km = doc["max_distance_km"]["asymptotic"]
    assert rate_infinite_decoy(GYS_Z_KEY, 0.3, fixed_km) > 0.0
    assert rate_infinite_decoy(GYS_Z_KEY, 0.3, fixed_km + 0.05) == 0.0
    # A fixed intensity can only shorten the reach.
    assert fixed_km <= max_distance(GYS_Z_KEY)


# ------------------------------------------------------------------------------- finite key


def test_finite_key_below_asymptotic_and_growing_with_the_block(
    capsys: pytest.CaptureFixture[str],
) -> None:
    blocks = ["1e5", "1e6", "1e7", "1e8", "1e10"]
    doc = plan_json(capsys, "--preset", "gys", "--distances", "0,30,60,90", "--block-bits", *blocks)
    assert doc["parameters"]["block_bits"] == [10**5, 10**6, 10**7, 10**8, 10**10]
    for point in doc["points"]:
        asymptotic = point["rate_asymptotic_bits_per_s"]
        finite = [key["rate_bits_per_s"] for key in point["finite"]]
        assert finite == sorted(finite), point["distance_km"]
        assert all(rate < asymptotic for rate in finite)
        assert finite[-1] > 0.6 * asymptotic  # the largest block gets close
        for key in point["finite"]:
            if key["rate_bits_per_s"] > 0.0:
                # Secret bits per block over the time to collect it.
                assert key["rate_bits_per_s"] == pytest.approx(
                    key["secret_bits_per_block"] / key["block_duration_s"]
                )
    reach = list(doc["max_distance_km"]["finite"].values())
    asymptotic_reach = doc["max_distance_km"]["asymptotic"]
    assert reach[0] == 0.0  # 1e5-bit blocks never pay for their own estimation
    assert reach == sorted(reach)
    assert reach[-2] < asymptotic_reach  # 1e8 bits, a day's key on a metro link
    # 1e10 bits go a little further on Lim's vacuum credit, which Ma et al.'s rate lacks: only
    # p_Z**2 * Y0 bits per pulse, so not far. The report explains it rather than hide it.
    assert asymptotic_reach < reach[-1] < asymptotic_reach + 3.0
    (note,) = doc["notes"]
    assert note.startswith("note: 1e10-bit blocks reach past the asymptotic maximum distance")


def test_finite_key_closes_in_on_the_asymptote(capsys: pytest.CaptureFixture[str]) -> None:
    # With a weak decoy and nearly all pulses at the signal intensity, what remains of the gap
    # for huge blocks is finite size, and it closes. The only credit Ma et al.'s rate lacks is
    # Lim's s_Z0 (vacuum detections are secret): at most p_Z**2 * Y0 bits per pulse.
    doc = plan_json(
        capsys,
        "--preset", "gys",
        "--mu-decoy", "0.02",
        "--p-signal", "0.98",
        "--p-decoy", "0.01",
        "--distances", "0,60,120",
        "--block-bits", "1e8", "1e10", "1e12", "1e14",
    )  # fmt: skip
    vacuum_credit = P_Z**2 * Hardware().y0
    for point in doc["points"]:
        asymptotic = point["rate_asymptotic_bits_per_pulse"]
        finite = [key["rate_bits_per_pulse"] for key in point["finite"]]
        assert finite == sorted(finite)
        assert all(rate <= asymptotic + vacuum_credit for rate in finite)
        assert finite[-1] > 0.9 * asymptotic


def test_expected_block_counts_closed_forms() -> None:
    hw, km = Hardware(), 40.0
    inten = Intensities(mu1=0.5, mu2=0.1, mu3=0.001, p1=0.7, p2=0.2, p3=0.1)
    n_pulses, p_z = 1e11, 0.8
    counts = expected_block_counts(hw, inten, km, n_pulses, p_z)
    assert isinstance(counts, BlockCounts)
    for k, (mu, p) in enumerate(zip(inten.mus, inten.ps, strict=True)):
        detections = n_pulses * p * gain(hw, mu, km)
        # abs=1: the helper multiplies in another order, and round() may land either side.
        assert counts.n_z[k] == pytest.approx(detections * p_z**2, abs=1)
        assert counts.n_x[k] == pytest.approx(detections * (1 - p_z) ** 2, abs=1)
        assert counts.m_x[k] == round(counts.n_x[k] * qber(hw, mu, km))
    mean_gain, mean_qber = mixed_gain_qber(hw, inten, km)
    assert mean_gain == pytest.approx(
        sum(p * gain(hw, mu, km) for mu, p in zip(inten.mus, inten.ps, strict=True))
    )
    # Detection-weighted: between the cleanest and the noisiest class.
    class_qbers = [qber(hw, mu, km) for mu in inten.mus]
    assert min(class_qbers) < mean_qber < max(class_qbers)
    assert sum(counts.n_z) == pytest.approx(n_pulses * p_z**2 * mean_gain, abs=3)  # 3 roundings


def test_expected_block_counts_edges() -> None:
    inten = Intensities(mu1=0.5, mu2=0.1, mu3=0.0, p1=0.8, p2=0.1, p3=0.1)
    silent = Hardware(y0=0.0)  # a vacuum class without dark counts is never detected
    counts = expected_block_counts(silent, inten, 10.0, 1e9, 0.5)
    assert counts.n_z[2] == counts.n_x[2] == counts.m_x[2] == 0
    assert mixed_gain_qber(silent, inten, 10.0)[1] == pytest.approx(Hardware().e_d, rel=1e-3)
    assert expected_block_counts(silent, inten, 10.0, 0.0, 0.5) == BlockCounts(
        (0, 0, 0), (0, 0, 0), (0, 0, 0)
    )
    for bad in ({"n_pulses": -1.0}, {"n_pulses": math.inf}, {"p_z": 1.5}, {"p_z": math.nan}):
        args: dict[str, Any] = {"n_pulses": 1e6, "p_z": 0.5} | bad
        with pytest.raises(ValueError, match=next(iter(bad))):
            expected_block_counts(silent, inten, 10.0, **args)


# ---------------------------------------------------------------------------------- outputs


def test_default_run_prints_a_readable_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = plan(capsys)  # the metro preset on 0..200 km
    assert code == 0
    assert "preset metro" in out
    assert "key from Z-basis pulses only: p_Z 0.5" in out
    table = [line for line in out.splitlines() if re.match(r"\s+\d+(\.\d+)?\s", line)]
    assert [float(line.split()[0]) for line in table] == [10.0 * i for i in range(21)]
    assert "(one row in 10 of 201 distances; --csv writes them all)" in out
    assert re.search(r"maximum distance: [\d.]+ km asymptotic, [\d.]+ km with 1e6-bit blocks", out)
    assert "at " not in out.split("maximum distance")[1]  # no --at-km, no answer line


def test_csv_has_units_in_its_header_and_parses(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_csv = tmp_path / "plan.csv"
    code, out, _ = plan(
        capsys, "--distances", "0,25,400", "--block-bits", "1e6", "2.5e6", "--csv", str(out_csv)
    )
    assert code == 0
    assert f"wrote {out_csv}" in out
    rows = read_csv(out_csv)
    assert len(rows) == 3
    header = list(rows[0])
    assert header[:5] == [
        "distance_km",
        "mu_signal_asymptotic",
        "rate_asymptotic_bits_per_pulse",
        "rate_asymptotic_bits_per_s",
        "max_distance_asymptotic_km",
    ]
    assert "rate_finite_nz_2.5e6_bits_per_s" in header
    assert "block_duration_nz_1e6_s" in header
    for row in rows:
        for name, value in row.items():
            # Every cell is a number, or empty where there is no key (no intensity, no block).
            if value or not name.startswith(("mu_signal", "block_duration")):
                assert math.isfinite(float(value)), (name, value)
    beyond = rows[2]  # 400 km: no key anywhere
    assert float(beyond["rate_asymptotic_bits_per_s"]) == 0.0
    assert float(beyond["rate_finite_nz_1e6_bits_per_s"]) == 0.0
    assert beyond["mu_signal_finite_nz_1e6"] == ""


def test_lossless_link_is_unbounded(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = plan(capsys, "--alpha-db-per-km", "0", "--distances", "0,1000")
    assert code == 0
    assert "maximum distance: unbounded asymptotic, unbounded with 1e6-bit blocks" in out
    doc = plan_json(capsys, "--alpha-db-per-km", "0", "--distances", "0,1000")
    assert doc["max_distance_km"] == {"asymptotic": None, "finite": {"1000000": None}}


def test_png_is_written_with_matplotlib(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out_png = tmp_path / "plan.png"
    code, out, err = plan(
        capsys, "--preset", "gys", "--distance-km", "0:150:10", "--block-bits", "1e6", "1e8",
        "--png", str(out_png),
    )  # fmt: skip
    assert code == 0, err
    assert f"wrote {out_png}" in out
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out_png.stat().st_size > 10_000  # axes, curves and legend, not an empty canvas


def test_png_without_matplotlib_says_how_to_get_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules is how Python marks a module as unimportable.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out_csv = tmp_path / "plan.csv"
    code, _, err = plan(capsys, "--csv", str(out_csv), "--png", str(tmp_path / "plan.png"))
    assert code == EXIT_CONFIG
    assert "--png" in err
    assert "pip install 'qnoded[plot]'" in err
    assert not out_csv.exists()  # refused before any work, not half done


# ---------------------------------------------------------------------------- bad parameters


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--detector-efficiency", "1.5"], "--detector-efficiency"),
        (["--dark-count-prob=-1e-6"], "--dark-count-prob"),
        (["--misalignment", "0.6"], "--misalignment"),
        (["--ec-efficiency", "0.9"], "--ec-efficiency"),
        (["--alpha-db-per-km", "-0.2"], "--alpha-db-per-km"),
        (["--pulse-rate-hz", "nan"], "--pulse-rate-hz"),
        (["--mu-signal", "0.08"], "--mu-signal"),
        (["--mu-decoy", "0.0"], "--mu-decoy"),
        (["--mu-vacuum", "-0.01"], "--mu-vacuum"),
        (["--p-signal", "0.95"], "--p-decoy"),
        (["--p-z", "1"], "--p-z"),
        (["--eps-sec", "0"], "--eps-sec"),
        (["--block-bits", "1e6", "0.5"], "--block-bits"),
        (["--distance-km", "10:0:1"], "--distance-km"),
        (["--distance-km", "0:1e9:1"], "--distance-km"),
        (["--distances", "10,-5"], "--distances"),
        (["--at-km", "-1"], "--at-km"),
        (["--csv", "/nonexistent-dir/plan.csv"], "--csv"),
    ],
)
def test_bad_parameter_exits_2_naming_it(
    capsys: pytest.CaptureFixture[str], args: list[str], flag: str
) -> None:
    code, out, err = plan(capsys, *args)
    assert code == EXIT_CONFIG
    assert out == ""
    assert f"configuration error: qnoded plan: {flag}: " in err


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--mu-signal", "fast"], "--mu-signal"),
        (["--distance-km", "0-200"], "--distance-km"),
        (["--detector-efficiency", "high"], "--detector-efficiency"),
        (["--preset", "nope"], "--preset"),
        (["--distances", "1,2", "--distance-km", "0:2:1"], "--distance-km"),
    ],
)
def test_malformed_flag_is_a_usage_error_naming_it(
    capsys: pytest.CaptureFixture[str], args: list[str], flag: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["plan", *args])
    assert exc.value.code == EXIT_CONFIG
    assert f"argument {flag}" in capsys.readouterr().err


# ------------------------------------------------------------------------ as a user runs it


def test_python_m_qnoded_plan_answers_in_one_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "qnoded", "plan", "--preset", "gys", "--at-km", "60",
         "--distances", "60"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    _, bits_per_pulse = optimal_mu(GYS_Z_KEY, 60.0)
    assert f"at 60 km: {si_rate(bits_per_pulse * PULSE_RATE_HZ)} asymptotic" in proc.stdout


def test_helpers_format_for_people() -> None:
    assert block_label(1_000_000) == "1e6"
    assert block_label(2_500_000) == "2.5e6"
    assert block_label(1_234_567) == "1.234567e6"
    assert block_label(5000) == "5000"
    assert si_rate(68_004.2) == "68.0 kbit/s"
    assert si_rate(7.344e3) == "7.34 kbit/s"
    assert si_rate(1.5e6) == "1.50 Mbit/s"
    assert si_rate(100.0) == "100 bit/s"
    assert si_rate(0.0) == "0 bit/s"
