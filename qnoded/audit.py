"""The audit trail: events an auditor must find apart from the rest of the log.

Everything here goes to the ``qnoded.audit`` logger (JSON lines under
systemd, so ``journalctl -u qnoded -o cat | jq 'select(.logger == "qnoded.audit")'``
lists them).  The events:

- ``key delivered`` (interface, consumer, key IDs) and ``key destroyed
  undelivered`` (reason, key IDs): ``mqtt.py``, ``etsi014.py``, ``keystore.py``;
- ``operator command`` (name, request id, arguments, outcome): ``commands.py``;
- an alarm an operator clears: the ``operator command`` event of ``clear-alarm``
  (its code and outcome); alarms that clear themselves are ``<code>-cleared`` alarms;
- ``config first seen`` / ``config changed`` (which settings, old and new
  values): :func:`record_config`, at every start, against the config the node
  last ran with.

Never key bytes or secrets: IDs, names and digests only.  A setting whose
name says it is secret (a password) is logged as a digest prefix, so a change
shows without the value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import structlog

from qnoded.config import NodeConfig

AUDIT_LOGGER = "qnoded.audit"
audit = structlog.get_logger(AUDIT_LOGGER)

CONFIG_SEEN = "config-seen.json"
# Settings whose value would be a secret (the config takes secrets as file
# paths today, so none should exist; a future one is not logged in clear).
_SECRET_NAMES = frozenset({"password", "secret", "token"})


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _flatten(v, f"{prefix}[{i}]", out)
    else:
        out[prefix] = value


def settings(config: NodeConfig) -> dict[str, Any]:
    """The config as flat ``section.key`` settings, secret values as digests."""
    flat: dict[str, Any] = {}
    _flatten(config, "", flat)
    for key, value in flat.items():
        if value and key.rsplit(".", 1)[-1] in _SECRET_NAMES:
            digest = hashlib.sha256(str(value).encode()).hexdigest()[:12]
            flat[key] = f"<sha256 {digest}>"
        elif not isinstance(value, str | int | float | bool | type(None)):
            flat[key] = str(value)
    return flat


def record_config(config: NodeConfig, state_dir: Path, source: str = "") -> list[str]:
    """Log the config this start runs with against the last one; returns the settings
    that changed (empty on the first start and when nothing changed)."""
    now = settings(config)
    digest = hashlib.sha256(json.dumps(now, sort_keys=True).encode()).hexdigest()[:16]
    path = state_dir / CONFIG_SEEN
    try:
        before: dict[str, Any] | None = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        before = None
    except (OSError, ValueError):
        before = {}  # unreadable: every setting counts as changed
    changed: list[str] = []
    if before is None:
        audit.info("config first seen", source=source, config_digest=digest, settings=len(now))
    else:
        changed = sorted(k for k in now.keys() | before.keys() if now.get(k) != before.get(k))
        if changed:
            audit.info(
                "config changed",
                source=source,
                config_digest=digest,
                changes={k: {"old": before.get(k), "new": now.get(k)} for k in changed},
            )
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(now, sort_keys=True, indent=0), encoding="utf-8")
    os.replace(tmp, path)
    return changed
