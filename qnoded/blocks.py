"""Post-processing of one block at a time: from raw key to stored secret key.

Transport-free, like :mod:`qnoded.sifting`: each engine takes a message and
returns the messages to send (``(MsgType, arrays)`` pairs), so the daemon, the
tests and the benchmark run the same code.  Alice leads; every message is
public and (on an authenticated channel) authenticated.

One block, in order::

    Alice                                       Bob
    BLOCK_START id, batch seqs, n, QBER_X,
      Cascade plan, top-level parities   ->
                                         <-     EC_QUERY ranges       (repeated)
    EC_ANSWER parities                   ->
                                         <-     EC_DONE errors corrected
    (finite-key length from the block's counts and everything disclosed)
    VERIFY hash points + tag, length,
      PA seed, auth reserve              ->     tag check, PA, store *pending*
                                         <-     PREPARED
    store *ready* (the commit point)
    COMMIT                               ->     pending -> ready

Either side may send ABORT instead of its next message (no key possible,
verification failed, a batch missing, a store error): nothing of the block is
kept.  A block whose finite-key length is <= 0 yields no key and is reported
as rejected, with an alarm: fail closed.

After a crash or a lost link, Bob may hold blocks *pending* that Alice has or
has not committed: on every new session he sends RECOVER with their IDs;
Alice answers which she holds (commit them) and which she does not (discard).
Alice never commits a block Bob has not stored, so the two stores agree.
"""

from __future__ import annotations

import math
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
import structlog

from qnoded import amplify, estimation, reconcile
from qnoded.config import PostprocessingSection
from qnoded.contracts import IntensityClass
from qnoded.durable import StorageError
from qnoded.keystore import KeyStore, KeyStoreError
from qnoded.peer import MsgType
from qnoded.sifting import KEY_CLASSES, Message, ProtocolError, SiftedBatch, field_of, i64, scalar

log = structlog.get_logger("qnoded.blocks")

Out = list[tuple[MsgType, Message]]
U8 = npt.NDArray[np.uint8]

# Below this QBER the Cascade plan is the same; above MAX no key survives anyway.
PLAN_MIN_QBER = reconcile.MIN_QBER
# Cascade gives up beyond these: more rounds, or more corrections than twice
# the block's X-basis QBER (plus 1 % and a few) predicts.
MAX_EC_ROUNDS = 20_000


def max_corrections(n: int, qber_x: float) -> int:
    """The corrections beyond which a block's Cascade is not converging."""
    return int(n * min(reconcile.MAX_QBER, 2 * qber_x + 0.01)) + 100


class BlockError(ProtocolError):
    """A block message does not fit the block in flight."""


@dataclass(slots=True)
class BlockOutcome:
    """What happened to one block: the figures telemetry and the demo report."""

    block_id: str
    accepted: bool
    reason: str = ""
    n: int = 0
    qber_x: float | None = None
    qber_z: float | None = None
    leak_ec_bits: int = 0
    ec_efficiency: float | None = None
    ec_rounds: int = 0
    secret_bits: int = 0
    keys: int = 0
    auth_bytes: int = 0
    phi_z: float | None = None
    # Alice's finite-key length (Lim et al. 2014) for the block, in bits: after
    # error correction, or at the Shannon limit when the block was refused
    # before it; None where it was not computed (Bob, who follows Alice's).
    key_length: int | None = None
    seconds: float = 0.0

    def public(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class BlockTotals:
    """Cumulative per-node block figures (telemetry, the demo summary)."""

    accepted: int = 0
    rejected: int = 0
    secret_bits: int = 0
    keys: int = 0
    leak_ec_bits: int = 0
    auth_bytes_reserved: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    last: BlockOutcome | None = None
    efficiencies: list[float] = field(default_factory=list)

    def record(self, outcome: BlockOutcome) -> None:
        self.last = outcome
        if outcome.accepted:
            self.accepted += 1
            self.secret_bits += outcome.secret_bits
            self.keys += outcome.keys
            self.auth_bytes_reserved += outcome.auth_bytes
            if outcome.ec_efficiency is not None and math.isfinite(outcome.ec_efficiency):
                self.efficiencies.append(outcome.ec_efficiency)
                del self.efficiencies[:-100]  # a recent mean, bounded
        else:
            self.rejected += 1
            # Counted by kind ("estimation", "verification", "peer: ..."): bounded keys.
            kind = outcome.reason.rsplit(":", 1)[0] if ":" in outcome.reason else outcome.reason
            self.reasons[kind] = self.reasons.get(kind, 0) + 1
        self.leak_ec_bits += outcome.leak_ec_bits

    @property
    def mean_efficiency(self) -> float | None:
        return sum(self.efficiencies) / len(self.efficiencies) if self.efficiencies else None


class BlockHooks:
    """What the node does around a block: alarms, authentication-key reserve.

    The default does nothing; the node overrides it.
    """

    def auth_wanted_bytes(self) -> int:
        """Bytes of the next block's secret output to reserve for authentication."""
        return 0

    def auth_stage(self, block_id: uuid.UUID, material: bytes) -> None:
        """Hold a block's reserved authentication key until the block commits."""

    def auth_activate(self, block_id: uuid.UUID) -> None:
        """The block committed: its reserved key joins the authentication pool."""

    def auth_drop(self, block_id: uuid.UUID) -> None:
        """The block was discarded: wipe its reserved key."""

    def outcome(self, outcome: BlockOutcome) -> None:
        """A block ended (accepted or not)."""

    def store_failed(self, message: str) -> None:
        """The key store refused a write that settles a stored block (disk full):
        the block stays pending until RECOVER settles it."""


def _block_id(msg: Mapping[str, npt.NDArray[Any]]) -> uuid.UUID:
    raw = field_of(msg, "block_id", np.uint8)
    if raw.shape != (16,):
        raise BlockError("block_id must be 16 bytes")
    return uuid.UUID(bytes=raw.tobytes())


def _id_array(block_id: uuid.UUID) -> U8:
    return np.frombuffer(block_id.bytes, dtype=np.uint8).copy()


def _float(msg: Mapping[str, npt.NDArray[Any]], name: str) -> float:
    try:
        arr = msg[name]
    except KeyError as exc:
        raise BlockError(f"message lacks field {name!r}") from exc
    if arr.shape != (1,) or arr.dtype != np.float64 or not math.isfinite(float(arr[0])):
        raise BlockError(f"field {name!r} must be one finite float64")
    return float(arr[0])


def split_keys(secret: U8, key_bytes: int, auth_bytes: int) -> tuple[bytes, list[bytes]]:
    """The block's secret output as (authentication reserve, keys); a short tail is dropped."""
    data = secret.tobytes()
    reserve = data[:auth_bytes]
    body = data[auth_bytes:]
    keys = [body[i : i + key_bytes] for i in range(0, len(body) - key_bytes + 1, key_bytes)]
    return reserve, keys


def gather(sifted: dict[int, SiftedBatch], seqs: list[int]) -> tuple[U8, U8]:
    """Concatenate the raw key of these batches (in this order) and their classes."""
    batches = [sifted.pop(s) for s in seqs]
    if not batches:
        return np.empty(0, np.uint8), np.empty(0, np.uint8)
    bits = np.ascontiguousarray(np.concatenate([b.bits for b in batches]), dtype=np.uint8)
    cls = np.ascontiguousarray(np.concatenate([b.cls for b in batches]), dtype=np.uint8)
    return bits, cls


def leak_of(ec_bits: int, n: int, verify_points: int) -> int:
    """Everything error correction and verification disclosed about the key, in bits.

    Cascade's parities, the announced number of corrected errors (at most
    log2(n+1) bits) and the verification tag.
    """
    return ec_bits + math.ceil(math.log2(n + 1)) + amplify.tag_bits(verify_points)


class _InFlight(Protocol):
    @property
    def block_id(self) -> uuid.UUID: ...


B = TypeVar("B", bound=_InFlight)


@dataclass(slots=True)
class _AliceBlock:
    block_id: uuid.UUID
    bits: U8
    counts: estimation.BlockCounts | None  # decoy BB84
    pair_counts: tuple[int, int, int]  # BBM92: n_z, n_x, m_x
    qber_x: float
    cascade: reconcile.CascadeAlice
    started: float
    verify: Message | None = None
    keys: list[bytes] = field(default_factory=list)
    reserve: bytes = b""
    outcome: BlockOutcome | None = None


class _Engine(Generic[B]):
    """What both ends share: the store, the peer, the hooks, the block in flight."""

    def __init__(
        self,
        pp: PostprocessingSection,
        store: KeyStore,
        *,
        peer_id: str,
        hooks: BlockHooks | None = None,
    ) -> None:
        self.pp = pp
        self.store = store
        self.peer_id = peer_id
        self.hooks = hooks or BlockHooks()
        self.totals = BlockTotals()
        self._block: B | None = None
        # Set while key generation is halted (a blinding signature, until an
        # operator clears it): no block starts, one in flight is aborted before
        # anything is stored (after PREPARED it completes: Alice has committed),
        # the link and sifting go on.
        self.halted: str | None = None

    @property
    def busy(self) -> bool:
        return self._block is not None

    def _current(self, msg: Mapping[str, npt.NDArray[Any]]) -> B:
        bid = _block_id(msg)
        if self._block is None or self._block.block_id != bid:
            raise BlockError(f"message for block {bid}, which is not in flight")
        return self._block


class AliceBlocks(_Engine[_AliceBlock]):
    """Alice: forms blocks, answers Cascade, estimates, hashes; commits first."""

    def __init__(
        self,
        pp: PostprocessingSection,
        store: KeyStore,
        *,
        peer_id: str,
        intensities: estimation.Intensities | None,
        hooks: BlockHooks | None = None,
    ) -> None:
        super().__init__(pp, store, peer_id=peer_id, hooks=hooks)
        self.intensities = intensities  # None: BBM92 (no decoys)
        self.sec = estimation.Security(eps_sec=pp.eps_sec, eps_cor=pp.eps_cor)

    def reset(self) -> None:
        """The session ended: the block in flight is abandoned (nothing was stored)."""
        if self._block is not None:
            self._end(self._block, "link lost mid-block")

    def _end(self, blk: _AliceBlock, reason: str) -> BlockOutcome:
        out = blk.outcome or BlockOutcome(block_id=str(blk.block_id), accepted=False)
        out.reason = reason
        out.accepted = False
        out.n = int(blk.bits.shape[0])
        out.qber_x = blk.qber_x
        out.seconds = time.monotonic() - blk.started
        self.hooks.auth_drop(blk.block_id)
        blk.bits.fill(0)
        self._block = None
        self.totals.record(out)
        self.hooks.outcome(out)
        return out

    def _abort(self, blk: _AliceBlock, reason: str) -> Out:
        self._end(blk, reason)
        return abort_message(blk.block_id, reason)

    # -- start -----------------------------------------------------------------
    def maybe_start(self, sifted: dict[int, SiftedBatch]) -> Out:
        """Start a block if none is in flight and enough raw key has gathered."""
        if self._block is not None or self.halted is not None:
            return []
        seqs: list[int] = []
        total = 0
        for seq, batch in sifted.items():
            seqs.append(seq)
            total += int(batch.bits.shape[0])
            if total >= self.pp.block_bits:
                break
        if total < self.pp.block_bits:
            return []
        n_x = sum((sifted[s].n_x for s in seqs), np.zeros(KEY_CLASSES, np.int64))
        m_x = sum((sifted[s].m_x for s in seqs), np.zeros(KEY_CLASSES, np.int64))
        bits, cls = gather(sifted, seqs)
        n = int(bits.shape[0])
        n_z = np.bincount(cls, minlength=KEY_CLASSES)[:KEY_CLASSES]
        sig = IntensityClass.SIGNAL
        qber_x = float(m_x[sig] / n_x[sig]) if n_x[sig] else 0.5
        counts = None
        if self.intensities is not None:
            counts = estimation.BlockCounts(n_z=_triple(n_z), n_x=_triple(n_x), m_x=_triple(m_x))
        plan = reconcile.CascadePlan.for_qber(
            n, min(max(qber_x, PLAN_MIN_QBER), reconcile.MAX_QBER), seed=secrets.randbits(63)
        )
        cascade = reconcile.CascadeAlice(bits, plan)
        blk = _AliceBlock(
            block_id=uuid.uuid4(),
            bits=bits,
            counts=counts,
            pair_counts=(int(n_z.sum()), int(n_x.sum()), int(m_x.sum())),
            qber_x=qber_x,
            cascade=cascade,
            started=time.monotonic(),
        )
        self._block = blk
        out: Out = [
            (
                MsgType.BLOCK_START,
                {
                    "block_id": _id_array(blk.block_id),
                    "seqs": np.array(seqs, dtype=np.int64),
                    "n": i64(n),
                    "qber_x": np.array([qber_x]),
                    "plan_seed": i64(plan.seed),
                    "plan_frame": i64(plan.frame),
                    "plan_sizes": np.array(plan.block_sizes, dtype=np.int64),
                },
            )
        ]
        # Before disclosing a single parity: could this block make key even if
        # error correction worked at the Shannon limit, n h(QBER)?  If not,
        # stop here: no key, nothing disclosed, no time spent.
        best = self._length(blk, leak=math.floor(n * estimation.h2(min(qber_x, 0.5))))
        if best.key_length <= 0:
            blk.outcome = BlockOutcome(
                block_id=str(blk.block_id),
                accepted=False,
                n=n,
                qber_x=qber_x,
                phi_z=best.phi_z,
                key_length=best.key_length,
            )
            return out + self._abort(
                blk,
                f"estimation: no secret key possible (finite-key length {best.key_length} bits "
                "even with error correction at the Shannon limit)",
            )
        out[0][1]["top"] = np.concatenate(cascade.top_parities())
        return out

    def _length(self, blk: _AliceBlock, leak: int) -> estimation.FiniteKeyResult:
        if blk.counts is not None and self.intensities is not None:
            return estimation.finite_key_length(blk.counts, self.intensities, leak, self.sec)
        n_z, n_x, m_x = blk.pair_counts
        return estimation.finite_key_length_pairs(n_z, n_x, m_x, leak, self.sec)

    # -- messages from Bob -----------------------------------------------------
    def on_query(self, msg: Mapping[str, npt.NDArray[Any]]) -> Out:
        blk = self._current(msg)
        if self.halted is not None:  # its raw key may come from the halt's cause
            return self._abort(blk, f"halted: {self.halted}")
        query = reconcile.Query(
            pass_index=field_of(msg, "pass", np.int64),
            start=field_of(msg, "start", np.int64),
            end=field_of(msg, "end", np.int64),
        )
        try:
            answers = blk.cascade.answer(query)
        except reconcile.ReconcileError as exc:
            raise BlockError(f"block {blk.block_id}: {exc}") from exc
        return [(MsgType.EC_ANSWER, {"block_id": _id_array(blk.block_id), "parities": answers})]

    def on_done(self, msg: Mapping[str, npt.NDArray[Any]]) -> Out:
        blk = self._current(msg)
        if self.halted is not None:
            return self._abort(blk, f"halted: {self.halted}")
        n = int(blk.bits.shape[0])
        corrected = scalar(msg, "corrected")
        rounds = scalar(msg, "rounds")
        if not 0 <= corrected <= n:
            raise BlockError(f"block {blk.block_id}: {corrected} corrections in {n} bits")
        points = amplify.verify_points(n, self.pp.eps_cor)
        leak = leak_of(blk.cascade.leaked_bits, n, points)
        result = self._length(blk, leak)
        qber_z = corrected / n
        outcome = BlockOutcome(
            block_id=str(blk.block_id),
            accepted=False,
            n=n,
            qber_x=blk.qber_x,
            qber_z=qber_z,
            leak_ec_bits=leak,
            ec_efficiency=reconcile.efficiency(blk.cascade.leaked_bits, n, qber_z),
            ec_rounds=rounds,
            phi_z=result.phi_z,
            key_length=result.key_length,
        )
        blk.outcome = outcome
        key_bytes = self.pp.key_size_bits // 8
        wanted = self.hooks.auth_wanted_bytes()
        length = result.key_length
        # Whole keys only: the tail below one key size is not worth a hash bit.
        usable = (length // 8 - wanted) // key_bytes * key_bytes
        if length <= 0 or usable <= 0:
            return self._abort(blk, f"estimation: secret length {length} bits leaves no key")
        out_bytes = wanted + usable
        seed = amplify.PaSeed.fresh(n, 8 * out_bytes)
        hash_points = amplify.random_points(points)
        tag = amplify.verification_tag(blk.bits, hash_points)
        secret = amplify.amplify(blk.bits, seed, 8 * out_bytes)
        blk.reserve, blk.keys = split_keys(secret, key_bytes, wanted)
        secret.fill(0)
        outcome.secret_bits = 8 * out_bytes
        outcome.keys = len(blk.keys)
        outcome.auth_bytes = wanted
        return [
            (
                MsgType.VERIFY,
                {
                    "block_id": _id_array(blk.block_id),
                    "points": hash_points.astype(np.int64),
                    "tag": tag.astype(np.int64),
                    "out_bytes": i64(out_bytes),
                    "auth_bytes": i64(wanted),
                    "key_bytes": i64(key_bytes),
                    "pa_k": i64(seed.k),
                    "pa_a": np.frombuffer(seed.a, np.uint8).copy(),
                    "pa_b": np.frombuffer(seed.b, np.uint8).copy(),
                },
            )
        ]

    def on_prepared(self, msg: Mapping[str, npt.NDArray[Any]]) -> Out:
        """Bob holds the block pending: store it ready here (the commit point) and say so."""
        blk = self._current(msg)
        if blk.outcome is None or not blk.keys:
            raise BlockError(f"block {blk.block_id}: PREPARED before VERIFY")
        outcome = blk.outcome
        outcome.seconds = time.monotonic() - blk.started
        try:
            if blk.reserve:
                self.hooks.auth_stage(blk.block_id, blk.reserve)
            self.store.add_block(blk.block_id, self.peer_id, blk.keys, "ready", _stats(outcome))
        except (KeyStoreError, OSError, ValueError) as exc:
            log.error("block not stored", block=str(blk.block_id), error=str(exc))
            return self._abort(blk, f"store: {exc}")
        self.hooks.auth_activate(blk.block_id)
        outcome.accepted = True
        self._block = None
        blk.bits.fill(0)
        self.totals.record(outcome)
        self.hooks.outcome(outcome)
        return [(MsgType.COMMIT, {"block_id": _id_array(blk.block_id)})]

    def on_abort(self, msg: Mapping[str, npt.NDArray[Any]]) -> Out:
        blk = self._current(msg)
        self._end(blk, "peer: " + _read_text(msg, "reason"))
        return []

    def on_recover(self, msg: Mapping[str, npt.NDArray[Any]]) -> Out:
        """Bob asks about blocks he holds pending: which did Alice commit?"""
        ids = field_of(msg, "ids", np.uint8)
        if ids.shape[0] % 16:
            raise BlockError("RECOVER ids must be 16-byte block IDs")
        held = np.array(
            [
                self.store.block_state(uuid.UUID(bytes=ids[i : i + 16].tobytes())) == "ready"
                for i in range(0, ids.shape[0], 16)
            ],
            dtype=np.uint8,
        )
        return [(MsgType.RECOVER_REPLY, {"ids": ids, "committed": held})]


@dataclass(slots=True)
class _BobBlock:
    block_id: uuid.UUID
    cascade: reconcile.CascadeBob
    qber_x: float
    started: float
    stored: bool = False
    outcome: BlockOutcome | None = None


class BobBlocks(_Engine[_BobBlock]):
    """Bob: follows Alice's blocks, runs Cascade's searches, stores pending then ready."""

    # A pending block the key store could not commit or discard (disk full):
    # RECOVER goes out again before the next block, until it is settled.
    recover_due = False

    def reset(self) -> None:
        """The session ended.  A block stored pending stays so (RECOVER settles it)."""
        if self._block is not None:
            self._end(self._block, "link lost mid-block", discard=False)

    def _end(self, blk: _BobBlock, reason: str, *, discard: bool) -> None:
        out = blk.outcome or BlockOutcome(block_id=str(blk.block_id), accepted=False)
        out.accepted = False
        out.reason = reason
        out.seconds = time.monotonic() - blk.started
        blk.cascade.bits.fill(0)
        settled = not blk.stored or (discard and self._discard(blk.block_id))
        self._block = None
        if settled:  # else it waits, pending, for RECOVER, which records it
            self.totals.record(out)
            self.hooks.outcome(out)

    def _discard(self, block_id: uuid.UUID) -> bool:
        """Discard a pending block; False if the store refused (it stays pending)."""
        try:
            self.store.discard_block(block_id)
        except StorageError as exc:
            self._unsettled(block_id, "discarded", exc)
            return False
        self.hooks.auth_drop(block_id)
        return True

    def _unsettled(self, block_id: uuid.UUID, what: str, exc: StorageError) -> None:
        log.error(
            f"pending block not {what}: RECOVER settles it", block=str(block_id), error=str(exc)
        )
        self.recover_due = True
        self.hooks.store_failed(f"block {block_id} not {what} here, pending: {exc}")

    def _abort(self, blk: _BobBlock, reason: str) -> Out:
        self._end(blk, reason, discard=True)
        return abort_message(blk.block_id, reason)

    def recover_request(self) -> Out:
        self.recover_due = False  # a failure to settle what the reply says sets it again
        pending = self.store.pending_blocks()
        if not pending:
            return []
        ids = np.frombuffer(b"".join(b.bytes for b in pending), dtype=np.uint8).copy()
        return [(MsgType.RECOVER, {"ids": ids})]

    def on_recover_reply(self, msg: Mapping[str, npt.NDArray[Any]]) -> Out:
        ids = field_of(msg, "ids", np.uint8)
        committed = field_of(msg, "committed", np.uint8)
        if ids.shape[0] % 16 or committed.shape[0] * 16 != ids.shape[0]:
            raise BlockError("RECOVER_REPLY: ids and answers do not match")
        for i, ok in enumerate(committed.tolist()):
            bid = uuid.UUID(bytes=ids[16 * i : 16 * i + 16].tobytes())
            record = self.store.pending_block(bid)
            if record is None:
                continue
            # The block's outcome waited for this answer (reset() left it open).
            n_keys, stats = record
            outcome = BlockOutcome(
                block_id=str(bid),
                accepted=bool(ok),
                **{k: v for k, v in stats.items() if k in _RECORDED},
            )
            if ok:
                try:
                    self.store.commit_block(bid)
                except StorageError as exc:
                    self._unsettled(bid, "committed", exc)
                    continue
                self.hooks.auth_activate(bid)
                outcome.keys = n_keys
                log.info("pending block committed after recovery", block=str(bid))
            else:
                if not self._discard(bid):
                    continue
                outcome.reason = "recovery: Alice did not commit it"
                outcome.secret_bits = 0
                log.info("pending block discarded after recovery", block=str(bid))
            self.totals.record(outcome)
            self.hooks.outcome(outcome)
        return []

    def on_start(self, msg: Mapping[str, npt.NDArray[Any]], sifted: dict[int, SiftedBatch]) -> Out:
        """Follow Alice's new block (after a RECOVER, if a pending block waits on one)."""
        first = self.recover_request() if self.recover_due else []
        return first + self._start(msg, sifted)

    def _start(self, msg: Mapping[str, npt.NDArray[Any]], sifted: dict[int, SiftedBatch]) -> Out:
        bid = _block_id(msg)
        if self._block is not None:
            raise BlockError(f"BLOCK_START {bid} while block {self._block.block_id} is in flight")
        seqs = field_of(msg, "seqs", np.int64).tolist()
        if self.halted is not None:
            for s in seqs:
                sifted.pop(s, None)  # their raw key goes, unused: nothing waits on them
            return abort_message(bid, f"halted: {self.halted}")
        n = scalar(msg, "n")
        qber_x = _float(msg, "qber_x")
        # Batches Alice skipped (hers were dropped) never join a block: let them go.
        last = max(seqs, default=-1)
        in_block = set(seqs)
        for s in [s for s in sifted if s <= last and s not in in_block]:
            del sifted[s]
        missing = [s for s in seqs if s not in sifted]
        if missing:
            for s in seqs:
                sifted.pop(s, None)
            return abort_message(bid, f"batches {missing[:5]} missing")
        bits, _ = gather(sifted, seqs)
        if bits.shape[0] != n:
            return abort_message(bid, f"block has {bits.shape[0]} bits here, {n} at Alice")
        if "top" not in msg:
            return []  # Alice aborts right after: no key possible from these counts
        sizes = field_of(msg, "plan_sizes", np.int64).tolist()
        try:
            plan = reconcile.CascadePlan(
                n=n,
                block_sizes=tuple(int(k) for k in sizes),
                seed=scalar(msg, "plan_seed"),
                frame=scalar(msg, "plan_frame"),
            )
            top_all = field_of(msg, "top", np.uint8)
            tops: list[U8] = []
            pos = 0
            for p in range(len(plan.block_sizes)):
                k = plan.n_blocks(p)
                tops.append(np.ascontiguousarray(top_all[pos : pos + k]))
                pos += k
            if pos != top_all.shape[0]:
                raise reconcile.ReconcileError("top parities do not match the plan")
            cascade = reconcile.CascadeBob(
                bits, plan, tops, max_corrected=max_corrections(n, qber_x)
            )
        except (reconcile.ReconcileError, ValueError) as exc:
            raise BlockError(f"block {bid}: {exc}") from exc
        finally:
            bits.fill(0)  # CascadeBob works on its own copy
        blk = _BobBlock(block_id=bid, cascade=cascade, qber_x=qber_x, started=time.monotonic())
        self._block = blk
        return self._next(blk, None)

    def _next(self, blk: _BobBlock, answers: U8 | None) -> Out:
        """Bob's next question (or EC_DONE); ABORT if the cascade does not converge."""
        try:
            query = blk.cascade.next_query(answers)
        except reconcile.NotConvergingError as exc:
            return self._abort(blk, f"error correction {exc}")
        except reconcile.ReconcileError as exc:
            raise BlockError(f"block {blk.block_id}: {exc}") from exc
        return self._ask(blk, query)

    def _ask(self, blk: _BobBlock, query: reconcile.Query | None) -> Out:
        bid = _id_array(blk.block_id)
        cascade = blk.cascade
        # A real block converges far inside this (about 2,200 rounds at 1e6 bits).
        if cascade.rounds > MAX_EC_ROUNDS:
            return self._abort(blk, f"error correction did not converge in {cascade.rounds} rounds")
        if query is None:
            done: Message = {
                "block_id": bid,
                "corrected": i64(blk.cascade.corrected),
                "rounds": i64(blk.cascade.rounds),
            }
            return [(MsgType.EC_DONE, done)]
        return [
            (
                MsgType.EC_QUERY,
                {
                    "block_id": bid,
                    "pass": query.pass_index,
                    "start": query.start,
                    "end": query.end,
                },
            )
        ]

    def on_answer(self, msg: Mapping[str, npt.NDArray[Any]]) -> Out:
        blk = self._current(msg)
        if self.halted is not None:  # its raw key may come from the halt's cause
            return self._abort(blk, f"halted: {self.halted}")
        return self._next(blk, field_of(msg, "parities", np.uint8))

    def on_verify(self, msg: Mapping[str, npt.NDArray[Any]]) -> Out:
        blk = self._current(msg)
        if self.halted is not None:  # before anything is stored: the block goes
            return self._abort(blk, f"halted: {self.halted}")
        bits = blk.cascade.bits
        n = int(bits.shape[0])
        points = field_of(msg, "points", np.int64)
        tag = field_of(msg, "tag", np.int64)
        if points.shape[0] < amplify.verify_points(n, self.pp.eps_cor) or tag.shape != points.shape:
            return self._abort(blk, "verification: too few hash points for eps_cor")
        out_bytes = scalar(msg, "out_bytes")
        auth_bytes = scalar(msg, "auth_bytes")
        key_bytes = scalar(msg, "key_bytes")
        n_dis = blk.cascade.leaked_bits
        qber_z = blk.cascade.corrected / n if n else None
        blk.outcome = BlockOutcome(
            block_id=str(blk.block_id),
            accepted=False,
            n=n,
            qber_x=blk.qber_x,
            qber_z=qber_z,
            leak_ec_bits=leak_of(n_dis, n, int(points.shape[0])),
            ec_efficiency=reconcile.efficiency(n_dis, n, qber_z or 0.0),
            ec_rounds=blk.cascade.rounds,
        )
        problem = self._verify_problem(bits, points, tag, out_bytes, auth_bytes, key_bytes)
        if problem:
            log.warning("block rejected", block=str(blk.block_id), reason=problem)
            return self._abort(blk, problem)
        try:
            seed = amplify.PaSeed(
                k=scalar(msg, "pa_k"),
                a=field_of(msg, "pa_a", np.uint8).tobytes(),
                b=field_of(msg, "pa_b", np.uint8).tobytes(),
            )
            secret = amplify.amplify(bits, seed, 8 * out_bytes)
        except amplify.HashError as exc:
            return self._abort(blk, f"privacy amplification: {exc}")
        reserve, keys = split_keys(secret, key_bytes, auth_bytes)
        secret.fill(0)
        blk.outcome.secret_bits = 8 * out_bytes
        blk.outcome.keys = len(keys)
        blk.outcome.auth_bytes = auth_bytes
        try:
            if reserve:
                self.hooks.auth_stage(blk.block_id, reserve)
            self.store.add_block(blk.block_id, self.peer_id, keys, "pending", _stats(blk.outcome))
        except (KeyStoreError, OSError, ValueError) as exc:
            log.error("block not stored", block=str(blk.block_id), error=str(exc))
            return self._abort(blk, f"store: {exc}")
        blk.stored = True
        return [(MsgType.PREPARED, {"block_id": _id_array(blk.block_id)})]

    def _verify_problem(  # noqa: PLR0917 - the fields of one VERIFY message
        self, bits: U8, points: npt.NDArray[np.int64], tag: npt.NDArray[np.int64],
        out_bytes: int, auth_bytes: int, key_bytes: int,
    ) -> str:  # fmt: skip
        """Why this VERIFY cannot be followed ("" if it can)."""
        try:
            mine = amplify.verification_tag(bits, points.astype(np.uint64))
        except amplify.HashError as exc:
            return f"verification: {exc}"
        if not np.array_equal(mine.astype(np.int64), tag):
            return "verification: hashes differ after error correction"
        if key_bytes != self.pp.key_size_bits // 8:
            return f"key size {8 * key_bytes} bits, this node uses {self.pp.key_size_bits}"
        if not 0 <= auth_bytes < out_bytes:
            return f"authentication reserve {auth_bytes} of {out_bytes} bytes"
        return ""

    def on_commit(self, msg: Mapping[str, npt.NDArray[Any]]) -> Out:
        blk = self._current(msg)
        if not blk.stored or blk.outcome is None:
            raise BlockError(f"block {blk.block_id}: COMMIT before PREPARED")
        try:
            self.store.commit_block(blk.block_id)
        except StorageError as exc:
            self._unsettled(blk.block_id, "committed", exc)
            self._end(blk, f"store: {exc}", discard=False)
            return []
        self.hooks.auth_activate(blk.block_id)
        outcome = blk.outcome
        outcome.accepted = True
        outcome.seconds = time.monotonic() - blk.started
        blk.cascade.bits.fill(0)
        self._block = None
        self.totals.record(outcome)
        self.hooks.outcome(outcome)
        return []

    def on_abort(self, msg: Mapping[str, npt.NDArray[Any]]) -> Out:
        bid = _block_id(msg)
        reason = "peer: " + _read_text(msg, "reason")
        if self._block is not None and self._block.block_id == bid:
            self._end(self._block, reason, discard=True)
        else:
            # Alice gave up before Cascade began (no key possible): count it here too.
            out = BlockOutcome(block_id=str(bid), accepted=False, reason=reason)
            self.totals.record(out)
            self.hooks.outcome(out)
        return []


# Block statistics stored with (and delivered beside) its keys: public figures only.
_RECORDED = (
    "n", "qber_x", "qber_z", "leak_ec_bits", "ec_efficiency", "secret_bits", "phi_z", "key_length"
)  # fmt: skip


def _stats(outcome: BlockOutcome) -> dict[str, Any]:
    return {k: v for k, v in outcome.public().items() if k in _RECORDED}


def _triple(a: npt.NDArray[np.int64]) -> tuple[int, int, int]:
    return (int(a[0]), int(a[1]), int(a[2]))


def abort_message(block_id: uuid.UUID, reason: str) -> Out:
    """ABORT for a block, with the reason (public; never key material)."""
    return [(MsgType.ABORT, {"block_id": _id_array(block_id), "reason": _text(reason)})]


def _text(text: str) -> U8:
    return np.frombuffer(text.encode()[:500], dtype=np.uint8).copy()


def _read_text(msg: Mapping[str, npt.NDArray[Any]], name: str) -> str:
    return field_of(msg, name, np.uint8).tobytes().decode("utf-8", "replace")
