"""A man in the middle for the peer channel: a TCP proxy that reads whole frames.

Bob connects to the proxy instead of Alice; each frame, in each direction,
goes through ``proxy.hook(direction, frame) -> frames to forward``: it may pass
the frame, change bytes, drop it, add frames (replays, injections), or raise
:class:`Cut` to forward part of it and close the connection.  The hook may be
swapped at any time, and :meth:`FrameProxy.stall` holds every byte and every new
connection until :meth:`FrameProxy.release`: one pair of nodes, many attacks.
It sees exactly what an attacker on the wire sees (no keys): headers, payloads,
MAC trailers.

:class:`Mitm` is a hook that passes everything on, keeps what an attacker can
track (sequence numbers, pad indices, the block in flight) and hands each frame
to the :class:`Attack` armed on it, until that attack reports the fault done.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import struct
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Protocol, Self

from qnoded.auth import TAG_LEN
from qnoded.peer import (
    FLAG_MAC,
    HEADER,
    MAGIC,
    VERSION,
    FrameError,
    MsgType,
    decode_arrays,
    decode_header,
)

Direction = Literal["to_alice", "to_bob"]
DIRECTIONS: tuple[Direction, Direction] = ("to_alice", "to_bob")
# The frames of one block's post-processing, each naming its block (qnoded/blocks.py).
BLOCK_MESSAGES = frozenset(
    {
        MsgType.BLOCK_START,
        MsgType.EC_QUERY,
        MsgType.EC_ANSWER,
        MsgType.EC_DONE,
        MsgType.VERIFY,
        MsgType.PREPARED,
        MsgType.COMMIT,
        MsgType.ABORT,
    }
)
_SEQ = struct.Struct(">I")  # the header's seq field, at byte 8
_PAD_INDEX = struct.Struct(">Q")  # a trailer opens with its pad index (qnoded/auth.py)


@dataclass(slots=True)
class WireFrame:
    """One frame as it crossed the proxy: raw bytes and the fields an attacker reads."""

    raw: bytes
    msg_type: MsgType
    seq: int
    length: int
    mac_len: int
    conn: int = 0  # the proxied connection it crossed: 1, 2, ... in order of accept

    @property
    def payload(self) -> bytes:
        return self.raw[HEADER.size : HEADER.size + self.length]

    @property
    def trailer(self) -> bytes:
        return self.raw[HEADER.size + self.length :]

    @property
    def pad_index(self) -> int | None:
        """The one-time pad index its tag names (public: the trailer's first 8 bytes)."""
        return _PAD_INDEX.unpack_from(self.trailer)[0] if self.mac_len else None

    @property
    def block_id(self) -> str | None:
        """The block a post-processing frame belongs to (public: in its payload)."""
        if self.msg_type not in BLOCK_MESSAGES:
            return None
        try:
            raw = decode_arrays(self.payload).get("block_id")
        except FrameError:
            return None
        return None if raw is None else str(uuid.UUID(bytes=raw.tobytes()))

    def flipped(self, at: int) -> bytes:
        """The frame with one bit flipped at byte ``at`` of the payload (negative: from its end)."""
        out = bytearray(self.raw)
        out[HEADER.size + (at % self.length)] ^= 0x01
        return bytes(out)

    def with_seq(self, seq: int) -> bytes:
        """The frame with another sequence number in its header (payload and MAC as they were)."""
        out = bytearray(self.raw)
        _SEQ.pack_into(out, 8, seq & 0xFFFFFFFF)
        return bytes(out)

    def half(self) -> bytes:
        """Its first half: the whole header and part of the rest."""
        return self.raw[: max(HEADER.size + 1, len(self.raw) // 2)]


def forge(msg_type: MsgType, seq: int, payload: bytes, trailer: bytes = b"") -> bytes:
    """A frame with valid framing: ``trailer`` as its MAC, none if empty."""
    flags = FLAG_MAC if trailer else 0
    head = HEADER.pack(MAGIC, VERSION, msg_type, flags, len(trailer), seq, len(payload))
    return head + payload + trailer


class Cut(Exception):  # noqa: N818 - an instruction to the proxy, not an error
    """Raised by a hook: forward ``partial`` (part of the frame) and close the connection."""

    def __init__(self, partial: bytes) -> None:
        super().__init__(f"cut after {len(partial)} bytes")
        self.partial = partial


Hook = Callable[[Direction, WireFrame], list[bytes]]


def passthrough(_direction: Direction, frame: WireFrame) -> list[bytes]:
    return [frame.raw]


@dataclass
class FrameProxy:
    """``async with FrameProxy(target_port, hook) as proxy``: listens on ``proxy.port``."""

    target_port: int
    hook: Hook = passthrough
    host: str = "127.0.0.1"
    port: int = 0
    connections: int = 0
    seen: dict[Direction, list[MsgType]] = field(
        default_factory=lambda: {"to_alice": [], "to_bob": []}
    )
    # What a hook raised (other than Cut): the proxy then drops the connection, and a
    # test must hear of it rather than see a mysterious recovery.
    errors: list[BaseException] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _pumps: set[asyncio.Task[None]] = field(default_factory=set)
    _flowing: asyncio.Event = field(default_factory=asyncio.Event)

    async def __aenter__(self) -> Self:
        self._flowing.set()
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        self._flowing.set()
        for t in list(self._pumps):
            t.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def stalled(self) -> bool:
        return not self._flowing.is_set()

    def stall(self) -> None:
        """Hold everything: no frame goes on, a new connection reaches nobody."""
        self._flowing.clear()

    def release(self) -> None:
        """End a stall: held frames go on (to whoever still listens); connections
        made during it are closed, as a black hole would have lost them."""
        self._flowing.set()

    async def hold(self, direction: Direction, frame: WireFrame) -> None:
        """Wait before forwarding ``frame`` (a subclass's delay; frames after it wait too)."""

    async def _serve(self, bob_r: asyncio.StreamReader, bob_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        if self.stalled:
            await self._flowing.wait()
            bob_w.close()
            return
        try:
            alice_r, alice_w = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            bob_w.close()
            return
        pumps = [
            asyncio.create_task(self._pump(conn, "to_alice", bob_r, alice_w)),
            asyncio.create_task(self._pump(conn, "to_bob", alice_r, bob_w)),
        ]
        self._pumps.update(pumps)
        try:
            # Either side closing ends the connection, as a real middlebox would.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in pumps:
                t.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._pumps.difference_update(pumps)
            for w in (alice_w, bob_w):
                w.close()

    async def _pump(
        self, conn: int, direction: Direction, r: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await r.readexactly(HEADER.size)
                try:
                    h = decode_header(head)
                except ValueError:  # not a frame: pass the rest through untouched
                    w.write(head + await r.read(1 << 20))
                    await w.drain()
                    continue
                body = await r.readexactly(h.length + h.mac_len)
                frame = WireFrame(head + body, h.msg_type, h.seq, h.length, h.mac_len, conn)
                self.seen[direction].append(h.msg_type)
                await self._flowing.wait()
                await self.hold(direction, frame)
                try:
                    out = self.hook(direction, frame)
                except Cut as cut:
                    w.write(cut.partial)
                    await w.drain()
                    return  # ends the connection, both sides
                except Exception as exc:
                    self.errors.append(exc)
                    raise
                for raw in out:
                    w.write(raw)
                await w.drain()


# -- the attacker ----------------------------------------------------------------------
class Attack(Protocol):
    """One attack, armed on a :class:`Mitm`: it sees every frame until it calls
    :meth:`Wire.fired` (the fault is over; the frames it returned are the last it shapes)."""

    def __call__(self, wire: Wire, direction: Direction, frame: WireFrame) -> list[bytes] | None:
        """The bytes to forward instead of ``frame`` if it takes the frame, else None."""
        ...


class Wire:
    """One proxied connection, as the attacker tracks it.

    Per direction: the sequence number of the next frame it forwards (with
    ``renumber`` on, every frame goes out with that number, so a dropped, added
    or swapped frame does not show in the receiver's sequence check and only the
    MAC is left to catch it), the last pad index seen (a forger's best guess at
    the next is two more), and the last few frames of each type (to replay).
    """

    def __init__(self, mitm: Mitm, conn: int) -> None:
        self.mitm = mitm
        self.conn = conn
        self.renumber = False
        self.dirty = False  # an attack acted here: no frame after it is trusted
        self.next_seq: dict[Direction, int] = dict.fromkeys(DIRECTIONS, 0)
        self.last_pad: dict[Direction, int | None] = dict.fromkeys(DIRECTIONS)
        self.in_flight: str | None = None  # the block started and not yet ended here
        self._history: dict[tuple[Direction, MsgType], deque[WireFrame]] = defaultdict(
            lambda: deque(maxlen=4)
        )

    def earlier(self, direction: Direction, msg_type: MsgType) -> list[WireFrame]:
        """The last frames of a type that crossed before the current one, oldest first."""
        return list(self._history[direction, msg_type])

    def forward(self, direction: Direction, frame: WireFrame) -> bytes:
        """``frame`` as it goes on: renumbered when the attack renumbers."""
        seq = self.next_seq[direction]
        self.next_seq[direction] += 1
        return frame.with_seq(seq) if self.renumber else frame.raw

    replay = forward  # an old frame goes out as any other: renumbered or as it was

    def inject(
        self, direction: Direction, msg_type: MsgType, payload: bytes, *, mac: bool
    ) -> bytes:
        """A new frame with the next sequence number; with ``mac``, a trailer naming
        the pad the receiver expects after the last tagged frame seen (the current
        one included), with a random tag."""
        trailer = b""
        if mac:
            last = self.last_pad[direction]
            assert last is not None, f"no tagged frame {direction} yet to guess the pad from"
            trailer = _PAD_INDEX.pack(last + 2) + secrets.token_bytes(TAG_LEN - _PAD_INDEX.size)
        seq = self.next_seq[direction]
        self.next_seq[direction] += 1
        return forge(msg_type, seq, payload, trailer)

    def fired(self, *blocks: str | None) -> None:
        """The attack is done: now is the end of the fault; ``blocks`` (and the block
        in flight) were touched."""
        self.mitm.fired(self, blocks)

    def arrived(self, direction: Direction, frame: WireFrame) -> None:
        if frame.mac_len:
            self.last_pad[direction] = frame.pad_index

    def passed(self, direction: Direction, frame: WireFrame) -> None:
        self._history[direction, frame.msg_type].append(frame)


@dataclass
class Mitm:
    """The proxy's hook: every frame goes on unless the armed attack takes it.

    Per block it keeps what the wire says about its fate: when it started
    (``started``, wall clock), whether its PREPARED reached Alice unmodified on a
    connection no attack had touched (``prepared``: she may have committed it,
    and only then), and whether Alice's COMMIT went by (``committed``).  An
    attack's ``touched`` blocks are those it names, the one in flight when it
    acted and any started on that connection afterwards.
    """

    attack: Attack | None = None
    fired_at: float | None = None  # wall clock: compared with the nodes' own times
    touched: set[str] = field(default_factory=set)
    started: dict[str, float] = field(default_factory=dict)
    prepared: set[str] = field(default_factory=set)
    committed: set[str] = field(default_factory=set)
    wires: dict[int, Wire] = field(default_factory=dict)

    def arm(self, attack: Attack) -> None:
        self.attack, self.fired_at = attack, None
        self.touched = set()

    def fired(self, wire: Wire, blocks: tuple[str | None, ...] = ()) -> None:
        wire.dirty = True
        self.touched.update(b for b in (*blocks, wire.in_flight) if b is not None)
        self.attack, self.fired_at = None, time.time()

    def taint(self, wire: Wire) -> None:
        """An attack on the whole link (a stall) begins on ``wire``, the live connection:
        no frame from now on is trusted, on any connection; its block in flight is touched."""
        for w in self.wires.values():
            w.dirty = True
        if wire.in_flight is not None:
            self.touched.add(wire.in_flight)

    def __call__(self, direction: Direction, frame: WireFrame) -> list[bytes]:
        wire = self.wires.get(frame.conn)
        if wire is None:
            wire = self.wires[frame.conn] = Wire(self, frame.conn)
        wire.arrived(direction, frame)
        out = None
        if self.attack is not None:
            out = self.attack(wire, direction, frame)
        if out is None:
            out = [wire.forward(direction, frame)]
        wire.passed(direction, frame)
        self._track(wire, frame, out)
        return out

    def _track(self, wire: Wire, frame: WireFrame, out: list[bytes]) -> None:
        block = frame.block_id
        if block is None:
            return
        kind = frame.msg_type
        if kind is MsgType.BLOCK_START:
            self.started.setdefault(block, time.time())
            wire.in_flight = block
            if wire.dirty:
                self.touched.add(block)
        elif kind is MsgType.PREPARED and not wire.dirty and out == [frame.raw]:
            self.prepared.add(block)
        elif kind is MsgType.COMMIT:
            self.committed.add(block)
        if kind in (MsgType.COMMIT, MsgType.ABORT) and wire.in_flight == block:
            wire.in_flight = None
