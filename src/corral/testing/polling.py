"""Waiting in async tests for something to become true (polled, with a deadline)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(cond: Callable[[], object], timeout: float = 5.0, what: str = "the condition",
                interval: float = 0.01) -> None:
    """Return once `cond()` is true; fail the test if it is not within `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g}s")
        await asyncio.sleep(interval)
