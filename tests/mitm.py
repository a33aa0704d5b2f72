"""A man in the middle for the peer channel: a TCP proxy that reads whole frames.

Bob connects to the proxy instead of Alice; each frame, in each direction,
goes through ``hook(direction, frame) -> frames to forward``: it may pass the
frame, change bytes, drop it, or add frames (replays, injections).  It sees
exactly what an attacker on the wire sees (no keys): headers, payloads, MAC
trailers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Self

from qnoded.peer import HEADER, MsgType, decode_header

Direction = Literal["to_alice", "to_bob"]


@dataclass(slots=True)
class WireFrame:
    """One frame as it crossed the proxy: raw bytes and the fields an attacker reads."""

    raw: bytes
    msg_type: MsgType
    seq: int
    length: int
    mac_len: int

    @property
    def payload(self) -> bytes:
        return self.raw[HEADER.size : HEADER.size + self.length]

    def flipped(self, at: int) -> bytes:
        """The frame with one bit flipped at byte ``at`` of the payload (negative: from its end)."""
        out = bytearray(self.raw)
        out[HEADER.size + (at % self.length)] ^= 0x01
        return bytes(out)


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
    _server: asyncio.Server | None = None
    _pumps: set[asyncio.Task[None]] = field(default_factory=set)

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._pumps):
            t.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        await self._server.wait_closed()

    async def hold(self, direction: Direction, frame: WireFrame) -> None:
        """Wait before forwarding ``frame`` (a subclass's delay; frames after it wait too)."""

    async def _serve(self, bob_r: asyncio.StreamReader, bob_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            alice_r, alice_w = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            bob_w.close()
            return
        pumps = [
            asyncio.create_task(self._pump("to_alice", bob_r, alice_w)),
            asyncio.create_task(self._pump("to_bob", alice_r, bob_w)),
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
        self, direction: Direction, r: asyncio.StreamReader, w: asyncio.StreamWriter
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
                frame = WireFrame(head + body, h.msg_type, h.seq, h.length, h.mac_len)
                self.seen[direction].append(h.msg_type)
                await self.hold(direction, frame)
                for out in self.hook(direction, frame):
                    w.write(out)
                await w.drain()
