"""The classical channel between Alice and Bob: framed, versioned messages over TCP.

Frame layout (big-endian header, 16 bytes)::

    magic   4s  b"QKDP"
    version B   1
    type    B   MsgType
    flags   B   bit 0: a MAC trailer follows the payload
    mac_len B   length of the MAC trailer in bytes (0 in this version)
    seq     I   per-direction sequence number, from 0, +1 per frame
    length  I   payload length in bytes (<= MAX_FRAME)
    payload
    mac     mac_len bytes (Wegman-Carter tag over header and payload, later)

A frame with a bad magic, version, type, length or sequence number raises
:class:`FrameError`; the channel is closed, never read past ``MAX_FRAME``.
Everything sent is counted per message type: what the protocol discloses is
accounted for.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import random
import struct
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import numpy as np
import numpy.typing as npt
import structlog

log = structlog.get_logger("qnoded.peer")

MAGIC = b"QKDP"
VERSION = 1
HEADER = struct.Struct(">4sBBBBII")
MAX_FRAME = 64 * 1024 * 1024
FLAG_MAC = 0x01


class FrameError(Exception):
    """A frame or payload is malformed; the message says which field."""


class MsgType(enum.IntEnum):
    HELLO = 1
    HELLO_ACK = 2
    TAGS = 3
    SIFT = 4
    QBER_SAMPLE = 5
    QBER_RESULT = 6
    LOCK = 7
    PING = 8
    PONG = 9
    BYE = 10
    ERROR = 11


@dataclass(frozen=True, slots=True)
class Frame:
    msg_type: MsgType
    seq: int
    payload: bytes
    flags: int = 0


def encode_frame(msg_type: MsgType, seq: int, payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME:
        raise FrameError(f"payload of {len(payload)} bytes exceeds MAX_FRAME {MAX_FRAME}")
    return HEADER.pack(MAGIC, VERSION, int(msg_type), 0, 0, seq, len(payload)) + payload


def decode_header(header: bytes) -> tuple[MsgType, int, int, int, int]:
    """Validate a header; return (type, flags, mac_len, seq, length)."""
    if len(header) != HEADER.size:
        raise FrameError(f"header is {len(header)} bytes, expected {HEADER.size}")
    magic, version, mtype, flags, mac_len, seq, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r} (expected {MAGIC!r}): not a qnoded peer")
    if version != VERSION:
        raise FrameError(f"protocol version {version}, this node speaks {VERSION}")
    try:
        kind = MsgType(mtype)
    except ValueError as exc:
        raise FrameError(f"unknown message type {mtype}") from exc
    if length > MAX_FRAME:
        raise FrameError(f"frame length {length} exceeds MAX_FRAME {MAX_FRAME}")
    if bool(flags & FLAG_MAC) != bool(mac_len):
        raise FrameError(f"flags {flags:#x} and mac_len {mac_len} disagree")
    return kind, flags, mac_len, seq, length


# -- array payloads ----------------------------------------------------------------
_DTYPES: dict[int, np.dtype[Any]] = {1: np.dtype("<i8"), 2: np.dtype("u1"), 3: np.dtype("<f8")}
_CODES = {v: k for k, v in _DTYPES.items()}
_ARR_HEAD = struct.Struct("<BBQ")  # name length, dtype code, element count


def encode_arrays(arrays: Mapping[str, npt.NDArray[Any]]) -> bytes:
    """Named 1-d arrays, little-endian: count, then per array name/dtype/length/data."""
    parts = [struct.pack("<H", len(arrays))]
    for name, arr in arrays.items():
        raw = name.encode()
        a = np.ascontiguousarray(arr)
        code = _CODES.get(a.dtype.newbyteorder("<") if a.dtype.itemsize > 1 else a.dtype)
        if code is None or a.ndim != 1 or len(raw) > 255:
            raise FrameError(f"array {name!r}: cannot encode dtype {a.dtype} ndim {a.ndim}")
        parts += [
            _ARR_HEAD.pack(len(raw), code, a.shape[0]),
            raw,
            a.astype(_DTYPES[code], copy=False).tobytes(),
        ]
    return b"".join(parts)


def decode_arrays(data: bytes) -> dict[str, npt.NDArray[Any]]:
    """Inverse of :func:`encode_arrays`; :class:`FrameError` naming the bad field."""
    view = memoryview(data)
    if len(view) < 2:
        raise FrameError("array payload shorter than its count field")
    (count,) = struct.unpack_from("<H", view, 0)
    pos = 2
    out: dict[str, npt.NDArray[Any]] = {}
    for k in range(count):
        if pos + _ARR_HEAD.size > len(view):
            raise FrameError(f"array {k}: header truncated at byte {pos}")
        nlen, code, n = _ARR_HEAD.unpack_from(view, pos)
        pos += _ARR_HEAD.size
        dtype = _DTYPES.get(code)
        if dtype is None:
            raise FrameError(f"array {k}: unknown dtype code {code}")
        if pos + nlen > len(view):
            raise FrameError(f"array {k}: name truncated")
        try:
            name = bytes(view[pos : pos + nlen]).decode()
        except UnicodeDecodeError as exc:
            raise FrameError(f"array {k}: name is not UTF-8") from exc
        pos += nlen
        nbytes = n * dtype.itemsize
        if nbytes > len(view) - pos:
            raise FrameError(f"array {name!r}: {n} elements declared, data truncated")
        out[name] = np.frombuffer(view[pos : pos + nbytes], dtype=dtype).astype(
            dtype.newbyteorder("="), copy=True
        )
        pos += nbytes
    if pos != len(view):
        raise FrameError(f"{len(view) - pos} trailing bytes after {count} arrays")
    return out


class PeerChannel:
    """One connection: sends and receives frames with sequence checks and counters."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._r = reader
        self._w = writer
        self._send_seq = 0
        self._recv_seq = 0
        self._lock = asyncio.Lock()
        self.last_sent = time.monotonic()
        self.sent_bytes: Counter[str] = Counter()
        self.recv_bytes: Counter[str] = Counter()
        self.peer_name = ""

    @property
    def disclosed_bytes(self) -> int:
        """Everything this node has told its peer, in bytes (headers included)."""
        return sum(self.sent_bytes.values())

    async def send(self, msg_type: MsgType, payload: bytes, *, timeout: float = 10.0) -> None:
        async with self._lock:
            frame = encode_frame(msg_type, self._send_seq, payload)
            self._send_seq = (self._send_seq + 1) & 0xFFFFFFFF
            self._w.write(frame)
            async with asyncio.timeout(timeout):
                await self._w.drain()
            self.sent_bytes[msg_type.name] += len(frame)
            self.last_sent = time.monotonic()

    async def recv(self, timeout: float | None = None) -> Frame:
        async with asyncio.timeout(timeout):
            header = await self._r.readexactly(HEADER.size)
            kind, flags, mac_len, seq, length = decode_header(header)
            if seq != self._recv_seq:
                raise FrameError(
                    f"sequence number {seq}, expected {self._recv_seq}: "
                    "a frame was replayed, reordered or lost"
                )
            body = await self._r.readexactly(length + mac_len)
        self._recv_seq = (self._recv_seq + 1) & 0xFFFFFFFF
        self.recv_bytes[kind.name] += HEADER.size + len(body)
        return Frame(kind, seq, body[:length], flags)

    async def goodbye(self, wait_s: float = 1.0) -> None:
        """Orderly end: send BYE, let the peer close first (so nothing it still
        sends meets a reset), then close."""
        with contextlib.suppress(Exception):
            await self.send(MsgType.BYE, b"", timeout=wait_s)
            async with asyncio.timeout(wait_s):
                while await self._r.read(65536):
                    pass
        await self.close()

    async def close(self) -> None:
        self._w.close()
        with contextlib.suppress(Exception):
            await self._w.wait_closed()


class PeerLink:
    """Keeps one authenticated-later classical channel up: Alice listens, Bob connects.

    ``await link.connected()`` returns the current channel once the HELLO
    handshake (version, node ids, protocol) has passed; after a failure the
    caller closes the channel and awaits the next one.
    """

    def __init__(
        self,
        *,
        role: str,
        host: str,
        port: int,
        node_id: str,
        peer_id: str,
        protocol: str,
        timeout_s: float = 10.0,
    ) -> None:
        if role not in ("listen", "connect"):
            raise ValueError(f"role must be 'listen' or 'connect', got {role!r}")
        self.role = role
        self.host, self.port = host, port
        self.node_id, self.peer_id, self.protocol = node_id, peer_id, protocol
        self.timeout_s = timeout_s
        self._channels: asyncio.Queue[PeerChannel] = asyncio.Queue(maxsize=1)
        self._server: asyncio.Server | None = None
        self._tg: asyncio.TaskGroup | None = None
        self.rejected = 0
        self._up_logged = False

    def _hello(self) -> bytes:
        return json.dumps(
            {
                "node_id": self.node_id,
                "peer_id": self.peer_id,
                "protocol": self.protocol,
                "version": VERSION,
            }
        ).encode()

    def _check_hello(self, payload: bytes) -> None:
        try:
            hello = json.loads(payload)
        except ValueError as exc:
            raise FrameError("HELLO payload is not JSON") from exc
        if not isinstance(hello, dict):
            raise FrameError("HELLO payload is not an object")
        if hello.get("node_id") != self.peer_id or hello.get("peer_id") != self.node_id:
            raise FrameError(
                f"peer says it is {hello.get('node_id')!r} talking to "
                f"{hello.get('peer_id')!r}; expected {self.peer_id!r} -> "
                f"{self.node_id!r}"
            )
        if hello.get("protocol") != self.protocol:
            raise FrameError(f"peer runs {hello.get('protocol')!r}, this node {self.protocol!r}")

    async def _handshake(self, ch: PeerChannel) -> None:
        async with asyncio.timeout(self.timeout_s):
            if self.role == "connect":
                await ch.send(MsgType.HELLO, self._hello())
                frame = await ch.recv()
                if frame.msg_type is not MsgType.HELLO_ACK:
                    raise FrameError(f"expected HELLO_ACK, got {frame.msg_type.name}")
                self._check_hello(frame.payload)
            else:
                frame = await ch.recv()
                if frame.msg_type is not MsgType.HELLO:
                    raise FrameError(f"expected HELLO, got {frame.msg_type.name}")
                self._check_hello(frame.payload)
                await ch.send(MsgType.HELLO_ACK, self._hello())

    async def _offer(self, ch: PeerChannel) -> None:
        # A newer connection replaces one nobody has taken yet.
        while not self._channels.empty():
            old = self._channels.get_nowait()
            await old.close()
        await self._channels.put(ch)
        log.info("peer channel up", peer=self.peer_id, role=self.role)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ch = PeerChannel(reader, writer)
        try:
            await self._handshake(ch)
        except (FrameError, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            self.rejected += 1
            log.error(
                "peer rejected",
                error=str(exc) or type(exc).__name__,
                address=str(writer.get_extra_info("peername")),
            )
            await ch.close()
            return
        await self._offer(ch)

    async def _connect_once(self) -> None:
        attempt = 0
        down_logged = False
        while True:
            try:
                async with asyncio.timeout(self.timeout_s):
                    reader, writer = await asyncio.open_connection(self.host, self.port)
                ch = PeerChannel(reader, writer)
                try:
                    await self._handshake(ch)
                except BaseException:
                    await ch.close()
                    raise
                await self._offer(ch)
                return
            except (OSError, TimeoutError, FrameError, asyncio.IncompleteReadError) as exc:
                if isinstance(exc, FrameError):
                    log.error("peer handshake failed", error=str(exc))
                elif not down_logged:
                    log.warning(
                        "peer unreachable, retrying",
                        address=f"{self.host}:{self.port}",
                        error=str(exc) or type(exc).__name__,
                    )
                    down_logged = True
                attempt += 1
                await asyncio.sleep(random.uniform(0, min(5.0, 0.1 * 1.5**attempt)))

    async def connected(self) -> PeerChannel:
        """The next working channel (Bob dials; Alice waits for Bob)."""
        if self.role == "connect" and self._channels.empty():
            await self._connect_once()
        return await self._channels.get()

    async def __aenter__(self) -> Self:
        if self.role == "listen":
            self._server = await asyncio.start_server(self._on_client, self.host, self.port)
            log.info("peer listening", address=f"{self.host}:{self.port}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        while not self._channels.empty():
            await self._channels.get_nowait().close()
