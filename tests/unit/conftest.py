"""Fixtures shared by the unit tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator

import pytest
import uvloop

from corral.dataplane import reactor

Scenario = Callable[[], Awaitable[None]]

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


# Where the mesh forwards its plain reads: in the compiled reactor (when built) and in Python.
FORWARDING = ("c", "python") if reactor.FASTPOLL else ("python",)


@pytest.fixture(params=[f"{loop}-{fwd}" for loop in sorted(LOOPS) for fwd in FORWARDING])
def run(request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Scenario], None]]:
    """Run a socket scenario on a fresh loop of each kind (asyncio, uvloop), with a deadline,
    once with the mesh forwarding in C (when built) and once in Python."""
    loop, fwd = request.param.split("-")
    factory = LOOPS[loop]
    monkeypatch.setattr(reactor, "FASTPOLL", fwd == "c")

    def _run(scenario: Scenario) -> None:
        async def bounded() -> None:
            async with asyncio.timeout(15):
                await scenario()

        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(bounded())

    yield _run
