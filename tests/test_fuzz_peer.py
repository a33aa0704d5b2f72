"""Fuzzing the peer channel's parsers: frames (``qnoded.peer``), their authentication
(``qnoded.auth``) and the message bodies a node reads from them (arrays, JSON, the
handshake, sifting's fields).

Inputs: valid frames and array payloads with their bytes mutated (a flipped length,
type, flag or seq; truncation; trailing bytes), whole byte streams of several frames fed
to a :class:`PeerChannel` with and without authentication, arbitrary tags and trailers
for a Wegman-Carter session, and decoded messages with missing, mistyped or misshapen
fields.  ``tests/test_peer.py`` already feeds random bytes to the decoders and bounds their
memory; this adds the mutations, the channel, authentication and the round trips
(encode -> decode is the identity for frames, arrays and JSON).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import random
import struct
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from fuzzing import bounded, budget, mutated, refused
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qnoded import auth, peer
from qnoded.auth import TAG_LEN, AuthError, AuthPool, hash_points
from qnoded.config import parse_config
from qnoded.contracts import TagBatch
from qnoded.peer import (
    HEADER,
    MAX_NDIM,
    Frame,
    FrameAuthError,
    FrameError,
    MsgType,
    PeerChannel,
    PeerClosedError,
    PeerLink,
    decode_arrays,
    decode_frame,
    decode_header,
    decode_json,
    encode_arrays,
    encode_frame,
    encode_json,
)
from qnoded.sifting import BobEngine, ProtocolError

msg_types = st.sampled_from(list(MsgType))
seqs = st.one_of(st.integers(0, 5), st.integers(0, 2**32 - 1), st.integers(-(2**40), 2**40))
payloads = st.binary(max_size=96)


class HmacAuth:
    """A keyed tag for the frame layer's own round trips (``peer.Authenticator``)."""

    def __init__(self, key: bytes = b"k", tag_len: int = 16) -> None:
        self.key, self.tag_len = key, tag_len

    def tag(self, data: bytes) -> bytes:
        return (hmac.digest(self.key, data, "sha256") * 8)[: self.tag_len]

    def verify(self, data: bytes, tag: bytes) -> bool:
        return hmac.compare_digest(self.tag(data), tag)


@st.composite
def frames(draw: st.DrawFn) -> tuple[MsgType, int, bytes]:
    return draw(msg_types), draw(seqs), draw(payloads)


def frame_error(exc: BaseException) -> str:
    """The refusal is a FrameError with a message that names what is wrong."""
    return refused(exc, FrameError)


# -- frames -----------------------------------------------------------------------------------


@budget(100)
@given(frames(), st.sampled_from([None, HmacAuth(), HmacAuth(tag_len=1), HmacAuth(tag_len=255)]))
def test_frame_round_trip(f: tuple[MsgType, int, bytes], authenticator: HmacAuth | None) -> None:
    kind, seq, payload = f
    data = encode_frame(kind, seq, payload, authenticator=authenticator)
    got, used = decode_frame(data + b"next", authenticator=authenticator)
    assert used == len(data)
    assert got == Frame(kind, seq & 0xFFFFFFFF, payload, 1 if authenticator else 0)
    header = decode_header(data[: HEADER.size])
    assert (header.msg_type, header.length) == (kind, len(payload))


_mutated_frames = st.tuples(frames(), st.booleans()).flatmap(
    lambda fa: st.tuples(
        mutated(encode_frame(*fa[0], authenticator=HmacAuth() if fa[1] else None)),
        st.just(fa[1]),
    )
)


@budget(150)
@given(_mutated_frames)
@example((struct.pack(">4sBBBBII", b"QKDP", 1, 1, 1, 0, 0, 0), False))  # MAC flag, no mac_len
@example((struct.pack(">4sBBBBII", b"QKDP", 1, 99, 0, 0, 0, 0), False))  # unknown type
def test_mutated_frames(case: tuple[bytes, bool]) -> None:
    data, authenticated = case
    authenticator = HmacAuth() if authenticated else None
    try:
        with bounded("decode_frame"):
            frame, used = decode_frame(data, authenticator=authenticator)
    except Exception as exc:  # noqa: BLE001 - the property is about which exception
        frame_error(exc)
        return
    assert HEADER.size <= used <= len(data)
    assert len(frame.payload) == struct.unpack_from(">I", data, 12)[0]


# -- array payloads ---------------------------------------------------------------------------

array_names = st.text(max_size=12).filter(lambda s: len(s.encode()) <= 255)
arrays = st.one_of(
    *(
        hnp.arrays(
            dtype,
            hnp.array_shapes(min_dims=0, max_dims=MAX_NDIM, min_side=0, max_side=3),
            elements=None,
        )
        for dtype in (np.dtype("<i8"), np.dtype(">i8"), np.uint8, np.dtype("<f8"), np.dtype(">f8"))
    )
)


@budget(80)
@given(st.dictionaries(array_names, arrays, max_size=4))
def test_arrays_round_trip(named: dict[str, npt.NDArray[Any]]) -> None:
    got = decode_arrays(encode_arrays(named))
    assert list(got) == list(named)
    for name, a in named.items():
        b = got[name]
        assert b.shape == a.shape and b.dtype.kind == a.dtype.kind and b.dtype.isnative
        np.testing.assert_array_equal(b, a)
        assert b.flags.writeable


@budget(120)
@given(
    st.dictionaries(array_names, arrays, max_size=3).flatmap(
        lambda named: mutated(encode_arrays(named), max_edits=3)
    )
)
@example(b"\x01\x00\x01a\x01\x08" + b"\x00" * 64)  # 8-d, every dimension 0
@example(b"\x01\x00\x01a\x01\x02" + struct.pack("<2Q", 2**26, 0))  # no data, 2**29 bytes
# No data, yet numpy cannot build the shape: "array is too big" (ValueError) leaked out.
@example(b"\x01\x00\x00\x01\x05" + struct.pack("<5Q", 2**16, 2**16, 2**16, 2**16, 0))
def test_mutated_arrays(data: bytes) -> None:
    try:
        with bounded("decode_arrays"):
            got = decode_arrays(data)
    except Exception as exc:  # noqa: BLE001 - the property is about which exception
        frame_error(exc)
        return
    assert sum(a.nbytes for a in got.values()) <= len(data)


# -- JSON payloads and the handshake ----------------------------------------------------------

json_values = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10)
    ),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)


@budget(100)
@given(json_values)
def test_json_round_trip(value: Any) -> None:
    assert decode_json(encode_json(value)) == value


HELLO = {"node_id": "bob", "peer_id": "alice", "protocol": "bb84", "version": 1}
hellos = st.one_of(
    st.binary(max_size=64),
    st.just(encode_json(HELLO)).flatmap(mutated),
    st.dictionaries(
        st.sampled_from([*HELLO, "x"]),
        st.one_of(st.sampled_from([*HELLO.values(), 1.0, True, "BB84"]), json_values),
    ).map(encode_json),
    st.just(b"[" * 5000),
)


@budget(100)
@given(hellos)
def test_handshake_reads_any_hello(payload: bytes) -> None:
    link = PeerLink(
        role="listen", host="127.0.0.1", port=0, node_id="alice", peer_id="bob", protocol="bb84"
    )
    try:
        with bounded("_check_hello"):
            link._check_hello(Frame(MsgType.HELLO, 0, payload))
    except Exception as exc:  # noqa: BLE001 - the property is about which exception
        frame_error(exc)
        return
    doc = json.loads(payload)
    assert (doc["node_id"], doc["peer_id"], doc["protocol"]) == ("bob", "alice", "bb84")
    assert doc["version"] == 1


@budget(80)
@given(hellos)
def test_error_text_of_any_payload(payload: bytes) -> None:
    with bounded("_error_text"):
        text = peer._error_text(payload)
    assert isinstance(text, str) and len(text) <= 200


# -- a channel reading a stream of frames ------------------------------------------------------


class _Sink:
    """The writer half of a PeerChannel that goes nowhere."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self.transport = SimpleNamespace(abort=lambda: None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("fuzz", 0) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        return None


async def read_all(stream: bytes, authenticator: Any = None) -> tuple[list[Frame], BaseException]:
    """Every frame a channel reads from ``stream``, and the exception that ended it."""
    reader = asyncio.StreamReader()
    reader.feed_data(stream)
    reader.feed_eof()
    channel = PeerChannel(reader, _Sink(), authenticator=authenticator)  # type: ignore[arg-type]
    got: list[Frame] = []
    async with asyncio.timeout(5.0):
        while True:
            try:
                got.append(await channel.recv())
            except Exception as exc:  # noqa: BLE001 - returned for the property to judge
                assert channel.closed
                return got, exc


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[tuple[MsgType, bytes]]]:
    sent = draw(st.lists(st.tuples(msg_types, payloads), max_size=5))
    data = b"".join(encode_frame(k, i, p) for i, (k, p) in enumerate(sent))
    return data, sent


@budget(60)
@given(streams())
def test_channel_reads_a_clean_stream(case: tuple[bytes, list[tuple[MsgType, bytes]]]) -> None:
    data, sent = case
    got, end = asyncio.run(read_all(data))
    assert [(f.msg_type, f.payload) for f in got] == sent
    assert isinstance(end, PeerClosedError)


@budget(120)
@given(streams().flatmap(lambda case: mutated(case[0], max_edits=3)))
def test_channel_reads_a_mutated_stream(data: bytes) -> None:
    got, end = asyncio.run(read_all(data))
    assert [f.seq for f in got] == list(range(len(got)))
    assert isinstance(end, FrameError | PeerClosedError), repr(end)
    assert str(end).strip()


# -- authentication ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_pools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AuthPool, AuthPool]]:
    """Alice's and Bob's pools from one PSK: enough pads for the long fuzz run's sessions."""
    psk = random.Random(14).randbytes(8 << 20)
    root = tmp_path_factory.mktemp("fuzz-auth")
    alice = AuthPool(root / "alice" / "auth.db", psk, chunk_pads=64)
    bob = AuthPool(root / "bob" / "auth.db", psk, chunk_pads=64)
    yield alice, bob
    alice.close()
    bob.close()


trailers = st.one_of(
    st.binary(min_size=TAG_LEN, max_size=TAG_LEN),
    st.tuples(st.integers(0, 2**64 - 1), st.binary(min_size=16, max_size=16)).map(
        lambda t: t[0].to_bytes(8, "big") + t[1]
    ),
    st.binary(max_size=2 * TAG_LEN),
)
headers_and_payloads = st.one_of(
    st.tuples(frames(), st.booleans()).map(
        lambda fa: encode_frame(*fa[0])  # header + payload, as the channel hands them over
    ),
    st.binary(min_size=HEADER.size, max_size=80),
)


@budget(100)
@given(headers_and_payloads, trailers, st.booleans())
def test_auth_check_refuses_any_forgery(
    auth_pools: tuple[AuthPool, AuthPool], data: bytes, trailer: bytes, as_bob: bool
) -> None:
    alice_pool, bob_pool = auth_pools
    a = bob_pool.channel_auth("connect") if as_bob else alice_pool.channel_auth("listen")
    try:
        if as_bob:  # Bob speaks first; then the forgery comes as Alice's answer
            a.tag(encode_frame(MsgType.HELLO, 0, b"{}"))
        with bounded("ChannelAuth.check"):
            a.check(data, trailer)
    except Exception as exc:  # noqa: BLE001 - the property is about which exception
        refused(exc, FrameAuthError)
        assert isinstance(exc, FrameAuthError) and exc.kind in (
            "mac",
            "pad",
            "stale",
            "mac-len",
            "seq",
            "missing-mac",
            "unexpected-mac",
        )
    else:
        raise AssertionError("a forged trailer was accepted")
    finally:
        a.close()


@budget(60)
@given(
    st.lists(st.tuples(msg_types, payloads, st.booleans()), min_size=1, max_size=6),
    st.one_of(st.none(), st.tuples(st.integers(0, 10), st.integers(0, 7))),
)
def test_auth_round_trip_and_tampering(
    auth_pools: tuple[AuthPool, AuthPool],
    exchange: list[tuple[MsgType, bytes, bool]],
    tamper: tuple[int, int] | None,
) -> None:
    """Frames tagged (or deferred) by one end are accepted by the other; a flipped bit in
    any of them is caught, by the next tag at the latest."""
    alice_pool, bob_pool = auth_pools
    bob, alice = bob_pool.channel_auth("connect"), alice_pool.channel_auth("listen")
    try:
        hello = encode_frame(MsgType.HELLO, 0, b"{}", authenticator=bob)
        alice.check(hello[:-TAG_LEN], hello[-TAG_LEN:])
        sent: list[tuple[bytes, bytes | None]] = []
        for seq, (kind, payload, defer) in enumerate(exchange, start=1):
            if defer and bob.defers(kind, len(payload)):
                data = encode_frame(kind, seq, payload)
                bob.defer(data)
                sent.append((data, None))
            else:
                tagged = encode_frame(kind, seq, payload, authenticator=bob)
                sent.append((tagged[:-TAG_LEN], tagged[-TAG_LEN:]))
        last = encode_frame(MsgType.PING, len(exchange) + 1, b"", authenticator=bob)
        sent.append((last[:-TAG_LEN], last[-TAG_LEN:]))
        if tamper is not None:
            where, bit = tamper
            data, trailer = sent[where % len(sent)]
            flipped = bytearray(data)
            flipped[(where * 7) % len(flipped)] ^= 1 << bit
            sent[where % len(sent)] = (bytes(flipped), trailer)
        try:
            for data, trailer in sent:
                if trailer is None:
                    alice.accept_deferred(data)
                else:
                    alice.check(data, trailer)
        except FrameAuthError as exc:
            assert tamper is not None, f"an untampered exchange was refused: {exc}"
            return
        assert tamper is None, "a tampered frame was accepted"
    finally:
        bob.close()
        alice.close()


@budget(50)
@given(st.integers(-(2**70), 2**70))
def test_auth_floor_from_the_peer(auth_pools: tuple[AuthPool, AuthPool], floor: int) -> None:
    """An authenticated ERROR's ``auth_floor`` is the peer's word, but never a crash."""
    if 0 <= floor <= auth.MAX_PAD_INDEX:
        # A raised floor is permanent: stay near the pads in use.  Both ends skip to the
        # same floor, as after a real announcement, so the other tests' sessions still work.
        floor = min(floor, max(p.floor for p in auth_pools) + 8)
    for pool, role in zip(auth_pools, ("listen", "connect"), strict=True):
        before = pool.floor
        with bounded("raise_floor"):
            pool.channel_auth(role).raise_floor(floor)  # type: ignore[arg-type]
        assert pool.floor >= before


@budget(100)
@given(st.one_of(st.binary(max_size=64), st.builds(lambda n: b"\x00" * n, st.integers(0, 1100))))
def test_hash_points_of_any_region(region: bytes) -> None:
    try:
        listener, connector = hash_points(region)
    except Exception as exc:  # noqa: BLE001 - the property is about which exception
        refused(exc, AuthError)
        return
    for points in (listener, connector):
        assert points.shape == (auth.POINTS,)
        assert all(0 < int(p) < auth.P61 for p in points)


# -- message bodies: sifting reads arrays by field ---------------------------------------------

BOB = parse_config(
    '[node]\nid = "bob"\nrole = "bob"\n[peer]\npeer_id = "alice"\nconnect = "127.0.0.1:1"\n'
)
field_arrays = st.one_of(
    hnp.arrays(np.int64, hnp.array_shapes(min_dims=0, max_dims=2, max_side=4)),
    hnp.arrays(np.uint8, hnp.array_shapes(min_dims=0, max_dims=2, max_side=4)),
    hnp.arrays(np.float64, st.integers(0, 3)),
    st.integers(-3, 12).map(lambda v: np.array([v], np.int64)),
    st.lists(st.integers(-2, 12), max_size=6).map(lambda v: np.array(v, np.int64)),
    st.lists(st.integers(0, 5), max_size=6).map(lambda v: np.array(v, np.uint8)),
)
messages = st.dictionaries(
    st.sampled_from(["seq", "locked", "skipped", "keep", "cls", "matched", "errors", "n", "x"]),
    field_arrays,
    max_size=7,
)


@budget(100)
@given(messages, st.integers(0, 8))
@example(
    {
        "seq": np.array([0]),
        "locked": np.array([1]),
        "keep": np.array([0, 1]),
        "cls": np.array([0, 0], np.uint8),
        "matched": np.array([2]),
    },
    4,
)
def test_bob_reads_any_sift_and_result(msg: dict[str, npt.NDArray[Any]], n_tags: int) -> None:
    bob = BobEngine(BOB)
    t = np.arange(n_tags, dtype=np.int64)
    bob.on_batch(TagBatch(0, 0, 100, t, (t % 4).astype(np.uint8)))
    for handler in (bob.on_sift, bob.on_result):
        try:
            with bounded(handler.__name__):
                # The node decodes a payload first; a round trip keeps the arrays honest.
                handler(decode_arrays(encode_arrays(msg)))
        except Exception as exc:  # noqa: BLE001 - the property is about which exception
            refused(exc, ProtocolError)
