"""The node's side of the overlay networks: bridges, VXLAN, VIP rules and the embedded DNS.

How this works: each assignment carries every network (with this node's address on it and
where every remote address lives) and every service's VIPs and running tasks. From those the
node keeps, per network, a bridge holding its own address and a VXLAN device whose forwarding
and neighbour tables point each remote task or node at its host (no flooding, no learning).
Inside each task's namespace an nftables table DNATs the service VIPs of the task's networks to
running tasks, and the embedded DNS answers on the node's address of each network. Decisions
(`plan_*`) are pure; `NodeOverlay` only applies them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from corral.dataplane.dns import DnsRecords, DnsServer, ServiceEntry, TaskEntry
from corral.dataplane.nft import VipRule, apply_async, render_vip_table
from corral.host.netlink import HostNetwork, mac_for_ip
from corral.manager.dispatcher import NetworkInfo, ServiceEndpoint

log = logging.getLogger(__name__)

DNS_PORT = 53


def bridge_name(vni: int) -> str:
    return f"cb{vni}"


def vxlan_name(vni: int) -> str:
    return f"cx{vni}"


@dataclass(frozen=True)
class NetworkPlan:
    """What one network needs on this node."""

    network_id: str
    vni: int
    node_addr: str  # CIDR
    ingress: bool
    fdb: dict[str, str]  # remote mac -> underlay address
    neighbours: dict[str, str]  # remote ip -> mac


def plan_network(info: NetworkInfo) -> NetworkPlan:
    """Bridge address and static VXLAN tables for one network (pure)."""
    fdb = {mac_for_ip(ip): host for ip, host in info.peers}
    neigh = {ip: mac_for_ip(ip) for ip, _ in info.peers}
    return NetworkPlan(info.network.id, info.network.vni, info.node_addr,
                       info.network.spec.ingress, fdb, neigh)


def plan_vips(task_networks: Iterable[str], services: Iterable[ServiceEndpoint]) -> list[VipRule]:
    """The VIP rules a task on `task_networks` needs: each VIP → that network's task IPs."""
    nets = set(task_networks)
    rules = []
    for s in services:
        for net_id, vip in s.vips.items():
            if net_id in nets:
                backends = tuple(t.ips[net_id] for t in s.tasks if net_id in t.ips)
                rules.append(VipRule(vip=vip, backends=backends))
    return rules


def plan_dns(network_id: str, services: Iterable[ServiceEndpoint]) -> DnsRecords:
    """What tasks on one network can resolve: its services, their tasks, task names."""
    entries, tasks = [], []
    for s in services:
        ips = tuple(t.ips[network_id] for t in s.tasks if network_id in t.ips)
        if network_id not in s.vips and not ips:
            continue
        vip = s.vips.get(network_id) if s.endpoint_mode == "vip" else None
        entries.append(ServiceEntry(name=s.name, vip=vip, task_ips=ips))
        tasks += [TaskEntry(name=t.name, ip=t.ips[network_id]) for t in s.tasks if network_id in t.ips]
    return DnsRecords.build(entries, tasks)


@dataclass
class NodeOverlay:
    """Applies network plans on this node and keeps each task's VIP table current."""

    host: HostNetwork
    underlay_addr: str
    dns: DnsServer = field(default_factory=DnsServer)
    networks: dict[str, NetworkPlan] = field(default_factory=dict)
    services: list[ServiceEndpoint] = field(default_factory=list)
    _task_ns: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    _applied_vips: dict[str, list[VipRule]] = field(default_factory=dict)

    def node_ip(self, network_id: str) -> str:
        plan = self.networks.get(network_id)
        return plan.node_addr.split("/")[0] if plan and plan.node_addr else ""

    def is_ingress(self, network_id: str) -> bool:
        plan = self.networks.get(network_id)
        return plan is not None and plan.ingress

    def bridge(self, network_id: str) -> str:
        return bridge_name(self.networks[network_id].vni)

    async def apply(self, infos: list[NetworkInfo], services: list[ServiceEndpoint]) -> None:
        """Bring links, DNS and every task's VIP table in line with the cluster's state."""
        wanted = {i.network.id: plan_network(i) for i in infos if i.node_addr}
        for net_id, plan in wanted.items():
            old = self.networks.get(net_id)
            # Netlink calls block: run them off the event loop.
            if old is None or old.node_addr != plan.node_addr:
                await asyncio.to_thread(self.host.ensure_bridge, bridge_name(plan.vni),
                                        [plan.node_addr])
                await asyncio.to_thread(self.host.ensure_vxlan, vxlan_name(plan.vni), plan.vni,
                                        self.underlay_addr, bridge_name(plan.vni))
            if old is None or old.fdb != plan.fdb or old.neighbours != plan.neighbours:
                await asyncio.to_thread(self.host.set_fdb, vxlan_name(plan.vni), plan.fdb)
                await asyncio.to_thread(self.host.set_neighbours, vxlan_name(plan.vni),
                                        plan.neighbours)
        for net_id, old in list(self.networks.items()):
            if net_id not in wanted:  # the network was removed
                await asyncio.to_thread(self.host.delete_link, vxlan_name(old.vni))
                await asyncio.to_thread(self.host.delete_link, bridge_name(old.vni))
        self.networks = wanted
        self.services = services
        await self._apply_dns()
        for task_id in list(self._task_ns):
            await self._apply_vips(task_id)

    async def _apply_dns(self) -> None:
        addrs = {self.node_ip(n): n for n in self.networks if self.node_ip(n)}
        listening = {ip for ip, _ in self.dns.addresses}
        for ip in listening - set(addrs):
            await self.dns.remove_listener(ip)
        for ip in set(addrs) - listening:
            try:
                await self.dns.add_listener((ip, DNS_PORT))
            except OSError as exc:  # retried on the next assignment
                log.error("embedded DNS cannot listen on %s:%d: %s", ip, DNS_PORT, exc)
        for ip, net_id in addrs.items():
            self.dns.set_records(ip, plan_dns(net_id, self.services))

    async def task_started(self, task_id: str, netns: str, network_ids: Iterable[str]) -> None:
        """A task namespace exists: give it its VIP table now and on every change."""
        self._task_ns[task_id] = (netns, tuple(network_ids))
        await self._apply_vips(task_id)

    def task_gone(self, task_id: str) -> None:
        self._task_ns.pop(task_id, None)
        self._applied_vips.pop(task_id, None)

    async def _apply_vips(self, task_id: str) -> None:
        netns, nets = self._task_ns[task_id]
        rules = plan_vips(nets, self.services)
        if self._applied_vips.get(task_id) == rules:
            return
        try:
            await apply_async(render_vip_table(rules), netns=netns)
            self._applied_vips[task_id] = rules
        except Exception as exc:  # one task's table must not stop the others
            log.error("VIP rules for task %s: %s", task_id, exc)

    async def close(self) -> None:
        """Stop the DNS and take down this node's bridges and VXLAN devices."""
        await self.dns.close()
        for plan in self.networks.values():
            await asyncio.to_thread(self.host.delete_link, vxlan_name(plan.vni))
            await asyncio.to_thread(self.host.delete_link, bridge_name(plan.vni))
        self.networks = {}
