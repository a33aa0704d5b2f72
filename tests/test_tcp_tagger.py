"""The ``tcp-tagger`` driver against its emulator (``hil/tcp_tagger.py``) over real sockets.

The emulator streams what :class:`SimTimeTagger` yields for the same
simulation table, so batches are compared with the simulated tagger's tag for
tag: both run the same seeded physics, cut on the same grid (``k *
batch_duration_ps``), so exact equality holds.  Misbehaviour is injected with
``--fault`` (at a known frame) or ``EMU:FAULT`` (at the emulator's next frame).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import selectors
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qnoded_drivers.sim.detector import SimSPAD
from qnoded_drivers.sim.tagger import SimTimeTagger
from qnoded_drivers.tcp_tagger import (
    FLAG_OVERFLOW,
    HEADER,
    Assembler,
    Frame,
    LeftOut,
    TaggerCommandError,
    TaggerConnectionError,
    TaggerDataLossError,
    TaggerError,
    TaggerFrameError,
    TaggerTimeoutError,
    TcpTimeTagger,
    decode_header,
    decode_records,
    encode_frame,
)
from structlog.testing import capture_logs

from qnoded import kernel
from qnoded.broker import free_port
from qnoded.contracts import DriverContext, TagBatch
from qnoded.demo import add_arguments, demo_psk, link_parameters, node_config, spawn_node, stop_node
from qnoded.ingest import BatchValidator
from qnoded.mqtt import Subscriber

EMULATOR = Path(__file__).resolve().parents[1] / "hil" / "tcp_tagger.py"
DUR = 2_000_000_000  # 2 ms batches: many batches per second of test
SIM: dict[str, Any] = {
    "link_seed": 7,
    "alice_qrng_seed": 8,
    "distance_km": 5.0,
    "pulse_rate_hz": 1e7,
    "batch_duration_ps": DUR,
    "sync_duration_ps": 1_000_000_000,
    # Bob's clock: negative offset and a drift, so the grid and the clock map are exercised.
    "bob_clock_offset_ps": -123_456_789,
    "bob_clock_drift_ppm": 3.0,
}


# -- helpers -------------------------------------------------------------------------------


class EmulatorProcess:
    """``hil/tcp_tagger.py`` as a child process, up once it printed its READY line."""

    def __init__(self, config: Path, *args: str, timeout_s: float = 15.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(EMULATOR), "--config", str(config), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout_s):
                self.stop()
                raise AssertionError(f"emulator not ready within {timeout_s} s")
        line = self.proc.stdout.readline().split()
        if not line or line[0] != "READY":
            self.stop()
            raise AssertionError(f"emulator failed: {line} {self.proc.stderr}")
        host, port = line[1].rsplit(":", 1)
        self.host, self.port = host, int(port)

    def stop(self) -> int:
        self.proc.terminate()
        try:
            rc = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return rc


def start_emulator(config: Path, sim: dict[str, Any], *args: str) -> EmulatorProcess:
    """An emulator of BB84 Bob's tagger on a simulation table (written to ``config``)."""
    config.write_text(json.dumps({"simulation": sim, "node": {"protocol": "bb84", "role": "bob"}}))
    return EmulatorProcess(config, *args)


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[Callable[..., EmulatorProcess]]:
    """Start emulators on ``SIM``; each must exit cleanly on SIGTERM."""
    started: list[EmulatorProcess] = []

    def start(*args: str) -> EmulatorProcess:
        emu = start_emulator(tmp_path / f"emu{len(started)}.json", SIM, *args)
        started.append(emu)
        return emu

    yield start
    codes = [emu.stop() for emu in started]
    assert codes == [0] * len(started)  # SIGTERM is a clean stop


def _driver(emu: EmulatorProcess, **options: Any) -> TcpTimeTagger:
    opts = {"host": emu.host, "port": emu.port, "batch_duration_ps": DUR} | options
    return TcpTimeTagger("tagger", opts, DriverContext(node_id="bob", role="bob", protocol="bb84"))


_REFERENCE: dict[tuple[tuple[int, int], ...], list[TagBatch]] = {}


async def reference(n: int, delays: dict[int, int] | None = None) -> dict[int, TagBatch]:
    """The simulated tagger's first ``n`` batches for ``SIM`` (cached), by seq."""
    key = tuple(sorted((delays or {}).items()))
    have = _REFERENCE.get(key, [])
    if len(have) < n:
        ctx = DriverContext(node_id="ref", role="bob", protocol="bb84", simulation=dict(SIM))
        for ch in range(4):
            SimSPAD(f"det{ch}", {"channel": ch}, ctx)
        have = []
        async with SimTimeTagger("ref", {}, ctx) as sim:
            for ch, d in (delays or {}).items():
                await sim.set_delay(ch, d)
            async for batch in sim.stream():
                have.append(batch)
                if len(have) == n:
                    break
        _REFERENCE[key] = have
    return {b.seq: b for b in have[:n]}


def assert_same(got: list[TagBatch], ref: dict[int, TagBatch]) -> None:
    assert got
    for b in got:
        r = ref[b.seq]
        assert (b.start_ps, b.stop_ps) == (r.start_ps, r.stop_ps)
        np.testing.assert_array_equal(b.timestamps_ps, r.timestamps_ps)
        np.testing.assert_array_equal(b.channels, r.channels)


async def collect(
    tagger: TcpTimeTagger,
    validator: BatchValidator,
    n: int,
    until: Callable[[], bool] = lambda: True,
) -> list[TagBatch]:
    """``n`` batches, or more until ``until()`` holds; each checked as the node does."""
    got: list[TagBatch] = []
    async for batch in tagger.stream():
        got.append(validator.check(batch))
        if len(got) >= n and until():
            break
        assert len(got) < 3000, "the awaited condition never came"
    return got


async def scpi(emu: EmulatorProcess, *lines: str) -> list[str]:
    """Send lines on a control connection of our own; one reply per query."""
    reader, writer = await asyncio.open_connection(emu.host, emu.port)
    replies = []
    try:
        for line in lines:
            writer.write(line.encode() + b"\n")
            await writer.drain()
            if line.split(" ")[0].endswith("?"):
                async with asyncio.timeout(5):
                    replies.append((await reader.readline()).decode().strip())
    finally:
        writer.close()
        await writer.wait_closed()
    return replies


async def inject(emu: EmulatorProcess, fault: str) -> None:
    assert await scpi(emu, f"EMU:FAULT {fault}", "SYST:ERR?") == ['0,"No error"']


# -- the wire format -----------------------------------------------------------------------


def test_frame_layout_matches_the_documented_offsets() -> None:
    """Bytes written field by field at the offsets of the module docstring."""
    import struct
    import zlib

    t = np.array([-5, 0, 7, 7, 1_000_000_000_000], np.int64)
    ch = np.array([3, 0, 1, 2, 0], np.uint8)
    payload = b"".join(struct.pack("<qB", int(a), int(b)) for a, b in zip(t, ch, strict=True))
    head = bytearray(48)
    head[0:4] = b"QTTF"
    head[4] = 1
    head[5] = FLAG_OVERFLOW
    struct.pack_into("<Q", head, 8, 2**40 + 3)
    struct.pack_into("<q", head, 16, -10)
    struct.pack_into("<q", head, 24, 1_000_000_000_001)
    struct.pack_into("<I", head, 32, 5)
    struct.pack_into("<I", head, 36, 17)
    struct.pack_into("<I", head, 40, zlib.crc32(payload))
    struct.pack_into("<I", head, 44, zlib.crc32(bytes(head[:44])))
    wire = bytes(head) + payload
    assert encode_frame(2**40 + 3, -10, 1_000_000_000_001, t, ch, flags=1, lost=17) == wire
    h = decode_header(wire[: HEADER.size])
    assert (h.seq, h.t0_ps, h.t1_ps, h.count, h.lost, h.flags) == (
        2**40 + 3,
        -10,
        10**12 + 1,
        5,
        17,
        1,
    )
    frame = decode_records(h, wire[HEADER.size :], frozenset({0, 1, 2, 3}))
    assert frame.payload_ok
    np.testing.assert_array_equal(frame.times_ps, t)
    np.testing.assert_array_equal(frame.channels, ch)
    bad = bytearray(wire)
    bad[45] ^= 1
    with pytest.raises(ValueError, match="header CRC"):
        decode_header(bytes(bad[: HEADER.size]))
    assert not decode_records(
        h, bytes(bad[HEADER.size :])[:-1] + b"\x09", frozenset({0})
    ).payload_ok
    with pytest.raises(ValueError, match="unknown channel"):
        decode_records(h, wire[HEADER.size :], frozenset({0, 1, 2}))


def _frame(
    seq: int, t0: int, t1: int, times: list[int], *, flags: int = 0, ok: bool = True
) -> Frame:
    t = np.array(times, np.int64)
    return Frame(seq, t0, t1, flags, 3 if flags else 0, t, np.zeros(t.shape[0], np.uint8), ok)


def test_assembler_leaves_out_exactly_the_batches_a_loss_touches() -> None:
    asm = Assembler(duration_ps=100, channels=frozenset({0}))
    out: list[TagBatch | LeftOut] = []
    # Frames of 50 ps from t = 30: the first batch is [100, 200), tags before it are not ours.
    frames = [_frame(k, 30 + 50 * k, 80 + 50 * k, [30 + 50 * k, 60 + 50 * k]) for k in range(12)]
    frames[5] = _frame(5, 280, 330, [290], flags=FLAG_OVERFLOW)  # overflow in [280, 330)
    del frames[8]  # frame 8, [430, 480), never arrives: a sequence gap
    for f in frames:
        items, _ = asm.feed(f)
        out.extend(items)
    kept = [b for b in out if isinstance(b, TagBatch)]
    left = [b for b in out if isinstance(b, LeftOut)]
    assert [b.seq for b in kept] == [0, 4]  # [100, 200) and [500, 600) are whole
    assert [(b.seq, b.n, b.start_ps) for b in left] == [(1, 1, 200), (2, 1, 300), (3, 1, 400)]
    assert "overflow, 3 records" in left[0].spans[0].why
    assert "frame(s) 8 missing" in left[2].spans[0].why
    assert kept[0].timestamps_ps.tolist() == [110, 130, 160, 180]
    # A long gap (a reconnect) is one LeftOut of many batches, and it does not escalate.
    asm.new_session()
    items, spans = asm.feed(_frame(40, 100_030, 100_080, [100_050]))
    # [630, 100030) is lost: batches [600, 700) .. [99900, 100000); [100000, 100100) is open.
    assert [(b.seq, b.n) for b in items if isinstance(b, LeftOut)] == [(5, 994)]
    assert not spans[0].escalates
    with pytest.raises(ValueError, match="before the previous frame ended"):
        asm.feed(_frame(41, 100_000, 100_200, []))


# -- the stream over sockets ----------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("factor", [1, 3])
async def test_stream_equals_the_simulated_tagger(
    emulator: Callable[..., EmulatorProcess], factor: int
) -> None:
    """Many frames per batch (64 records) and, with factor 3, batches three sim batches
    long: the driver re-cuts, tag for tag what the simulated tagger yields."""
    emu = emulator("--frame-records", "64")
    validator = BatchValidator("tagger")
    async with _driver(emu, batch_duration_ps=factor * DUR) as tagger:
        assert tagger.channels == (0, 1, 2, 3)
        assert tagger.describe()["idn"].startswith("QNODED,TCP-TAGGER-EMU,")
        got = await collect(tagger, validator, 300 // factor)
        assert tagger.describe()["frames"] > 300  # several frames per batch
    assert not await tagger.ping()  # closed: no answer, and no connection reopened for it
    ref = await reference(300)
    assert validator.missed_batches == 0
    assert sum(len(b) for b in got) > 30_000
    first = ref[0].start_ps
    for b in got:  # batch k covers sim batches [factor k, factor (k+1))
        k = (b.start_ps - first) // DUR
        part = [ref[k + i] for i in range(factor)]
        assert b.start_ps % (factor * DUR) == 0
        np.testing.assert_array_equal(
            b.timestamps_ps, np.concatenate([p.timestamps_ps for p in part])
        )
        np.testing.assert_array_equal(b.channels, np.concatenate([p.channels for p in part]))


@pytest.mark.asyncio
async def test_delays_are_applied_by_the_tagger_and_read_back(
    emulator: Callable[..., EmulatorProcess],
) -> None:
    emu = emulator()
    delays = {1: 5_000, 2: -3_000}
    async with _driver(emu) as tagger:
        for ch, d in delays.items():
            await tagger.set_delay(ch, d)
        assert [tagger.delay(c) for c in tagger.channels] == [0, 5_000, -3_000, 0]
        assert await scpi(emu, "CHAN:DEL? 1", "CHAN:DEL? 2") == ["5000", "-3000"]
        with pytest.raises(TaggerCommandError) as err:
            await tagger.set_delay(3, 2 * 10**9)
        assert "tagger" in str(err.value)
        assert "'CHAN:DEL 3,2000000000' refused: -222" in str(err.value)
        assert tagger.delay(3) == 0  # a refused delay is not taken as set
        with pytest.raises(ValueError, match="no channel 9"):
            await tagger.set_delay(9, 0)
        got = await collect(tagger, BatchValidator("tagger"), 100)
    assert_same(got, await reference(100, delays))
    # and the delays did change the tags
    plain = await reference(100)
    assert not np.array_equal(got[50].timestamps_ps, plain[got[50].seq].timestamps_ps)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("how", "words"),
    [
        (("--fault", "crc@40"), "frame 40: payload CRC"),
        (("--fault", "skip@40"), "frame(s) 40 missing (sequence gap)"),
        (("--fault", "overflow,0.25@40"), "frame 40: overflow"),
        ("overflow", "overflow"),  # by EMU:FAULT, at whatever frame the emulator is at
        ("crc", "payload CRC"),
    ],
)
async def test_lost_tags_leave_their_batch_out_and_are_reported(
    emulator: Callable[..., EmulatorProcess], how: tuple[str, ...] | str, words: str
) -> None:
    """A loss the driver can bound in time costs exactly the batches it touches: they
    are left out (a gap in ``seq``), every other batch is whole and exact."""
    emu = emulator(*how) if isinstance(how, tuple) else emulator()
    validator = BatchValidator("tagger")
    got: list[TagBatch] = []
    seen_at = 0
    with capture_logs() as logs:
        async with _driver(emu) as tagger:
            async for batch in tagger.stream():  # one stream: a reconnect would lose tags too
                got.append(validator.check(batch))
                if len(got) == 5 and isinstance(how, str):
                    await inject(emu, how)
                if not seen_at and tagger.describe()["batches_left_out"]:
                    seen_at = len(got)
                if seen_at and len(got) >= seen_at + 20:  # and the stream goes on
                    break
                assert len(got) < 3000, "no loss was ever seen"
            counts = tagger.describe()
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1
    assert warnings[0]["device"] == "tagger"
    assert words in warnings[0]["what"]
    assert counts["batches_left_out"] == 1  # one frame, inside one batch
    assert validator.missed_batches == 1  # what the node counts as a dropped batch
    lost_seq = next(s for s in range(got[0].seq, got[-1].seq) if s not in {b.seq for b in got})
    span = warnings[0]["span_ps"]
    assert (
        got[0].start_ps + (lost_seq - got[0].seq) * DUR
        <= span[0]
        < span[1]
        <= (got[0].start_ps + (lost_seq - got[0].seq + 1) * DUR)
    )
    assert_same(got, await reference(max(b.seq for b in got) + 1))


@pytest.mark.asyncio
async def test_a_tagger_that_keeps_losing_tags_raises(
    emulator: Callable[..., EmulatorProcess],
) -> None:
    """Losses in ``max_lost_batches`` consecutive batches are a fault the node must
    hear of (an alarm), not a quiet gap: the stream raises."""
    emu = emulator(*(a for k in (10, 11, 12) for a in ("--fault", f"overflow@{k}")))
    validator = BatchValidator("tagger")
    async with _driver(emu, max_lost_batches=3) as tagger:
        with pytest.raises(TaggerDataLossError) as err:
            await collect(tagger, validator, 10**9)
    assert str(err.value).startswith(f"tagger: data {emu.host}:")
    assert "tags lost in 3 consecutive batches (last: frame 12: overflow" in str(err.value)
    assert validator.last_seq == 9  # batches 10, 11, 12 (one frame each) never came


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("fault", "error", "words"),
    [
        ("drop", TaggerConnectionError, "connection closed"),
        ("stall", TaggerTimeoutError, "stream silent for 0.5 s"),
        ("garbage", TaggerFrameError, "bad magic b'\\x00\\xffGA'"),
    ],
)
async def test_a_broken_stream_raises_and_the_next_one_reconnects(
    emulator: Callable[..., EmulatorProcess], fault: str, error: type[TaggerError], words: str
) -> None:
    """What the node does: the stream raises, the node calls ``stream()`` again."""
    emu = emulator()
    validator = BatchValidator("tagger")
    async with _driver(emu, timeout_s=0.5) as tagger:
        before = await collect(tagger, validator, 5)
        await inject(emu, fault)
        t0 = time.monotonic()
        with pytest.raises(error) as err:
            await collect(tagger, validator, 10**9)
        assert time.monotonic() - t0 < 5
        msg = str(err.value)
        assert msg.startswith(f"tagger: data {emu.host}:")  # the device and the connection
        assert words in msg
        assert await tagger.ping()  # control is up again (after a drop: reconnected)
        after = await collect(tagger, validator, 30)
    # Time and seq went on across the reconnect; batches are exact on both sides of it.
    assert after[0].seq > before[-1].seq
    assert validator.missed_batches == after[0].seq - before[-1].seq - 1 + sum(
        1 for a, b in itertools.pairwise(after) if b.seq != a.seq + 1
    )
    assert_same(before + after, await reference(after[-1].seq + 1))


@pytest.mark.asyncio
async def test_an_extra_clock_drift_is_what_the_clock_lock_finds(
    emulator: Callable[..., EmulatorProcess],
) -> None:
    """The driver cannot tell a drifting tagger clock from a true one (it has no
    reference); the node's clock lock does: it finds the extra ppm between the
    simulated tagger and the drifting emulator."""
    emu = emulator("--drift-ppm", "20")
    async with _driver(emu) as tagger:
        got = await collect(tagger, BatchValidator("tagger"), 300)
    ref = await reference(300)
    t_ref = np.concatenate([ref[s].timestamps_ps for s in sorted(ref)])
    t_got = np.concatenate([b.timestamps_ps for b in got])
    offset, drift = kernel.find_offset_drift(
        t_ref, t_got, max_offset_ps=1_000_000_000, resolution_ps=1
    )
    assert drift * 1e6 == pytest.approx(20.0, abs=0.05)
    assert abs(offset - 20e-6 * int(t_ref[0])) < 2  # t -> t (1 + 20 ppm) from tagger time 0


@pytest.mark.asyncio
async def test_control_errors_name_the_device_and_the_command(
    emulator: Callable[..., EmulatorProcess],
) -> None:
    emu = emulator()
    assert await scpi(
        emu, "FOO:BAR 1", "SYST:ERR?", "SYST:ERR?", "EMU:FAULT melt", "SYST:ERR?"
    ) == [
        '-113,"Undefined header; FOO:BAR"',
        '0,"No error"',
        "-224,\"Illegal parameter value; unknown fault 'melt' (one of drop, stall, garbage, crc, "
        'skip, overflow, drift)"',
    ]
    # No tagger there: the connection error names device and address.
    gone = TcpTimeTagger(
        "tagger", {"host": "127.0.0.1", "port": free_port()}, DriverContext("b", "bob", "bb84")
    )
    with pytest.raises(
        TaggerConnectionError, match=r"tagger: control 127\.0\.0\.1:\d+: cannot connect"
    ):
        await gone.__aenter__()

    # A tagger that accepts and never answers: the first round trip times out.
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        silent = TcpTimeTagger(
            "tagger",
            {"host": "127.0.0.1", "port": port, "timeout_s": 0.3},
            DriverContext("b", "bob", "bb84"),
        )
        with pytest.raises(TaggerTimeoutError, match=r"no answer to '\*IDN\?' within 0\.3 s"):
            await silent.__aenter__()


# -- a node on the emulator ------------------------------------------------------------------


def _bb84_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return argparse.Namespace(
        **vars(parser.parse_args([]))
        | {
            "protocol": "bb84",
            "distance_km": 10.0,
            "seed": 5,
            "clock_offset_ps": 250_000_000,
            "drift_ppm": 2.0,
            "pulse_rate_hz": 2e7,
        }
    )


async def _watch(
    broker: tuple[str, int],
    until: Callable[[dict[str, list[dict[str, Any]]]], bool],
    procs: dict[str, subprocess.Popen[Any]],
    logs: Path,
) -> dict[str, list[dict[str, Any]]]:
    """Both nodes' telemetry until ``until(seen)``; fails at once if a process exits."""

    async def alive() -> None:
        while True:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    log = logs / f"{name}.log"
                    tail = log.read_text()[-800:] if log.exists() else ""
                    raise AssertionError(f"{name} exited with {proc.returncode}: {tail}")
            await asyncio.sleep(0.3)

    seen: dict[str, list[dict[str, Any]]] = {"alice": [], "bob": []}
    async with asyncio.timeout(30), asyncio.TaskGroup() as tg:
        guard = tg.create_task(alive())
        async with Subscriber(broker, "qkd/v1/alice/telemetry", "qkd/v1/bob/telemetry") as sub:
            async for msg in sub:
                seen[msg.topic.split("/")[2]].append(msg.payload)
                if until(seen):
                    break
        guard.cancel()
    return seen


def test_bob_on_the_emulator_locks_and_sifts_with_a_simulated_alice(
    tmp_path: Path, mqtt_broker: tuple[str, int]
) -> None:
    """`qnoded run` Bob with the tcp-tagger driver, the emulator running the physics of
    Bob's simulated node, and a simulated Alice (sim-laser) on the same table."""
    args = _bb84_args()
    sim = link_parameters(args)
    broker = f"{mqtt_broker[0]}:{mqtt_broker[1]}"
    peer_port = free_port()
    demo_psk(tmp_path)
    bob_sim = node_config("bob", args, broker, peer_port, tmp_path, sim)
    (tmp_path / "bob-sim.toml").write_text(bob_sim)  # what Bob's node would run on sim drivers
    # Its clock runs 3 ppm faster than the simulation's: the node must see 2 + 3 ppm.
    emu = EmulatorProcess(tmp_path / "bob-sim.toml", "--drift-ppm", "3")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # Bob's node: no simulation and no detectors, only the tagger on the network.
        bob = bob_sim.split("[simulation]")[0] + (
            f'[devices.tagger]\ndriver = "tcp-tagger"\nhost = "{emu.host}"\nport = {emu.port}\n'
            f"batch_duration_ps = {sim['batch_duration_ps']}\n"
        )
        (tmp_path / "bob.toml").write_text(bob)
        alice = node_config("alice", args, broker, peer_port, tmp_path, sim)
        (tmp_path / "alice.toml").write_text(alice)
        procs = [
            spawn_node(tmp_path / f"{r}.toml", tmp_path / f"{r}.log") for r in ("alice", "bob")
        ]
        watched: dict[str, subprocess.Popen[Any]] = {
            "alice": procs[0],
            "bob": procs[1],
            "emulator": emu.proc,
        }

        def sifting(seen: dict[str, list[dict[str, Any]]]) -> bool:
            bits = [t["sifted_bits"] for t in seen["bob"] if t["qber"] is not None]
            return len(bits) >= 3 and bits[-1] > bits[-3] > 0 and bool(seen["alice"])

        tele = asyncio.run(_watch(mqtt_broker, sifting, watched, tmp_path))
        last = tele["bob"][-1]
        assert last["locked"]
        assert last["sifted_bits"] > 1000
        # misalignment 1 % plus dark counts: a few per cent, far from the 25 % of no key
        assert 0.0 < last["qber"] < 0.05
        assert last["rejected_batches"] == 0
        assert last["dropped_batches"] == 0
        # Alice holds the clock model: the simulated 2 ppm plus the emulator's extra 3 ppm.
        assert tele["alice"][-1]["drift_ppm"] == pytest.approx(5.0, abs=0.05)
        assert procs[1].poll() is None
        for p in reversed(procs):
            assert stop_node(p) < 5
            assert p.returncode == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert emu.stop() == 0
