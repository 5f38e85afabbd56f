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

    def __init__(self, count: int, argv: list[str],
                 command: tuple[str, ...] = (sys.executable, "-m", "corral.dataplane.worker")
                 ) -> None:
        """Nothing starts until :meth:`ensure` (the daemon calls it with the first TCP port)."""
        self.count = count
        self.command = (*command, *argv)
        self.procs: list[asyncio.subprocess.Process] = []
        self._watchers: set[asyncio.Task[None]] = set()
        # Slots of dead workers whose replacement is waiting out its back-off: ensure() leaves
        # them alone, so a burst of endpoint updates cannot bypass the back-off.
        self._replacing = 0
        self._update: bytes | None = None  # the last endpoint state, for replacements
        self._delay = RESTART_DELAY
        self._lock = asyncio.Lock()  # one start or stop at a time: never more than `count`
        self._stopping = False

    async def ensure(self) -> None:
        """Start workers until there are ``count`` (fewer if the system refuses more)."""
        async with self._lock:
            while len(self.procs) + self._replacing < self.count and not self._stopping:
                if not await self._start_one():
                    break

    async def _start_one(self) -> bool:
        """Start a worker and give it the current state before it can serve (lock held)."""
        try:
            proc = await asyncio.create_subprocess_exec(*self.command,
                                                        stdin=asyncio.subprocess.PIPE)
        except OSError as exc:  # out of processes or memory: the daemon's mesh serves alone
            log.error("cannot start a mesh worker: %s", exc)
            return False
        self.procs.append(proc)
        if self._update is not None and proc.stdin is not None:
            # Written before any await, so no newer update can overtake it (feed() writes
            # to every listed worker, this one included, from now on).
            proc.stdin.write(self._update)
        watcher = asyncio.get_running_loop().create_task(self._watch(proc))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return True

    async def feed(self, update: bytes) -> None:
        """Give every worker the endpoint state (and remember it for replacements)."""
        self._update = update
        for proc in list(self.procs):  # a copy: a watcher may drop a dead one meanwhile
            if proc.stdin is not None and proc.returncode is None:
                try:
                    proc.stdin.write(update)
                    await proc.stdin.drain()
                except ConnectionError as exc:
                    log.error("mesh worker %d is gone: %s", proc.pid, exc)

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        """Wait for a worker to end; replace it after a back-off, unless stopping."""
        loop = asyncio.get_running_loop()
        born = loop.time()
        code = await proc.wait()
        if self._stopping:
            return
        self._replacing += 1
        try:
            if proc in self.procs:
                self.procs.remove(proc)
            if loop.time() - born >= HEALTHY_AFTER:
                self._delay = RESTART_DELAY
            log.error("mesh worker %d exited (status %s); starting another in %.0f s",
                      proc.pid, code, self._delay)
            while True:
                delay = self._delay
                self._delay = min(delay * 2, RESTART_DELAY_MAX)
                await asyncio.sleep(delay)
                async with self._lock:
                    if self._stopping or await self._start_one():
                        return
        finally:
            self._replacing -= 1

    async def stop(self) -> None:
        """Stop every worker: EOF on stdin, then SIGKILL after 3 s."""
        self._stopping = True
        for watcher in list(self._watchers):
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        async with self._lock:  # a start in progress finishes first, and is stopped too
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
