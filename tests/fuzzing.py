"""What the parser fuzz tests (``tests/test_fuzz_*.py``) share: example budgets, a bound on
time, the check that a refusal is the parser's own typed error, and byte mutations.

Every parser that takes outside bytes is held to three properties: it never crashes (no
exception but its module's own typed error), never hangs (each example is bounded in
time), and every refusal says what is wrong and where.  ``make test`` runs a few examples
of each; ``QNODED_FUZZ_EXAMPLES=10000`` (see ``tests/conftest.py``) runs the long fuzz.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from hypothesis import settings
from hypothesis import strategies as st

FUZZ_EXAMPLES = int(os.environ.get("QNODED_FUZZ_EXAMPLES") or 0)
# Wall-clock bound on one example.  Generous (a loaded shared machine is slow), yet a
# parser that loops on its input, or allocates what the input merely declares, is far over.
HANG_S = 5.0


def budget(ci: int) -> settings:
    """``ci`` examples in ``make test``; the profile's count in the long fuzz run."""
    return settings(max_examples=FUZZ_EXAMPLES or ci)


class HangError(AssertionError):
    """A parser ran over its time bound: it loops or works on declared, not actual, sizes."""


@contextmanager
def bounded(what: str, seconds: float = HANG_S) -> Iterator[None]:
    """Fail with :class:`HangError` if the block runs longer than ``seconds``.

    SIGALRM interrupts Python code, which is where a parser would loop; a C call is
    interrupted when it returns to Python.
    """

    def on_alarm(_signum: int, _frame: FrameType | None) -> None:
        raise HangError(f"{what} still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# Exceptions a parser must never let out: they say "the code broke", not "the input is bad".
# (Several are ValueError subclasses; a module's typed error may be one too, so the check
# is on the exact type or the exception's module, see refused().)
UNTYPED = (
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    UnicodeError,
    RecursionError,
    OverflowError,
    ZeroDivisionError,
    AssertionError,
    MemoryError,
)


def refused(
    exc: BaseException, typed: type[BaseException] | tuple[type[BaseException], ...]
) -> str:
    """``str(exc)`` after checking that ``exc`` is the parser's typed error with a message.

    A bare ``ValueError`` (or ``struct.error``, ``UnicodeDecodeError``...) is not typed,
    even where the typed error subclasses ``ValueError``.
    """
    assert isinstance(exc, typed), f"untyped {type(exc).__name__} leaked out: {exc!r}"
    assert not isinstance(exc, UNTYPED), f"{type(exc).__name__} leaked out: {exc!r}"
    text = str(exc)
    assert text.strip(), f"{type(exc).__name__} without a message"
    return text


# -- byte mutations: valid input changed a little reaches deeper than random bytes ----------


@st.composite
def mutated(draw: st.DrawFn, base: bytes, max_edits: int = 4) -> bytes:
    """``base`` with a few edits: bytes flipped, set, inserted, deleted, truncated or extended."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, max_edits))):
        op = draw(st.sampled_from(("flip", "set", "insert", "delete", "truncate", "extend")))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from((0x00, 0x01, 0x7F, 0x80, 0xFF)))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[pos:]
        else:
            data += draw(st.binary(min_size=1, max_size=16))
    return bytes(data)
