"""Waiting for a control record to be applied by this instance's poll loop.

The admin API produces a control record, learns its (partition, offset) from
the broker, and waits here; the poll loop calls ``applied`` with each batch's
controls once the engine has taken them (applied, or found already applied by
the skip rule). A control applied before anyone waits for it is remembered for
a while (the loop may be faster than the producer's answer), so no wait misses
its control.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterable

from streamlstm.control import Control

__all__ = ["ControlAcks"]

#: How many applied controls are remembered for waiters that come late.
_REMEMBERED = 4096


class ControlAcks:
    """Futures keyed by a control's input (partition, offset)."""

    def __init__(self, remembered: int = _REMEMBERED) -> None:
        self._waiting: dict[tuple[int, int], list[asyncio.Future[None]]] = {}
        self._done: collections.OrderedDict[tuple[int, int], None] = collections.OrderedDict()
        self._remembered = remembered

    def applied(self, controls: Iterable[Control]) -> None:
        """These controls were taken by the engine (the poll loop calls this)."""
        for control in controls:
            key = (control.partition, control.offset)
            for future in self._waiting.pop(key, ()):
                if not future.done():
                    future.set_result(None)
            self._done[key] = None
            if len(self._done) > self._remembered:
                self._done.popitem(last=False)

    async def wait(self, partition: int, offset: int, timeout_s: float) -> bool:
        """Whether the control at ``partition``/``offset`` is applied within ``timeout_s``."""
        key = (partition, offset)
        if key in self._done:
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(future)
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            return False
        finally:
            waiters = self._waiting.get(key)
            if waiters is not None and future in waiters:
                waiters.remove(future)
                if not waiters:
                    del self._waiting[key]
        return True
