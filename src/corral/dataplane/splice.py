"""Zero-copy forwarding for the bulk phase of a proxied TCP connection (Linux ``splice``).

How this works: a proxied connection starts by copying every byte through Python
(:mod:`corral.dataplane.proxy`). Once a read shows bulk traffic (a read that fills the buffer)
and nothing is pending either way, the connection hands both sockets to a
:class:`SplicedPair`, which moves the bytes with ``splice(2)``: socket → pipe → socket, in the
kernel, driven by the event loop's ``add_reader``/``add_writer`` on the descriptors (stock
asyncio and uvloop alike).

Each direction (:class:`_Flow`) reads only while its destination can take more: when a splice
into the destination would block, it stops reading its source and waits for the destination to
become writable (back-pressure, bounded by one pipe's worth of bytes). A source's EOF is
forwarded as ``shutdown(SHUT_WR)`` once its pipe is empty (half-close); the pair closes when both
directions have ended, or at once on an error in either (as the copying path does).

Pipes are held only while bytes are in flight: a direction takes a pipe from a small per-process
pool when it reads and gives it back when the pipe is empty again, so idle spliced connections
cost no descriptors beyond their two sockets.
"""

from __future__ import annotations

import _socket
import asyncio
import fcntl
import os
import socket
from collections.abc import Callable

__all__ = ["PIPE_SIZE", "SplicedPair", "available", "close_pool"]

# Each pipe's capacity, the most one splice moves (fs.pipe-max-size allows 1 MiB to anyone).
# Measured on a 100 MiB download: 1 MiB pipes use a third of the CPU copying through Python does,
# 256 KiB half, 64 KiB (the default) about as much.
PIPE_SIZE = 1 << 20
# Empty pipes kept for reuse (two descriptors each).
POOL_MAX = 32

_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK if hasattr(os, "splice") else 0
_pool: list[tuple[int, int]] = []


def available() -> bool:
    """Whether this platform has ``splice`` (Linux)."""
    return hasattr(os, "splice")


def _acquire() -> tuple[int, int]:
    """An empty pipe (read end, write end), from the pool or new."""
    if _pool:
        return _pool.pop()
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:  # pragma: no cover - pipe-max-size lowered: the default 64 KiB will do
        pass
    return r, w


def _release(pipe: tuple[int, int]) -> None:
    """Give back an *empty* pipe."""
    if len(_pool) < POOL_MAX:
        _pool.append(pipe)
    else:
        os.close(pipe[0])
        os.close(pipe[1])


def _discard(pipe: tuple[int, int]) -> None:
    """Close a pipe that may still hold bytes (never pooled)."""
    os.close(pipe[0])
    os.close(pipe[1])


def close_pool() -> None:
    """Close the pooled pipes (tests, shutdown)."""
    while _pool:
        _discard(_pool.pop())


class _Flow:
    """One direction of a spliced pair: ``src`` socket → pipe → ``dst`` socket."""

    __slots__ = ("pair", "src", "dst", "pipe", "pending", "eof", "waiting")

    def __init__(self, pair: SplicedPair, src: _socket.socket, dst: _socket.socket) -> None:
        self.pair = pair
        self.src = src.fileno()
        self.dst = dst.fileno()
        self.pipe: tuple[int, int] | None = None
        self.pending = 0  # bytes in the pipe, not yet in dst
        self.eof = False  # src sent EOF
        self.waiting = False  # dst is full: reading src stopped, waiting for dst writable

    def readable(self) -> None:
        """Move what ``src`` has into the pipe, then on into ``dst``."""
        pipe = self.pipe
        if pipe is None:
            pipe = self.pipe = _acquire()
        try:
            n = os.splice(self.src, pipe[1], PIPE_SIZE, flags=_FLAGS)
        except BlockingIOError:  # spurious wake-up: nothing to read (the pipe is empty)
            self.pipe = None
            _release(pipe)
            return
        except OSError as exc:
            self.pair.fail(exc)
            return
        if n == 0:
            self.eof = True
            self.pair.loop.remove_reader(self.src)
            self.pipe = None
            _release(pipe)
            self.pair.ended(self)
            return
        self.pair.on_read()
        self.pending = n
        self.flush()

    def flush(self) -> None:
        """Move the pipe's bytes into ``dst``; wait for it to be writable if it is full."""
        pipe = self.pipe
        assert pipe is not None
        try:
            while self.pending:
                self.pending -= os.splice(pipe[0], self.dst, self.pending, flags=_FLAGS)
        except BlockingIOError:
            if not self.waiting:
                self.waiting = True
                loop = self.pair.loop
                loop.remove_reader(self.src)
                loop.add_writer(self.dst, self.flush)
            return
        except OSError as exc:
            self.pair.fail(exc)
            return
        self.pipe = None
        _release(pipe)
        if self.waiting:
            self.waiting = False
            loop = self.pair.loop
            loop.remove_writer(self.dst)
            loop.add_reader(self.src, self.readable)

    def close(self) -> None:
        """Stop watching the descriptors and drop the pipe (it may hold bytes)."""
        loop = self.pair.loop
        if not self.eof:
            loop.remove_reader(self.src)
        if self.waiting:
            loop.remove_writer(self.dst)
        if self.pipe is not None:
            _discard(self.pipe)
            self.pipe = None


def _nothing() -> None:
    pass


class SplicedPair:
    """Both directions between a client socket and its upstream socket, spliced."""

    __slots__ = ("loop", "a", "b", "ab", "ba", "closed", "on_read", "on_close")

    def __init__(self, loop: asyncio.AbstractEventLoop, a: _socket.socket, b: _socket.socket,
                 on_read: Callable[[], None], on_close: Callable[[], None]) -> None:
        """Take over sockets ``a`` (client) and ``b`` (upstream); both must be non-blocking and
        have nothing buffered on our side. ``on_read`` is called on each chunk moved (activity,
        for the idle sweep), ``on_close`` once when the pair is closed."""
        self.loop = loop
        self.a, self.b = a, b
        self.closed = False
        self.on_read = on_read
        self.on_close = on_close
        self.ab = _Flow(self, a, b)
        self.ba = _Flow(self, b, a)
        loop.add_reader(self.ab.src, self.ab.readable)
        loop.add_reader(self.ba.src, self.ba.readable)

    def ended(self, flow: _Flow) -> None:
        """``flow``'s source sent EOF and its pipe is empty: half-close its destination."""
        other = self.ba if flow is self.ab else self.ab
        if other.eof and other.pending == 0:
            self.close()
            return
        dst = self.b if flow is self.ab else self.a
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:  # the peer is already gone: its own flow will see the error
            pass

    def fail(self, exc: OSError) -> None:
        """An error on either socket (reset, broken pipe): drop both ends."""
        self.close()

    def close(self) -> None:
        """Close both sockets (idempotent); a half-flushed pipe is dropped."""
        if self.closed:
            return
        self.closed = True
        # Watchers first: the loop must forget a descriptor before it is closed (and reused).
        self.ab.close()
        self.ba.close()
        self.a.close()
        self.b.close()
        on_close, self.on_read, self.on_close = self.on_close, _nothing, _nothing
        on_close()  # and let go of the connection it belongs to (no cycle left to collect)
