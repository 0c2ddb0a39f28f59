"""Waiting for something observable to happen, with a deadline (never a fixed sleep)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll ``predicate`` every 0.1 s until it holds; fails after ``timeout_s``. The wait."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, f"timed out waiting for {what}"
        time.sleep(0.1)
    return time.monotonic() - start


async def await_for(predicate: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> float:
    """``wait_for`` inside a running event loop, for an awaitable predicate."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not await predicate():
        assert loop.time() - start < timeout_s, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)
    return loop.time() - start
