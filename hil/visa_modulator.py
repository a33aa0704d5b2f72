"""TCP emulator of Alice's modulator / pattern generator, for the ``visa-modulator`` driver.

It speaks the driver's wire protocol (see ``qnoded_drivers.visa_modulator``) on a
localhost TCP socket, the way a LAN instrument does on its raw-socket port
(pyvisa-py ``TCPIP::127.0.0.1::PORT::SOCKET``): newline-terminated SCPI commands,
IEEE 488.2 definite-length binary blocks (``#<n><len><bytes>``) for pattern
uploads, one newline-terminated answer per query, an error queue read with
``SYST:ERR?``.  It keeps the instrument's state (pulse rate, levels, both pattern
memories, mode, output) across connections, as an instrument does; a restart of
this process is a power cycle (state lost).

Run::

    python hil/visa_modulator.py [--host 127.0.0.1] [--port 0] [--memory 4194304]
                                 [--fault drop|stall|garbage|error] [--verbose]

It prints ``READY <host>:<port>`` on stdout once it accepts connections (port 0
picks a free one) and runs until killed.

Misbehaviour, for the driver's failure tests.  A fault is armed by ``--fault``
at start or by ``EMU:FAULT <name>`` from any connection (typically a second,
control connection), and fires once, on the next instrument command any
connection sends (``EMU:`` commands never trigger it):

- ``drop``: the connection is closed on receipt, unanswered and unexecuted;
- ``stall``: the command is never executed nor answered, and that connection is
  never read again (it is released when the client closes it);
- ``garbage``: the command runs, but the next query's answer is replaced by
  non-ASCII bytes (a command that is not a query passes the fault on to the
  next query, which is where a driver reads after a setting);
- ``error``: the command runs, then the instrument queues
  ``-240,"Hardware error;modulator bias control lost lock"``;
- ``none``: disarm.

``EMU:FAULT?`` reports the armed fault.  A pattern longer than the memory
(``--memory`` slots per pattern) is refused with ``-225,"Out of memory"``.

The slot clock runs from the process's start (a power cycle restarts it) on
CLOCK_MONOTONIC, so another process on the host can tell which slot plays when.
A mode switch takes effect at the next wrap of the pattern that plays, an
output switch at the next slot; ``PATT:SWIT?`` and ``OUTP:SWIT?`` give the slot
(see the driver's wire protocol).

Emulator-only commands (not part of the instrument, never fire a fault):
``EMU:FAULT <name>``, ``EMU:FAULT?``; for the emulated fibre of
``hil/tcp_tagger.py --source``: ``EMU:STAT? [since]`` (JSON: the slot clock's
anchor in CLOCK_MONOTONIC ns, anchor slot and rate; the slot now; the levels;
what played from slot ``since`` on, as ``[first slot, mode, output, CRC-32 of
the pattern]`` changes) and ``EMU:PATT? KEY|SYNC`` (the pattern memory as an
IEEE 488.2 definite-length block).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

IDN = "QNODED-EMU,VM-1,EMU0001,1.0"
DEFAULT_MEMORY_SLOTS = 1 << 22
MAX_HEADER_BYTES = 1024
ERROR_QUEUE_DEPTH = 16  # SCPI: the last entry becomes -350 when the queue overflows
MAX_CODE = 15  # pattern byte: class << 2 | basis << 1 | bit, class 0..3
FREQ_RANGE_HZ = (1e3, 1e10)
LEVEL_RANGE = (0.0, 100.0)  # mean photon number per pulse at the output
LEVELS = ("SIGN", "DEC", "VAC", "SYNC")  # one per IntensityClass, in its order
PATTERNS = ("KEY", "SYNC")
FAULTS = ("NONE", "DROP", "STALL", "GARBAGE", "ERROR")
# A mode switch takes effect at the next wrap of the pattern address, so *OPC?
# after PATT:MODE answers then; capped so that a slow rate cannot hang a test.
MAX_SWITCH_WAIT_S = 0.25
MAX_CHANGES = 4096  # the played timeline kept for EMU:STAT?

# Long SCPI mnemonics accepted beside the short forms the driver sends.
_LONG = {
    "SOURCE": "SOUR",
    "FREQUENCY": "FREQ",
    "LEVEL": "LEV",
    "SIGNAL": "SIGN",
    "DECOY": "DEC",
    "VACUUM": "VAC",
    "PATTERN": "PATT",
    "LENGTH": "LENG",
    "CHECKSUM": "CHEC",
    "MEMORY": "MEM",
    "OUTPUT": "OUTP",
    "SYSTEM": "SYST",
    "ERROR": "ERR",
}
_BLOCK_HEADER = re.compile(rb"#([1-9])")


class ScpiError(Exception):
    """A command the instrument refuses: goes onto the error queue."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f'{code},"{message}"')
        self.entry = f'{code},"{message}"'


@dataclass(frozen=True, slots=True)
class Change:
    """From slot ``first`` on, the instrument plays the ``mode`` pattern memory, which
    then holds the pattern of CRC-32 ``crc``, with the output on or off."""

    first: int
    mode: str
    output: bool
    crc: int


@dataclass(frozen=True, slots=True)
class SlotClock:
    """The free-running slot counter: slot ``anchor_slot`` began at ``anchor_ns``
    (CLOCK_MONOTONIC, which every process on the host shares) and slots follow at
    ``freq_hz``.  A new rate re-anchors it; a power cycle (a new process) restarts it."""

    anchor_ns: int
    anchor_slot: int
    freq_hz: float

    def slot_at(self, t_ns: int) -> int:
        return self.anchor_slot + math.floor((t_ns - self.anchor_ns) * self.freq_hz / 1e9)

    def now(self) -> int:
        return self.slot_at(time.monotonic_ns())

    def seconds_at(self, slot: int) -> float:
        """CLOCK_MONOTONIC seconds at which ``slot`` begins."""
        return (self.anchor_ns + (slot - self.anchor_slot) * 1e9 / self.freq_hz) / 1e9


@dataclass
class Instrument:
    """The state a real modulator keeps between connections."""

    memory_slots: int = DEFAULT_MEMORY_SLOTS
    levels: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LEVELS, 0.0))
    patterns: dict[str, bytes] = field(default_factory=lambda: dict.fromkeys(PATTERNS, b""))
    mode: str = "SYNC"  # selected; it plays from ``mode_since`` (a wrap, maybe still ahead)
    output: bool = False
    mode_since: int = 0
    output_since: int = 0
    clock: SlotClock = field(default_factory=lambda: SlotClock(time.monotonic_ns(), 0, 1e8))
    # What played when, ascending by first slot, for the emulated fibre
    # (hil/tcp_tagger.py --source); the oldest fall off.
    changes: deque[Change] = field(
        default_factory=lambda: deque([Change(0, "SYNC", False, 0)], maxlen=MAX_CHANGES)
    )
    errors: deque[str] = field(default_factory=deque)
    fault: str = "NONE"
    garbage_pending: bool = False
    opc_ready_at: float = 0.0

    @property
    def freq_hz(self) -> float:
        return self.clock.freq_hz

    def set_rate(self, freq_hz: float) -> None:
        if freq_hz != self.clock.freq_hz:
            now_ns = time.monotonic_ns()
            self.clock = SlotClock(now_ns, self.clock.slot_at(now_ns) + 1, freq_hz)

    def reset(self) -> None:
        """*RST: settings to defaults, pattern memories cleared, output off (the slot
        clock runs on, at the default rate)."""
        self.set_rate(1e8)
        self.levels = dict.fromkeys(LEVELS, 0.0)
        self.patterns = dict.fromkeys(PATTERNS, b"")
        self.mode, self.output = "SYNC", False
        self.mode_since = self.output_since = self.clock.now() + 1
        self.schedule(self.mode_since, lambda c: Change(c.first, "SYNC", False, 0))
        self.opc_ready_at = 0.0

    def next_wrap(self) -> int:
        """The first slot of the next period of the pattern that plays now."""
        now = self.clock.now()
        length = len(self.patterns[self.mode])
        return (now // length + 1) * length if length else now + 1

    def schedule(self, first: int, change: Callable[[Change], Change]) -> None:
        """Apply ``change`` to what plays from slot ``first`` on, including changes
        already scheduled after it (a mode switch waiting for its wrap)."""
        before = [c for c in self.changes if c.first < first]
        after = [change(c) for c in self.changes if c.first >= first]
        base = before[-1] if before else self.changes[0]
        if not after or after[0].first != first:
            after.insert(0, change(dataclasses.replace(base, first=first)))
        merged: list[Change] = []
        for c in [*before, *after]:
            if not merged or (c.mode, c.output, c.crc) != (
                merged[-1].mode,
                merged[-1].output,
                merged[-1].crc,
            ):
                merged.append(c)
        self.changes = deque(merged, maxlen=MAX_CHANGES)

    def push_error(self, entry: str) -> None:
        if len(self.errors) >= ERROR_QUEUE_DEPTH:
            self.errors[-1] = '-350,"Queue overflow"'
        else:
            self.errors.append(entry)


def _normalise(header: str) -> str:
    """``:source:frequency?`` -> ``SOUR:FREQ?``."""
    query = header.endswith("?")
    nodes = header.rstrip("?").lstrip(":").upper().split(":")
    return ":".join(_LONG.get(n, n) for n in nodes) + ("?" if query else "")


def _number(arg: str, lo: float, hi: float) -> float:
    if not arg:
        raise ScpiError(-109, "Missing parameter")
    try:
        value = float(arg)
    except ValueError:
        raise ScpiError(-104, "Data type error") from None
    if not lo <= value <= hi:
        raise ScpiError(-222, "Data out of range")
    return value


def _choice(arg: str, options: tuple[str, ...]) -> str:
    if not arg:
        raise ScpiError(-109, "Missing parameter")
    word = arg.strip().upper()
    if word not in options:
        raise ScpiError(-224, "Illegal parameter value")
    return word


def _nr3(value: float) -> str:
    return f"{value:.9E}"


Handler = Callable[[Instrument, str, bytes | None], str | None]


def _idn(inst: Instrument, arg: str, block: bytes | None) -> str:
    return IDN


def _rst(inst: Instrument, arg: str, block: bytes | None) -> None:
    inst.reset()


def _cls(inst: Instrument, arg: str, block: bytes | None) -> None:
    inst.errors.clear()


def _opc(inst: Instrument, arg: str, block: bytes | None) -> str:
    return "1"  # the wait for pending operations happens in the connection loop


def _syst_err(inst: Instrument, arg: str, block: bytes | None) -> str:
    return inst.errors.popleft() if inst.errors else '0,"No error"'


def _set_freq(inst: Instrument, arg: str, block: bytes | None) -> None:
    # The synthesiser's resolution is 1 Hz: a driver must read the rate back.
    inst.set_rate(float(round(_number(arg, *FREQ_RANGE_HZ))))


def _get_slot(inst: Instrument, arg: str, block: bytes | None) -> str:
    return str(inst.clock.now())


def _get_freq(inst: Instrument, arg: str, block: bytes | None) -> str:
    return _nr3(inst.freq_hz)


def _level_handlers(name: str) -> tuple[Handler, Handler]:
    def set_level(inst: Instrument, arg: str, block: bytes | None) -> None:
        # A 20-bit attenuator: 1e-6 photons per pulse resolution.
        inst.levels[name] = round(_number(arg, *LEVEL_RANGE), 6)

    def get_level(inst: Instrument, arg: str, block: bytes | None) -> str:
        return _nr3(inst.levels[name])

    return set_level, get_level


def _wait_for(inst: Instrument, slot: int) -> None:
    """A pattern switch takes effect when the pattern address wraps; *OPC? waits for it."""
    inst.opc_ready_at = min(inst.clock.seconds_at(slot), time.monotonic() + MAX_SWITCH_WAIT_S)


def _store_pattern(inst: Instrument, arg: str, block: bytes | None) -> None:
    which = _choice(arg.rstrip(","), PATTERNS)
    if block is None:
        raise ScpiError(-161, "Invalid block data")
    if len(block) > inst.memory_slots:
        raise ScpiError(-225, "Out of memory")
    if not block:
        raise ScpiError(-161, "Invalid block data;empty pattern")
    if max(block) > MAX_CODE:
        bad = next(i for i, b in enumerate(block) if b > MAX_CODE)
        raise ScpiError(-224, f"Illegal parameter value;slot {bad} is 0x{block[bad]:02x}")
    wrap = inst.next_wrap()
    inst.patterns[which] = bytes(block)
    crc = zlib.crc32(block)
    inst.schedule(wrap, lambda c: dataclasses.replace(c, crc=crc) if c.mode == which else c)
    if which == inst.mode and inst.output:
        _wait_for(inst, wrap)  # replacing the pattern that plays


def _pattern_length(inst: Instrument, arg: str, block: bytes | None) -> str:
    return str(len(inst.patterns[_choice(arg, PATTERNS)]))


def _pattern_checksum(inst: Instrument, arg: str, block: bytes | None) -> str:
    return str(zlib.crc32(inst.patterns[_choice(arg, PATTERNS)]))


def _pattern_memory(inst: Instrument, arg: str, block: bytes | None) -> str:
    return str(inst.memory_slots)


def _set_mode(inst: Instrument, arg: str, block: bytes | None) -> None:
    mode = _choice(arg, PATTERNS)
    pattern = inst.patterns[mode]
    if not pattern:
        raise ScpiError(-221, f"Settings conflict;no {mode} pattern loaded")
    if mode != inst.mode:
        wrap = inst.next_wrap()
        crc = zlib.crc32(pattern)
        inst.schedule(wrap, lambda c: dataclasses.replace(c, mode=mode, crc=crc))
        inst.mode, inst.mode_since = mode, wrap
        _wait_for(inst, wrap)


def _mode_switch(inst: Instrument, arg: str, block: bytes | None) -> str:
    return f"{inst.mode_since},{inst.mode}"


def _get_mode(inst: Instrument, arg: str, block: bytes | None) -> str:
    return inst.mode


def _set_output(inst: Instrument, arg: str, block: bytes | None) -> None:
    on = _choice(arg, ("ON", "OFF", "1", "0")) in ("ON", "1")
    if on and not inst.patterns[inst.mode]:
        raise ScpiError(-221, f"Settings conflict;no {inst.mode} pattern loaded")
    if on != inst.output:
        inst.output, inst.output_since = on, inst.clock.now() + 1
        inst.schedule(inst.output_since, lambda c: dataclasses.replace(c, output=on))


def _output_switch(inst: Instrument, arg: str, block: bytes | None) -> str:
    return f"{inst.output_since},{int(inst.output)}"


def _get_output(inst: Instrument, arg: str, block: bytes | None) -> str:
    return "1" if inst.output else "0"


COMMANDS: dict[str, Handler] = {
    "*IDN?": _idn,
    "*RST": _rst,
    "*CLS": _cls,
    "*OPC?": _opc,
    "SYST:ERR?": _syst_err,
    "SOUR:FREQ": _set_freq,
    "SOUR:FREQ?": _get_freq,
    "SOUR:SLOT?": _get_slot,
    "PATT:DATA": _store_pattern,
    "PATT:LENG?": _pattern_length,
    "PATT:CHEC?": _pattern_checksum,
    "PATT:MEM?": _pattern_memory,
    "PATT:MODE": _set_mode,
    "PATT:MODE?": _get_mode,
    "PATT:SWIT?": _mode_switch,
    "OUTP": _set_output,
    "OUTP?": _get_output,
    "OUTP:SWIT?": _output_switch,
}
for _name in LEVELS:
    COMMANDS[f"SOUR:LEV:{_name}"], COMMANDS[f"SOUR:LEV:{_name}?"] = _level_handlers(_name)


def execute(inst: Instrument, header: str, arg: str, block: bytes | None) -> str | None:
    """Run one command; return the answer of a query (None for a setting)."""
    cmd = _normalise(header)
    handler = COMMANDS.get(cmd)
    if handler is None:
        raise ScpiError(-113, "Undefined header")
    if block is not None and cmd != "PATT:DATA":
        raise ScpiError(-168, "Block data not allowed")
    return handler(inst, arg, block)


class ClientClosedError(Exception):
    """The connection ends: the client closed it, or a fault drops it."""


@dataclass(frozen=True, slots=True)
class Message:
    """One command as received: its text and, for an upload, its binary block."""

    text: str
    block: bytes | None = None
    error: str | None = None  # unframeable: the error it queues instead of running


async def read_message(reader: asyncio.StreamReader) -> Message:
    """Read one command up to its newline, with its binary block if it has one.

    A block's bytes may contain newlines, so the text is read a byte at a time
    (the stream reader buffers) until either the newline or the ``#`` that
    starts a block after the header.
    """
    text = bytearray()
    try:
        while True:
            c = await reader.readexactly(1)
            if c == b"\n":
                return Message(text.decode("ascii", "replace").rstrip("\r"))
            if c == b"#" and b" " in text:
                digits = await reader.readexactly(1)
                if not _BLOCK_HEADER.fullmatch(b"#" + digits):
                    # #0 (indefinite length) or junk: skip the rest of the line.
                    await reader.readuntil(b"\n")
                    return Message("", error='-161,"Invalid block data"')
                size = int(await reader.readexactly(int(digits)))
                block = await reader.readexactly(size)
                await reader.readuntil(b"\n")  # the message terminator after the block
                return Message(text.decode("ascii", "replace"), block)
            text += c
            if len(text) > MAX_HEADER_BYTES:
                await reader.readuntil(b"\n")
                return Message("", error='-112,"Program mnemonic too long"')
    except (asyncio.IncompleteReadError, ValueError):
        # ValueError: a block length that is not digits; the stream is lost.
        raise ClientClosedError from None


class Server:
    def __init__(self, inst: Instrument, verbose: bool) -> None:
        self.inst = inst
        self.verbose = verbose

    def log(self, msg: str) -> None:
        if self.verbose:
            print(f"visa-modulator-emu: {msg}", file=sys.stderr, flush=True)  # noqa: T201

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        self.log(f"connection from {peer}")
        try:
            await self._serve(reader, writer)
        except (
            ClientClosedError,
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self.log(f"connection from {peer} closed")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            msg = await read_message(reader)
            if msg.error is not None:
                self.inst.push_error(msg.error)
                continue
            header, _, arg = msg.text.strip().partition(" ")
            if not header:
                continue
            if _normalise(header).startswith("EMU:"):
                answer = self._emulator_command(_normalise(header), arg)
            else:
                answer = await self._instrument_command(reader, header, arg, msg.block)
            if answer is not None:
                writer.write(answer + b"\n")
                await writer.drain()

    async def _instrument_command(
        self, reader: asyncio.StreamReader, header: str, arg: str, block: bytes | None
    ) -> bytes | None:
        """Run one instrument command with the armed fault, if any; the answer's bytes."""
        inst = self.inst
        fault, inst.fault = inst.fault, "NONE"
        if fault != "NONE":
            self.log(f"fault {fault} fires on {header!r}")
        if fault == "DROP":
            raise ClientClosedError
        if fault == "STALL":
            while await reader.read(65536):
                pass  # swallow everything until the client gives up
            raise ClientClosedError
        if fault == "GARBAGE":
            inst.garbage_pending = True
        answer: str | None = None
        try:
            answer = execute(inst, header, arg, block)
        except ScpiError as exc:
            inst.push_error(exc.entry)
        if fault == "ERROR":
            inst.push_error('-240,"Hardware error;modulator bias control lost lock"')
        if answer is None:
            return None
        if _normalise(header) == "*OPC?":
            # *OPC? answers once pending operations (a pattern switch) are done.
            await asyncio.sleep(max(0.0, inst.opc_ready_at - time.monotonic()))
        if inst.garbage_pending:
            inst.garbage_pending = False
            return bytes(0x80 | (b & 0x7F) for b in os.urandom(12))
        return answer.encode("ascii")

    def _emulator_command(self, cmd: str, arg: str) -> bytes | None:
        if cmd == "EMU:FAULT?":
            return self.inst.fault.encode("ascii")
        if cmd == "EMU:STAT?":
            return self._played(arg).encode("ascii")
        if cmd == "EMU:PATT?" and arg.strip().upper() in PATTERNS:
            data = self.inst.patterns[arg.strip().upper()]
            size = str(len(data))
            return f"#{len(size)}{size}".encode("ascii") + data
        if cmd == "EMU:FAULT":
            name = arg.strip().upper()
            if name in FAULTS:
                self.inst.fault = name
                self.inst.garbage_pending = False
                self.log(f"fault {name} armed")
                return None
        self.inst.push_error('-113,"Undefined header"')
        return None

    def _played(self, arg: str) -> str:
        """What plays from slot ``since`` (the argument; 0 if none) on, as JSON: the slot
        clock, the levels, the slot counter now and the changes from the one in
        effect at ``since``.  For the emulated fibre only (hil/tcp_tagger.py
        --source): a real instrument has no such query."""
        inst = self.inst
        try:
            since = int(arg) if arg.strip() else 0
        except ValueError:
            since = 0
        changes = list(inst.changes)
        at = max([i for i, c in enumerate(changes) if c.first <= since], default=0)
        clock = inst.clock
        return json.dumps(
            {
                "clock": [clock.anchor_ns, clock.anchor_slot, clock.freq_hz],
                "now": clock.now(),
                "levels": inst.levels,
                "changes": [[c.first, c.mode, c.output, c.crc] for c in changes[at:]],
            },
            separators=(",", ":"),
        )


async def serve(host: str, port: int, inst: Instrument, verbose: bool) -> None:
    server = Server(inst, verbose)
    srv = await asyncio.start_server(server.handle, host, port, reuse_address=True)
    bound = srv.sockets[0].getsockname()
    # The readiness line a test (or HIL harness) waits for before connecting.
    print(f"READY {bound[0]}:{bound[1]}", flush=True)  # noqa: T201
    async with srv:
        await srv.serve_forever()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument(
        "--memory",
        type=int,
        default=DEFAULT_MEMORY_SLOTS,
        help="pattern memory, slots per pattern (a longer upload gets -225)",
    )
    ap.add_argument("--fault", type=str.upper, choices=FAULTS, default="NONE")
    ap.add_argument("--verbose", action="store_true", help="log connections and faults")
    args = ap.parse_args(argv)
    inst = Instrument(memory_slots=args.memory, fault=args.fault)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, inst, args.verbose))
    return 0


if __name__ == "__main__":
    sys.exit(main())
