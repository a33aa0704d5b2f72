"""Fuzzing the TCP time tagger's wire protocol (``qnoded_drivers.tcp_tagger``): frame
headers, records, the sequence of frames cut into batches, and the control replies.

Inputs: valid frames (encoded by the module's own ``encode_frame``) with their bytes
mutated; sequences of frames with gaps, overflows, bad CRCs, overlaps and restarts; spans
from one picosecond to the whole int64 range; and a whole tagger in process (control and
data connections on localhost) whose replies and stream are fuzzed, read through the
driver's ``stream()``.  The driver yields batches that keep the TagBatch contract or raises
its :class:`TaggerError`, naming the device, the connection and the frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import struct
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fuzzing import bounded, budget, mutated, refused
from hypothesis import example, given
from hypothesis import strategies as st
from qnoded_drivers import tcp_tagger
from qnoded_drivers.tcp_tagger import (
    FLAG_OVERFLOW,
    GREETING,
    GREETING_MAGIC,
    HEADER,
    MAX_RECORDS,
    RECORD,
    Assembler,
    Frame,
    LeftOut,
    TaggerError,
    TcpTimeTagger,
    decode_header,
    decode_records,
    encode_frame,
)

from qnoded.contracts import DriverContext, TagBatch

CHANNELS = frozenset({0, 1, 2, 3})
DURATION = 1_000_000  # ps: the smallest batch_duration_ps the driver takes
INT64 = st.integers(-(2**63), 2**63 - 1)


@st.composite
def frame_parts(draw: st.DrawFn, t0: int | None = None) -> dict[str, Any]:
    """One frame's fields; records ascending inside [t0, t1), on known channels (mostly)."""
    t0 = draw(st.integers(-(10**12), 10**12)) if t0 is None else t0
    # Mostly a few batches; sometimes far more than a frame may span (MAX_FRAME_BATCHES).
    span = draw(st.one_of(st.integers(0, 5 * DURATION), st.sampled_from([2**31, 2**40, 2**62])))
    t1 = min(t0 + span, 2**63 - 1)
    n = draw(st.integers(0, 8)) if span else 0
    times = sorted(draw(st.lists(st.integers(t0, max(t0, t1 - 1)), min_size=n, max_size=n)))
    chans = draw(st.lists(st.sampled_from([0, 1, 2, 3, 3, 200]), min_size=n, max_size=n))
    return {
        "seq": draw(st.integers(0, 2**64 - 1)),
        "t0_ps": t0,
        "t1_ps": t1,
        "times_ps": np.array(times, dtype=np.int64),
        "channels": np.array(chans, dtype=np.uint8),
        "flags": draw(st.sampled_from([0, 0, 0, FLAG_OVERFLOW])),
        "lost": draw(st.integers(0, 2**32 - 1)),
    }


def encode(p: dict[str, Any]) -> bytes:
    return encode_frame(
        p["seq"],
        p["t0_ps"],
        p["t1_ps"],
        p["times_ps"],
        p["channels"],
        flags=p["flags"],
        lost=p["lost"],
    )


def raw_header(**fields: int) -> bytes:
    """A header with any field values and a correct header CRC."""
    values = {
        "magic": 0,
        "version": 1,
        "flags": 0,
        "seq": 0,
        "t0": 0,
        "t1": 0,
        "count": 0,
        "lost": 0,
        "pcrc": 0,
    } | fields
    head = HEADER.pack(
        tcp_tagger.FRAME_MAGIC,
        values["version"],
        values["flags"],
        0,
        values["seq"],
        values["t0"],
        values["t1"],
        values["count"],
        values["lost"],
        values["pcrc"],
        0,
    )[:-4]
    return head + struct.pack("<I", zlib.crc32(head))


def decode(data: bytes) -> Frame:
    """The driver's reading of one frame: header, then exactly the records it declares."""
    head = decode_header(data[: HEADER.size])
    payload = data[HEADER.size :]
    if len(payload) != head.count * RECORD.itemsize:
        raise ValueError(f"{len(payload)} payload bytes for {head.count} records")
    return decode_records(head, payload, CHANNELS)


@budget(100)
@given(frame_parts())
def test_frame_round_trip(p: dict[str, Any]) -> None:
    data = encode(p)
    try:
        frame = decode(data)
    except ValueError as exc:  # only the unknown channel 200 is refused
        assert 200 in p["channels"].tolist(), exc
        assert "unknown channel" in str(exc)
        return
    assert (frame.seq, frame.t0_ps, frame.t1_ps, frame.flags, frame.lost) == (
        p["seq"],
        p["t0_ps"],
        p["t1_ps"],
        p["flags"],
        p["lost"],
    )
    assert frame.payload_ok
    np.testing.assert_array_equal(frame.times_ps, p["times_ps"])
    np.testing.assert_array_equal(frame.channels, p["channels"])


@budget(150)
@given(
    st.one_of(
        frame_parts().map(encode).flatmap(mutated),
        st.binary(max_size=HEADER.size + 20),
        st.builds(
            raw_header,
            version=st.integers(0, 255),
            flags=st.integers(0, 255),
            t0=INT64,
            t1=INT64,
            count=st.integers(0, 2**32 - 1),
        ),
    )
)
@example(raw_header(count=MAX_RECORDS + 1))
@example(raw_header(t0=5, t1=4))
@example(b"QTTF")  # a short header: struct.error leaked out
def test_any_frame_bytes(data: bytes) -> None:
    """decode_header/decode_records: a frame, or a ValueError saying which field is wrong
    (the driver turns it into TaggerFrameError naming the device and frame)."""
    try:
        with bounded("decode"):
            frame = decode(data)
    except Exception as exc:  # noqa: BLE001 - the property is about which exception
        assert type(exc) is ValueError, repr(exc)
        assert str(exc).strip()
        return
    assert frame.t0_ps <= frame.t1_ps
    if frame.payload_ok and frame.times_ps.shape[0]:
        assert np.all(np.diff(frame.times_ps) >= 0)
        assert frame.t0_ps <= frame.times_ps[0] and frame.times_ps[-1] < frame.t1_ps


# -- frames in, batches out ---------------------------------------------------------------


@st.composite
def frame_sequences(draw: st.DrawFn) -> list[Frame]:
    """Tiled frames with the faults the protocol names: gaps, holes, overflow, bad CRC,
    overlaps, seq going back, spans far longer than a batch."""
    frames: list[Frame] = []
    t, seq = draw(st.integers(-(10**10), 10**10)), draw(st.integers(0, 2**40))
    for _ in range(draw(st.integers(1, 8))):
        if t > 2**61:  # the next frame would leave int64
            break
        p = draw(frame_parts(t0=t))
        fault = draw(st.sampled_from(["", "", "", "gap", "hole", "crc", "overlap", "back"]))
        seq += {"gap": draw(st.integers(2, 5)), "back": -draw(st.integers(1, 3))}.get(fault, 1)
        t0 = p["t0_ps"] + {
            "hole": draw(st.integers(1, 3 * DURATION)),
            "overlap": -draw(st.integers(1, DURATION)),
        }.get(fault, 0)
        times = p["times_ps"] + (t0 - p["t0_ps"])
        ok = fault != "crc" and 200 not in p["channels"].tolist()
        frames.append(
            Frame(
                max(seq, 0),
                t0,
                p["t1_ps"] + (t0 - p["t0_ps"]),
                p["flags"],
                p["lost"],
                times if ok else np.empty(0, np.int64),
                p["channels"] if ok else np.empty(0, np.uint8),
                ok,
            )
        )
        t = frames[-1].t1_ps
    return frames


def check_batches(
    items: list[TagBatch | LeftOut], duration: int, *, left_out_listed: bool = True
) -> None:
    for item in items:
        if isinstance(item, LeftOut):
            assert item.n >= 1 and item.spans
            continue
        assert item.stop_ps - item.start_ps == duration and item.start_ps % duration == 0
        t = item.timestamps_ps
        assert t.dtype == np.int64 and item.channels.dtype == np.uint8
        assert t.shape == item.channels.shape
        assert np.all(np.diff(t) >= 0)
        assert np.all((t >= item.start_ps) & (t < item.stop_ps))
        assert set(item.channels.tolist()) <= CHANNELS
    seqs = [(i.seq, i.n if isinstance(i, LeftOut) else 1) for i in items]
    for (s0, n0), (s1, _) in itertools.pairwise(seqs):
        # With the batches left out listed, seq counts on; without, it skips them.
        assert s1 == s0 + n0 if left_out_listed else s1 >= s0 + n0


@budget(80)
@given(frame_sequences(), st.sampled_from([DURATION, 3 * DURATION, 10**10]))
@example(
    [Frame(0, 0, 2**62, 0, 0, np.empty(0, np.int64), np.empty(0, np.uint8), True)], DURATION
)  # one empty frame spanning 4.6e12 batches: cut one by one, it never ends
def test_assembler_cuts_any_frame_sequence(frames: list[Frame], duration: int) -> None:
    asm = Assembler(duration, CHANNELS)
    items: list[TagBatch | LeftOut] = []
    with bounded("Assembler.feed"):
        for frame in frames:
            try:
                got, _spans = asm.feed(frame)
            except ValueError as exc:  # _TaggerRestartedError too; the driver wraps both
                assert str(exc).strip()
                asm.restart()
                continue
            items += got
    check_batches(items, duration)


# -- the whole driver against a tagger in process -----------------------------------------------

GOOD_REPLIES = {
    "*IDN?": b"Fuzz,Tagger,F1,1.0",
    "SYST:ERR?": b'0,"No error"',
    "CHAN:LIST?": b"0,1,2,3",
    "CHAN:DEL?": b"0",
}
CLOSE = b"<close>"
reply_values = st.one_of(
    st.sampled_from(
        [
            b"",
            b"0",
            b"-1",
            b"70000",
            b"99999999999999999999",
            b"0,1,1",
            b"0,256",
            b"a,b,c",
            b'-113,"Undefined header"',
            b"\xff\xfe",
            CLOSE,
            b"1_0",
        ]
    ),
    st.binary(max_size=12).filter(lambda b: b"\n" not in b),
)


@st.composite
def taggers(draw: st.DrawFn) -> tuple[dict[str, bytes | None], bytes]:
    """Control replies (some changed; STRM:PORT? None: the real data port) and the data
    stream: a greeting and frames, tiled, then a few bytes mutated."""
    replies: dict[str, bytes | None] = {**GOOD_REPLIES, "STRM:PORT?": None}
    for key in draw(st.lists(st.sampled_from([*GOOD_REPLIES, "STRM:PORT?"]), max_size=2)):
        replies[key] = draw(reply_values)
    stream = GREETING.pack(GREETING_MAGIC, 1, 0)
    t, seq = draw(st.integers(-(10**9), 10**9)), draw(st.integers(0, 2**40))
    for _ in range(draw(st.integers(0, 6))):
        if t > 2**61:  # the next frame would leave int64
            break
        p = draw(frame_parts(t0=t))
        p["seq"] = seq
        stream += encode(p)
        t, seq = p["t1_ps"], seq + draw(st.sampled_from([1, 1, 1, 2]))
    if draw(st.booleans()):
        stream = draw(mutated(stream, max_edits=3))
    return replies, stream


@asynccontextmanager
async def fake_tagger(replies: dict[str, bytes | None], stream: bytes) -> AsyncIterator[int]:
    """Control and data servers on localhost; yields the control port."""

    async def data(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(stream)
        with contextlib.suppress(OSError):
            await w.drain()
        w.close()

    data_server = await asyncio.start_server(data, "127.0.0.1", 0)
    data_port = str(data_server.sockets[0].getsockname()[1]).encode()

    async def control(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while line := (await r.readline()).strip().decode("ascii", "replace"):
                if not line.endswith("?") and not line.startswith("CHAN:DEL?"):
                    continue  # a command: its outcome is read with SYST:ERR?
                key = "CHAN:DEL?" if line.startswith("CHAN:DEL?") else line
                reply = replies.get(key, b"")
                if reply is None:
                    reply = data_port
                if reply == CLOSE:
                    break
                w.write(reply + b"\n")
                await w.drain()
        w.close()

    control_server = await asyncio.start_server(control, "127.0.0.1", 0)
    try:
        yield control_server.sockets[0].getsockname()[1]
    finally:
        for server in (control_server, data_server):
            server.close()
            await server.wait_closed()


@budget(30)
@given(taggers())
@example(({**GOOD_REPLIES, "STRM:PORT?": b"70000"}, b""))  # OverflowError leaked from connect
@example(({**GOOD_REPLIES, "STRM:PORT?": b"0"}, b""))
@example(
    (
        {**GOOD_REPLIES, "STRM:PORT?": None},
        GREETING.pack(GREETING_MAGIC, 1, 0)
        + encode_frame(0, 0, 2**31, np.empty(0, np.int64), np.empty(0, np.uint8))
        + encode_frame(2, 2**31, 2**31 + 1, np.empty(0, np.int64), np.empty(0, np.uint8)),
    )
)  # a seq gap: batch 2147 is left out, and the driver's seq skips it
def test_driver_reads_any_tagger(tagger: tuple[dict[str, bytes | None], bytes]) -> None:
    replies, stream = tagger

    async def run() -> list[TagBatch]:
        batches: list[TagBatch] = []
        async with fake_tagger(replies, stream) as port:
            options = {
                "host": "127.0.0.1",
                "port": port,
                "batch_duration_ps": DURATION,
                "timeout_s": 0.5,
                "max_lost_batches": 3,
            }
            device = TcpTimeTagger("tagger0", options, DriverContext("fuzz", "bob", "bb84"))
            try:
                async with device:
                    async for batch in device.stream():
                        batches.append(batch)
            except Exception as exc:  # noqa: BLE001 - the property is about which exception
                text = refused(exc, TaggerError)
                assert "tagger0" in text and ("control" in text or "data" in text), text
        return batches

    with bounded("TcpTimeTagger.stream", 20.0):
        batches = asyncio.run(run())
    check_batches(list(batches), DURATION, left_out_listed=False)


def _channels(reply: str) -> tuple[int, ...]:
    return tcp_tagger._parse_channels(reply, "t")


@budget(100)
@given(
    st.one_of(
        st.text(max_size=20),
        st.lists(st.integers(-5, 300), max_size=5).map(lambda v: ",".join(map(str, v))),
    )
)
def test_channel_list_reply(reply: str) -> None:
    try:
        chans = _channels(reply)
    except Exception as exc:  # noqa: BLE001 - the property is about which exception
        text = refused(exc, tcp_tagger.TaggerCommandError)
        assert "CHAN:LIST?" in text
        return
    assert chans and len(set(chans)) == len(chans) and all(0 <= c < 256 for c in chans)
