"""The classical channel: framing, array payloads, fuzzing, handshake, reconnect."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import struct
import tracemalloc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from qnoded import peer
from qnoded.peer import (
    HEADER,
    MAX_FRAME,
    Frame,
    FrameError,
    MsgType,
    PeerChannel,
    PeerClosedError,
    PeerLink,
    SessionAuthenticator,
    decode_arrays,
    decode_frame,
    encode_arrays,
    encode_frame,
)

T = 5.0  # bound on every wait in these tests


def raw_header(
    *,
    magic: bytes = b"QKDP",
    version: int = 1,
    mtype: int = 8,
    flags: int = 0,
    mac_len: int = 0,
    seq: int = 0,
    length: int = 0,
) -> bytes:
    return HEADER.pack(magic, version, mtype, flags, mac_len, seq, length)


# -- frames --------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(MsgType))
def test_frame_round_trip(kind: MsgType) -> None:
    payload = bytes(range(256)) * 3
    data = encode_frame(kind, 7, payload)
    assert len(data) == HEADER.size + len(payload)
    # The header is the brief's ">4sBBHII": flags and mac_len share the H.
    assert struct.unpack(">4sBBHII", data[:16]) == (b"QKDP", 1, int(kind), 0, 7, len(payload))
    frame, used = decode_frame(data + b"next frame")
    assert used == len(data)
    assert frame == Frame(kind, 7, payload)


@pytest.mark.parametrize(
    ("header", "words"),
    [
        (raw_header(magic=b"HTTP"), "bad magic"),
        (raw_header(version=2), "version 2"),
        (raw_header(mtype=0), "unknown message type 0"),
        (raw_header(mtype=200), "unknown message type 200"),
        (raw_header(length=MAX_FRAME + 1), "exceeds MAX_FRAME"),
        (raw_header(length=0xFFFFFFFF), "exceeds MAX_FRAME"),
        (raw_header(flags=0x80), "reserved flag bits"),
        (raw_header(flags=1, mac_len=0), "disagree"),
        (raw_header(flags=0, mac_len=16), "disagree"),
        (raw_header(flags=1, mac_len=16), "no authentication configured"),
    ],
)
def test_bad_headers_name_the_field(header: bytes, words: str) -> None:
    with pytest.raises(FrameError, match=words):
        decode_frame(header + b"\0" * 16)


def test_truncated_frames() -> None:
    data = encode_frame(MsgType.TAGS, 0, b"x" * 100)
    for cut in (0, 5, HEADER.size - 1):
        with pytest.raises(FrameError, match="header truncated"):
            decode_frame(data[:cut])
    for cut in (HEADER.size, HEADER.size + 50, len(data) - 1):
        with pytest.raises(FrameError, match="TAGS frame truncated"):
            decode_frame(data[:cut])


def test_oversize_payload_refused_on_send() -> None:
    with pytest.raises(FrameError, match="MAX_FRAME"):
        encode_frame(MsgType.TAGS, 0, bytes(MAX_FRAME + 1))


class ToyMac:
    """HMAC-SHA256 cut to 16 bytes: stands in for a Wegman-Carter tag."""

    tag_len = 16

    def __init__(self, key: bytes) -> None:
        self.key = key

    def tag(self, data: bytes) -> bytes:
        return hmac.new(self.key, data, hashlib.sha256).digest()[:16]

    def verify(self, data: bytes, tag: bytes) -> bool:
        return hmac.compare_digest(self.tag(data), tag)


def test_mac_trailer_fits_without_header_change() -> None:
    mac = ToyMac(b"k" * 32)
    data = encode_frame(MsgType.SIFT, 3, b"payload", authenticator=mac)
    assert len(data) == HEADER.size + 7 + 16
    assert data[6:8] == bytes([peer.FLAG_MAC, 16])
    frame, used = decode_frame(data, authenticator=mac)
    assert (frame.payload, used) == (b"payload", len(data))
    tampered = bytearray(data)
    tampered[HEADER.size] ^= 1
    with pytest.raises(FrameError, match="MAC check failed"):
        decode_frame(tampered, authenticator=mac)
    with pytest.raises(FrameError, match="no authentication configured"):
        decode_frame(data)
    with pytest.raises(FrameError, match="mac_len 0"):
        decode_frame(encode_frame(MsgType.SIFT, 3, b"x"), authenticator=mac)


# -- array payloads ------------------------------------------------------------
def test_arrays_round_trip() -> None:
    rng = np.random.default_rng(1)
    arrays: dict[str, Any] = {
        "t_ps": rng.integers(-(2**62), 2**62, 1000, dtype=np.int64),
        "basis": rng.integers(0, 2, 1000).astype(np.uint8),
        "qber": rng.random((3, 4)),
        "seq": np.array(5, dtype=np.int64),  # 0-d
        "empty": np.zeros((0, 3), dtype=np.uint8),
        "big_endian": np.arange(10, dtype=">i8"),
        "strided": np.arange(20, dtype=np.float64)[::2],
        "ünïcode": np.ones(2),
    }
    out = decode_arrays(encode_arrays(arrays))
    assert list(out) == list(arrays)
    for name, a in arrays.items():
        b = out[name]
        assert b.shape == a.shape
        assert b.dtype.kind == a.dtype.kind and b.dtype.isnative
        assert b.flags.writeable
        np.testing.assert_array_equal(a, b)


def test_arrays_layout_is_little_endian() -> None:
    data = encode_arrays({"x": np.array([1, 2], dtype=np.int64)})
    assert data == (
        b"\x01\x00"  # count
        + b"\x01x"  # name
        + b"\x01\x01"  # dtype int64, ndim 1
        + struct.pack("<Q", 2)  # shape
        + struct.pack("<2q", 1, 2)
    )


@pytest.mark.parametrize("dtype", [np.bool_, np.int32, np.float32, np.uint16, np.complex128])
def test_encode_rejects_dtypes_outside_allow_list(dtype: Any) -> None:
    with pytest.raises(FrameError, match="'bad': dtype"):
        encode_arrays({"ok": np.zeros(2), "bad": np.zeros(2, dtype=dtype)})


def _one(name: bytes, code: int, shape: tuple[int, ...], data: bytes) -> bytes:
    return (
        b"\x01\x00"
        + bytes([len(name)])
        + name
        + bytes([code, len(shape)])
        + struct.pack(f"<{len(shape)}Q", *shape)
        + data
    )


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (b"", "array count truncated"),
        (b"\x01\x00", "array 0: name length truncated"),
        (b"\x01\x00\x09ab", "array 0: name truncated"),
        (b"\x01\x00\x02\xff\xfe\x01\x01", "array 0: name is not UTF-8"),
        (_one(b"x", 9, (1,), b"\0" * 8), "'x': unknown dtype code 9"),
        (_one(b"x", 1, (3,), b"\0" * 16), r"'x': data \(int64\[3\]\) truncated"),
        (_one(b"x", 1, (2**20, 2**20), b""), "'x': data .* truncated"),
        (_one(b"x", 2, (1,) * 9, b"\0"), "'x': ndim 9"),
        (_one(b"x", 3, (0, 0, 2**60), b""), "'x': shape .* dimension > MAX_FRAME"),
        (_one(b"x", 2, (2,), b"\0\0")[:-6], "'x': shape truncated"),
        (_one(b"x", 2, (1,), b"\0\0"), "1 trailing bytes"),
        (b"\x02\x00" + _one(b"x", 2, (1,), b"\0")[2:] * 2, "'x': name appears twice"),
    ],
)
def test_decode_arrays_errors_name_the_field(payload: bytes, words: str) -> None:
    with pytest.raises(FrameError, match=words):
        decode_arrays(payload)


# -- fuzzing -------------------------------------------------------------------
_header_prefix = st.builds(
    lambda mtype, flags, mac_len, seq, length: raw_header(
        mtype=mtype, flags=flags, mac_len=mac_len, seq=seq, length=length
    ),
    st.integers(0, 255),
    st.sampled_from([0, 1, 2, 0x80]),
    st.integers(0, 255),
    st.integers(0, 2**32 - 1),
    st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)),
)
_frame_bytes = st.one_of(
    st.binary(max_size=512),
    st.tuples(_header_prefix, st.binary(max_size=512)).map(lambda t: t[0] + t[1]),
)


def _bounded(fn: Any, data: bytes) -> None:
    """Run fn(data): only FrameError may escape, and at most 1 MiB is allocated."""
    tracemalloc.start()
    try:
        fn(data)
    except FrameError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 1 << 20, f"decoder allocated {peak} bytes for {len(data)} input bytes"


@settings(max_examples=300, deadline=None)
@given(_frame_bytes)
def test_fuzz_frame_decoder_only_frame_errors(data: bytes) -> None:
    _bounded(decode_frame, data)


_array_bytes = st.one_of(
    st.binary(max_size=512),
    # Plausible headers (any count, dtype code, shape up to 2**64) over random data.
    st.builds(
        lambda n, name, code, shape, tail: struct.pack("<H", n) + _one(name, code, shape, tail)[2:],
        st.integers(0, 3),
        st.binary(max_size=4),
        st.integers(0, 4),
        st.lists(st.one_of(st.integers(0, 8), st.integers(0, 2**64 - 1)), max_size=3).map(tuple),
        st.binary(max_size=64),
    ),
)


@settings(max_examples=300, deadline=None)
@given(_array_bytes)
def test_fuzz_array_decoder_only_frame_errors(data: bytes) -> None:
    _bounded(decode_arrays, data)


# -- channels over real TCP ----------------------------------------------------
@asynccontextmanager
async def tcp_pair(
    make_auth: Callable[[], SessionAuthenticator] | None = None,
) -> AsyncIterator[tuple[PeerChannel, asyncio.StreamReader, asyncio.StreamWriter]]:
    """A PeerChannel (server side) and the raw client streams talking to it.

    ``make_auth`` gives the channel its authenticator when the client connects.
    """
    accepted: asyncio.Queue[PeerChannel] = asyncio.Queue()

    def on_client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        auth = make_auth() if make_auth is not None else None
        accepted.put_nowait(PeerChannel(r, w, authenticator=auth))

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    ch = await asyncio.wait_for(accepted.get(), T)
    try:
        yield ch, reader, writer
    finally:
        await ch.close()
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def channel_pair() -> AsyncIterator[tuple[PeerChannel, PeerChannel]]:
    async with tcp_pair() as (a, r, w):
        b = PeerChannel(r, w)
        try:
            yield a, b
        finally:
            await b.close()


@pytest.mark.asyncio
async def test_channel_round_trip_and_counters() -> None:
    async with channel_pair() as (a, b):
        arrays = {"bits": np.arange(100, dtype=np.uint8), "t": np.arange(5, dtype=np.int64)}
        await b.send_arrays(MsgType.TAGS, arrays)
        await b.send_json(MsgType.LOCK, {"offset_ps": 12})
        await b.send(MsgType.PING, b"")
        f1, f2, f3 = [await a.recv(timeout=T) for _ in range(3)]
        assert (f1.msg_type, f1.seq) == (MsgType.TAGS, 0)
        np.testing.assert_array_equal(f1.arrays()["bits"], arrays["bits"])
        assert f2.json() == {"offset_ps": 12}
        assert (f3.msg_type, f3.seq, f3.payload) == (MsgType.PING, 2, b"")
        assert b.sent_frames == {"TAGS": 1, "LOCK": 1, "PING": 1}
        assert b.disclosed_bytes == a.received_bytes == sum(a.recv_bytes.values())
        assert b.sent_bytes["PING"] == HEADER.size
        assert a.recv_frames == b.sent_frames
        assert a.disclosed_bytes == 0


@pytest.mark.asyncio
async def test_large_frame_crosses_stream_limit() -> None:
    async with channel_pair() as (a, b):
        big = np.arange(1_000_000, dtype=np.int64)  # 8 MB, far above the 64 KiB stream limit
        send = asyncio.create_task(b.send_arrays(MsgType.TAGS, {"t": big}))
        frame = await a.recv(timeout=T)
        await send
        np.testing.assert_array_equal(frame.arrays()["t"], big)


@pytest.mark.asyncio
async def test_timeout_mid_frame_resumes() -> None:
    async with tcp_pair() as (ch, _, w):
        data = encode_frame(MsgType.SIFT, 0, b"x" * 1000)
        w.write(data[:500])
        await w.drain()
        with pytest.raises(TimeoutError):
            await ch.recv(timeout=0.05)
        assert not ch.closed
        w.write(data[500:])
        frame = await ch.recv(timeout=T)
        assert frame.payload == b"x" * 1000


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "bad magic"),
        (raw_header(length=0xFFFFFFFF), "exceeds MAX_FRAME"),
        (raw_header(version=9), "version 9"),
        (raw_header(mtype=99), "unknown message type 99"),
        (encode_frame(MsgType.PING, 1, b""), "sequence number 1, expected 0"),
    ],
)
@pytest.mark.asyncio
async def test_bad_frame_closes_connection(raw: bytes, words: str) -> None:
    async with tcp_pair() as (ch, r, w):
        w.write(raw)
        with capture_logs() as logs, pytest.raises(FrameError, match=words):
            await ch.recv(timeout=T)
        assert ch.closed
        assert await asyncio.wait_for(r.read(), T) == b""  # the peer sees the close
        first_word = words.split(maxsplit=1)[0]
        assert any(e["log_level"] == "error" and first_word in e["error"] for e in logs)
        with pytest.raises(PeerClosedError):
            await ch.recv(timeout=T)
        with pytest.raises(PeerClosedError):
            await ch.send(MsgType.PING, b"")


@pytest.mark.asyncio
async def test_replayed_frame_rejected() -> None:
    async with tcp_pair() as (ch, _, w):
        ping = encode_frame(MsgType.PING, 0, b"")
        w.write(ping + ping)
        assert (await ch.recv(timeout=T)).seq == 0
        with pytest.raises(FrameError, match="replayed"):
            await ch.recv(timeout=T)


@pytest.mark.asyncio
async def test_truncated_stream_and_clean_eof() -> None:
    async with tcp_pair() as (ch, _, w):
        w.write(encode_frame(MsgType.TAGS, 0, b"y" * 100)[:60])
        w.close()
        with pytest.raises(FrameError, match="truncated"):
            await ch.recv(timeout=T)
    async with tcp_pair() as (ch, _, w):
        w.write(encode_frame(MsgType.PING, 0, b""))
        w.close()
        assert (await ch.recv(timeout=T)).msg_type is MsgType.PING
        with pytest.raises(PeerClosedError):
            await ch.recv(timeout=T)
        assert ch.closed


# -- the link ------------------------------------------------------------------
def make_link(role: str, port: int = 0, **kw: Any) -> PeerLink:
    mine, theirs = ("alice", "bob") if role == "listen" else ("bob", "alice")
    args: dict[str, Any] = {
        "role": role,
        "host": "127.0.0.1",
        "port": port,
        "node_id": mine,
        "peer_id": theirs,
        "protocol": "bbm92",
        "timeout_s": 2.0,
        "backoff_cap_s": 0.3,
    }
    return PeerLink(**(args | kw))


async def ping_pong(a: PeerChannel, b: PeerChannel, n: int = 1) -> None:
    for _ in range(n):
        await b.send(MsgType.PING, b"")
        assert (await a.recv(timeout=T)).msg_type is MsgType.PING
        await a.send(MsgType.PONG, b"")
        assert (await b.recv(timeout=T)).msg_type is MsgType.PONG


@pytest.mark.asyncio
async def test_link_handshake_and_round_trip() -> None:
    async with make_link("listen") as alice, make_link("connect", alice.port) as bob:
        a = await alice.connected(timeout=T)
        b = await bob.connected(timeout=T)
        assert await alice.connected(timeout=T) is a  # the same channel while it is up
        await ping_pong(a, b)
        assert b.sent_frames["HELLO"] == 1 and a.sent_frames["HELLO_ACK"] == 1
        assert a.peer_name == "bob" and b.peer_name == "alice"


@pytest.mark.parametrize(
    ("bob_kw", "words"),
    [
        ({"protocol": "bb84"}, "protocol 'bb84'"),
        ({"node_id": "mallory"}, "'mallory'"),
        ({"peer_id": "carol"}, "'carol'"),
    ],
)
@pytest.mark.asyncio
async def test_handshake_mismatch_rejected(bob_kw: dict[str, str], words: str) -> None:
    with capture_logs() as logs:
        async with make_link("listen") as alice, make_link("connect", alice.port, **bob_kw) as bob:
            with pytest.raises(TimeoutError):
                await bob.connected(timeout=1.0)
            assert alice.channel is None and bob.channel is None
            assert alice.rejected >= 1 and bob.rejected >= 1
            assert words in alice.last_error
            assert "rejected the handshake" in bob.last_error and words in bob.last_error
    errors = [e for e in logs if e["log_level"] == "error"]
    assert any(e["event"] == "peer rejected" for e in errors)
    # Bob retries with backoff but says it once per distinct error.
    assert sum(e["event"] == "peer handshake failed" for e in errors) == 1


def test_link_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="role"):
        make_link("both")
    with pytest.raises(ValueError, match="protocol"):
        make_link("listen", protocol="e91")


@pytest.mark.asyncio
async def test_disconnect_then_reconnect() -> None:
    async with make_link("listen") as alice, make_link("connect", alice.port) as bob:
        a1, b1 = await alice.connected(timeout=T), await bob.connected(timeout=T)
        await ping_pong(a1, b1)
        await b1.close()  # Bob's side drops the channel
        with pytest.raises(PeerClosedError):
            await a1.recv(timeout=T)
        a2, b2 = await alice.connected(timeout=T), await bob.connected(timeout=T)
        assert a2 is not a1 and b2 is not b1
        await ping_pong(a2, b2)
        assert alice.connects == bob.connects == 2


@pytest.mark.asyncio
async def test_alice_restart_bob_redials() -> None:
    async with make_link("listen") as alice1:
        port = alice1.port
        async with make_link("connect", port) as bob:
            b1 = await bob.connected(timeout=T)
            await alice1.__aexit__(None, None, None)  # Alice goes away
            with pytest.raises(PeerClosedError):
                await b1.recv(timeout=T)
            async with make_link("listen", port) as alice2:
                a2, b2 = await alice2.connected(timeout=T), await bob.connected(timeout=T)
                await ping_pong(a2, b2)


@pytest.mark.asyncio
async def test_garbage_peer_closed_and_link_recovers() -> None:
    async with make_link("listen") as alice:
        with capture_logs() as logs:
            r, w = await asyncio.open_connection("127.0.0.1", alice.port)
            w.write(b"\x16\x03\x01 hello, I am a TLS client " * 4)
            assert await asyncio.wait_for(r.read(), T) == b""  # Alice hung up
            w.close()
            await w.wait_closed()
        assert alice.rejected == 1 and "bad magic" in alice.last_error
        assert any(e["log_level"] == "error" and "bad magic" in e["error"] for e in logs)
        assert alice.channel is None
        async with make_link("connect", alice.port) as bob:
            a, b = await alice.connected(timeout=T), await bob.connected(timeout=T)
            await ping_pong(a, b)
            # Garbage from an established peer: channel closed, Bob redials.
            b._w.write(b"garbage!" * 4)
            with pytest.raises(FrameError, match="bad magic"):
                await a.recv(timeout=T)
            with pytest.raises(PeerClosedError):  # Bob's reader sees Alice hang up
                await b.recv(timeout=T)
            a2, b2 = await alice.connected(timeout=T), await bob.connected(timeout=T)
            assert a2 is not a
            await ping_pong(a2, b2)


@pytest.mark.asyncio
async def test_newer_connection_replaces_current() -> None:
    async with make_link("listen") as alice, make_link("connect", alice.port) as bob1:
        a1 = await alice.connected(timeout=T)
        await bob1.connected(timeout=T)
        # A restarted Bob (new process) arrives while the old channel looks up.
        async with make_link("connect", alice.port) as bob2:
            b2 = await bob2.connected(timeout=T)
            async with asyncio.timeout(T):
                await a1.wait_closed()
            a2 = await alice.connected(timeout=T)
            await ping_pong(a2, b2)
