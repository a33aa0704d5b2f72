"""sd_notify without libsystemd: one AF_UNIX datagram to ``$NOTIFY_SOCKET``.

Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op, so the daemon
code never asks whether it runs under systemd.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends ``READY=1``, ``STATUS=…``, ``WATCHDOG=1``, ``STOPPING=1`` to systemd."""

    def __init__(self, address: str | None = None) -> None:
        addr = os.environ.get("NOTIFY_SOCKET") if address is None else address
        if addr and addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace
        self._addr = addr or None
        usec = os.environ.get("WATCHDOG_USEC", "")
        # Ping at half the watchdog interval, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval_s = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 else None

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def send(self, *assignments: str) -> bool:
        """Send assignments in one datagram; False if systemd is not listening."""
        if self._addr is None:
            return False
        payload = "\n".join(assignments).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                # Never wait: a receiver that does not read (its queue holds 10
                # datagrams by default) would otherwise freeze the event loop,
                # and with it the daemon.  A message it had no room for is lost,
                # as systemd's own sd_notify loses it.
                sock.sendto(payload, socket.MSG_DONTWAIT, self._addr)
            except OSError:  # BlockingIOError (full), or nobody listening
                return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=stopping")
