"""A private Mosquitto broker for the demo and the tests, with the project's own config."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from importlib import resources
from pathlib import Path

START_TIMEOUT_S = 10.0


class BrokerError(RuntimeError):
    """Mosquitto is missing or would not start."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_mosquitto() -> str:
    path = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None
    )
    if path is None:
        raise BrokerError("the mosquitto broker is not installed: apt-get install -y mosquitto")
    return path


class MosquittoBroker:
    """Runs ``mosquitto -c <our config>`` on a free port until :meth:`stop`."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="qnoded-mosquitto-"))
        self._proc: subprocess.Popen[bytes] | None = None

    def _config(self) -> Path:
        template = resources.files("qnoded").joinpath("data/mosquitto-dev.conf").read_text()
        text = template.format(host=self.host, port=self.port, dir=self._dir)
        if os.geteuid() == 0:
            # Started as root, Mosquitto would drop to the mosquitto user and
            # lose access to our root-owned temp dir.
            text += "user root\n"
        path = self._dir / "mosquitto.conf"
        path.write_text(text)
        return path

    def start(self) -> None:
        cfg = self._config()
        log = open(self._dir / "mosquitto.log", "wb")  # noqa: SIM115 - lives with the process
        self._proc = subprocess.Popen(
            [find_mosquitto(), "-c", str(cfg)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(
                    f"mosquitto exited with {self._proc.returncode}: "
                    f"{(self._dir / 'mosquitto.log').read_text()[-2000:]}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(
            f"mosquitto did not listen on {self.host}:{self.port} within {START_TIMEOUT_S:.0f} s"
        )

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """Fault injection: the broker dies without a goodbye."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
