"""Eavesdropper drills: intercept-resend on 0, 5, 10, 20, 50 and 100 % of the pulses.

Each fraction runs Alice and Bob as ``qnoded run`` processes on the demo's
simulated BB84 link (``--fast``, 3e5-bit blocks, as tests/test_demo_e2e.py)
until one block is decided, with bench/drill_eve.py's harness, which reads
everything where an operator and a key consumer read it: each block's
finite-key length and outcome from the nodes' JSON logs, alarms, telemetry and
keys from MQTT, what was kept from their key stores.

Per block the promise is: key, at both nodes and identical ID by ID, exactly
when the finite-key length (Lim et al., PRA 89, 022307, 2014) leaves at least
one whole key; otherwise nothing stored, nothing delivered, and a
``no-secret-key`` alarm from both nodes naming the block (checked by
``drill_eve.violations``).  Without Eve the link must make key (or the drill
proves nothing); at 50 and 100 % it must make none; at 5 to 20 % the bound
decides, block by block.  Across fractions, the QBER rises by about a quarter
of the intercepted fraction.  About 20 s per fraction; the bench script runs
the same drill for longer and prints the figures.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import drill_eve  # bench/drill_eve.py: the drill harness, shared with the benchmark

pytestmark = pytest.mark.slow

BLOCK_BITS = 300_000
# About 20 s per fraction on an idle 2-core machine; the deadline allows a busy one.
DEADLINE_S = 120.0
# The demo's link: 1 % misalignment plus dark counts give about 1.7 % QBER without Eve.
BASELINE_QBER_MAX = 0.03
QBER_ALARM_THRESHOLD = 0.11  # [sifting] qber_alarm_threshold, the default

Drill = Callable[[float], drill_eve.DrillResult]


@pytest.fixture(scope="module")
def drill(
    mqtt_broker: tuple[str, int], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Drill]:
    """Run (once per module) the drill for a fraction; later asks get the same result."""
    done: dict[float, drill_eve.DrillResult] = {}

    def run(fraction: float) -> drill_eve.DrillResult:
        if fraction not in done:
            done[fraction] = drill_eve.run_drill(
                fraction,
                broker=mqtt_broker,
                workdir=tmp_path_factory.mktemp(f"eve-{fraction:g}"),
                target_blocks=1,
                block_bits=BLOCK_BITS,
                deadline_s=DEADLINE_S,
            )
        return done[fraction]

    yield run


@pytest.mark.parametrize("fraction", drill_eve.FRACTIONS)
def test_key_only_where_the_finite_key_bound_allows(fraction: float, drill: Drill) -> None:
    r = drill(fraction)
    logs = r.log_tail()
    assert r.exit_codes == {"alice": 0, "bob": 0}, logs
    assert r.condition_met, f"no block decided in {DEADLINE_S} s{logs}"
    assert r.decided(), logs
    # Per block: key iff the bound leaves a whole key, else nothing kept and
    # alarms; keys only to the link's own consumers, identical ID by ID.
    bad = drill_eve.violations(r)
    assert not bad, "\n".join(bad)
    with_key = r.with_key()
    alice = r.telemetry["alice"]
    if fraction == 0.0:
        # Without Eve the link makes key, or this drill proves nothing.
        assert with_key, "\n".join(str(b) for b in r.decided())
        assert alice["secret_bits"] > 0
    if fraction >= 0.5:
        assert not with_key
        assert not r.key_messages
        assert not any(b.stored for b in r.blocks.values())
        assert alice["secret_bits"] == r.telemetry["bob"]["secret_bits"] == 0
        # A QBER this high is an alarm of its own, whatever the blocks say.
        assert "qber-high" in r.alarm_codes("alice"), r.alarms
        assert "qber-high" in r.alarm_codes("bob"), r.alarms


def test_qber_rises_with_the_intercepted_fraction(drill: Drill) -> None:
    """Intercept-resend on a fraction f: Eve guesses the basis wrong half the
    time and then Bob's bit is a coin flip, so about f/4 is added to the QBER
    (the X-basis sample of signal pulses, as the nodes publish it)."""
    qber = {f: drill(f).telemetry["alice"]["qber"] for f in drill_eve.FRACTIONS}
    base = qber[0.0]
    assert 0 < base < BASELINE_QBER_MAX, qber
    previous = base
    for f in drill_eve.FRACTIONS[1:]:
        added = qber[f] - base
        assert 0.5 * f / 4 < added < 1.5 * f / 4, (f, qber)
        assert qber[f] > previous, qber
        previous = qber[f]
    # Bob publishes the same figure, counted on his side of the same sample.
    for f in drill_eve.FRACTIONS:
        assert drill(f).telemetry["bob"]["qber"] == pytest.approx(qber[f], abs=0.005), f
    assert qber[0.5] > QBER_ALARM_THRESHOLD
