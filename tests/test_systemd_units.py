"""The shipped systemd units: hardened (exposure <= 2.0), clean under verify, and
in step with `make install` (ExecStart), the config's credential names and the
example config.

The exposure and verify checks run offline with systemd-analyze; they need no
running systemd.  The rest read the unit files.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from qnoded.config import AuthSection

UNITS = Path(__file__).resolve().parents[1] / "systemd"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def _default_prefix() -> str:
    """Where `make install` puts qnoded's venv unless told otherwise."""
    match = re.search(r"^PREFIX \?= (\S+)$", (UNITS.parent / "Makefile").read_text(), re.M)
    assert match, "the Makefile sets PREFIX ?= ..."
    return match.group(1)


def _installed_copy(tmp: Path, unit: str, name: str) -> Path:
    """The unit as `make install` would place it, ExecStart pointing at this qnoded
    (verify checks that the executable exists)."""
    qnoded = Path(sys.executable).with_name("qnoded")
    text = (UNITS / unit).read_text().replace(f"{_default_prefix()}/bin/qnoded", str(qnoded))
    path = tmp / name
    path.write_text(text)
    return path


@needs_analyze
@pytest.mark.parametrize(
    ("unit", "name"),
    [("qnoded.service", "qnoded.service"), ("qnoded@.service", "qnoded@link1.service")],
)
def test_exposure_at_most_2(unit: str, name: str, tmp_path: Path) -> None:
    assert ANALYZE is not None
    res = subprocess.run(
        [ANALYZE, "security", "--offline=true", str(_installed_copy(tmp_path, unit, name))],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", res.stdout)
    assert match, res.stdout[-2000:] + res.stderr
    assert float(match.group(1)) <= 2.0, res.stdout


@needs_analyze
@pytest.mark.parametrize(
    ("unit", "name"),
    [("qnoded.service", "qnoded.service"), ("qnoded@.service", "qnoded@link1.service")],
)
def test_verify_is_clean(unit: str, name: str, tmp_path: Path) -> None:
    assert ANALYZE is not None
    res = subprocess.run(
        [ANALYZE, "verify", str(_installed_copy(tmp_path, unit, name))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "", res.stderr


def test_unit_promises() -> None:
    text = (UNITS / "qnoded.service").read_text()
    for line in (
        "Type=notify",
        "Restart=on-failure",
        "DevicePolicy=closed",
        "SupplementaryGroups=dialout",
        "StateDirectory=qnoded",
        "NoNewPrivileges=yes",
    ):
        assert line in text
    assert re.search(r"^WatchdogSec=\d+", text, re.M)
    sysusers = (UNITS / "qnoded.sysusers").read_text()
    assert re.search(r"^u qnoded ", sysusers, re.M)
    assert re.search(r"^m qnoded dialout", sysusers, re.M)


def _directives(unit: str) -> dict[str, list[tuple[str, str]]]:
    """Section -> (key, value) in order; a key may repeat, as LoadCredential= does."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for raw in (UNITS / unit).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, _, value = line.partition("=")
        current.append((key, value))
    return sections


def _values(unit: str, section: str, key: str) -> list[str]:
    return [v for k, v in _directives(unit)[section] if k == key]


CREDENTIALS = {
    "qnoded.service": "/etc/qnoded/credentials",
    "qnoded@.service": "/etc/qnoded/credentials/%i",
}


@pytest.mark.parametrize("unit", sorted(CREDENTIALS))
def test_execstart_is_where_make_install_puts_qnoded(unit: str) -> None:
    (exec_start,) = _values(unit, "Service", "ExecStart")
    assert exec_start.split()[0] == f"{_default_prefix()}/bin/qnoded"


@pytest.mark.parametrize("unit", sorted(CREDENTIALS))
def test_credentials(unit: str) -> None:
    creds = CREDENTIALS[unit]
    name = AuthSection().psk_credential  # what the daemon looks for by default
    loads = _values(unit, "Service", "LoadCredential")
    # The PSK is a file: a missing one must stop the unit, and the assertion
    # (a [Unit] directive; in [Service] systemd ignores it) names it.
    assert f"{name}:{creds}/{name}" in loads
    assert _values(unit, "Unit", "AssertPathExists") == [f"{creds}/{name}"]
    # The TLS keys are a directory: empty when a node uses none, no failure.
    assert f"tls:{creds}/tls" in loads
    assert len(loads) == 2, loads


def test_template_is_per_instance() -> None:
    unit = "qnoded@.service"
    (exec_start,) = _values(unit, "Service", "ExecStart")
    assert "--config ${CONFIGURATION_DIRECTORY}/%i.toml" in exec_start
    assert _values(unit, "Service", "StateDirectory") == ["qnoded/%i"]
    for load in _values(unit, "Service", "LoadCredential"):
        assert load.partition(":")[2].startswith("/etc/qnoded/credentials/%i/"), load


def test_example_config_names_the_units_credentials() -> None:
    """The example's TLS paths are the copies LoadCredential=tls:DIR makes."""
    example = tomllib.loads((UNITS / "node.example.toml").read_text())
    (tls_load,) = (v for v in _values("qnoded.service", "Service", "LoadCredential") if "/tls" in v)
    prefix = "/run/credentials/qnoded.service/" + tls_load.partition(":")[0] + "_"
    for key in ("tls_ca", "tls_cert", "tls_key"):
        assert example["mqtt"][key].startswith(prefix), (key, example["mqtt"][key])
    assert (
        example["state"]["directory"]
        == "/var/lib/" + _values("qnoded.service", "Service", "StateDirectory")[0]
    )
    assert "psk_file" not in example["auth"]
