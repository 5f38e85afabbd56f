"""Mesh worker processes: a dead one is replaced after a back-off, with the current endpoints."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from corral.daemon import meshworkers
from corral.daemon.meshworkers import MeshWorkers
from corral.testing.polling import until

# A stand-in worker: records every line it is fed, in a file named after its pid.
FAKE_WORKER = """
import os, sys
with open(os.path.join(sys.argv[1], f"{os.getpid()}.log"), "wb", buffering=0) as log:
    for line in sys.stdin.buffer:
        log.write(line)
"""


def fed(tmp: Path, pid: int) -> bytes:
    path = tmp / f"{pid}.log"
    return path.read_bytes() if path.exists() else b""


def test_a_dead_worker_is_replaced_after_a_back_off_and_fed_the_current_state(
        run: Callable[[Callable[[], Awaitable[None]]], None], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(meshworkers, "RESTART_DELAY", 0.3)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        workers = MeshWorkers(1, [str(tmp_path)], command=(sys.executable, "-c", FAKE_WORKER))
        try:
            await workers.ensure()
            (first,) = workers.procs
            await workers.feed(b"update 1\n")
            await until(lambda: fed(tmp_path, first.pid) == b"update 1\n", what="first fed")

            os.kill(first.pid, signal.SIGKILL)
            died = loop.time()
            await until(lambda: not workers.procs, what="the death noticed")
            # Endpoint updates keep coming (the agent applies every few seconds): they must
            # neither start a replacement early nor get lost for the replacement.
            await workers.ensure()
            assert workers.procs == []
            await workers.feed(b"update 2\n")
            await until(lambda: len(workers.procs) == 1, what="a replacement")
            (second,) = workers.procs
            assert second.pid != first.pid
            assert loop.time() - died >= 0.3  # the back-off was waited out
            # The replacement got the current state by itself, before serving anything.
            await until(lambda: fed(tmp_path, second.pid) == b"update 2\n", what="second fed")

            # Dying young again: the back-off doubles.
            os.kill(second.pid, signal.SIGKILL)
            died = loop.time()
            await until(lambda: len(workers.procs) == 1 and workers.procs[0] is not second,
                        what="another replacement")
            assert loop.time() - died >= 0.6

            # Stopping during a back-off is final: the pending replacement is called off.
            (third,) = workers.procs
            os.kill(third.pid, signal.SIGKILL)
            await until(lambda: not workers.procs, what="the third death noticed")
            assert workers._watchers  # white-box: its replacement waits out the back-off
        finally:
            await workers.stop()
        assert workers.procs == [] and not workers._watchers

    run(scenario)


def test_stop_ends_every_worker(run: Callable[[Callable[[], Awaitable[None]]], None],
                                tmp_path: Path) -> None:
    async def scenario() -> None:
        workers = MeshWorkers(2, [str(tmp_path)], command=(sys.executable, "-c", FAKE_WORKER))
        try:
            await workers.ensure()
            procs = list(workers.procs)
            assert len(procs) == 2
        finally:
            await workers.stop()
        assert all(p.returncode is not None for p in procs)
        assert workers.procs == []

    run(scenario)
