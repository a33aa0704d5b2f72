"""The classical channel between Alice and Bob: framed, versioned messages over TCP.

Frame layout (header big-endian, 16 bytes; the ``flags``/``mac_len`` pair is
the ``H`` of ``>4sBBHII``, split in two bytes)::

    offset size field
    0      4    magic    b"QKDP"
    4      1    version  1
    5      1    type     MsgType
    6      1    flags    bit 0: a MAC trailer follows the payload; other bits reserved (0)
    7      1    mac_len  length of the MAC trailer in bytes (0 when bit 0 is clear)
    8      4    seq      per-direction sequence number: 0, 1, 2, ... (mod 2**32)
    12     4    length   payload length in bytes (<= MAX_FRAME)
    16     length   payload  JSON (control) or encode_arrays() (data)
    ...    mac_len  mac      tag over header + payload (see :class:`Authenticator`)

Without an authenticator no MAC is sent (v1).  With one (``qnoded.auth``: a
Wegman-Carter tag over the frames' headers and payloads and the one-time pad's
index; the headers carry ``seq``, so it also stops replays) a frame carries the
trailer; the header does not change: the reader always knows how many trailer
bytes to read from ``mac_len``.  :class:`PeerLink` takes a factory and gives
each connection its own :class:`SessionAuthenticator`.

A tag costs one-time pad bits, secret key, and error correction alone sends
thousands of small frames per block, so bulk frames may go without a MAC and
are covered by the sender's next tag, which authenticates every frame of its
direction since the previous tag (the *transcript*).  Which frames may wait,
and how many, is the authenticator's rule, the same at both ends
(``qnoded.auth.DEFERRABLE``): only frames whose effect dies with the session
(time tags, sifting, QBER samples, Cascade queries and answers), never one on
which a node stores, commits or activates anything.  So nothing leaves a
session before every frame that led to it is authenticated; a tampered bulk
frame is caught by the next tag, which fails, and the session with its block
in flight is dropped.

On an authenticated channel a frame that fails authentication (forged,
tampered, replayed, reordered, or without a MAC where one is due) raises
:class:`FrameAuthError`, is logged and counted per kind, and closes the
channel; so does a MAC on a channel without authentication.  The one
unauthenticated frame accepted there outside the rule above is an ERROR as the
very first frame (the peer could not authenticate us): it only ends the
connection.

A bad magic, version, type, flag, length or sequence number raises
:class:`FrameError` naming the field; :class:`PeerChannel` then closes the
connection.  Nothing is read past ``MAX_FRAME`` (+ a 255-byte trailer).
Everything sent is counted per message type: what the protocol discloses is
accounted for (``disclosed_bytes``).

Array payload layout (little-endian), :func:`encode_arrays`::

    u16 count
    per array:
        u8  name_len, name (UTF-8, unique)
        u8  dtype code (1 int64, 2 uint8, 3 float64)
        u8  ndim (<= 8), then u64 x ndim shape
        data: prod(shape) x itemsize bytes, C order
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import math
import struct
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, NamedTuple, Protocol, Self

import numpy as np
import numpy.typing as npt
import structlog

from qnoded.backoff import backoff_s

log = structlog.get_logger("qnoded.peer")

MAGIC = b"QKDP"
VERSION = 1
HEADER = struct.Struct(">4sBBBBII")  # magic, version, type, flags, mac_len, seq, length
MAX_FRAME = 64 * 1024 * 1024
FLAG_MAC = 0x01
KNOWN_FLAGS = FLAG_MAC
PROTOCOLS = ("bb84", "bbm92")
MAX_NDIM = 8
CLOSE_TIMEOUT_S = 1.0
BACKOFF_BASE_S = 0.1
BACKOFF_CAP_S = 5.0


class FrameError(ValueError):
    """A frame or payload is malformed; the message says which field."""


class HandshakeError(FrameError):
    """The peer is not the one configured (version, node ids or protocol differ)."""


class PeerClosedError(ConnectionError):
    """The peer closed the connection between two frames (or the channel is closed)."""


class AuthUnavailableError(ConnectionError):
    """This node cannot authenticate what it sends (its key pool is exhausted).

    A ``ConnectionError``: the link treats it as a connection that cannot be
    made, keeps its tasks alive and says why in ``last_error``.
    """


class FrameAuthError(FrameError):
    """A frame failed authentication; ``kind`` names how, for counters.

    Kinds: ``mac`` (tag wrong: tampered or forged), ``pad`` (wrong pad index:
    replayed, reordered or injected), ``seq`` (sequence number, on an
    authenticated channel), ``stale`` (a first frame below our pad floor:
    replayed, or the peer's floor is behind), ``missing-mac``,
    ``unexpected-mac``, ``mac-len``.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


Role = Literal["listen", "connect"]


class MsgType(enum.IntEnum):
    """Message types; the values are wire codes: append new ones, never renumber."""

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
    # Post-processing of one block (Alice leads; see qnoded/blocks.py).
    BLOCK_START = 12
    EC_QUERY = 13
    EC_ANSWER = 14
    EC_DONE = 15
    VERIFY = 16
    PREPARED = 17
    COMMIT = 18
    ABORT = 19
    # After a reconnect Bob asks about blocks he holds pending.
    RECOVER = 20
    RECOVER_REPLY = 21


class Authenticator(Protocol):
    """Frame authentication as :func:`encode_frame`/:func:`decode_frame` use it."""

    @property
    def tag_len(self) -> int:
        """Bytes of tag per frame (1..255)."""
        ...

    def tag(self, data: bytes) -> bytes:
        """Tag over header + payload."""
        ...

    def verify(self, data: bytes, tag: bytes) -> bool:
        """True if ``tag`` authenticates ``data``."""
        ...


class SessionAuthenticator(Authenticator, Protocol):
    """One connection's authentication state (``qnoded.auth.ChannelAuth``).

    Every frame sent goes, in order, either to :meth:`tag` or, when
    :meth:`defers` says it may wait for the next tag, to :meth:`defer`; both
    may raise :class:`PeerClosedError` (the session is over), :meth:`tag` also
    another error (no key left).  Every frame received goes, in order, to
    :meth:`check` (it has a MAC) or :meth:`accept_deferred` (it has none).
    A tag covers the frame it ends and every deferred frame before it.
    """

    def defers(self, msg_type: MsgType, payload_len: int) -> bool:
        """True if the next frame sent may go without a MAC, covered by the next tag."""
        ...

    def defer(self, data: bytes) -> None:
        """``data`` (header + payload) is sent without a MAC; the next tag covers it."""
        ...

    def check(self, data: bytes, trailer: bytes) -> None:
        """Accept ``data`` (header + payload) as the peer's next frame, else raise
        :class:`FrameAuthError`."""
        ...

    def accept_deferred(self, data: bytes) -> None:
        """Take the peer's next frame, which has no MAC, into the transcript its next
        tag must cover; :class:`FrameAuthError` (``missing-mac``) if that frame may
        not wait for a tag."""
        ...

    def hint(self) -> int | None:
        """After :meth:`check` refused the peer's first frame as ``stale``: the pad floor
        to announce in an ERROR, which the next :meth:`tag` then covers; else None."""
        ...

    def raise_floor(self, floor: int) -> None:
        """The peer's authenticated ERROR said its pad floor is ``floor``: skip to it."""
        ...

    def close(self) -> None:
        """The connection is over (idempotent)."""
        ...


AuthenticatorFactory = Callable[[Role], SessionAuthenticator]


class Header(NamedTuple):
    msg_type: MsgType
    flags: int
    mac_len: int
    seq: int
    length: int


@dataclass(frozen=True, slots=True)
class Frame:
    msg_type: MsgType
    seq: int
    payload: bytes
    flags: int = 0

    def json(self) -> Any:
        """The payload as JSON; :class:`FrameError` if it is not."""
        return decode_json(self.payload, what=self.msg_type.name)

    def arrays(self) -> dict[str, npt.NDArray[Any]]:
        """The payload as named arrays (:func:`decode_arrays`)."""
        return decode_arrays(self.payload)


# -- frames ----------------------------------------------------------------------
def encode_frame(
    msg_type: MsgType, seq: int, payload: bytes, *, authenticator: Authenticator | None = None
) -> bytes:
    """One frame: header, payload and (with an authenticator) the MAC trailer."""
    if len(payload) > MAX_FRAME:
        raise FrameError(f"payload of {len(payload)} bytes exceeds MAX_FRAME {MAX_FRAME}")
    mac_len = 0 if authenticator is None else authenticator.tag_len
    if not 0 <= mac_len <= 255:
        raise FrameError(f"mac_len {mac_len} does not fit the header (0..255)")
    flags = FLAG_MAC if mac_len else 0
    head = HEADER.pack(
        MAGIC, VERSION, int(msg_type), flags, mac_len, seq & 0xFFFFFFFF, len(payload)
    )
    if authenticator is None:
        return head + payload
    tag = authenticator.tag(head + payload)
    if len(tag) != mac_len:
        raise FrameError(f"authenticator gave a {len(tag)}-byte tag, declared {mac_len}")
    return head + payload + tag


def decode_header(header: bytes) -> Header:
    """Validate a 16-byte header; :class:`FrameError` naming the bad field."""
    if len(header) != HEADER.size:
        raise FrameError(f"header truncated: {len(header)} bytes, expected {HEADER.size}")
    magic, version, mtype, flags, mac_len, seq, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r} (expected {MAGIC!r}): not a qnoded peer")
    if version != VERSION:
        raise FrameError(f"protocol version {version}, this node speaks {VERSION}")
    try:
        kind = MsgType(mtype)
    except ValueError:
        raise FrameError(f"unknown message type {mtype}") from None
    if flags & ~KNOWN_FLAGS:
        raise FrameError(f"reserved flag bits set in flags {flags:#04x}")
    if bool(flags & FLAG_MAC) != bool(mac_len):
        raise FrameError(f"flags {flags:#04x} and mac_len {mac_len} disagree")
    if length > MAX_FRAME:
        raise FrameError(f"frame length {length} exceeds MAX_FRAME {MAX_FRAME}")
    return Header(kind, flags, mac_len, seq, length)


def _check_mac(
    header: Header, data: bytes, tag: bytes, authenticator: Authenticator | None
) -> None:
    if authenticator is None:
        if header.mac_len:
            raise FrameAuthError(
                "unexpected-mac", "MAC present but this channel has no authentication configured"
            )
        return
    if header.mac_len != authenticator.tag_len:
        raise FrameAuthError(
            "missing-mac" if not header.mac_len else "mac-len",
            f"mac_len {header.mac_len}, this channel's authenticator uses {authenticator.tag_len}",
        )
    if not authenticator.verify(data, tag):
        raise FrameAuthError("mac", f"MAC check failed on {header.msg_type.name} seq {header.seq}")


def decode_frame(
    data: bytes | bytearray | memoryview, *, authenticator: Authenticator | None = None
) -> tuple[Frame, int]:
    """Decode the frame at the start of ``data``; return it and the bytes it used.

    Sequence numbers are the channel's business (:meth:`PeerChannel.recv`).
    """
    view = memoryview(data)
    if len(view) < HEADER.size:
        raise FrameError(f"header truncated: {len(view)} bytes, expected {HEADER.size}")
    head_bytes = bytes(view[: HEADER.size])
    header = decode_header(head_bytes)
    end = HEADER.size + header.length
    total = end + header.mac_len
    if len(view) < total:
        raise FrameError(
            f"{header.msg_type.name} frame truncated: payload {header.length} + mac "
            f"{header.mac_len} bytes declared, {len(view) - HEADER.size} present"
        )
    payload = bytes(view[HEADER.size : end])
    _check_mac(header, head_bytes + payload, bytes(view[end:total]), authenticator)
    return Frame(header.msg_type, header.seq, payload, header.flags), total


# -- payloads --------------------------------------------------------------------
def encode_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def decode_json(data: bytes, *, what: str = "payload") -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise FrameError(f"{what} is not valid JSON: {exc}") from None


_DTYPES: dict[int, np.dtype[Any]] = {1: np.dtype("<i8"), 2: np.dtype("u1"), 3: np.dtype("<f8")}
_NAMES = {1: "int64", 2: "uint8", 3: "float64"}
_U16 = struct.Struct("<H")
_U8 = struct.Struct("<B")
_CODE_NDIM = struct.Struct("<BB")


def _dtype_code(dtype: np.dtype[Any]) -> int | None:
    for code, dt in _DTYPES.items():
        if dtype.kind == dt.kind and dtype.itemsize == dt.itemsize:
            return code
    return None


def encode_arrays(arrays: Mapping[str, npt.ArrayLike]) -> bytes:
    """Named arrays (int64, uint8 or float64, up to 8-d) in the little-endian layout above."""
    if len(arrays) > 0xFFFF:
        raise FrameError(f"{len(arrays)} arrays: at most 65535 per payload")
    parts = [_U16.pack(len(arrays))]
    size = _U16.size
    for name, value in arrays.items():
        raw = name.encode()
        if len(raw) > 255:
            raise FrameError(f"array name {name[:40]!r}...: longer than 255 bytes")
        a = np.asarray(value)
        code = _dtype_code(a.dtype)
        if code is None:
            raise FrameError(f"array {name!r}: dtype {a.dtype} not allowed (int64, uint8, float64)")
        if a.ndim > MAX_NDIM:
            raise FrameError(f"array {name!r}: ndim {a.ndim} exceeds {MAX_NDIM}")
        data = np.ascontiguousarray(a, dtype=_DTYPES[code]).tobytes()
        parts += [
            _U8.pack(len(raw)),
            raw,
            _CODE_NDIM.pack(code, a.ndim),
            struct.pack(f"<{a.ndim}Q", *a.shape),
            data,
        ]
        size += 1 + len(raw) + 2 + 8 * a.ndim + len(data)
        if size > MAX_FRAME:
            raise FrameError(f"arrays exceed MAX_FRAME {MAX_FRAME} bytes at {name!r}")
    return b"".join(parts)


def decode_arrays(data: bytes | bytearray | memoryview) -> dict[str, npt.NDArray[Any]]:
    """Inverse of :func:`encode_arrays`: native-order, writable copies.

    Any inconsistency raises :class:`FrameError` naming the array and field;
    nothing is allocated beyond what ``data`` holds.
    """
    view = memoryview(data).cast("B")
    end = len(view)

    def need(pos: int, n: int, what: str) -> None:
        if n > end - pos:
            raise FrameError(f"{what} truncated: {n} bytes declared, {end - pos} remain")

    need(0, _U16.size, "array count")
    (count,) = _U16.unpack_from(view, 0)
    pos = _U16.size
    out: dict[str, npt.NDArray[Any]] = {}
    for k in range(count):
        need(pos, 1, f"array {k}: name length")
        nlen = view[pos]
        pos += 1
        need(pos, nlen, f"array {k}: name")
        try:
            name = bytes(view[pos : pos + nlen]).decode()
        except UnicodeDecodeError:
            raise FrameError(f"array {k}: name is not UTF-8") from None
        pos += nlen
        if name in out:
            raise FrameError(f"array {name!r}: name appears twice")
        need(pos, _CODE_NDIM.size, f"array {name!r}: dtype/ndim")
        code, ndim = _CODE_NDIM.unpack_from(view, pos)
        pos += _CODE_NDIM.size
        dtype = _DTYPES.get(code)
        if dtype is None:
            raise FrameError(f"array {name!r}: unknown dtype code {code} (allowed: {_NAMES})")
        if ndim > MAX_NDIM:
            raise FrameError(f"array {name!r}: ndim {ndim} exceeds {MAX_NDIM}")
        need(pos, 8 * ndim, f"array {name!r}: shape")
        shape = struct.unpack_from(f"<{ndim}Q", view, pos)
        pos += 8 * ndim
        if any(d > MAX_FRAME for d in shape):
            # Even with a zero elsewhere (no data), numpy cannot build such a shape.
            raise FrameError(f"array {name!r}: shape {list(shape)} has a dimension > MAX_FRAME")
        if 0 in shape and math.prod(d for d in shape if d) * dtype.itemsize > MAX_FRAME:
            # Nor one whose other dimensions multiply past its size limit.
            raise FrameError(f"array {name!r}: shape {list(shape)} spans more than MAX_FRAME")
        nbytes = math.prod(shape) * dtype.itemsize  # exact: Python ints never overflow
        need(pos, nbytes, f"array {name!r}: data ({_NAMES[code]}{list(shape)})")
        flat = np.frombuffer(view[pos : pos + nbytes], dtype=dtype)
        out[name] = flat.astype(dtype.newbyteorder("="), copy=True).reshape(shape)
        pos += nbytes
    if pos != end:
        raise FrameError(f"{end - pos} trailing bytes after {count} arrays")
    return out


def _error_text(payload: bytes) -> str:
    """An ERROR payload's reason, for logs (at most 200 characters)."""
    with contextlib.suppress(FrameError):
        doc = decode_json(payload)
        if isinstance(doc, dict):
            return str(doc.get("error", doc))[:200]
    return payload[:200].decode("utf-8", "replace")


# -- one connection --------------------------------------------------------------
class PeerChannel:
    """One connection: frames with sequence checks, timeouts and disclosure counters.

    Counters are keyed by message type name: ``sent_bytes``/``recv_bytes``
    (whole frames, headers included) and ``sent_frames``/``recv_frames``;
    ``auth_failures`` by :class:`FrameAuthError` kind (pass a shared Counter to
    sum over channels).  A malformed frame or sequence number closes the channel.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        authenticator: SessionAuthenticator | None = None,
        auth_failures: Counter[str] | None = None,
    ) -> None:
        self._r = reader
        self._w = writer
        self._auth = authenticator
        self.auth_failures: Counter[str] = Counter() if auth_failures is None else auth_failures
        self._send_seq = 0
        self._recv_seq = 0
        self._pending: Header | None = None  # a header whose body a timeout interrupted
        self._send_lock = asyncio.Lock()
        self._recv_lock = asyncio.Lock()
        self._closed = asyncio.Event()
        self.opened = time.monotonic()
        self.last_sent = self.opened
        self.last_received = self.opened
        self.sent_bytes: Counter[str] = Counter()
        self.recv_bytes: Counter[str] = Counter()
        self.sent_frames: Counter[str] = Counter()
        self.recv_frames: Counter[str] = Counter()
        peer = writer.get_extra_info("peername")
        self.address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.peer_name = ""

    @property
    def disclosed_bytes(self) -> int:
        """Everything this node has told its peer, in bytes (headers included)."""
        return sum(self.sent_bytes.values())

    @property
    def received_bytes(self) -> int:
        return sum(self.recv_bytes.values())

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def send(self, msg_type: MsgType, payload: bytes, *, timeout: float = 10.0) -> None:
        """Send one frame; ``TimeoutError`` if the peer does not drain it in ``timeout`` s."""
        if self.closed:
            raise PeerClosedError(f"channel to {self.address} is closed")
        async with self._send_lock:
            try:
                if self._auth is not None and self._auth.defers(msg_type, len(payload)):
                    frame = encode_frame(msg_type, self._send_seq, payload)
                    self._auth.defer(frame)
                else:
                    frame = encode_frame(
                        msg_type, self._send_seq, payload, authenticator=self._auth
                    )
            except PeerClosedError:  # the authentication session ended (a newer one runs)
                await self.close()
                raise
            self._send_seq = (self._send_seq + 1) & 0xFFFFFFFF
            self._w.write(frame)
            self.sent_bytes[msg_type.name] += len(frame)
            self.sent_frames[msg_type.name] += 1
            self.last_sent = time.monotonic()
            async with asyncio.timeout(timeout):
                await self._w.drain()

    async def send_json(self, msg_type: MsgType, obj: Any, *, timeout: float = 10.0) -> None:
        await self.send(msg_type, encode_json(obj), timeout=timeout)

    async def send_arrays(
        self, msg_type: MsgType, arrays: Mapping[str, npt.ArrayLike], *, timeout: float = 10.0
    ) -> None:
        await self.send(msg_type, encode_arrays(arrays), timeout=timeout)

    async def _read(self, n: int, *, at_boundary: bool) -> bytes:
        try:
            return await self._r.readexactly(n)
        except asyncio.IncompleteReadError as exc:
            if at_boundary and not exc.partial:
                raise PeerClosedError(f"peer {self.address} closed the connection") from None
            raise FrameError(
                f"frame truncated: connection closed after {len(exc.partial)} of {n} bytes"
            ) from None

    async def recv(self, timeout: float | None = None) -> Frame:
        """The next frame.

        ``TimeoutError`` after ``timeout`` s leaves the channel usable (a
        half-read frame is resumed by the next call).  :class:`FrameError` on
        a malformed or unauthentic frame and :class:`PeerClosedError` on EOF
        close the channel.
        """
        if self.closed:
            raise PeerClosedError(f"channel to {self.address} is closed")
        async with self._recv_lock:
            try:
                async with asyncio.timeout(timeout):
                    if self._pending is None:
                        head = await self._read(HEADER.size, at_boundary=True)
                        header = decode_header(head)
                        self._check_seq(header)
                        self._pending = header
                    header = self._pending
                    body = await self._read(header.length + header.mac_len, at_boundary=False)
                self._pending = None
                payload = body[: header.length]
                self._authenticate(header, payload, body[header.length :])
            except (FrameError, PeerClosedError) as exc:
                if isinstance(exc, FrameError):
                    await self._rejected(exc)
                await self.close()
                raise
            except TimeoutError:
                raise  # the channel stays usable (TimeoutError is also an OSError)
            except OSError as exc:  # reset, broken pipe: the peer is gone
                await self.close()
                raise PeerClosedError(f"connection to {self.address} lost: {exc}") from exc
            self._recv_seq = (self._recv_seq + 1) & 0xFFFFFFFF
            name = header.msg_type.name
            self.recv_bytes[name] += HEADER.size + len(body)
            self.recv_frames[name] += 1
            self.last_received = time.monotonic()
            return Frame(header.msg_type, header.seq, payload, header.flags)

    def _check_seq(self, header: Header) -> None:
        if header.seq != self._recv_seq:
            msg = (
                f"sequence number {header.seq}, expected {self._recv_seq}: "
                "a frame was replayed, reordered or lost"
            )
            # Under authentication the header is not trusted yet: count it as an attack.
            raise FrameError(msg) if self._auth is None else FrameAuthError("seq", msg)

    def _authenticate(self, header: Header, payload: bytes, trailer: bytes) -> None:
        if self._auth is None:
            _check_mac(header, b"", trailer, None)
            return
        if not header.mac_len and header.msg_type is MsgType.ERROR and self._recv_seq == 0:
            # The peer refused us before anything was authenticated (our MAC
            # failed there, its pool is empty, ...).  Its text is not
            # authenticated: it ends this connection and nothing else.
            raise HandshakeError(
                f"peer rejected the handshake (unauthenticated ERROR): {_error_text(payload)}"
            )
        head = HEADER.pack(
            MAGIC, VERSION, header.msg_type, header.flags, header.mac_len, header.seq, header.length
        )
        if not header.mac_len:
            # Raises unless this kind of frame may wait for the peer's next tag.
            self._auth.accept_deferred(head + payload)
            return
        if header.mac_len != self._auth.tag_len:
            _check_mac(header, b"", trailer, self._auth)  # raises: wrong-size MAC
        self._auth.check(head + payload, trailer)

    async def _rejected(self, exc: FrameError) -> None:
        """Log (and count) a rejected frame; answer a refused first frame with an ERROR."""
        if not isinstance(exc, FrameAuthError):
            log.error("peer frame rejected, closing", peer=self.address, error=str(exc))
            return
        self.auth_failures[exc.kind] += 1
        log.error(
            "peer frame failed authentication, closing",
            peer=self.address,
            kind=exc.kind,
            error=str(exc),
            auth_failures=self.auth_failures.total(),
        )
        if self._auth is None or self._send_seq or self._recv_seq or self.closed:
            return
        # The peer's first frame, and we have said nothing yet: tell it why, so
        # both logs name the problem.  A stale first frame gets our pad floor,
        # authenticated with a pad of our own, so the peer can skip ahead.
        with contextlib.suppress(Exception):  # a best-effort courtesy: we close anyway
            floor = self._auth.hint() if exc.kind == "stale" else None
            if floor is None:
                frame = encode_frame(
                    MsgType.ERROR, 0, encode_json({"error": f"authentication failed: {exc}"})
                )
            else:
                doc = {"error": "authentication pad floor", "auth_floor": floor}
                frame = encode_frame(MsgType.ERROR, 0, encode_json(doc), authenticator=self._auth)
            self._w.write(frame)
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self._w.drain()

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
        """Close the connection (idempotent); aborts if the peer does not let go in 1 s."""
        if self.closed:
            return
        self._closed.set()
        if self._auth is not None:
            self._auth.close()
        self._w.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self._w.wait_closed()
        except TimeoutError:
            self._w.transport.abort()
        except (OSError, RuntimeError):
            pass  # the connection was already broken: closed is what we wanted


# -- the link that keeps a channel up --------------------------------------------
class PeerLink:
    """Keeps one classical channel up: Alice (``listen``) accepts, Bob (``connect``) dials.

    An async context manager owning a ``TaskGroup`` (Bob's dial loop, Alice's
    handshakes).  ``await link.connected()`` returns the current channel once
    the HELLO/HELLO_ACK handshake (version, node ids, protocol) has passed.
    When that channel closes, Bob dials again and Alice accepts the next
    connection: the next ``connected()`` returns the new channel.  A newer
    good connection replaces the current one (a restarted peer is not kept
    waiting for the old one to time out).

    ``authenticator`` (e.g. ``AuthPool.channel_auth``) is called with the
    link's role for each connection; without it frames carry no MAC.
    ``auth_failures`` counts frames that failed authentication, by kind.
    """

    def __init__(
        self,
        *,
        role: Literal["listen", "connect"] | str,
        host: str,
        port: int,
        node_id: str,
        peer_id: str,
        protocol: str,
        timeout_s: float = 10.0,
        authenticator: AuthenticatorFactory | None = None,
        backoff_cap_s: float = BACKOFF_CAP_S,
    ) -> None:
        if role not in ("listen", "connect"):
            raise ValueError(f"role must be 'listen' or 'connect', got {role!r}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        self.role: Role = "listen" if role == "listen" else "connect"
        self.host, self.port = host, port
        self.node_id, self.peer_id, self.protocol = node_id, peer_id, protocol
        self.timeout_s = timeout_s
        self.backoff_cap_s = backoff_cap_s
        self._auth = authenticator
        self._current: PeerChannel | None = None
        self._changed = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.rejected = 0  # connections that failed the handshake
        self.connects = 0  # channels that passed it
        # Frames that failed authentication, by FrameAuthError kind, over all channels:
        # anything but a rare "stale" (a peer restarted after a crash) is an attack or a
        # misconfiguration (different PSKs) and deserves an alarm.
        self.auth_failures: Counter[str] = Counter()
        self.last_error = ""
        self._log = log.bind(node=node_id, peer=peer_id, role=role)

    @property
    def channel(self) -> PeerChannel | None:
        """The current channel, if one is up."""
        ch = self._current
        return ch if ch is not None and not ch.closed else None

    async def connected(self, timeout: float | None = None) -> PeerChannel:
        """Wait (up to ``timeout`` s) until a channel is up and return it."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self.channel is not None)
            ch = self.channel
            assert ch is not None
            return ch

    # -- handshake ------------------------------------------------------------
    def _hello(self) -> bytes:
        return encode_json(
            {
                "node_id": self.node_id,
                "peer_id": self.peer_id,
                "protocol": self.protocol,
                "version": VERSION,
            }
        )

    def _check_hello(self, frame: Frame) -> None:
        hello = frame.json()
        if not isinstance(hello, dict):
            raise HandshakeError(f"{frame.msg_type.name} payload is not a JSON object")
        if hello.get("version") != VERSION:
            raise HandshakeError(
                f"peer speaks protocol version {hello.get('version')!r}, this node {VERSION}"
            )
        if hello.get("node_id") != self.peer_id or hello.get("peer_id") != self.node_id:
            raise HandshakeError(
                f"peer says it is {hello.get('node_id')!r} talking to {hello.get('peer_id')!r}; "
                f"expected {self.peer_id!r} talking to {self.node_id!r}"
            )
        if hello.get("protocol") != self.protocol:
            raise HandshakeError(
                f"peer runs protocol {hello.get('protocol')!r}, this node {self.protocol!r}"
            )

    async def _expect(self, ch: PeerChannel, kind: MsgType) -> Frame:
        frame = await ch.recv()
        if frame.msg_type is MsgType.ERROR:
            self._take_floor_hint(ch, frame)
            raise HandshakeError(f"peer rejected the handshake: {_error_text(frame.payload)}")
        if frame.msg_type is not kind:
            raise HandshakeError(f"expected {kind.name}, got {frame.msg_type.name}")
        return frame

    def _take_floor_hint(self, ch: PeerChannel, frame: Frame) -> None:
        # recv() returned it, so on an authenticated channel the peer tagged it:
        # its pad floor is ahead of ours; the next dial starts there.
        if ch._auth is None:
            return
        with contextlib.suppress(FrameError):
            doc = frame.json()
            floor = doc.get("auth_floor") if isinstance(doc, dict) else None
            if isinstance(floor, int) and not isinstance(floor, bool):
                self._log.warning("peer announced its authentication pad floor", floor=floor)
                ch._auth.raise_floor(floor)

    async def _handshake(self, ch: PeerChannel) -> None:
        async with asyncio.timeout(self.timeout_s):
            try:
                if self.role == "connect":
                    await ch.send(MsgType.HELLO, self._hello())
                    self._check_hello(await self._expect(ch, MsgType.HELLO_ACK))
                else:
                    self._check_hello(await self._expect(ch, MsgType.HELLO))
                    await ch.send(MsgType.HELLO_ACK, self._hello())
            except HandshakeError as exc:
                # Tell the peer why, so both logs say what is misconfigured.
                if not ch.closed and "rejected the handshake" not in str(exc):
                    with contextlib.suppress(OSError, TimeoutError):
                        await ch.send_json(MsgType.ERROR, {"error": str(exc)}, timeout=1.0)
                raise
        ch.peer_name = self.peer_id

    async def _offer(self, ch: PeerChannel) -> None:
        if self._tg is None:  # the link closed while this handshake finished
            await ch.close()
            return
        async with self._changed:
            old, self._current = self._current, ch
            self.connects += 1
            self.last_error = ""
            self._changed.notify_all()
        if old is not None and not old.closed:
            self._log.warning("peer channel replaced by a newer connection", address=ch.address)
            await old.close()
        self._log.info("peer channel up", address=ch.address)

    # -- Alice ----------------------------------------------------------------
    def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback: the handshake runs as a task of our TaskGroup, so
        # none outlives the link.
        if self._tg is None:
            writer.close()
            return
        task = self._tg.create_task(self._accept(reader, writer), name="peer-accept")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _channel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> PeerChannel:
        auth = None if self._auth is None else self._auth(self.role)  # one per connection
        return PeerChannel(reader, writer, authenticator=auth, auth_failures=self.auth_failures)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ch = self._channel(reader, writer)
        try:
            await self._handshake(ch)
        except (FrameError, OSError, TimeoutError) as exc:
            self.rejected += 1
            self.last_error = str(exc) or type(exc).__name__
            self._log.error("peer rejected", address=ch.address, error=self.last_error)
            await ch.close()
            return
        except BaseException:  # cancelled mid-handshake (the link is closing): no leak
            await asyncio.shield(ch.close())
            raise
        await self._offer(ch)

    # -- Bob ------------------------------------------------------------------
    async def _dial(self) -> PeerChannel:
        async with asyncio.timeout(self.timeout_s):
            reader, writer = await asyncio.open_connection(self.host, self.port)
        ch = self._channel(reader, writer)
        try:
            await self._handshake(ch)
        except BaseException:
            await ch.close()
            raise
        return ch

    async def _dial_loop(self) -> None:
        attempt = 0
        unreachable_logged = False
        address = f"{self.host}:{self.port}"
        while True:
            try:
                ch = await self._dial()
            except (HandshakeError, AuthUnavailableError) as exc:
                self.rejected += 1
                if str(exc) != self.last_error:  # once per distinct misconfiguration
                    self._log.error("peer handshake failed", address=address, error=str(exc))
                self.last_error = str(exc)
            except (FrameError, OSError, TimeoutError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                if not unreachable_logged:
                    self._log.warning(
                        "peer unreachable, retrying", address=address, error=self.last_error
                    )
                    unreachable_logged = True
            else:
                unreachable_logged = False
                await self._offer(ch)
                await ch.wait_closed()
                self._log.info("peer channel down", address=address)
                if time.monotonic() - ch.opened > 1.0:
                    attempt = 0  # a good session: dial again at once
                    continue
            attempt += 1
            await asyncio.sleep(backoff_s(attempt, base_s=BACKOFF_BASE_S, cap_s=self.backoff_cap_s))

    # -- lifecycle ------------------------------------------------------------
    async def __aenter__(self) -> Self:
        if self._stack is not None:
            raise RuntimeError("PeerLink is not reentrant")
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            self._tg = await stack.enter_async_context(asyncio.TaskGroup())
            if self.role == "listen":
                self._server = await asyncio.start_server(self._on_client, self.host, self.port)
                self.port = int(self._server.sockets[0].getsockname()[1])
                self._log.info("peer listening", address=f"{self.host}:{self.port}")
            else:
                task = self._tg.create_task(self._dial_loop(), name="peer-dial")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except BaseException:
            await self._shutdown()
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        self._tg = None  # no new handshakes
        for task in list(self._tasks):
            task.cancel()
        if self._current is not None:
            await self._current.close()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._server.wait_closed()
            self._server = None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        try:
            await self._shutdown()
        finally:
            if stack is not None:
                await stack.aclose()
