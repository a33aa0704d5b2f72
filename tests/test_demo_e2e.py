"""End to end: two `qnoded run` processes on simulated hardware, a real Mosquitto.

These run `qnoded demo` as a user would (with ``--fast`` so the simulation runs
as fast as the pipeline takes it, and 3e5-bit blocks so that several finish in
a few seconds) and check its JSON summary against the textbook link model, and
the keys both nodes delivered over MQTT against each other, ID by ID.
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
        "--block-bits",
        "300000",
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
def test_demo_makes_identical_secret_key(
    protocol: str, mqtt_broker: tuple[str, int], tmp_path: Path
) -> None:
    s = run_demo(
        mqtt_broker,
        tmp_path,
        "--protocol",
        protocol,
        "--drift-ppm",
        "10",
        "--clock-offset-ps",
        "-987654321",
        seconds=12,
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
    # Secret key, at both nodes, from the same blocks.
    assert alice["blocks_accepted"] >= 1, alice
    assert alice["secret_bits"] > 0
    assert 1.0 < alice["ec_efficiency"] < 1.10
    cmp = s["key_comparison"]
    assert cmp["keys_compared"] >= 100, cmp
    assert cmp["keys_mismatched"] == 0
    assert alice["keys_identical_by_id"]
    assert not cmp["alarms"]["alice"] and not cmp["alarms"]["bob"], cmp["alarms"]


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


def test_eavesdropper_gets_no_key_and_an_alarm(
    mqtt_broker: tuple[str, int], tmp_path: Path
) -> None:
    s = run_demo(mqtt_broker, tmp_path, "--protocol", "bb84", "--eve", "0.5", seconds=10)
    alice, bob = s["nodes"]["alice"], s["nodes"]["bob"]
    # intercept-resend on a fraction p adds about p/4
    assert alice["qber"] == pytest.approx(0.01 + 0.5 / 4, abs=0.025)
    # Blocks were formed and every one was refused by the finite-key bound.
    assert alice["blocks_rejected"] >= 1
    assert alice["blocks_accepted"] == bob["blocks_accepted"] == 0
    assert alice["secret_bits"] == bob["secret_bits"] == 0
    assert "estimation" in alice["block_reject_reasons"]
    cmp = s["key_comparison"]
    assert cmp["keys_seen_alice"] == cmp["keys_seen_bob"] == 0
    assert "no-secret-key" in cmp["alarms"]["alice"]


def test_mismatched_seeds_give_no_key(mqtt_broker: tuple[str, int], tmp_path: Path) -> None:
    s = run_demo(mqtt_broker, tmp_path, "--protocol", "bb84", "--mismatch-seeds")
    alice = s["nodes"]["alice"]
    assert alice["locked"]  # timing is public; bits are not
    assert alice["qber"] == pytest.approx(0.5, abs=0.03)
    assert alice["secret_bits"] == 0
    assert s["key_comparison"]["keys_seen_alice"] == 0
