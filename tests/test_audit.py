"""The audit trail: a config change at start is an audit event naming what changed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from structlog.testing import capture_logs
from test_node_faults import _args

from qnoded.audit import AUDIT_LOGGER, record_config, settings
from qnoded.config import parse_config
from qnoded.demo import link_parameters, node_config


def test_config_first_seen_then_changes_named(tmp_path: Path) -> None:
    args = _args(protocol="bb84")
    text = node_config("bob", args, "127.0.0.1:1883", 7000, tmp_path, link_parameters(args))
    cfg = parse_config(text)
    state = tmp_path / "state"
    with capture_logs() as logs:
        assert record_config(cfg, state, source="bob.toml") == []
        assert record_config(cfg, state, source="bob.toml") == []  # same again: silent
        changed = dataclasses.replace(
            cfg,
            sifting=dataclasses.replace(cfg.sifting, qber_alarm_threshold=0.08),
            mqtt=dataclasses.replace(cfg.mqtt, password_file="/etc/qnoded/credentials/mqtt"),  # noqa: S106 - a path
        )
        assert record_config(changed, state, source="bob.toml") == [
            "mqtt.password_file",
            "sifting.qber_alarm_threshold",
        ]
    assert [e["event"] for e in logs] == ["config first seen", "config changed"]
    first, change = logs
    assert first["settings"] == len(settings(cfg)) and len(first["config_digest"]) == 16
    assert change["changes"]["sifting.qber_alarm_threshold"] == {"old": 0.11, "new": 0.08}
    assert change["changes"]["mqtt.password_file"]["new"] == "/etc/qnoded/credentials/mqtt"
    assert all(e.get("logger", AUDIT_LOGGER) == AUDIT_LOGGER for e in logs)


def test_a_secret_setting_is_logged_as_a_digest() -> None:
    @dataclasses.dataclass
    class Section:
        password: str = "hunter2"  # noqa: S105 - the secret that must not show
        user: str = "node"

    @dataclasses.dataclass
    class Config:
        broker: Section = dataclasses.field(default_factory=Section)

    flat = settings(Config())  # type: ignore[arg-type]
    assert flat["broker.user"] == "node"
    assert flat["broker.password"].startswith("<sha256 ") and "hunter2" not in str(flat)
