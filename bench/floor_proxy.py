"""The least a Python TCP proxy can do per connection, for bench/dataplane.py's "Python floor" row.

    python bench/floor_proxy.py LISTEN_ADDR:PORT BACKEND_ADDR:PORT [BACKEND_ADDR:PORT ...]

Not corral code and not a usable proxy: one `select.epoll` loop, raw sockets, round-robin, no
timeouts, no retries, no health, no splice, no stats, no idle sweep, and reads tried ahead of
readiness where a connection's next bytes are usually there already (the request after accept,
the EOF behind data when epoll reports the peer's FIN). It only forwards bytes correctly
(partial sends wait for the socket to drain, half-closes are passed on). Its figures are a
reference point for what plain Python costs per connection and per request on this machine,
so the bench can tell that apart from what corral's mesh adds. Prints "ready" once listening;
runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import errno
import select
import signal
import socket
import sys

READ = 65536
IN = select.EPOLLIN | select.EPOLLRDHUP
OUT = select.EPOLLOUT
HUP = select.EPOLLRDHUP | select.EPOLLHUP


class Pair:
    """One proxied connection: the client and upstream sockets and what each side still owes."""

    __slots__ = ("client", "upstream", "ended", "paused", "pending")

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.ended: set[int] = set()  # descriptors that sent EOF (out of the epoll set)
        self.paused: set[int] = set()  # descriptors not read until their peer drains
        # Bytes not yet accepted by a socket, keyed by its descriptor.
        self.pending: dict[int, bytes] = {}


class FloorProxy:
    """A minimal epoll proxy: round-robin over backends, nothing else."""

    def __init__(self, listen: tuple[str, int], backends: list[tuple[str, int]]) -> None:
        self.backends = backends
        self.rr = 0
        self.source = listen[0]  # upstream connections leave from the listen address, as corral's
        self.ep = select.epoll()
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(listen)
        self.lsock.listen(4096)
        self.lsock.setblocking(False)
        self.ep.register(self.lsock.fileno(), select.EPOLLIN)
        # descriptor -> (pair, its socket, the socket it forwards to)
        self.ends: dict[int, tuple[Pair, socket.socket, socket.socket]] = {}
        self.running = True

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.lsock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return  # out of resources: try again at the next poll
                continue  # the client gave up before we got to it
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            backend = self.backends[self.rr % len(self.backends)]
            self.rr += 1
            up = socket.socket()
            up.setblocking(False)
            up.setsockopt(socket.IPPROTO_IP, socket.IP_BIND_ADDRESS_NO_PORT, 1)
            up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            up.bind((self.source, 0))
            up.connect_ex(backend)  # EINPROGRESS; a send before it completes waits for OUT
            pair = Pair(client, up)
            self.ends[client.fileno()] = (pair, client, up)
            self.ends[up.fileno()] = (pair, up, client)
            self.ep.register(client.fileno(), IN)
            self.ep.register(up.fileno(), IN)
            self.pump(pair, client, up, False)  # the request is usually there already

    def close(self, pair: Pair) -> None:
        for sock in (pair.client, pair.upstream):
            if sock.fileno() >= 0:
                self.ends.pop(sock.fileno(), None)
                sock.close()  # closing also drops it from the epoll set

    def send(self, pair: Pair, src: socket.socket, dst: socket.socket, data: bytes) -> bool:
        """Send all of `data`, or park the rest and stop reading `src` until `dst` drains."""
        try:
            sent = dst.send(data)
        except BlockingIOError:  # still connecting, or the buffer is full
            sent = 0
        except OSError:
            self.close(pair)
            return False
        if sent < len(data):
            fd = dst.fileno()
            pair.pending[fd] = data[sent:]
            if src.fileno() not in pair.paused:
                # Out of the set, not interest 0: hang-ups are reported whatever the interest.
                pair.paused.add(src.fileno())
                self.ep.unregister(src.fileno())
            # Until it drains, `dst` is only watched for room (its own reads wait too).
            if fd in pair.ended:
                self.ep.register(fd, OUT)
            else:
                self.ep.modify(fd, OUT)
            return False
        return True

    def drain(self, pair: Pair, dst: socket.socket, src: socket.socket) -> None:
        """`dst` can take more: send what is parked, then read `src` again."""
        fd = dst.fileno()
        data = pair.pending.pop(fd)
        if fd in pair.ended:
            self.ep.unregister(fd)  # it was in the set for room only; send() adds it if it must
        else:
            self.ep.modify(fd, IN)
        if not self.send(pair, src, dst, data):
            return
        pair.paused.discard(src.fileno())
        self.ep.register(src.fileno(), IN)

    def pump(self, pair: Pair, src: socket.socket, dst: socket.socket, hup: bool) -> None:
        """Forward what `src` has; on its EOF pass the half-close on (close at the second).

        `hup`: epoll said the peer sent FIN, so the EOF is right behind the data: read it now
        instead of waiting for the next round (no read is wasted on keep-alive traffic).
        """
        while True:
            try:
                data = src.recv(READ)
            except BlockingIOError:
                return
            except OSError:
                self.close(pair)
                return
            if not data:
                break
            if not self.send(pair, src, dst, data) or not hup:
                return
        pair.ended.add(src.fileno())
        if len(pair.ended) == 2:
            self.close(pair)
            return
        self.ep.unregister(src.fileno())
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            self.close(pair)

    def run(self) -> None:
        lfd = self.lsock.fileno()
        ends = self.ends
        while self.running:
            try:
                events = self.ep.poll(1.0)
            except InterruptedError:
                continue
            for fd, ev in events:
                if fd == lfd:
                    self.accept()
                    continue
                end = ends.get(fd)
                if end is None:
                    continue
                pair, sock, other = end
                if fd in pair.pending:
                    self.drain(pair, sock, other)  # room, or an error the send reports
                elif fd not in pair.paused:  # readable, FIN, or an error to read
                    self.pump(pair, sock, other, bool(ev & HUP))


def host_port(text: str) -> tuple[str, int]:
    """Parse ``ADDR:PORT``."""
    addr, sep, port = text.rpartition(":")
    if not sep or not addr:
        raise argparse.ArgumentTypeError(f"expected ADDR:PORT, got {text!r}")
    return addr, int(port)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("listen", type=host_port, help="ADDR:PORT to listen on")
    parser.add_argument("backends", type=host_port, nargs="+", help="backend ADDR:PORT")
    args = parser.parse_args()
    proxy = FloorProxy(args.listen, args.backends)

    def stop(*_: object) -> None:
        proxy.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("ready", flush=True)
    proxy.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
