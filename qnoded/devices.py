"""The device manager: builds the config's device table and owns the devices.

Devices are data (ARTIQ's device database): one factory call per row, every
device entered into one ``AsyncExitStack`` so they close in reverse order,
even when a later one fails to open.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self, TypeVar, cast

import structlog

from qnoded.config import ConfigError, NodeConfig
from qnoded.contracts import (
    KIND_PROTOCOLS,
    Detector,
    Device,
    DeviceError,
    DeviceKind,
    DriverContext,
)
from qnoded.registry import DriverInfo

log = structlog.get_logger("qnoded.devices")

OPEN_TIMEOUT_S = 10.0
T = TypeVar("T")


class DeviceManager:
    """Opens every device of a node's config and closes them in reverse order."""

    def __init__(self, config: NodeConfig, registry: Mapping[str, DriverInfo]) -> None:
        self._config = config
        self._registry = registry
        self._stack = contextlib.AsyncExitStack()
        self.context = DriverContext(
            node_id=config.node.id,
            role=config.node.role,
            protocol=config.node.protocol,
            simulation=config.simulation,
        )
        self.devices: dict[str, Device] = {}
        self.kinds: dict[str, DeviceKind] = {}

    @property
    def needed_kind(self) -> DeviceKind:
        """The kind of device the node's role and protocol need exactly one of: BB84
        Alice drives the source, every other node a time tagger."""
        node = self._config.node
        if node.protocol == "bb84" and node.role == "alice":
            return DeviceKind.LASER
        return DeviceKind.TIME_TAGGER

    def check(self) -> None:
        """Resolve every row's driver and count the kind the node needs, without
        opening anything (for check-config, and before `run` connects anywhere)."""
        kinds = [self._info(spec.name, spec.driver).kind for spec in self._config.devices]
        self._require_one(self.needed_kind, kinds.count(self.needed_kind))

    def _info(self, name: str, driver: str) -> DriverInfo:
        info = self._registry.get(driver)
        if info is None:
            raise ConfigError(
                self._config.source,
                f"[devices.{name}] driver",
                f"no driver named {driver!r} is installed",
                "choose one of: " + ", ".join(sorted(self._registry)) + " ('qnoded drivers')",
            )
        return info

    async def __aenter__(self) -> Self:
        await self._stack.__aenter__()
        try:
            for spec in self._config.devices:
                info = self._info(spec.name, spec.driver)
                try:
                    device = info.factory(spec.name, spec.options, self.context)
                except (ValueError, TypeError, KeyError) as exc:
                    raise ConfigError(
                        self._config.source, f"[devices.{spec.name}]", str(exc)
                    ) from exc
                if not isinstance(device, KIND_PROTOCOLS[info.kind]):
                    raise DeviceError(
                        f"driver {spec.driver!r} for device {spec.name!r} does not implement "
                        f"the {info.kind} contract"
                    )
                try:
                    async with asyncio.timeout(OPEN_TIMEOUT_S):
                        await self._stack.enter_async_context(device)
                except TimeoutError as exc:
                    raise DeviceError(
                        f"device {spec.name!r} ({spec.driver}) did not open within "
                        f"{OPEN_TIMEOUT_S:.0f} s"
                    ) from exc
                self.devices[spec.name] = device
                self.kinds[spec.name] = info.kind
                log.info("device opened", device=spec.name, driver=spec.driver, kind=str(info.kind))
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.__aexit__(exc_type, exc, tb)
        log.info("devices closed", count=len(self.devices))

    def _of_kind(self, kind: DeviceKind, tp: type[T]) -> list[T]:
        return [cast(T, d) for n, d in self.devices.items() if self.kinds[n] is kind]

    @property
    def detectors(self) -> list[Detector]:
        return self._of_kind(DeviceKind.DETECTOR, Detector)

    def one(self, kind: DeviceKind, tp: type[T]) -> T:
        """The single device of a kind the protocol needs; a clear error otherwise."""
        found = self._of_kind(kind, tp)
        self._require_one(kind, len(found))
        return found[0]

    def _require_one(self, kind: DeviceKind, found: int) -> None:
        if found != 1:
            raise ConfigError(
                self._config.source,
                "[devices]",
                f"a {self._config.node.role} node running {self._config.node.protocol} needs "
                f"exactly one {kind} device, found {found}",
                f"add one [devices.NAME] whose driver is a {kind}"
                if not found
                else f"keep one [devices.NAME] whose driver is a {kind}",
            )

    def describe(self) -> dict[str, Any]:
        return {name: dict(d.describe()) for name, d in self.devices.items()}
