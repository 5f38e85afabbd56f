"""Readiness for the mesh's TCP sockets: one private epoll set, itself watched by the event loop.

Why not ``loop.add_reader`` per socket, or asyncio transports: a short proxied connection is a
handful of events, and the per-connection machinery around them cost more than the events. With
transports, each connection paid for two transport objects, a task and a future for the upstream
connect, and uvloop's extra ``getsockname``/``getpeername``/``ioctl`` calls; uvloop's
``add_reader`` on a raw descriptor costs about a dozen ``epoll_ctl`` calls per connection. Here a
connection registers its two descriptors once, changes their interest only when back-pressure
starts or stops, and the kernel drops them from the set when they are closed (when no other
process holds them: the daemon's children are started with close-on-exec descriptors, and the
mesh's sockets are all close-on-exec). The set's own
descriptor is readable whenever one of its sockets is ready, so the event loop (stock asyncio
or uvloop) wakes us with one callback per batch of events, and everything else on the loop —
timers, the UDP mesh, the daemon — runs as before.

The steady state of a proxied connection -- one read, one send of it to the other side -- is
done in C where the compiled ``corral.dataplane._fastpoll`` is there (Linux, built at install):
a descriptor registered with a ``peer`` has its plain reads forwarded there, and its handler is
called only for what C left to do, with the :data:`PUMPED` bit and :attr:`Reactor.got` /
:attr:`Reactor.rest` saying what that was (see the C file's header). Without it (no compiler,
another OS, ``CORRAL_MESH_FASTPOLL=0``) the handlers do the same in Python.

Handlers must tolerate stale events (an event reported at the start of a batch may have been
dealt with by an earlier handler of the same batch). A descriptor closed during a batch gets no
more of that batch's events: its number may already belong to a new socket.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
import selectors
from collections.abc import Callable
from types import ModuleType
from typing import Any

_fastpoll: ModuleType | None
try:
    from corral.dataplane import _fastpoll
except ImportError:  # not built (no C compiler, not Linux): forwarding stays in Python
    _fastpoll = None

__all__ = ["ERR", "FASTPOLL", "HUP", "IN", "OUT", "PUMPED", "RDHUP", "Reactor"]

log = logging.getLogger(__name__)

# epoll's event bits (the same values are used with the portable fallback below).
IN: int = getattr(select, "EPOLLIN", 0x001)
OUT: int = getattr(select, "EPOLLOUT", 0x004)
ERR: int = getattr(select, "EPOLLERR", 0x008)
HUP: int = getattr(select, "EPOLLHUP", 0x010)
RDHUP: int = getattr(select, "EPOLLRDHUP", 0x2000)  # the peer sent FIN (Linux)
# Not epoll's: the event is what the C forwarding left over (see Reactor.got and .rest).
# (EPOLLEXCLUSIVE's value, which is only ever an input flag: epoll never reports it.)
PUMPED = 1 << 28

# Whether reactors forward in C (the compiled module is there and not turned off).
FASTPOLL = _fastpoll is not None and os.environ.get("CORRAL_MESH_FASTPOLL", "1") != "0"

# The scratch buffer every read goes into: the most one read takes (bytes a connection holds
# are copied out of it only when a socket does not take them at once).
BUFFER_SIZE = 65536
# Events handled per wake-up; more wait for the next loop turn, so timers and other
# callbacks are never starved by a flood of connections.
BATCH = 256

Handler = Callable[[int], None]


class _SelectorPoller:
    """epoll's register/modify/unregister/poll over ``selectors`` (platforms without epoll).

    A selector cannot watch for errors alone, so interest 0 means "not in the selector": a
    socket kept for errors only is not watched at all (its error shows when it is next read).
    """

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._known: set[int] = set()  # registered descriptors, watched or at interest 0

    @staticmethod
    def _mask(events: int) -> int:
        return ((selectors.EVENT_READ if events & (IN | RDHUP) else 0)
                | (selectors.EVENT_WRITE if events & OUT else 0))

    def fileno(self) -> int:
        # kqueue and epoll selectors have one; select() and poll() ones cannot be watched.
        fileno = getattr(self._sel, "fileno", None)
        if fileno is None:
            raise OSError(errno.ENOSYS, "the mesh needs epoll or kqueue")
        return int(fileno())

    def register(self, fd: int, events: int) -> None:
        if fd in self._known:
            raise FileExistsError(errno.EEXIST, f"descriptor {fd} is registered already")
        self._known.add(fd)
        self.modify(fd, events)

    def modify(self, fd: int, events: int) -> None:
        if fd not in self._known:
            raise FileNotFoundError(errno.ENOENT, f"descriptor {fd} is not registered")
        mask = self._mask(events)
        watched = fd in self._sel.get_map()
        if not mask:
            if watched:
                self._sel.unregister(fd)
        elif watched:
            self._sel.modify(fd, mask)
        else:
            self._sel.register(fd, mask)

    def unregister(self, fd: int) -> None:
        self._known.remove(fd)
        if fd in self._sel.get_map():
            self._sel.unregister(fd)

    def poll(self, timeout: float, maxevents: int) -> list[tuple[int, int]]:
        ready = self._sel.select(timeout)[:maxevents]
        return [(key.fd, (IN if ev & selectors.EVENT_READ else 0)
                 | (OUT if ev & selectors.EVENT_WRITE else 0)) for key, ev in ready]

    def close(self) -> None:
        self._sel.close()


class Reactor:
    """A private readiness set for sockets, driven by the running event loop.

    ``register(fd, events, handler, peer)``: call ``handler(events)`` whenever ``fd`` is ready
    (with ``peer``, a descriptor to forward plain reads to in C: see the module docstring);
    ``modify`` changes the interest (and the peer); ``forget`` drops the handler of a
    descriptor about to be closed (closing removes it from the set); ``unregister`` removes
    one that stays open.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, *, portable: bool = False,
                 fast: bool | None = None) -> None:
        """Create the set and have ``loop`` watch it (``portable``: the selectors fallback;
        ``fast``: forward in C, by default whenever it is built)."""
        self.loop = loop
        epoll = getattr(select, "epoll", None)
        self.fast = (FASTPOLL if fast is None else fast) and not portable and epoll is not None
        self._poller: Any
        if self.fast:
            if _fastpoll is None:
                raise RuntimeError("corral.dataplane._fastpoll is not built")
            self._poller = _fastpoll.Poller(BUFFER_SIZE)
        else:
            self._poller = _SelectorPoller() if portable or epoll is None else epoll()
        # Without epoll, closing a descriptor does not drop it from the set: forget() must.
        self._auto_drop = not isinstance(self._poller, _SelectorPoller)
        self._handlers: dict[int, Handler] = {}
        # Descriptors forgotten during the current batch: their number may already belong to
        # a new socket, which must not get the old one's events (it gets its own next poll).
        self._gone: set[int] = set()
        self._closed = False
        # Handlers run one at a time on the loop's thread, so they can share one buffer.
        self.buffer = memoryview(bytearray(BUFFER_SIZE))
        # What the C forwarding did for the PUMPED event being handled: bytes read (0: the
        # FIN, READ_FAILED: an error), and what of them the peer did not take (None: the send
        # failed).
        self.got = 0
        self.rest: bytes | None = None
        # C's accept (non-blocking and TCP_NODELAY in one call) and upstream connect (options,
        # bind and connect in one call), or None: the caller does them in Python.
        self.accept: Callable[[int], tuple[int, Any] | None] | None = (
            self._poller.accept if self.fast else None)
        self.connect: Callable[[int, str, int, str | None], bool | None] | None = (
            self._poller.connect if self.fast else None)
        # C's forwarding of one plain read, called directly: None (all done) or (got, rest).
        self.forward: Callable[[int, int], tuple[int, bytes | None] | None] | None = (
            self._poller.forward if self.fast else None)
        loop.add_reader(self._poller.fileno(), self._ready_fast if self.fast else self._ready)

    def register(self, fd: int, events: int, handler: Handler, peer: int = -1) -> None:
        """Watch ``fd`` for ``events`` (errors and hang-ups are always reported)."""
        if self.fast:
            self._poller.register(fd, events, peer)
        else:
            self._poller.register(fd, events)
        self._handlers[fd] = handler

    def modify(self, fd: int, events: int, peer: int = -1) -> None:
        """Change what ``fd`` is watched for."""
        if self.fast:
            self._poller.modify(fd, events, peer)
        else:
            self._poller.modify(fd, events)

    def unregister(self, fd: int) -> None:
        """Stop watching ``fd``, which stays open (handed to someone else, or parked)."""
        del self._handlers[fd]
        self._poller.unregister(fd)

    def forget(self, fd: int) -> None:
        """``fd`` is about to be closed: drop its handler (the kernel drops it from the set)."""
        if self._handlers.pop(fd, None) is not None:
            self._gone.add(fd)
            if self.fast:
                self._poller.forget(fd)
            elif not self._auto_drop:
                self._poller.unregister(fd)

    def take_busy(self, *fds: int) -> bool:
        """Whether C forwarded a read of any of ``fds`` since the last look (clears them)."""
        return bool(self.fast and self._poller.take_busy(*fds))

    def _failed(self, exc: Exception, fd: int) -> None:
        """A handler raised: report it as the loop would, and go on with the batch."""
        self.loop.call_exception_handler({
            "message": f"mesh: handling an event of descriptor {fd} failed",
            "exception": exc})

    def _ready(self) -> None:
        handlers, gone = self._handlers, self._gone
        gone.clear()
        for fd, events in self._poller.poll(0, BATCH):
            if fd in gone:
                continue
            handler = handlers.get(fd)
            if handler is not None:
                try:
                    handler(events)
                except Exception as exc:  # one connection's trouble is not the batch's
                    self._failed(exc, fd)

    def _ready_fast(self) -> None:
        # C has forwarded the plain reads of the batch; the rest is ours. Every entry must be
        # handled, whatever an earlier handler did: C has already read the bytes it carries
        # (an unhandled event of the Python path simply comes again; these would not).
        handlers, gone = self._handlers, self._gone
        gone.clear()
        for fd, events, got, rest in self._poller.poll(BATCH):
            if fd in gone:
                continue
            handler = handlers.get(fd)
            if handler is None:
                if rest:  # cannot happen while the move to splice waits for the batch's end
                    log.error("mesh: %d bytes read from descriptor %d had no connection",
                              len(rest), fd)
                continue
            try:
                if got == -1:  # C did nothing with it (_fastpoll.NOT_READ)
                    handler(events)
                else:
                    self.got, self.rest = got, rest
                    handler(events | PUMPED)
            except Exception as exc:
                self._failed(exc, fd)

    def close(self) -> None:
        """Stop watching the set and close it (idempotent; sockets are their owners' to close)."""
        if self._closed:
            return
        self._closed = True
        self.loop.remove_reader(self._poller.fileno())
        self._handlers.clear()
        self._poller.close()
