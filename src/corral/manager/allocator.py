"""Allocator: gives services, nodes and new tasks their overlay addresses (NEW → PENDING).

Every node gets an address on every network (its bridge there, the source of its mesh
traffic), every service a VIP on each network it is attached to (endpoint mode vip), and
every new task an address on each of its service's networks — the ingress network included
when the service publishes ports in ingress mode, as Swarm does. A task whose network is full
stays NEW with the reason in its error.
"""

from __future__ import annotations

from corral.api.types import Network, NetworkAttachment, Node, Service, Task, TaskState
from corral.manager.ipam import AddressExhausted, allocate, used_addresses
from corral.manager.loop import Component
from corral.store.base import ReadTx, WriteTx


def service_networks(service: Service, ingress: Network | None) -> list[str]:
    """IDs of the networks a service's tasks attach to: its own, then ingress if it publishes
    a port (or has no network at all: a task in its own namespace always gets an address, as
    a container always has a network)."""
    ids = list(service.spec.networks)
    if (service.spec.ports or not ids) and ingress is not None and ingress.id not in ids:
        ids.append(ingress.id)
    return ids


class _Pools:
    """Used addresses per network, computed once per pass and updated as we allocate."""

    def __init__(self, view: ReadTx) -> None:
        self._view = view
        self._used: dict[str, set[str]] = {}

    def take(self, network: Network) -> str:
        if network.id not in self._used:
            v = self._view
            self._used[network.id] = used_addresses(network.id, v.all(Service), v.all(Node),
                                                    v.all(Task))
        return allocate(network, self._used[network.id])


class Allocator(Component):
    """Allocates overlay addresses, then moves NEW tasks to PENDING."""

    kinds = ("task", "service", "node", "network")
    name = "allocator"

    def tick(self, now: float) -> float | None:
        view = self.store.view()
        networks = {n.id: n for n in view.all(Network)}
        ingress = next((n for n in networks.values() if n.spec.ingress), None)
        pools = _Pools(view)
        changes: list[Node | Service | Task] = []  # written in one transaction below

        for node in view.all(Node):
            have = {a.network_id for a in node.attachments}
            missing = [n for n in networks.values() if n.id not in have]
            kept = [a for a in node.attachments if a.network_id in networks]
            if missing or len(kept) != len(node.attachments):
                try:
                    added = [NetworkAttachment(network_id=n.id, addr=pools.take(n)) for n in missing]
                except AddressExhausted:
                    continue  # the node works without it; tasks there just can't use that network
                changes.append(node.model_copy(update={"attachments": kept + added}))

        for svc in view.all(Service):
            if svc.spec.endpoint_mode != "vip":
                continue
            want = [nid for nid in svc.spec.networks if nid in networks]
            have = {a.network_id for a in svc.vips}
            if set(want) - have:
                try:
                    vips = list(svc.vips) + [NetworkAttachment(network_id=nid, addr=pools.take(networks[nid]))
                                             for nid in want if nid not in have]
                except AddressExhausted:
                    continue
                changes.append(svc.model_copy(update={"vips": vips}))

        services = {s.id: s for s in view.all(Service)}
        for t in view.all(Task):
            if t.status.state is not TaskState.NEW:
                continue
            owner = services.get(t.service_id)
            try:
                attachments = [NetworkAttachment(network_id=nid, addr=pools.take(networks[nid]))
                               for nid in (service_networks(owner, ingress) if owner else [])
                               if nid in networks]
            except AddressExhausted as exc:
                if t.status.err != str(exc):
                    status = t.status.model_copy(update={"err": str(exc), "message": "allocation failed"})
                    changes.append(t.model_copy(update={"status": status}))
                continue
            status = t.status.model_copy(update={"state": TaskState.PENDING, "err": "",
                                                 "message": "pending task scheduling", "timestamp": now})
            changes.append(t.model_copy(update={"status": status, "networks": attachments}))

        if changes:
            def write(tx: WriteTx) -> None:
                for obj in changes:
                    tx.update(obj)  # type: ignore[type-var]  # each is one of the stored kinds
            self.store.update(write)
        return None
