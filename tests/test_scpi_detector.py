"""The SCPI detector driver against its wire-level emulator, over a real pty.

``hil/serial_detector.py`` runs as a subprocess behind a stable symlink (as udev
gives a USB adapter a /dev/serial/by-id name); the driver opens that path with
pyserial.  Faults are injected through the emulator's stdin, which acknowledges
each one before the test goes on, so nothing here sleeps or polls.
"""

from __future__ import annotations

import asyncio
import math
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest
from qnoded_drivers.scpi_detector import (
    BadAnswerError,
    CommandSyntaxError,
    DeviceSpecificError,
    ExecutionError,
    InstrumentError,
    LineDownError,
    QueryError,
    ScpiDetector,
    ScpiError,
    ScpiTimeoutError,
    SettingNotAppliedError,
)
from structlog.testing import capture_logs

from qnoded.contracts import Detector, DeviceError, DriverContext

EMULATOR = Path(__file__).resolve().parents[1] / "hil" / "serial_detector.py"
START_TIMEOUT_S = 10.0
CONTROL_TIMEOUT_S = 5.0
TIMEOUT_S = 0.5  # the driver's round-trip bound in these tests
IDENTITY = "QNODED-EMU,SNSPD-1000,EMU0001,1.0"
STATUS_QUERY_HEAD = "SOUR:VOLT?;:SENS:EFF?"
CONTEXT = DriverContext(node_id="test", role="bob", protocol="bb84")


class SerialDetectorEmulator:
    """``hil/serial_detector.py`` as a subprocess: started, told to misbehave, stopped.

    ``link`` is the port the driver opens (a symlink to the emulator's pty); an
    emulator started again on the same link is found at the same port.
    """

    def __init__(self, link: Path, *args: str) -> None:
        self.link = link
        self.args = args
        self.pty = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._out = bytearray()

    def start(self) -> Self:
        self._out.clear()
        self._proc = subprocess.Popen(
            [sys.executable, str(EMULATOR), "--link", str(self.link), *self.args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        try:
            ready = self._readline(START_TIMEOUT_S)
            if not ready.startswith("READY /dev/"):
                raise RuntimeError(f"emulator said {ready!r}, not READY <pty>")
        except BaseException:
            self.stop()
            raise
        self.pty = ready.removeprefix("READY ")
        return self

    def _readline(self, timeout_s: float) -> str:
        assert self._proc is not None
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._out:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"emulator said nothing within {timeout_s} s")
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise RuntimeError(f"emulator exited ({self._proc.poll()}) before a line")
                self._out += chunk
        line, _, rest = bytes(self._out).partition(b"\n")
        self._out[:] = rest
        return line.decode()

    def control(self, command: str) -> None:
        """One ``EMU:FAULT ...`` on stdin; returns once the emulator has applied it."""
        assert self._proc is not None
        assert self._proc.stdin is not None
        self._proc.stdin.write(command.encode() + b"\n")
        ack = self._readline(CONTROL_TIMEOUT_S)
        if ack != f"OK {command}":
            raise AssertionError(f"emulator refused {command!r}: {ack}")

    def wait(self, timeout_s: float = CONTROL_TIMEOUT_S) -> int:
        assert self._proc is not None
        return self._proc.wait(timeout_s)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(CONTROL_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@pytest.fixture
def link(tmp_path: Path) -> Path:
    return tmp_path / "ttyDET0"


@pytest.fixture
def emulator(link: Path) -> Iterator[SerialDetectorEmulator]:
    with SerialDetectorEmulator(link, "--seed", "11") as emu:
        yield emu


def _detector(link: Path, **options: Any) -> ScpiDetector:
    base: dict[str, Any] = {"port": str(link), "channel": 0, "timeout_s": TIMEOUT_S}
    return ScpiDetector("det0", base | options, CONTEXT)


def _poisson_bound_hz(rate_hz: float, gate_s: float = 0.1) -> float:
    """Five standard deviations of a Poisson count over one counter gate, as a rate."""
    return 5.0 * math.sqrt(max(rate_hz * gate_s, 1.0)) / gate_s


# -- identity and settings ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_identity_is_read_on_open(emulator: SerialDetectorEmulator, link: Path) -> None:
    det = _detector(link)
    assert isinstance(det, Detector)
    async with det:
        assert await det.ping()
        d = det.describe()
        assert d["identity"] == IDENTITY
        assert (d["manufacturer"], d["model"], d["serial_number"]) == (
            "QNODED-EMU",
            "SNSPD-1000",
            "EMU0001",
        )
        assert d["mode"] == "free-running"
        assert d["port"] == str(link)
    assert not await det.ping()  # closed: a dead device answers False, never raises


@pytest.mark.asyncio
async def test_bias_round_trip_moves_efficiency_and_dark_counts(
    emulator: SerialDetectorEmulator, link: Path
) -> None:
    async with _detector(link) as det:
        nominal = await det.status()
        assert nominal.bias_v == pytest.approx(1.2)
        await det.set_bias(1.0)
        low = await det.status()
        assert low.bias_v == pytest.approx(1.0)
        # Less bias: lower efficiency (logistic in the bias) and fewer dark counts.
        assert low.efficiency < nominal.efficiency
        assert low.dark_count_rate_hz < nominal.dark_count_rate_hz
        await det.set_trigger_level(0.25)
        assert (await det.status()).extra["trigger_level_v"] == pytest.approx(0.25)


@pytest.mark.asyncio
async def test_bias_from_options_is_applied_on_open(
    emulator: SerialDetectorEmulator, link: Path
) -> None:
    async with _detector(link, bias_v=1.05, trigger_level_v=0.15) as det:
        st = await det.status()
        assert st.bias_v == pytest.approx(1.05)
        assert st.extra["trigger_level_v"] == pytest.approx(0.15)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("preset", "mode", "dead_time_ps", "temperature_k"),
    [("snspd", "free-running", 50_000, 2.5), ("spad", "gated", 1_000_000, 223.0)],
)
async def test_counts_and_temperature_follow_the_model(
    link: Path, preset: str, mode: str, dead_time_ps: int, temperature_k: float
) -> None:
    photon_rate_hz = 3e5
    args = ("--preset", preset, "--photon-rate-hz", str(photon_rate_hz), "--seed", "3")
    with SerialDetectorEmulator(link, *args):
        async with _detector(link) as det:
            st = await det.status()
            assert st.mode == mode
            assert st.dead_time_ps == dead_time_ps
            assert st.temperature_k == pytest.approx(temperature_k, abs=0.5)
            assert not st.latched
            # What reaches the counter: detected photons plus dark counts, less
            # what falls in the dead time (non-paralysable).
            arriving = st.efficiency * photon_rate_hz + st.dark_count_rate_hz
            expected = arriving / (1.0 + arriving * st.dead_time_ps * 1e-12)
            assert abs(st.count_rate_hz - expected) < _poisson_bound_hz(expected)
            # A trigger level above the pulses' height: the discriminator passes nothing.
            await det.set_trigger_level(1.9)
            assert (await det.status()).count_rate_hz < 0.01 * expected


# -- the error queue --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_out_of_range_bias_raises_the_instruments_error(
    emulator: SerialDetectorEmulator, link: Path
) -> None:
    async with _detector(link) as det:
        with pytest.raises(ExecutionError) as caught:
            await det.set_bias(5.0)
        err = caught.value
        assert err.code == -222
        assert err.instrument_message == "Data out of range; bias 0 to 3 V"
        assert err.command == "SOUR:VOLT 5"
        assert "'det0'" in str(err)
        assert "SOUR:VOLT 5" in str(err)
        assert str(link) in str(err)
        # Not applied, the queue was emptied, and the next command works.
        assert (await det.status()).bias_v == pytest.approx(1.2)
        await det.set_bias(1.1)
        assert (await det.status()).bias_v == pytest.approx(1.1)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("code", "message", "cls"),
    [
        (-240, "Hardware error; bias supply tripped", ExecutionError),
        (-310, "System error; cryocooler compressor fault", DeviceSpecificError),
        (-113, "Undefined header", CommandSyntaxError),
        (-410, "Query INTERRUPTED", QueryError),
        (201, "Cryostat above 4 K", DeviceSpecificError),
    ],
)
async def test_injected_errors_map_to_typed_exceptions(
    emulator: SerialDetectorEmulator,
    link: Path,
    code: int,
    message: str,
    cls: type[InstrumentError],
) -> None:
    async with _detector(link) as det:
        # A set command that fails is not applied ...
        emulator.control(f'EMU:FAULT ERROR {code} "{message}"')
        with pytest.raises(cls) as on_set:
            await det.set_bias(1.1)
        assert (on_set.value.code, on_set.value.instrument_message) == (code, message)
        assert on_set.value.command == "SOUR:VOLT 1.1"
        # ... and a query that fails answers SCPI's not-a-number and queues the error.
        emulator.control(f'EMU:FAULT ERROR {code} "{message}"')
        with pytest.raises(cls) as on_query:
            await det.status()
        assert on_query.value.instrument_message == message
        assert on_query.value.command.startswith(STATUS_QUERY_HEAD)
        assert (await det.status()).bias_v == pytest.approx(1.2)


@pytest.mark.asyncio
async def test_default_injected_error(emulator: SerialDetectorEmulator, link: Path) -> None:
    async with _detector(link) as det:
        emulator.control("EMU:FAULT ERROR")
        with pytest.raises(ExecutionError, match="bias supply tripped") as caught:
            await det.reset_latch()
        assert caught.value.command == "LATCH:RES"


# -- line faults -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_garbage_names_device_and_command(
    emulator: SerialDetectorEmulator, link: Path
) -> None:
    async with _detector(link) as det:
        emulator.control("EMU:FAULT GARBAGE")
        with pytest.raises(BadAnswerError) as caught:
            await det.status()
        text = str(caught.value)
        assert "'det0'" in text
        assert STATUS_QUERY_HEAD in text
        assert "garbage" in text
        assert (await det.status()).bias_v == pytest.approx(1.2)  # usable again


@pytest.mark.asyncio
async def test_garbage_identity_fails_the_open_and_frees_the_port(link: Path) -> None:
    with SerialDetectorEmulator(link, "--fault", "GARBAGE"):
        with pytest.raises(BadAnswerError, match=r"\*IDN\?: answered garbage"):
            async with _detector(link):
                pass
        async with _detector(link) as det:  # the failed open released the port's lock
            assert await det.ping()


@pytest.mark.asyncio
async def test_stall_times_out_naming_the_command(
    emulator: SerialDetectorEmulator, link: Path
) -> None:
    async with _detector(link) as det:
        emulator.control("EMU:FAULT STALL")
        started = time.monotonic()
        with pytest.raises(ScpiTimeoutError) as caught:
            await det.status()
        elapsed = time.monotonic() - started
        assert TIMEOUT_S <= elapsed < TIMEOUT_S + 0.5
        assert caught.value.command.startswith(STATUS_QUERY_HEAD)
        assert f"no answer within {TIMEOUT_S:g} s" in str(caught.value)
        assert (await det.status()).bias_v == pytest.approx(1.2)  # usable again


@pytest.mark.asyncio
async def test_a_late_answer_is_not_taken_for_the_next_one(
    emulator: SerialDetectorEmulator, link: Path
) -> None:
    async with _detector(link) as det:
        # A busy instrument: the answer to *OPC? comes 0.2 s after the timeout.
        emulator.control(f"EMU:FAULT DELAY {TIMEOUT_S + 0.2}")
        assert not await det.ping()
        # Without resynchronising, the late "1" would arrive as this query's answer.
        st = await det.status()
        assert st.bias_v == pytest.approx(1.2)
        assert st.count_rate_hz > 1e5


@pytest.mark.asyncio
async def test_a_swallowed_setting_is_caught_by_its_readback(
    emulator: SerialDetectorEmulator, link: Path
) -> None:
    async with _detector(link) as det:
        emulator.control("EMU:FAULT STALL")  # eats the SOUR:VOLT; SYST:ERR? says no error
        with pytest.raises(SettingNotAppliedError, match=r"SOUR:VOLT 1\.1: reads back"):
            await det.set_bias(1.1)
        await det.set_bias(1.1)
        assert (await det.status()).bias_v == pytest.approx(1.1)


@pytest.mark.asyncio
async def test_dropped_line_raises_then_reopens_after_restart(link: Path) -> None:
    first = SerialDetectorEmulator(link, "--seed", "1").start()
    second = SerialDetectorEmulator(link, "--seed", "2")
    try:
        with capture_logs() as logs:
            async with _detector(link) as det:
                await det.set_bias(1.1)
                # The line drops while a query waits for its answer.
                first.control("EMU:FAULT STALL")
                pending = asyncio.create_task(det.status())
                await asyncio.sleep(0)  # it has sent its query and waits for the answer
                await asyncio.to_thread(first.control, "EMU:FAULT DROP")
                with pytest.raises(LineDownError) as caught:
                    await pending
                assert isinstance(caught.value, DeviceError)
                assert "serial line dropped" in str(caught.value)
                assert caught.value.command.startswith(STATUS_QUERY_HEAD)
                assert first.wait() == 0
                # Gone: every call tries one reopen, and fails clearly.
                assert not await det.ping()
                with pytest.raises(LineDownError, match=r"reopen for .*: cannot open"):
                    await det.status()
                # Back (a power-cycled controller: its bias is the default 1.2 V).
                second.start()
                st = await det.status()
                assert st.bias_v == pytest.approx(1.1)  # the driver's setpoint, re-applied
                assert await det.ping()
                assert det.describe()["identity"] == IDENTITY
    finally:
        first.stop()
        second.stop()
    events = [entry["event"] for entry in logs]
    # State changes are logged, not each failed attempt.
    assert events.count("detector line down") == 1
    assert events.count("detector line up") == 1


@pytest.mark.asyncio
async def test_a_different_instrument_on_the_port_is_refused(link: Path) -> None:
    with SerialDetectorEmulator(link):
        det = _detector(link)
        await det.__aenter__()
    try:
        other = "QNODED-EMU,SNSPD-1000,EMU0002,1.0"
        with (
            SerialDetectorEmulator(link, "--identity", other),
            pytest.raises(ScpiError, match="a different instrument answers"),
        ):
            await det.status()
    finally:
        await det.__aexit__(None, None, None)


@pytest.mark.asyncio
async def test_missing_port_fails_the_open_clearly(tmp_path: Path) -> None:
    port = tmp_path / "ttyUSB-absent"
    with pytest.raises(LineDownError, match=rf"'det0' on {port}: open: cannot open"):
        async with _detector(port):
            pass


@pytest.mark.asyncio
async def test_the_port_is_exclusive(emulator: SerialDetectorEmulator, link: Path) -> None:
    async with _detector(link) as det:
        with pytest.raises(LineDownError, match="lock"):
            async with _detector(link):
                pass
        assert await det.ping()
    async with _detector(link) as det:  # closing released it
        assert await det.ping()


@pytest.mark.asyncio
async def test_concurrent_callers_take_turns(emulator: SerialDetectorEmulator, link: Path) -> None:
    async with _detector(link) as det:
        results = await asyncio.gather(
            *(det.status() for _ in range(10)),
            det.set_bias(1.15),
            *(det.ping() for _ in range(10)),
        )
        assert all(r is True for r in results[11:])
        assert (await det.status()).bias_v == pytest.approx(1.15)


# -- latch and blinding --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_latch_shows_in_status_and_reset_clears_it(
    emulator: SerialDetectorEmulator, link: Path
) -> None:
    async with _detector(link) as det:
        emulator.control("EMU:FAULT LATCH")
        st = await det.status()
        assert st.latched
        assert st.count_rate_hz == 0.0
        assert await det.reset_latch()
        st = await det.status()
        assert not st.latched
        assert st.count_rate_hz > 1e5


@pytest.mark.asyncio
async def test_overbias_latches_until_the_bias_is_lowered(
    emulator: SerialDetectorEmulator, link: Path
) -> None:
    async with _detector(link) as det:
        await det.set_bias(1.7)  # above the SNSPD's switching point
        assert (await det.status()).latched
        assert not await det.reset_latch()  # the cause remains: latches again at once
        await det.set_bias(1.2)
        assert await det.reset_latch()
        assert not (await det.status()).latched


@pytest.mark.asyncio
async def test_blinding_signature_is_visible_in_status(
    emulator: SerialDetectorEmulator, link: Path
) -> None:
    async with _detector(link) as det:
        normal = await det.status()
        emulator.control("EMU:FAULT BLIND")
        blind = await det.status()
        # Not a latch: the detector reports healthy.  The signature is the count
        # rate collapsing while the photocurrent rises (Lydersen et al. 2010).
        assert not blind.latched
        assert blind.count_rate_hz < 0.01 * normal.count_rate_hz
        assert blind.extra["photocurrent_a"] > 10 * normal.extra["photocurrent_a"]
        emulator.control("EMU:FAULT NONE")
        light = await det.status()
        assert abs(light.count_rate_hz - normal.count_rate_hz) < 2 * _poisson_bound_hz(
            normal.count_rate_hz
        )


# -- options -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"channel": 0}, "option 'port'"),
        ({"port": "/dev/ttyUSB0"}, "option 'channel'"),
        ({"port": "/dev/ttyUSB0", "channel": 64}, "option 'channel'"),
        ({"port": "/dev/ttyUSB0", "channel": 0, "speed": 9600}, r"unknown option\(s\) \['speed'\]"),
        ({"port": "/dev/ttyUSB0", "channel": 0, "timeout_s": 0}, "option 'timeout_s'"),
        ({"port": "/dev/ttyUSB0", "channel": 0, "bias_v": -1}, "option 'bias_v'"),
        ({"port": "/dev/ttyUSB0", "channel": 0, "baudrate": "fast"}, "option 'baudrate'"),
    ],
)
def test_options_are_validated(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ScpiDetector("det0", options, CONTEXT)


@pytest.mark.asyncio
async def test_bias_must_be_a_non_negative_number(
    emulator: SerialDetectorEmulator, link: Path
) -> None:
    async with _detector(link) as det:
        for bad in (-0.1, math.nan, math.inf):
            with pytest.raises(ValueError, match="bias must be >= 0 V"):
                await det.set_bias(bad)


def test_error_queue_entries_parse_as_scpi_says() -> None:
    """The one parser of SYST:ERR? answers that every SCPI driver uses."""
    from qnoded_drivers.scpi import parse_error_entry

    assert parse_error_entry('0,"No error"') == (0, "No error")
    assert parse_error_entry('-222,"Data out of range; bias ""5 V"" too high"\n') == (
        -222,
        'Data out of range; bias "5 V" too high',
    )
    assert parse_error_entry('+301,"Latched"') == (301, "Latched")
    for junk in ("", "0", 'No error,"0"', "-222,Data out of range", "\x85\x01"):
        with pytest.raises(ValueError, match="is not <code>"):
            parse_error_entry(junk)
