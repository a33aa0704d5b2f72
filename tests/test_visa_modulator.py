"""The VISA modulator driver: quick tests on a pyvisa-sim model, then the whole
driver against its TCP emulator (hil/visa_modulator.py) over real sockets.

The emulator runs out of process, prints ``READY host:port`` and is steered
through a second connection (``EMU:FAULT ...``), as a HIL harness would.
"""

from __future__ import annotations

import asyncio
import select
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qnoded_drivers.visa_modulator import (
    InstrumentConnectionError,
    InstrumentError,
    InstrumentProtocolError,
    InstrumentTimeoutError,
    ModulatorOptions,
    Played,
    ScpiSession,
    Timeline,
    VisaModulator,
    make_patterns,
)

from qnoded.contracts import DeviceError, DriverContext, IntensityClass, LaserMode

ROOT = Path(__file__).resolve().parents[1]
EMULATOR = ROOT / "hil" / "visa_modulator.py"
SIM_MODEL = Path(__file__).resolve().parent / "data" / "visa_modulator.yaml"
SIM_BACKEND = f"{SIM_MODEL}@sim"
SIM_RESOURCE = "TCPIP::127.0.0.1::5025::SOCKET"
CTX = DriverContext(node_id="alice", role="alice", protocol="bb84")
L = 1 << 14  # pattern slots in the socket tests: quick to upload
SYNC_DENSITY = 0.01  # ~160 bright sync slots per pattern (the default 1e-3 gives too few)


# -- the emulator, out of process ---------------------------------------------------
class Emulator:
    """hil/visa_modulator.py as a subprocess; ``start`` after ``kill`` comes back on the
    same port, with the state lost (a power cycle)."""

    def __init__(self, *args: str, port: int = 0) -> None:
        self.args = args
        self.port = port  # 0: the emulator picks a free one
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        proc = subprocess.Popen(
            [sys.executable, str(EMULATOR), "--port", str(self.port), *self.args],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10.0)
        line = proc.stdout.readline() if ready else ""
        if not line.startswith("READY "):
            proc.kill()
            proc.wait()
            pytest.fail(f"emulator did not start: {line!r}")
        self.port = int(line.rsplit(":", 1)[1])
        self.proc = proc

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            assert self.proc.stdout is not None
            self.proc.stdout.close()
            self.proc = None

    @property
    def resource(self) -> str:
        return f"TCPIP::127.0.0.1::{self.port}::SOCKET"

    def query(self, command: str) -> str:
        """One query on a control connection of its own (not the driver's)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5.0) as s:
            s.sendall(command.encode() + b"\n")
            return s.makefile("rb").readline().decode().strip()

    def fault(self, name: str) -> None:
        """Arm a fault; the confirming query makes sure it is armed before we go on."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5.0) as s:
            s.sendall(f"EMU:FAULT {name}\nEMU:FAULT?\n".encode())
            assert s.makefile("rb").readline().decode().strip() == name.upper()


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    emu = Emulator()
    emu.start()
    yield emu
    emu.kill()


def modulator(emu: Emulator, **options: Any) -> VisaModulator:
    opts: dict[str, Any] = {
        "resource": emu.resource,
        "seed": 5,
        "pattern_length": L,
        "sync_density": SYNC_DENSITY,
        "timeout_s": 1.0,
    }
    opts.update(options)
    return VisaModulator("laser0", opts, CTX)


async def switch_on(laser: VisaModulator, emu: Emulator) -> int:
    """Output on; the slot from which it is on, as the instrument says."""
    await laser.set_output(True)
    slot, state = emu.query("OUTP:SWIT?").split(",")
    assert state == "1"
    return int(slot)


async def switch(laser: VisaModulator, emu: Emulator, mode: LaserMode) -> int:
    """Switch the mode; the slot from which it plays, as the instrument says."""
    await laser.set_mode(mode)
    slot, word = emu.query("PATT:SWIT?").split(",")
    assert word == mode.name
    return int(slot)


def assert_not_key(laser: VisaModulator, first: int, n: int) -> None:
    """No slot of the range carries the key pattern's choices."""
    rec = laser.emissions(first, n)
    assert np.all(rec.intensity == IntensityClass.SYNC), np.bincount(rec.intensity)
    assert laser.count_classes(first, n)[IntensityClass.SYNC] == n


def wire_bytes(basis: Any, bit: Any, intensity: Any) -> bytes:
    """The pattern encoding of the wire protocol, written out independently of the driver."""
    codes = (np.asarray(intensity, np.uint8) << 2) | (np.asarray(basis, np.uint8) << 1)
    return (codes | np.asarray(bit, np.uint8)).astype(np.uint8).tobytes()


# -- pyvisa-sim: the session layer against a YAML model ------------------------------
def sim_session(timeout_s: float = 0.3) -> ScpiSession:
    opt = ModulatorOptions.from_mapping(
        "laser0", {"resource": SIM_RESOURCE, "backend": SIM_BACKEND, "timeout_s": timeout_s}
    )
    session = ScpiSession("laser0", opt)
    session.open()
    return session


def test_sim_identity() -> None:
    session = sim_session()
    try:
        assert session.identify() == "QNODED-SIM,VM-1,SIM0001,1.0"
        session.wait_complete("*OPC?")
        session.check_errors("*IDN?")  # an empty queue raises nothing
    finally:
        session.close()
    assert not session.is_open


def test_sim_levels_and_output_read_back() -> None:
    session = sim_session()
    try:
        for node, mu in (("SIGN", 0.5), ("DEC", 0.1), ("VAC", 0.0), ("SYNC", 0.75)):
            session.command(f"SOUR:LEV:{node} {mu:.9E}")
            assert session.query_float("level", f"SOUR:LEV:{node}?") == pytest.approx(mu)
        session.command("SOUR:FREQ 2.500000000E+08")
        assert session.query_float("rate", "SOUR:FREQ?") == 2.5e8
        # This model answers OUTP? with ON/OFF, not 1/0: both are accepted.
        session.command("OUTP ON")
        assert session.query_word("OUTP", "OUTP?", ("0", "1", "ON", "OFF")) == "ON"
    finally:
        session.close()


def test_sim_out_of_range_level_is_an_instrument_error_and_the_session_survives() -> None:
    session = sim_session()
    try:
        with pytest.raises(InstrumentError) as info:
            session.command("SOUR:LEV:SIGN 2.000000000E+02")  # above the model's 100
        err = info.value
        assert (err.code, err.message) == (-100, "Command error")
        assert err.command == "SOUR:LEV:SIGN 2.000000000E+02"
        assert "laser0" in str(err) and SIM_RESOURCE in str(err) and "-100" in str(err)
        assert session.is_open  # the instrument answered: nothing to resynchronise
        assert session.query_float("level", "SOUR:LEV:SIGN?") == 0.0  # unchanged
    finally:
        session.close()


def test_sim_silent_query_times_out_naming_the_command_and_closes() -> None:
    session = sim_session(timeout_s=0.2)
    t0 = time.monotonic()
    with pytest.raises(InstrumentTimeoutError) as info:
        session.query("SYST:VERS?", "SYST:VERS?")  # unknown to the model: no answer
    assert time.monotonic() - t0 < 2.0
    assert "SYST:VERS?" in str(info.value) and "0.2 s" in str(info.value)
    assert not session.is_open  # a late answer must not be read as the next one's


def test_unknown_backend_is_a_connection_error_naming_it() -> None:
    opt = ModulatorOptions.from_mapping("laser0", {"resource": SIM_RESOURCE, "backend": "@nope"})
    session = ScpiSession("laser0", opt)
    with pytest.raises(InstrumentConnectionError) as info:
        session.open()
    assert "'@nope'" in str(info.value) and "laser0" in str(info.value)
    assert not session.is_open


@pytest.mark.asyncio
async def test_sim_driver_open_stops_at_the_pattern_upload_with_the_instruments_error() -> None:
    """The model has no pattern memory: opening fails there, with its error, and cleans up."""
    dev = VisaModulator(
        "laser0",
        {
            "resource": SIM_RESOURCE,
            "backend": SIM_BACKEND,
            "pattern_length": 1024,
            "sync_density": 0.05,
            "timeout_s": 0.3,
        },
        CTX,
    )
    with pytest.raises(InstrumentError) as info:
        async with dev:
            pass
    assert (info.value.code, info.value.command) == (-100, "PATT:DATA SYNC")
    assert "laser0" in str(info.value)
    assert dev._executor is None  # the I/O thread is gone
    assert not await dev.ping()


# -- options and patterns (no I/O) ------------------------------------------------
@pytest.mark.parametrize(
    ("options", "names"),
    [
        ({}, "resource"),
        ({"resource": "X", "colour": 1}, "colour"),
        ({"resource": "X", "timeout_s": True}, "timeout_s"),
        ({"resource": "X", "timeout_s": 0}, "timeout_s"),
        ({"resource": "X", "p_signal": 0.8, "p_decoy": 0.3}, "p_decoy"),
        ({"resource": "X", "mu_decoy": 0.6}, "mu_decoy"),
        ({"resource": "X", "pattern_length": 1000, "sync_density": 1e-3}, "sync_density"),
        ({"resource": ""}, "resource"),
    ],
)
def test_bad_options_name_the_option(options: dict[str, Any], names: str) -> None:
    with pytest.raises(ValueError, match=names):
        VisaModulator("laser0", options, CTX)


def test_toml_integers_are_accepted_for_float_options() -> None:
    opt = ModulatorOptions.from_mapping("laser0", {"resource": "X", "pulse_rate_hz": 100000000})
    assert isinstance(opt.pulse_rate_hz, float)


def test_patterns_follow_the_class_probabilities_and_the_csprng_is_fresh() -> None:
    n = 1 << 18
    opt = ModulatorOptions.from_mapping(
        "laser0", {"resource": "X", "pattern_length": n, "p_signal": 0.7, "p_decoy": 0.2}
    )
    key, sync = make_patterns(opt)
    freq = np.bincount(key.intensity, minlength=4) / n
    for cls, p in ((0, 0.7), (1, 0.2), (2, 0.1), (3, 0.0)):
        assert abs(freq[cls] - p) < 5 * np.sqrt(p * (1 - p) / n) + 1e-12
    for arr in (key.basis, key.bit):
        assert abs(arr.mean() - 0.5) < 5 * np.sqrt(0.25 / n)
    # The sync pattern is public and dark but for its bright pulses.
    assert set(np.unique(sync.intensity).tolist()) == {IntensityClass.SYNC, IntensityClass.VACUUM}
    assert not sync.basis.any() and not sync.bit.any()
    bright = np.count_nonzero(sync.intensity == IntensityClass.SYNC)
    assert abs(bright - n * 1e-3) < 5 * np.sqrt(n * 1e-3)
    # No seed: every open draws a new pattern from the OS CSPRNG.
    assert make_patterns(opt)[0].crc32 != key.crc32
    seeded = ModulatorOptions.from_mapping("laser0", {"resource": "X", "seed": 9})
    assert make_patterns(seeded)[0].crc32 == make_patterns(seeded)[0].crc32


# -- the driver against the TCP emulator --------------------------------------------
@pytest.mark.asyncio
async def test_pattern_upload_round_trip(emulator: Emulator) -> None:
    async with modulator(emulator) as laser:
        assert laser.idn.startswith("QNODED-EMU,VM-1,")
        assert laser.describe()["connected"] is True
        for mode, which in ((LaserMode.KEY, "KEY"), (LaserMode.SYNC, "SYNC")):
            assert emulator.query(f"PATT:LENG? {which}") == str(L)
            assert int(emulator.query(f"PATT:CHEC? {which}")) == laser.pattern_crc32(mode)
        # What the instrument holds is what the driver answers from, where it
        # played: encode the driver's view of one period independently and
        # compare checksums.
        on = await switch_on(laser, emulator)
        k0 = -(-on // L) * L  # a whole period of the sync pattern, output on
        sync = np.full(L, IntensityClass.VACUUM, np.uint8)
        sync[laser.sync_slots(k0, L) - k0] = IntensityClass.SYNC
        zeros = np.zeros(L, np.uint8)
        assert zlib.crc32(wire_bytes(zeros, zeros, sync)) == int(emulator.query("PATT:CHEC? SYNC"))
        first = await switch(laser, emulator, LaserMode.KEY)
        rec = laser.emissions(first, L)
        held = int(emulator.query("PATT:CHEC? KEY"))
        assert zlib.crc32(wire_bytes(rec.basis, rec.bit, rec.intensity)) == held
        # Settings the instrument reports are the ones the driver reports.
        assert float(emulator.query("SOUR:FREQ?")) == laser.pulse_rate_hz == 1e8
        assert float(emulator.query("SOUR:LEV:SIGN?")) == laser.intensities[IntensityClass.SIGNAL]
        assert float(emulator.query("SOUR:LEV:VAC?")) == 0.0


@pytest.mark.asyncio
async def test_instrument_rounding_is_read_back(emulator: Emulator) -> None:
    # The emulator's synthesiser has 1 Hz resolution and its attenuator 1e-6.
    async with modulator(emulator, pulse_rate_hz=123456789.4, mu_signal=0.4567891) as laser:
        assert laser.period_ps == round(1e12 / 123456789.0)
        assert laser.intensities[IntensityClass.SIGNAL] == 0.456789


@pytest.mark.asyncio
async def test_mode_switch_waits_for_the_pattern_wrap(emulator: Emulator) -> None:
    # At 1 MHz a 2^14-slot pattern wraps every 16 ms: the switch takes effect at a
    # wrap, and set_mode returns (after *OPC?) only once that slot has come.
    async with modulator(emulator, pulse_rate_hz=1e6) as laser:
        assert emulator.query("PATT:MODE?") == "SYNC"
        for mode in (LaserMode.KEY, LaserMode.SYNC):
            asked = int(emulator.query("SOUR:SLOT?"))
            first = await switch(laser, emulator, mode)
            assert int(emulator.query("SOUR:SLOT?")) >= first
            # The next wrap (3 L: the command may arrive late on a loaded host).
            assert first % L == 0 and asked < first <= asked + 3 * L
            assert emulator.query("PATT:MODE?") == mode.name
        assert laser.describe()["mode"] == "sync"


@pytest.mark.asyncio
async def test_output_on_off_and_off_on_close(emulator: Emulator) -> None:
    async with modulator(emulator) as laser:
        assert emulator.query("OUTP?") == "0"
        await laser.set_output(True)
        assert emulator.query("OUTP?") == "1"
        await laser.set_output(False)
        assert emulator.query("OUTP?") == "0"
        await laser.set_output(True)
    assert emulator.query("OUTP?") == "0"  # a closed source does not emit


@pytest.mark.asyncio
async def test_choices_follow_what_played(emulator: Emulator) -> None:
    """Alice's choices are the key pattern's only where the instrument played it:
    dark before the output went on, the sync pattern until the switch to KEY
    took effect (at a wrap), the key pattern (periodic) from then, the sync
    pattern again after switching back."""
    # At 1 MHz a period of L slots lasts 16 ms: the switches land a wrap later.
    async with modulator(emulator, pulse_rate_hz=1e6) as laser:
        now = int(emulator.query("SOUR:SLOT?"))
        assert_not_key(laser, now - 100, 100)
        assert laser.sync_slots(now - 100, 100).size == 0  # output off
        on = await switch_on(laser, emulator)
        first = await switch(laser, emulator, LaserMode.KEY)
        assert on < first and first % L == 0
        assert_not_key(laser, on, first - on)
        sync_before = laser.sync_slots(on, first - on)
        assert sync_before.size and np.all(np.diff(sync_before) > 0)
        assert sync_before.min() >= on and sync_before.max() < first
        assert laser.sync_slots(first, 3 * L).size == 0  # KEY plays: no sync pulses
        one = laser.emissions(first, L)
        slots = np.array([0, 1, L - 1, L, 3 * L + 7, 10**9 + 5], dtype=np.int64) + first
        picked = laser.choices_at(slots)
        for got, want in (
            (picked.basis, one.basis),
            (picked.bit, one.bit),
            (picked.intensity, one.intensity),
        ):
            np.testing.assert_array_equal(got, want[(slots - first) % L])
        later = laser.emissions(first + 5 * L + 100, 2 * L)
        np.testing.assert_array_equal(later.intensity, np.tile(one.intensity, 3)[100 : 100 + 2 * L])
        # count_classes agrees with the emissions, also across the switch.
        for lo, n in ((first, L), (first + 123, 3 * L + 456), (on - 5, first - on + L + 10)):
            rec = laser.emissions(lo, n)
            want = np.bincount(rec.intensity, minlength=len(IntensityClass))
            np.testing.assert_array_equal(laser.count_classes(lo, n), want)
        back = await switch(laser, emulator, LaserMode.SYNC)
        assert back > first and back % L == 0
        assert_not_key(laser, back, 2 * L)
        assert laser.sync_slots(back, L).size == sync_before.size or laser.sync_slots(back, L).size
        np.testing.assert_array_equal(
            laser.emissions(first, back - first).intensity[:L], one.intensity
        )


@pytest.mark.asyncio
async def test_a_switch_that_failed_leaves_the_slots_after_it_unvouched(
    emulator: Emulator,
) -> None:
    """A mode switch the instrument answered with an error may or may not have
    taken effect: from the slot the driver read before it, nothing is the key
    pattern's until a switch succeeds, and that stretch stays so afterwards."""
    async with modulator(emulator, pulse_rate_hz=1e6) as laser:
        await switch_on(laser, emulator)
        first = await switch(laser, emulator, LaserMode.KEY)
        emulator.fault("error")  # the switch runs, then the instrument reports an error
        with pytest.raises(InstrumentError):
            await laser.set_mode(LaserMode.SYNC)
        did = int(emulator.query("PATT:SWIT?").split(",")[0])  # it did switch, there
        assert emulator.query("PATT:MODE?") == "SYNC"
        # Where the driver stops vouching: the slot it read before the command.
        cls = laser.emissions(first, did + 4 * L - first).intensity
        unvouched = first + int(np.argmax(cls == IntensityClass.SYNC))
        assert first < unvouched <= did  # the switch that did happen lies beyond it
        assert np.all(cls[: unvouched - first] != IntensityClass.SYNC)  # key before
        assert_not_key(laser, unvouched, did + 4 * L - unvouched)  # not vouched for after
        again = await switch(laser, emulator, LaserMode.KEY)
        assert again > did
        assert_not_key(laser, unvouched, again - unvouched)  # and it stays so
        rec = laser.emissions(again, L)  # the key pattern, as the instrument holds it
        held = int(emulator.query("PATT:CHEC? KEY"))
        assert zlib.crc32(wire_bytes(rec.basis, rec.bit, rec.intensity)) == held


def test_timeline_steps() -> None:
    key, sync = LaserMode.KEY, LaserMode.SYNC
    t = Timeline.build(
        [(10, sync), (50, key), (90, None), (95, key)], [(0, False), (20, True)], 120
    )
    slots = np.array([-5, 0, 15, 20, 49, 50, 89, 90, 94, 95, 119, 120, 10**6])
    want = [0, 0, 0, 1, 1, 2, 2, 0, 0, 2, 2, 0, 0]  # DARK 0, SYNC 1, KEY 2
    np.testing.assert_array_equal(t.at(slots), want)
    assert [(lo, hi, int(s)) for lo, hi, s in t.runs(0, 130)] == [
        (0, 20, 0),
        (20, 50, 1),
        (50, 90, 2),
        (90, 95, 0),
        (95, 120, 2),
        (120, 130, 0),
    ]
    assert [(lo, hi, int(s)) for lo, hi, s in t.runs(60, 61)] == [(60, 61, 2)]
    assert list(Timeline.build([], [], None).runs(0, 5)) == [(0, 5, Played.DARK)]


@pytest.mark.asyncio
async def test_pattern_too_long_for_the_memory_is_the_instruments_error() -> None:
    emu = Emulator("--memory", "1000")
    emu.start()
    try:
        dev = modulator(emu, pattern_length=4096)
        with pytest.raises(InstrumentError) as info:
            async with dev:
                pass
        err = info.value
        assert (err.code, err.message) == (-225, "Out of memory")
        assert err.command == "PATT:DATA SYNC" and err.device == "laser0"
        assert "laser0" in str(err) and '-225,"Out of memory"' in str(err)
        assert dev._executor is None
    finally:
        emu.kill()


@pytest.mark.asyncio
async def test_instrument_error_keeps_the_session(emulator: Emulator) -> None:
    async with modulator(emulator) as laser:
        emulator.fault("error")
        with pytest.raises(InstrumentError) as info:
            await laser.set_output(True)
        assert info.value.code == -240
        assert "modulator bias control lost lock" in info.value.message
        assert info.value.command == "OUTP ON"
        assert laser.describe()["connected"] is True
        await laser.set_output(True)  # the same session goes on
        assert emulator.query("OUTP?") == "1"


@pytest.mark.asyncio
async def test_garbage_is_a_protocol_error_naming_device_and_command(emulator: Emulator) -> None:
    async with modulator(emulator) as laser:
        emulator.fault("garbage")
        with pytest.raises(InstrumentProtocolError) as info:
            await laser.set_mode(LaserMode.KEY)
        text = str(info.value)
        assert "laser0" in text and "PATT:MODE KEY" in text and "not ASCII" in text
        assert laser.describe()["connected"] is False  # closed to resynchronise
        assert await laser.ping()  # reopened, settings restored
        assert emulator.query("PATT:MODE?") == "KEY"


@pytest.mark.asyncio
async def test_stall_is_a_timeout_naming_the_command(emulator: Emulator) -> None:
    async with modulator(emulator, timeout_s=0.3) as laser:
        emulator.fault("stall")
        t0 = time.monotonic()
        with pytest.raises(InstrumentTimeoutError) as info:
            await laser.set_output(True)
        assert time.monotonic() - t0 < 2.0
        assert "OUTP ON" in str(info.value) and "0.3 s" in str(info.value)
        await laser.set_output(True)  # a new session
        assert emulator.query("OUTP?") == "1"


@pytest.mark.asyncio
async def test_a_call_that_ignores_its_visa_timeout_hits_the_backstop(emulator: Emulator) -> None:
    async with modulator(emulator, timeout_s=1.0) as laser:
        laser._job_budget_s = 0.2  # far below the VISA timeout: only the backstop can fire
        emulator.fault("stall")
        with pytest.raises(InstrumentTimeoutError, match=r"did not return within 0\.2 s"):
            await laser.set_output(True)
        laser._job_budget_s = 30.0
        assert await laser.ping()  # a fresh I/O thread and session


@pytest.mark.asyncio
async def test_dropped_connection_then_reopen_after_the_emulator_is_back(
    emulator: Emulator,
) -> None:
    async with modulator(emulator, timeout_s=0.5) as laser:
        await laser.set_mode(LaserMode.KEY)
        emulator.fault("drop")
        # The instrument closes while the driver's SYST:ERR? is in flight: an
        # end of file, or a reset when that query was still unread on its side.
        with pytest.raises(InstrumentConnectionError, match=r"closed the connection|reset by peer"):
            await laser.set_output(True)
        epoch = laser.slot_clock_epoch
        assert await laser.ping()  # the instrument is still up: reopened
        assert laser.slot_clock_epoch == epoch  # with its patterns: the same slot clock

        emulator.kill()  # the instrument goes away (a power cycle: state lost)
        with pytest.raises(DeviceError):
            await laser.set_output(True)
        assert not await laser.ping()

        emulator.start()  # back on the same port, empty
        assert emulator.query("PATT:LENG? KEY") == "0"
        epoch = laser.slot_clock_epoch
        assert await laser.ping()
        assert laser.slot_clock_epoch == epoch + 1  # its slot clock may have restarted
        # The node's settings are restored: patterns, mode and output.
        for mode, which in ((LaserMode.KEY, "KEY"), (LaserMode.SYNC, "SYNC")):
            assert int(emulator.query(f"PATT:CHEC? {which}")) == laser.pattern_crc32(mode)
        assert emulator.query("PATT:MODE?") == "KEY"
        assert emulator.query("OUTP?") == "1"
        assert float(emulator.query("SOUR:LEV:SIGN?")) == 0.5


@pytest.mark.asyncio
async def test_calls_from_many_tasks_are_serialised_on_one_session(emulator: Emulator) -> None:
    async with modulator(emulator) as laser:
        results = await asyncio.gather(
            *(laser.ping() for _ in range(20)),
            *(laser.set_output(k % 2 == 0) for k in range(9)),
        )
        assert all(r is True for r in results[:20])
        assert emulator.query("OUTP?") == "1"
