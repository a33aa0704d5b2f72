"""`make install` staged under DESTDIR: what a node gets, where, and with which modes.

One staging root per module: the first install takes a prebuilt wheel (WHEEL=),
the second builds this tree (the default) over it, as an upgrade does.  Both
build a complete venv, so this module takes ~40 s.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")
# Not the Makefile's default: the installed units must follow PREFIX.
PREFIX = "/opt/qkd/qnoded"
UNITS = ("qnoded.service", "qnoded@.service")
OPERATOR_CONFIG_MARK = "# the operator's own node.toml\n"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(MAKE is None, reason="make is not installed"),
]


def _make(target: str, stage: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert MAKE is not None
    return subprocess.run(
        [
            MAKE,
            "-C",
            str(REPO),
            target,
            f"DESTDIR={stage}",
            f"PREFIX={PREFIX}",
            f"PYTHON={sys.executable}",
            *args,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )


def _staged(stage: Path, path: str) -> Path:
    return stage / path.lstrip("/")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@dataclass(frozen=True)
class Install:
    stage: Path
    first_config: bytes  # /etc/qnoded/node.toml right after the first install
    second: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory) -> Install:
    wheels = tmp_path_factory.mktemp("wheels")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(wheels), "."],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("qnoded-*.whl")
    stage = tmp_path_factory.mktemp("root")
    first = _make("install", stage, f"WHEEL={wheel}")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    config = _staged(stage, "/etc/qnoded/node.toml")
    first_config = config.read_bytes()
    # What an operator does between installs: edit the config, add the PSK.
    config.write_text(OPERATOR_CONFIG_MARK + first_config.decode().replace('"bob"', '"bob2"', 1))
    psk = _staged(stage, "/etc/qnoded/credentials/qnoded-psk")
    psk.write_bytes(b"\x5a" * 4096)
    psk.chmod(0o600)
    second = _make("install", stage)
    return Install(stage, first_config, second)


def test_layout_and_modes(install: Install) -> None:
    s = install.stage
    assert install.second.returncode == 0, install.second.stderr[-3000:]
    for unit in UNITS:
        assert _mode(_staged(s, f"/etc/systemd/system/{unit}")) == 0o644
    assert _mode(_staged(s, "/usr/lib/sysusers.d/qnoded.conf")) == 0o644
    assert (
        _staged(s, "/usr/lib/sysusers.d/qnoded.conf").read_bytes()
        == (REPO / "systemd/qnoded.sysusers").read_bytes()
    )
    # systemd reads the secrets as root; nobody else lists or reads them.
    assert _mode(_staged(s, "/etc/qnoded/credentials")) == 0o700
    assert _mode(_staged(s, "/etc/qnoded/credentials/tls")) == 0o700
    doc = _staged(s, "/usr/share/doc/qnoded")
    for name in ("README.md", "node.example.toml"):
        assert (doc / name).is_file()
    for name in ("mosquitto-prod.conf", "mosquitto-acl.conf"):
        assert (doc / "mosquitto" / name).read_bytes() == (REPO / "qnoded/data" / name).read_bytes()
    link = _staged(s, "/usr/local/bin/qnoded")
    assert link.is_symlink()
    assert os.readlink(link) == f"{PREFIX}/bin/qnoded"
    # The upgrade swapped the new venv in and left nothing half-built beside it.
    assert sorted(p.name for p in _staged(s, PREFIX).parent.iterdir()) == ["qnoded"]


def test_execstart_is_the_installed_qnoded(install: Install) -> None:
    s = install.stage
    for unit in UNITS:
        text = _staged(s, f"/etc/systemd/system/{unit}").read_text()
        (line,) = (ln for ln in text.splitlines() if ln.startswith("ExecStart="))
        exe = line.removeprefix("ExecStart=").split()[0]
        assert exe == f"{PREFIX}/bin/qnoded", line
        script = _staged(s, exe)
        assert script.is_file()
        assert os.access(script, os.X_OK)
        # The script runs at PREFIX, not where it was staged.
        shebang = script.read_text().splitlines()[0]
        assert shebang.startswith(f"#!{PREFIX}/bin/python"), shebang
        assert _staged(s, shebang.removeprefix("#!")).exists()
    venv = _staged(s, PREFIX)
    for path in [venv / "pyvenv.cfg", *(venv / "bin").iterdir()]:
        if path.is_file() and not path.is_symlink():
            assert str(s) not in path.read_text(errors="replace"), path


def test_example_config_installed_and_valid(install: Install) -> None:
    s = install.stage
    example = (REPO / "systemd/node.example.toml").read_bytes()
    assert install.first_config == example
    assert _staged(s, "/usr/share/doc/qnoded/node.example.toml").read_bytes() == example
    python = _staged(s, f"{PREFIX}/bin/python")
    for config in ("/usr/share/doc/qnoded/node.example.toml", "/etc/qnoded/node.toml"):
        res = subprocess.run(
            [str(python), "-m", "qnoded", "check-config", str(_staged(s, config))],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        assert ": ok (" in res.stdout


def test_reinstall_keeps_the_operators_config_and_credentials(install: Install) -> None:
    s = install.stage
    config = _staged(s, "/etc/qnoded/node.toml").read_text()
    assert config.startswith(OPERATOR_CONFIG_MARK)
    assert 'id = "bob2"' in config
    assert "kept /etc/qnoded/node.toml" in install.second.stdout
    assert _staged(s, "/etc/qnoded/credentials/qnoded-psk").read_bytes() == b"\x5a" * 4096


def test_uninstall_keeps_config_credentials(install: Install, tmp_path: Path) -> None:
    stage = tmp_path / "root"
    shutil.copytree(install.stage, stage, symlinks=True)
    res = _make("uninstall", stage)
    assert res.returncode == 0, res.stderr
    for gone in (
        PREFIX,
        "/usr/local/bin/qnoded",
        "/etc/systemd/system/qnoded.service",
        "/etc/systemd/system/qnoded@.service",
        "/usr/lib/sysusers.d/qnoded.conf",
        "/usr/share/doc/qnoded",
    ):
        assert not os.path.lexists(_staged(stage, gone)), gone
    assert _staged(stage, "/etc/qnoded/node.toml").read_text().startswith(OPERATOR_CONFIG_MARK)
    assert _staged(stage, "/etc/qnoded/credentials/qnoded-psk").is_file()


def test_install_refuses_to_replace_a_prefix_it_did_not_make(tmp_path: Path) -> None:
    precious = _staged(tmp_path, PREFIX) / "data"
    precious.parent.mkdir(parents=True)
    precious.write_text("not a venv")
    res = _make("install", tmp_path)
    assert res.returncode != 0
    assert "is not a venv" in res.stderr
    assert precious.read_text() == "not a venv"
    assert not _staged(tmp_path, PREFIX + ".new").exists()
