"""Wegman-Carter authentication of the peer channel: MAC, pads, pool, PSK, and attacks over TCP."""

from __future__ import annotations

import asyncio
import math
import os
import random
import struct
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from structlog.testing import capture_logs
from test_peer import make_link as peer_link
from test_peer import ping_pong, tcp_pair

from qnoded import auth
from qnoded.amplify import P61
from qnoded.auth import (
    HASH_REGION_BYTES,
    PAD_BYTES,
    TAG_LEN,
    AuthError,
    AuthPool,
    ChannelAuth,
    forgery_probability,
    load_psk,
)
from qnoded.cli import main
from qnoded.config import AuthSection
from qnoded.peer import (
    HEADER,
    MAX_FRAME,
    FrameAuthError,
    FrameError,
    MsgType,
    PeerChannel,
    PeerClosedError,
    PeerLink,
    decode_header,
    decode_json,
    encode_arrays,
    encode_frame,
)

T = 5.0  # bound on every wait
CHUNK = 8  # pads per floor step: small, so the tests cross many steps


def psk_bytes(n: int = 16384, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(n)


def pool_at(directory: Path, psk: bytes, *, chunk: int = CHUNK) -> AuthPool:
    return AuthPool(directory / "auth.db", psk, psk_source="test-psk", chunk_pads=chunk)


@pytest.fixture
def pools(tmp_path: Path) -> Iterator[tuple[AuthPool, AuthPool]]:
    psk = psk_bytes()
    a, b = pool_at(tmp_path / "alice", psk), pool_at(tmp_path / "bob", psk)
    yield a, b
    for p in (a, b):
        p.close()


def frame(a: ChannelAuth, seq: int, payload: bytes = b"", kind: MsgType = MsgType.PING) -> bytes:
    return encode_frame(kind, seq, payload, authenticator=a)


def check(a: ChannelAuth, data: bytes) -> None:
    a.check(data[:-TAG_LEN], data[-TAG_LEN:])


def untagged(
    a: ChannelAuth, seq: int, payload: bytes = b"", kind: MsgType = MsgType.EC_QUERY
) -> bytes:
    """A bulk frame sent without a MAC, as PeerChannel sends it: the next tag covers it."""
    data = encode_frame(kind, seq, payload)
    a.defer(data)
    return data


# -- the MAC ---------------------------------------------------------------------
def poly_ref(data: bytes, r: int) -> int:
    """qp_poly61 in plain big integers: 7-byte LE chunks, then the length, Horner."""
    acc = 0
    for i in range(0, len(data), 7):
        acc = (acc + int.from_bytes(data[i : i + 7], "little")) * r % P61
    return (acc + len(data)) * r % P61


def points_ref(region: bytes) -> list[int]:
    words = [w & P61 for (w,) in struct.iter_unpack("<Q", region)]
    return [w for w in words if 0 < w < P61][:4]


@pytest.mark.parametrize("payload_len", [0, 1, 6, 7, 1000, 100_003])
def test_mac_known_answer(tmp_path: Path, payload_len: int) -> None:
    psk = psk_bytes()
    with pool_at(tmp_path / "a", psk) as alice, pool_at(tmp_path / "b", psk) as bob:
        b, a = bob.channel_auth("connect"), alice.channel_auth("listen")
        payload = random.Random(payload_len).randbytes(payload_len)
        data = frame(b, 0, payload, MsgType.HELLO)
        head_payload, trailer = data[:-TAG_LEN], data[-TAG_LEN:]
        index = int.from_bytes(trailer[:8], "big")
        assert index == 1  # base 0 (a fresh pool), Bob's parity
        pts = points_ref(psk[:HASH_REGION_BYTES])[2:]  # the connector's points
        pad = psk[HASH_REGION_BYTES + PAD_BYTES * index :][:PAD_BYTES]
        authenticated = head_payload + trailer[:8]
        expected = b"".join(
            (
                (poly_ref(authenticated, k) + int.from_bytes(pad[8 * j : 8 * j + 8], "big")) % 2**64
            ).to_bytes(8, "big")
            for j, k in enumerate(pts)
        )
        assert trailer[8:] == expected
        check(a, data)  # and Alice accepts it
        reply = frame(a, 0, b"ack", MsgType.HELLO_ACK)
        assert int.from_bytes(reply[-TAG_LEN:][:8], "big") == 0  # base + 0: Alice's parity
        check(b, reply)


def test_forgery_probability() -> None:
    def per_point(payload: int) -> float:
        chunks = math.ceil((HEADER.size + payload + 8) / 7)
        return (chunks + 1) / (P61 - 1)

    assert forgery_probability(100, points=1) == pytest.approx(per_point(100))
    assert forgery_probability(100) == pytest.approx(per_point(100) ** 2)
    # The largest frame: two points give ~2^-75.6 per forged frame.  (2^-100 at
    # this size would take three points; two reach it up to ~14 KiB payloads.)
    worst = forgery_probability(MAX_FRAME)
    assert -76 < math.log2(worst) < -75
    assert forgery_probability(4096) <= 2.0**-100
    assert forgery_probability(MAX_FRAME, points=3) <= 2.0**-100
    # A tag covering the largest transcript of untagged frames still stays near 2^-75.
    covering = forgery_probability(MAX_FRAME, transcript_bytes=auth.MAX_DEFERRED_BYTES)
    assert worst < covering and math.log2(covering) < -74
    sizes = [0, 100, 10_000, MAX_FRAME]
    probs = [forgery_probability(n) for n in sizes]
    assert probs == sorted(probs)


def test_hash_points_skip_zero_and_p() -> None:
    bad = struct.pack("<Q", 0) + struct.pack("<Q", P61) + struct.pack("<Q", P61 | (7 << 61))
    good = b"".join(struct.pack("<Q", v) for v in (5, 6, 7, 8))
    listener, connector = auth.hash_points(bad + good)
    assert listener.tolist() == [5, 6] and connector.tolist() == [7, 8]
    with pytest.raises(AuthError, match="too few"):
        auth.hash_points(bad * 10)


# -- pads within one node ----------------------------------------------------------
def test_session_pads_and_floor_steps(pools: tuple[AuthPool, AuthPool]) -> None:
    alice, bob = pools
    a, b = alice.channel_auth("listen"), bob.channel_auth("connect")
    check(a, frame(b, 0, b"hello", MsgType.HELLO))
    indices = []
    for seq in range(1, 40):
        data = frame(b, seq, b"x" * seq)
        indices.append(int.from_bytes(data[-TAG_LEN:][:8], "big"))
        check(a, data)
        reply = frame(a, seq - 1)
        indices.append(int.from_bytes(reply[-TAG_LEN:][:8], "big"))
        check(b, reply)
    assert len(set(indices)) == len(indices)
    # Each node's floor is above every pad it used or accepted, at most a chunk ahead.
    assert max(indices) < alice.floor <= max(indices) + CHUNK + 2
    assert max(indices) < bob.floor <= max(indices) + CHUNK + 2
    a.close()
    b.close()  # a clean close gives the unused chunk back
    assert alice.floor == bob.floor == max(indices) + 1 + (max(indices) + 1) % 2


def test_floor_persisted_per_chunk_not_per_frame(
    pools: tuple[AuthPool, AuthPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = pools
    writes: list[int] = []
    real = AuthPool._set_floor

    def counting(self: AuthPool, floor: int) -> None:
        writes.append(floor)
        real(self, floor)

    monkeypatch.setattr(AuthPool, "_set_floor", counting)
    a, b = alice.channel_auth("listen"), bob.channel_auth("connect")
    for seq in range(64):  # 64 frames one way: 128 pads of this session's range
        check(a, frame(b, seq))
    # One step per CHUNK pads at each node: 128 / 8 = 16 each (+1 at the start).
    assert len(writes) <= 2 * (128 // CHUNK + 1)


def test_crash_never_reuses_pads(tmp_path: Path) -> None:
    psk = psk_bytes()
    bob = pool_at(tmp_path, psk)
    b = bob.channel_auth("connect")
    used = [int.from_bytes(frame(b, s)[-TAG_LEN:][:8], "big") for s in range(5)]
    bob.close()  # the process dies: no ChannelAuth.close, the floor stays a chunk ahead
    with pool_at(tmp_path, psk) as again:
        assert again.floor > max(used)
        b2 = again.channel_auth("connect")
        first = int.from_bytes(frame(b2, 0)[-TAG_LEN:][:8], "big")
        assert first > max(used)
        # A frame of the old session replayed to a restarted Alice would be stale the
        # same way: first pads below her floor are refused (see the TCP tests).


def test_newer_session_ends_the_older(pools: tuple[AuthPool, AuthPool]) -> None:
    alice, bob = pools
    a1, b1 = alice.channel_auth("listen"), bob.channel_auth("connect")
    check(a1, frame(b1, 0))
    b2 = bob.channel_auth("connect")
    a2 = alice.channel_auth("listen")
    check(a2, frame(b2, 0))  # Bob's new session starts above everything of the first
    with pytest.raises(PeerClosedError, match="superseded"):
        frame(b1, 1)
    with pytest.raises(PeerClosedError, match="superseded"):
        frame(a1, 0)
    check(b2, frame(a2, 0))


def test_floor_announcement_ends_a_running_session_before_its_pad(
    pools: tuple[AuthPool, AuthPool],
) -> None:
    alice, bob = pools
    a1, b1 = alice.channel_auth("listen"), bob.channel_auth("connect")
    hello = frame(b1, 0, b"hello", MsgType.HELLO)
    check(a1, hello)
    assert alice.floor == 10
    a2 = alice.channel_auth("listen")  # the same HELLO replayed on a new connection
    with pytest.raises(FrameAuthError, match="below this node's pad floor") as exc:
        check(a2, hello)
    assert exc.value.kind == "stale"
    assert a2.hint() == 12  # announced with pad 10, Alice's floor moves to 12
    announcement = encode_frame(MsgType.ERROR, 0, b'{"auth_floor":12}', authenticator=a2)
    assert int.from_bytes(announcement[-TAG_LEN:][:8], "big") == 10
    # The running session keeps going on pads 0..8, and stops before pad 10.
    for seq in range(5):
        check(b1, frame(a1, seq))
    with pytest.raises(PeerClosedError, match="floor announcement"):
        frame(a1, 5)
    # Bob learns the floor from the authenticated ERROR; replayed later, it is refused.
    b1.close()
    b2 = bob.channel_auth("connect")
    frame(b2, 0, b"hello", MsgType.HELLO)  # base 10: below Alice's floor
    check(b2, announcement)  # the ERROR verifies: Alice's pad 10
    b2.raise_floor(12)
    b2.close()
    assert bob.floor == 12
    b3 = bob.channel_auth("connect")
    a3 = alice.channel_auth("listen")
    check(a3, frame(b3, 0, b"hello", MsgType.HELLO))  # base 12: accepted
    with pytest.raises(FrameAuthError, match="pad index 10, expected 12") as exc:
        check(b3, announcement)
    assert exc.value.kind == "pad"


def test_pool_exhaustion(tmp_path: Path) -> None:
    psk = psk_bytes(4096)  # 3072 bytes of pads after the hash region: 192 pads
    with pool_at(tmp_path / "a", psk) as alice, pool_at(tmp_path / "b", psk) as bob:
        a, b = alice.channel_auth("listen"), bob.channel_auth("connect")
        for seq in range(96):  # Bob's pads 1, 3, ..., 191
            check(a, frame(b, seq))
        with pytest.raises(AuthError, match="authentication key pool exhausted"):
            frame(b, 96)
        # Bob gets more key than Alice (a node out of step): her check refuses the pad.
        bid = uuid.uuid4()
        bob.stage(bid, os.urandom(4096))
        bob.activate(bid)
        with pytest.raises(FrameAuthError, match="not in this node's pool") as exc:
            check(a, frame(b, 96))
        assert exc.value.kind == "pad"


def test_second_pool_on_one_file_refused(tmp_path: Path) -> None:
    psk = psk_bytes()
    with pool_at(tmp_path, psk), pytest.raises(AuthError, match="in use by another process"):
        pool_at(tmp_path, psk)


# -- the pool: block material, accounting, wiping --------------------------------------
def test_stage_activate_drop_and_reopen(tmp_path: Path) -> None:
    psk = psk_bytes(8192)
    b1, b2, b3 = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    m1, m2, m3 = os.urandom(5000), os.urandom(300), os.urandom(700)
    with pool_at(tmp_path, psk) as pool:
        start = pool.stream_bytes
        assert start == 8192 - HASH_REGION_BYTES
        pool.stage(b1, m1)
        pool.stage(b1, m1)  # idempotent
        with pytest.raises(AuthError, match="other material"):
            pool.stage(b1, m2)
        pool.stage(b2, m2)
        pool.stage(b3, m3)
        assert pool.stream_bytes == start  # staged is not usable
        assert pool.staged_bytes == 6000
    with pool_at(tmp_path, psk) as pool:  # a crash between stage and commit
        assert pool.staged() == [b1, b2, b3]
        assert pool.activate(b1) is True
        assert pool.activate(b1) is False  # idempotent
        assert pool.drop(b2) is True
        assert pool.drop(b2) is False
        assert pool.drop(b1) is False  # activated: part of the stream now
        with pytest.raises(AuthError, match="neither staged nor activated"):
            pool.activate(b2)
        with pytest.raises(AuthError, match="already in the authentication stream"):
            pool.stage(b1, m1)
        assert pool.staged() == [b3]
        assert pool.stream_bytes == start + 5000
    with pool_at(tmp_path, psk) as pool:
        assert pool.staged() == [b3]
        assert pool.activate(b3)
        assert pool.stream_bytes == start + 5700
        # The stream is PSK then blocks in activation order: pads read across pages.
        stream = psk[HASH_REGION_BYTES:] + m1 + m3
        for i in (0, 450, 451, (start // PAD_BYTES), len(stream) // PAD_BYTES - 1):
            assert pool._pad(i) == stream[PAD_BYTES * i : PAD_BYTES * (i + 1)]
        assert pool._pad(len(stream) // PAD_BYTES) is None


def test_accounting_and_wanted_bytes(tmp_path: Path) -> None:
    psk = psk_bytes(8192)
    path = tmp_path / "auth.db"
    with AuthPool(path, psk, reserve_bytes=10_000, chunk_pads=CHUNK) as pool:
        assert pool.available_bytes == 8192 - HASH_REGION_BYTES
        assert pool.consumed_bytes == HASH_REGION_BYTES
        assert pool.wanted_bytes() == 10_000 + PAD_BYTES * CHUNK - 7168
    with AuthPool(path, psk, reserve_bytes=4000, chunk_pads=CHUNK) as pool:
        assert pool.wanted_bytes() == 0
        b = pool.channel_auth("connect")
        for seq in range(150):  # pads 1..299: 4800 bytes
            frame(b, seq)
        assert pool.consumed_bytes == HASH_REGION_BYTES + PAD_BYTES * 300
        available = pool.available_bytes
        assert available == 7168 - PAD_BYTES * pool.floor < 4000
        want = pool.wanted_bytes()
        assert want == 4000 + PAD_BYTES * CHUNK - available
        assert want % PAD_BYTES == 0
        pool.stage(uuid.uuid4(), bytes(want))  # staged counts: no double reservation
        assert pool.wanted_bytes() == 0
        b.close()
        assert pool.consumed_bytes == HASH_REGION_BYTES + PAD_BYTES * 300


def test_wiped_material_leaves_the_file(tmp_path: Path) -> None:
    psk = psk_bytes(3 * 4096 + HASH_REGION_BYTES)
    staged = os.urandom(2048)
    with pool_at(tmp_path, psk) as pool:
        b = pool.channel_auth("connect")
        for seq in range(300):  # pads up to 599: the first two pages are used up
            frame(b, seq)
        b.close()
        bid = uuid.uuid4()
        pool.stage(bid, staged)
        pool.drop(bid)
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("auth.db"))
    first_page = psk[HASH_REGION_BYTES : HASH_REGION_BYTES + 4096]
    assert first_page[:64] not in raw and first_page[-64:] not in raw
    assert staged[:64] not in raw
    assert psk[HASH_REGION_BYTES + 3 * 4096 - 64 :] in raw  # unused pads are kept
    assert (tmp_path / "auth.db").stat().st_mode & 0o777 == 0o600


# -- the pre-shared key -------------------------------------------------------------
def write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_psk_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(AuthError, match=f"{missing} does not exist"):
        load_psk(AuthSection(psk_file=str(missing)))
    short = write(tmp_path / "short", os.urandom(100))
    with pytest.raises(AuthError, match=f"{short} holds 100 bytes"):
        load_psk(AuthSection(psk_file=str(short)))
    loose = write(tmp_path / "loose", os.urandom(4096), 0o644)
    with pytest.raises(AuthError, match=f"{loose} is accessible to group/other .*0644"):
        load_psk(AuthSection(psk_file=str(loose)))
    with pytest.raises(AuthError, match="is not a regular file"):
        load_psk(AuthSection(psk_file=str(tmp_path)))
    with pytest.raises(AuthError, match="LoadCredential=qnoded-psk"):
        load_psk(AuthSection(), environ={})


def test_psk_from_systemd_credentials(tmp_path: Path) -> None:
    data = os.urandom(4096)
    write(tmp_path / "qnoded-psk", data, 0o400)
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert load_psk(AuthSection(), environ=env) == data
    with pytest.raises(AuthError, match=f"{tmp_path / 'other'} does not exist"):
        load_psk(AuthSection(psk_credential="other"), environ=env)
    # systemd >= 256 shows credentials as 0440 (an ACL for the service user): fine there,
    # but never group-writable or other-readable, and a psk_file stays 0600-strict.
    write(tmp_path / "qnoded-psk", data, 0o440)
    assert load_psk(AuthSection(), environ=env) == data
    for mode in (0o460, 0o444):
        write(tmp_path / "qnoded-psk", data, mode)
        with pytest.raises(AuthError, match="accessible to group/other"):
            load_psk(AuthSection(), environ=env)
    write(tmp_path / "plain", data, 0o440)
    with pytest.raises(AuthError, match="accessible to group/other"):
        load_psk(AuthSection(psk_file=str(tmp_path / "plain")))


def test_psk_changed_after_import(tmp_path: Path) -> None:
    psk_file = write(tmp_path / "psk", os.urandom(8192))
    cfg = AuthSection(psk_file=str(psk_file))
    with capture_logs() as logs, AuthPool.open(tmp_path / "state", cfg) as pool:
        assert pool.stream_bytes == 8192 - HASH_REGION_BYTES
    assert [e["event"] for e in logs] == ["pre-shared key imported into the authentication pool"]
    with AuthPool.open(tmp_path / "state", cfg):
        pass  # unchanged: fine
    write(psk_file, os.urandom(8192))
    with pytest.raises(AuthError, match=f"{psk_file} differs from the one imported into"):
        AuthPool.open(tmp_path / "state", cfg)


@pytest.mark.usefixtures("restore_logging")
def test_cli_psk_generate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "psk"
    assert main(["psk", "generate", str(path), "--bytes", "8192"]) == 0
    out = capsys.readouterr().out
    assert "LoadCredential=qnoded-psk:/etc/qnoded/credentials/qnoded-psk" in out
    assert "both nodes" in out
    assert path.stat().st_size == 8192 and path.stat().st_mode & 0o777 == 0o600
    assert load_psk(AuthSection(psk_file=str(path))) == path.read_bytes()
    assert path.read_bytes()[:16].hex() not in out
    assert main(["psk", "generate", str(path)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["psk", "generate", str(tmp_path / "tiny"), "--bytes", "10"]) == 2


# -- attacks over TCP -----------------------------------------------------------
def alice_channel(
    pool: AuthPool,
) -> AbstractAsyncContextManager[tuple[PeerChannel, asyncio.StreamReader, asyncio.StreamWriter]]:
    """Alice's authenticated PeerChannel and the raw client streams talking to it."""
    return tcp_pair(lambda: pool.channel_auth("listen"))


def _patch_seq(data: bytes, seq: int) -> bytes:
    return data[:8] + struct.pack(">I", seq) + data[12:]


def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


# An attack: raw frames to write after a good HELLO, how many of them pass, the kind refused.
Attack = tuple[list[bytes], int, str]


def _tampered_payload(b: ChannelAuth) -> Attack:
    return [_flip(frame(b, 1, b"abcdef"), HEADER.size + 2)], 0, "mac"


def _tampered_header(b: ChannelAuth) -> Attack:
    f = frame(b, 1, b"abc")
    return [f[:5] + bytes([MsgType.PONG]) + f[6:]], 0, "mac"


def _replayed(b: ChannelAuth) -> Attack:
    f1 = frame(b, 1, b"once")
    return [f1, f1], 1, "seq"


def _replayed_with_next_seq(b: ChannelAuth) -> Attack:
    f1 = frame(b, 1, b"once")
    return [f1, _patch_seq(f1, 2)], 1, "pad"


def _reordered(b: ChannelAuth) -> Attack:
    f1, f2 = frame(b, 1, b"first"), frame(b, 2, b"second")
    return [f2, f1], 0, "seq"


def _reordered_with_seqs_fixed(b: ChannelAuth) -> Attack:
    f1, f2 = frame(b, 1, b"first"), frame(b, 2, b"second")
    return [_patch_seq(f2, 1), _patch_seq(f1, 2)], 0, "pad"


def _made_up_tag(b: ChannelAuth) -> Attack:
    expected_index = (b.base or 0) + 3  # Bob's next pad: the attacker knows it
    body = encode_frame(MsgType.COMMIT, 1, b'{"block":1}')
    head = HEADER.pack(b"QKDP", 1, MsgType.COMMIT, 1, TAG_LEN, 1, len(body) - HEADER.size)
    forged = head + body[HEADER.size :] + expected_index.to_bytes(8, "big") + os.urandom(16)
    return [forged], 0, "mac"


def _no_mac(b: ChannelAuth) -> Attack:
    return [encode_frame(MsgType.PING, 1, b"")], 0, "missing-mac"


def _untagged_commit(b: ChannelAuth) -> Attack:
    # A COMMIT must carry its own tag: it may not wait, even for the next frame.
    return [encode_frame(MsgType.COMMIT, 1, b'{"block":1}')], 0, "missing-mac"


def _tampered_untagged(b: ChannelAuth) -> Attack:
    # The bulk frame is acted on provisionally; the next tag, which covers it, fails.
    bulk = _flip(untagged(b, 1, b"parities"), HEADER.size + 3)
    return [bulk, frame(b, 2, b"", MsgType.EC_DONE)], 1, "mac"


def _injected_untagged(b: ChannelAuth) -> Attack:
    # An attacker slips in a bulk frame and renumbers Bob's next one after it.
    genuine = frame(b, 1, b"", MsgType.EC_DONE)
    return [encode_frame(MsgType.EC_ANSWER, 1, b"forged"), _patch_seq(genuine, 2)], 1, "mac"


def _dropped_untagged(b: ChannelAuth) -> Attack:
    # Withholding a bulk frame and renumbering the rest: the tag covers the lost one too.
    untagged(b, 1, b"lost")
    return [_patch_seq(frame(b, 2, b"", MsgType.EC_DONE), 1)], 0, "mac"


@pytest.mark.parametrize(
    "attack",
    [
        _tampered_payload,
        _tampered_header,
        _replayed,
        _replayed_with_next_seq,
        _reordered,
        _reordered_with_seqs_fixed,
        _made_up_tag,
        _no_mac,
        _untagged_commit,
        _tampered_untagged,
        _injected_untagged,
        _dropped_untagged,
    ],
)
@pytest.mark.asyncio
async def test_attack_rejected_counted_and_closed(
    pools: tuple[AuthPool, AuthPool],
    attack: Callable[[ChannelAuth], Attack],
) -> None:
    alice, bob = pools
    async with alice_channel(alice) as (ch, r, w):
        b = bob.channel_auth("connect")
        w.write(frame(b, 0, b"hello", MsgType.HELLO))
        assert (await ch.recv(timeout=T)).payload == b"hello"
        frames, n_good, kind = attack(b)
        w.write(b"".join(frames))
        with capture_logs() as logs:
            for _ in range(n_good):  # genuine frames before the attack pass
                await ch.recv(timeout=T)
            with pytest.raises(FrameAuthError) as exc:
                await ch.recv(timeout=T)
        assert exc.value.kind == kind
        assert ch.closed and ch.auth_failures == {kind: 1}
        assert await asyncio.wait_for(r.read(), T) == b""  # closed, no reply mid-session
        (event,) = [e for e in logs if e["log_level"] == "error"]
        assert event["event"] == "peer frame failed authentication, closing"
        assert event["kind"] == kind and event["auth_failures"] == 1
        assert all(isinstance(v, str | int) for e in logs for v in e.values())
        with pytest.raises(PeerClosedError):
            await ch.recv(timeout=T)


@pytest.mark.asyncio
async def test_forged_first_frame_gets_a_plain_error(pools: tuple[AuthPool, AuthPool]) -> None:
    alice, bob = pools
    async with alice_channel(alice) as (ch, r, w):
        w.write(_flip(frame(bob.channel_auth("connect"), 0, b"hi", MsgType.HELLO), 17))
        with pytest.raises(FrameAuthError, match="MAC check failed on HELLO"):
            await ch.recv(timeout=T)
        reply = await asyncio.wait_for(r.read(), T)
        head = decode_header(reply[: HEADER.size])
        assert (head.msg_type, head.mac_len) == (MsgType.ERROR, 0)
        assert "authentication failed" in decode_json(reply[HEADER.size :])["error"]
    assert alice.floor == 0  # nothing accepted, nothing persisted


@pytest.mark.asyncio
async def test_replayed_hello_gets_an_idempotent_floor_announcement(
    pools: tuple[AuthPool, AuthPool],
) -> None:
    alice, bob = pools
    hello = frame(bob.channel_auth("connect"), 0, b"hello", MsgType.HELLO)
    async with alice_channel(alice) as (ch, _, w):
        w.write(hello)
        await ch.recv(timeout=T)
    floor = alice.floor  # after the clean close: just above pad 1
    assert floor == 2
    replies = []
    for _ in range(3):  # the attacker replays it on new connections
        async with alice_channel(alice) as (ch, r, w):
            w.write(hello)
            with pytest.raises(FrameAuthError, match="below this node's pad floor") as exc:
                await ch.recv(timeout=T)
            assert exc.value.kind == "stale" and ch.auth_failures == {"stale": 1}
            replies.append(await asyncio.wait_for(r.read(), T))
    # Authenticated with one pad at Alice's floor, announcing the floor above it;
    # the same frame each time, so replays cost no further pads.
    assert replies[0] == replies[1] == replies[2]
    head = decode_header(replies[0][: HEADER.size])
    assert (head.msg_type, head.mac_len) == (MsgType.ERROR, TAG_LEN)
    assert int.from_bytes(replies[0][-TAG_LEN:][:8], "big") == floor
    assert decode_json(replies[0][HEADER.size : -TAG_LEN])["auth_floor"] == floor + 2
    assert alice.floor == floor + 2


# -- the link -------------------------------------------------------------------
def make_link(role: str, port: int = 0, pool: AuthPool | None = None, **kw: Any) -> PeerLink:
    return peer_link(role, port, authenticator=None if pool is None else pool.channel_auth, **kw)


@pytest.mark.asyncio
async def test_link_round_trip_with_auth(pools: tuple[AuthPool, AuthPool]) -> None:
    alice, bob = pools
    async with (
        make_link("listen", pool=alice) as la,
        make_link("connect", la.port, pool=bob) as lb,
    ):
        a, b = await la.connected(timeout=T), await lb.connected(timeout=T)
        await ping_pong(a, b, 5)
        big = np.arange(200_000, dtype=np.int64)
        await b.send_arrays(MsgType.TAGS, {"t": big})
        np.testing.assert_array_equal((await a.recv(timeout=T)).arrays()["t"], big)
        await ping_pong(a, b)  # Bob's PING tag covers the TAGS frame before it
        assert b.sent_bytes["PING"] == 6 * (HEADER.size + TAG_LEN)  # trailers are disclosed too
        assert b.sent_bytes["TAGS"] == HEADER.size + len(encode_arrays({"t": big}))  # no trailer
        assert la.auth_failures.total() == lb.auth_failures.total() == 0
    # Both closed cleanly: the floors came down to the same place, just above the pads used.
    assert alice.floor == bob.floor == 2 * (1 + 6)


def test_untagged_frames_bounded_and_covered(pools: tuple[AuthPool, AuthPool]) -> None:
    alice, bob = pools
    a, b = alice.channel_auth("listen"), bob.channel_auth("connect")
    assert not b.defers(MsgType.EC_QUERY, 10)  # a session opens with a tag
    check(a, frame(b, 0, b"hello", MsgType.HELLO))
    assert not b.defers(MsgType.COMMIT, 10) and not b.defers(MsgType.PING, 0)
    assert not b.defers(MsgType.TAGS, auth.MAX_DEFERRED_BYTES)  # too big to wait
    seq, run = 1, 0
    while b.defers(MsgType.EC_QUERY, 10):
        a.accept_deferred(untagged(b, seq, bytes(10)))
        seq, run = seq + 1, run + 1
    assert run == auth.MAX_DEFERRED_FRAMES
    # One more untagged frame is refused at the receiver: the sender had to tag it.
    with pytest.raises(FrameAuthError, match="at most 256 frames") as exc:
        a.accept_deferred(encode_frame(MsgType.EC_QUERY, seq, bytes(10)))
    assert exc.value.kind == "missing-mac"
    with pytest.raises(AuthError, match="may not go without a MAC"):
        b.defer(encode_frame(MsgType.EC_QUERY, seq, bytes(10)))
    check(a, frame(b, seq, bytes(10), MsgType.EC_QUERY))  # covers all 256 before it
    assert b.defers(MsgType.EC_QUERY, 10)  # and a new run starts
    # Two pads for 258 frames: the HELLO's and the one closing the run.
    assert b._tags_sent == 2 and b._sent == 258


@pytest.mark.asyncio
async def test_bulk_traffic_costs_a_tag_per_run(pools: tuple[AuthPool, AuthPool]) -> None:
    """Error correction's thousands of small frames spend a pad per 257, not one each."""
    alice, bob = pools
    async with (
        make_link("listen", pool=alice) as la,
        make_link("connect", la.port, pool=bob) as lb,
    ):
        a, b = await la.connected(timeout=T), await lb.connected(timeout=T)
        for i in range(1000):
            await b.send(MsgType.EC_QUERY, i.to_bytes(4, "big"))
            assert (await a.recv(timeout=T)).payload == i.to_bytes(4, "big")
            await a.send(MsgType.EC_ANSWER, i.to_bytes(4, "little"))
            assert (await b.recv(timeout=T)).payload == i.to_bytes(4, "little")
        await ping_pong(a, b)  # the tags closing both directions' last runs
        assert la.auth_failures.total() == lb.auth_failures.total() == 0
    # Per direction: 1000 bulk frames make 3 full runs of 257 (the last one tagged), the
    # PING/PONG closes the 4th; Bob's HELLO and Alice's HELLO_ACK take one pad each.
    per_side = 1 + 3 + 1
    assert alice.floor == bob.floor == 2 * per_side


@pytest.mark.asyncio
async def test_pads_never_reused_across_reconnect_and_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    psk = psk_bytes()
    alice, bob = pool_at(tmp_path / "a", psk), pool_at(tmp_path / "b", psk)
    sent: dict[str, list[int]] = {"alice": [], "bob": []}
    real = AuthPool._pad_for_sending

    def recording(self: AuthPool, index: int) -> bytes:
        sent["bob" if self.path.parent.name == "b" else "alice"].append(index)
        return real(self, index)

    monkeypatch.setattr(AuthPool, "_pad_for_sending", recording)
    with capture_logs() as logs:
        la = make_link("listen", pool=alice)
        await la.__aenter__()
        port = la.port
        async with make_link("connect", port, pool=bob) as lb:
            a, b = await la.connected(timeout=T), await lb.connected(timeout=T)
            await ping_pong(a, b, 10)
            await b.close()  # a reconnect
            with pytest.raises(PeerClosedError):
                await a.recv(timeout=T)
            a2, b2 = await la.connected(timeout=T), await lb.connected(timeout=T)
            assert a2 is not a
            await ping_pong(a2, b2, 10)
            # Alice crashes: no clean release, her floor stays a chunk ahead.
            monkeypatch.setattr(alice, "_release", lambda: None)
            await la.__aexit__(None, None, None)
            with pytest.raises(PeerClosedError):  # Bob sees Alice go
                await b2.recv(timeout=T)
            alice.close()
            alice = pool_at(tmp_path / "a", psk)
            used_before = sent["alice"] + sent["bob"]
            assert alice.floor > max(used_before)
            async with make_link("listen", port, pool=alice) as la2:
                a3, b3 = await la2.connected(timeout=T), await lb.connected(timeout=T)
                await ping_pong(a3, b3, 10)
                # Bob's floor was behind Alice's: one stale HELLO, then he skipped ahead.
                assert la2.auth_failures == {"stale": 1}
    all_sent = sent["alice"] + sent["bob"]
    assert len(all_sent) == len(set(all_sent)) > 60
    assert all(i % 2 == 0 for i in sent["alice"]) and all(i % 2 == 1 for i in sent["bob"])
    assert any(e["event"] == "peer announced its authentication pad floor" for e in logs)
    alice.close()
    bob.close()


@pytest.mark.asyncio
async def test_bob_floor_behind_recovers(pools: tuple[AuthPool, AuthPool]) -> None:
    alice, bob = pools
    alice.raise_floor(500)  # e.g. Alice persisted far ahead and Bob lost nothing
    async with (
        make_link("listen", pool=alice) as la,
        make_link("connect", la.port, pool=bob) as lb,
    ):
        a, b = await la.connected(timeout=T), await lb.connected(timeout=T)
        await ping_pong(a, b)
        assert la.auth_failures == {"stale": 1} and lb.rejected == 1
        assert bob.floor >= 502


@pytest.mark.asyncio
async def test_tampering_on_a_link_is_counted_and_the_link_recovers(
    pools: tuple[AuthPool, AuthPool],
) -> None:
    alice, bob = pools
    async with (
        make_link("listen", pool=alice) as la,
        make_link("connect", la.port, pool=bob) as lb,
    ):
        a, b = await la.connected(timeout=T), await lb.connected(timeout=T)
        await ping_pong(a, b)
        assert b._auth is not None
        # A man in the middle flips a bit of Bob's next frame.
        b._w.write(_flip(encode_frame(MsgType.PING, 2, b"x", authenticator=b._auth), 16))
        with pytest.raises(FrameAuthError, match="MAC check failed on PING"):
            await a.recv(timeout=T)
        assert la.auth_failures == {"mac": 1}
        with pytest.raises(PeerClosedError):
            await b.recv(timeout=T)
        a2, b2 = await la.connected(timeout=T), await lb.connected(timeout=T)
        await ping_pong(a2, b2)


@pytest.mark.asyncio
async def test_exhausted_pool_keeps_the_link_alive_and_says_why(tmp_path: Path) -> None:
    psk = psk_bytes(4096)  # 192 pads
    with pool_at(tmp_path / "a", psk) as alice, pool_at(tmp_path / "b", psk) as bob:
        bob.raise_floor(192)
        async with (
            make_link("listen", pool=alice) as la,
            make_link("connect", la.port, pool=bob) as lb,
        ):
            with pytest.raises(TimeoutError):  # Bob keeps trying (with backoff), and says why
                await lb.connected(timeout=0.5)
            assert lb.rejected >= 1
            assert "authentication key pool exhausted" in lb.last_error
            assert lb.channel is None and la.auth_failures.total() == 0


@pytest.mark.asyncio
async def test_handshake_mismatch_under_auth_is_not_an_auth_failure(
    pools: tuple[AuthPool, AuthPool],
) -> None:
    alice, bob = pools
    async with (
        make_link("listen", pool=alice) as la,
        make_link("connect", la.port, pool=bob, protocol="bb84") as lb,
    ):
        with pytest.raises(TimeoutError):
            await lb.connected(timeout=0.5)
        assert "protocol 'bb84'" in lb.last_error and "rejected the handshake" in lb.last_error
        assert la.auth_failures.total() == lb.auth_failures.total() == 0


@pytest.mark.asyncio
async def test_mac_presence_must_match(pools: tuple[AuthPool, AuthPool]) -> None:
    alice, bob = pools
    # Bob authenticates, Alice does not: his HELLO carries a MAC she cannot check.
    async with make_link("listen") as la, make_link("connect", la.port, pool=bob) as lb:
        with pytest.raises(TimeoutError):
            await lb.connected(timeout=0.5)
        assert la.auth_failures["unexpected-mac"] >= 1 and la.channel is None
    # Alice authenticates, Bob does not: she refuses, and says why in a plain ERROR.
    async with make_link("listen", pool=alice) as la, make_link("connect", la.port) as lb:
        with pytest.raises(TimeoutError):
            await lb.connected(timeout=0.5)
        assert la.auth_failures["missing-mac"] >= 1
        assert "authentication failed" in lb.last_error


@pytest.mark.asyncio
async def test_unauthenticated_floor_hint_is_ignored(pools: tuple[AuthPool, AuthPool]) -> None:
    _, bob = pools

    async def mallory(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read(100)
        lie = {"error": "authentication pad floor", "auth_floor": 10**12}
        w.write(encode_frame(MsgType.ERROR, 0, b"%b" % str(lie).replace("'", '"').encode()))
        await w.drain()
        w.close()

    server = await asyncio.start_server(mallory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with make_link("connect", port, pool=bob) as lb:
            with pytest.raises(TimeoutError):
                await lb.connected(timeout=0.5)
            assert lb.rejected >= 1
            assert "unauthenticated ERROR" in lb.last_error
    finally:
        server.close()
        await server.wait_closed()
    assert bob.floor < 100  # the lie moved nothing


def test_frame_error_hierarchy() -> None:
    # Callers that catch FrameError keep working: authentication failures are frame errors.
    assert issubclass(FrameAuthError, FrameError)
