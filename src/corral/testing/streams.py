"""Stream handlers for data-plane tests (asyncio.start_server callbacks)."""

from __future__ import annotations

import asyncio
import hashlib
import os


class Source:
    """Send `chunks` copies of one random chunk as fast as the peer takes them, then close;
    :attr:`sent` counts what the kernel has accepted so far (to see back-pressure)."""

    def __init__(self, size: int, chunk_size: int = 1 << 20) -> None:
        self.chunk = os.urandom(chunk_size)
        self.chunks = size // chunk_size
        self.size = self.chunks * chunk_size
        self.sent = 0

    def digest(self) -> bytes:
        """SHA-256 of everything one connection receives."""
        h = hashlib.sha256()
        for _ in range(self.chunks):
            h.update(self.chunk)
        return h.digest()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(self.chunks):
                writer.write(self.chunk)
                await writer.drain()
                self.sent += len(self.chunk)
        except ConnectionError:
            pass
        finally:
            writer.close()


async def read_digest(reader: asyncio.StreamReader, h: hashlib._Hash | None = None) -> tuple[int, bytes]:
    """Read to EOF: (bytes read, SHA-256 of them, continuing `h` when given)."""
    h = h or hashlib.sha256()
    n = 0
    while data := await reader.read(1 << 20):
        h.update(data)
        n += len(data)
    return n, h.digest()
