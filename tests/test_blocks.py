"""The block protocol (qnoded.blocks) between two in-process engines.

Messages go through the peer channel's array encoding both ways, as on the
wire.  Raw key comes from a model of the link: Bob's Z bits are Alice's with
errors at the QBER, decoy classes in the demo's proportions, and X-basis
counts per class consistent with the textbook gains.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from qnoded import blocks, estimation, peer
from qnoded.config import PostprocessingSection
from qnoded.keystore import KeyStore
from qnoded.sifting import SiftedBatch

INTEN = estimation.Intensities(mu1=0.6, mu2=0.2, mu3=0.0, p1=0.5, p2=0.35, p3=0.15)
PP = PostprocessingSection(block_bits=200_000)
# Detections per class out of 100 (signal, decoy, vacuum): the demo link's shares.
SHARES = np.array([0.806, 0.192, 0.002])


def link_batches(
    n_batches: int, bits_per_batch: int, qber: float, seed: int = 1
) -> tuple[dict[int, SiftedBatch], dict[int, SiftedBatch]]:
    rng = np.random.default_rng(seed)
    alice: dict[int, SiftedBatch] = {}
    bob: dict[int, SiftedBatch] = {}
    for seq in range(n_batches):
        a = rng.integers(0, 2, bits_per_batch, dtype=np.uint8)
        cls = rng.choice(3, bits_per_batch, p=SHARES).astype(np.uint8)
        err = rng.random(bits_per_batch) < np.where(cls == 2, 0.5, qber)
        n_x = np.bincount(cls, minlength=3).astype(np.int64)  # as many X as Z detections
        m_x = np.array(
            [rng.binomial(int(n_x[0]), qber), rng.binomial(int(n_x[1]), qber * 1.3),
             rng.binomial(int(n_x[2]), 0.5)],
            dtype=np.int64,
        )  # fmt: skip
        alice[seq] = SiftedBatch(seq, a, cls, n_x=n_x, m_x=m_x)
        bob[seq] = SiftedBatch(seq, (a ^ err).astype(np.uint8), cls.copy())
    return alice, bob


def wire(msg: blocks.Message) -> blocks.Message:  # type: ignore[name-defined]
    return peer.decode_arrays(peer.encode_arrays(msg))


class Recorder(blocks.BlockHooks):
    def __init__(self) -> None:
        self.outcomes: list[blocks.BlockOutcome] = []
        self.staged: dict[uuid.UUID, bytes] = {}
        self.active: list[uuid.UUID] = []
        self.dropped: list[uuid.UUID] = []
        self.store_failures: list[str] = []
        self.want = 0

    def auth_wanted_bytes(self) -> int:
        return self.want

    def auth_stage(self, block_id: uuid.UUID, material: bytes) -> None:
        self.staged[block_id] = material

    def auth_activate(self, block_id: uuid.UUID) -> None:
        self.active.append(block_id)

    def auth_drop(self, block_id: uuid.UUID) -> None:
        self.dropped.append(block_id)

    def outcome(self, outcome: blocks.BlockOutcome) -> None:
        self.outcomes.append(outcome)

    def store_failed(self, message: str) -> None:
        self.store_failures.append(message)


Tamper = Callable[[peer.MsgType, blocks.Message], blocks.Message]  # type: ignore[name-defined]


class Pair:
    def __init__(self, tmp: Path, pp: PostprocessingSection = PP, bbm92: bool = False) -> None:
        self.a_store = KeyStore(tmp / "alice.db")
        self.b_store = KeyStore(tmp / "bob.db")
        self.a_hooks, self.b_hooks = Recorder(), Recorder()
        self.alice = blocks.AliceBlocks(
            pp, self.a_store, peer_id="bob", intensities=None if bbm92 else INTEN,
            hooks=self.a_hooks,
        )  # fmt: skip
        self.bob = blocks.BobBlocks(pp, self.b_store, peer_id="alice", hooks=self.b_hooks)

    def run(
        self,
        a_sifted: dict[int, SiftedBatch],
        b_sifted: dict[int, SiftedBatch],
        *,
        tamper: Tamper | None = None,
        stop_before: peer.MsgType | None = None,
    ) -> int:
        """Drive one block to its end; returns how many messages went over."""
        bob = {
            peer.MsgType.BLOCK_START: lambda m: self.bob.on_start(m, b_sifted),
            peer.MsgType.EC_ANSWER: self.bob.on_answer,
            peer.MsgType.VERIFY: self.bob.on_verify,
            peer.MsgType.COMMIT: self.bob.on_commit,
            peer.MsgType.ABORT: self.bob.on_abort,
            peer.MsgType.RECOVER_REPLY: self.bob.on_recover_reply,
        }
        alice = {
            peer.MsgType.EC_QUERY: self.alice.on_query,
            peer.MsgType.EC_DONE: self.alice.on_done,
            peer.MsgType.PREPARED: self.alice.on_prepared,
            peer.MsgType.ABORT: self.alice.on_abort,
            peer.MsgType.RECOVER: self.alice.on_recover,
        }
        outbox, receiver = self.alice.maybe_start(a_sifted), bob
        sent = 0
        while outbox:
            replies: blocks.Out = []
            for kind, msg in outbox:
                if kind == stop_before:
                    return sent
                sent += 1
                replies += receiver[kind](wire(tamper(kind, msg) if tamper else msg))
            outbox, receiver = replies, (alice if receiver is bob else bob)
        return sent

    def keys(self, store: KeyStore) -> dict[uuid.UUID, bytes]:
        return {k.key_id: k.material for k in store.take(1_000_000)}


def test_block_makes_identical_keys_at_both_nodes(tmp_path: Path) -> None:
    a, b = link_batches(12, 20_000, 0.02)
    pair = Pair(tmp_path)
    pair.run(a, b)
    (out_a,), (out_b,) = pair.a_hooks.outcomes, pair.b_hooks.outcomes
    assert out_a.accepted and out_b.accepted, (out_a, out_b)
    assert out_a.n == out_b.n == 200_000  # ten whole batches
    assert set(a) == set(b) == {10, 11}  # the rest wait for the next block
    assert out_a.qber_z == pytest.approx(0.02, abs=0.003)
    assert out_a.leak_ec_bits == out_b.leak_ec_bits
    assert 1.0 < out_a.ec_efficiency < 1.10
    assert out_a.secret_bits == out_b.secret_bits > 0
    keys_a, keys_b = pair.keys(pair.a_store), pair.keys(pair.b_store)
    assert keys_a == keys_b
    assert len(keys_a) == out_a.keys and all(len(k) == 32 for k in keys_a.values())
    # The key is not the raw key: PA output differs from any raw 32 bytes.
    raw = np.packbits(a[10].bits[:256], bitorder="little").tobytes()
    assert raw not in keys_a.values()


def test_secret_length_follows_lim_bound(tmp_path: Path) -> None:
    a, b = link_batches(10, 20_000, 0.02)
    counts = estimation.BlockCounts(
        n_z=tuple(int(sum(np.count_nonzero(x.cls == c) for x in a.values())) for c in range(3)),
        n_x=tuple(int(sum(x.n_x[c] for x in a.values())) for c in range(3)),
        m_x=tuple(int(sum(x.m_x[c] for x in a.values())) for c in range(3)),
    )
    pair = Pair(tmp_path)
    pair.run(a, b)
    out = pair.a_hooks.outcomes[0]
    bound = estimation.finite_key_length(counts, INTEN, out.leak_ec_bits).key_length
    assert 0 < out.secret_bits <= bound
    assert bound - out.secret_bits < 256 + 8  # whole keys only


def test_high_qber_block_is_refused_before_any_parity(tmp_path: Path) -> None:
    a, b = link_batches(10, 20_000, 0.14)  # intercept-resend on half the pulses
    pair = Pair(tmp_path)
    kinds: list[peer.MsgType] = []

    def spy(kind: peer.MsgType, msg: blocks.Message) -> blocks.Message:  # type: ignore[name-defined]
        kinds.append(kind)
        return msg

    pair.run(a, b, tamper=spy)
    assert kinds == [peer.MsgType.BLOCK_START, peer.MsgType.ABORT]
    (out_a,), (out_b,) = pair.a_hooks.outcomes, pair.b_hooks.outcomes
    assert not out_a.accepted and out_a.reason.startswith("estimation")
    assert not out_b.accepted and out_b.reason.startswith("peer: estimation")
    assert pair.a_store.ready_count() == pair.b_store.ready_count() == (0, 0)
    assert pair.alice.totals.leak_ec_bits == 0  # nothing disclosed


@pytest.mark.parametrize("what", ["parity", "verify-tag", "pa-seed"])
def test_tampered_message_rejects_the_block(tmp_path: Path, what: str) -> None:
    a, b = link_batches(10, 20_000, 0.02)
    pair = Pair(tmp_path)
    flipped = [0]

    def tamper(kind: peer.MsgType, msg: blocks.Message) -> blocks.Message:  # type: ignore[name-defined]
        if what == "parity" and kind == peer.MsgType.EC_ANSWER and flipped[0] < 5:
            msg["parities"] = msg["parities"].copy()
            msg["parities"][0] ^= 1  # a man in the middle changes a few answers
            flipped[0] += 1
        elif what == "verify-tag" and kind == peer.MsgType.VERIFY:
            msg["tag"] = msg["tag"] ^ 1
        elif what == "pa-seed" and kind == peer.MsgType.VERIFY:
            msg["pa_b"] = msg["pa_b"].copy()
            msg["pa_b"][0] ^= 1
        return msg

    pair.run(a, b, tamper=tamper)
    a_out = pair.a_hooks.outcomes[-1]
    if what == "parity" and a_out.accepted:
        # Cascade's later passes caught the wrong flips: the keys still agree,
        # which is the property that matters (never a stored mismatch).
        assert pair.keys(pair.a_store) == pair.keys(pair.b_store)
        return
    if what == "pa-seed":
        # A changed PA seed passes verification at Bob, so both store keys...
        # which then differ: the reason authentication (qnoded.auth) guards
        # every frame.  Here the keys show it.
        assert pair.keys(pair.a_store) != pair.keys(pair.b_store)
        return
    assert not a_out.accepted
    assert "verification" in a_out.reason or "did not converge" in a_out.reason
    assert pair.a_store.ready_count() == pair.b_store.ready_count() == (0, 0)
    assert pair.b_store.pending_blocks() == []


def test_bob_crash_window_is_settled_by_recover(tmp_path: Path) -> None:
    a, b = link_batches(20, 20_000, 0.02)
    pair = Pair(tmp_path)
    # Alice committed, the COMMIT never reached Bob (link cut or Bob killed).
    pair.run(a, b, stop_before=peer.MsgType.COMMIT)
    pair.bob.reset()
    assert len(pair.b_store.pending_blocks()) == 1
    assert pair.a_store.ready_count()[0] > 0 and pair.b_store.ready_count()[0] == 0
    ((kind, req),) = pair.bob.recover_request()
    assert kind == peer.MsgType.RECOVER
    ((kind, reply),) = pair.alice.on_recover(wire(req))
    pair.bob.on_recover_reply(wire(reply))
    assert pair.b_store.pending_blocks() == []
    assert pair.keys(pair.a_store) == pair.keys(pair.b_store)
    # Bob stored, Alice never committed (she was killed before PREPARED arrived).
    pair.run(a, b, stop_before=peer.MsgType.PREPARED)
    pair.alice.reset()
    pair.bob.reset()
    ((_, req),) = pair.bob.recover_request()
    ((_, reply),) = pair.alice.on_recover(wire(req))
    pair.bob.on_recover_reply(wire(reply))
    assert pair.b_store.pending_blocks() == []
    assert pair.a_store.ready_count() == pair.b_store.ready_count() == (0, 0)


def test_auth_reserve_is_cut_first_and_follows_the_commit(tmp_path: Path) -> None:
    a, b = link_batches(10, 20_000, 0.02)
    pair = Pair(tmp_path)
    pair.a_hooks.want = pair.b_hooks.want = 64
    pair.run(a, b)
    out = pair.a_hooks.outcomes[0]
    assert out.accepted and out.auth_bytes == 64
    (bid_a, mat_a), (bid_b, mat_b) = *pair.a_hooks.staged.items(), *pair.b_hooks.staged.items()
    assert bid_a == bid_b and mat_a == mat_b and len(mat_a) == 64
    assert pair.a_hooks.active == pair.b_hooks.active == [bid_a]
    assert mat_a not in b"".join(pair.keys(pair.a_store).values())


def test_missing_batch_at_bob_aborts(tmp_path: Path) -> None:
    a, b = link_batches(10, 20_000, 0.02)
    del b[3]
    pair = Pair(tmp_path)
    pair.run(a, b)
    assert not pair.a_hooks.outcomes[-1].accepted
    assert "missing" in pair.a_hooks.outcomes[-1].reason
    assert pair.a_store.ready_count() == (0, 0)


def test_message_for_another_block_is_a_protocol_error(tmp_path: Path) -> None:
    a, _ = link_batches(10, 20_000, 0.02)
    pair = Pair(tmp_path)
    pair.alice.maybe_start(a)
    bogus = {"block_id": np.frombuffer(uuid.uuid4().bytes, np.uint8).copy()}
    with pytest.raises(blocks.BlockError, match="not in flight"):
        pair.alice.on_prepared(bogus)


def test_bbm92_block(tmp_path: Path) -> None:
    a, b = link_batches(10, 20_000, 0.01)
    for batch in list(a.values()) + list(b.values()):
        batch.cls[:] = 0
    for batch in a.values():
        batch.n_x = np.array([20_000, 0, 0], np.int64)
        batch.m_x = np.array([200, 0, 0], np.int64)
    pair = Pair(tmp_path, bbm92=True)
    pair.run(a, b)
    out = pair.a_hooks.outcomes[0]
    assert out.accepted, out
    direct = estimation.finite_key_length_pairs(200_000, 200_000, 2000, out.leak_ec_bits)
    assert 0 < out.secret_bits <= direct.key_length
    assert pair.keys(pair.a_store) == pair.keys(pair.b_store)


def test_a_halt_starts_no_block_at_alice_and_refuses_one_at_bob(tmp_path: Path) -> None:
    """Key generation halted (a blinding signature): Alice starts nothing; a Bob
    halted on his own refuses Alice's block, drops its raw key, and nothing is stored."""
    a, b = link_batches(12, 20_000, 0.02)
    pair = Pair(tmp_path)
    pair.alice.halted = "detector-blinding"
    assert pair.alice.maybe_start(a) == []
    pair.alice.halted = None
    pair.bob.halted = "detector-blinding"
    pair.run(a, b)
    (out_a,) = pair.a_hooks.outcomes
    assert not out_a.accepted and out_a.reason == "peer: halted: detector-blinding"
    assert pair.alice.totals.reasons == {"peer: halted": 1}
    assert not set(b) & set(range(10)) and pair.keys(pair.b_store) == {}
    assert pair.keys(pair.a_store) == {}
    pair.bob.halted = None  # an operator cleared it: the next block makes key
    a2, b2 = link_batches(12, 20_000, 0.02, seed=2)
    pair.run(a2, b2)
    assert pair.a_hooks.outcomes[-1].accepted and pair.b_hooks.outcomes[-1].accepted


def test_a_halt_aborts_the_block_in_flight_before_anything_is_stored(tmp_path: Path) -> None:
    """Halted mid-block (the signature showed during error correction): the block is
    aborted at the next message, before either store holds any of it."""
    a, b = link_batches(12, 20_000, 0.02)
    pair = Pair(tmp_path)

    def halt_mid_block(kind: peer.MsgType, msg: blocks.Message) -> blocks.Message:  # type: ignore[name-defined]
        if kind is peer.MsgType.EC_ANSWER:
            pair.bob.halted = "detector-blinding"
        return msg

    pair.run(a, b, tamper=halt_mid_block)
    (out_a,) = pair.a_hooks.outcomes
    assert not out_a.accepted and out_a.reason == "peer: halted: detector-blinding"
    assert not pair.alice.busy and not pair.bob.busy
    assert pair.keys(pair.a_store) == {} and pair.keys(pair.b_store) == {}
    assert pair.b_store.pending_blocks() == []


def refuse_writes(store: KeyStore, refuse: bool) -> None:
    """The store's disk refuses every write (SQLite's own refusal, as when full)."""
    store._db.execute(f"PRAGMA query_only = {'ON' if refuse else 'OFF'}")


def test_a_store_that_refuses_at_alice_aborts_the_block_at_both(tmp_path: Path) -> None:
    a, b = link_batches(24, 20_000, 0.02)
    pair = Pair(tmp_path)
    refuse_writes(pair.a_store, True)
    pair.run(a, b)
    (out_a,), (out_b,) = pair.a_hooks.outcomes, pair.b_hooks.outcomes
    assert not out_a.accepted and out_a.reason.startswith("store: ") and "readonly" in out_a.reason
    assert not out_b.accepted and out_b.reason.startswith("peer: store")
    assert pair.b_store.pending_blocks() == []  # Bob's pending copy went with it
    assert pair.a_store.ready_count() == pair.b_store.ready_count() == (0, 0)
    refuse_writes(pair.a_store, False)
    pair.run(a, b)  # the disk has room again: the next block makes key
    assert pair.a_hooks.outcomes[-1].accepted and pair.b_hooks.outcomes[-1].accepted
    assert pair.keys(pair.a_store) == pair.keys(pair.b_store) != {}


def test_a_commit_the_store_refuses_at_bob_waits_pending_for_recover(tmp_path: Path) -> None:
    a, b = link_batches(36, 20_000, 0.02)
    pair = Pair(tmp_path)

    def disk_fills_at_commit(kind: peer.MsgType, msg: blocks.Message) -> blocks.Message:  # type: ignore[name-defined]
        if kind == peer.MsgType.COMMIT:
            refuse_writes(pair.b_store, True)
        return msg

    pair.run(a, b, tamper=disk_fills_at_commit)
    assert pair.a_hooks.outcomes[-1].accepted  # Alice committed: her keys are ready
    assert pair.b_hooks.outcomes == []  # Bob's outcome waits for RECOVER
    assert len(pair.b_store.pending_blocks()) == 1 and pair.bob.recover_due
    (failure,) = pair.b_hooks.store_failures
    assert "not committed here, pending" in failure and "readonly" in failure
    assert not pair.bob.busy  # the link goes on
    # Room again: the next block starts with a RECOVER that settles the first.
    refuse_writes(pair.b_store, False)
    pair.run(a, b)
    assert pair.b_store.pending_blocks() == [] and not pair.bob.recover_due
    assert [o.accepted for o in pair.b_hooks.outcomes] == [True, True]
    assert pair.keys(pair.a_store) == pair.keys(pair.b_store) != {}
