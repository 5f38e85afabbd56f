"""The netns runtime: each task gets what a container gets on the network — its own network
namespace, an address on each of its overlay networks, the embedded DNS as its resolver — and
runs as a child process inside that namespace (`ip netns exec`; Python 3.11 has no setns).

Like a container, the task listens on its service's target port on its own address, so every
replica of `-p 9200:9200` listens on 9200.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from corral.agent.exec import TaskEnv, TaskRejected
from corral.agent.overlay import NodeOverlay
from corral.agent.runtimes.process import ProcessController, ProcessExecutor, resolve_image
from corral.agent.secrets import TASK_SECRETS_DIR
from corral.api.types import Task
from corral.host.netlink import HostNetwork, delete_netns, netns_exists, valid_netns_name

NETNS_ETC = Path("/etc/netns")
DEFAULT_PORT = 80


def target_port(task: Task) -> int:
    """Where the task listens: its first published port's target (80 if it publishes none)."""
    return task.ports[0].target_port if task.ports else DEFAULT_PORT


def secrets_mount_argv(host_dir: Path, argv: list[str]) -> list[str]:
    """Run `argv` in its own mount namespace with its secrets on a private tmpfs at
    /run/secrets: the task moves them there, deletes the host's copy, then becomes `argv` —
    from then on the values exist only where the task can see them."""
    Path(TASK_SECRETS_DIR).mkdir(parents=True, exist_ok=True)  # the mount point, empty
    script = (f'mount -t tmpfs -o mode=0755,size=2m corral-secrets {TASK_SECRETS_DIR} && '
              f'cp -Rp "$0"/. {TASK_SECRETS_DIR}/ && rm -rf "$0" && exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
            str(host_dir), *argv]


class NetnsController(ProcessController):
    """Runs one task inside its own network namespace."""

    def __init__(self, executor: NetnsExecutor, task: Task) -> None:
        super().__init__(executor, task)
        self._netns_executor = executor
        self._netns = executor.netns_name(task.id)

    @property
    def netns(self) -> str:
        """The task's own network namespace."""
        return self._netns

    def _host_if(self, index: int) -> str:
        return f"v{self._task.id[:11]}{index:x}"  # ≤ 15 characters, unique per node

    @property
    def endpoint(self) -> tuple[str, int]:
        """The task's address on the ingress network (else its first), and port 0: it
        listens on the target port of that address, as a container does."""
        nets = self._task.networks
        if not nets:
            return ("", 0)
        overlay = self._netns_executor.overlay
        ingress = [a for a in nets if overlay.is_ingress(a.network_id)]
        return ((ingress or nets)[0].ip, 0)

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env.update(PORT=str(target_port(self._task)), HOST="0.0.0.0")
        if "CORRAL_SECRETS_DIR" in env:
            env["CORRAL_SECRETS_DIR"] = TASK_SECRETS_DIR
        return env

    async def prepare(self) -> None:
        """Resolve the image, then build the namespace: one interface per network, DNS."""
        await super().prepare()
        if not self._task.networks:
            raise TaskRejected("the netns runtime needs the task to have a network address")
        overlay = self._netns_executor.overlay
        host = self._netns_executor.host
        for i, att in enumerate(self._task.networks):
            if att.network_id not in overlay.networks:
                raise TaskRejected(f"network {att.network_id[:12]} is not set up on this node yet")
            # The first network carries the default route (via this node's bridge address).
            gateway = overlay.node_ip(att.network_id) if i == 0 else None
            # Netlink calls block (tens of ms): keep them off the event loop.
            await asyncio.to_thread(host.attach_task, self.netns, overlay.bridge(att.network_id),
                                    self._host_if(i), att.addr, gateway, ns_if=f"eth{i}")
        resolv = NETNS_ETC / self.netns / "resolv.conf"
        resolv.parent.mkdir(parents=True, exist_ok=True)
        resolv.write_text(f"nameserver {overlay.node_ip(self._task.networks[0].network_id)}\n"
                          "options ndots:0\n")
        await overlay.task_started(self._task.id, self.netns,
                                   [a.network_id for a in self._task.networks])
        argv = self._argv or resolve_image(self._task.spec.image)
        if self.secrets_dir is not None:
            argv = secrets_mount_argv(self.secrets_dir, argv)
        self._argv = ["ip", "netns", "exec", self.netns, *argv]

    async def remove(self) -> None:
        await super().remove()
        self._netns_executor.overlay.task_gone(self._task.id)
        host = self._netns_executor.host
        for i in range(len(self._task.networks)):
            await asyncio.to_thread(host.delete_link, self._host_if(i))
        await asyncio.to_thread(delete_netns, self.netns)
        shutil.rmtree(NETNS_ETC / self.netns, ignore_errors=True)


class NetnsExecutor(ProcessExecutor):
    """Makes netns controllers; cleans up namespaces a previous daemon left behind."""

    def __init__(self, data_dir: Path, env: TaskEnv, host: HostNetwork, overlay: NodeOverlay,
                 netns_prefix: str) -> None:
        super().__init__(data_dir, env)
        self.host = host
        self.overlay = overlay
        self.netns_prefix = netns_prefix

    def netns_name(self, task_id: str) -> str:
        return f"{self.netns_prefix}{task_id}"

    def controller(self, task: Task) -> NetnsController:
        return NetnsController(self, task)

    def cleanup_orphans(self) -> list[str]:
        """Kill leftover task processes, then delete every namespace with our prefix."""
        killed = super().cleanup_orphans()
        sweep_namespaces(self.netns_prefix)
        return killed


def sweep_namespaces(prefix: str) -> None:
    """Delete every task namespace named with `prefix` (what a previous run left behind)."""
    root = Path("/run/netns")
    if not root.is_dir():
        return
    for entry in root.iterdir():
        # A name this module would never make is not ours (and netns_exists refuses it).
        if (entry.name.startswith(prefix) and valid_netns_name(entry.name)
                and netns_exists(entry.name)):
            delete_netns(entry.name)
            shutil.rmtree(NETNS_ETC / entry.name, ignore_errors=True)
