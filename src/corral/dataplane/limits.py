"""Process limits the routing mesh needs.

Every connection proxied in userspace holds two descriptors (client and upstream socket), so the
usual soft limit of 1,024 open files caps the mesh at ~500 connections, and a common hard limit
of 20,000 or so at ~10,000. Like dockerd (run with ``LimitNOFILE=infinity`` for the same reason),
the daemon raises its own limit at start: the soft limit to the hard limit, and, when it may
(CAP_SYS_RESOURCE: root normally has it, root in a container may not), the hard limit to the
kernel's ceiling ``fs.nr_open``. Mesh workers and task processes inherit the raised limits.
"""

from __future__ import annotations

import resource
from pathlib import Path

__all__ = ["raise_nofile_limit"]

NR_OPEN = Path("/proc/sys/fs/nr_open")


def _nr_open(path: Path) -> int | None:
    """The kernel's ceiling for RLIMIT_NOFILE, or None when it cannot be read."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def raise_nofile_limit(nr_open: Path = NR_OPEN) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE as far as this process may; return the (soft, hard) limits now.

    The hard limit goes up to ``fs.nr_open`` when permitted (refused without privilege: then it
    stays), and the soft limit up to the hard limit. A limit is never lowered.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = _nr_open(nr_open)
    if ceiling is not None and hard != resource.RLIM_INFINITY and ceiling > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, ceiling))
        except (ValueError, OSError):  # not privileged: the hard limit stays
            pass
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):  # pragma: no cover - RLIM_INFINITY above nr_open
            pass
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard
