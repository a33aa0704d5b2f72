"""Fuzzing what the real-I/O drivers read from instruments: SCPI error entries
(``qnoded_drivers.scpi``), the serial detector's answers (``scpi_detector``) and the VISA
modulator's answers (``visa_modulator``).

The drivers run unchanged over a scripted line: the serial detector's ``_SerialLine`` and
the modulator's VISA resource are replaced by fakes that answer each query with the next
line of a script.  Scripts mix plausible answers (an identity, ``0,"No error"``, a status
with nine fields, numbers in NR1/NR2/NR3, SCPI's not-a-number) with mutated and random
bytes, missing lines (a timeout), overlong lines and control characters.  Every call gives
a valid result or the driver's typed error naming the device, its port and the command.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any
from unittest import mock

import pyvisa.errors
from fuzzing import bounded, budget, mutated, refused
from hypothesis import example, given
from hypothesis import strategies as st
from pyvisa.constants import StatusCode
from qnoded_drivers import scpi_detector, visa_modulator
from qnoded_drivers.scpi import parse_error_entry
from qnoded_drivers.scpi_detector import MAX_ANSWER, ScpiDetector, ScpiError
from qnoded_drivers.visa_modulator import (
    InstrumentConnectionError,
    ModulatorOptions,
    ScpiSession,
    VisaDeviceError,
)

from qnoded.contracts import DetectorStatus, DriverContext

CONTEXT = DriverContext(node_id="fuzz", role="bob", protocol="bb84")


# -- SYST:ERR? entries ---------------------------------------------------------------------------

codes = st.one_of(st.integers(-999, 999), st.integers(-(10**18) + 1, 10**18 - 1))
messages = st.text(
    st.characters(exclude_characters="\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"), max_size=40
)


@budget(100)
@given(codes, messages, st.sampled_from(["", " ", "\t"]), st.booleans())
def test_error_entry_round_trip(code: int, message: str, pad: str, plus: bool) -> None:
    quoted = message.replace('"', '""')
    text = f'{pad}{"+" if plus and code >= 0 else ""}{code},"{quoted}"{pad}'
    assert parse_error_entry(text) == (code, message)


@budget(150)
@given(
    st.one_of(
        st.text(max_size=60),
        st.sampled_from(['0,"No error"', '-222,"Data out of range"', '+7,"a ""b"""']).flatmap(
            lambda s: mutated(s.encode()).map(lambda b: b.decode("latin-1"))
        ),
        st.builds('{}"x"'.format, st.text("0123456789+-", max_size=5000)),
    )
)
@example("9" * 5000 + ',"x"')  # int() refused it with its own message, naming nothing
@example('\u0663,"x"')  # an Arabic-Indic digit: int() takes it, SCPI does not
def test_error_entry_of_any_text(text: str) -> None:
    try:
        code, message = parse_error_entry(text)
    except ValueError as exc:  # the helper's documented refusal; drivers wrap it
        assert type(exc) is ValueError and "is not <code>" in str(exc), exc
        return
    assert isinstance(code, int) and isinstance(message, str)


# -- the serial detector over a scripted line ------------------------------------------------------

IDN = b"QNODED-EMU,SNSPD-1000,EMU0001,1.0"
NO_ERROR = b'0,"No error"'
numbers = st.one_of(
    st.floats(0, 1, allow_nan=False).map(lambda v: f"{v:.6E}"),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        [
            "0",
            "1",
            "-1",
            "1.5",
            ".5",
            "5.",
            "1e3",
            "9.91E+37",
            "-9.9E+37",
            "+2.0E-1",
            "1e999",
            "nan",
            "inf",
            "",
            " ",
            "1,2",
        ]
    ),
    st.text(max_size=6),
)
status_answers = st.lists(numbers, min_size=8, max_size=10).map(lambda v: ";".join(v).encode())
plausible = st.sampled_from(
    [
        IDN,
        NO_ERROR,
        b'-222,"Data out of range"',
        b'-350,"Queue overflow"',
        b'1,"Own error"',
        b"GATED",
        b"FREE",
        b"free",
        b"1",
        b"0",
        b"1.0",
        b"2.500000E+00",
        b"",
        b"0.1;0.5;1E-8;2.5;0;100;5;1E-9;0.1",
    ]
)
answer_lines = st.one_of(
    plausible,
    status_answers,
    plausible.flatmap(lambda b: mutated(b, max_edits=2)),
    st.binary(max_size=20),
    st.just(b"x" * (MAX_ANSWER + 10)),  # no line end within MAX_ANSWER
)
# One entry per query: the answer's bytes (a line end is added unless it is the overlong
# one), or None for no answer at all (the query times out).
scripts = st.lists(st.one_of(answer_lines, st.none()), max_size=40)


@budget(150)
@given(st.one_of(numbers, st.text(max_size=400), st.floats().map(lambda v: f"{v:.17E}")))
@example("1" * 400 + "e-400")
def test_number_answers(text: str) -> None:
    try:
        value = scpi_detector.parse_number(text)
    except ValueError as exc:  # the helper's documented refusal; the driver wraps it
        assert type(exc) is ValueError and ("not a number" in str(exc) or "SCPI" in str(exc))
        return
    assert math.isfinite(value) and abs(value) < 9.9e37


class ScriptedLine:
    """A ``_SerialLine`` whose instrument answers each query with the script's next entry."""

    def __init__(self, script: list[bytes | None]) -> None:
        self.script = script
        self.buffer = bytearray()
        self.failure: str | None = None

    def discard_input(self) -> None:
        self.buffer.clear()

    async def write(self, data: bytes) -> None:
        for message in data.split(b"\n"):
            if message.endswith(b"?") and self.script:
                answer = self.script.pop(0)
                if answer is not None:
                    self.buffer += answer if len(answer) > MAX_ANSWER else answer + b"\n"

    async def readline(self) -> bytes:
        end = self.buffer.find(b"\n")
        if end >= 0:
            line = bytes(self.buffer[:end])
            del self.buffer[: end + 1]
            return line.removesuffix(b"\r")
        if len(self.buffer) > MAX_ANSWER:
            raise scpi_detector._OverlongAnswerError(bytes(self.buffer[:60]))
        await asyncio.sleep(1.0)  # nothing comes: the driver's timeout fires
        raise AssertionError("the driver's timeout did not fire")

    def close(self) -> None:
        self.failure = "closed"


def check_detector_error(exc: BaseException) -> None:
    text = refused(exc, ScpiError)
    assert "'det0'" in text and "/dev/fuzz" in text, text


def check_status(status: DetectorStatus) -> None:
    assert status.mode in ("gated", "free-running")
    assert status.bias_v >= 0 and 0 <= status.efficiency <= 1
    assert status.dead_time_ps >= 0 and status.temperature_k > 0
    assert status.count_rate_hz >= 0 and status.dark_count_rate_hz >= 0
    for value in (
        status.bias_v,
        status.temperature_k,
        status.count_rate_hz,
        *status.extra.values(),
    ):
        assert math.isfinite(value) and abs(value) < 9.9e37


STATUS = b"0.1;0.5;1E-8;2.5;0;100;5;1E-9;0.1"


@st.composite
def near_valid_scripts(draw: st.DrawFn, bias_v: float) -> list[bytes | None]:
    """What a working instrument answers along the test's calls, a few answers changed."""
    valid: list[bytes | None] = [
        IDN,
        NO_ERROR,
        b"GATED",  # open: *IDN?, SYST:ERR? after *CLS, SENS:MODE?
        STATUS,  # status()
        NO_ERROR,
        f"{bias_v:.6E}".encode(),  # set_bias(): SYST:ERR?, SOUR:VOLT?
        NO_ERROR,
        b"0",  # reset_latch(): SYST:ERR?, STAT:LATCH?
        STATUS,
        b"1",  # status(), ping()
    ]
    return [
        draw(st.one_of(answer_lines, st.none())) if draw(st.integers(0, 3)) == 0 else answer
        for answer in valid
    ]


@budget(80)
@given(
    st.floats(0, 5).flatmap(
        lambda v: st.tuples(st.one_of(scripts, near_valid_scripts(v)), st.just(v))
    )
)
@example(([IDN, NO_ERROR, b"GATED", STATUS], 1.0))
@example(([IDN, NO_ERROR, b"FREE", b"9.91E+37;0.5;1E-8;2.5;0;100;5;1E-9;0.1", NO_ERROR], 1.0))
def test_detector_reads_any_answers(case: tuple[list[bytes | None], float]) -> None:
    script, bias_v = case
    line = ScriptedLine(list(script))
    options = {"port": "/dev/fuzz", "channel": 0, "timeout_s": 0.01}

    async def run() -> None:
        det = ScpiDetector("det0", options, CONTEXT)
        with mock.patch.object(scpi_detector, "_SerialLine", lambda *_a: line):
            try:
                await det.__aenter__()
            except Exception as exc:  # noqa: BLE001 - the property is about which exception
                check_detector_error(exc)
                return
            try:
                for step in ("status", "bias", "latch", "status", "ping"):
                    try:
                        if step == "status":
                            check_status(await det.status())
                        elif step == "bias":
                            await det.set_bias(bias_v)
                        elif step == "latch":
                            assert isinstance(await det.reset_latch(), bool)
                        else:
                            assert isinstance(await det.ping(), bool)
                    except Exception as exc:  # noqa: BLE001 - the property is about which one
                        check_detector_error(exc)
            finally:
                await det.__aexit__(None, None, None)

    with bounded("ScpiDetector"):
        asyncio.run(run())


# -- the VISA modulator's session over a scripted resource ---------------------------------------


class ScriptedResource:
    """A pyvisa message-based resource answering each read with the script's next entry."""

    visalib = None
    session = None

    def __init__(self, script: list[bytes | None]) -> None:
        self.script = script
        self.timeout = 1000
        self.written: list[str] = []

    def write(self, text: str) -> None:
        self.written.append(text)

    def write_raw(self, data: bytes) -> None:
        self.written.append(repr(data[:20]))

    def read_raw(self) -> bytes:
        answer = self.script.pop(0) if self.script else None
        if answer is None:
            raise pyvisa.errors.VisaIOError(StatusCode.error_timeout)
        return answer

    def close(self) -> None:
        pass


OPTIONS = ModulatorOptions.from_mapping("laser0", {"resource": "TCPIP::fuzz::5025::SOCKET"})
visa_answers = st.one_of(
    answer_lines.map(lambda b: b + b"\n"),
    st.sampled_from(
        [b"+1\n", b"1\n", b"SYNC\n", b"KEY\n", b"ON\n", b"0\n", b"1e400\n", b"1_000\n"]
    ),
    st.binary(max_size=12),
    st.none(),
)
OPERATIONS = (
    "query_float",
    "query_int",
    "query_word",
    "identify",
    "wait_complete",
    "check_errors",
    "clear_errors",
    "command",
    "command_wait",
)


@budget(120)
@given(
    st.lists(st.sampled_from(OPERATIONS), min_size=1, max_size=6),
    st.lists(visa_answers, max_size=30),
)
@example(["query_int"], [b"9" * 5000 + b"\n"])
def test_visa_session_reads_any_answers(operations: list[str], script: list[bytes | None]) -> None:
    resource = ScriptedResource(list(script))
    link = ScpiSession("laser0", OPTIONS)
    for op in operations:
        if link._res is None:  # a protocol error closed it: the driver would reopen
            link._res = resource  # type: ignore[assignment]
        try:
            with bounded(f"ScpiSession.{op}"):
                result: Any = _visa_call(link, op)
        except Exception as exc:  # noqa: BLE001 - the property is about which exception
            text = refused(exc, VisaDeviceError)
            assert "laser0" in text and OPTIONS.resource in text, text
            if not isinstance(exc, InstrumentConnectionError | visa_modulator.InstrumentError):
                assert link._res is None, "a bad answer must close the session (resync)"
            continue
        if op == "query_float":
            assert isinstance(result, float) and math.isfinite(result)
        elif op == "query_int":
            assert isinstance(result, int)
        elif op == "query_word":
            assert result in ("SYNC", "KEY")
        elif op == "identify":
            assert len(result.split(",")) == 4 and result.isprintable()


def _visa_call(link: ScpiSession, op: str) -> Any:
    calls: dict[str, Any] = {
        "query_float": lambda: link.query_float("SOUR:FREQ", "SOUR:FREQ?"),
        "query_int": lambda: link.query_int("PATT:LENG", "PATT:LENG? KEY"),
        "query_word": lambda: link.query_word("PATT:MODE", "PATT:MODE?", ("SYNC", "KEY")),
        "identify": link.identify,
        "wait_complete": lambda: link.wait_complete("*RST"),
        "check_errors": lambda: link.check_errors("OUTP ON"),
        "clear_errors": link.clear_errors,
        "command": lambda: link.command("OUTP ON"),
        "command_wait": lambda: link.command("OUTP ON", wait=True),
    }
    return calls[op]()
