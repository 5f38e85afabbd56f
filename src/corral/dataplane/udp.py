"""UDP forwarding for the routing mesh: one flow (connected upstream socket) per client address.

A :class:`UdpListener` binds a published port. The first datagram from a new
client address creates a flow: the port's :class:`~corral.dataplane.proxy.Route`
picks a backend and a UDP socket connected to it is opened. Client datagrams go
out on that socket; backend replies go back through the listening socket, so the
client sees them come from the published address. Flows are kept in
least-recently-active order: one sweep task drops those idle for ``idle_timeout``,
and the least recently active is dropped when ``max_flows`` would be exceeded.
A flow whose backend left the route is re-picked on the client's next datagram.
An ICMP port unreachable from a backend counts as a failed connect (ejection,
see :class:`~corral.dataplane.proxy.Route`) and drops the flow, so the client's
next datagram (its retry) goes to another backend. Works on asyncio and uvloop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, cast

from corral.dataplane.proxy import Backend, Route

if TYPE_CHECKING:
    from corral.dataplane.balance import Balancer

__all__ = ["UdpListener"]

# A client address as the loop reports it: (ip, port) or, for IPv6, (ip, port, flow, scope).
Address = tuple[Any, ...]

# Datagrams held per flow while its upstream socket is being opened (more are dropped).
_MAX_PENDING = 64
# Client datagrams read per readiness callback.
_READ_BATCH = 32
# Largest UDP payload (IPv4 limit; IPv6 jumbograms are not forwarded whole).
_MAX_DATAGRAM = 65535
# Floor of the sweep period, so a tiny idle_timeout does not spin the loop.
_MIN_SWEEP = 0.01


class _Flow(asyncio.DatagramProtocol):
    """One client address bound to one backend through a connected UDP socket."""

    __slots__ = (
        "listener", "client", "backend", "balancer", "transport", "pending",
        "last", "checked", "replied", "closed", "blocked", "task",
    )

    def __init__(self, listener: UdpListener, client: Address, backend: Backend,
                 balancer: Balancer | None, now: float, checked: tuple[Backend, ...]) -> None:
        """Start a flow whose socket is not open yet."""
        self.listener = listener
        self.client = client
        self.backend = backend
        # The balancer told about this flow (told again when it ends, even if replaced since).
        self.balancer = balancer
        self.transport: asyncio.DatagramTransport | None = None
        # Client datagrams that arrived before the socket was open.
        self.pending: list[bytes] | None = []
        self.last = now  # time of the last datagram in either direction
        # The route's backend tuple this flow's backend was last found in (identity check).
        self.checked = checked
        self.replied = False  # the backend has answered at least once
        self.closed = False
        self.blocked = False  # the upstream socket's send buffer is full: drop
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send what the client sent while the socket was being opened."""
        # cast, not isinstance: uvloop's transports do not subclass asyncio's.
        transport = cast(asyncio.DatagramTransport, transport)
        if self.closed:
            transport.close()
            return
        self.transport = transport
        pending, self.pending = self.pending, None
        if pending:
            for data in pending:
                if self.closed:  # refused while flushing (asyncio reports it from sendto)
                    break
                transport.sendto(data)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        """Relay a backend reply to the client from the listening socket."""
        if self.closed:
            return
        listener = self.listener
        self.last = time.monotonic()
        listener._flows.move_to_end(self.client)
        if not self.replied:
            self.replied = True
            route = listener._route
            if route.health:  # only when some backend failed recently
                route.record_success(self.backend)
        sock = listener._sock
        if sock is not None:
            try:
                sock.sendto(data, self.client)
            except OSError:  # full send buffer (or a vanished client): drop, as UDP may
                pass

    def error_received(self, exc: Exception) -> None:
        """ICMP port unreachable: count a failed connect and drop the flow."""
        if not self.closed and isinstance(exc, ConnectionRefusedError):
            self.listener._refused(self)

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the flow if its socket went away on its own."""
        if not self.closed:
            self.listener._drop(self)

    def pause_writing(self) -> None:
        """Send buffer full: drop client datagrams until it drains."""
        self.blocked = True

    def resume_writing(self) -> None:
        """Send buffer drained: forward again."""
        self.blocked = False


class UdpListener:
    """Forwards datagrams from clients to backends and back, one flow per client address."""

    __slots__ = (
        "_route", "_idle", "_max_flows", "_source", "_loop", "_sock", "_flows", "_closed",
        "_sweeper",
    )

    def __init__(self, route: Route, idle_timeout: float, max_flows: int,
                 source_addr: str | None) -> None:
        """Set up state; use :meth:`open` to create a bound listener."""
        if idle_timeout <= 0:
            raise ValueError("idle_timeout must be > 0")
        if max_flows < 1:
            raise ValueError("max_flows must be >= 1")
        self._route = route
        self._idle = idle_timeout
        self._max_flows = max_flows
        self._source = source_addr
        self._loop: asyncio.AbstractEventLoop | None = None
        # The listening socket, read with add_reader rather than wrapped in a transport:
        # closing a datagram transport releases the port only a loop turn later.
        self._sock: socket.socket | None = None
        # Client address -> flow, least recently active first.
        self._flows: OrderedDict[Address, _Flow] = OrderedDict()
        self._closed = False
        self._sweeper: asyncio.Task[None] | None = None
        # (addr, port) keys of the route's backend tuple last seen (rebuilt when it changes).

    @classmethod
    async def open(cls, listen_addr: str, port: int, route: Route, *,
                   idle_timeout: float = 30.0, max_flows: int = 65536,
                   source_addr: str | None = None) -> UdpListener:
        """Bind ``listen_addr:port`` and start forwarding; raises OSError on bind failure."""
        self = cls(route, idle_timeout, max_flows, source_addr)
        loop = asyncio.get_running_loop()
        host = listen_addr or "0.0.0.0"
        try:
            family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
            addr: Address = (host, port)
        except ValueError:  # a name, not a literal address
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM,
                                           flags=socket.AI_PASSIVE)
            family, addr = infos[0][0], infos[0][4]
        # No SO_REUSEADDR: on UDP it would let a second socket share the port.
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(addr)
            loop.add_reader(sock.fileno(), self._read_ready)
        except BaseException:
            sock.close()
            raise
        self._loop, self._sock = loop, sock
        self._sweeper = loop.create_task(self._sweep())
        return self

    @property
    def flows(self) -> int:
        """Number of flows (client addresses) currently tracked."""
        return len(self._flows)

    @property
    def sockname(self) -> Address:
        """The bound address of the listening socket (its port, when opened with port 0)."""
        if self._sock is None:
            raise RuntimeError("UdpListener is closed")
        return cast(Address, self._sock.getsockname())

    def close(self) -> None:
        """Stop listening (port free at once) and close every flow socket."""
        if self._closed:
            return
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        sock, self._sock = self._sock, None
        if sock is not None:
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.remove_reader(sock.fileno())
            sock.close()
        for flow in list(self._flows.values()):
            self._drop(flow)

    # --- internals -------------------------------------------------------------------

    def _read_ready(self) -> None:
        """Read a batch of client datagrams (bounded, so other callbacks get their turn)."""
        sock = self._sock
        for _ in range(_READ_BATCH):
            if sock is None or self._closed:
                return
            try:
                data, addr = sock.recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # a pending socket error: reported once, then cleared
                continue
            self._from_client(data, addr)

    def _from_client(self, data: bytes, addr: Address) -> None:
        """Forward one client datagram on its flow, creating or re-picking the flow."""
        flow = self._flows.get(addr)
        route = self._route
        if flow is not None:
            backends = route.backends
            if flow.checked is not backends:
                if not route.lists(flow.backend):
                    self._drop(flow)
                    flow = None
                else:
                    flow.checked = backends
        if flow is None:
            if self._closed:
                return
            flow = self._new_flow(addr)
            if flow is None:
                return
        else:
            flow.last = time.monotonic()
            self._flows.move_to_end(addr)
        transport = flow.transport
        if transport is not None:
            if not flow.blocked:
                transport.sendto(data)
        elif flow.pending is not None and len(flow.pending) < _MAX_PENDING:
            flow.pending.append(data)

    def _new_flow(self, addr: Address) -> _Flow | None:
        """Pick a backend for a new client and start opening its socket."""
        route = self._route
        backend = route.pick((), str(addr[0]))
        if backend is None:
            route.stats.rejected += 1
            return None
        flows = self._flows
        while len(flows) >= self._max_flows:
            self._drop(next(iter(flows.values())))  # the least recently active
        balancer = route.balancer
        if balancer is not None:
            balancer.opened(backend)
        flow = _Flow(self, addr, backend, balancer, time.monotonic(), route.backends)
        flows[addr] = flow
        route.stats.total += 1
        route.stats.active += 1
        flow.task = asyncio.get_running_loop().create_task(self._connect(flow))
        return flow

    async def _connect(self, flow: _Flow) -> None:
        """Open the flow's UDP socket connected to its backend."""
        backend = flow.backend
        loop = asyncio.get_running_loop()
        try:
            await loop.create_datagram_endpoint(
                lambda: flow,
                remote_addr=(backend.addr, backend.port),
                local_addr=(self._source, 0) if self._source else None,
            )
        except OSError:
            flow.task = None  # so _drop does not cancel this very task
            route = self._route
            route.stats.failed_connects += 1
            route.record_failure(backend)
            self._drop(flow)
        finally:
            flow.task = None

    def _refused(self, flow: _Flow) -> None:
        """The backend's port is closed: eject it (passively) and drop the flow."""
        route = self._route
        route.stats.failed_connects += 1
        route.record_failure(flow.backend)
        self._drop(flow)

    def _drop(self, flow: _Flow) -> None:
        """Forget a flow and close its socket."""
        if flow.closed:
            return
        flow.closed = True
        flow.pending = None
        if self._flows.get(flow.client) is flow:
            del self._flows[flow.client]
        self._route.stats.active -= 1
        if flow.balancer is not None:
            flow.balancer.closed(flow.backend)
        task, flow.task = flow.task, None
        if task is not None:
            task.cancel()
        transport, flow.transport = flow.transport, None
        if transport is not None:
            transport.close()

    async def _sweep(self) -> None:
        """Every quarter idle timeout, drop flows idle for the whole timeout."""
        idle = self._idle
        flows = self._flows
        while True:
            await asyncio.sleep(max(idle / 4, _MIN_SWEEP))
            deadline = time.monotonic() - idle
            while flows:
                oldest = next(iter(flows.values()))
                if oldest.last > deadline:
                    break
                self._drop(oldest)
