"""Waiting for something observable to happen, with a deadline (never a fixed sleep)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


def poll_until(
    predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.1
) -> float | None:
    """Poll ``predicate`` every ``interval_s`` until it holds: the wait, or None once
    ``timeout_s`` has passed without it."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start >= timeout_s:
            return None
        time.sleep(interval_s)
    return time.monotonic() - start


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
    """``poll_until`` that fails after ``timeout_s``. The wait."""
    waited = poll_until(predicate, timeout_s)
    assert waited is not None, f"timed out waiting for {what}"
    return waited


async def await_for(predicate: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> float:
    """``wait_for`` inside a running event loop, for an awaitable predicate."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not await predicate():
        assert loop.time() - start < timeout_s, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)
    return loop.time() - start
