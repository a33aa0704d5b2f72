"""One QKD node: devices, peer channel, sifting pipeline and telemetry, wired together.

A :class:`Node` owns a ``TaskGroup`` of named loops.  Nothing here is fire
and forget: every loop ends when the group is cancelled (SIGTERM/SIGINT), and
the context managers around it close the peer link, the devices (in reverse
order) and the MQTT publisher (which publishes ``stopped``).

Failures are contained where they happen: a bad tag batch is rejected and
counted, a failing tagger is reopened with backoff, a peer that sends garbage
or disconnects is dropped and awaited again; meanwhile the node reports
``degraded`` and raises an alarm.  No key is kept from a batch whose sifting
did not complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import structlog

from qnoded import blocks, estimation, kernel, peer
from qnoded.auth import AuthPool
from qnoded.backoff import backoff_s
from qnoded.commands import (
    CommandDesk,
    CommandError,
    Handler,
    Request,
    current_log_level,
    rotate_log_level,
)
from qnoded.config import NodeConfig
from qnoded.contracts import (
    DeviceError,
    DeviceKind,
    IntensityClass,
    Laser,
    LaserMode,
    TagBatch,
    TimeTagger,
)
from qnoded.detector_watch import DetectorWatch, WatchActions
from qnoded.devices import DeviceManager
from qnoded.durable import StorageError
from qnoded.etsi014 import Etsi014Server
from qnoded.ingest import BatchError, BatchValidator
from qnoded.keystore import KeyStore
from qnoded.metrics import MetricsExporter
from qnoded.mqtt import MqttSettings, TelemetryPublisher, topic
from qnoded.notify import Notifier
from qnoded.registry import DriverInfo
from qnoded.sifting import AliceEngine, BobEngine, Message, ProtocolError, SiftStats, scalar

log = structlog.get_logger("qnoded.node")


class PeerGone(Exception):  # noqa: N818 - an orderly goodbye, not an error
    """The peer said goodbye: an orderly stop, not a fault."""


# What a peer (or the network) can make happen; the session ends, the node
# stays up.  ValueError and KeyError cover payloads that decode but do not fit.
# StorageError: a full disk under the key store or the authentication pool
# mid-session (nothing half-written; the next session's RECOVER settles blocks).
PEER_ERRORS = (
    StorageError,
    ValueError,
    KeyError,
    peer.FrameError,
    ProtocolError,
    ConnectionError,
    TimeoutError,
    EOFError,
    asyncio.IncompleteReadError,
)


# A reopened tagger stream whose first batch starts this far after the last
# one (or before it) has a new clock; within it, the same clock ran on.
MAX_TAGGER_GAP_PS = 3600 * 10**12


# The tagger and peer loops' reconnect waits (qnoded.backoff: jittered, capped).
RETRY_BASE_S = 0.1
RETRY_CAP_S = 5.0


def mqtt_settings(config: NodeConfig) -> MqttSettings:
    m = config.mqtt
    host, _, port = m.broker.rpartition(":")
    password = None
    if m.password_file:
        password = Path(m.password_file).read_text(encoding="utf-8").strip()
    return MqttSettings(
        host=host,
        port=int(port),
        username=m.username or None,
        password=password,
        tls_ca=m.tls_ca or None,
        tls_cert=m.tls_cert or None,
        tls_key=m.tls_key or None,
    )


def process_health() -> dict[str, int]:
    """What a leak shows first: resident memory, open files, asyncio tasks."""
    rss = 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    try:
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        fds = 0
    return {"rss_bytes": rss, "open_fds": fds, "asyncio_tasks": len(asyncio.all_tasks())}


def laser_intensities(laser: Laser) -> estimation.Intensities:
    """The decoy-state parameters Alice's laser runs with, for the finite-key bound."""
    mu, p = laser.intensities, laser.class_probabilities
    c = IntensityClass
    return estimation.Intensities(
        mu1=mu[c.SIGNAL], mu2=mu[c.DECOY], mu3=mu[c.VACUUM],
        p1=p[c.SIGNAL], p2=p[c.DECOY], p3=p[c.VACUUM],
    )  # fmt: skip


class NodeHooks(blocks.BlockHooks):
    """Block outcomes become alarms, telemetry and wake-ups of key delivery;
    the authentication pool takes its reserve from committed blocks."""

    def __init__(self, node: Node, pool: AuthPool | None) -> None:
        self.node = node
        self.pool = pool

    def auth_wanted_bytes(self) -> int:
        return self.pool.wanted_bytes() if self.pool is not None else 0

    def auth_stage(self, block_id: uuid.UUID, material: bytes) -> None:
        if self.pool is not None:
            self.pool.stage(block_id, material)

    def auth_activate(self, block_id: uuid.UUID) -> None:
        # Only blocks that reserved key staged any (the pool was full enough).
        if self.pool is not None and block_id in self.pool.staged():
            self.pool.activate(block_id)

    def auth_drop(self, block_id: uuid.UUID) -> None:
        if self.pool is not None:
            self.pool.drop(block_id)

    def store_failed(self, message: str) -> None:
        self.node.pub.raise_alarm("critical", "key-store", message)

    def outcome(self, outcome: blocks.BlockOutcome) -> None:
        node = self.node
        if outcome.accepted:
            log.info(
                "block accepted",
                block=outcome.block_id,
                bits=outcome.n,
                secret_bits=outcome.secret_bits,
                keys=outcome.keys,
                qber_z=outcome.qber_z,
                ec_efficiency=outcome.ec_efficiency,
                key_length=outcome.key_length,
            )
            node.pub.wake()
            return
        log.warning(
            "block rejected",
            block=outcome.block_id,
            reason=outcome.reason,
            key_length=outcome.key_length,
        )
        # A lost link is already its own fault; a rejected block is news of its own.
        for prefix, code in (
            ("estimation", "no-secret-key"),
            ("verification", "verification-failed"),
            ("peer: estimation", "no-secret-key"),
            ("peer: verification", "verification-failed"),
            ("store", "key-store"),
        ):
            if outcome.reason.startswith(prefix):
                node.pub.raise_alarm(
                    "critical", code, f"block {outcome.block_id} rejected: {outcome.reason}"
                )
                break


@dataclass(slots=True)
class KeyHold:
    """What operator commands (qnoded/commands.py) hold back at Alice.

    A pause stops key generation; a pause or a recalibration drops the clock
    model at the first point where no SIFT reply still awaits Bob's QBER
    sample (``sampling`` empty).
    """

    paused: str | None = None  # the status detail while paused
    unlock_due: bool = False
    sampling: set[int] = field(default_factory=set)  # SIFT went out locked, sample not back


class Node:
    """A running node; build with :func:`run_node`."""

    def __init__(
        self,
        config: NodeConfig,
        devices: DeviceManager,
        publisher: TelemetryPublisher,
        link: peer.PeerLink,
        store: KeyStore,
        *,
        pool: AuthPool | None = None,
    ) -> None:
        self.cfg = config
        self.devices = devices
        self.pub = publisher
        self.link = link
        self.role = config.node.role
        self.stats = SiftStats()
        state_dir = Path(config.state.directory)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir = state_dir
        self.store = store
        self.pool = pool
        self._auth_failures_seen = 0
        # Set by run_node when the ETSI 014 API runs: its counters join the telemetry.
        self.etsi_counters: Callable[[], dict[str, int]] | None = None
        # Set by run_node when [metrics] is configured: it serves each telemetry payload.
        self.metrics: MetricsExporter | None = None
        self.laser: Laser | None = None
        self.tagger: TimeTagger | None = None
        if devices.needed_kind is DeviceKind.LASER:
            self.laser = devices.one(DeviceKind.LASER, Laser)
        else:
            self.tagger = devices.one(DeviceKind.TIME_TAGGER, TimeTagger)
        self.alice: AliceEngine | None = None
        self.bob: BobEngine | None = None
        self.hooks = NodeHooks(self, pool)
        self.alice_blocks: blocks.AliceBlocks | None = None
        self.bob_blocks: blocks.BobBlocks | None = None
        pp, peer_id = config.postprocessing, config.peer.peer_id
        if self.role == "alice":
            self.alice = AliceEngine(config, laser=self.laser, stats=self.stats)
            self.alice_blocks = blocks.AliceBlocks(
                pp,
                store,
                peer_id=peer_id,
                intensities=laser_intensities(self.laser) if self.laser is not None else None,
                hooks=self.hooks,
            )
            self.block_totals = self.alice_blocks.totals
        else:
            self.bob = BobEngine(config, stats=self.stats)
            self.bob_blocks = blocks.BobBlocks(pp, store, peer_id=peer_id, hooks=self.hooks)
            self.block_totals = self.bob_blocks.totals
        self.validator = BatchValidator(device=self.tagger.name if self.tagger else "")
        self.state = "starting"
        self._problems: dict[str, str] = {}
        # Faults that halt key generation until they clear (blinding, a latch given up on).
        self._halts: set[str] = set()
        self._own_progress, self._reply = asyncio.Condition(), asyncio.Condition()
        self._queue: asyncio.Queue[TagBatch] = asyncio.Queue(
            maxsize=config.sifting.max_batches_in_flight
        )
        self._qber_alarmed = False
        # Batches lost because the peer went away (Bob), and how far Bob's
        # batches have got in time (Alice, to bound her own buffer).
        self._peer_drops = 0
        self._bob_progress_ps = 0
        # What the protocol disclosed, by message type: the finished
        # channels' counts plus the current channel's.
        self._disclosed_before: Counter[str] = Counter()
        self._channel: peer.PeerChannel | None = None
        self.notifier = Notifier()
        self._ready_sent = False
        # When the pipeline last moved a batch; the watchdog pings only while
        # this is recent, so a stalled pipeline lets systemd's watchdog fire.
        self.last_progress = time.monotonic()
        self.hold = KeyHold()
        self.commands = CommandDesk(
            config.node.id, self.command_handlers(), publisher.publish_result
        )

    # -- state -------------------------------------------------------------------
    async def _set_state(self, state: str, detail: str = "") -> None:
        if self.hold.paused is not None and state in {"locking", "running"}:
            # An operator's pause outranks the pipeline's progress; a fault still shows.
            state, detail = "paused", self.hold.paused
        if state != self.state:
            log.info("state", state=state, detail=detail)
            self.state = state
            await self.pub.set_status(state, detail)
            line = f"{state}: {detail}" if detail else state
            if state in ("running", "paused") and not self._ready_sent:
                # READY only once drivers are up and the peer clock is locked, or an
                # operator paused the node before that (else systemd's start times out).
                self._ready_sent = self.notifier.ready(line)
            else:
                self.notifier.status(line)

    async def _problem(self, key: str, message: str, severity: str = "warning") -> None:
        """Record a fault once (one log line, one alarm) and go degraded."""
        if key not in self._problems:
            self._problems[key] = message
            log.error("fault", fault=key, error=message)
            self.pub.raise_alarm(severity, key, message)
        await self._set_state("degraded", "; ".join(self._problems.values()))

    async def _resolved(self, key: str) -> None:
        if self._problems.pop(key, None) is not None:
            log.info("fault cleared", fault=key)
            self.pub.raise_alarm("info", key + "-cleared", f"{key} recovered")
            self._sync_halt()  # a halt on this fault (a latch given up on) lifts with it
        if not self._problems:
            await self._set_state("running" if self.stats.locked else "locking")

    # -- loops -------------------------------------------------------------------
    async def run(self) -> None:
        await self._set_state("locking", "waiting for peer")
        self.pub.attach_commands(self.commands.offer)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.commands.run(), name="commands")
            tg.create_task(self._telemetry_loop(), name="telemetry")
            if self.notifier.watchdog_interval_s is not None:
                tg.create_task(
                    self._watchdog_loop(self.notifier.watchdog_interval_s), name="watchdog"
                )
            if self.tagger is not None:
                tg.create_task(self._tagger_loop(self.tagger), name="tagger")
            if self.laser is not None:
                # BB84: the reference is the source's own slot clock, which a
                # daemon restart does not reset, so a saved model still holds.
                # (BBM92's reference is Alice's tagger, whose stream restarts.)
                restored = self._restore_clock()
                await self.laser.set_mode(LaserMode.KEY if restored else LaserMode.SYNC)
                await self.laser.set_output(True)
                tg.create_task(self._laser_watch(self.laser), name="laser-watch")
            tg.create_task(self._peer_loop(), name="peer")

    async def _tagger_loop(self, tagger: TimeTagger) -> None:
        """Read batches, validate, hand them on; reopen the stream on failure."""
        attempt = 0
        if self.bob is not None:
            self.bob.epoch = secrets.randbits(62)
        resumed_after: int | None = None  # the last stop time before a reopen
        seq_offset = 0  # batch numbers stay increasing across a tagger that restarted
        while True:
            try:
                async for raw in tagger.stream():
                    attempt = 0
                    batch = replace(raw, seq=raw.seq + seq_offset) if seq_offset else raw
                    if resumed_after is not None:
                        if self._time_base_check(resumed_after, batch):
                            # It counts its batches from the start again, too.
                            shift = max(0, self.validator.last_seq + 1 - batch.seq)
                            seq_offset += shift
                            batch = replace(batch, seq=batch.seq + shift)
                        resumed_after = None
                    try:
                        self.validator.check(batch)
                    except BatchError as exc:
                        self.stats.rejected_batches += 1
                        await self._problem("bad-batch", str(exc))
                        continue
                    if "bad-batch" in self._problems or "tagger" in self._problems:
                        await self._resolved("bad-batch")
                        await self._resolved("tagger")
                    await self._deliver(batch)
                raise ConnectionError("stream ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a driver may raise anything; contain it here
                await self._problem("tagger", f"time tagger {tagger.name!r} failed: {exc}")
                if resumed_after is None and self.validator.last_stop_ps is not None:
                    resumed_after = self.validator.last_stop_ps
                attempt += 1
                await asyncio.sleep(backoff_s(attempt, base_s=RETRY_BASE_S, cap_s=RETRY_CAP_S))

    def _time_base_check(self, last_stop_ps: int, batch: TagBatch) -> bool:
        """The first batch of a reopened stream: did the tagger's clock go on?

        A tagger that kept running (a cable or a connection dropped) continues
        where it stopped, and the clock model still holds; one that restarted
        counts from elsewhere (zero, mostly): a new time base, so Alice locks
        afresh (Bob's TAGS name it), and the batch order starts over.  True then.
        """
        if 0 <= batch.start_ps - last_stop_ps <= MAX_TAGGER_GAP_PS:
            return False
        log.warning(
            "time tagger clock restarted: a new time base, locking afresh",
            last_stop_ps=last_stop_ps,
            first_start_ps=batch.start_ps,
        )
        self.validator.last_stop_ps = None
        if self.bob is not None:
            self.bob.epoch = secrets.randbits(62)
        elif self.alice is not None:
            self.alice.unlock()  # BBM92: Alice's own clock is one side of the model
        return True

    async def _deliver(self, batch: TagBatch) -> None:
        if self.alice is not None:
            async with self._own_progress:
                # Stay a bounded distance ahead of Bob: memory, not speed, is the limit.
                horizon = 4 * self.cfg.timing.max_offset_ps + self.cfg.timing.lock_max_duration_ps
                await self._own_progress.wait_for(
                    lambda: batch.start_ps - self._bob_progress_ps < horizon
                )
                self.alice.add_own_batch(batch)
                self._own_progress.notify_all()
        else:
            await self._queue.put(batch)

    async def _peer_loop(self) -> None:
        attempt = 0
        while True:
            channel = await self.link.connected()
            self._channel = channel
            await self._resolved("peer")
            try:
                await self._session(channel)
            except asyncio.CancelledError:
                # Shutting down: tell the peer, so it does not raise a fault.
                await channel.goodbye()
                raise
            except PeerGone:
                log.info("peer stopped")
                await channel.close()
                if self.bob is not None:
                    self.bob.forget(lost=False)
                await self._set_state("locking", "waiting for peer")
            except PEER_ERRORS as exc:
                await self._problem("peer", f"peer channel failed: {type(exc).__name__}: {exc}")
                await channel.close()
                if self.bob is not None:
                    self._peer_drops += self.bob.forget()
                # A session that ran a while was a good one: this fault starts a
                # new count, so recovery does not slow with every fault a long
                # life sees (the link's own dial loop resets the same way).
                if time.monotonic() - channel.opened > 1.0:
                    attempt = 0
                attempt += 1
                await asyncio.sleep(backoff_s(attempt, base_s=RETRY_BASE_S, cap_s=RETRY_CAP_S))

    async def _session(self, channel: peer.PeerChannel) -> None:
        """One peer session; a failure inside Bob's task group surfaces as itself."""
        try:
            if self.role == "alice":
                await self._alice_session(channel)
            else:
                await self._bob_session(channel)
        except ExceptionGroup as group:
            raise group.exceptions[0] from None
        finally:
            self._disclosed_before.update(channel.sent_bytes)
            self._channel = None
            # A block in flight dies with its session; Bob's pending ones wait for RECOVER.
            if self.alice_blocks is not None:
                self.alice_blocks.reset()
            if self.bob_blocks is not None:
                self.bob_blocks.reset()

    @staticmethod
    async def _send_all(channel: peer.PeerChannel, out: blocks.Out) -> None:
        for msg_type, msg in out:
            await channel.send(msg_type, peer.encode_arrays(msg))

    async def _alice_session(self, channel: peer.PeerChannel) -> None:
        assert self.alice is not None and self.alice_blocks is not None
        alice = self.alice
        ab = self.alice_blocks
        block_handlers: dict[peer.MsgType, Callable[[Message], blocks.Out]] = {
            peer.MsgType.EC_QUERY: ab.on_query,
            peer.MsgType.EC_DONE: ab.on_done,
            peer.MsgType.PREPARED: ab.on_prepared,
            peer.MsgType.ABORT: ab.on_abort,
            peer.MsgType.RECOVER: ab.on_recover,
        }
        # The clock model outlives a session while Bob's time base does (his
        # TAGS name it; AliceEngine locks afresh when it changes).
        alice.new_session()
        self.hold.sampling.clear()
        if alice.clock is not None:
            await self._on_locked()
        else:
            await self._set_state("locking", "locking to peer clock")
        while True:
            frame = await channel.recv(timeout=self.cfg.peer.timeout_s * 3)
            msg = peer.decode_arrays(frame.payload) if frame.payload else {}
            if frame.msg_type == peer.MsgType.TAGS:
                await self._alice_tags(channel, alice, msg)
            elif frame.msg_type == peer.MsgType.QBER_SAMPLE:
                self.hold.sampling.discard(scalar(msg, "seq"))
                result = alice.on_sample(msg)
                await channel.send(peer.MsgType.QBER_RESULT, peer.encode_arrays(result))
                if self._making_key():
                    await self._send_all(channel, ab.maybe_start(alice.sifted))
            elif frame.msg_type in block_handlers:
                # A block in flight runs to its end (commit or abort) even when
                # paused; only the start of the next one waits.
                await self._send_all(channel, block_handlers[frame.msg_type](msg))
                if not ab.busy and self._making_key():
                    await self._send_all(channel, ab.maybe_start(alice.sifted))
            elif frame.msg_type == peer.MsgType.BYE:
                raise PeerGone
            elif frame.msg_type == peer.MsgType.PING:
                await channel.send(peer.MsgType.PONG, b"")
            else:
                raise ProtocolError(f"unexpected message {frame.msg_type!r} from Bob")

    async def _await_own_tags(self, stop_b: int) -> None:
        """Wait until Alice's own tagger has covered Bob's batch (BBM92)."""
        assert self.alice is not None
        alice = self.alice
        self._bob_progress_ps = stop_b - self.cfg.timing.max_offset_ps
        until = alice.needed_until(stop_b)
        async with asyncio.timeout(self.cfg.peer.timeout_s), self._own_progress:
            self._own_progress.notify_all()
            await self._own_progress.wait_for(lambda: alice.own_stop_ps >= until)

    async def _alice_tags(
        self, channel: peer.PeerChannel, alice: AliceEngine, msg: Message
    ) -> None:
        """Bob's TAGS: lock or sift (neither while paused), and answer SIFT."""
        stop_b = scalar(msg, "stop_ps")
        seq = scalar(msg, "seq")
        await self._release_lock_if_due(alice)
        was_locked = alice.clock is not None  # after a release: this batch may lock afresh
        if not self._making_key():
            # Paused, or the lock is about to be dropped: this batch makes no
            # key and leaves the clock model alone.
            reply = alice.locking_reply(seq)
            await self._note_bob_progress(alice, msg)
        else:
            try:
                if self.tagger is not None:
                    await self._await_own_tags(stop_b)
                    if "tagger-behind" in self._problems:
                        await self._resolved("tagger-behind")  # caught up again
                reply = alice.on_tags(msg)
            except kernel.LockError as exc:
                await self._problem("lock", f"no clock lock: {exc}")
                reply = alice.locking_reply(seq)
            except TimeoutError:
                # Our own tagger is behind Bob's batch: skip it (no key),
                # keep the link answering.
                await self._problem("tagger-behind", "own time tagger is behind the peer's")
                reply = alice.skip_reply(seq)
        if not was_locked and alice.clock is not None:
            await self._on_locked()
        elif was_locked and alice.clock is None and self.laser is not None:
            # Bob's time base changed: lock afresh on the source's public sync
            # pattern (the KEY stream's pulses give no lock to find).
            await self._laser_mode(LaserMode.SYNC)
            if not self._problems:
                await self._set_state("locking", "peer time base changed, re-locking")
        await channel.send(peer.MsgType.SIFT, peer.encode_arrays(reply))
        if scalar(reply, "locked") == 1 and "skipped" not in reply:
            self.hold.sampling.add(seq)  # Bob answers it with a QBER_SAMPLE
        self.last_progress = time.monotonic()

    def _making_key(self) -> bool:
        """Whether Alice sifts new batches and starts blocks (not paused, no re-lock due)."""
        return self.hold.paused is None and not self.hold.unlock_due

    async def _note_bob_progress(self, alice: AliceEngine, msg: Message) -> None:
        """Bob's batches move on while Alice sifts none (BBM92): her own tagger
        follows, as far ahead of Bob as ever, and what Bob has passed goes.

        Her own tags are kept, not dropped, while paused: Bob's batches may
        lag hers by up to the horizon, and those still to come need them.
        """
        if self.tagger is None:
            return
        start_b, stop_b = scalar(msg, "start_ps"), scalar(msg, "stop_ps")
        max_offset = self.cfg.timing.max_offset_ps
        async with self._own_progress:
            self._bob_progress_ps = stop_b - max_offset
            if alice.clock is None:
                # Unlocked, Bob's clock may be anywhere within ±max_offset of
                # hers: keep that margin twice, as the lock search does.  (No
                # batch up to here will be sifted; AliceEngine trims its own
                # tags only inside on_tags, which a paused node does not call.)
                alice.trim_own(start_b - 2 * max_offset)
            self._own_progress.notify_all()

    async def _release_lock_if_due(self, alice: AliceEngine) -> None:
        """Drop the clock model (pause, recalibration) once no SIFT awaits its sample.

        Bob answers every locked SIFT with a QBER sample; forgetting those
        batches first would turn the samples into protocol errors and cost the
        session.  Meanwhile new batches get unlocked replies, so the set of
        outstanding samples only shrinks.
        """
        if not self.hold.unlock_due or self.hold.sampling:
            return
        self.hold.unlock_due = False
        was_locked = alice.clock is not None
        alice.unlock()  # also drops sifted batches no block has taken
        self.save_clock()  # none now: a restart must not bring the old model back
        if self.laser is not None:
            # BB84 locks on the source's public sync pattern (Calderaro et al. 2020).
            await self._laser_mode(LaserMode.SYNC)
        log.info("clock lock released", was_locked=was_locked, paused=self.hold.paused is not None)
        if not self._problems:
            await self._set_state("locking", "re-locking the clock (operator request)")

    async def _laser_watch(self, laser: Laser) -> None:
        """Ask the source every telemetry interval whether it answers.

        A source that does not answer cannot vouch for what it emits (a
        power-cycled controller has lost its patterns): key generation halts,
        and the raw key sifted meanwhile goes when it answers again.  A source
        whose slot clock may have restarted (``slot_clock_epoch`` moved: the
        driver found its patterns gone and restored them) makes Alice's clock
        model stale: she re-locks on the sync pattern.
        """
        interval = self.cfg.mqtt.telemetry_interval_s
        epoch = laser.slot_clock_epoch
        while True:
            await asyncio.sleep(interval)
            if not await laser.ping():
                await self._problem(
                    "laser-link",
                    f"laser {laser.name!r} does not answer; key generation halted until it does",
                )
                self._halt_keys("laser-link")
                continue
            if laser.slot_clock_epoch != epoch:
                epoch = laser.slot_clock_epoch
                log.warning("source's slot clock restarted; re-locking", device=laser.name)
                self._drop_sifted()
                self.hold.unlock_due = True
            if "laser-link" in self._problems:
                self._drop_sifted()  # sifted while the source could not be vouched for
                await self._resolved("laser-link")

    def _drop_sifted(self) -> None:
        for sifting in (self.alice, self.bob):
            if sifting is not None:
                sifting.sifted.clear()

    async def _laser_mode(self, mode: LaserMode) -> None:
        """Switch the source's mode; an instrument error is a fault (alarm, degraded),
        not the end of the node: the next switch tries again."""
        assert self.laser is not None
        try:
            await self.laser.set_mode(mode)
        except DeviceError as exc:
            await self._problem("laser", f"laser {self.laser.name!r}: mode {mode} failed: {exc}")
            return
        await self._resolved("laser")

    async def _on_locked(self) -> None:
        clock = self.alice.clock if self.alice else None
        if clock is not None:
            log.info("clock locked", offset_ps=round(clock.offset_ps), drift_ppm=clock.drift_ppm)
        if self.laser is not None:
            await self._laser_mode(LaserMode.KEY)
        self.save_clock()
        await self._resolved("lock")
        if not self._problems:
            await self._set_state("running", "locked")

    async def _bob_session(self, channel: peer.PeerChannel) -> None:
        assert self.bob is not None and self.bob_blocks is not None
        await self._set_state("locking", "waiting for Alice's lock")
        # Settle blocks a crash or a lost link left pending before any new one starts.
        await self._send_all(channel, self.bob_blocks.recover_request())
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._bob_send(channel), name="bob-send")
            tg.create_task(self._bob_recv(channel), name="bob-recv")
            tg.create_task(self._keepalive(channel), name="bob-keepalive")

    async def _keepalive(self, channel: peer.PeerChannel) -> None:
        """PING when idle, so a quiet link (no light, paused tagger) is not
        taken for a dead one; both ends' receive timeouts see the traffic."""
        interval = self.cfg.peer.timeout_s / 2
        while True:
            await asyncio.sleep(interval)
            if time.monotonic() - channel.last_sent >= interval:
                await channel.send(peer.MsgType.PING, b"")

    async def _bob_send(self, channel: peer.PeerChannel) -> None:
        assert self.bob is not None
        bob = self.bob
        bb = self.bob_blocks
        assert bb is not None

        def room() -> bool:
            # While a block is in post-processing, new TAGS wait here: every
            # Cascade round trip would otherwise queue behind the batches
            # already on their way to Alice, and a block's thousand-odd rounds
            # would take minutes instead of a second.  The batches wait in the
            # tagger queue (and the tagger's own buffer), none is lost.
            if bb.busy:
                return False
            return bob.in_flight < self.cfg.sifting.max_batches_in_flight

        while True:
            batch = await self._queue.get()
            async with self._reply:
                await self._reply.wait_for(room)
            await channel.send(peer.MsgType.TAGS, peer.encode_arrays(bob.on_batch(batch)))

    async def _bob_recv(self, channel: peer.PeerChannel) -> None:
        assert self.bob is not None and self.bob_blocks is not None
        bob = self.bob
        bb = self.bob_blocks
        block_handlers: dict[peer.MsgType, Callable[[Message], blocks.Out]] = {
            peer.MsgType.BLOCK_START: lambda m: bb.on_start(m, bob.sifted),
            peer.MsgType.EC_ANSWER: bb.on_answer,
            peer.MsgType.VERIFY: bb.on_verify,
            peer.MsgType.COMMIT: bb.on_commit,
            peer.MsgType.ABORT: bb.on_abort,
            peer.MsgType.RECOVER_REPLY: bb.on_recover_reply,
        }
        while True:
            frame = await channel.recv(timeout=self.cfg.peer.timeout_s * 3)
            msg = peer.decode_arrays(frame.payload) if frame.payload else {}
            if frame.msg_type == peer.MsgType.SIFT:
                was_locked = self.stats.locked
                sample = bob.on_sift(msg)
                self.last_progress = time.monotonic()
                async with self._reply:
                    self._reply.notify_all()
                if sample is not None:
                    await channel.send(peer.MsgType.QBER_SAMPLE, peer.encode_arrays(sample))
                if self.stats.locked and not was_locked and not self._problems:
                    await self._set_state("running", "locked")
                elif was_locked and not self.stats.locked and not self._problems:
                    # Alice dropped the lock: a recalibration or a pause there.
                    await self._set_state("locking", "alice is re-locking the clock, or paused")
            elif frame.msg_type == peer.MsgType.QBER_RESULT:
                bob.on_result(msg)
            elif frame.msg_type in block_handlers:
                await self._send_all(channel, block_handlers[frame.msg_type](msg))
                if not bb.busy:
                    async with self._reply:
                        self._reply.notify_all()
            elif frame.msg_type == peer.MsgType.PONG:
                pass  # keepalive answered
            elif frame.msg_type == peer.MsgType.BYE:
                raise PeerGone
            else:
                raise ProtocolError(f"unexpected message {frame.msg_type!r} from Alice")

    async def _watchdog_loop(self, interval_s: float) -> None:
        # Healthy means the loop runs (we are here) and batches keep moving.
        stall_s = max(5.0, 4 * interval_s)
        while True:
            if time.monotonic() - self.last_progress < stall_s:
                self.notifier.watchdog()
            await asyncio.sleep(interval_s)

    # -- operator commands (parsed, validated and audited by qnoded/commands.py) --
    def command_handlers(self) -> dict[str, Handler]:
        return {
            "status": self._cmd_status,
            "pause": self._cmd_pause,
            "resume": self._cmd_resume,
            "recalibrate": self._cmd_recalibrate,
            "clear-alarm": self._cmd_clear_alarm,
            "rotate-log-level": rotate_log_level,
        }

    def active_alarms(self) -> dict[str, str]:
        """Faults and alarms that are on now, code -> message (what clear-alarm can clear)."""
        active = dict(self._problems)
        if self._qber_alarmed:
            threshold = self.cfg.sifting.qber_alarm_threshold
            active["qber-high"] = f"QBER {self.stats.qber} above threshold {threshold}"
        return active

    async def _refresh_state(self, detail: str) -> None:
        """Publish the state the node is in now, after an operator changed something."""
        if self._problems:
            await self._set_state("degraded", "; ".join(self._problems.values()))
        elif self._channel is None:
            await self._set_state("locking", "waiting for peer")
        elif self.stats.locked:
            await self._set_state("running", "locked")
        else:
            await self._set_state("locking", detail)

    def _alice_only(self, command: str) -> tuple[AliceEngine, blocks.AliceBlocks]:
        """Alice's engines; at Bob, a CommandError that says where the command acts."""
        if self.alice is None or self.alice_blocks is None:
            here, there = self.cfg.node.id, self.cfg.peer.peer_id
            raise CommandError(
                f"{command} acts at {there}, not at {here}: {there} (alice) leads sifting and "
                f"post-processing and holds the clock model, {here} follows; "
                f"publish the command to {topic(there, 'cmd/' + command)}"
            )
        return self.alice, self.alice_blocks

    async def _cmd_status(self, request: Request) -> dict[str, Any]:
        return {
            "status": self.pub.status,
            "paused": self.hold.paused is not None,
            "active_alarms": self.active_alarms(),
            "log_level": current_log_level(),
            "summary": self.summary(),  # counts and figures only, never key material
        }

    async def _cmd_pause(self, request: Request) -> dict[str, Any]:
        _, ab = self._alice_only("pause")
        if self.hold.paused is not None:
            return {"paused": True, "changed": False, "state": self.state}
        reason = request.args.get("reason", "")
        self.hold.paused = (
            "key generation paused by operator"
            + (f" ({reason})" if reason else "")
            + "; peer link and telemetry stay up"
        )
        # The clock is not tracked while no batch is sifted: drop the model
        # (once in-flight samples are back) and lock afresh on resume.
        self.hold.unlock_due = True
        log.warning("key generation paused", reason=reason, block_in_flight=ab.busy)
        await self._refresh_state("")
        return {"paused": True, "changed": True, "state": self.state, "block_in_flight": ab.busy}

    async def _cmd_resume(self, request: Request) -> dict[str, Any]:
        self._alice_only("resume")
        if self.hold.paused is None:
            return {"paused": False, "changed": False, "state": self.state}
        self.hold.paused = None
        log.warning("key generation resumed")
        await self._refresh_state("re-locking the clock after a pause")
        return {"paused": False, "changed": True, "state": self.state}

    async def _cmd_recalibrate(self, request: Request) -> dict[str, Any]:
        alice, _ = self._alice_only("recalibrate")
        if self.hold.paused is not None:
            raise CommandError(
                f"{self.cfg.node.id} is paused: its clock is not locked while paused, "
                "and resume locks it afresh"
            )
        clock = alice.clock
        self.hold.unlock_due = True
        log.warning("clock re-lock requested", was_locked=clock is not None)
        return {
            "relocking": True,
            "was_locked": clock is not None,
            "offset_ps": round(clock.offset_ps) if clock is not None else None,
            "drift_ppm": clock.drift_ppm if clock is not None else None,
            "peer_connected": self._channel is not None,
        }

    async def _cmd_clear_alarm(self, request: Request) -> dict[str, Any]:
        code = request.args["code"]
        active = self.active_alarms()
        if code not in active:
            listed = ", ".join(sorted(active)) if active else "none"
            raise CommandError(f"no active alarm {code!r} at {self.cfg.node.id}; active: {listed}")
        if code == "qber-high":
            self._qber_alarmed = False
        else:
            del self._problems[code]
            self._sync_halt()
        log.warning("alarm cleared by operator", fault=code)
        self.pub.raise_alarm(
            "info", f"{code}-cleared", f"{code} cleared by operator; raised again if it recurs"
        )
        await self._refresh_state(f"{code} cleared by operator")
        return {"cleared": code, "message": active[code], "active": sorted(self.active_alarms())}

    # -- telemetry ---------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        s = self.stats
        alice_locked = s.locked and self.role == "alice"
        out: dict[str, Any] = (
            {
                "node_id": self.cfg.node.id,
                "role": self.role,
                "protocol": self.cfg.node.protocol,
                "state": self.state,
                "tags_processed": s.tags,
                "batches": s.batches,
                "coincidences": s.coincidences,
                "sifted_bits": s.sifted_bits,
                "raw_key_bits": s.raw_key_bits,
                "qber_sample_bits": s.sample_bits,
                "qber_sample_errors": s.sample_errors,
                "qber": s.qber,
                # So a dashboard shows the QBER against this node's own alarm level.
                "qber_alarm_threshold": self.cfg.sifting.qber_alarm_threshold,
                "locked": s.locked,
                # Alice holds the clock model; Bob only knows that it is locked.
                "offset_ps": round(s.offset_ps) if alice_locked else None,
                "drift_ppm": s.drift_ppm if alice_locked else None,
                "lock_offset_ps": round(s.lock_offset_ps) if alice_locked else None,
                "lock_drift_ppm": s.lock_drift_ppm if alice_locked else None,
                # gaps in the tagger's sequence (rejected batches included), batches
                # lost with a failed peer link, and batches the engines gave up on
                "dropped_batches": self.validator.missed_batches
                + self._peer_drops
                + s.dropped_batches,
                "rejected_batches": s.rejected_batches,
                "multi_clicks": s.multi_clicks,
                "mqtt_dropped_telemetry": self.pub.dropped_telemetry,
                "disclosed_bytes": self._disclosed(),
            }
            | self._key_summary()
            | process_health()
        )
        if self.laser is not None:
            out["signal_gain"] = s.gain(IntensityClass.SIGNAL)
            out["decoy_gain"] = s.gain(IntensityClass.DECOY)
            out["vacuum_gain"] = s.gain(IntensityClass.VACUUM)
            out["pulses"] = {c.name.lower(): s.pulses[c] for c in IntensityClass}
        return out

    def _key_summary(self) -> dict[str, Any]:
        t = self.block_totals
        stored_keys, stored_bits = self.store.ready_count()
        return {
            "blocks_accepted": t.accepted,
            "blocks_rejected": t.rejected,
            "block_reject_reasons": dict(t.reasons),
            "secret_bits": t.secret_bits,
            "secret_keys": t.keys,
            "ec_leak_bits": t.leak_ec_bits,
            "ec_efficiency": t.mean_efficiency,
            "auth_key_bits_reserved": 8 * t.auth_bytes_reserved,
            "last_block": t.last.public() if t.last is not None else None,
            "stored_keys": stored_keys,
            "stored_key_bits": stored_bits,
            "keys_delivered": self.pub.keys_delivered,
            "keys_destroyed_undelivered": self.pub.keys_destroyed,
            # Authentication is paid for with key: what the MAC's pads used up,
            # what is left, and the secret bits net of the reserve.
            "auth_key_bits_consumed": 8 * self.pool.consumed_bytes if self.pool else 0,
            "auth_key_bits_available": 8 * self.pool.available_bytes if self.pool else 0,
            "auth_failures": dict(self.link.auth_failures),
            "net_secret_bits": t.secret_bits - 8 * t.auth_bytes_reserved,
        } | (self.etsi_counters() if self.etsi_counters is not None else {})

    def _disclosed(self) -> dict[str, int]:
        """Bytes this node sent its peer, per message type, over the whole run."""
        total = self._disclosed_before.copy()
        if self._channel is not None:
            total.update(self._channel.sent_bytes)
        return dict(total)

    async def _telemetry_loop(self) -> None:
        interval = self.cfg.mqtt.telemetry_interval_s
        prev = asdict(self.stats)
        prev_t = time.monotonic()
        prev_secret = self.block_totals.secret_bits
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            cur = asdict(self.stats)
            dt = max(now - prev_t, 1e-9)
            rates = {
                f"{k}_per_s": (cur[k] - prev[k]) / dt
                for k in ("tags", "coincidences", "sifted_bits", "raw_key_bits")
            }
            d_bits = cur["sample_bits"] - prev["sample_bits"]
            interval_qber = (
                (cur["sample_errors"] - prev["sample_errors"]) / d_bits if d_bits else None
            )
            secret = self.block_totals.secret_bits
            rates["secret_key_bits_per_s"] = (secret - prev_secret) / dt
            prev_secret = secret
            prev, prev_t = cur, now
            # One status read per detector per interval (a serial round trip
            # each): the channel rates come from the same readings.
            detectors = await self._detector_states()
            payload = (
                self.summary()
                | rates
                | {
                    "time": time.time(),
                    "interval_s": dt,
                    "qber_interval": interval_qber,
                    "channel_rates_hz": {
                        str(d["channel"]): d["count_rate_hz"] for d in detectors if "error" not in d
                    },
                    "detectors": detectors,
                }
            )
            self.pub.publish_telemetry(payload)
            if self.metrics is not None:
                self.metrics.update(payload)  # the same figures, for Prometheus
            self.save_clock()  # tracking moves the model: a restart resumes from here
            await self._check_qber()
            self._check_auth()

    def _check_auth(self) -> None:
        """One alarm per telemetry interval in which frames failed authentication.

        A ``stale`` first frame alone is no attack: a session cut before a
        tagged frame arrived leaves the peer's pad floor below ours, it learns
        ours from the refusal and reconnects.  It stays counted by kind.
        """
        counts = self.link.auth_failures
        total = counts.total() - counts.get("stale", 0)
        if total > self._auth_failures_seen:
            new = total - self._auth_failures_seen
            self._auth_failures_seen = total
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.link.auth_failures.items()))
            self.pub.raise_alarm(
                "critical",
                "authentication-failure",
                f"{new} peer frame(s) failed authentication (so far: {kinds}); "
                "their session was dropped, no block from it is kept",
            )

    async def _detector_states(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for det in self.devices.detectors:
            try:
                st = await det.status()
            except Exception as exc:  # noqa: BLE001 - a detector that cannot report is news
                out.append({"name": det.name, "error": str(exc)})
                await self.detector_watch.unanswered(det, exc)
                continue
            await self.detector_watch.review(det, st)
            out.append(
                {
                    "name": st.name,
                    "channel": st.channel,
                    "latched": st.latched,
                    "temperature_k": st.temperature_k,
                    "bias_v": st.bias_v,
                    "count_rate_hz": st.count_rate_hz,
                    # Rises under bright light (a blinding attack): see detector_watch.
                    "photocurrent_a": st.extra.get("photocurrent_a"),
                }
            )
        return out

    @cached_property
    def detector_watch(self) -> DetectorWatch:
        return DetectorWatch(WatchActions(self._problem, self._resolved, self._halt_keys))

    def _halt_keys(self, code: str) -> None:
        """No block starts while the fault ``code`` is active (an operator clears it).

        The raw key sifted so far goes too: the cause (a blinding attack) began
        before it showed, so none of it is trusted; the peer drops its copy when
        the next block names batches this node no longer has.
        """
        if code not in self._halts:
            self._halts.add(code)
            log.error("key generation halted", fault=code)
        self._set_halted()
        self._drop_sifted()

    def _sync_halt(self) -> None:
        """Resume once no halting fault is active (one halt must not hide another)."""
        lifted = {code for code in self._halts if code not in self._problems}
        if lifted:
            self._halts -= lifted
            log.warning(
                "key generation resumed" if not self._halts else "halt cause cleared",
                fault=", ".join(sorted(lifted)),
                still_halted=sorted(self._halts),
            )
            self._set_halted()

    def _set_halted(self) -> None:
        reason = ", ".join(sorted(self._halts)) or None
        for engine in (self.alice_blocks, self.bob_blocks):
            if engine is not None:
                engine.halted = reason

    async def _check_qber(self) -> None:
        q = self.stats.qber
        threshold = self.cfg.sifting.qber_alarm_threshold
        if q is None or self.stats.sample_bits < 1000:
            return
        if q > threshold and not self._qber_alarmed:
            self._qber_alarmed = True
            msg = f"QBER {q:.4f} above threshold {threshold:.4f}"
            log.warning("qber alarm", qber=q, threshold=threshold)
            self.pub.raise_alarm("critical", "qber-high", msg)
        elif q <= threshold and self._qber_alarmed:
            self._qber_alarmed = False
            self.pub.raise_alarm("info", "qber-high-cleared", f"QBER {q:.4f} back below threshold")

    def _clock_path(self) -> Path:
        return self.state_dir / "clock.json"

    def _restore_clock(self) -> bool:
        if self.alice is None:
            return False
        path = self._clock_path()
        try:
            self.alice.restore_clock(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as exc:
            log.warning("saved clock model not used", path=str(path), error=str(exc))
            return False
        log.info("clock model restored; kept unless the peer's time base changed", path=str(path))
        return True

    def save_clock(self) -> None:
        """Keep Alice's clock model (public figures) for a restart; none: remove it."""
        if self.alice is None or self.laser is None:
            return
        path = self._clock_path()
        doc = self.alice.clock_state()
        if doc is None:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc), encoding="utf-8")
        os.replace(tmp, path)

    def write_summary(self) -> None:
        path = self.state_dir / "summary.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.summary(), indent=1), encoding="utf-8")
        os.replace(tmp, path)


def settle_staged(pool: AuthPool, store: KeyStore) -> None:
    """After a crash: reserved authentication key follows its block's fate.

    Committed here: join the pool.  Unknown here: the block never made it,
    wipe the reserve.  Pending (Bob): RECOVER with Alice decides later.
    """
    for block_id in pool.staged():
        state = store.block_state(block_id)
        if state == "ready":
            pool.activate(block_id)
        elif state is None:
            pool.drop(block_id)


async def run_node(
    config: NodeConfig,
    registry: dict[str, DriverInfo],
    *,
    on_node: Callable[[Node], None] | None = None,
) -> None:
    """Run one node until cancelled; devices and links close in reverse order."""
    node_log = log.bind(node=config.node.id, role=config.node.role)
    node_log.info("starting", protocol=config.node.protocol, config=config.source)
    p = config.peer
    endpoint = p.listen if config.node.role == "alice" else p.connect
    host, _, port = endpoint.rpartition(":")
    async with contextlib.AsyncExitStack() as stack:
        # Authentication first: without the pre-shared key no classical
        # message can be trusted, so nothing else starts (fail closed).
        Path(config.state.directory).mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, at start-up
        pool = stack.enter_context(AuthPool.open(config.state.directory, config.auth))
        store = KeyStore(
            Path(config.state.directory) / "keys.db", max_bytes=config.state.key_store_max_bytes
        )
        stack.callback(store.close)
        settle_staged(pool, store)
        pub = await stack.enter_async_context(
            TelemetryPublisher(mqtt_settings(config), config.node.id)
        )
        await pub.set_status("starting", "opening devices")
        devices = await stack.enter_async_context(DeviceManager(config, registry))
        link = await stack.enter_async_context(
            peer.PeerLink(
                role="listen" if config.node.role == "alice" else "connect",
                host=host,
                port=int(port),
                node_id=config.node.id,
                peer_id=config.peer.peer_id,
                protocol=config.node.protocol,
                authenticator=pool.channel_auth,
            )
        )
        if store.destroyed_at_start:
            node_log.warning(
                "keys destroyed at start: a delivery was interrupted",
                keys=store.destroyed_at_start,
            )
        if config.mqtt.publish_keys:
            pub.attach_keys(store, config.peer.peer_id)
        node = Node(config, devices, pub, link, store, pool=pool)
        if config.etsi014.listen:
            etsi = await stack.enter_async_context(Etsi014Server.from_config(config, store))
            node.etsi_counters = etsi.counters.telemetry
        if config.metrics.listen:
            node.metrics = await stack.enter_async_context(MetricsExporter.from_config(config))
        if on_node is not None:
            on_node(node)
        try:
            await node.run()
        finally:
            node.notifier.stopping()
            node.write_summary()
            with contextlib.suppress(Exception):
                node.pub.publish_telemetry(node.summary() | {"final": True})
            node_log.info(
                "stopping",
                **{
                    k: v
                    for k, v in node.summary().items()
                    if isinstance(v, int | float | str | None)
                },
            )
