"""The lifecycle part of drivers that run in this process (simulated, replayed).

Entering opens, leaving closes, ``ping`` answers whether the device is open;
a driver adds what opening or closing means for it in ``_on_open`` and
``_on_close``.  Drivers of real instruments manage connections of their own.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self


class InProcessDevice:
    _open: bool = False

    async def __aenter__(self) -> Self:
        await self._on_open()
        self._open = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False
        await self._on_close()

    async def ping(self) -> bool:
        return self._open

    async def _on_open(self) -> None:
        return None

    async def _on_close(self) -> None:
        return None
