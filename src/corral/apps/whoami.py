"""whoami: a tiny HTTP/1.1 demo app that says which task answered.

How this works: an ``asyncio.start_server`` loop reads one request at a time
per connection (request line, headers, an optional Content-Length body that is
discarded), and answers any method and path with a pretty-printed JSON
document describing this process: a random two-word name picked at startup,
the task/service/node it was scheduled as (from ``CORRAL_*`` env vars) and the
client address seen by the socket. Keep-alive is supported; SIGTERM/SIGINT
stop the server and exit with status 0.

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

    def body(self, client: str, method: str, path: str) -> bytes:
        """Render the JSON answer (pretty-printed, trailing newline)."""
        doc = {"name": self.name, **self.identity,
               "client": client, "path": path, "method": method}  # fmt: skip
        return (json.dumps(doc, indent=2) + "\n").encode()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve requests on one connection until it closes or asks to."""
        self.writers.add(writer)
        peer = writer.get_extra_info("peername")
        client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        try:
            while await self._one_request(reader, writer, client):
                pass
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass  # client went away or sent garbage: just drop the connection
        finally:
            self.writers.discard(writer)
            writer.close()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: str
    ) -> bool:
        """Read one request and answer it; return whether to keep the connection."""
        async with asyncio.timeout(_IDLE_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
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
            await reader.readexactly(length)  # discard the body

        conn = headers.get("connection", "").lower()
        # HTTP/1.1 defaults to keep-alive, HTTP/1.0 to close.
        keep = conn != "close" if version == "HTTP/1.1" else conn == "keep-alive"
        body = self.body(client, method, path)
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
