"""Logging: one configuration, JSON off a terminal, secrets never rendered."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from qnoded.logs import REDACTED, configure_logging

# Stands for key material: must never appear in a rendered log line.
SECRET = bytes(range(7, 39)).hex()


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    configure_logging("debug", json=True)
    stream = io.StringIO()
    root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
    yield stream
    structlog.reset_defaults()
    root.handlers[:], root.level = saved[0], saved[1]


def test_secret_fields_are_redacted(captured: io.StringIO) -> None:
    log = structlog.get_logger("qnoded.test")
    log.info("key delivered", key=SECRET, key_id="3f2c", psk=SECRET, password=SECRET)
    line = captured.getvalue().strip()
    record = json.loads(line)
    assert SECRET not in line
    assert record["key"] == REDACTED
    assert record["psk"] == REDACTED
    assert record["key_id"] == "3f2c"  # identifiers stay readable for audit


def test_stdlib_loggers_share_the_renderer(captured: io.StringIO) -> None:
    logging.getLogger("pyvisa").warning("instrument %s timed out", "ASRL1")
    record = json.loads(captured.getvalue().strip())
    assert record["event"] == "instrument ASRL1 timed out"
    assert record["logger"] == "pyvisa"
    assert record["level"] == "warning"


def test_audit_events_survive_a_quiet_log_level() -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("qnoded.audit").level)
    try:
        configure_logging("warning", json=True)
        stream = io.StringIO()
        root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
        structlog.get_logger("qnoded.node").info("routine")
        structlog.get_logger("qnoded.audit").info("key delivered", key_ids=["3f2c"])
        lines = [json.loads(x) for x in stream.getvalue().splitlines()]
        assert [x["event"] for x in lines] == ["key delivered"]
    finally:
        structlog.reset_defaults()
        root.handlers[:], root.level = saved[0], saved[1]
        logging.getLogger("qnoded.audit").setLevel(saved[2])


def test_under_systemd_json_lines_go_to_stdout(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        monkeypatch.setenv("JOURNAL_STREAM", "8:12345")  # what systemd sets for journald
        configure_logging("info")
        structlog.get_logger("qnoded.node").info("state", state="running")
        out, err = capsys.readouterr()
        assert err == "" and json.loads(out)["state"] == "running"
        monkeypatch.delenv("JOURNAL_STREAM")
        configure_logging("info")
        structlog.get_logger("qnoded.node").info("state", state="locking")
        out, err = capsys.readouterr()
        assert out == "" and json.loads(err)["state"] == "locking"  # not a terminal: JSON
    finally:
        structlog.reset_defaults()
        root.handlers[:], root.level = saved[0], saved[1]
