"""The shipped systemd units: hardened (exposure <= 2.0) and clean under verify.

Both checks run offline with systemd-analyze; they need no running systemd.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[1] / "systemd"
ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def _installed_copy(tmp: Path, unit: str, name: str) -> Path:
    """The unit as `make install` would place it, ExecStart pointing at this qnoded."""
    qnoded = Path(sys.executable).with_name("qnoded")
    text = (UNITS / unit).read_text().replace("/usr/local/bin/qnoded", str(qnoded))
    path = tmp / name
    path.write_text(text)
    return path


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
