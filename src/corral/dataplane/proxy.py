"""TCP forwarding for the routing mesh: raw non-blocking sockets on a :class:`Reactor`.

How this works: a :class:`TcpListener` accepts a client connection and makes it a
:class:`Connection`, which connects to a backend chosen by the :class:`Route`
(round-robin over the current list, or the port's balancer; each backend tried at
most once, each attempt bounded by a timer, backends that recently failed to connect
skipped while ejected — see :class:`Route`). The client is not read while that
happens: its first bytes wait in the kernel. To a task on this node the connect is
done before ``connect()`` returns, and the client's request is read and forwarded
at once, without waiting for an event. From then on each readiness event reads
one side and sends to the other; what a socket does not take waits, and reading
its source stops until it drains (back-pressure, at most one read held per
direction). A side's EOF is passed on as a half-close; the connection closes when
both sides are done, or at once on an error on either.

The steady state -- one read, one send of it -- is done by the reactor in C where its
compiled part is built (:mod:`corral.dataplane.reactor`): a side registered for plain
reading names its peer, and its handler hears only of what C could not finish (a FIN, an
error, bytes the other side did not take, a read that filled the buffer; see
:meth:`Connection._pumped`). The Python path below does the same where it is not built.

Why not asyncio transports and protocols: for short connections their machinery
cost more than the work (two transport objects, a task and a future per upstream
connect, and extra system calls per connection): ~300 µs of CPU per new connection
against ~200 µs now. See :mod:`corral.dataplane.reactor`.

Bulk: once a read fills the whole buffer (the reactor's, 64 KiB), so one side sends
faster than we forward, and nothing is pending either way, the pair is forwarded
with ``splice(2)`` in the kernel from then on (:mod:`corral.dataplane.splice`; Linux
only; ``CORRAL_MESH_SPLICE=0`` turns it off).

Works unchanged on the stock asyncio loop and on uvloop.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from corral.dataplane import splice
from corral.dataplane.proxyproto import encode_v1, encode_v2
from corral.dataplane.reactor import ERR, HUP, IN, OUT, PUMPED, RDHUP, Reactor

if TYPE_CHECKING:
    from corral.dataplane.balance import Balancer

log = logging.getLogger(__name__)

# Proxied connections use the C-level socket type (socket.socket's base): the Python subclass
# adds object set-up and enum conversions that cost a measurable share of a short connection.
Sock = _socket.socket

__all__ = [
    "Backend",
    "BackendHealth",
    "Connection",
    "PortStats",
    "PublishedPort",
    "Route",
    "TcpListener",
    "listen",
    "open_upstream",
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
        "proxy_protocol",
    )

    def __init__(
        self,
        stats: PortStats,
        registry: set[Connection],
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


def keepalive(sock: Sock) -> None:
    """TCP keepalive towards a backend, so a vanished task is noticed on an idle connection:
    probe after 60 s of silence, every 10 s, give up after 6 unanswered probes. (The mesh sets
    it from its periodic sweep, not per connection: only long-lived connections need it.)"""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)
    except OSError:  # already reset (the pair sees it next), or a platform without them
        pass


# Splice the bulk phase of connections (Linux), unless turned off for comparison.
SPLICE = splice.available() and os.environ.get("CORRAL_MESH_SPLICE", "1") != "0"
# Connections accepted per readiness event of a listener (more wait for the next loop turn).
ACCEPT_BATCH = 64
# After running out of descriptors or memory, a listener rests this long before accepting again
# (the pending connections wait in the kernel's queue instead of spinning the loop).
ACCEPT_PAUSE = 0.5

# Linux: bind() picks only the address, connect() the port, per destination (see open_upstream).
_BIND_ADDRESS_NO_PORT: int | None = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", None)
_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
# Upstream sockets are born non-blocking where the platform allows (no ioctl afterwards).
# (Python makes every socket close-on-exec by itself.)
_NONBLOCK: int = getattr(socket, "SOCK_NONBLOCK", 0)

# Out of descriptors or memory: nobody's fault but ours, and it passes.
_NO_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Errors of our own making when opening an upstream socket (see Connection._connect_next).
_LOCAL_ERRORS = _NO_RESOURCES | {errno.EADDRNOTAVAIL}

# Connection states.
CONNECTING, OPEN, SPLICED, CLOSED = range(4)
# Interest of a descriptor that is not in the reactor's set (not yet added, or parked).
_UNWATCHED = 1 << 30
_READ = IN | RDHUP  # RDHUP: learn of the peer's FIN with the data before it
_FIN = RDHUP | HUP


def open_upstream(source: str | None, backend: Backend,
                  connect: Callable[[int, str, int, str | None], bool | None] | None = None,
                  ) -> tuple[Sock, bool]:
    """A non-blocking socket connecting to `backend` (from address `source`, if given), and
    whether the handshake is done already (always, to a task on this node). Raises OSError
    when the connect fails at once.

    Binding the address alone (IP_BIND_ADDRESS_NO_PORT, as HAProxy does) leaves the port to
    connect(), which picks one free for this very destination. A plain bind(source, 0) picks a
    port free for *every* destination: each costs a search through the ports that closed
    connections hold in TIME_WAIT (slower and slower as they pile up — at 10,000 of them new
    connections fell from ~4,000/s to under 1,000/s here) and caps the whole node at one
    connection per local port.

    ``connect``: the reactor's C version of the steps below (one call instead of five).
    """
    family = socket.AF_INET6 if ":" in backend.addr else socket.AF_INET
    sock = Sock(family, socket.SOCK_STREAM | _NONBLOCK)
    try:
        if connect is not None and _NONBLOCK:
            done = connect(sock.fileno(), backend.addr, backend.port, source)
            if done is not None:
                return sock, done
            # A name rather than an address (a listen address given as a host name): below.
        if not _NONBLOCK:
            sock.setblocking(False)
        sock.setsockopt(*_NODELAY)
        if source is not None:
            if _BIND_ADDRESS_NO_PORT is not None:
                try:  # (not contextlib.suppress: this runs for every connection)
                    sock.setsockopt(socket.IPPROTO_IP, _BIND_ADDRESS_NO_PORT, 1)
                except OSError:  # kernels before 4.2: a plain bind
                    pass
            sock.bind((source, 0))
        err = sock.connect_ex((backend.addr, backend.port))
        if err == 0:
            return sock, True
        if err != errno.EINPROGRESS:
            raise OSError(err, f"connect to {backend.addr}:{backend.port}: {os.strerror(err)}")
        return sock, _established(sock)
    except BaseException:
        sock.close()
        raise


def _established(sock: Sock) -> bool:
    """Whether a connecting socket is connected now (a peer address exists only then)."""
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


def proxy_header(version: int, client: tuple[Any, ...], local: tuple[Any, ...]) -> bytes:
    """The PROXY protocol header of a connection from `client` to our `local` address."""
    s, d = (client[0], client[1]), (local[0], local[1])
    return encode_v1(s, d) if version == 1 else encode_v2(s, d)


class Connection:
    """One proxied TCP connection: the accepted client socket and its upstream socket.

    Invariant that keeps memory bounded and makes EOF handling simple: a side is read only
    while nothing waits to be sent to the other side (``cbuf``: bytes owed to the client,
    ``ubuf``: to the upstream), so a connection holds at most one read per direction, and
    when a side's EOF is read its destination has nothing pending and can be half-closed.
    """

    __slots__ = ("route", "reactor", "client", "cfd", "peer", "upstream", "ufd", "state",
                 "tried", "backend", "counted", "timer", "cbuf", "ubuf", "ceof", "ueof",
                 "cmask", "umask", "busy", "pair")

    def __init__(self, route: Route, reactor: Reactor, client: Sock,
                 peer: tuple[Any, ...]) -> None:
        """Take an accepted, non-blocking client socket; :meth:`start` begins connecting."""
        self.route = route
        self.reactor = reactor
        self.client = client
        self.cfd = client.fileno()
        self.peer = peer  # the client's address, as accept() returned it
        self.upstream: Sock | None = None
        self.ufd = -1
        self.state = CONNECTING
        self.tried: list[Backend] = []
        self.backend: Backend | None = None  # the one being connected to, or connected
        self.counted: Balancer | None = None  # the balancer told of this connection
        self.timer: asyncio.TimerHandle | None = None  # the running connect attempt's limit
        self.cbuf: bytes | None = None
        self.ubuf: bytes | None = None
        self.ceof = False  # the client sent EOF
        self.ueof = False  # the upstream sent EOF
        self.cmask = _UNWATCHED  # what each descriptor is watched for
        self.umask = _UNWATCHED
        # Set on every read Python does, cleared by the mesh's idle sweep: one store on the
        # hot path instead of a clock read or a timer per connection (reads forwarded in C
        # mark the reactor instead; take_busy() looks at both).
        self.busy = True
        self.pair: splice.SplicedPair | None = None  # the bulk phase (see _to_splice)

    # -- connecting

    def start(self) -> None:
        """Count the connection and connect upstream.

        The client is not read until the upstream exists: its first bytes wait in the
        kernel, which costs us nothing however many arrive. While a connect is pending it is
        watched for errors only, so a client that resets is let go at once.
        """
        route = self.route
        stats = route.stats
        stats.total += 1
        stats.active += 1
        route.registry.add(self)
        self._connect_next()

    def _connect_next(self) -> None:
        """Try the next backend (round-robin or the port's balancer), each at most once."""
        route = self.route
        while self.state == CONNECTING:
            backend = route.pick(self.tried, self.peer[0] if route.balancer is not None else "")
            if backend is None:
                route.stats.rejected += 1
                self.abort()
                return
            self.tried.append(backend)
            self.backend = backend
            try:
                sock, done = open_upstream(route.source_addr, backend, self.reactor.connect)
            except OSError as exc:
                if exc.errno in _LOCAL_ERRORS:
                    # Our own trouble (no descriptors, no memory, the source address gone):
                    # not the backend's fault, so no ejection and no other backend to try.
                    route.stats.rejected += 1
                    self.abort()
                    return
                self._failed()
                continue
            self.upstream = sock
            self.ufd = sock.fileno()
            if done:
                self._connected()
                return
            if self.cmask == _UNWATCHED:
                self._watch(True, 0)
            self._watch(False, OUT)
            self.timer = self.reactor.loop.call_later(route.connect_timeout, self._timed_out)
            return

    def _connecting_event(self) -> None:
        """The upstream socket is writable or failed: the handshake is over, one way or the
        other (or the event is stale: the socket is still connecting)."""
        sock = self.upstream
        assert sock is not None
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self._drop_upstream()
            self._failed()
            self._connect_next()
        elif _established(sock):
            self._connected()

    def _timed_out(self) -> None:
        """The connect attempt took too long: the next backend."""
        self.timer = None
        if self.state == CONNECTING:
            self._drop_upstream()
            self._failed()
            self._connect_next()

    def _failed(self) -> None:
        """A connect to ``self.backend`` failed: count it and eject the backend for a while."""
        backend = self.backend
        assert backend is not None
        self.route.stats.failed_connects += 1
        self.route.record_failure(backend)

    def _connected(self) -> None:
        """Upstream connected: start forwarding, first what the client already sent."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        route = self.route
        backend = self.backend
        assert backend is not None
        if route.health:  # only when some backend failed recently
            route.record_success(backend)
        balancer = route.balancer
        if balancer is not None:
            balancer.opened(backend)
            self.counted = balancer
        self.state = OPEN
        version = route.proxy_protocol
        if version:
            # The task learns the real client address from a PROXY protocol header, sent
            # before any of the client's bytes.
            header = proxy_header(version, self.peer, self.client.getsockname())
            if not self._send(False, header):
                return  # parked until the upstream drains (or aborted)
        self._arm()
        # The request is usually there already: forward it now, without waiting for an event.
        forward = self.reactor.forward
        if forward is None:
            self._pump(True, 0)
        elif self.cmask == _READ and (left := forward(self.cfd, self.ufd)) is not None:
            self.reactor.got, self.reactor.rest = left
            self._pumped(True)

    # -- forwarding

    def _client_event(self, events: int) -> None:
        """The client socket is ready: nearly always, data to forward (tested first)."""
        if self.cmask == _READ and not events & (ERR | HUP | PUMPED):
            self._pump(True, events & RDHUP)
        elif events & PUMPED:
            self._pumped(True)
        else:
            self._event(True, events)

    def _upstream_event(self, events: int) -> None:
        """The upstream socket is ready: data to forward, or the connect is over."""
        if self.umask == _READ and not events & (ERR | HUP | PUMPED):
            self._pump(False, events & RDHUP)
        elif events & PUMPED:
            self._pumped(False)
        elif self.state == CONNECTING:
            self._connecting_event()
        else:
            self._event(False, events)

    def _pumped(self, from_client: bool) -> None:
        """The reactor's C forwarding read this side and left the rest to us (the read's
        outcome is in ``reactor.got`` and ``reactor.rest``; see corral.dataplane.reactor)."""
        reactor = self.reactor
        got, rest = reactor.got, reactor.rest
        if got > 0:
            self.busy = True
            if rest is None:  # the send failed
                self.abort()
            elif rest:
                self._hold(not from_client, rest)
            elif SPLICE:  # the read filled the buffer: the sender is ahead of us
                reactor.loop.call_soon(self._to_splice)
        elif got == 0:
            self._eof(from_client)
        else:  # the read failed: a reset
            self.abort()

    def _event(self, client: bool, events: int) -> None:
        """Everything but plain reading: errors, hang-ups, room to send again."""
        state = self.state
        if events & ERR:
            if state == OPEN and not (self.ceof if client else self.ueof):
                # A reset (say, a backend that answered and closed without reading the whole
                # request): what it sent before the reset is still readable and goes on first;
                # the read after it fails and closes both sides.
                if (self.ubuf if client else self.cbuf) is None:
                    self._pump(client, ERR)
                else:
                    self._park(client)  # read once the other side has drained
                return
            self.abort()  # nothing more can be forwarded
            return
        if state != OPEN:
            if events & HUP and state == CONNECTING:
                self.abort()  # the client is gone before we got an upstream
            return
        if events & OUT and (self.cbuf if client else self.ubuf) is not None:
            self._flush(client)
            if self.state != OPEN:
                return
        if (self.cmask if client else self.umask) & IN:
            self._pump(client, events & _FIN)
        elif events & HUP:
            self._park(client)

    def _pump(self, from_client: bool, fin: int) -> None:
        """Forward what one side has to the other; ``fin``: its FIN is behind the data, so read
        on to the EOF now rather than wait for another event."""
        upstream = self.upstream
        assert upstream is not None
        src, dst = (self.client, upstream) if from_client else (upstream, self.client)
        view = self.reactor.buffer  # one read at a time, so one buffer for all connections
        while True:
            try:
                n = src.recv_into(view)
            except BlockingIOError:  # a stale event
                return
            except OSError:
                self.abort()
                return
            if n == 0:
                self._eof(from_client)
                return
            self.busy = True
            try:
                sent = dst.send(view[:n])
            except BlockingIOError:
                sent = 0
            except OSError:
                self.abort()
                return
            if sent != n:
                self._hold(not from_client, bytes(view[sent:n]))
                return
            if n == len(view):  # the read filled the buffer: the sender is ahead of us
                if SPLICE:
                    self.reactor.loop.call_soon(self._to_splice)  # (see _to_splice)
                return
            if not fin:
                return

    def _send(self, to_client: bool, data: bytes) -> bool:
        """Send `data`; what the socket does not take waits (see _hold)."""
        sock = self.client if to_client else self.upstream
        assert sock is not None
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.abort()
            return False
        if sent == len(data):
            return True
        self._hold(to_client, data[sent:])
        return False

    def _hold(self, to_client: bool, rest: bytes) -> None:
        """Keep what a socket did not take, and stop reading its source until it drains."""
        if to_client:
            self.cbuf = rest
        else:
            self.ubuf = rest
        self._arm()

    def _flush(self, to_client: bool) -> None:
        """The socket has room again: send what waited, and read its source again."""
        if to_client:
            data, self.cbuf = self.cbuf, None
        else:
            data, self.ubuf = self.ubuf, None
        if data is not None and self._send(to_client, data):
            self._arm()

    def _eof(self, from_client: bool) -> None:
        """One side is done sending: pass the half-close on, or close when both are done."""
        if from_client:
            self.ceof = True
            dst = self.upstream
        else:
            self.ueof = True
            dst = self.client
        if self.ceof and self.ueof:
            self.abort()  # nothing is pending (see the class docstring): a clean close
            return
        assert dst is not None
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            self.abort()
            return
        self._arm()

    def _arm(self) -> None:
        """Watch each socket for what the connection needs from it now."""
        # A parked socket (out of the set) stays out until something is wanted of it.
        want = (0 if self.ceof or self.ubuf is not None else _READ) | (
            0 if self.cbuf is None else OUT)
        if want != self.cmask and (want or self.cmask != _UNWATCHED):
            self._watch(True, want)
        want = (0 if self.ueof or self.cbuf is not None else _READ) | (
            0 if self.ubuf is None else OUT)
        if want != self.umask and (want or self.umask != _UNWATCHED):
            self._watch(False, want)

    def _watch(self, client: bool, events: int) -> None:
        """Set one descriptor's interest, adding it to the reactor's set if it is not there."""
        if client:
            fd, was, handler, peer = self.cfd, self.cmask, self._client_event, self.ufd
        else:
            fd, was, handler, peer = self.ufd, self.umask, self._upstream_event, self.cfd
        if events != _READ:
            peer = -1  # only plain reading may be forwarded by the reactor itself
        if was == _UNWATCHED:
            self.reactor.register(fd, events, handler, peer)
        else:
            self.reactor.modify(fd, events, peer)
        if client:
            self.cmask = events
        else:
            self.umask = events

    def _park(self, client: bool) -> None:
        """Take a socket that is not being read out of the set until it is wanted again.

        Hang-ups are reported whatever the interest: a side that hung up while we wait for
        the other side to drain would otherwise wake the loop over and over.
        """
        if client:
            self.reactor.unregister(self.cfd)
            self.cmask = _UNWATCHED
        else:
            self.reactor.unregister(self.ufd)
            self.umask = _UNWATCHED

    def _to_splice(self) -> None:
        """Bulk traffic: hand both sockets to a SplicedPair, unless something is pending.

        Called soon after the read that asked for it, never from inside a batch of events:
        with the forwarding in C, an event of the other side later in the same batch may
        carry bytes C has read already, which the move would strand (its handler is gone).
        """
        upstream = self.upstream
        if (self.state != OPEN or upstream is None or self.ceof or self.ueof
                or self.cbuf is not None or self.ubuf is not None):
            return  # not now: maybe at the next large read
        for fd, mask in ((self.cfd, self.cmask), (self.ufd, self.umask)):
            if mask != _UNWATCHED:
                self.reactor.unregister(fd)
        self.cmask = self.umask = _UNWATCHED
        self.state = SPLICED
        keepalive(upstream)  # the sweep no longer sees this upstream socket
        self.pair = splice.SplicedPair(self.reactor.loop, self.client, upstream,
                                       self.mark_busy, self.finish)

    def take_busy(self) -> bool:
        """Whether either side had traffic since the last look (for the idle sweep, which
        this clears)."""
        busy, self.busy = self.busy, False
        if self.state == OPEN and self.reactor.take_busy(self.cfd, self.ufd):
            return True
        return busy

    def mark_busy(self) -> None:
        """Activity on a spliced pair (for the idle sweep)."""
        self.busy = True

    # -- the end

    def _drop_upstream(self) -> None:
        """Close the upstream socket (a failed attempt, or the end)."""
        sock = self.upstream
        if sock is None:
            return
        self.upstream = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.umask != _UNWATCHED:
            self.reactor.forget(self.ufd)
        self.umask = _UNWATCHED
        sock.close()

    def abort(self) -> None:
        """Close both sockets now: the end of a finished connection, an error on either
        side, an idle timeout or the mesh's shutdown (idempotent)."""
        state = self.state
        if state == CLOSED:
            return
        if state == SPLICED and self.pair is not None:
            self.pair.close()  # closes both sockets and calls finish()
            return
        self._drop_upstream()
        if self.cmask != _UNWATCHED:
            self.reactor.forget(self.cfd)
        self.cmask = _UNWATCHED
        self.client.close()
        self.finish()

    def finish(self) -> None:
        """The connection is over (its sockets, or its spliced pair's, are closed)."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self.cbuf = self.ubuf = None
        self.pair = None  # a spliced pair has let go of us (splice.SplicedPair.close)
        route = self.route
        route.stats.active -= 1
        route.registry.discard(self)
        counted = self.counted
        if counted is not None:
            self.counted = None
            assert self.backend is not None
            counted.closed(self.backend)


class TcpListener:
    """A bound TCP listener: every accepted connection becomes a :class:`Connection`."""

    __slots__ = ("route", "reactor", "socks", "closed")

    def __init__(self, reactor: Reactor, socks: Sequence[socket.socket], route: Route) -> None:
        """Start accepting on `socks` (bound and listening) for `route`."""
        self.route = route
        self.reactor = reactor
        self.socks = list(socks)
        self.closed = False
        for sock in self.socks:
            sock.setblocking(False)
            self._resume(sock)

    def _resume(self, sock: socket.socket) -> None:
        if not self.closed:
            family = int(sock.family)  # an int: the enum conversion costs more than the accept
            self.reactor.register(sock.fileno(), IN, lambda _events: self._accept(sock, family))

    def _accept(self, lsock: socket.socket, family: int) -> None:
        route, reactor = self.route, self.reactor
        fast_accept, lfd = reactor.accept, lsock.fileno()
        for _ in range(ACCEPT_BATCH):
            try:
                if fast_accept is not None:
                    got = fast_accept(lfd)
                    if got is None:
                        return
                    fd, peer = got
                else:
                    # The C-level accept: socket.accept() adds a Python-level socket object,
                    # enum conversions and a timeout check per connection, as much again.
                    fd, peer = lsock._accept()  # type: ignore[attr-defined]
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _NO_RESOURCES:
                    # Out of descriptors or memory: the queue waits in the kernel meanwhile.
                    log.warning("mesh: cannot accept on %s: %s; pausing %.1f s",
                                lsock.getsockname(), exc.strerror, ACCEPT_PAUSE)
                    reactor.unregister(lsock.fileno())
                    reactor.loop.call_later(ACCEPT_PAUSE, self._resume, lsock)
                    return
                continue  # that client is gone already (ECONNABORTED and the like)
            if fast_accept is not None:
                # Non-blocking and NODELAY already; the flag tells Python so (no ioctl).
                sock = Sock(family, socket.SOCK_STREAM | _NONBLOCK, 0, fd)
            else:
                sock = Sock(family, socket.SOCK_STREAM, 0, fd)
                try:
                    sock.setblocking(False)
                    sock.setsockopt(*_NODELAY)
                except OSError:
                    sock.close()
                    continue
            conn = Connection(route, reactor, sock, peer)
            try:
                conn.start()
            except OSError as exc:  # the readiness set is full (epoll's max_user_watches)
                log.warning("mesh: dropping a connection on %s: %s", lsock.getsockname(), exc)
                conn.abort()

    def close(self) -> None:
        """Stop accepting and release the port; established connections live on."""
        if self.closed:
            return
        self.closed = True
        # No new connections, and no retries of in-flight connects either.
        self.route.set_backends(())
        for sock in self.socks:
            self.reactor.forget(sock.fileno())
            sock.close()


async def listen(loop: asyncio.AbstractEventLoop, host: str | None, port: int, *,
                 reuse_port: bool = False, backlog: int = 1024) -> list[socket.socket]:
    """Listening sockets on every address `host` names ("" or None: all of them), as
    ``loop.create_server`` binds them (IPv6 sockets are IPv6-only). Raises OSError."""
    infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    error = OSError(errno.EADDRNOTAVAIL, f"no address to listen on for {host!r}")
    try:
        for family, type_, proto, _, addr in dict.fromkeys(infos):
            try:
                sock = socket.socket(family, type_, proto)
            except OSError as exc:  # a family this host lacks (IPv6 disabled): skip it
                error = exc
                continue
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                # Several mesh processes (--mesh-workers) share each port; the kernel spreads
                # new connections over them.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
        if not socks:
            raise error
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


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
