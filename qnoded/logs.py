"""One place that configures logging: console on a terminal, JSON lines otherwise.

stdlib loggers (asyncio, pyvisa, pyserial, aiomqtt) go through the same
processors via ``structlog.stdlib.ProcessorFormatter``, so journald sees one
format.  A redaction processor drops values of keys that may hold secrets.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# Event keys whose values are never rendered, whatever a caller passes.
SECRET_KEYS = frozenset({"key", "key_bytes", "key_material", "secret", "password", "psk"})
REDACTED = "<redacted>"


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Replace the value of any secret-looking key before rendering."""
    for key in event_dict:
        if key in SECRET_KEYS:
            event_dict[key] = REDACTED
    return event_dict


def configure_logging(level: str = "info", *, json: bool | None = None) -> None:
    """Configure structlog and the stdlib root logger once per process.

    Log lines go to stdout under systemd (``$JOURNAL_STREAM`` set: journald
    keeps them, one JSON object a line), to stderr otherwise, so that what a
    command prints on stdout stays its own.  ``json=None`` picks JSON when that
    stream is not a terminal.
    """
    stream = sys.stdout if os.environ.get("JOURNAL_STREAM") else sys.stderr
    use_json = (not stream.isatty()) if json is None else json
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info
            if use_json
            else structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The audit trail (key deliveries, commands, config changes) is kept at any
    # log level: --log-level warning quiets the daemon, not the auditors.
    logging.getLogger("qnoded.audit").setLevel(logging.INFO)
