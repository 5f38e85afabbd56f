"""The compiled readiness set: plain reads of paired sockets forwarded in C, the rest reported.

Real sockets (Unix socket pairs: a client-side and an upstream-side pair, the poller holding
the middle ends, as the mesh holds its two sockets of a connection).
"""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import select
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from corral.dataplane import reactor

_fastpoll = reactor._fastpoll
built = pytest.mark.skipif(
    _fastpoll is None, reason="corral.dataplane._fastpoll is not built (no C compiler?)")

IN, RDHUP, ERR, HUP = select.EPOLLIN, select.EPOLLRDHUP, select.EPOLLERR, select.EPOLLHUP
READ = IN | RDHUP


@pytest.mark.skipif(not os.environ.get("CORRAL_REQUIRE_FASTPOLL"),
                    reason="only CI (.ci/run sets CORRAL_REQUIRE_FASTPOLL) insists on the "
                           "compiled module; elsewhere it is optional")
def test_ci_builds_the_compiled_forwarding() -> None:
    """CI must exercise the C path, not quietly fall back to Python."""
    assert reactor._fastpoll is not None, "setup.py did not build corral.dataplane._fastpoll"
    assert reactor.FASTPOLL


class Pair:
    """client <-> c (the poller's client side), u (the poller's upstream side) <-> upstream."""

    def __init__(self) -> None:
        self.client, self.c = socket.socketpair()
        self.u, self.upstream = socket.socketpair()
        for s in (self.c, self.u, self.client, self.upstream):
            s.setblocking(False)

    def close(self) -> None:
        for s in (self.client, self.c, self.u, self.upstream):
            s.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def p() -> Iterator[Any]:
    if _fastpoll is None:
        pytest.skip("corral.dataplane._fastpoll is not built (no C compiler?)")
    p = _fastpoll.Poller(4096)
    try:
        yield p
    finally:
        p.close()


def wait(p: Any) -> None:
    """Block until the set has an event (poll() itself never waits)."""
    fd = p.fileno()
    assert select.select([fd], [], [], 5)[0], "no event within 5 s"


def test_plain_reads_are_forwarded_without_reporting(pair: Pair, p: Any) -> None:
    p.register(pair.c.fileno(), READ, pair.u.fileno())
    p.register(pair.u.fileno(), READ, pair.c.fileno())
    pair.client.send(b"GET / HTTP/1.1\r\n\r\n")
    wait(p)
    assert p.poll() == []
    assert pair.upstream.recv(100) == b"GET / HTTP/1.1\r\n\r\n"
    pair.upstream.send(b"HTTP/1.1 200 OK\r\n\r\n")
    wait(p)
    assert p.poll() == []
    assert pair.client.recv(100) == b"HTTP/1.1 200 OK\r\n\r\n"
    # Both sides forwarded a read since the last look; the look clears the marks.
    assert p.take_busy(pair.c.fileno(), pair.u.fileno()) is True
    assert p.take_busy(pair.c.fileno(), pair.u.fileno()) is False
    assert p.take_busy(-1, 10**6) is False


def test_descriptors_without_a_peer_are_reported_untouched(pair: Pair, p: Any) -> None:
    p.register(pair.c.fileno(), READ)
    pair.client.send(b"x")
    wait(p)
    assert p.poll() == [(pair.c.fileno(), IN, -1, None)]
    assert pair.c.recv(10) == b"x", "the poller did not read it"
    # A peer dropped by modify, or interest in more than reading: not plain forwarding.
    p.modify(pair.c.fileno(), READ, pair.u.fileno())
    p.modify(pair.c.fileno(), READ)
    pair.client.send(b"y")
    wait(p)
    assert p.poll() == [(pair.c.fileno(), IN, -1, None)]
    pair.c.recv(10)
    p.modify(pair.c.fileno(), READ | select.EPOLLOUT, pair.u.fileno())
    pair.client.send(b"z")
    wait(p)
    assert p.poll() == [(pair.c.fileno(), IN | select.EPOLLOUT, -1, None)]
    assert pair.c.recv(10) == b"z", "the poller did not read it"


def test_forget_and_unregister_stop_the_forwarding(pair: Pair, p: Any) -> None:
    p.register(pair.c.fileno(), READ, pair.u.fileno())
    p.forget(pair.c.fileno())
    pair.client.send(b"x")
    wait(p)
    assert p.poll() == [(pair.c.fileno(), IN, -1, None)]
    p.unregister(pair.c.fileno())
    assert p.poll() == []
    with pytest.raises(OSError) as exc:
        p.unregister(pair.c.fileno())
    assert exc.value.errno == errno.ENOENT


@pytest.mark.parametrize("how", ["shutdown", "close"])
def test_data_then_fin_is_forwarded_and_the_eof_reported(pair: Pair, p: Any, how: str) -> None:
    # A FIN (RDHUP; after a close, HUP too) behind the data: read on to the EOF, as Python does.
    p.register(pair.c.fileno(), READ, pair.u.fileno())
    pair.client.send(b"last words")
    if how == "shutdown":
        pair.client.shutdown(socket.SHUT_WR)
    else:
        pair.client.close()
    wait(p)
    [(fd, events, got, rest)] = p.poll()
    assert (fd, got, rest) == (pair.c.fileno(), 0, None)
    assert events & RDHUP and events & IN and not events & ERR
    assert bool(events & HUP) == (how == "close")
    assert pair.upstream.recv(100) == b"last words"


def test_a_fin_read_in_c_is_reported_as_got_0(pair: Pair, p: Any) -> None:
    # Watched without RDHUP, the FIN shows as a plain read, which returns 0.
    p.register(pair.c.fileno(), IN, pair.u.fileno())
    pair.client.shutdown(socket.SHUT_WR)
    wait(p)
    assert p.poll() == [(pair.c.fileno(), IN, 0, None)]


def test_what_the_peer_does_not_take_is_returned(pair: Pair, p: Any) -> None:
    p.register(pair.c.fileno(), READ, pair.u.fileno())
    # Fill the upstream side until it takes nothing more.
    while True:
        try:
            pair.u.send(b"f" * 65536)
        except BlockingIOError:
            break
    pair.client.send(b"held")
    wait(p)
    assert p.poll() == [(pair.c.fileno(), IN, 4, b"held")]


def test_a_read_that_fills_the_buffer_is_reported(pair: Pair, p: Any) -> None:
    p.register(pair.c.fileno(), READ, pair.u.fileno())
    pair.client.send(b"z" * 5000)  # the poller's buffer is 4096
    wait(p)
    assert p.poll() == [(pair.c.fileno(), IN, 4096, b"")]
    assert pair.upstream.recv(8192) == b"z" * 4096, "forwarded before being reported"


def test_a_failed_send_is_reported_with_no_rest(pair: Pair, p: Any) -> None:
    p.register(pair.c.fileno(), READ, pair.u.fileno())
    pair.upstream.close()
    pair.client.send(b"lost")
    wait(p)
    assert p.poll() == [(pair.c.fileno(), IN, 4, None)]


def test_a_reset_is_left_to_python(p: Any) -> None:
    # Reported with ERR (left to Python untouched) or, if it lands between the event and the
    # read, as a failed read: either way Python learns of it and nothing is forwarded.
    srv = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(srv.getsockname())
    mesh, _ = srv.accept()
    other_a, other_b = socket.socketpair()
    try:
        p.register(mesh.fileno(), IN, other_a.fileno())
        client.send(b"x")
        wait(p)
        mesh.recv(1)  # drained again: the next event is the reset alone
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.close()
        wait(p)
        events = p.poll()
        assert len(events) == 1 and events[0][0] == mesh.fileno()
        fd, ev, got, rest = events[0]
        # epoll reports the reset as an error (left to Python) or as a plain read (failed in C).
        assert (ev & (ERR | HUP) and got == -1) or (ev == IN and got == -2), events
    finally:
        for s in (srv, mesh, other_a, other_b):
            s.close()


@built
def test_closed_poller_refuses_work() -> None:
    assert _fastpoll is not None
    p = _fastpoll.Poller()
    p.close()
    p.close()  # idempotent
    assert p.closed
    with pytest.raises(ValueError):
        p.poll()
    with pytest.raises(ValueError):
        p.register(0, IN)
    with pytest.raises(ValueError):
        _fastpoll.Poller(0)


# --- accept, connect and forward: one C call for what Python would do in several


def test_accept_gives_a_nonblocking_nodelay_socket_and_the_peer(p: Any) -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        srv.setblocking(False)
        assert p.accept(srv.fileno()) is None  # nobody waiting
        with socket.create_connection(srv.getsockname()) as client:
            fd, peer = p.accept(srv.fileno())
            with socket.socket(fileno=fd) as conn:
                assert peer == client.getsockname()
                assert not os.get_blocking(fd)
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                client.send(b"x")
                assert conn.recv(1) == b"x"


def test_accept_reports_ipv6_peers_as_python_does(p: Any) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        srv = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    with srv, socket.create_connection(srv.getsockname()[:2]) as client:
        fd, peer = p.accept(srv.fileno())
        os.close(fd)
        assert peer == client.getsockname()  # (host, port, flowinfo, scope_id)


def test_accept_on_a_socket_that_does_not_listen_raises(p: Any) -> None:
    with socket.socket() as s:
        with pytest.raises(OSError) as exc:
            p.accept(s.fileno())
        assert exc.value.errno == errno.EINVAL


def test_connect_from_a_source_address(p: Any) -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK) as s:
            assert p.connect(s.fileno(), "127.0.0.1", port, "127.0.0.1") is True  # loopback
            assert s.getsockname()[0] == "127.0.0.1"
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            conn, _ = srv.accept()
            conn.close()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK) as s:
            assert p.connect(s.fileno(), "127.0.0.1", port, None) is True


def test_connect_failures_carry_their_errno(p: Any) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK) as s:
        try:
            done = p.connect(s.fileno(), "127.0.0.1", closed, None)
        except OSError as exc:
            assert exc.errno == errno.ECONNREFUSED
        else:  # refused after the call returned: the socket says so
            assert done is False
            select.select([], [s], [], 5)
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNREFUSED
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK) as s:
        with pytest.raises(OSError) as exc:  # a source address this host does not have
            p.connect(s.fileno(), "127.0.0.1", closed, "192.0.2.1")
        assert exc.value.errno == errno.EADDRNOTAVAIL
    for host, source in (("localhost", None), ("127.0.0.1", "localhost"), ("fe80::1%lo", None)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK) as s:
            # Never a name lookup here: None, and Python's own path does it.
            assert p.connect(s.fileno(), host, closed, source) is None
            assert s.getsockname() == ("0.0.0.0", 0), "nothing was done to the socket"


def test_connect_over_ipv6(p: Any) -> None:
    try:
        srv = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    with srv, socket.socket(socket.AF_INET6, socket.SOCK_STREAM | socket.SOCK_NONBLOCK) as s:
        assert p.connect(s.fileno(), "::1", srv.getsockname()[1], "::1") is True
        assert s.getsockname()[0] == "::1"
        srv.accept()[0].close()


def test_forward_sends_one_read_on(pair: Pair, p: Any) -> None:
    assert p.forward(pair.c.fileno(), pair.u.fileno()) is None  # nothing there
    pair.client.send(b"request")
    assert p.forward(pair.c.fileno(), pair.u.fileno()) is None  # all forwarded
    assert pair.upstream.recv(100) == b"request"
    while True:  # the upstream side takes nothing more
        try:
            pair.u.send(b"f" * 65536)
        except BlockingIOError:
            break
    pair.client.send(b"held")
    assert p.forward(pair.c.fileno(), pair.u.fileno()) == (4, b"held")
    pair.client.shutdown(socket.SHUT_WR)
    assert p.forward(pair.c.fileno(), pair.u.fileno()) == (0, None)  # the FIN


# --- the reactor on top of it


def test_a_failing_handler_does_not_cost_the_rest_of_the_batch(pair: Pair) -> None:
    """C read the batch's bytes before any handler ran: a handler that raises must not keep
    later entries (which carry what C read) from theirs."""
    if _fastpoll is None:
        pytest.skip("corral.dataplane._fastpoll is not built")
    other_a, other_b = socket.socketpair()
    loop = asyncio.new_event_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    r = reactor.Reactor(loop, fast=True)
    seen: list[tuple[int, int, bytes | None]] = []
    try:
        def boom(events: int) -> None:
            raise RuntimeError("a handler's bug")

        def record(events: int) -> None:
            seen.append((events, r.got, r.rest))

        r.register(other_b.fileno(), reactor.IN, boom)  # no peer: left to Python
        # Watched without RDHUP: the FIN shows as a plain read, which C does (got 0).
        r.register(pair.c.fileno(), reactor.IN, record, pair.u.fileno())
        other_a.send(b"x")  # ready first, so first in the batch
        pair.client.shutdown(socket.SHUT_WR)
        assert select.select([r._poller.fileno()], [], [], 5)[0]
        r._ready_fast()
        assert seen == [(reactor.IN | reactor.PUMPED, 0, None)]
        assert [str(e["exception"]) for e in errors] == ["a handler's bug"]
    finally:
        r.close()
        loop.close()
        other_a.close()
        other_b.close()


def test_descriptors_beyond_the_first_table_size(pair: Pair, p: Any) -> None:
    """The peer table grows with the descriptor numbers (a busy mesh holds thousands)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    high = 5000
    if max(soft, hard if hard != resource.RLIM_INFINITY else high + 1) <= high:
        pytest.skip(f"may not open descriptor {high} here")
    if soft <= high:
        resource.setrlimit(resource.RLIMIT_NOFILE, (high + 1, hard))
    try:
        os.dup2(pair.c.fileno(), high)
        try:
            p.register(high, READ, pair.u.fileno())
            pair.client.send(b"far")
            wait(p)
            assert p.poll() == []
            assert pair.upstream.recv(10) == b"far"
            assert p.take_busy(high) is True
            p.forget(high)
        finally:
            os.close(high)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
