"""The daemon's extra userspace mesh processes (`--mesh-workers`): started, fed, replaced, stopped.

Each worker (:mod:`corral.dataplane.worker`) listens on the same ports as the daemon's own mesh
(SO_REUSEPORT: the kernel spreads new connections over the processes) and is fed the TCP
endpoint state as one line per change on its stdin. A worker that dies (a crash, the OOM
killer) is replaced, as HAProxy's master replaces a worker: after a back-off that grows while
replacements keep dying young, and the replacement gets the current state before it serves.
"""

from __future__ import annotations

import asyncio
import logging
import sys

log = logging.getLogger(__name__)

# The wait before replacing a dead worker: the first, and the longest it grows to.
RESTART_DELAY = 1.0
RESTART_DELAY_MAX = 30.0
# A worker that lived this long died of something new: the back-off starts over.
HEALTHY_AFTER = 60.0


class MeshWorkers:
    """Up to ``count`` worker processes running ``argv``, fed the last endpoint update."""

    def __init__(self, count: int, argv: list[str]) -> None:
        """Nothing starts until :meth:`ensure` (the daemon calls it with the first TCP port)."""
        self.count = count
        self.argv = argv
        self.procs: list[asyncio.subprocess.Process] = []
        self._watchers: set[asyncio.Task[None]] = set()
        self._update: bytes | None = None  # the last endpoint state, for replacements
        self._delay = RESTART_DELAY
        self._lock = asyncio.Lock()  # one start at a time: never more than `count` workers
        self._stopping = False

    async def ensure(self) -> None:
        """Start workers until there are ``count`` (fewer if the system refuses more)."""
        async with self._lock:
            started = []
            while len(self.procs) < self.count and not self._stopping:
                try:
                    proc = await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "corral.dataplane.worker", *self.argv,
                        stdin=asyncio.subprocess.PIPE)
                except OSError as exc:  # out of processes or memory: the daemon's mesh serves
                    log.error("cannot start a mesh worker: %s", exc)
                    break
                self.procs.append(proc)
                started.append(proc)
                watcher = asyncio.get_running_loop().create_task(self._watch(proc))
                self._watchers.add(watcher)
                watcher.add_done_callback(self._watchers.discard)
            if self._update is not None and started:
                await self._send(started, self._update)

    async def feed(self, update: bytes) -> None:
        """Give every worker the endpoint state (and remember it for replacements)."""
        self._update = update
        await self._send(self.procs, update)

    async def _send(self, procs: list[asyncio.subprocess.Process], update: bytes) -> None:
        for proc in procs:
            if proc.stdin is not None and proc.returncode is None:
                try:
                    proc.stdin.write(update)
                    await proc.stdin.drain()
                except (ConnectionError, BrokenPipeError) as exc:
                    log.error("mesh worker %d is gone: %s", proc.pid, exc)

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        """Wait for a worker to end; replace it unless the daemon is stopping."""
        loop = asyncio.get_running_loop()
        born = loop.time()
        code = await proc.wait()
        if self._stopping:
            return
        if proc in self.procs:
            self.procs.remove(proc)
        if loop.time() - born >= HEALTHY_AFTER:
            self._delay = RESTART_DELAY
        delay = self._delay
        self._delay = min(delay * 2, RESTART_DELAY_MAX)
        log.error("mesh worker %d exited (status %s); starting another in %.0f s",
                  proc.pid, code, delay)
        await asyncio.sleep(delay)
        await self.ensure()

    async def stop(self) -> None:
        """Stop every worker: EOF on stdin, then SIGKILL after 3 s."""
        self._stopping = True
        for watcher in list(self._watchers):
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()  # EOF: the worker closes its listeners and exits
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 3.0)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        self.procs = []
