"""Draining: how many connections a task still serves, read from the kernel's socket table.

/proc/PID/net/tcp lists the sockets of the network namespace PID lives in, so the same
reader works for a process task (the node's namespace, told apart by its port) and for a
netns task (its own namespace).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

ESTABLISHED = "01"


def established_on(port: int, lines: Iterable[str]) -> int:
    """Established connections whose local port is `port`, from /proc/net/tcp lines (pure)."""
    want = f"{port:04X}"
    count = 0
    for line in lines:
        fields = line.split()
        # sl local_address rem_address st ...; the header line has "local_address" there
        if len(fields) > 3 and fields[3] == ESTABLISHED and fields[1].rsplit(":", 1)[-1] == want:
            count += 1
    return count


def connections(pid: int, port: int) -> int:
    """Established connections to `port` in PID's network namespace (0 if PID is gone)."""
    total = 0
    for name in ("tcp", "tcp6"):
        try:
            text = (Path("/proc") / str(pid) / "net" / name).read_text()
        except OSError:
            continue
        total += established_on(port, text.splitlines()[1:])
    return total
