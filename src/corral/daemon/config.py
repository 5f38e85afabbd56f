"""The daemon's settings, parsed once from the command line and passed down read-only."""

from __future__ import annotations

import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from corral.api.errors import InvalidArgument
from corral.api.types import API_PORT
from corral.host.netlink import valid_netns_name

Runtime = Literal["process", "netns"]
Mesh = Literal["userspace", "kernel"]
MAX_MESH_WORKERS = 64


def in_initial_netns() -> bool:
    """Whether this process runs in the host's network namespace (that of PID 1)."""
    try:
        return os.stat("/proc/self/ns/net").st_ino == os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return True  # cannot tell: assume the host, the careful answer


def default_runtime() -> Runtime:
    """netns when we can create namespaces (root on Linux), else process — like issue #3 asks."""
    return "netns" if sys.platform == "linux" and os.geteuid() == 0 else "process"


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity, bounded by a cgroup CPU quota (a container
    limited to 2 CPUs on a 64-core host counts 2)."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(count, math.ceil(quota)) if quota else count)


def _cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup (v2 cpu.max, v1 cfs quota), None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class DaemonConfig:
    """Everything `corral daemon` was told."""

    addr: str
    data_dir: Path
    hostname: str
    api_port: int = API_PORT
    advertise_addr: str | None = None
    runtime: Runtime = "process"
    # Task namespaces are named PREFIX + task id, so a lab can sweep what its daemons made.
    task_netns_prefix: str = "corral-t-"
    mesh: Mesh = "userspace"
    mesh_idle_timeout: float = 3600.0  # 0 = never close idle proxied connections
    mesh_workers: int = 1  # userspace mesh processes sharing each port (SO_REUSEPORT)
    socket_path: Path | None = None  # the local admin's unix socket; default DATA_DIR/corral.sock

    def __post_init__(self) -> None:
        if self.advertise_addr is None and self.addr in ("0.0.0.0", "::", ""):
            raise InvalidArgument(f"--advertise-addr is required when --addr is {self.addr or 'empty'}")
        if self.runtime == "netns" and (sys.platform != "linux" or os.geteuid() != 0):
            raise InvalidArgument("--runtime netns needs root on Linux (network namespaces)")
        if self.mesh == "kernel" and self.runtime != "netns":
            raise InvalidArgument("--mesh kernel needs --runtime netns (tasks reached over the "
                                  "overlay, forwarding in the node's own namespace)")
        if not 1 <= self.mesh_workers <= MAX_MESH_WORKERS:
            raise InvalidArgument(f"--mesh-workers must be between 1 and {MAX_MESH_WORKERS}")
        prefix = self.task_netns_prefix
        if not (len(prefix) <= 20 and valid_netns_name(prefix)):
            # Task namespace names start with it: only what host/netlink.py takes in a name.
            raise InvalidArgument("--task-netns-prefix must be 1 to 20 of A-Z a-z 0-9 _ . + -")

    @property
    def socket(self) -> Path:
        return self.socket_path or self.data_dir / "corral.sock"

    @property
    def advertise(self) -> str:
        """The address other nodes reach this one at."""
        return self.advertise_addr or self.addr

    @staticmethod
    def parse_mesh(value: str | None, runtime: Runtime) -> Mesh:
        """auto: the kernel fast path with the netns runtime when nft is there — but never by
        default in the host's own network namespace, where it would turn on forwarding."""
        if value in (None, "", "auto"):
            own_namespace = not in_initial_netns()
            return ("kernel" if runtime == "netns" and own_namespace and shutil.which("nft")
                    else "userspace")
        if value not in ("userspace", "kernel"):
            raise InvalidArgument(f"invalid --mesh {value!r}: expected kernel, userspace or auto")
        return "kernel" if value == "kernel" else "userspace"

    @staticmethod
    def parse_mesh_workers(value: str | None) -> int:
        """auto: one userspace mesh process per core this daemon may run on (as HAProxy's
        nbthread and nginx's `worker_processes auto`): new connections cost CPU in Python."""
        if value in (None, "", "auto"):
            return min(usable_cpus(), MAX_MESH_WORKERS)
        try:
            return int(value)
        except ValueError:
            raise InvalidArgument(f"invalid --mesh-workers {value!r}: expected a number "
                                  f"or auto") from None

    @staticmethod
    def parse_runtime(value: str | None) -> Runtime:
        if value in (None, "", "auto"):
            return default_runtime()
        if value not in ("process", "netns"):
            raise InvalidArgument(f"invalid --runtime {value!r}: expected process, netns or auto")
        return "netns" if value == "netns" else "process"
