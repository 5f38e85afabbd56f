"""Bulk traffic through the mesh moves to splice(2): integrity, half-close, resets, back-pressure.

Real sockets on 127.0.0.1, on asyncio and on uvloop (the `run` fixture)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from corral.dataplane import proxy, reactor, splice
from corral.dataplane.ingress import Backend, IngressMesh, PublishedPort
from corral.dataplane.proxy import Connection
from corral.testing.streams import Source, read_digest
from corral.testing.polling import until

Scenario = Callable[[], Awaitable[None]]
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

pytestmark = pytest.mark.skipif(not splice.available(), reason="splice is Linux only")

MiB = 1 << 20


def open_fds() -> int:
    """Sockets and pipes this process holds."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone already
            n += os.readlink(f"/proc/self/fd/{fd}").startswith(("socket:", "pipe:"))
    return n


@contextlib.asynccontextmanager
async def mesh_to(handler: Handler) -> AsyncIterator[tuple[IngressMesh, int]]:
    """A mesh on an ephemeral port in front of one backend running `handler`."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    mesh = IngressMesh("127.0.0.1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        backend = Backend("127.0.0.1", server.sockets[0].getsockname()[1])
        assert await mesh.apply({PublishedPort(port): [backend]}) == {}
        yield mesh, port
    finally:
        await mesh.close()
        server.close()


def spliced(mesh: IngressMesh) -> list[Connection]:
    return [c for c in mesh._conns if c.pair is not None]  # white-box: which pairs moved


async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """Echo everything, then say how many bytes came before the EOF."""
    n = 0
    try:
        while data := await r.read(MiB):
            n += len(data)
            w.write(data)
            await w.drain()
        w.write(struct.pack("!Q", n))
        await w.drain()
    except (ConnectionError, RuntimeError):
        pass
    finally:
        w.close()


def test_large_transfer_both_ways_is_spliced_and_intact(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        size = 32 * MiB
        payload = os.urandom(size)
        async with mesh_to(echo) as (mesh, port):
            r, w = await asyncio.open_connection("127.0.0.1", port)

            async def send() -> None:
                for i in range(0, size, MiB):
                    w.write(payload[i:i + MiB])
                    await w.drain()
                w.write_eof()

            sender = asyncio.create_task(send())
            first = await r.readexactly(4 * MiB)
            assert len(spliced(mesh)) == 1, "bulk traffic moved the pair to splice"
            # The upstream keeps the mesh's keepalive (a vanished task is noticed when idle).
            (conn,) = spliced(mesh)
            assert conn.pair is not None
            upstream = conn.pair.b
            assert upstream.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert upstream.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
            rest = await r.readexactly(size - len(first))
            await sender
            assert hashlib.sha256(first + rest).digest() == hashlib.sha256(payload).digest()
            # The backend's count arrives after our half-close went through, then its EOF.
            assert struct.unpack("!Q", await r.readexactly(8)) == (size,)
            assert await r.read() == b""
            await until(lambda: mesh.stats(port).active == 0)
            w.close()

    run(scenario)


@pytest.mark.parametrize("slow", ["client", "backend"])
def test_both_directions_at_once_with_a_tiny_buffer(run: Callable[[Scenario], None],
                                                   monkeypatch: Any, slow: str) -> None:
    """Every read fills a 512-byte buffer (so each asks for splice) while the other direction
    is held back by a slow reader: the move to splice must wait until nothing read is still
    held anywhere. Both streams arrive intact."""
    monkeypatch.setattr(reactor, "BUFFER_SIZE", 512)
    size = 4 * MiB

    async def pump(data: bytes, w: asyncio.StreamWriter) -> None:
        for i in range(0, size, 4096):
            w.write(data[i:i + 4096])
            await w.drain()

    async def drain(r: asyncio.StreamReader, dawdle: bool) -> bytes:
        """Read `size` bytes, slowly for the first 512 KiB when `dawdle`."""
        got = bytearray()
        while len(got) < size:
            got += await r.read(min(4096 if dawdle and len(got) < 512 * 1024 else MiB,
                                    size - len(got)))
            if dawdle and len(got) < 512 * 1024:
                await asyncio.sleep(0.001)
        return bytes(got)

    down = os.urandom(size)

    async def backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        sender = asyncio.create_task(pump(down, w))
        got = await drain(r, slow == "backend")
        await sender
        w.write(hashlib.sha256(got).digest())
        await w.drain()
        w.close()

    async def scenario() -> None:
        up = os.urandom(size)
        async with mesh_to(backend) as (mesh, port):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            sender = asyncio.create_task(pump(up, w))
            got = await drain(r, slow == "client")
            await sender
            assert got == down, "backend to client"
            assert await r.read() == hashlib.sha256(up).digest(), "client to backend"
            w.close()

    run(scenario)


def test_half_close_after_splice_both_directions(run: Callable[[Scenario], None]) -> None:
    """The client half-closes mid-stream; the backend keeps sending 8 MiB, then closes."""
    tail = os.urandom(8 * MiB)

    async def backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        n = 0
        while data := await r.read(MiB):
            n += len(data)
        w.write(struct.pack("!Q", n) + tail)
        await w.drain()
        w.close()

    async def scenario() -> None:
        async with mesh_to(backend) as (mesh, port):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(os.urandom(6 * MiB))
            await w.drain()
            await until(lambda: len(spliced(mesh)) == 1)
            w.write_eof()
            assert struct.unpack("!Q", await r.readexactly(8)) == (6 * MiB,)
            assert await r.readexactly(len(tail)) == tail
            assert await r.read() == b""
            await until(lambda: mesh.stats(port).active == 0)
            w.close()

    run(scenario)


def reset(w: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0: the peer gets a RST."""
    sock = w.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    w.transport.abort()


def test_backend_reset_closes_the_client(run: Callable[[Scenario], None]) -> None:
    async def backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(os.urandom(4 * MiB))
        await w.drain()
        await r.read(1)  # the client's go: reset now, with the pair spliced
        reset(w)

    async def scenario() -> None:
        fds = open_fds()
        async with mesh_to(backend) as (mesh, port):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            await r.readexactly(4 * MiB)
            assert len(spliced(mesh)) == 1
            w.write(b"!")
            with contextlib.suppress(ConnectionResetError):
                assert await r.read() == b""  # EOF or reset, not a hang
            await until(lambda: mesh.stats(port).active == 0)
            w.close()
        splice.close_pool()
        await until(lambda: open_fds() <= fds)  # both sockets and every pipe closed

    run(scenario)


def test_client_reset_closes_the_backend(run: Callable[[Scenario], None]) -> None:
    ended: asyncio.Future[bytes] = asyncio.Future  # type: ignore[assignment]

    async def backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(os.urandom(4 * MiB))
        await w.drain()
        try:
            rest = await r.read()
        except ConnectionResetError:
            rest = b"reset"
        ended.set_result(rest)
        w.close()

    async def scenario() -> None:
        nonlocal ended
        ended = asyncio.get_running_loop().create_future()
        async with mesh_to(backend) as (mesh, port):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            await r.readexactly(4 * MiB)
            assert len(spliced(mesh)) == 1
            reset(w)
            assert await ended in (b"", b"reset")
            await until(lambda: mesh.stats(port).active == 0)

    run(scenario)


def test_slow_reader_back_pressures_the_backend(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        source = Source(64 * MiB)
        async with mesh_to(source) as (mesh, port):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            # Read a little, so the pair moves to splice, then stop reading.
            got = hashlib.sha256(await r.readexactly(MiB))
            await until(lambda: len(spliced(mesh)) == 1)
            (conn,) = spliced(mesh)
            pair = conn.pair
            assert pair is not None
            await until(lambda: pair.ba.waiting)  # the client is full: the backend is not read
            await asyncio.sleep(0.3)  # a slow reader: let the kernel's buffers fill up
            # Held back by the socket buffers (their size is the kernel's: tcp_rmem allows
            # 32 MiB here), not read into memory: the backend makes no progress while the
            # client reads nothing, and the mesh holds at most one pipe's worth, in the kernel.
            held = source.sent
            await asyncio.sleep(0.3)
            assert source.sent == held < source.size, "the backend is held back"
            assert pair.ba.waiting and 0 < pair.ba.pending <= splice.PIPE_SIZE
            n, digest = await read_digest(r, got)
            assert (n + MiB, digest) == (source.size, source.digest())
            w.close()

    run(scenario)


def test_mesh_close_drops_spliced_connections(run: Callable[[Scenario], None]) -> None:
    async def backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(os.urandom(2 * MiB))
        await w.drain()
        await r.read()
        w.close()

    async def scenario() -> None:
        async with mesh_to(backend) as (mesh, port):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            await r.readexactly(2 * MiB)
            assert len(spliced(mesh)) == 1
            await mesh.close()
            with contextlib.suppress(ConnectionResetError):
                assert await r.read() == b""
            assert mesh.stats(port).active == 0
            w.close()

    run(scenario)


def test_small_exchanges_stay_on_transports(run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        async with mesh_to(echo) as (mesh, port):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(50):
                w.write(b"x" * 1000)
                assert await r.readexactly(1000) == b"x" * 1000
            assert spliced(mesh) == []
            w.close()

    run(scenario)


def test_off_switch(run: Callable[[Scenario], None], monkeypatch: Any) -> None:
    monkeypatch.setattr(proxy, "SPLICE", False)

    async def scenario() -> None:
        async with mesh_to(echo) as (mesh, port):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(os.urandom(4 * MiB))
            await r.readexactly(4 * MiB)
            assert spliced(mesh) == []
            w.close()

    run(scenario)
