"""A private Mosquitto broker for the demo and the tests, with the project's own config.

``MosquittoBroker`` writes ``qnoded/data/mosquitto-dev.conf`` (loopback
listener on a free port, anonymous, no persistence) into a temp dir, runs
``mosquitto -c FILE`` and waits until the port accepts TCP connections.  Use it
as a context manager (sync or async) or with ``start()``/``stop()`` from a
pytest fixture; ``kill()`` and ``restart()`` (same port) inject outages.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Self

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
# MQTT 3.1.1 CONNECT (clean session, keepalive 60 s, empty client id) and DISCONNECT.
_MQTT_CONNECT = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"
_MQTT_DISCONNECT = b"\xe0\x00"
_FALLBACK_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


class BrokerError(RuntimeError):
    """Mosquitto is missing or would not start."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (bind to 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def find_mosquitto() -> str:
    """Path of the mosquitto binary (PATH, then /usr/sbin); :class:`BrokerError` if absent."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for path in _FALLBACK_PATHS:  # /usr/sbin is often not on a user's PATH
        if os.access(path, os.X_OK):
            return path
    raise BrokerError(
        "the mosquitto broker is not installed (looked on PATH and in "
        f"{', '.join(_FALLBACK_PATHS)}): apt-get install -y mosquitto"
    )


def render_config(host: str, port: int, workdir: Path, *, as_root: bool) -> str:
    """The dev config for a listener on ``host:port``, from the packaged template."""
    template = resources.files("qnoded").joinpath("data/mosquitto-dev.conf").read_text("utf-8")
    text = template.format(host=host, port=port, dir=workdir)
    if as_root:
        # Started as root, Mosquitto drops to the `mosquitto` user and then
        # cannot read root-owned 0600 files in our temp dir (FACTS.md).
        text += "# Running as root: keep root rather than drop to `mosquitto`.\nuser root\n"
    return text


def terminate(proc: subprocess.Popen[bytes], timeout_s: float) -> float:
    """SIGTERM a child, SIGKILL it after ``timeout_s``; returns how long it took."""
    t0 = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return time.monotonic() - t0


class MosquittoBroker:
    """Runs ``mosquitto -c <our config>`` on ``host:port`` until :meth:`stop`.

    The port is chosen once (free at construction) and kept across
    :meth:`restart`, so clients can reconnect to the same address.
    """

    def __init__(self, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port(host)
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def _log_text(self) -> str:
        if self._dir is None:
            return ""
        try:
            return (self._dir / "mosquitto.log").read_text("utf-8", "replace")[-2000:]
        except OSError:
            return ""

    def start(self) -> None:
        """Start the broker and wait (10 s) until it answers an MQTT CONNECT."""
        if self.running:
            raise BrokerError(f"mosquitto already running on {self.host}:{self.port}")
        binary = find_mosquitto()
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="qnoded-mosquitto-"))
        cfg = self._dir / "mosquitto.conf"
        cfg.write_text(
            render_config(self.host, self.port, self._dir, as_root=os.geteuid() == 0), "utf-8"
        )
        with open(self._dir / "mosquitto.log", "ab") as logf:
            # The child keeps its own copy of the descriptor.
            self._proc = subprocess.Popen(
                [binary, "-c", str(cfg)], stdout=logf, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                raise BrokerError(
                    f"mosquitto exited with code {code} at start-up "
                    f"({self.host}:{self.port}): {self._log_text().strip()}"
                )
            if self._answers_mqtt():
                return
            time.sleep(0.02)
        log = self._log_text().strip()
        self._terminate()
        raise BrokerError(
            f"mosquitto did not listen on {self.host}:{self.port} within "
            f"{START_TIMEOUT_S:.0f} s: {log}"
        )

    def _answers_mqtt(self) -> bool:
        # An accepted TCP connection is not enough: another program may hold
        # the port.  Only a CONNACK proves that *a broker* listens there.
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2) as sock:
                sock.sendall(_MQTT_CONNECT)
                reply = sock.recv(4)
                sock.sendall(_MQTT_DISCONNECT)
        except OSError:
            return False
        return reply[:1] == b"\x20"  # CONNACK

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            terminate(proc, STOP_TIMEOUT_S)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; removes the temp dir.  Idempotent."""
        self._terminate()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def kill(self) -> None:
        """Fault injection: the broker dies without a goodbye (SIGKILL).

        :meth:`start` brings it back on the same port.
        """
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def restart(self) -> None:
        """Stop (SIGTERM) and start again on the same port."""
        self._terminate()
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)
