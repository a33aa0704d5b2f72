"""Shared fixtures: a real Mosquitto broker started with the project's own config, and
the logging set-up restored after a test that runs ``cli.main`` in-process."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import structlog

from qnoded.broker import MosquittoBroker


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
