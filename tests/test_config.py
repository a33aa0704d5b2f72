"""Config validation: every mistake names the file, the key and the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qnoded.config import ConfigError, load_config, parse_config

GOOD = """
[node]
id = "alice"
role = "alice"
protocol = "bb84"

[peer]
peer_id = "bob"
listen = "127.0.0.1:7001"

[timing]
max_offset_ps = 2000000000

[devices.laser]
driver = "sim-laser"
"""


def test_good_config_parses() -> None:
    cfg = parse_config(GOOD, "a.toml")
    assert cfg.node.role == "alice"
    assert cfg.timing.max_offset_ps == 2_000_000_000
    assert cfg.devices[0].driver == "sim-laser"
    assert cfg.mqtt.broker == "127.0.0.1:1883"


@pytest.mark.parametrize(
    ("mutation", "key", "words"),
    [
        (
            ("max_offset_ps = 2000000000", "max_offset_ms = 2"),
            "[timing] max_offset_ms",
            "did you mean 'max_offset_ps'",
        ),
        (
            ("max_offset_ps = 2000000000", 'max_offset_ps = "2ms"'),
            "[timing] max_offset_ps",
            "expected an integer",
        ),
        (('role = "alice"', 'role = "carol"'), "[node] role", "'alice' or 'bob'"),
        (('listen = "127.0.0.1:7001"', 'listen = "localhost"'), "[peer] listen", "HOST:PORT"),
        (('driver = "sim-laser"', 'drvier = "sim-laser"'), "[devices.laser] driver", "required"),
        (("[timing]", "[timming]"), "[timming]", "did you mean 'timing'"),
        (
            ("max_offset_ps = 2000000000", "max_offset_ps = -5"),
            "[timing] max_offset_ps",
            "negative",
        ),
        (('id = "alice"', 'id = "alice'), "TOML", "line"),
    ],
)
def test_mistakes_are_named(mutation: tuple[str, str], key: str, words: str) -> None:
    text = GOOD.replace(*mutation)
    assert text != GOOD
    with pytest.raises(ConfigError) as info:
        parse_config(text, "node.toml")
    message = str(info.value)
    assert message.startswith("node.toml: ")
    assert key in message
    assert words in message


def test_missing_sections_and_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[peer\]: section is missing"):
        parse_config('[node]\nid = "a"\nrole = "alice"\n', "x.toml")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path / "absent.toml")


def test_bob_needs_connect() -> None:
    text = GOOD.replace('role = "alice"', 'role = "bob"')
    with pytest.raises(ConfigError, match=r"\[peer\] connect"):
        parse_config(text, "b.toml")


def _qnoded(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qnoded", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_check_config(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    ok = _qnoded("check-config", str(good))
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace('driver = "sim-laser"', 'driver = "no-such-driver"'))
    res = _qnoded("check-config", str(bad))
    assert res.returncode == 2
    assert str(bad) in res.stderr
    assert "no driver named 'no-such-driver'" in res.stderr
    assert "sim-laser" in res.stderr  # the fix lists what is installed
    res = _qnoded("run", "--config", str(bad))
    assert res.returncode == 2
    assert "no-such-driver" in res.stderr


@pytest.mark.parametrize(
    ("devices", "found", "fix"),
    [
        ('[devices.det]\ndriver = "sim-spad"\n', 0, "add one"),
        ('[devices.a]\ndriver = "sim-laser"\n[devices.b]\ndriver = "sim-laser"\n', 2, "keep one"),
    ],
)
def test_the_device_the_role_needs_is_checked_before_anything_starts(
    tmp_path: Path, devices: str, found: int, fix: str
) -> None:
    """BB84 Alice needs exactly one laser: check-config says so, and `run` says so and
    nothing else (it stops before connecting anywhere, so no half-started client
    complains on the way out)."""
    path = tmp_path / "alice.toml"
    path.write_text(GOOD.split("[devices.laser]", maxsplit=1)[0] + devices)
    want = f"needs exactly one laser device, found {found} (fix: {fix} [devices.NAME]"
    for args in (("check-config", str(path)), ("run", "--config", str(path))):
        res = _qnoded(*args)
        assert res.returncode == 2, res.stderr
        assert want in res.stderr and str(path) in res.stderr
        assert res.stderr.count("\n") == 1, res.stderr  # one line: the error


def test_cli_drivers_lists_sources() -> None:
    res = _qnoded("drivers")
    assert res.returncode == 0, res.stderr
    for name in ("sim-laser", "sim-tagger", "sim-spad", "sim-snspd"):
        assert name in res.stdout
    assert "from qnoded" in res.stdout
