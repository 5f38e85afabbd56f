"""UDP forwarding: flows per client address, re-picks, ICMP refusals, idle expiry, close."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import pytest

from corral.dataplane.balance import LeastConn
from corral.dataplane.proxy import Backend, PortStats, Route
from corral.dataplane.udp import UdpListener
from corral.testing.polling import until

Run = Callable[[Callable[[], Awaitable[None]]], None]
LOCAL = "127.0.0.1"


class Echo(asyncio.DatagramProtocol):
    """A backend that answers every datagram with its own id."""

    def __init__(self, ident: bytes) -> None:
        self.ident = ident
        self.received = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.received += 1
        assert self.transport is not None
        self.transport.sendto(self.ident, addr)


class Client(asyncio.DatagramProtocol):
    """A client on its own source port that queues (reply, sender) pairs."""

    def __init__(self) -> None:
        self.replies: asyncio.Queue[tuple[bytes, tuple[Any, ...]]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.replies.put_nowait((data, addr))

    async def ask(self, to: tuple[Any, ...], data: bytes = b"ping",
                  timeout: float = 2.0) -> tuple[bytes, tuple[Any, ...]]:
        """Send one datagram and wait for one reply."""
        assert self.transport is not None
        self.transport.sendto(data, to)
        async with asyncio.timeout(timeout):
            return await self.replies.get()


@contextlib.asynccontextmanager
async def echoes(*idents: str) -> AsyncIterator[tuple[list[Backend], list[Echo]]]:
    """UDP echo backends on loopback, closed on exit."""
    loop = asyncio.get_running_loop()
    backends: list[Backend] = []
    protos: list[Echo] = []
    transports = []
    try:
        for ident in idents:
            tr, proto = await loop.create_datagram_endpoint(
                functools.partial(Echo, ident.encode()), local_addr=(LOCAL, 0))
            transports.append(tr)
            protos.append(proto)
            backends.append(Backend(LOCAL, tr.get_extra_info("sockname")[1], ident))
        yield backends, protos
    finally:
        for tr in transports:
            tr.close()


@contextlib.asynccontextmanager
async def clients(n: int) -> AsyncIterator[list[Client]]:
    """``n`` clients, each on its own loopback source port."""
    loop = asyncio.get_running_loop()
    made: list[Client] = []
    try:
        for _ in range(n):
            _, proto = await loop.create_datagram_endpoint(Client, local_addr=(LOCAL, 0))
            made.append(proto)
        yield made
    finally:
        for c in made:
            if c.transport is not None:
                c.transport.close()


def make_route(backends: list[Backend]) -> Route:
    route = Route(PortStats(), set(), 1.0)
    route.set_backends(backends)
    return route


def free_udp_port() -> int:
    """A loopback UDP port nobody listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOCAL, 0))
        return cast(int, s.getsockname()[1])


def test_round_robin_flows_stick_and_reply_from_listener(run: Run) -> None:
    async def scenario() -> None:
        async with echoes("a", "b", "c") as (backends, _):
            route = make_route(backends)
            lst = await UdpListener.open(LOCAL, 0, route)
            try:
                addr = lst.sockname
                async with clients(6) as cs:
                    first = []
                    for c in cs:
                        data, sender = await c.ask(addr)
                        assert sender[:2] == addr[:2]  # replies come from the published address
                        first.append(data)
                    assert Counter(first) == {b"a": 2, b"b": 2, b"c": 2}
                    for _ in range(3):  # each client keeps its backend
                        for c, want in zip(cs, first):
                            data, sender = await c.ask(addr)
                            assert (data, sender[:2]) == (want, addr[:2])
                    assert lst.flows == 6
                    assert (route.stats.total, route.stats.active) == (6, 6)
            finally:
                lst.close()
            assert lst.flows == 0 and route.stats.active == 0

    run(scenario)


def test_removed_backend_moves_its_clients_on_next_datagram(run: Run) -> None:
    async def scenario() -> None:
        async with echoes("a", "b") as (backends, protos), clients(2) as (c1, c2):
            route = make_route(backends)
            lst = await UdpListener.open(LOCAL, 0, route)
            try:
                addr = lst.sockname
                assert (await c1.ask(addr))[0] == b"a"
                assert (await c2.ask(addr))[0] == b"b"
                route.set_backends(backends[:1])  # "b" leaves
                seen_by_b = protos[1].received
                assert (await c2.ask(addr))[0] == b"a"
                assert (await c1.ask(addr))[0] == b"a"
                assert (await c2.ask(addr))[0] == b"a"
                assert protos[1].received == seen_by_b  # no new traffic to the removed one
                assert (lst.flows, route.stats.total, route.stats.active) == (2, 3, 2)
            finally:
                lst.close()

    run(scenario)


def test_refused_backend_is_ejected_and_client_retry_goes_elsewhere(run: Run) -> None:
    async def scenario() -> None:
        async with echoes("alive") as (alive, _), clients(1) as (c,):
            dead = Backend(LOCAL, free_udp_port(), "dead")
            route = make_route([dead, *alive])
            lst = await UdpListener.open(LOCAL, 0, route)
            try:
                addr = lst.sockname
                reply = None
                for _ in range(20):  # the client retries until answered
                    try:
                        reply = await c.ask(addr, timeout=0.1)
                        break
                    except TimeoutError:
                        continue
                assert reply is not None and reply[0] == b"alive"
                assert route.stats.failed_connects >= 1
                assert dead in route.ejected()
                assert route.stats.total >= 2  # the refused flow was dropped and re-picked
                assert lst.flows == 1 and route.stats.active == 1
                # Later datagrams stay on the live backend.
                assert (await c.ask(addr))[0] == b"alive"
            finally:
                lst.close()

    run(scenario)


def test_idle_flows_expire(run: Run) -> None:
    async def scenario() -> None:
        async with echoes("a") as (backends, _), clients(3) as cs:
            route = make_route(backends)
            lst = await UdpListener.open(LOCAL, 0, route, idle_timeout=0.2)
            try:
                addr = lst.sockname
                for c in cs:
                    await c.ask(addr)
                assert lst.flows == 3
                # A flow that keeps talking outlives the timeout.
                for _ in range(6):
                    await cs[0].ask(addr)
                    await asyncio.sleep(0.05)
                assert lst.flows == 1 and route.stats.total == 3
                await until(lambda: lst.flows == 0)
                assert route.stats.active == 0
                await cs[0].ask(addr)  # a new flow after expiry
                assert (lst.flows, route.stats.total) == (1, 4)
            finally:
                lst.close()

    run(scenario)


def test_max_flows_drops_least_recently_active(run: Run) -> None:
    async def scenario() -> None:
        async with echoes("a") as (backends, _), clients(3) as (c1, c2, c3):
            route = make_route(backends)
            lst = await UdpListener.open(LOCAL, 0, route, max_flows=2)
            try:
                addr = lst.sockname
                await c1.ask(addr)
                await c2.ask(addr)
                await c1.ask(addr)  # c2 is now the least recently active
                await c3.ask(addr)
                assert lst.flows == 2 and route.stats.total == 3
                await c1.ask(addr)  # still has its flow
                assert route.stats.total == 3
                await c2.ask(addr)  # was dropped: a new flow
                assert route.stats.total == 4 and route.stats.active == 2
            finally:
                lst.close()

    run(scenario)


def test_balancer_counts_flows(run: Run) -> None:
    async def scenario() -> None:
        async with echoes("a", "b") as (backends, _), clients(3) as cs:
            route = make_route(backends)
            lc = LeastConn()
            route.set_balancer(lc)
            lst = await UdpListener.open(LOCAL, 0, route)
            try:
                addr = lst.sockname
                got = [(await c.ask(addr))[0] for c in cs]
                assert sorted(got) == [b"a", b"a", b"b"]
                assert lc.active(backends[0]) + lc.active(backends[1]) == 3
            finally:
                lst.close()
            assert lc.active(backends[0]) == lc.active(backends[1]) == 0

    run(scenario)


def test_no_backends_drops_and_counts_rejected(run: Run) -> None:
    async def scenario() -> None:
        async with clients(1) as (c,):
            route = make_route([])
            lst = await UdpListener.open(LOCAL, 0, route)
            try:
                with pytest.raises(TimeoutError):
                    await c.ask(lst.sockname, timeout=0.1)
                assert route.stats.rejected == 1 and lst.flows == 0
            finally:
                lst.close()

    run(scenario)


def test_close_frees_port_at_once_and_bind_errors_raise(run: Run) -> None:
    async def scenario() -> None:
        async with echoes("a") as (backends, _), clients(2) as cs:
            route = make_route(backends)
            lst = await UdpListener.open(LOCAL, 0, route)
            port = lst.sockname[1]
            with pytest.raises(OSError):
                await UdpListener.open(LOCAL, port, make_route(backends))
            for c in cs:
                await c.ask(lst.sockname)
            assert lst.flows == 2
            lst.close()
            assert lst.flows == 0 and route.stats.active == 0
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((LOCAL, port))  # free without a loop turn
            lst.close()  # idempotent
            again = await UdpListener.open(LOCAL, port, route)
            again.close()

    run(scenario)


def test_invalid_arguments() -> None:
    route = make_route([])
    with pytest.raises(ValueError):
        asyncio.run(UdpListener.open(LOCAL, 0, route, idle_timeout=0))
    with pytest.raises(ValueError):
        asyncio.run(UdpListener.open(LOCAL, 0, route, max_flows=0))
