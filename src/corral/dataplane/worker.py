"""A mesh worker process (`corral daemon --mesh-workers N`): one more userspace mesh on the
same ports (SO_REUSEPORT), so new connections spread over several cores.

The daemon feeds each worker the TCP endpoint state as one JSON line on stdin per change; the
worker exits when stdin closes (its daemon is gone, whatever the way it went).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import uvloop

from corral.dataplane.ingress import Backend, IngressMesh, LbPolicy, PublishedPort
from corral.dataplane.limits import raise_nofile_limit


def encode(endpoints: dict[PublishedPort, list[Backend]], policies: dict[PublishedPort, LbPolicy]) -> bytes:
    """One update as a JSON line (TCP ports only: UDP flows stay with the daemon)."""
    items = [{"port": pp.port, "backends": [[b.addr, b.port, b.task_id] for b in bs],
              "policy": list(policies.get(pp, ("rr", None, 0)))}
             for pp, bs in endpoints.items() if pp.protocol == "tcp"]
    return (json.dumps(items) + "\n").encode()


def decode(line: bytes) -> tuple[dict[PublishedPort, list[Backend]], dict[PublishedPort, LbPolicy]]:
    endpoints: dict[PublishedPort, list[Backend]] = {}
    policies: dict[PublishedPort, LbPolicy] = {}
    for item in json.loads(line):
        pp = PublishedPort(int(item["port"]))
        endpoints[pp] = [Backend(str(a), int(p), str(t)) for a, p, t in item["backends"]]
        kind, affinity, proxy = item["policy"]
        policies[pp] = (kind, affinity, int(proxy))
    return endpoints, policies


async def serve(args: argparse.Namespace) -> None:
    mesh = IngressMesh(args.listen, bind_source=args.bind_source, idle_timeout=args.idle_timeout,
                       reuse_port=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            endpoints, policies = decode(line)
            errors = await mesh.apply(endpoints, policies)
            for pp, err in errors.items():
                print(f"mesh worker: cannot publish {pp.port}: {err}", file=sys.stderr, flush=True)
    finally:
        await mesh.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="corral-mesh-worker")
    p.add_argument("--listen", required=True)
    p.add_argument("--idle-timeout", type=float, default=3600.0)
    p.add_argument("--bind-source", action="store_true")
    args: Any = p.parse_args(argv)
    raise_nofile_limit()  # also when started by hand, not by a daemon that raised it
    uvloop.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
