"""Alice's clock model outlives a session and a restart, and is checked when it does.

A restarted Alice restores the saved model (BB84: her reference is the
source's slot clock, which the restart does not reset) and keeps it while
Bob's TAGS name the same time base.  A carried-over model can be off by whole
pulse periods, which slot matching cannot see (the bits just go random); her
vacuum pulses can, and the first batch corrects it.  A new time base at Bob
voids the model.  Simulated link, real engines, messages through the wire codec.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from test_node_faults import _args
from test_sim_physics import _bob, _collect, _laser

from qnoded import peer
from qnoded.config import NodeConfig, parse_config
from qnoded.contracts import TagBatch
from qnoded.demo import link_parameters, node_config
from qnoded.sifting import AliceEngine, BobEngine


def wire(msg: dict[str, Any]) -> dict[str, Any]:
    return peer.decode_arrays(peer.encode_arrays(msg))


def configs(tmp: Path) -> tuple[NodeConfig, NodeConfig, dict[str, Any]]:
    args = _args(protocol="bb84", distance_km=25.0, fast=True)
    # A short sync pattern, so the key stream (and the vacuum pulses) start soon.
    sim = link_parameters(args) | {"sync_duration_ps": 50_000_000_000}
    a, b = (
        parse_config(node_config(r, args, "127.0.0.1:1883", 1, tmp, sim)) for r in ("alice", "bob")
    )
    return a, b, sim


def run(alice: AliceEngine, bob: BobEngine, batches: list[TagBatch]) -> tuple[int, int]:
    """Sift the batches; the X-basis errors and bits Alice counted meanwhile."""
    e0, n0 = alice.stats.sample_errors, alice.stats.sample_bits
    for b in batches:
        sample = bob.on_sift(wire(alice.on_tags(wire(bob.on_batch(b)))))
        if sample is not None:
            bob.on_result(wire(alice.on_sample(wire(sample))))
    return alice.stats.sample_errors - e0, alice.stats.sample_bits - n0


def test_restored_model_is_kept_checked_and_voided(tmp_path: Path) -> None:
    a_cfg, b_cfg, sim = configs(tmp_path)
    tagger, _, _ = _bob(sim)
    batches = _collect(tagger, 120)
    laser = _laser(sim)
    bob = BobEngine(b_cfg)
    bob.epoch = 41
    alice = AliceEngine(a_cfg, laser=laser)
    errors, bits = run(alice, bob, batches[:60])
    assert alice.clock is not None and bits > 10_000 and errors / bits < 0.05
    saved = alice.clock_state()
    assert saved is not None and saved["peer_epoch"] == 41

    # A restart whose model is off by two whole pulse periods: the first batch
    # with enough detections finds it on the vacuum pulses and corrects it.
    period = laser.period_ps
    off = dict(saved, offset_ps=saved["offset_ps"] + 2 * period * (1 + saved["drift"]))
    restarted = AliceEngine(a_cfg, laser=laser)
    restarted.restore_clock(off)
    bob.forget()
    errors, bits = run(restarted, bob, batches[60:90])
    assert restarted.stats.locked and bits > 5_000
    assert errors / bits < 0.05, f"QBER {errors / bits:.3f} after the slot check"
    assert abs(restarted.clock.offset_ps - saved["offset_ps"]) < period / 2  # type: ignore[union-attr]

    # Without the check the same model gives random bits: the check is what saves them.
    unchecked = AliceEngine(a_cfg, laser=laser)
    unchecked.restore_clock(off)
    unchecked.slot_check_due = False
    bob.forget()
    errors, bits = run(unchecked, bob, batches[60:90])
    assert errors / bits > 0.4

    # Bob's tagger restarted (a new time base): the model is void, Alice locks afresh.
    bob.forget()
    bob.epoch = 42
    kept = AliceEngine(a_cfg, laser=laser)
    kept.restore_clock(saved)
    kept.on_tags(wire(bob.on_batch(batches[90])))
    assert kept.peer_epoch == 42 and kept.clock is None and not kept.stats.locked


def test_malformed_saved_clock_is_refused(tmp_path: Path) -> None:
    a_cfg, _, sim = configs(tmp_path)
    alice = AliceEngine(a_cfg, laser=_laser(sim))
    for doc in ({}, {"peer_epoch": 1, "offset_ps": "x", "drift": 0.0}):
        try:
            alice.restore_clock(doc)
        except ValueError as exc:
            assert "saved clock state is malformed" in str(exc)
        else:
            raise AssertionError(f"{doc} accepted")
    assert alice.clock is None


def test_a_skipped_batch_gets_no_sample_and_keeps_the_lock(tmp_path: Path) -> None:
    """Alice could not sift a batch (her own tagger behind): Bob keeps his lock state
    and sends no QBER sample for it (one she never asked for would end the session)."""
    a_cfg, b_cfg, sim = configs(tmp_path)
    tagger, _, _ = _bob(sim)
    batches = _collect(tagger, 70)
    alice, bob = AliceEngine(a_cfg, laser=_laser(sim)), BobEngine(b_cfg)
    run(alice, bob, batches[:60])
    assert alice.clock is not None and bob.stats.locked
    msg = wire(bob.on_batch(batches[60]))
    reply = wire(alice.skip_reply(int(msg["seq"][0])))
    assert bob.on_sift(reply) is None and bob.stats.locked
    assert alice.stats.dropped_batches == 1
    errors, bits = run(alice, bob, batches[61:])  # and the session goes on
    assert bits > 0 and errors / bits < 0.05
