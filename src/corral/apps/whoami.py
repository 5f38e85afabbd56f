"""whoami: a tiny HTTP/1.1 demo app that says which task answered.

How this works: an ``asyncio.start_server`` loop reads one request at a time
per connection (request line, headers, an optional Content-Length body that is
discarded), and answers any method and path with a pretty-printed JSON
document describing this process: a random two-word name picked at startup,
the task/service/node it was scheduled as (from ``CORRAL_*`` env vars) and the
client address seen by the socket. Keep-alive is supported; SIGTERM/SIGINT
stop the server and exit with status 0.

A connection may start with a HAProxy PROXY protocol header (v1 or v2, see
:mod:`corral.dataplane.proxyproto`): the first bytes are buffered until they
decide whether one is there; if so it is parsed and its source becomes
``client``, and the answer also carries ``proxy_protocol`` (1 or 2) and
``peer`` (the socket's peer). A LOCAL/UNKNOWN header keeps the socket peer as
``client``. A malformed header closes the connection without an answer. The
header is only looked for once, at the start of the connection; requests are
then read from a small per-connection buffer (so bytes read past the header
are not lost), which also makes pipelined keep-alive requests work.

Run it with ``HOST=127.0.0.1 PORT=8080 python -m corral.apps.whoami``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import sys

from corral.dataplane.proxyproto import ProxyProtocolError, looks_like_proxy, parse

FIRST_NAMES = (
    "Ada", "Alan", "Barbara", "Boris", "Carla", "Cedric", "Dana", "Donald",
    "Edith", "Elmer", "Fiona", "Felix", "Greta", "Gus", "Hazel", "Hugo",
    "Iris", "Igor", "June", "Jasper", "Kira", "Kurt", "Lena", "Louis",
    "Mabel", "Milo", "Nora", "Otto", "Olive", "Pablo", "Quinn", "Rosa",
    "Rufus", "Sofia", "Silas", "Tilda", "Ugo", "Vera", "Walter", "Zelda",
)  # fmt: skip

LAST_NAMES = (
    "Abbott", "Baker", "Bishop", "Castle", "Crane", "Dalton", "Everett",
    "Finch", "Fletcher", "Garner", "Hale", "Holloway", "Ingram", "Jarvis",
    "Keller", "Lang", "Lowell", "Marsh", "Mercer", "Nash", "Oakley", "Pike",
    "Porter", "Quill", "Ritter", "Rowan", "Sawyer", "Slater", "Stone",
    "Thatcher", "Underwood", "Vance", "Walsh", "Webb", "Whitaker", "Wilder",
    "Winslow", "Yates", "Young", "Zimmer",
)  # fmt: skip

# Bounds that keep a misbehaving client from making us buffer a lot.
_MAX_HEADER_BYTES = 16 * 1024
_MAX_BODY_BYTES = 1024 * 1024
_IDLE_TIMEOUT = 60.0
_READ_CHUNK = 64 * 1024


def random_name(rng: random.Random | None = None) -> str:
    """Return a random human-readable "First Last" name."""
    r = rng or random.SystemRandom()
    return f"{r.choice(FIRST_NAMES)} {r.choice(LAST_NAMES)}"


class WhoAmI:
    """The app state: identity fixed at startup, plus open connections."""

    def __init__(self, name: str, env: dict[str, str] | None = None) -> None:
        """Capture identity from ``env`` (defaults to ``os.environ``)."""
        e = os.environ if env is None else env
        self.name = name
        self.identity = {
            "task": e.get("CORRAL_TASK_NAME", ""),
            "task_id": e.get("CORRAL_TASK_ID", ""),
            "service": e.get("CORRAL_SERVICE_NAME", ""),
            "node": e.get("CORRAL_NODE_NAME", ""),
            "hostname": socket.gethostname(),
        }
        self.writers: set[asyncio.StreamWriter] = set()

    def body(
        self,
        client: str,
        method: str,
        path: str,
        *,
        proxy_protocol: int | None = None,
        peer: str | None = None,
    ) -> bytes:
        """Render the JSON answer (pretty-printed, trailing newline).

        ``proxy_protocol``/``peer`` are only included when a PROXY header was seen.
        """
        doc: dict[str, object] = {"name": self.name, **self.identity,
               "client": client, "path": path, "method": method}  # fmt: skip
        if proxy_protocol is not None:
            doc["proxy_protocol"] = proxy_protocol
            doc["peer"] = peer
        return (json.dumps(doc, indent=2) + "\n").encode()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve requests on one connection until it closes or asks to."""
        self.writers.add(writer)
        peer = _fmt_addr(writer.get_extra_info("peername"))
        conn = _Conn(reader)
        try:
            who = await self._proxy_header(conn, peer)
            while await self._one_request(conn, writer, who):
                pass
        except (
            OSError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ProxyProtocolError,
        ):
            pass  # client went away or sent garbage: just drop the connection
        finally:
            self.writers.discard(writer)
            writer.close()

    async def _proxy_header(self, conn: _Conn, peer: str) -> _Who:
        """Consume a PROXY header if the connection starts with one.

        Raises ProxyProtocolError if it is malformed, IncompleteReadError on EOF.
        """
        async with asyncio.timeout(_IDLE_TIMEOUT):
            while (found := looks_like_proxy(bytes(conn.buf))) is None:
                await conn.fill()
            if not found:
                return _Who(peer)
            # A header is at most 16 + 65535 bytes: parse() bounds the buffering.
            while (res := parse(bytes(conn.buf))) is None:
                await conn.fill()
        header, used = res
        del conn.buf[:used]
        client = _fmt_addr(header.src) if header.src is not None else peer
        return _Who(client, header.version, peer)

    async def _one_request(self, stream: _Conn, writer: asyncio.StreamWriter, who: _Who) -> bool:
        """Read one request and answer it; return whether to keep the connection."""
        async with asyncio.timeout(_IDLE_TIMEOUT):
            head = await stream.readuntil(b"\r\n\r\n", _MAX_HEADER_BYTES)
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return await self._error(writer, 400, "Bad Request")
        method, path, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            # Not worth implementing for a demo app; say so and close.
            return await self._error(writer, 411, "Length Required")
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            return await self._error(writer, 400, "Bad Request")
        if length < 0 or length > _MAX_BODY_BYTES:
            return await self._error(writer, 413, "Content Too Large")
        if length:
            await stream.readexactly(length)  # discard the body

        conn = headers.get("connection", "").lower()
        # HTTP/1.1 defaults to keep-alive, HTTP/1.0 to close.
        keep = conn != "close" if version == "HTTP/1.1" else conn == "keep-alive"
        body = self.body(who.client, method, path, proxy_protocol=who.version, peer=who.peer)
        writer.write(
            (
                f"{version} 200 OK\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n"
                f"Connection: {'keep-alive' if keep else 'close'}\r\n"
                "\r\n"
            ).encode("latin-1")
            + (b"" if method == "HEAD" else body)  # HEAD: headers only
        )
        await writer.drain()
        return keep

    async def _error(self, writer: asyncio.StreamWriter, code: int, reason: str) -> bool:
        """Send a small plain-text error and ask the caller to close."""
        msg = f"{code} {reason}\n".encode()
        writer.write(
            f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(msg)}\r\nConnection: close\r\n\r\n".encode("latin-1") + msg
        )
        await writer.drain()
        return False


def _fmt_addr(addr: object) -> str:
    """``host:port`` for an address tuple (IPv6 unbracketed, as before), else str()."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr)


class _Who:
    """Who is on the other end: reported client, PROXY version and socket peer."""

    __slots__ = ("client", "version", "peer")

    def __init__(self, client: str, version: int | None = None, peer: str | None = None) -> None:
        self.client, self.version, self.peer = client, version, peer


class _Conn:
    """A StreamReader plus our own buffer, so bytes read ahead are never lost."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.buf = bytearray()

    async def fill(self) -> None:
        """Append what the socket has (at least one byte); EOF raises."""
        chunk = await self.reader.read(_READ_CHUNK)
        if not chunk:
            raise asyncio.IncompleteReadError(bytes(self.buf), None)
        self.buf += chunk

    def _take(self, n: int) -> bytes:
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def readuntil(self, sep: bytes, limit: int) -> bytes:
        """Bytes up to and including ``sep``; LimitOverrunError past ``limit``."""
        start = 0
        while (i := self.buf.find(sep, start)) < 0:
            if len(self.buf) > limit:
                raise asyncio.LimitOverrunError("request head too large", len(self.buf))
            start = max(0, len(self.buf) - len(sep) + 1)
            await self.fill()
        if i + len(sep) > limit:
            raise asyncio.LimitOverrunError("request head too large", i)
        return self._take(i + len(sep))

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes; IncompleteReadError on EOF."""
        while len(self.buf) < n:
            await self.fill()
        return self._take(n)


async def serve(host: str, port: int, name: str) -> None:
    """Run the server until SIGTERM or SIGINT."""
    app = WhoAmI(name)
    # A request head bigger than the limit is refused by readuntil().
    server = await asyncio.start_server(app.handle, host, port, limit=_MAX_HEADER_BYTES)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"whoami {name} listening on {host}:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        # Idle keep-alive connections would otherwise hold shutdown up.
        for w in list(app.writers):
            w.close()
        await asyncio.sleep(0)


def main() -> int:
    """Entry point for ``python -m corral.apps.whoami``."""
    host = os.environ.get("HOST", "0.0.0.0")
    port = int(os.environ.get("PORT", "8080"))
    asyncio.run(serve(host, port, random_name()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
