"""Cascade: corrects what it should, counts what it discloses, rejects bad messages."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qnoded import reconcile
from qnoded.estimation import h2
from qnoded.reconcile import CascadeAlice, CascadeBob, CascadePlan, Query, ReconcileError


def noisy_pair(n: int, qber: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2, n, dtype=np.uint8)
    flips = np.zeros(n, dtype=np.uint8)
    flips[rng.choice(n, round(n * qber), replace=False)] = 1
    return a, a ^ flips


@pytest.mark.parametrize("qber", [0.01, 0.02, 0.03, 0.05])
def test_cascade_corrects_and_is_efficient(qber: float) -> None:
    n = 200_000
    a, b = noisy_pair(n, qber, seed=int(qber * 1000))
    plan = CascadePlan.for_qber(n, qber, seed=99)
    out = reconcile.reconcile_local(a, b, plan)
    assert np.array_equal(out.bits, a)
    assert out.corrected == int(np.count_nonzero(a != b))
    f = reconcile.efficiency(out.leaked_bits, n, qber)
    # Shannon's bound can't be beaten; the floor is 1.10.
    assert 1.0 < f <= 1.10, f


def test_leakage_is_every_disclosed_parity() -> None:
    n = 50_000
    a, b = noisy_pair(n, 0.02, seed=5)
    plan = CascadePlan.for_qber(n, 0.02, seed=1)
    alice = CascadeAlice(a, plan)
    top = alice.top_parities()
    bob = CascadeBob(b, plan, top)
    answered = 0
    q = bob.next_query()
    while q is not None:
        ans = alice.answer(q)
        answered += ans.shape[0]
        q = bob.next_query(ans)
    assert alice.leaked_bits == sum(t.shape[0] for t in top) + answered == bob.leaked_bits
    assert np.array_equal(bob.bits, a)


def test_identical_keys_disclose_only_block_parities() -> None:
    a, _ = noisy_pair(10_000, 0.0, seed=3)
    plan = CascadePlan.for_qber(10_000, 0.02, seed=4)
    out = reconcile.reconcile_local(a, a.copy(), plan)
    assert out.corrected == 0
    assert out.leaked_bits == sum(plan.n_blocks(p) for p in range(len(plan.block_sizes)))


def test_both_sides_derive_the_same_frame_local_shuffles() -> None:
    plan = CascadePlan(n=100, block_sizes=(4, 8), seed=7, frame=32)
    again = CascadePlan(n=100, block_sizes=(4, 8), seed=7, frame=32)
    for (perm, inv), (perm2, _) in zip(plan.shuffles(), again.shuffles(), strict=True):
        assert np.array_equal(perm, perm2)
        assert np.array_equal(np.sort(perm), np.arange(100))
        assert np.array_equal(inv[perm], np.arange(100))
        # Every frame maps onto itself: chains of corrections stay inside it;
        # the last frame takes the 36-bit tail whole.
        frame_of = np.minimum(np.arange(100) // 32, 2)
        assert np.array_equal(frame_of[perm], frame_of)
    p0, p1 = (s[0] for s in plan.shuffles())
    assert not np.array_equal(p0, p1)


def test_bad_messages_are_named() -> None:
    a, b = noisy_pair(1000, 0.05, seed=8)
    plan = CascadePlan.for_qber(1000, 0.05, seed=2)
    alice = CascadeAlice(a, plan)
    top = alice.top_parities()
    with pytest.raises(ReconcileError, match="parity arrays"):
        CascadeBob(b, plan, top[:-1])
    with pytest.raises(ReconcileError, match="block parities"):
        CascadeBob(b, plan, [top[0][:-1], *top[1:]])
    with pytest.raises(ReconcileError, match="outside"):
        alice.answer(Query(np.array([0]), np.array([5]), np.array([2000])))
    with pytest.raises(ReconcileError, match="pass 9"):
        alice.answer(Query(np.array([9]), np.array([0]), np.array([1])))
    bob = CascadeBob(b, plan, top)
    q = bob.next_query()
    assert q is not None
    with pytest.raises(ReconcileError, match="answers"):
        bob.next_query(np.zeros(len(q) + 1, dtype=np.uint8))
    with pytest.raises(ReconcileError, match="bits"):
        CascadeAlice(a[:10], plan)
    with pytest.raises(ReconcileError, match="divide the frame"):
        CascadePlan(n=1000, block_sizes=(3,), seed=0, frame=1024)


def test_efficiency_definition() -> None:
    assert reconcile.efficiency(1100, 10_000, 0.01) == pytest.approx(1100 / (10_000 * h2(0.01)))
    assert reconcile.efficiency(0, 100, 0.0) == 1.0


def test_wrong_answers_end_in_a_named_error_not_a_loop() -> None:
    # Every answer inverted: Bob's searches flip correct bits, cached parities
    # let later searches end without asking, and without a bound the cascade
    # would run on locally for ever.
    rng = np.random.default_rng(7)
    alice = rng.integers(0, 2, 50_000, dtype=np.uint8)
    bob = alice ^ (rng.random(50_000) < 0.02).astype(np.uint8)
    plan = CascadePlan.for_qber(50_000, 0.02, seed=3)
    a = CascadeAlice(alice, plan)
    b = CascadeBob(bob, plan, a.top_parities(), max_corrected=2_000)
    with pytest.raises(reconcile.NotConvergingError, match="did not converge"):
        q = b.next_query()
        while q is not None:
            q = b.next_query(a.answer(q) ^ 1)
    assert b.corrected > 2_000


def test_a_rejected_answer_changes_nothing() -> None:
    # Bob refuses answers that are not parities before his state moves: the
    # exchange goes on with the right ones and ends as if nothing happened.
    a, b = noisy_pair(20_000, 0.03, seed=11)
    plan = CascadePlan.for_qber(20_000, 0.03, seed=12)
    alice = CascadeAlice(a, plan)
    bob = CascadeBob(b, plan, alice.top_parities())
    q = bob.next_query()
    rejected = 0
    while q is not None:
        ans = alice.answer(q)
        bad = ans.copy()
        bad[len(bad) // 2] = 2
        with pytest.raises(ReconcileError, match="not a parity"):
            bob.next_query(bad)
        with pytest.raises(ReconcileError, match="no answers came"):
            bob.next_query()
        rejected += 1
        q = bob.next_query(ans)
    assert rejected == bob.rounds
    assert np.array_equal(bob.bits, a)
    assert bob.leaked_bits == alice.leaked_bits


@st.composite
def cascade_cases(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, CascadePlan]:
    frame = 1 << draw(st.integers(1, 10))
    n = draw(st.integers(2, 3000))
    sizes = tuple(
        1 << draw(st.integers(0, frame.bit_length() - 1)) for _ in range(draw(st.integers(1, 6)))
    )
    plan = CascadePlan(n=n, block_sizes=sizes, seed=draw(st.integers(0, 2**64 - 1)), frame=frame)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    a = rng.integers(0, 2, n, dtype=np.uint8)
    b = a ^ (rng.random(n) < draw(st.floats(0.0, 0.3))).astype(np.uint8)
    return a, b, plan


@given(cascade_cases())
@settings(max_examples=150, deadline=None)
def test_cascade_ends_with_every_block_of_every_pass_even(
    case: tuple[np.ndarray, np.ndarray, CascadePlan],
) -> None:
    # Whatever the plan and the errors: Cascade stops only when Bob's parity of
    # every block of every pass equals Alice's, flips only bits it counts, and
    # both sides count the same disclosures.
    a, b, plan = case
    out = reconcile.reconcile_local(a, b, plan)
    for p in range(len(plan.block_sizes)):
        assert np.array_equal(
            reconcile.block_parities(out.bits, plan, p), reconcile.block_parities(a, plan, p)
        )
    assert out.corrected == int(np.count_nonzero(out.bits != b))
    # Only true errors are flipped: what is left differs from Alice in pairs.
    assert int(np.count_nonzero(out.bits != a)) == int(np.count_nonzero(a != b)) - out.corrected
    assert out.leaked_bits >= sum(plan.n_blocks(p) for p in range(len(plan.block_sizes)))


def test_short_keys_get_late_passes_of_several_blocks() -> None:
    """At 1e4 bits and 1 % QBER, late passes of one 8192-bit block (and a rest) left
    errors in a quarter of the keys, each a block lost at verification."""
    for n in (1_000, 3_000, 10_000, 20_000):
        plan = CascadePlan.for_qber(n, 0.01, seed=1)
        assert all(plan.n_blocks(p) >= reconcile.LATE_MIN_BLOCKS for p in range(1, 6)), plan
    assert CascadePlan.for_qber(10**6, 0.01, seed=1).block_sizes[2] == 8192  # long: as before
    kept = 0
    for t in range(100):
        a, b = noisy_pair(10_000, 0.01, seed=1000 + t)
        out = reconcile.reconcile_local(a, b, CascadePlan.for_qber(10_000, 0.01, seed=t))
        kept += not np.array_equal(out.bits, a)
    assert kept <= 1, f"{kept} of 100 keys kept errors"  # was about 24 of 100
