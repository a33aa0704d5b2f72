"""Shared fixtures: a real Mosquitto broker started with the project's own config, and
the logging set-up restored after a test that runs ``cli.main`` in-process."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
import structlog
from hypothesis import HealthCheck, settings

from qnoded.broker import MosquittoBroker

# Hypothesis, for every test: no example database (CI checkouts may be read-only, and an
# unwritable database warns, which is an error here), random examples (derandomize off),
# no deadline (a shared 2-core machine makes timings noise; the fuzz tests bound time
# themselves).  QNODED_FUZZ_EXAMPLES=N is the long fuzz run: N examples for every property
# test that takes its count from the profile (tests/test_fuzz_*.py).
_FUZZ_EXAMPLES = int(os.environ.get("QNODED_FUZZ_EXAMPLES") or 0)
settings.register_profile("qnoded", database=None, derandomize=False, deadline=None)
settings.register_profile(
    "qnoded-fuzz",
    parent=settings.get_profile("qnoded"),
    max_examples=max(1, _FUZZ_EXAMPLES),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("qnoded-fuzz" if _FUZZ_EXAMPLES else "qnoded")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qnoded hardware in the loop (tests/test_hil.py)")
    group.addoption(
        "--hil-target",
        choices=("emulators", "bench"),
        default="emulators",
        help="instruments: the hil/ emulators (default) or a real bench",
    )
    group.addoption(
        "--hil-bob-config",
        default="",
        help="with --hil-target bench: Bob's node config naming the real devices",
    )
    group.addoption(
        "--hil-alice-config",
        default="",
        help="with --hil-target bench: Alice's node config naming her real source",
    )


@pytest.fixture(scope="session")
def mqtt_broker() -> Iterator[tuple[str, int]]:
    """One broker for the session, on a free port (not the machine's 1883)."""
    with MosquittoBroker() as broker:
        yield broker.host, broker.port


@pytest.fixture
def fresh_broker() -> Iterator[MosquittoBroker]:
    """A broker of the test's own, for tests that kill it (``kill()``/``start()``, same port)
    or ``restart()`` it."""
    with MosquittoBroker() as broker:
        yield broker


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """cli.main configures logging for the process (onto capsys' stream); undo it after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    config = structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**config)
