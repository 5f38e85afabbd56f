"""The per-node ingress routing mesh.

How this works: every node listens on every published port and forwards each
accepted TCP connection to a running task anywhere in the cluster. The daemon
owns the desired state and pushes it with :meth:`IngressMesh.apply` (a map of
published port -> backends); the data plane never reads a store. ``apply``
reconciles listeners against that map: it opens listeners for new ports,
closes listeners of removed ports (the port is free when ``apply`` returns),
and atomically swaps the backend tuple of existing ports. Per-connection work
(round-robin choice, passive failure detection that ejects backends whose
connects fail, upstream connect with retries, the bidirectional copy) lives in
:mod:`corral.dataplane.proxy`. Ejection state lives in each port's route, so it
survives ``apply`` for backends that stay listed and is forgotten for the rest.

Listeners are keyed by :class:`PublishedPort` (port + protocol) so a UDP
listener can sit beside the TCP one on the same port.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence

from corral.dataplane.balance import BalanceKind, make_balancer
from corral.dataplane.proxy import (
    OPEN,
    Backend,
    Connection,
    PortStats,
    PublishedPort,
    Route,
    TcpListener,
    bind_error_message,
    keepalive,
    listen,
)
from corral.dataplane.reactor import Reactor
from corral.dataplane.udp import UdpListener

__all__ = ["Backend", "IngressMesh", "LbPolicy", "PortStats", "PublishedPort"]

# How often connections are looked at for keepalive and idleness (or half the idle timeout).
SWEEP_PERIOD = 30.0

# A port's balancing: (strategy, client-IP affinity timeout or None, PROXY protocol version
# to send the backend: 0 for none).
LbPolicy = tuple[BalanceKind, float | None, int]
DEFAULT_POLICY: LbPolicy = ("rr", None, 0)

# Generous accept backlog: the mesh fronts whole services, and bursts of new
# connections should queue in the kernel rather than be refused.
_BACKLOG = 1024


class _UdpListener:
    """A UDP listener (flows per client) and the route its flows follow."""

    __slots__ = ("listener", "route")

    def __init__(self, listener: UdpListener, route: Route) -> None:
        self.listener = listener
        self.route = route

    def close(self) -> None:
        """Stop receiving and release the port; the flows go with it."""
        self.listener.close()


class IngressMesh:
    """The node's userspace routing mesh."""

    def __init__(self, listen_addr: str, *, connect_timeout: float = 2.0,
                 bind_source: bool = True, idle_timeout: float = 3600.0, eject_base: float = 0.5,
                 eject_max: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, reuse_port: bool = False) -> None:
        """Configure the mesh; nothing is bound until :meth:`apply`.

        With `bind_source`, upstream connections leave from `listen_addr`; without it the
        kernel picks the source (on an overlay: the node's own address on that network).

        A backend whose connect fails is ejected from rotation for
        ``min(eject_base * 2**(failures-1), eject_max)`` seconds of `clock`
        (``failures`` = consecutive failed connects; a success resets it).
        ``eject_base=0`` disables ejection.
        """
        if eject_base < 0 or eject_max < 0:
            raise ValueError("eject_base and eject_max must be >= 0")
        self._eject_base = eject_base
        self._eject_max = eject_max
        self._clock = clock
        self._listen_addr = listen_addr
        self._bind_source = bind_source
        self._reuse_port = reuse_port
        # Idle connections are closed after this long (0: never). Long by default: Swarm's
        # 900 s IPVS cut-off of idle connections is a known pain (moby#31208).
        self._idle_timeout = idle_timeout
        self._sweeper: asyncio.Task[None] | None = None
        self.stats_idle_closed = 0
        self._connect_timeout = connect_timeout
        self._listeners: dict[PublishedPort, TcpListener | _UdpListener] = {}
        # The TCP sockets' readiness set, made with the first listener (it needs the loop).
        self._reactor: Reactor | None = None
        self._policies: dict[PublishedPort, LbPolicy] = {}
        # Stats outlive listeners so counters stay monotonic if a port is
        # removed and re-added (and so draining connections can still count).
        self._stats: dict[PublishedPort, PortStats] = {}
        # Every open client connection, across all ports, for close().
        self._conns: set[Connection] = set()
        self._lock = asyncio.Lock()
        self._closed = False

    async def apply(
        self, endpoints: Mapping[PublishedPort, Sequence[Backend]],
        policies: Mapping[PublishedPort, LbPolicy] | None = None,
    ) -> dict[PublishedPort, str]:
        """Make listeners match ``endpoints`` exactly; return bind errors per port.

        ``policies`` picks a balancing strategy per port (default: round-robin).
        """
        async with self._lock:  # concurrent applies must not interleave
            if self._closed:
                raise RuntimeError("IngressMesh is closed")
            if self._sweeper is None:
                self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
            for pp in [pp for pp in self._listeners if pp not in endpoints]:
                self._listeners.pop(pp).close()
                self._policies.pop(pp, None)

            errors: dict[PublishedPort, str] = {}
            for pp, backends in endpoints.items():
                listener = self._listeners.get(pp)
                if listener is None:
                    # Ports that failed to bind last time land here again: retry.
                    err = await self._open(pp, backends)
                    if err is not None:
                        errors[pp] = err
                        continue
                    listener = self._listeners[pp]
                else:
                    listener.route.set_backends(backends)
                policy = (policies or {}).get(pp, DEFAULT_POLICY)
                if self._policies.get(pp, DEFAULT_POLICY) != policy:
                    # Built once per change of policy: a balancer keeps state (maglev table,
                    # affinity entries, connection counts).
                    kind, affinity, proxy_version = policy
                    plain = kind == "rr" and affinity is None
                    listener.route.set_balancer(None if plain else make_balancer(kind, affinity))
                    listener.route.proxy_protocol = proxy_version
                    self._policies[pp] = policy
            return errors

    async def _open(self, pp: PublishedPort, backends: Sequence[Backend]) -> str | None:
        """Bind a listener for ``pp``; return an error message instead of raising."""
        if pp.protocol not in ("tcp", "udp"):
            return f"unsupported protocol {pp.protocol!r}"
        stats = self._stats.setdefault(pp, PortStats())
        source = (self._listen_addr if self._bind_source
                  and self._listen_addr not in ("", "0.0.0.0", "::") else None)
        route = Route(stats, self._conns, self._connect_timeout, source,
                      eject_base=self._eject_base, eject_max=self._eject_max,
                      clock=self._clock)
        # Backends are set before the first accept can happen.
        route.set_backends(backends)
        if pp.protocol == "udp":
            try:
                udp = await UdpListener.open(self._listen_addr, pp.port, route,
                                             source_addr=source)
            except OSError as exc:
                return bind_error_message(exc)
            self._listeners[pp] = _UdpListener(udp, route)
            return None
        loop = asyncio.get_running_loop()
        try:
            socks = await listen(loop, self._listen_addr, pp.port, reuse_port=self._reuse_port,
                                 backlog=_BACKLOG)
        except OSError as exc:
            return bind_error_message(exc)
        if self._reactor is None:
            try:
                self._reactor = Reactor(loop)
            except OSError as exc:
                for sock in socks:
                    sock.close()
                return bind_error_message(exc)
        try:
            self._listeners[pp] = TcpListener(self._reactor, socks, route)
        except OSError as exc:  # the readiness set refused them (epoll's limits)
            for sock in socks:
                self._reactor.forget(sock.fileno())
                sock.close()
            return bind_error_message(exc)
        return None

    def listening(self) -> set[PublishedPort]:
        """Published ports that currently have a bound listener."""
        return set(self._listeners)

    def stats(self, port: PublishedPort | int) -> PortStats:
        """A snapshot of the counters of ``port``; KeyError if it was never applied."""
        pp = PublishedPort(port) if isinstance(port, int) else port
        return dataclasses.replace(self._stats[pp])

    def ejected(self, port: PublishedPort | int) -> set[Backend]:
        """Backends of ``port`` currently out of rotation after failed connects.

        Empty for a port without a listener.
        """
        pp = PublishedPort(port) if isinstance(port, int) else port
        listener = self._listeners.get(pp)
        return set() if listener is None else listener.route.ejected()

    async def _sweep(self) -> None:
        """Look at every connection now and then, never on the per-connection path.

        A connection found quiet (no read on either side since the last look) gets TCP
        keepalive towards its backend — only long-lived connections need it — and one quiet
        for the idle timeout is closed. Each look clears the sides' busy marks: a pair still
        unmarked at the next look has been quiet for at least the whole period between."""
        period = SWEEP_PERIOD
        if self._idle_timeout > 0:
            period = min(period, self._idle_timeout / 2)
        quiet_since: dict[Connection, float] = {}
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            still: dict[Connection, float] = {}
            for conn in list(self._conns):
                if conn.take_busy():
                    continue
                since = quiet_since.get(conn)
                if since is None:
                    since = now
                    if conn.state == OPEN and conn.upstream is not None:
                        keepalive(conn.upstream)  # (a spliced pair got it when it moved)
                if self._idle_timeout > 0 and now - since + period >= self._idle_timeout:
                    conn.abort()
                    self.stats_idle_closed += 1
                else:
                    still[conn] = since
            quiet_since = still

    async def close(self) -> None:
        """Close every listener and every proxied connection."""
        async with self._lock:
            self._closed = True
            if self._sweeper is not None:
                self._sweeper.cancel()
                await asyncio.gather(self._sweeper, return_exceptions=True)
                self._sweeper = None
            for listener in self._listeners.values():
                listener.close()
            self._listeners.clear()
            for conn in list(self._conns):
                conn.abort()
            if self._reactor is not None:
                self._reactor.close()
                self._reactor = None
