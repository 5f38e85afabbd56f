"""Per-connection forwarding: backend choice, connect retries, early data."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from corral.dataplane import reactor as reactor_module
from corral.dataplane import splice
from corral.dataplane.proxy import (
    CONNECTING,
    OPEN,
    Backend,
    PortStats,
    Route,
    TcpListener,
    bind_error_message,
    listen,
    open_upstream,
)
from corral.dataplane.reactor import Reactor
from corral.testing.polling import until

Scenario = Callable[[], Awaitable[None]]


A, B, C = (Backend("127.0.0.1", p) for p in (1001, 1002, 1003))


def make_route(backends: list[Backend], timeout: float = 1.0, **kw: Any) -> Route:
    route = Route(PortStats(), set(), timeout, **kw)
    route.set_backends(backends)
    return route


class FakeClock:
    """A monotonic clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --- backend choice (pure) -------------------------------------------------


def test_pick_round_robin() -> None:
    route = make_route([A, B, C])
    assert [route.pick(()) for _ in range(7)] == [A, B, C, A, B, C, A]


def test_pick_skips_tried_and_gives_up() -> None:
    route = make_route([A, B, C])
    tried: list[Backend] = []
    while (b := route.pick(tried)) is not None:
        tried.append(b)
    assert sorted(tried, key=lambda b: b.port) == [A, B, C]
    assert make_route([]).pick(()) is None


def test_set_backends_copies_and_swaps() -> None:
    src = [A, B]
    route = make_route(src)
    src.append(C)  # the caller's list is not shared
    assert route.backends == (A, B)
    route.set_backends([C])
    assert {route.pick(()) for _ in range(3)} == {C}


# --- passive failure detection (pure, fake clock) ---------------------------


def test_failed_backend_is_skipped_until_its_ejection_ends() -> None:
    clock = FakeClock()
    route = make_route([A, B, C], clock=clock)
    assert route.pick(()) is A
    route.record_failure(A)
    assert route.ejected() == {A}
    assert route.stats.ejections == 1
    # Round-robin among the others while A is out.
    assert [route.pick(()) for _ in range(6)] == [B, C, B, C, B, C]
    clock.now = 100.49
    assert A not in [route.pick(()) for _ in range(6)]
    clock.now = 100.5  # exactly base (0.5 s) later: back in rotation
    assert route.ejected() == set()
    assert {route.pick(()) for _ in range(3)} == {A, B, C}
    # Ejection ended but A has not succeeded yet: its failure count is kept.
    assert route.health[(A.addr, A.port)].failures == 1


def test_ejection_doubles_and_caps_and_success_resets() -> None:
    clock = FakeClock()
    route = make_route([A, B], clock=clock, eject_base=0.5, eject_max=3.0)
    key = (A.addr, A.port)
    durations = []
    for _ in range(6):
        route.record_failure(A)
        durations.append(route.health[key].ejected_until - clock.now)
        clock.now += 100  # the ejection ends before the next failure
    assert durations == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert route.stats.ejections == 6

    # Stays capped (and finite) however long a backend keeps failing.
    route.health[key].failures = 5000
    route.record_failure(A)
    assert route.health[key].ejected_until - clock.now == 3.0

    route.record_success(A)
    assert route.health == {}
    route.record_failure(A)
    assert route.health[key].failures == 1
    assert route.health[key].ejected_until - clock.now == 0.5


def test_failures_during_an_ejection_count_once() -> None:
    clock = FakeClock()
    route = make_route([A, B], clock=clock)
    for _ in range(10):  # e.g. a burst of connects in flight at once, all refused
        route.record_failure(A)
    assert route.stats.ejections == 1
    assert route.health[(A.addr, A.port)].failures == 1
    assert route.health[(A.addr, A.port)].ejected_until == clock.now + 0.5


def test_all_ejected_falls_back_to_soonest_to_recover() -> None:
    clock = FakeClock()
    route = make_route([A, B, C], clock=clock)
    route.record_failure(A)
    clock.now += 0.6  # A's first ejection is over: its second one lasts 1.0 s
    for b in (A, B, C):  # A: 1.0 s, B: 0.5 s, C: 0.5 s but ejected later
        route.record_failure(b)
        clock.now += 0.01
    assert route.ejected() == {A, B, C}
    # Fail open: never None while an untried backend exists.
    assert [route.pick(()) for _ in range(3)] == [B, B, B]
    assert route.pick([B]) is C
    assert route.pick([B, C]) is A
    assert route.pick([A, B, C]) is None
    # An untried healthy backend still wins over the ejected ones.
    route.record_success(C)
    assert route.pick(()) is C
    assert route.pick([C]) is B


def test_removed_and_readded_backend_starts_clean() -> None:
    clock = FakeClock()
    route = make_route([A, B], clock=clock)
    route.record_failure(A)
    route.record_failure(B)
    # Staying in the list keeps health, even with another task id.
    route.set_backends([Backend(B.addr, B.port, "other-task"), C])
    assert set(route.health) == {(B.addr, B.port)}
    assert route.ejected() == {Backend(B.addr, B.port, "other-task")}
    route.set_backends([A, B, C])
    assert set(route.health) == {(B.addr, B.port)}
    assert route.ejected() == {B}
    assert [route.pick(()) for _ in range(3)] == [A, C, A]
    # A failure reported for a backend no longer listed (a connect in flight
    # across an apply) is not recorded.
    route.set_backends([B])
    assert route.health == {(B.addr, B.port): route.health[(B.addr, B.port)]}
    route.record_failure(A)
    assert (A.addr, A.port) not in route.health
    route.set_backends([])
    assert route.health == {}


def test_zero_base_disables_ejection() -> None:
    route = make_route([A, B], clock=FakeClock(), eject_base=0.0)
    route.record_failure(A)
    assert route.ejected() == set()
    assert [route.pick(()) for _ in range(2)] == [A, B]


def test_bind_error_message() -> None:
    assert bind_error_message(OSError(errno.EADDRINUSE, "whatever")) == "address already in use"
    assert bind_error_message(OSError(errno.EACCES, "x")) == "permission denied"
    assert bind_error_message(OSError("no errno")) == "no errno"


# --- real sockets, on asyncio and uvloop -------------------------------------



async def _greeter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer "hi", then echo the request bytes back once the client half-closes."""
    try:
        writer.write(b"hi\n")
        data = await reader.read()
        writer.write(data)
        await writer.drain()
    except (ConnectionError, RuntimeError, asyncio.CancelledError):
        pass  # torn down by the test (uvloop raises RuntimeError on write)
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def proxy(route: Route, *, portable: bool = False) -> AsyncIterator[int]:
    """A listener on an ephemeral port forwarding through ``route`` (``portable``: on the
    reactor's selectors fallback)."""
    loop = asyncio.get_running_loop()
    reactor = Reactor(loop, portable=portable)
    listener = TcpListener(reactor, await listen(loop, "127.0.0.1", 0), route)
    try:
        yield listener.socks[0].getsockname()[1]
    finally:
        listener.close()
        for conn in list(route.registry):
            conn.abort()
        reactor.close()


def test_connect_timeout_moves_to_next_backend(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        # A listener whose accept queue (backlog 0) is full drops further
        # SYNs, so connecting to it hangs: a stand-in for a dead host.
        blackhole = socket.socket()
        filler = socket.socket()
        good = await asyncio.start_server(_greeter, "127.0.0.1", 0)
        writer: asyncio.StreamWriter | None = None
        try:
            blackhole.bind(("127.0.0.1", 0))
            blackhole.listen(0)
            filler.connect(blackhole.getsockname())
            hole = Backend("127.0.0.1", blackhole.getsockname()[1], "hole")
            ok = Backend("127.0.0.1", good.sockets[0].getsockname()[1], "ok")
            route = make_route([hole, ok], timeout=0.2)
            async with proxy(route) as port:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                assert await reader.readline() == b"hi\n"
                assert route.stats.failed_connects == 1
                assert route.stats.rejected == 0
        finally:
            if writer is not None:
                writer.close()
            good.close()
            filler.close()
            blackhole.close()

    run(scenario)


def _open_sockets() -> int:
    """Sockets this process holds (not other descriptors: uvloop opens some of its own lazily)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


def test_connects_from_the_source_address(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        seen: list[str] = []

        async def who(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            seen.append(w.get_extra_info("peername")[0])
            w.close()

        good = await asyncio.start_server(who, "127.0.0.1", 0)
        closed = socket.socket()
        try:
            closed.bind(("127.0.0.1", 0))  # a port nobody listens on
            sock, done = open_upstream("127.0.0.5",
                                       Backend("127.0.0.1", good.sockets[0].getsockname()[1]))
            # To this node, the handshake is over before connect() returns: no wait for an event.
            assert done
            assert sock.getsockname()[0] == "127.0.0.5" and sock.getsockname()[1] > 0
            sock.close()
            await until(lambda: seen == ["127.0.0.5"])
            sock, done = open_upstream("127.0.0.5", Backend("127.0.0.1", closed.getsockname()[1]))
            try:
                assert not done
                await until(lambda: sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                            == errno.ECONNREFUSED)
            finally:
                sock.close()
        finally:
            good.close()
            closed.close()

    run(scenario)


def test_refused_backend_is_skipped_and_ejected(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        good = await asyncio.start_server(_greeter, "127.0.0.1", 0)
        closed = socket.socket()
        try:
            closed.bind(("127.0.0.1", 0))  # a port nobody listens on
            dead = Backend("127.0.0.1", closed.getsockname()[1])
            ok = Backend("127.0.0.1", good.sockets[0].getsockname()[1])
            route = make_route([dead, ok])
            async with proxy(route) as port:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                assert await reader.readline() == b"hi\n"
                writer.close()
                assert route.stats.failed_connects == 1 and route.stats.rejected == 0
                assert route.ejected() == {dead}
        finally:
            good.close()
            closed.close()

    run(scenario)


@pytest.mark.parametrize("portable", [False, True], ids=["epoll", "selectors"])
def test_early_data_and_eof_reach_the_backend(run: Callable[[Scenario], None],
                                              portable: bool) -> None:
    async def scenario() -> None:
        # The client writes and half-closes before the upstream connect has
        # finished: the client side reads those bytes while it connects, so they
        # must be held and sent first, not lost.
        good = await asyncio.start_server(_greeter, "127.0.0.1", 0)
        try:
            ok = Backend("127.0.0.1", good.sockets[0].getsockname()[1])
            route = make_route([ok])
            async with proxy(route, portable=portable) as port:
                for _ in range(5):
                    with socket.create_connection(("127.0.0.1", port)) as s:
                        s.sendall(b"early bytes")
                        s.shutdown(socket.SHUT_WR)
                        s.setblocking(False)
                        got = b""
                        while chunk := await asyncio.get_running_loop().sock_recv(s, 4096):
                            got += chunk
                    assert got == b"hi\nearly bytes"
                await asyncio.sleep(0.05)
                assert route.stats.active == 0
                assert route.stats.total == 5
        finally:
            good.close()

    run(scenario)


def test_early_bytes_wait_in_the_kernel_while_the_upstream_connects(
        run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        # A backend whose accept queue is full: our connect hangs (SYN dropped) until the
        # queue drains. Meanwhile the client sends far more than the kernel's buffers hold:
        # the mesh reads none of it (the client is not read before the upstream exists), so
        # it waits in the kernel and at the sender; once the upstream connects, every byte
        # arrives, in order.
        loop = asyncio.get_running_loop()
        backend = socket.socket()
        filler = socket.socket()
        client = socket.socket()
        accepted: socket.socket | None = None
        try:
            backend.bind(("127.0.0.1", 0))
            backend.listen(0)
            filler.connect(backend.getsockname())
            route = make_route([Backend("127.0.0.1", backend.getsockname()[1])], timeout=10.0)
            payload = bytes(range(256)) * (64 * 1024)  # 16 MiB
            async with proxy(route) as port:
                client.setblocking(False)
                await loop.sock_connect(client, ("127.0.0.1", port))
                sender = loop.create_task(loop.sock_sendall(client, payload))
                await until(lambda: len(route.registry) == 1, what="accepted")
                (conn,) = route.registry
                await asyncio.sleep(0.3)
                assert conn.state == CONNECTING
                assert conn.cbuf is None and conn.ubuf is None  # nothing held by the mesh
                assert not sender.done()  # the rest waits in the kernel and at the sender
                # Drain the accept queue: the retried SYN gets through, the proxy connects.
                backend.accept()[0].close()
                backend.setblocking(False)
                upstream, _ = await asyncio.wait_for(loop.sock_accept(backend), 10)
                accepted = upstream  # closed in finally
                got = bytearray()
                while len(got) < len(payload):
                    chunk = await asyncio.wait_for(loop.sock_recv(upstream, 1 << 20), 10)
                    assert chunk
                    got += chunk
                assert bytes(got) == payload
                await asyncio.wait_for(sender, 10)
        finally:
            for sock in (accepted, client, filler, backend):
                if sock is not None:
                    sock.close()

    run(scenario)


def test_client_gone_while_connecting(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        blackhole = socket.socket()
        filler = socket.socket()
        try:
            blackhole.bind(("127.0.0.1", 0))
            blackhole.listen(0)
            filler.connect(blackhole.getsockname())
            hole = Backend("127.0.0.1", blackhole.getsockname()[1])
            route = make_route([hole], timeout=0.3)
            async with proxy(route) as port:
                before = _open_sockets()
                _, w = await asyncio.open_connection("127.0.0.1", port)
                await until(lambda: len(route.registry) == 1, what="accepted")
                (conn,) = route.registry
                assert conn.state == CONNECTING
                w.close()
                # Gives up after the timeout, closes, and leaves nothing behind: no
                # connection, no socket (client, upstream), no timer.
                await until(lambda: not route.registry, what="given up")
                assert route.stats.active == 0
                assert route.stats.rejected == 1
                await until(lambda: _open_sockets() == before, what="every socket closed")
        finally:
            filler.close()
            blackhole.close()

    run(scenario)


def _readable(sock: socket.socket) -> bool:
    """Whether a non-blocking socket has bytes to read (left unread)."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False


def test_a_reply_sent_before_a_reset_reaches_the_client(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        # A backend that answers and closes without reading the whole request (an early 413,
        # say): its kernel resets the connection, but the reply it sent first must arrive.
        loop = asyncio.get_running_loop()
        reply = b"HTTP/1.0 413 Too Large\r\n\r\n"
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        srv.setblocking(False)

        async def rude() -> None:
            conn, _ = await loop.sock_accept(srv)
            with conn:
                await until(lambda: _readable(conn), what="the request")
                conn.sendall(reply)
            # closed with the request unread: the kernel sends a reset after the reply

        backend = loop.create_task(rude())
        try:
            route = make_route([Backend("127.0.0.1", srv.getsockname()[1])])
            async with proxy(route) as port:
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(b"POST / HTTP/1.0\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
                got = b""
                with contextlib.suppress(ConnectionResetError):
                    while chunk := await r.read(4096):
                        got += chunk
                w.close()
                assert got == reply
                await backend
                await until(lambda: route.stats.active == 0, what="both sides closed")
        finally:
            backend.cancel()
            srv.close()

    run(scenario)


@pytest.mark.skipif(not splice.available(), reason="splice is Linux only")
def test_a_held_read_survives_a_move_to_splice_asked_in_the_same_batch(
        run: Callable[[Scenario], None]) -> None:
    """One batch of events: the backend's read fills the buffer (time to splice), then the
    client's read cannot be sent on (held). When C forwards, both reads are done before any
    handler runs, so the held bytes exist before the move is decided: they must not be lost."""
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        srv = socket.create_server(("127.0.0.1", 0))
        srv.setblocking(False)
        client: socket.socket | None = None
        route = make_route([Backend("127.0.0.1", srv.getsockname()[1])])
        backend: socket.socket | None = None
        try:
            async with proxy(route) as port:
                client = socket.create_connection(("127.0.0.1", port))
                client.setblocking(False)
                backend, _ = await loop.sock_accept(srv)
                await until(lambda: any(c.state == OPEN for c in route.registry),
                            what="the upstream connected")
                (conn,) = route.registry
                assert conn.upstream is not None
                # Without yielding to the loop, so that all of it is in one batch of events:
                # first the backend's bulk (the upstream side is ready first) ...
                backend.sendall(os.urandom(reactor_module.BUFFER_SIZE + 1000))
                # ... the upstream socket made to take nothing more (the backend reads
                # nothing yet; filled after the bulk, whose ACKs free room) ...
                filled = 0
                with contextlib.suppress(BlockingIOError):
                    while True:
                        filled += conn.upstream.send(b"f" * 65536)
                # ... and then the client's bytes, which will have to be held.
                client.send(b"hello")
                want = filled + 5
                got = bytearray()
                try:
                    async with asyncio.timeout(5):
                        while len(got) < want:
                            got += await loop.sock_recv(backend, want - len(got))
                except TimeoutError:
                    pytest.fail(f"the backend got {len(got) - filled} of the client's 5 bytes")
                assert got[filled:] == b"hello"
        finally:
            srv.close()
            for s in (client, backend):
                if s is not None:
                    s.close()

    run(scenario)


def test_a_local_error_rejects_without_blaming_the_backend(
        run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        good = await asyncio.start_server(_greeter, "127.0.0.1", 0)
        try:
            ok = Backend("127.0.0.1", good.sockets[0].getsockname()[1])
            # A source address this host does not have (TEST-NET-1): bind() fails locally.
            route = make_route([ok], source_addr="192.0.2.1")
            async with proxy(route) as port:
                r, w = await asyncio.open_connection("127.0.0.1", port)
                with contextlib.suppress(ConnectionResetError):
                    assert await r.read() == b""
                w.close()
                assert route.stats.rejected == 1
                assert route.stats.failed_connects == 0
                assert route.ejected() == set()  # still in rotation: it did nothing wrong
        finally:
            good.close()

    run(scenario)


def test_listen_skips_an_address_family_the_host_lacks(
        run: Callable[[Scenario], None], monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        if socket.AF_INET6 not in {info[0] for info in infos}:
            pytest.skip("this host offers no IPv6 wildcard address")
        real = socket.socket

        def no_ipv6(family: int = socket.AF_INET, *args: Any) -> socket.socket:
            if family == socket.AF_INET6:  # as on a kernel booted with ipv6.disable=1
                raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
            return real(family, *args)

        monkeypatch.setattr(socket, "socket", no_ipv6)
        try:
            socks = await listen(loop, "", 0)
        finally:
            monkeypatch.undo()
        try:
            assert [s.family for s in socks] == [socket.AF_INET]
        finally:
            for sock in socks:
                sock.close()

    run(scenario)
