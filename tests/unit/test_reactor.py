"""The mesh's readiness set: stale events after descriptor reuse, and the portable fallback."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

from corral.dataplane.reactor import IN, Reactor
from corral.testing.polling import until


def test_a_reused_descriptor_gets_no_event_of_its_previous_owner(
        run: Callable[[Callable[[], object]], None]) -> None:
    async def scenario() -> None:
        reactor = Reactor(asyncio.get_running_loop())
        a, a_peer = socket.socketpair()
        b, b_peer = socket.socketpair()
        new: list[socket.socket] = []
        stale: list[int] = []
        try:
            old_fds = {a.fileno(), b.fileno()}

            def record(sock: socket.socket) -> Callable[[int], None]:
                def handler(events: int) -> None:
                    stale.append(events)
                    with contextlib.suppress(BlockingIOError):  # a stale event: nothing there
                        sock.recv(64)
                return handler

            def close_both(_events: int) -> None:
                # a's handler closes a and b (one connection's two sockets), then a new
                # connection's sockets take their numbers, all within one batch.
                if new:
                    return
                for sock in (a, b):
                    reactor.forget(sock.fileno())
                    sock.close()
                new.extend(socket.socketpair())
                for sock in new:
                    sock.setblocking(False)
                    reactor.register(sock.fileno(), IN, record(sock))

            reactor.register(a.fileno(), IN, close_both)
            reactor.register(b.fileno(), IN, close_both)
            a_peer.send(b"x")  # a becomes ready first, b second: one batch, in that order
            b_peer.send(b"x")
            await until(lambda: bool(new), what="the batch")
            assert {s.fileno() for s in new} == old_fds  # the numbers really were reused
            await asyncio.sleep(0.05)  # more loop turns: nothing is readable on the new ones
            assert stale == [], "b's event went to the socket that took its number"
            new[1].send(b"y")  # but the new owner gets its own events
            await until(lambda: stale == [IN], what="the new socket's own event")
        finally:
            reactor.close()
            for sock in (a, b, a_peer, b_peer, *new):
                sock.close()

    run(scenario)


def test_portable_fallback_does_not_spin_on_sockets_kept_for_errors(
        run: Callable[[Callable[[], object]], None]) -> None:
    async def scenario() -> None:
        reactor = Reactor(asyncio.get_running_loop(), portable=True)
        sock, peer = socket.socketpair()
        calls: list[int] = []
        try:
            peer.send(b"waiting")  # readable, but nobody wants to read it yet
            reactor.register(sock.fileno(), 0, calls.append)
            await asyncio.sleep(0.1)
            assert calls == []  # epoll would report only errors: the selector reports nothing
            reactor.modify(sock.fileno(), IN)
            await until(lambda: bool(calls), what="readable once wanted")
            reactor.modify(sock.fileno(), 0)
            count = len(calls)
            await asyncio.sleep(0.1)
            assert len(calls) == count
            reactor.forget(sock.fileno())
        finally:
            reactor.close()
            sock.close()
            peer.close()

    run(scenario)
