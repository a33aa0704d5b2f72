"""Shared fixtures: a real Mosquitto broker started with the project's own config."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from qnoded.broker import MosquittoBroker


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
