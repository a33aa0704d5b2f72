"""End to end: two `qnoded run` processes on simulated hardware, a real Mosquitto.

These run `qnoded demo` as a user would (with ``--fast`` so the simulation runs
as fast as the pipeline takes it) and check its JSON summary against the
textbook link model.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow


def run_demo(broker: tuple[str, int], tmp: Path, *args: str, seconds: float = 8) -> dict[str, Any]:
    host, port = broker
    cmd = [
        sys.executable,
        "-m",
        "qnoded",
        "demo",
        "--quiet",
        "--fast",
        "--seconds",
        str(seconds),
        "--broker",
        f"{host}:{port}",
        "--workdir",
        str(tmp),
        *args,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    logs = "".join(f"\n--- {p.name}\n" + p.read_text()[-3000:] for p in sorted(tmp.glob("*.log")))
    assert res.returncode == 0, res.stderr + res.stdout + logs
    last = res.stdout.strip().splitlines()[-1]
    summary: dict[str, Any] = json.loads(last)
    return summary


def textbook_bb84(link: dict[str, Any], y0: float) -> tuple[float, float]:
    """Gain and QBER of signal pulses (Ma et al., PRA 72, 012326, 2005)."""
    eta = link["detector_efficiency"] * 10 ** (
        -link["attenuation_db_per_km"] * link["distance_km"] / 10
    )
    mu = link["mu_signal"]
    gain = y0 + 1 - math.exp(-eta * mu)
    qber = (y0 / 2 + link["misalignment"] * (1 - math.exp(-eta * mu))) / gain
    return gain, qber


@pytest.mark.parametrize("protocol", ["bb84", "bbm92"])
def test_demo_locks_and_sifts(protocol: str, mqtt_broker: tuple[str, int], tmp_path: Path) -> None:
    s = run_demo(
        mqtt_broker,
        tmp_path,
        "--protocol",
        protocol,
        "--drift-ppm",
        "10",
        "--clock-offset-ps",
        "-987654321",
    )
    alice, bob = s["nodes"]["alice"], s["nodes"]["bob"]
    for node in (alice, bob):
        assert node["exit_code"] == 0
        assert node["locked"], node
        assert node["dropped_batches"] == 0
        assert node["sifted_bits"] > 5000
    # Alice found Bob's clock offset (-0.988 ms plus the fibre's flight time)
    # and 10 ppm of drift without being told.
    flight_ps = s["link"]["distance_km"] * 1e3 * 1.468 / 299_792_458 * 1e12
    assert alice["lock_offset_ps"] == pytest.approx(-987_654_321 + flight_ps * 1.00001, abs=2_000)
    assert alice["lock_drift_ppm"] == pytest.approx(10.0, abs=0.05)
    assert alice["drift_ppm"] == pytest.approx(10.0, abs=0.01)
    assert alice["qber"] < 0.04
    cmp = s["key_comparison"]
    assert cmp["bits_compared"] > 5000
    assert cmp["length_mismatches"] == 0
    assert alice["keys_match_apart_from_measured_errors"]


def test_bb84_matches_textbook(mqtt_broker: tuple[str, int], tmp_path: Path) -> None:
    s = run_demo(mqtt_broker, tmp_path, "--protocol", "bb84", "--distance-km", "25")
    alice = s["nodes"]["alice"]
    y0 = alice["vacuum_gain"]  # the receiver's dark yield, measured on vacuum pulses
    gain, qber = textbook_bb84(s["link"], y0)
    # The textbook has no dead time; each detector is blind for dead_time_ps
    # after a click (non-paralysable), so it sees a share m*tau fewer photons.
    pulses = sum(alice["pulses"].values())
    m = alice["coincidences"] / pulses * s["link"]["pulse_rate_hz"] / 4
    gain = y0 + (gain - y0) * (1 - m * s["link"]["dead_time_ps"] * 1e-12)
    n_signal = alice["pulses"]["signal"]
    sigma_gain = math.sqrt(gain / n_signal)
    assert alice["signal_gain"] == pytest.approx(gain, abs=5 * sigma_gain + 0.02 * gain)
    n = alice["qber_sample_bits"]
    sigma_q = math.sqrt(qber * (1 - qber) / n)
    assert alice["qber"] == pytest.approx(qber, abs=5 * sigma_q + 0.003)


def test_eavesdropper_raises_qber(mqtt_broker: tuple[str, int], tmp_path: Path) -> None:
    s = run_demo(mqtt_broker, tmp_path, "--protocol", "bb84", "--eve", "0.5")
    alice = s["nodes"]["alice"]
    # intercept-resend on a fraction p adds about p/4
    assert alice["qber"] == pytest.approx(0.01 + 0.5 / 4, abs=0.025)


def test_mismatched_seeds_give_no_key(mqtt_broker: tuple[str, int], tmp_path: Path) -> None:
    s = run_demo(mqtt_broker, tmp_path, "--protocol", "bb84", "--mismatch-seeds")
    alice = s["nodes"]["alice"]
    assert alice["locked"]  # timing is public; bits are not
    assert alice["qber"] == pytest.approx(0.5, abs=0.03)
    assert not alice["keys_match_apart_from_measured_errors"] or alice["qber"] > 0.4
