"""Fixtures shared by the unit tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator

import pytest
import uvloop

Scenario = Callable[[], Awaitable[None]]

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Iterator[Callable[[Scenario], None]]:
    """Run a socket scenario on a fresh loop of each kind (asyncio, uvloop), with a deadline."""
    factory = LOOPS[request.param]

    def _run(scenario: Scenario) -> None:
        async def bounded() -> None:
            async with asyncio.timeout(15):
                await scenario()

        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(bounded())

    yield _run
