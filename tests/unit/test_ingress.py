"""The ingress mesh with real sockets on 127.0.0.1, on asyncio and on uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from corral.dataplane import proxy
from corral.dataplane.ingress import Backend, IngressMesh, PublishedPort
from corral.dataplane.reactor import IN
from corral.testing.streams import Source, read_digest
from corral.testing.polling import until

Scenario = Callable[[], Awaitable[None]]




def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EchoBackend:
    """Greets each connection with its id, echoes data, says "eof N" at EOF."""

    def __init__(self, ident: str) -> None:
        self.ident = ident
        self.hits = 0
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self, sock: socket.socket | None = None) -> EchoBackend:
        if sock is None:
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        else:  # an already bound socket: serve on exactly its port
            sock.listen()
            self.server = await asyncio.start_server(self._handle, sock=sock)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def backend(self) -> Backend:
        return Backend("127.0.0.1", self.port, task_id=self.ident)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.hits += 1
        self.writers.add(writer)
        try:
            writer.write(f"{self.ident}\n".encode())
            n = 0
            while data := await reader.read(65536):
                n += len(data)
                writer.write(data)
                await writer.drain()
            # Only reached after the client's half-close got through the mesh.
            writer.write(f"eof {n}\n".encode())
            await writer.drain()
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            pass  # the test closed us (uvloop raises RuntimeError on write)
        finally:
            writer.close()
            self.writers.discard(writer)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in list(self.writers):
            w.close()


@contextlib.asynccontextmanager
async def cluster(n: int, listen: str = "127.0.0.1") -> Any:
    """n echo backends plus a mesh on `listen`, all torn down on exit."""
    backends = [await EchoBackend(f"b{i}").start() for i in range(n)]
    mesh = IngressMesh(listen, connect_timeout=1.0)
    writers: list[asyncio.StreamWriter] = []
    try:
        yield mesh, backends, writers
    finally:
        for w in writers:
            w.close()
        await mesh.close()
        for b in backends:
            b.close()
        await asyncio.sleep(0)


async def connect(port: int, writers: list[asyncio.StreamWriter]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    writers.append(w)
    return r, w


async def hello(port: int, writers: list[asyncio.StreamWriter]) -> str:
    """Connect through the mesh and return the id of the backend that answered."""
    r, w = await connect(port, writers)
    line = await r.readline()
    w.close()
    return line.decode().strip()


async def read_closed(r: asyncio.StreamReader) -> bytes:
    """Read to EOF, treating a reset as EOF (the mesh may RST a rejected client)."""
    try:
        return await r.read()
    except ConnectionResetError:
        return b""


def test_round_robin_each_backend_twice(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        async with cluster(3) as (mesh, bs, writers):
            port = free_port()
            pp = PublishedPort(port)
            assert await mesh.apply({pp: [b.backend for b in bs]}) == {}
            assert mesh.listening() == {pp}
            seen = [await hello(port, writers) for _ in range(6)]
            assert seen == ["b0", "b1", "b2", "b0", "b1", "b2"]
            assert [b.hits for b in bs] == [2, 2, 2]
            st = mesh.stats(pp)
            assert (st.total, st.failed_connects, st.rejected) == (6, 0, 0)

    run(scenario)


def test_a_listen_address_given_as_a_name(run: Callable[[Scenario], None]) -> None:
    """The mesh's upstream connections leave from its listen address; a host name there is
    resolved (Python's path: the C connect takes IP literals only)."""
    async def scenario() -> None:
        async with cluster(2, listen="localhost") as (mesh, bs, writers):
            port = free_port()
            assert await mesh.apply({PublishedPort(port): [b.backend for b in bs]}) == {}
            assert [await hello(port, writers) for _ in range(4)] == ["b0", "b1", "b0", "b1"]
            assert (mesh.stats(port).failed_connects, mesh.stats(port).rejected) == (0, 0)

    run(scenario)


def test_refused_backend_is_skipped(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        async with cluster(2) as (mesh, bs, writers):
            port = free_port()
            dead = Backend("127.0.0.1", free_port(), task_id="dead")
            pp = PublishedPort(port)
            await mesh.apply({pp: [dead, bs[0].backend, bs[1].backend]})
            seen = [await hello(port, writers) for _ in range(4)]
            assert set(seen) <= {"b0", "b1"} and "" not in seen
            assert mesh.stats(port).failed_connects >= 1
            assert mesh.stats(port).rejected == 0

            # Only dead backends: each tried once, then the client is closed.
            await mesh.apply({pp: [dead, Backend("127.0.0.1", free_port())]})
            r, _ = await connect(port, writers)
            assert await read_closed(r) == b""
            assert mesh.stats(port).rejected == 1

    run(scenario)


def test_removed_backend_gets_no_new_connections(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        async with cluster(2) as (mesh, bs, writers):
            port = free_port()
            pp = PublishedPort(port)
            await mesh.apply({pp: [bs[0].backend, bs[1].backend]})
            r, w = await connect(port, writers)
            assert await r.readline() == b"b0\n"

            await mesh.apply({pp: [bs[1].backend]})
            assert [await hello(port, writers) for _ in range(4)] == ["b1"] * 4
            assert bs[0].hits == 1

            # The established connection to the removed backend still works.
            w.write(b"ping\n")
            assert await r.readline() == b"ping\n"
            assert mesh.stats(pp).active >= 1

    run(scenario)


def test_removed_port_is_released(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        async with cluster(1) as (mesh, bs, writers):
            port = free_port()
            pp = PublishedPort(port)
            await mesh.apply({pp: [bs[0].backend]})
            assert await hello(port, writers) == "b0"
            await mesh.apply({})
            assert mesh.listening() == set()
            await asyncio.sleep(0.05)  # let the proxied connection wind down
            with socket.socket() as s:  # the port is free right away
                s.bind(("127.0.0.1", port))
                s.listen()

            # Removed while a connection is established: that connection
            # may finish, and the port can be bound again at once (with
            # SO_REUSEADDR, because the accepted socket still uses it).
            await mesh.apply({pp: [bs[0].backend]})
            r, w = await connect(port, writers)
            assert await r.readline() == b"b0\n"
            assert await mesh.apply({}) == {}
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
                s.listen()
            w.write(b"still\n")
            assert await r.readline() == b"still\n"
            assert await mesh.apply({pp: [bs[0].backend]}) == {}
            assert await hello(port, writers) == "b0"

    run(scenario)


def test_empty_backend_list_closes_client(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        async with cluster(1) as (mesh, bs, writers):
            port = free_port()
            pp = PublishedPort(port)
            await mesh.apply({pp: []})
            assert mesh.listening() == {pp}
            r, _ = await connect(port, writers)
            assert await read_closed(r) == b""
            assert mesh.stats(pp).rejected == 1

            # Backends appear: the same listener starts forwarding.
            await mesh.apply({pp: [bs[0].backend]})
            assert await hello(port, writers) == "b0"

    run(scenario)


def test_closed_connections_are_freed_without_the_cyclic_gc(run: Callable[[Scenario], None]) -> None:
    """Per-connection objects go when the connection does (no client <-> upstream cycle left
    for the garbage collector to find later)."""

    def sides() -> int:
        return sum(isinstance(o, proxy.Connection) for o in gc.get_objects())

    async def scenario() -> None:
        async with cluster(1) as (mesh, bs, writers):
            port = free_port()
            await mesh.apply({PublishedPort(port): [bs[0].backend]})
            gc.collect()
            gc.disable()
            try:
                before = sides()
                for _ in range(20):
                    assert await hello(port, writers) == "b0"
                await until(lambda: mesh.stats(port).active == 0)
                await asyncio.sleep(0)  # the loop drops its last references to the connections
                assert sides() == before
            finally:
                gc.enable()

    run(scenario)


def test_half_close(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        async with cluster(1) as (mesh, bs, writers):
            port = free_port()
            await mesh.apply({PublishedPort(port): [bs[0].backend]})
            r, w = await connect(port, writers)
            w.write(b"x" * 1000)
            await w.drain()
            w.write_eof()  # shutdown(SHUT_WR)
            # The backend answers "eof 1000" only after it saw our EOF, and
            # its reply must still reach us through the half-closed pipe.
            data = await r.read()
            assert data == b"b0\n" + b"x" * 1000 + b"eof 1000\n"
            await asyncio.sleep(0.05)
            assert mesh.stats(port).active == 0  # both directions done: closed

    run(scenario)


def test_large_transfer_both_directions(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        size = 20 * 1024 * 1024
        payload = os.urandom(size)
        async with cluster(1) as (mesh, bs, writers):
            port = free_port()
            await mesh.apply({PublishedPort(port): [bs[0].backend]})
            r, w = await connect(port, writers)
            assert await r.readline() == b"b0\n"

            async def send() -> None:
                view = memoryview(payload)
                for i in range(0, size, 1 << 20):
                    w.write(view[i : i + (1 << 20)])
                    await w.drain()
                w.write_eof()

            sender = asyncio.create_task(send())
            echoed = await r.readexactly(size)
            await sender
            assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
            assert await r.read() == f"eof {size}\n".encode()

    run(scenario)


def test_backpressure_keeps_mesh_buffers_small(run: Callable[[Scenario], None],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # The copying path (bulk would move to splice: test_splice.py has that one).
    monkeypatch.setattr(proxy, "SPLICE", False)

    async def scenario() -> None:
        size = 48 * 1024 * 1024
        source = Source(size)
        server = await asyncio.start_server(source, "127.0.0.1", 0)
        mesh = IngressMesh("127.0.0.1")
        w: asyncio.StreamWriter | None = None
        try:
            port = free_port()
            sport = server.sockets[0].getsockname()[1]
            await mesh.apply({PublishedPort(port): [Backend("127.0.0.1", sport)]})
            r, w = await asyncio.open_connection("127.0.0.1", port)
            # A slow client: it reads nothing until the client socket is full.
            await until(lambda: any(c.cbuf is not None for c in mesh._conns),
                        what="a send the client socket did not take")
            (conn,) = mesh._conns  # white-box: what the mesh holds for this connection
            # At most one read is held (for the slow client), and the upstream is not read
            # meanwhile: the rest waits in the kernel, then at the source.
            assert conn.cbuf is not None and len(conn.cbuf) <= 64 * 1024
            assert conn.ubuf is None
            assert not conn.umask & IN
            assert source.sent < size
            assert await read_digest(r) == (size, source.digest())
        finally:
            if w is not None:
                w.close()
            await mesh.close()
            server.close()

    run(scenario)


def test_bind_conflict_is_reported_not_raised(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        async with cluster(1) as (mesh, bs, writers):
            blocker = socket.socket()
            try:
                blocker.bind(("127.0.0.1", 0))
                blocker.listen()
                port = blocker.getsockname()[1]
                pp, ok = PublishedPort(port), PublishedPort(free_port())
                errors = await mesh.apply({pp: [bs[0].backend], ok: [bs[0].backend]})
                assert errors == {pp: "address already in use"}
                assert mesh.listening() == {ok}
            finally:
                blocker.close()
            # The failed port is retried on the next apply.
            assert await mesh.apply({pp: [bs[0].backend], ok: [bs[0].backend]}) == {}
            assert mesh.listening() == {pp, ok}
            assert await hello(port, writers) == "b0"

    run(scenario)


def test_close_drops_listeners_and_connections(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        async with cluster(1) as (mesh, bs, writers):
            port = free_port()
            await mesh.apply({PublishedPort(port): [bs[0].backend]})
            r, _ = await connect(port, writers)
            assert await r.readline() == b"b0\n"
            await mesh.close()
            assert mesh.listening() == set()
            assert await read_closed(r) == b""
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", port)
            await mesh.close()  # idempotent

    run(scenario)


def test_dead_backend_is_ejected_then_readmitted(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        async with cluster(2) as (mesh, bs, writers):
            # Bound but not listening: connects to it are refused. listen()
            # later revives it on the very same port, with no race.
            dead_sock = socket.socket()
            revived = EchoBackend("dead")
            try:
                dead_sock.bind(("127.0.0.1", 0))
                dead = Backend("127.0.0.1", dead_sock.getsockname()[1], task_id="dead")
                port = free_port()
                await mesh.apply({PublishedPort(port): [dead, bs[0].backend, bs[1].backend]})

                loop = asyncio.get_running_loop()
                start = loop.time()
                seen = []
                for i in range(30):  # spread over ~1 s: two ejection periods of base 0.5 s
                    seen.append(await hello(port, writers))
                    if i == 0:
                        assert mesh.ejected(port) == {dead}
                    await asyncio.sleep(1.0 / 30)
                # ~1 s; even at 3 s there would be at most 3 attempts (t=0, 0.5, 1.5).
                assert loop.time() - start < 3.0
                assert set(seen) == {"b0", "b1"}  # every client answered, by the live ones
                st = mesh.stats(port)
                assert st.rejected == 0
                # Not retried on every connection: at t=0, maybe at t=0.5 (then out for 1 s).
                assert 1 <= st.failed_connects <= 3
                assert st.ejections == st.failed_connects

                # The backend comes back; once its ejection ends it gets traffic again.
                await revived.start(dead_sock)
                while mesh.ejected(port):
                    await asyncio.sleep(0.05)
                after = [await hello(port, writers) for _ in range(6)]
                assert after.count("dead") == 2  # plain round-robin again
                assert mesh.ejected(port) == set()
                assert mesh.stats(port).failed_connects == st.failed_connects
            finally:
                revived.close()
                dead_sock.close()

    run(scenario)


def test_burst_with_dead_backend_all_clients_served(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        async with cluster(2) as (mesh, bs, writers):
            port = free_port()
            dead = Backend("127.0.0.1", free_port(), task_id="dead")
            await mesh.apply({PublishedPort(port): [dead, bs[0].backend, bs[1].backend]})
            # Concurrent clients: several may pick the dead backend before the
            # first refusal comes back; each is retried on a live backend.
            seen = await asyncio.gather(*(hello(port, writers) for _ in range(30)))
            assert set(seen) == {"b0", "b1"}
            st = mesh.stats(port)
            assert st.rejected == 0 and st.failed_connects >= 1
            assert mesh.ejected(port) == {dead}
            # The ejection state follows the backend list across apply().
            await mesh.apply({PublishedPort(port): [dead, bs[0].backend]})
            assert mesh.ejected(port) == {dead}
            await mesh.apply({PublishedPort(port): [bs[0].backend]})
            assert mesh.ejected(port) == set()
            await mesh.apply({PublishedPort(port): [dead, bs[0].backend]})
            assert mesh.ejected(port) == set()  # re-added: starts clean
            assert mesh.ejected(free_port()) == set()  # no listener: nothing ejected

    run(scenario)


def test_all_backends_ejected_still_serves_recovered_one(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        async with cluster(0) as (mesh, _, writers):
            sock = socket.socket()
            recovered = EchoBackend("only")
            try:
                sock.bind(("127.0.0.1", 0))
                only = Backend("127.0.0.1", sock.getsockname()[1], task_id="only")
                port = free_port()
                await mesh.apply({PublishedPort(port): [only]})
                r, _ = await connect(port, writers)
                assert await read_closed(r) == b""
                assert mesh.ejected(port) == {only}
                # Recovered while still marked: fail open, the client is served.
                await recovered.start(sock)
                assert await hello(port, writers) == "only"
                assert mesh.ejected(port) == set()
                st = mesh.stats(port)
                assert (st.rejected, st.failed_connects, st.ejections) == (1, 1, 1)
            finally:
                recovered.close()
                sock.close()

    run(scenario)


def test_eject_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        IngressMesh("127.0.0.1", eject_base=-1)


def test_idle_connections_are_closed_after_the_idle_timeout(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(100):
                w.write(data)
            w.close()
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        mesh = IngressMesh("127.0.0.1", idle_timeout=0.4)
        listen = free_port()
        try:
            await mesh.apply({PublishedPort(listen): [Backend("127.0.0.1", port)]})
            busy_r, busy_w = await asyncio.open_connection("127.0.0.1", listen)
            idle_r, idle_w = await asyncio.open_connection("127.0.0.1", listen)
            for w in (busy_w, idle_w):
                w.write(b"x")
            assert await busy_r.read(1) == b"x" and await idle_r.read(1) == b"x"
            for _ in range(8):  # 0.8 s: keep one connection talking, leave the other idle
                busy_w.write(b"y")
                assert await busy_r.read(1) == b"y"
                await asyncio.sleep(0.1)
            assert await asyncio.wait_for(idle_r.read(1), 2.0) == b"", "idle: closed by the mesh"
            busy_w.write(b"z")
            assert await busy_r.read(1) == b"z", "the busy connection lives on"
            assert mesh.stats_idle_closed == 1
            busy_w.close()
            idle_w.close()
        finally:
            await mesh.close()
            server.close()
    run(scenario)


def test_quiet_connections_get_keepalive_towards_the_backend(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(100):
                w.write(data)
            w.close()
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        mesh = IngressMesh("127.0.0.1", idle_timeout=2.0)  # looks every second
        listen = free_port()
        try:
            await mesh.apply({PublishedPort(listen): [Backend("127.0.0.1", port)]})
            r, w = await asyncio.open_connection("127.0.0.1", listen)
            w.write(b"x")
            assert await r.read(1) == b"x"
            (conn,) = list(mesh._conns)
            upstream = conn.upstream
            assert upstream is not None
            # Not on the per-connection path: a fresh connection has no keepalive yet.
            assert upstream.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
            for _ in range(40):
                if upstream.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE):
                    break
                await asyncio.sleep(0.1)
            assert upstream.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            w.write(b"y")
            assert await r.read(1) == b"y", "keepalive changes nothing for the traffic"
            w.close()
        finally:
            await mesh.close()
            server.close()
    run(scenario)
