"""How long one task change takes to reach the data plane, at 10, 100 and 1,000 backends:
the kernel path (render + one atomic nft transaction, in a throwaway namespace) and the
userspace mesh (swapping a port's backend list)."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid

from corral.dataplane.ingress import Backend, IngressMesh, PublishedPort
from corral.dataplane.nft import apply
from corral.dataplane.nft_ingress import IngressRule, render_ingress_table


def backends(n: int) -> tuple[tuple[str, int], ...]:
    return tuple((f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256 + 1 if i % 256 < 254 else 1}",
                  9200) for i in range(n))


def kernel(ns: str, n: int, runs: int = 5) -> float:
    """Median ms for one change (n → n+1 backends) rendered and applied."""
    apply(render_ingress_table("10.99.0.11", [IngressRule(9200, "tcp", backends(n))]), netns=ns)
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        rules = [IngressRule(9200, "tcp", backends(n + 1 - i % 2))]
        apply(render_ingress_table("10.99.0.11", rules), netns=ns)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


async def userspace(n: int, runs: int = 5) -> float:
    mesh = IngressMesh("127.0.0.1")
    pp = PublishedPort(19999)
    try:
        await mesh.apply({pp: [Backend(a, p) for a, p in backends(n)]})
        times = []
        for i in range(runs):
            bs = [Backend(a, p) for a, p in backends(n + 1 - i % 2)]
            t0 = time.perf_counter()
            await mesh.apply({pp: bs})
            times.append((time.perf_counter() - t0) * 1000)
        return statistics.median(times)
    finally:
        await mesh.close()


def main() -> int:
    print("one task change → data plane applied (median ms)")
    print(f"{'backends':>9}  {'kernel (nft)':>13}  {'userspace':>10}")
    ns = None
    if os.geteuid() == 0 and subprocess.run(["which", "nft"], capture_output=True).returncode == 0:
        ns = f"corral-bench-{uuid.uuid4().hex[:6]}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for n in (10, 100, 1000):
            k = f"{kernel(ns, n):.1f}" if ns else "n/a (root)"
            u = asyncio.run(userspace(n))
            print(f"{n:>9}  {k:>13}  {u:>10.2f}")
    finally:
        if ns:
            subprocess.run(["ip", "netns", "del", ns], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
