"""A private Mosquitto broker for the demo and the tests, with the project's own config.

``MosquittoBroker`` writes ``qnoded/data/mosquitto-dev.conf`` (loopback
listener on a free port, anonymous, no persistence) into a temp dir, runs
``mosquitto -c FILE`` and waits until the port accepts TCP connections.  Use it
as a context manager (sync or async) or with ``start()``/``stop()`` from a
pytest fixture; ``kill()`` and ``restart()`` (same port) inject outages.

``MosquittoBroker(tls=TlsFiles(ca, cert, key))`` runs the *production*
config instead (``qnoded/data/mosquitto-prod.conf``: mutual TLS, certificate
CN as username, ``qnoded/data/mosquitto-acl.conf`` or ``acl_file=``), with
its paths pointed at the given files, so tests exercise the file that is
deployed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The broker's side of mutual TLS (PEM paths).

    ``ca`` signs the client certificates the broker accepts; ``cert`` and
    ``key`` are the broker's own (SAN covering the address clients dial).
    """

    ca: Path
    cert: Path
    key: Path


def set_directives(text: str, values: Mapping[str, str]) -> str:
    """``text`` (a Mosquitto config) with the value of each directive in ``values`` replaced.

    Each directive must occur exactly once as an active line, so a template
    edited out of shape fails loudly instead of starting with production paths.
    """
    seen = dict.fromkeys(values, 0)
    lines = []
    for line in text.splitlines():
        key = line.split(maxsplit=1)[0] if line.strip() else ""
        if key in values:
            seen[key] += 1
            lines.append(f"{key} {values[key]}")
        else:
            lines.append(line)
    wrong = {key: n for key, n in seen.items() if n != 1}
    if wrong:
        raise BrokerError(f"config template: directives not found exactly once: {wrong}")
    return "\n".join(lines) + "\n"


def render_prod_config(
    host: str, port: int, workdir: Path, *, tls: TlsFiles, acl_file: Path, as_root: bool
) -> str:
    """The production config (``mosquitto-prod.conf``) pointed at test files.

    Only the host-specific lines change: listener, TLS files, ACL and the log
    file (``workdir/mosquitto.log``, where the dev broker's stdout goes).
    """
    template = resources.files("qnoded").joinpath("data/mosquitto-prod.conf").read_text("utf-8")
    text = set_directives(
        template,
        {
            "listener": f"{port} {host}",
            "cafile": str(tls.ca.resolve()),
            "certfile": str(tls.cert.resolve()),
            "keyfile": str(tls.key.resolve()),
            "acl_file": str(acl_file.resolve()),
            # The file the dev broker's stdout goes to (both append).  Not
            # stdout itself: Mosquitto block-buffers a redirected stdout, but
            # flushes its log file each line, which reload() relies on.
            "log_dest": f"file {workdir.resolve() / 'mosquitto.log'}",
        },
    )
    if as_root:
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

    With ``tls``, the broker runs the production config (mutual TLS, ACL);
    ``acl_file`` defaults to a copy of the packaged ``mosquitto-acl.conf``.
    Readiness is then a TLS handshake whose server certificate verifies
    against ``tls.ca``.
    """

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        *,
        tls: TlsFiles | None = None,
        acl_file: Path | None = None,
    ) -> None:
        if acl_file is not None and tls is None:
            raise ValueError("acl_file needs tls: the dev config has no identities to check")
        self.host = host
        self.port = port or free_port(host)
        self.tls = tls
        self.acl_file = acl_file
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

    @property
    def workdir(self) -> Path | None:
        """The temp dir holding the rendered config and the log (kept across :meth:`restart`)."""
        return self._dir

    @property
    def log_text(self) -> str:
        """The last 2,000 characters of the broker's log (``""`` once stopped)."""
        return self._log_text()

    def _render(self, workdir: Path) -> str:
        as_root = os.geteuid() == 0
        if self.tls is None:
            return render_config(self.host, self.port, workdir, as_root=as_root)
        acl = self.acl_file
        if acl is None:
            acl = workdir / "acl.conf"
            packaged = resources.files("qnoded").joinpath("data/mosquitto-acl.conf")
            acl.write_text(packaged.read_text("utf-8"), "utf-8")
        return render_prod_config(
            self.host, self.port, workdir, tls=self.tls, acl_file=acl, as_root=as_root
        )

    def start(self) -> None:
        """Start the broker and wait (10 s) until it answers (CONNACK, or TLS handshake)."""
        if self.running:
            raise BrokerError(f"mosquitto already running on {self.host}:{self.port}")
        binary = find_mosquitto()
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="qnoded-mosquitto-"))
        cfg = self._dir / "mosquitto.conf"
        cfg.write_text(self._render(self._dir), "utf-8")
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
            if self._answers():
                return
            time.sleep(0.02)
        log = self._log_text().strip()
        self._terminate()
        raise BrokerError(
            f"mosquitto did not listen on {self.host}:{self.port} within "
            f"{START_TIMEOUT_S:.0f} s: {log}"
        )

    def _answers(self) -> bool:
        return self._answers_mqtt() if self.tls is None else self._answers_tls(self.tls)

    def _answers_tls(self, tls: TlsFiles) -> bool:
        # Without a client certificate no MQTT CONNECT gets through, but a
        # completed TLS 1.3 handshake is proof enough: the client side
        # finishes once the server's certificate verifies against our CA
        # (the broker's refusal of the missing client certificate comes
        # after), and no other program holds a certificate from this CA.
        ctx = ssl.create_default_context(cafile=str(tls.ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        try:
            with (
                socket.create_connection((self.host, self.port), timeout=0.5) as raw,
                ctx.wrap_socket(raw, server_hostname=self.host),
            ):
                return True
        except OSError:  # refused, reset, or ssl.SSLError (a subclass)
            return False

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

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads its ACL (and its other reloadable options).

        Returns once the broker has logged "Reloading config." (10 s at most):
        it reloads within that main-loop pass, so every packet it handles
        afterwards, including those of connected clients, meets the new rules.
        """
        if self._proc is None or self._proc.poll() is not None or self._dir is None:
            raise BrokerError("mosquitto is not running: nothing to reload")
        log = self._dir / "mosquitto.log"
        before = log.read_bytes().count(b"Reloading config.")
        self._proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + START_TIMEOUT_S
        while log.read_bytes().count(b"Reloading config.") == before:
            if time.monotonic() > deadline or self._proc.poll() is not None:
                raise BrokerError(f"mosquitto did not reload: {self._log_text().strip()}")
            time.sleep(0.01)

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
