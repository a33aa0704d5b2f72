"""The driver registry: every driver comes from the ``qnoded.drivers`` entry-point group.

Built-in drivers are declared in qnoded's own ``pyproject.toml`` exactly as a
third-party package declares its own, so there is one discovery path and no
registration by import side effect.  Two distributions declaring one name is an
error, not a silent override.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import cast

from qnoded.contracts import KIND_PROTOCOLS, DeviceKind, DriverFactory

GROUP = "qnoded.drivers"


class RegistryError(Exception):
    """A driver cannot be found, loaded, or is declared twice."""


@dataclass(frozen=True, slots=True)
class DriverInfo:
    name: str
    kind: DeviceKind
    target: str  # "module:attr"
    distribution: str  # which installed package declared it
    factory: DriverFactory


def _dist_name(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else "<unknown>"


def _load(ep: EntryPoint) -> DriverInfo:
    try:
        factory = ep.load()
    except Exception as exc:
        raise RegistryError(
            f"driver {ep.name!r} from {_dist_name(ep)} ({ep.value}) failed to import: {exc}"
        ) from exc
    kind = getattr(factory, "kind", None)
    if not isinstance(kind, DeviceKind) or kind not in KIND_PROTOCOLS:
        raise RegistryError(
            f"driver {ep.name!r} ({ep.value}) has no valid 'kind' attribute; "
            f"set kind = DeviceKind.<one of {', '.join(k.name for k in DeviceKind)}>"
        )
    return DriverInfo(
        name=ep.name,
        kind=kind,
        target=ep.value,
        distribution=_dist_name(ep),
        factory=cast(DriverFactory, factory),
    )


def discover(eps: list[EntryPoint] | None = None) -> dict[str, DriverInfo]:
    """Load every declared driver; a duplicate name raises :class:`RegistryError`."""
    found = list(entry_points(group=GROUP)) if eps is None else eps
    seen: dict[str, EntryPoint] = {}
    for ep in found:
        if ep.name in seen and seen[ep.name].value != ep.value:
            raise RegistryError(
                f"driver name {ep.name!r} is declared twice: by {_dist_name(seen[ep.name])} "
                f"({seen[ep.name].value}) and by {_dist_name(ep)} ({ep.value}); "
                "uninstall one or rename its entry point"
            )
        seen[ep.name] = ep
    return {name: _load(ep) for name, ep in sorted(seen.items())}
