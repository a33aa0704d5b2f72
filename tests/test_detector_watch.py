"""The detector watch against a real instrument protocol: the SCPI detector driver
talking to the pty emulator, which latches, over-biases and gets blinded on command.

What must hold: a latch is reset automatically, a bounded number of times, then
a critical alarm and a halt of key generation (cleared when the detector counts
again); a blinding signature
(count rate collapses, photocurrent rises) raises a critical alarm and halts key
generation, and nothing but an operator lifts the halt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_scpi_detector import SerialDetectorEmulator, _detector

from qnoded.contracts import DeviceError
from qnoded.detector_watch import (
    BLINDING,
    MAX_RESETS,
    DetectorWatch,
    WatchActions,
    latch_code,
    silent_code,
)


class Recorder:
    """The node's side of the watch: what it was told to do, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.messages: dict[str, str] = {}

    async def problem(self, code: str, message: str, severity: str) -> None:
        self.calls.append(("problem", code, severity))
        self.messages[code] = message

    async def resolved(self, code: str) -> None:
        self.calls.append(("resolved", code))

    def halt(self, code: str) -> None:
        self.calls.append(("halt", code))

    def watch(self) -> DetectorWatch:
        return DetectorWatch(WatchActions(self.problem, self.resolved, self.halt))


@pytest.fixture
def emulator(tmp_path: Path) -> Any:
    with SerialDetectorEmulator(tmp_path / "ttyDET0", "--seed", "5") as emu:
        yield emu


@pytest.mark.asyncio
async def test_blinding_halts_key_generation_and_only_an_operator_lifts_it(
    emulator: SerialDetectorEmulator,
) -> None:
    rec = Recorder()
    watch = rec.watch()
    async with _detector(emulator.link) as det:
        for _ in range(4):  # healthy intervals: the baselines
            await watch.review(det, await det.status())
        assert rec.calls == []
        emulator.control("EMU:FAULT BLIND")
        await watch.review(det, await det.status())
        assert rec.calls == [("halt", BLINDING), ("problem", BLINDING, "critical")]
        message = rec.messages[BLINDING]
        assert "det0" in message and "photocurrent" in message and "blinding" in message
        # The light goes: the watch learns again, but never lifts the halt itself.
        emulator.control("EMU:FAULT NONE")
        for _ in range(3):
            await watch.review(det, await det.status())
        assert rec.calls == [("halt", BLINDING), ("problem", BLINDING, "critical")]


@pytest.mark.asyncio
async def test_a_latch_is_reset_and_the_fault_clears(emulator: SerialDetectorEmulator) -> None:
    rec = Recorder()
    watch = rec.watch()
    async with _detector(emulator.link) as det:
        emulator.control("EMU:FAULT LATCH")
        st = await det.status()
        assert st.latched
        await watch.review(det, st)  # resets it
        st = await det.status()
        assert not st.latched and st.count_rate_hz > 0
        await watch.review(det, st)
    assert rec.calls == [("resolved", latch_code("det0"))]


@pytest.mark.asyncio
async def test_a_latch_that_comes_back_gets_bounded_resets_then_an_alarm(
    emulator: SerialDetectorEmulator,
) -> None:
    rec = Recorder()
    watch = rec.watch()
    async with _detector(emulator.link) as det:
        await det.set_bias(1.7)  # above the SNSPD's switching current: latches at once
        for _ in range(MAX_RESETS + 3):
            st = await det.status()
            assert st.latched
            await watch.review(det, st)
        # MAX_RESETS resets (each refused), then a halt and one critical alarm, then quiet.
        assert rec.calls == [
            ("halt", latch_code("det0")),
            ("problem", latch_code("det0"), "critical"),
        ]
        assert f"after {MAX_RESETS} automatic resets" in rec.messages[latch_code("det0")]
        await det.set_bias(1.2)  # an operator lowers the bias and resets it
        assert await det.reset_latch()
        await watch.review(det, await det.status())
    assert rec.calls[-1] == ("resolved", latch_code("det0"))


@pytest.mark.asyncio
async def test_a_detector_that_answers_garbage_is_a_fault_until_it_answers(
    emulator: SerialDetectorEmulator,
) -> None:
    rec = Recorder()
    watch = rec.watch()
    async with _detector(emulator.link) as det:
        await watch.review(det, await det.status())
        emulator.control("EMU:FAULT GARBAGE 1")
        with pytest.raises(DeviceError) as exc:
            await det.status()
        await watch.unanswered(det, exc.value)
        await watch.review(det, await det.status())  # it answers again
    assert rec.calls == [
        ("problem", silent_code("det0"), "warning"),
        ("resolved", silent_code("det0")),
    ]
    message = rec.messages[silent_code("det0")]
    assert "det0" in message and "MEAS" in message  # the device and the command
