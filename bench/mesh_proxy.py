"""Run one corral IngressMesh listener on uvloop, for bench/dataplane.py.

    python bench/mesh_proxy.py LISTEN_ADDR:PORT BACKEND_ADDR:PORT [BACKEND_ADDR:PORT ...]

Binds LISTEN_ADDR:PORT, forwards every connection round-robin over the backends (upstream
connections leave from LISTEN_ADDR, as the mesh does on a node), prints "ready" on stdout once
listening, and runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

try:
    import corral  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import uvloop

from corral.dataplane.ingress import Backend, IngressMesh, PublishedPort
from corral.dataplane.limits import raise_nofile_limit


def host_port(text: str) -> tuple[str, int]:
    """Parse ``ADDR:PORT`` (IPv4 or a host name)."""
    addr, sep, port = text.rpartition(":")
    if not sep or not addr:
        raise argparse.ArgumentTypeError(f"expected ADDR:PORT, got {text!r}")
    return addr, int(port)


async def serve(listen: tuple[str, int], backends: list[Backend], reuse_port: bool = False) -> int:
    """Run the mesh until a termination signal arrives."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    mesh = IngressMesh(listen[0], reuse_port=reuse_port)
    try:
        errors = await mesh.apply({PublishedPort(listen[1]): backends})
        if errors:
            for pp, err in errors.items():
                print(f"mesh_proxy: cannot listen on {listen[0]}:{pp.port}: {err}",
                      file=sys.stderr)
            return 1
        print("ready", flush=True)
        await stop.wait()
        return 0
    finally:
        await mesh.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("listen", type=host_port, help="ADDR:PORT to listen on")
    parser.add_argument("backends", type=host_port, nargs="+", help="backend ADDR:PORT")
    parser.add_argument("--reuse-port", action="store_true",
                        help="share the port with other mesh processes (corral --mesh-workers)")
    args = parser.parse_args()
    raise_nofile_limit()  # as the daemon does: two descriptors per proxied connection
    backends = [Backend(addr, port) for addr, port in args.backends]
    return uvloop.run(serve(args.listen, backends, args.reuse_port))


if __name__ == "__main__":
    sys.exit(main())
