"""TCP forwarding for the routing mesh, built on asyncio Protocols.

How this works: a listener accepts a client connection and creates a
:class:`ClientSide` protocol. It keeps reading while it connects (the first bytes,
usually a request, are held; past ``EARLY_LIMIT`` it pauses, so the rest stays in
the kernel, not in our memory) and starts a small task that connects to a backend
chosen by the :class:`Route` (round-robin over the current list, each backend
tried at most once, each attempt bounded by a timeout, backends that recently
failed to connect skipped while ejected — see :class:`Route`). When the upstream
connects, an :class:`UpstreamSide` protocol is wired to the client side, any
early bytes/EOF are forwarded, and the client is resumed if it was paused. From
then on no coroutine is involved: each side's ``data_received`` writes straight
into the other side's transport, ``pause_writing``/``resume_writing`` on one side
pause/resume reading on the other (back-pressure without our own buffers), and
``eof_received`` forwards a half-close with ``write_eof``. The pair is closed
when both directions have seen EOF, or when either transport is lost.

Bulk: once a read of at least ``splice.BULK_READ`` bytes shows one side sending faster than we
forward, and nothing is buffered in either transport, the pair leaves the transports and is
forwarded with ``splice(2)`` in the kernel from then on (:mod:`corral.dataplane.splice`; Linux
only; ``CORRAL_MESH_SPLICE=0`` turns it off).

Works unchanged on the stock asyncio loop and on uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast

from corral.dataplane import splice
from corral.dataplane.proxyproto import encode_v1, encode_v2

if TYPE_CHECKING:
    from corral.dataplane.balance import Balancer

__all__ = [
    "Backend",
    "BackendHealth",
    "ClientSide",
    "PortStats",
    "PublishedPort",
    "Route",
    "UpstreamSide",
]


@dataclass(frozen=True)
class Backend:
    """One upstream task endpoint that connections may be forwarded to."""

    addr: str
    port: int
    task_id: str = ""


@dataclass(frozen=True)
class PublishedPort:
    """A port published on every node of the swarm."""

    port: int
    # The mesh keys listeners on (port, protocol): a TCP and a UDP listener may share a port.
    protocol: Literal["tcp", "udp"] = "tcp"


@dataclass(slots=True)
class PortStats:
    """Connection counters for one published port (cheap enough to update inline)."""

    active: int = 0  # client connections currently open
    total: int = 0  # client connections accepted
    failed_connects: int = 0  # upstream connect attempts that failed
    rejected: int = 0  # clients closed because no backend could be reached
    # Times a backend went from "in rotation" to "ejected" after a failed connect
    # (a failure that only extends a running ejection is not counted again).
    ejections: int = 0


@dataclass(slots=True)
class BackendHealth:
    """Passive health of one backend that failed recently (absent = healthy)."""

    failures: int = 0  # consecutive failed connects
    ejected_until: float = 0.0  # clock() time until which it is out of rotation


class Route:
    """The live backend list of one published port, with round-robin state.

    Passive failure detection (outlier ejection): a failed connect to a backend
    ejects it from rotation for ``eject_base * 2**(failures-1)`` seconds (capped
    at ``eject_max``), where ``failures`` counts consecutive failed connects; a
    successful connect clears it. Health is kept per (addr, port) in
    :attr:`health`, which holds only backends that failed since their last
    success, so with all backends healthy it is empty and :meth:`pick` costs
    what it did without ejection. Entries are dropped when their backend leaves
    the list, so a backend that is removed and re-added starts clean.
    """

    __slots__ = (
        "backends", "connect_timeout", "stats", "registry", "source_addr",
        "health", "eject_base", "eject_max", "clock", "_keys", "_keyset", "_rr", "balancer",
        "proxy_protocol", "loop",
    )

    def __init__(
        self,
        stats: PortStats,
        registry: set[ClientSide],
        connect_timeout: float,
        source_addr: str | None = None,
        *,
        eject_base: float = 0.5,
        eject_max: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Create an empty route; ``registry`` tracks open connections for shutdown."""
        # Upstream connections leave from the node's own address (when it has a specific
        # one), so a task sees which node's mesh the connection came through — as a Swarm
        # task sees the ingress endpoint's address.
        self.source_addr = source_addr
        # The loop of the first connection (asyncio.get_running_loop() costs a getpid()).
        self.loop: asyncio.AbstractEventLoop | None = None
        # A tuple, replaced wholesale by set_backends(): readers never see a
        # half-updated list, and no lock is needed on a single-threaded loop.
        self.backends: tuple[Backend, ...] = ()
        self.connect_timeout = connect_timeout
        self.stats = stats
        self.registry = registry
        self.eject_base = eject_base
        self.eject_max = eject_max
        self.clock = clock
        # None: the built-in round-robin (the hot path); else a strategy from balance.py.
        self.balancer: Balancer | None = None
        # 0: plain TCP; 1 or 2: send a PROXY protocol header of that version to the backend.
        self.proxy_protocol = 0
        # (addr, port) -> health, only for backends that failed since their last
        # successful connect; empty in the common case (the hot-path check).
        self.health: dict[tuple[str, int], BackendHealth] = {}
        # Health keys of self.backends, index for index (so pick() allocates no
        # key tuples), and as a set for membership checks on failures.
        self._keys: tuple[tuple[str, int], ...] = ()
        self._keyset: frozenset[tuple[str, int]] = frozenset()
        self._rr = 0

    def set_backends(self, backends: Sequence[Backend]) -> None:
        """Atomically replace the backend list (new connections only).

        Health of backends that stay in the list is kept; health of backends
        that left it is forgotten.
        """
        backends = tuple(backends)
        keys = tuple((b.addr, b.port) for b in backends)
        keyset = frozenset(keys)
        self.backends, self._keys, self._keyset = backends, keys, keyset
        if self.balancer is not None:
            self.balancer.set_backends(backends)
        health = self.health
        if health:
            for key in [k for k in health if k not in keyset]:
                del health[key]

    def pick(self, tried: Sequence[Backend], client: str = "") -> Backend | None:
        """Return the next backend that is not in ``tried``, or None: round-robin, or the
        port's balancer (least-conn, source-hash, maglev, affinity…) when it has one.

        Ejected backends are skipped. If every backend not yet tried is ejected,
        the one whose ejection ends soonest is returned anyway (fail open: it
        may have recovered, and a client is never refused just because every
        backend is marked).
        """
        # Always consult the *current* list, so a backend removed by apply()
        # is never chosen again, even for a retry of an in-flight connection.
        backends = self.backends
        n = len(backends)
        health = self.health
        if self.balancer is not None:
            return self._pick_balanced(tried, client)
        if not health:  # the common case: nothing ejected
            for _ in range(n):
                b = backends[self._rr % n]
                self._rr += 1
                if b not in tried:
                    return b
            return None
        keys = self._keys
        now = self.clock()
        fallback: Backend | None = None
        soonest = 0.0
        for _ in range(n):
            i = self._rr % n
            self._rr += 1
            b = backends[i]
            if b in tried:
                continue
            h = health.get(keys[i])
            if h is None or h.ejected_until <= now:
                return b
            if fallback is None or h.ejected_until < soonest:
                fallback, soonest = b, h.ejected_until
        return fallback

    def _pick_balanced(self, tried: Sequence[Backend], client: str) -> Backend | None:
        """The balancer's choice among untried, non-ejected backends (fail open as above)."""
        assert self.balancer is not None
        now = self.clock() if self.health else 0.0
        candidates, fallback, soonest = [], None, 0.0
        for key, b in zip(self._keys, self.backends):
            if b in tried:
                continue
            h = self.health.get(key) if self.health else None
            if h is None or h.ejected_until <= now:
                candidates.append(b)
            elif fallback is None or h.ejected_until < soonest:
                fallback, soonest = b, h.ejected_until
        if candidates:
            return self.balancer.pick(client, candidates)
        return fallback

    def set_balancer(self, balancer: Balancer | None) -> None:
        """Use `balancer` for new connections (None: plain round-robin)."""
        self.balancer = balancer
        if balancer is not None:
            balancer.set_backends(self.backends)

    def lists(self, backend: Backend) -> bool:
        """Whether ``backend`` (by addr, port) is in the current list."""
        return (backend.addr, backend.port) in self._keyset

    def record_failure(self, backend: Backend) -> None:
        """A connect to ``backend`` failed: eject it for a growing time."""
        key = (backend.addr, backend.port)
        if not self.lists(backend):
            # Removed from the list while we were connecting: nothing to track.
            return
        h = self.health.get(key)
        if h is None:
            h = self.health[key] = BackendHealth()
        now = self.clock()
        if h.ejected_until > now:
            # Connects that were already in flight when it was ejected: one outage counts
            # once (as Envoy does), so a burst of clients cannot push it out for the maximum.
            return
        self.stats.ejections += 1
        h.failures += 1
        # Float power with a bounded exponent: never overflows, however long a
        # backend stays dead (base * 2.0**1000 may be inf, and min() caps it).
        delay = min(self.eject_base * 2.0 ** min(h.failures - 1, 1000), self.eject_max)
        h.ejected_until = now + delay

    def record_success(self, backend: Backend) -> None:
        """A connect to ``backend`` succeeded: it is healthy again."""
        if self.health:
            self.health.pop((backend.addr, backend.port), None)

    def ejected(self) -> set[Backend]:
        """Backends of the current list that are ejected right now."""
        health = self.health
        if not health:
            return set()
        now = self.clock()
        return {
            b for b, k in zip(self.backends, self._keys)
            if (h := health.get(k)) is not None and h.ejected_until > now
        }

    def make_client(self) -> ClientSide:
        """Protocol factory for the listener."""
        return ClientSide(self)


def set_keepalive(transport: asyncio.BaseTransport) -> None:
    """TCP keepalive towards a backend: a vanished task is noticed on an idle connection.
    (The mesh sets it from its periodic sweep, not per connection: only long-lived
    connections need it.)"""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        keepalive(sock)


def keepalive(sock: socket.socket) -> None:
    """Probe after 60 s of silence, every 10 s, give up after 6 unanswered probes."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)
    except OSError:  # already reset (the pair sees it next), or a platform without them
        pass


# Splice the bulk phase of connections (Linux), unless turned off for comparison.
SPLICE = splice.available() and os.environ.get("CORRAL_MESH_SPLICE", "1") != "0"
BULK_READ = splice.BULK_READ
# Bytes a client may send before its upstream connection exists; then reading pauses.
EARLY_LIMIT = 64 * 1024


# Linux: bind() picks only the address, connect() the port, per destination (see connect_from).
_BIND_ADDRESS_NO_PORT: int | None = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", None)


async def connect_from(loop: asyncio.AbstractEventLoop, source: str,
                       backend: Backend) -> socket.socket:
    """A TCP socket connected to `backend` from address `source`.

    Binding the address alone (IP_BIND_ADDRESS_NO_PORT, as HAProxy does) leaves the port to
    connect(), which picks one free for this very destination. A plain bind(source, 0) picks a
    port free for *every* destination: each costs a search through the ports that closed
    connections hold in TIME_WAIT (slower and slower as they pile up — at 10,000 of them new
    connections fell from ~4,000/s to under 1,000/s here) and caps the whole node at one
    connection per local port.
    """
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    fd = sock.fileno()
    watching = False
    try:
        sock.setblocking(False)
        if _BIND_ADDRESS_NO_PORT is not None:
            with contextlib.suppress(OSError):  # kernels before 4.2: a plain bind, as before
                sock.setsockopt(socket.IPPROTO_IP, _BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        # Not loop.sock_connect(): it resolves the (numeric) address in a thread first.
        err = sock.connect_ex((backend.addr, backend.port))
        if err == errno.EINPROGRESS and _established(sock):
            err = 0  # the handshake is done already (always, to a task on this node)
        if err == errno.EINPROGRESS:
            writable = loop.create_future()
            loop.add_writer(fd, _wake, writable)
            watching = True
            await writable
            loop.remove_writer(fd)
            watching = False
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, f"connect to {backend.addr}:{backend.port}: {os.strerror(err)}")
    except BaseException:
        if watching:
            loop.remove_writer(fd)
        sock.close()
        raise
    return sock


def _wake(waiter: asyncio.Future[None]) -> None:
    """The socket is writable: wake the connect, unless it was cancelled meanwhile."""
    if not waiter.done():
        waiter.set_result(None)


def _established(sock: socket.socket) -> bool:
    """Whether a connecting socket is connected now (a peer address exists only then)."""
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


def _dup_socket(transport: asyncio.Transport) -> socket.socket | None:
    """A non-blocking duplicate of the transport's socket (it outlives the transport)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    dup = socket.socket(fileno=os.dup(sock.fileno()))
    dup.setblocking(False)
    return dup


def _write_eof(transport: asyncio.Transport) -> None:
    """Half-close ``transport`` if it is still usable."""
    if transport.is_closing():
        return
    try:
        transport.write_eof()
    except (OSError, RuntimeError):  # pragma: no cover - raced with a close
        pass


class _Side(asyncio.Protocol):
    """One endpoint of a proxied TCP connection; forwards everything to its peer."""

    __slots__ = ("transport", "peer", "out", "eof", "lost", "blocked", "busy", "spliced")

    def __init__(self) -> None:
        """Start unconnected."""
        # Set on every read, cleared by the mesh's idle sweep: one store on the hot path
        # instead of a clock read or a timer per connection.
        self.busy = True
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        # The peer's transport, cached so the hot path is one attribute load.
        self.out: asyncio.Transport | None = None
        self.eof = False  # this side sent us EOF: no more data from it
        self.lost = False  # this side's transport is gone
        self.blocked = False  # our send buffer is above the high-water mark
        self.spliced = False  # the pair moved to splice: our transport is gone, not the socket

    def data_received(self, data: bytes) -> None:
        """Forward bytes as-is; the peer's transport buffers and signals pressure."""
        self.busy = True
        out = self.out
        if out is None:
            self._hold(data)
            return
        try:
            out.write(data)
        except RuntimeError:
            # uvloop raises when the peer's handle is already closed but its
            # connection_lost() has not run yet; it will close us next.
            return
        if len(data) >= BULK_READ and SPLICE:
            self._to_splice()

    def _ends(self) -> tuple[ClientSide, UpstreamSide] | None:
        """(client side, upstream side) of a wired pair."""
        raise NotImplementedError

    def _to_splice(self) -> None:
        """Bulk traffic: hand both sockets to a SplicedPair when nothing is buffered here."""
        ends = self._ends()
        if ends is None:
            return
        client, upstream = ends
        ct, ut = client.transport, upstream.transport
        if (ct is None or ut is None or client.task is not None
                or client.eof or upstream.eof or client.lost or upstream.lost
                or client.blocked or upstream.blocked
                or ct.get_write_buffer_size() or ut.get_write_buffer_size()):
            return  # not now: maybe at the next large read
        a = _dup_socket(ct)
        b = _dup_socket(ut)
        if a is None or b is None:  # pragma: no cover - transports without sockets
            for sock in (a, b):
                if sock is not None:
                    sock.close()
            return
        client.spliced = upstream.spliced = True
        # The sweep must not touch the dead transport (keepalive is set here, once).
        upstream.transport = None
        ct.abort()  # closes only the transports' descriptors: the duplicates keep the sockets
        ut.abort()
        keepalive(b)
        client.pair = splice.SplicedPair(asyncio.get_running_loop(), a, b,
                                         client.mark_busy, client.finish)

    def _hold(self, data: bytes) -> None:
        """Handle data that arrives before the pair is wired (dropped by default)."""

    def eof_received(self) -> bool:
        """Forward the half-close and keep the other direction flowing."""
        if self.eof:
            # uvloop re-reports EOF if reading is resumed after it; ignore.
            return True
        self.eof = True
        peer, out = self.peer, self.out
        if peer is None or out is None:
            # Client side still connecting upstream: forwarded once wired.
            return True
        if peer.lost:
            return False
        if peer.eof:
            # Both directions are done: close both (close() flushes buffers).
            out.close()
            return False
        _write_eof(out)
        # True keeps our transport open so we can still write the peer's data.
        return True

    def pause_writing(self) -> None:
        """Our send buffer is full: stop reading from the peer."""
        self.blocked = True
        self._set_peer_reading(False)

    def resume_writing(self) -> None:
        """Our send buffer drained: read from the peer again."""
        self.blocked = False
        self._set_peer_reading(True)

    def _set_peer_reading(self, on: bool) -> None:
        """Pause/resume the peer's reads, unless it already sent EOF."""
        peer, out = self.peer, self.out
        # After EOF a transport has dropped its reader; resuming it would make
        # the loop re-read the EOF (both asyncio and uvloop do).
        if peer is None or out is None or peer.lost or peer.eof:
            return
        if on:
            out.resume_reading()
        else:
            out.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        """Tear down the peer: gracefully on a clean close, abortively on error."""
        if self.spliced:  # our transport was retired for splice: the pair lives on
            return
        self.lost = True
        peer, out = self.peer, self.out
        if peer is not None and out is not None and not peer.lost:
            if exc is None:
                out.close()
            else:
                out.abort()


def proxy_header(version: int, client: asyncio.Transport) -> bytes:
    """The PROXY protocol header describing `client`'s connection (source = the client)."""
    src = client.get_extra_info("peername")
    dst = client.get_extra_info("sockname")
    s, d = (src[0], src[1]), (dst[0], dst[1])
    return encode_v1(s, d) if version == 1 else encode_v2(s, d)


class UpstreamSide(_Side):
    """The backend end of a proxied connection."""

    __slots__ = ("client",)

    def __init__(self, client: ClientSide) -> None:
        """Remember which client this upstream connection serves."""
        super().__init__()
        self.client = client

    def _ends(self) -> tuple[ClientSide, UpstreamSide] | None:
        return self.client, self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Wire both sides together as soon as the upstream socket exists."""
        # cast, not isinstance: uvloop's transports do not subclass asyncio's.
        # TCP_NODELAY is already set: asyncio and uvloop set it on every TCP transport.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        client = self.client
        if client.lost or client.transport is None:
            # The client went away while we were connecting.
            transport.abort()
            return
        # Wire here, not after create_connection() returns: the backend may
        # send data before the connecting task gets to run again.
        self.peer, self.out = client, client.transport
        client.peer, client.out = self, transport
        version = client.route.proxy_protocol
        if version:
            # The task learns the real client address from a PROXY protocol header, sent
            # before any of the client's bytes.
            transport.write(proxy_header(version, client.transport))
        early = client.early
        if early is not None:
            client.early = None
            transport.write(early)
        if client.eof:
            transport.write_eof()


class ClientSide(_Side):
    """The accepted (client) end of a proxied connection."""

    __slots__ = ("route", "task", "early", "held", "backend", "pair", "timed_out")

    def __init__(self, route: Route) -> None:
        """Bind to the route of the published port that accepted us."""
        super().__init__()
        self.route = route
        self.task: asyncio.Task[None] | None = None
        # The backend we connected to, kept only when a balancer counts connections.
        self.backend: Backend | None = None
        # Bytes read before the upstream exists (see _hold), and whether they paused reading.
        self.early: bytes | None = None
        self.held = False
        # Set when the pair moved to splice (bulk): it owns both sockets from then on.
        self.pair: splice.SplicedPair | None = None
        self.timed_out = False  # the connect timer fired (it cancels the connecting task)

    def _ends(self) -> tuple[ClientSide, UpstreamSide] | None:
        peer = self.peer
        return (self, peer) if isinstance(peer, UpstreamSide) else None

    def mark_busy(self) -> None:
        """Activity on a spliced pair (for the idle sweep)."""
        self.busy = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Count the connection and start connecting upstream (early bytes: see _hold)."""
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        # Reading goes on while we connect: the first bytes (a request, usually) are held
        # until the upstream exists, and reading pauses only if more than EARLY_LIMIT
        # arrive. Pausing at once and resuming later cost two epoll updates per connection.
        route = self.route
        stats = route.stats
        stats.total += 1
        stats.active += 1
        route.registry.add(self)
        if not route.backends:
            # Nothing to forward to: behave like a refused backend.
            stats.rejected += 1
            transport.abort()
            return
        loop = route.loop
        if loop is None:
            loop = route.loop = asyncio.get_running_loop()
        self.task = loop.create_task(self._connect(loop))

    def _hold(self, data: bytes) -> None:
        """Keep early bytes for the upstream; stop reading if they pile up before it exists."""
        early = self.early
        early = self.early = data if early is None else early + data
        if len(early) >= EARLY_LIMIT and not self.held and self.transport is not None:
            self.held = True
            self.transport.pause_reading()

    def _upstream(self) -> UpstreamSide:
        return UpstreamSide(self)

    def _connect_timeout(self) -> None:
        """The connect timer: stop this attempt (the task moves on to the next backend)."""
        task = self.task
        if task is not None:
            self.timed_out = True
            task.cancel()

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> None:
        """Try backends round-robin, each at most once, then give up."""
        route = self.route
        tried: list[Backend] = []
        client = ""
        if route.balancer is not None and self.transport is not None:
            peer = self.transport.get_extra_info("peername")
            client = peer[0] if peer else ""
        try:
            while not self.lost:
                backend = route.pick(tried, client)
                if backend is None:
                    break
                tried.append(backend)
                # A plain timer that cancels the task: cheaper than asyncio.timeout().
                timer = loop.call_later(route.connect_timeout, self._connect_timeout)
                try:
                    if route.source_addr is None:
                        await loop.create_connection(self._upstream, backend.addr, backend.port)
                    else:
                        sock = await connect_from(loop, route.source_addr, backend)
                        await loop.create_connection(self._upstream, sock=sock)
                    failed = False
                except OSError:
                    failed = True
                except asyncio.CancelledError:
                    if not self.timed_out:
                        raise  # cancelled by the mesh (close, client gone)
                    self.timed_out = False
                    # Only our timer's cancel is absorbed: if the mesh cancelled too (close,
                    # client gone) in the same turn, a cancel request remains — honour it.
                    if self.task is not None and self.task.uncancel() > 0:
                        raise
                    failed = True
                finally:
                    timer.cancel()
                if failed:
                    route.stats.failed_connects += 1
                    route.record_failure(backend)
                    if self.peer is not None:
                        # Timed out after the upstream was wired: that socket
                        # is being closed and takes the client with it.
                        return
                    continue
                if route.health:  # only when some backend failed recently
                    route.record_success(backend)
                if route.balancer is not None:
                    route.balancer.opened(backend)
                    self.backend = backend
                peer = self.peer
                # Reading was paused only if early bytes piled up: resume it, unless the
                # client already sent EOF or the backend is already back-pressuring.
                if (
                    self.held
                    and self.transport is not None
                    and not self.lost
                    and not self.eof
                    and peer is not None
                    and not peer.blocked
                ):
                    self.held = False
                    self.transport.resume_reading()
                return
            route.stats.rejected += 1
            if self.transport is not None and not self.lost:
                self.transport.abort()
        finally:
            self.task = None

    def connection_lost(self, exc: Exception | None) -> None:
        """Update stats, drop from the registry and stop a pending connect."""
        if self.lost or self.spliced:
            return
        super().connection_lost(exc)
        self.finish()

    def finish(self) -> None:
        """The connection is over (both transports, or the spliced pair, closed)."""
        self.lost = True
        self.early = None
        # Break the client <-> upstream cycle: both are freed now, not by the cyclic GC.
        peer = self.peer
        if peer is not None:
            peer.peer = peer.out = None
            self.peer = self.out = None
        self.pair = None  # a spliced pair has let go of us (splice.SplicedPair.close)
        route = self.route
        route.stats.active -= 1
        route.registry.discard(self)
        if self.backend is not None and route.balancer is not None:
            route.balancer.closed(self.backend)
            self.backend = None
        task = self.task
        if task is not None:
            task.cancel()

    def abort(self) -> None:
        """Drop both ends immediately (used at mesh shutdown)."""
        if self.pair is not None:
            self.pair.close()
            return
        task = self.task
        if task is not None:
            task.cancel()
        peer, out = self.peer, self.out
        if peer is not None and out is not None and not peer.lost:
            out.abort()
        if self.transport is not None and not self.lost:
            self.transport.abort()


def bind_error_message(exc: OSError) -> str:
    """Render a bind failure as a short, loop-independent message."""
    # uvloop and asyncio word their exceptions differently; errno is stable.
    if exc.errno == errno.EADDRINUSE:
        return "address already in use"
    if exc.errno is not None:
        try:
            return os.strerror(exc.errno).lower()
        except ValueError:  # pragma: no cover - unknown errno
            pass
    return str(exc) or type(exc).__name__
