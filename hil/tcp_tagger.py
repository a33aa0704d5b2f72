"""Emulator of a TCP time tagger, fed by the simulated physics (``qnoded_drivers.sim``).

It speaks the wire protocol of ``qnoded_drivers/tcp_tagger.py`` (see that
module's docstring) on a control and a data port, and streams what a
:class:`SimTimeTagger` with the same ``[simulation]`` table yields: the same
tags, cut into frames.  A node running the ``tcp-tagger`` driver against it
sees what a node with ``sim-tagger`` sees, so it locks and sifts with a
simulated Alice that runs the same table.

    python hil/tcp_tagger.py --config bob.toml [--port 0] [--data-port 0]
        [--protocol bb84|bbm92] [--role bob|alice] [--frame-records 4096]
        [--drift-ppm X] [--fault NAME[,ARG][@FRAME]] ...
    python hil/tcp_tagger.py --config bob.toml --source 127.0.0.1:5025 ...
    python hil/tcp_tagger.py --replay bob.npz|bob.ptu [--port 0] ...

With ``--source`` Bob's (BB84) clicks come from the pulses the modulator
emulator at that address plays (hil/visa_modulator.py, followed through
hil/modulator_feed.py), in real time on its slot clock, so a node running the
``visa-modulator`` driver against it is the Alice that Bob makes key with.

With ``--replay`` it streams a recording instead (what the ``replay-tagger``
driver would read from it: as fast as the client takes it, then empty batches
in real time), for the TCP path's benchmark (bench/bench_daemon.py).

``--config`` is a TOML or JSON file with a ``simulation`` table (a node's own
config does: its ``[node]`` gives protocol and role, its ``[devices.*]``
rows of ``sim-spad``/``sim-snspd`` give the detectors, a ``sim-tagger`` row
its channels; without detector rows there are four on channels 0-3).  Once
both ports listen it prints ``READY <host>:<control port>`` on stdout; the
data port is ``STRM:PORT?``.  SIGTERM or SIGINT stops it.

Misbehaviour on request, each once, at the next frame (``EMU:FAULT`` on the
control connection) or at frame ``FRAME`` (``--fault``):

==============  ==============================================================
``drop``        abort the data and every control connection
``stall[,s]``   send nothing for ``s`` seconds (default: until the client
                gives up and closes the data connection)
``garbage[,n]`` send ``n`` (default 56) bytes of junk instead of a frame
``crc``         flip a payload byte (the header and its CRC stay valid)
``skip``        leave a frame out (its sequence number is spent)
``overflow[,f]`` drop a fraction ``f`` (default 0.5) of the next frame that has
                records, and flag it OVERFLOW with the count
``drift,ppm``   from the next batch on, run the clock ``ppm`` faster (added
                to ``--drift-ppm``, which runs it so from the start)
==============  ==============================================================

Frames the emulator cannot deliver (no client, a fault) spend their sequence
numbers, as the protocol asks.  Its tagger's clock runs only while a client
streams; time is the simulation's (``realtime`` in the table paces it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import tomllib
import zlib
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from modulator_feed import ModulatorFeed
from qnoded_drivers.replay import ReplayTagger
from qnoded_drivers.sim.detector import SimSNSPD, SimSPAD
from qnoded_drivers.sim.link import LinkParams
from qnoded_drivers.sim.tagger import _MARGIN_PS, SimTimeTagger, _Cursor
from qnoded_drivers.tcp_tagger import (
    FLAG_OVERFLOW,
    GREETING,
    GREETING_MAGIC,
    HEADER,
    PROTOCOL_VERSION,
    encode_frame,
)

from qnoded.contracts import DriverContext, TagBatch, TimeTagger

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]

DETECTORS: dict[str, type[SimSPAD] | type[SimSNSPD]] = {"sim-spad": SimSPAD, "sim-snspd": SimSNSPD}
FAULTS = ("drop", "stall", "garbage", "crc", "skip", "overflow", "drift")
MAX_DELAY_PS = 10**9  # the emulated inputs' delay range, +-1 ms
ERROR_QUEUE_MAX = 16
# The protocol promises a frame at least every second; one batch is one or more frames.
MAX_REALTIME_BATCH_PS = 500_000_000_000
# --source: clicks are made this far (plus two batches) behind the modulator's
# now, so that what it played there is known (the feed polls every 10 ms).
LAG_S = 0.1


class ScpiError(Exception):
    """An error for the client's queue: an SCPI code and message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code},{message}")
        self.code, self.message = code, message


@dataclass(slots=True)
class Fault:
    name: str
    arg: float | None
    at_frame: int


def parse_fault(text: str, at_frame: int) -> Fault:
    """``NAME[,ARG]``; ``ValueError`` naming what is wrong."""
    name, _, arg = text.strip().partition(",")
    name = name.strip().lower()
    if name not in FAULTS:
        raise ValueError(f"unknown fault {name!r} (one of {', '.join(FAULTS)})")
    value: float | None = None
    if arg.strip():
        value = float(arg)
        if not math.isfinite(value):
            raise ValueError(f"fault {name}: argument {arg!r} is not finite")
    if name == "drift" and (value is None or abs(value) > 1000):
        raise ValueError("fault drift needs an extra rate in ppm, |ppm| <= 1000")
    if name == "overflow" and value is not None and not 0 < value <= 1:
        raise ValueError("fault overflow: the fraction dropped must be in (0, 1]")
    if name in ("stall", "garbage") and value is not None and value <= 0:
        raise ValueError(f"fault {name}: the argument must be > 0")
    return Fault(name, value, at_frame)


class ClockWarp:
    """An extra rate error on top of the simulated clock, continuous when it changes:
    ``t -> out_ref + (t - in_ref) + floor(extra * (t - in_ref))``."""

    def __init__(self, ppm: float) -> None:
        self.extra = ppm * 1e-6
        self.in_ref = self.out_ref = 0

    def __call__(self, t: I64) -> I64:
        if self.extra == 0.0 and self.in_ref == self.out_ref:
            return t
        d = t - np.int64(self.in_ref)
        return (
            np.int64(self.out_ref)
            + d
            + np.floor(self.extra * d.astype(np.float64)).astype(np.int64)
        )

    def at(self, t: int) -> int:
        return int(self(np.array([t], np.int64))[0])

    def change(self, ppm: float, at_ps: int) -> None:
        """Add ``ppm`` from simulated time ``at_ps`` on."""
        self.out_ref, self.in_ref = self.at(at_ps), at_ps
        self.extra += ppm * 1e-6


def frame_spans(
    t: I64, start: int, stop: int, per_frame: int
) -> Iterator[tuple[int, int, int, int]]:
    """Cut a batch ``[start, stop)`` of sorted tags into frames of about ``per_frame``
    records: ``(t0, t1, lo, hi)``.  Cuts fall on tag times, never between two
    tags of one picosecond, so every record lies inside its frame's span."""
    n = int(t.shape[0])
    bounds = np.unique(t[np.arange(per_frame, n, per_frame)]) if n > per_frame else t[:0]
    bounds = bounds[bounds > start]
    cuts = np.searchsorted(t, bounds).tolist()
    edges = [start, *bounds.tolist(), stop]
    idx = [0, *cuts, n]
    for k in range(len(edges) - 1):
        yield edges[k], edges[k + 1], idx[k], idx[k + 1]


@dataclass(eq=False, slots=True)
class DataClient:
    writer: asyncio.StreamWriter
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def abort(self) -> None:
        self.writer.transport.abort()
        self.closed.set()


class Emulator:
    """The emulated tagger: control and data servers and the pump that frames batches."""

    def __init__(
        self,
        tagger: TimeTagger,
        *,
        frame_records: int = 4096,
        drift_ppm: float = 0.0,
        faults: list[Fault] | None = None,
        serial: str = "EMU0001",
    ) -> None:
        self.tagger = tagger
        self.frame_records = frame_records
        self.warp = ClockWarp(drift_ppm)
        self.faults: list[Fault] = list(faults or [])
        self.serial = serial
        self.next_frame = 0
        self.data_port = 0
        self.client: DataClient | None = None
        self.streaming = False
        self.controls: set[asyncio.StreamWriter] = set()
        self._go = asyncio.Event()

    # -- servers -----------------------------------------------------------------------
    async def run(self, host: str, port: int, data_port: int, ready: Callable[[str], None]) -> None:
        """Serve until cancelled."""
        ctrl = await asyncio.start_server(self._control, host, port)
        data = await asyncio.start_server(self._data, host, data_port)
        try:
            async with ctrl, data:
                self.data_port = int(data.sockets[0].getsockname()[1])
                ready(f"READY {host}:{int(ctrl.sockets[0].getsockname()[1])}")
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._pump(), name="pump")
        finally:
            self._abort_all()

    def _abort_all(self) -> None:
        if self.client is not None:
            self.client.abort()
        for w in list(self.controls):
            w.transport.abort()
        self._set_streaming(False)

    def _set_streaming(self, on: bool) -> None:
        self.streaming = on
        if on and self.client is not None:
            self._go.set()
        else:
            self._go.clear()

    async def _data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.client is not None:
            self.client.abort()  # one data connection at a time: the newest wins
        client = DataClient(writer)
        self.client = client
        self._set_streaming(False)
        try:
            writer.write(GREETING.pack(GREETING_MAGIC, PROTOCOL_VERSION, 0))
            await writer.drain()
            while await reader.read(4096):
                pass  # the client sends nothing; EOF means it left
        except OSError:
            pass
        finally:
            client.closed.set()
            if self.client is client:
                self.client = None
                self._set_streaming(False)
            writer.close()

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.controls.add(writer)
        errors: deque[tuple[int, str]] = deque()
        try:
            while line := await reader.readline():
                reply = await self._execute(line.decode("ascii", "replace").strip(), errors)
                if reply is not None:
                    writer.write(reply.encode("ascii") + b"\n")
                    await writer.drain()
        except OSError:
            pass
        finally:
            self.controls.discard(writer)
            writer.close()

    async def _execute(self, line: str, errors: deque[tuple[int, str]]) -> str | None:
        head, _, arg = line.partition(" ")
        head = head.upper()
        query = head.endswith("?")
        if head == "SYST:ERR?":
            code, message = errors.popleft() if errors else (0, "No error")
            return f'{code},"{message}"'
        try:
            return await self._dispatch(head, arg.strip())
        except ScpiError as exc:
            if len(errors) >= ERROR_QUEUE_MAX:
                errors[-1] = (-350, "Queue overflow")
            else:
                errors.append((exc.code, exc.message))
            return "" if query else None

    async def _dispatch(self, head: str, arg: str) -> str | None:
        handlers: dict[str, Callable[[str], Awaitable[str | None]]] = {
            "*IDN?": self._idn,
            "CHAN:LIST?": self._chan_list,
            "CHAN:DEL?": self._delay_query,
            "CHAN:DEL": self._delay_set,
            "STRM:PORT?": self._strm_port,
            "STRM:START": self._strm_start,
            "STRM:STOP": self._strm_stop,
            "STRM:STAT?": self._strm_stat,
            "EMU:FAULT": self._emu_fault,
        }
        handler = handlers.get(head)
        if handler is None:
            raise ScpiError(-113, f"Undefined header; {head}")
        return await handler(arg)

    async def _idn(self, _: str) -> str:
        return f"QNODED,TCP-TAGGER-EMU,{self.serial},{PROTOCOL_VERSION}.0"

    async def _chan_list(self, _: str) -> str:
        return ",".join(map(str, self.tagger.channels))

    async def _delay_query(self, arg: str) -> str:
        return str(self.tagger.delay(_channel(arg, self.tagger.channels)))

    async def _delay_set(self, arg: str) -> None:
        ch_s, _, ps_s = arg.partition(",")
        ch = _channel(ch_s, self.tagger.channels)
        try:
            ps = int(ps_s)
        except ValueError:
            raise ScpiError(-104, f"Data type error; delay {ps_s!r}") from None
        if abs(ps) > MAX_DELAY_PS:
            raise ScpiError(-222, f"Data out of range; |delay| <= {MAX_DELAY_PS} ps")
        await self.tagger.set_delay(ch, ps)

    async def _strm_port(self, _: str) -> str:
        return str(self.data_port)

    async def _strm_start(self, _: str) -> None:
        if self.client is None:
            raise ScpiError(-221, "Settings conflict; no data connection")
        self._set_streaming(True)

    async def _strm_stop(self, _: str) -> None:
        self._set_streaming(False)

    async def _strm_stat(self, _: str) -> str:
        return "1" if self.streaming else "0"

    async def _emu_fault(self, arg: str) -> None:
        try:
            self.faults.append(parse_fault(arg, self.next_frame))
        except ValueError as exc:
            raise ScpiError(-224, f"Illegal parameter value; {exc}") from None

    # -- the stream ----------------------------------------------------------------------
    def _live(self, client: DataClient) -> bool:
        return self.streaming and self.client is client and not client.closed.is_set()

    async def _pump(self) -> None:
        while True:
            await self._go.wait()
            client = self.client
            assert client is not None
            # A new simulated stream per session: it continues the simulation's
            # time and batch sequence, and paces afresh (no burst after a pause).
            batches = cast(AsyncGenerator[TagBatch, None], self.tagger.stream())
            try:
                async for batch in batches:
                    await self._send_batch(batch, client)
                    if not self._live(client):
                        break
            except TimeBaseRestartError as exc:
                sys.stderr.write(f"tcp_tagger: {exc}; dropping the clients\n")
                self._abort_all()
            finally:
                await batches.aclose()

    def _due(self, frame: int, n_records: int) -> list[Fault]:
        due: list[Fault] = []
        keep: list[Fault] = []
        for f in self.faults:
            waits = f.name == "overflow" and n_records == 0  # needs records to drop
            (due if f.at_frame <= frame and not waits and f.name != "drift" else keep).append(f)
        self.faults = keep
        return due

    async def _send_batch(self, batch: TagBatch, client: DataClient) -> None:
        for f in [f for f in self.faults if f.name == "drift" and f.at_frame <= self.next_frame]:
            self.faults.remove(f)
            assert f.arg is not None
            self.warp.change(f.arg, batch.start_ps)
        start, stop = self.warp.at(batch.start_ps), self.warp.at(batch.stop_ps)
        # A slower clock may map a tag next to the end onto the end itself: keep it inside.
        times = np.minimum(self.warp(batch.timestamps_ps), np.int64(stop - 1))
        for t0, t1, lo, hi in frame_spans(times, start, stop, self.frame_records):
            seq = self.next_frame
            self.next_frame += 1
            t, ch = times[lo:hi], batch.channels[lo:hi]
            flags, lost, corrupt, send = 0, 0, False, True
            for fault in self._due(seq, hi - lo):
                if fault.name == "drop":
                    self._abort_all()
                elif fault.name == "stall":
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(fault.arg):
                            await client.closed.wait()
                elif fault.name == "garbage" and self._live(client):
                    junk = b"\x00\xffGARBAGE" + os.urandom(int(fault.arg or 56))
                    await self._write(client, junk)
                    send = False
                elif fault.name == "skip":
                    send = False
                elif fault.name == "crc":
                    corrupt = True
                elif fault.name == "overflow":
                    rng = np.random.default_rng(seq)
                    keep = np.asarray(rng.random(int(t.shape[0])) >= (fault.arg or 0.5), bool)
                    keep[0] = False  # at least one record is lost
                    t, ch = t[keep], ch[keep]
                    flags, lost = FLAG_OVERFLOW, int(np.count_nonzero(~keep))
            if not send or not self._live(client):
                continue  # not delivered: its sequence number stays spent
            data = encode_frame(seq, t0, t1, t, ch, flags=flags, lost=lost)
            if corrupt:
                data = _corrupt(data)
            await self._write(client, data)

    async def _write(self, client: DataClient, data: bytes) -> None:
        try:
            client.writer.write(data)
            await client.writer.drain()
        except OSError:
            client.abort()
            if self.client is client:
                self._set_streaming(False)


def _corrupt(frame: bytes) -> bytes:
    """Flip a payload byte, or the payload CRC of an empty frame; the header CRC,
    which covers the payload CRC field, is left as it was computed."""
    data = bytearray(frame)
    at = HEADER.size + (len(data) - HEADER.size) // 2 if len(data) > HEADER.size else 40
    data[at] ^= 0xFF
    if at == 40:  # the payload CRC field: fix the header CRC so only the payload check fails
        data[44:48] = zlib.crc32(bytes(data[:44])).to_bytes(4, "little")
    return bytes(data)


def _channel(text: str, chans: tuple[int, ...]) -> int:
    try:
        ch = int(text)
    except ValueError:
        raise ScpiError(-104, f"Data type error; channel {text!r}") from None
    if ch not in chans:
        raise ScpiError(-222, f"Data out of range; no channel {ch}")
    return ch


# -- building the simulated tagger -----------------------------------------------------------
class FollowingTagger(SimTimeTagger):
    """Bob's simulated tagger on the fibre from the modulator emulator (``--source``).

    True time is the modulator's slot clock (slot ``k`` leaves at ``k * period_ps``,
    see hil/modulator_feed.py), paced by the wall clock.  Every stream starts at
    the modulator's now less ``lag_s``, and stays that far behind: clicks are made
    only for slots whose emission the feed already knows.
    """

    def __init__(
        self,
        name: str,
        options: Mapping[str, Any],
        context: DriverContext,
        feed: ModulatorFeed,
        lag_s: float,
    ) -> None:
        super().__init__(name, options, context)
        self._feed = feed
        self._lag_ps = int(lag_s * 1e12)
        self._link.source = feed

    def describe(self) -> Mapping[str, Any]:
        return {**super().describe(), "follows": f"{self._feed.host}:{self._feed.port}"}

    def _new_cursor(self) -> _Cursor:
        dur = self._link.p.batch_duration_ps
        t0 = self._feed.now_slot() * self._feed.period_ps - self._lag_ps
        start = -(-int(self.to_clock(np.array([t0], np.int64))[0]) // dur) * dur
        self._link.reset()
        return _Cursor(start=start, gen_until=self.to_true(start) - dur - _MARGIN_PS)

    async def stream(self) -> AsyncIterator[TagBatch]:
        """From the modulator's now, on its clock as it is; ends with
        :class:`TimeBaseRestartError` when that clock is re-anchored."""
        epoch = self._feed.clock_epoch
        if self._link.p.pulse_rate_hz != self._feed.freq_hz:
            self._link.p = dataclasses.replace(self._link.p, pulse_rate_hz=self._feed.freq_hz)
        self._cursor = None  # the tagger's clock ran on while no one read it
        async for batch in super().stream():
            if self._feed.clock_epoch != epoch:
                why = f"modulator's slot clock re-anchored: {self._feed.clock}"
                raise TimeBaseRestartError(why)
            yield batch


class TimeBaseRestartError(Exception):
    """The tagger's time base restarts (``--source``: the modulator's clock changed):
    its clients are dropped and the next stream begins on the new clock."""


def load_config(path: Path) -> dict[str, Any]:
    text = path.read_text()
    doc: Any = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    if not isinstance(doc, dict) or not isinstance(doc.get("simulation"), dict):
        raise ValueError(f"{path}: needs a 'simulation' table")
    return doc


def build_tagger(
    doc: Mapping[str, Any],
    protocol: str | None,
    role: str | None,
    feed: ModulatorFeed | None = None,
) -> tuple[SimTimeTagger, list[Any]]:
    """The simulated tagger and detectors a node with this config would have; with a
    ``feed``, Bob's BB84 tagger on the fibre from the modulator emulator, in real
    time (at the modulator's pulse rate: each stream takes it, see FollowingTagger)."""
    node = doc.get("node", {})
    simulation = dict(doc["simulation"])
    if feed is not None:
        simulation["realtime"] = True
    ctx = DriverContext(
        node_id="tcp-tagger-emulator",
        role=role or node.get("role", "bob"),
        protocol=protocol or node.get("protocol", "bb84"),
        simulation=simulation,
    )
    if feed is not None and (ctx.protocol, ctx.role) != ("bb84", "bob"):
        raise ValueError("--source: the fibre from Alice's modulator reaches Bob's BB84 tagger")
    rows = {
        name: dict(row) for name, row in doc.get("devices", {}).items() if isinstance(row, dict)
    }
    tagger_opts: dict[str, Any] = {}
    detectors: list[Any] = []
    for name, row in rows.items():
        driver = row.pop("driver", None)
        if driver in DETECTORS:
            detectors.append(DETECTORS[driver](name, row, ctx))
        elif driver == "sim-tagger":
            tagger_opts = row
    tagger: SimTimeTagger
    if feed is not None:
        dur_s = LinkParams.from_mapping(simulation).batch_duration_ps * 1e-12
        tagger = FollowingTagger("emulated", tagger_opts, ctx, feed, LAG_S + 2 * dur_s)
    else:
        tagger = SimTimeTagger("emulated", tagger_opts, ctx)
    if not detectors:
        kind = SimSPAD if ctx.protocol == "bb84" else SimSNSPD
        detectors = [kind(f"det{ch}", {"channel": ch}, ctx) for ch in tagger.channels[:4]]
    return tagger, detectors


async def serve(args: argparse.Namespace) -> int:
    tagger: TimeTagger
    detectors: list[Any] = []
    feed: ModulatorFeed | None = None
    if args.replay is not None:
        ctx = DriverContext(node_id="tcp-tagger-emulator", role="bob", protocol="bbm92")
        tagger = ReplayTagger("emulated", {"file": args.replay}, ctx)
    else:
        doc = load_config(Path(args.config))
        if args.source is not None:
            host, _, port = args.source.rpartition(":")
            feed = ModulatorFeed(host or "127.0.0.1", int(port))
            try:
                await feed.connect_once()
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                raise OSError(
                    f"--source {args.source}: no modulator emulator there: {exc}"
                ) from exc
        tagger, detectors = build_tagger(doc, args.protocol, args.role, feed)
        p = doc["simulation"]
        if p.get("realtime", False) and p.get("batch_duration_ps", 10**10) > MAX_REALTIME_BATCH_PS:
            raise ValueError("realtime batches longer than 0.5 s would break the 1 s heartbeat")
    faults = []
    for text in args.fault:
        spec, _, at = text.partition("@")
        faults.append(parse_fault(spec, int(at) if at else 0))
    emulator = Emulator(
        tagger,
        frame_records=args.frame_records,
        drift_ppm=args.drift_ppm,
        faults=faults,
        serial=args.serial,
    )
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)

    def ready(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    async with contextlib.AsyncExitStack() as stack:
        for device in [*detectors, tagger]:
            await stack.enter_async_context(device)
        with contextlib.suppress(asyncio.CancelledError):
            async with asyncio.TaskGroup() as tg:
                if feed is not None:
                    tg.create_task(feed.run(), name="modulator-feed")
                tg.create_task(emulator.run(args.host, args.port, args.data_port, ready))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="TOML or JSON with a simulation table")
    source.add_argument("--replay", help="a recording (.npz or .ptu) to stream instead")
    parser.add_argument(
        "--source",
        metavar="HOST:PORT",
        help="with --config: Bob's clicks from what hil/visa_modulator.py there plays",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="control port (0: any free one)")
    parser.add_argument("--data-port", type=int, default=0, help="data port (0: any free one)")
    parser.add_argument("--protocol", choices=["bb84", "bbm92"], default=None)
    parser.add_argument("--role", choices=["alice", "bob"], default=None)
    parser.add_argument("--frame-records", type=int, default=4096)
    parser.add_argument("--drift-ppm", type=float, default=0.0, help="extra clock rate error")
    parser.add_argument("--serial", default="EMU0001")
    parser.add_argument(
        "--fault", action="append", default=[], metavar="NAME[,ARG][@FRAME]", help="misbehave"
    )
    args = parser.parse_args(argv)
    try:
        return asyncio.run(serve(args))
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"tcp_tagger: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
