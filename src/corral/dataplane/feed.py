"""Translate the dispatcher's endpoint list into the mesh's input (pure)."""

from __future__ import annotations

from corral.dataplane.ingress import Backend, LbPolicy, PublishedPort
from corral.dataplane.nft_ingress import IngressRule
from corral.manager.dispatcher import Endpoint


def endpoints_to_mesh(endpoints: list[Endpoint]) -> dict[PublishedPort, list[Backend]]:
    """Published ports (TCP and UDP) → backends."""
    out: dict[PublishedPort, list[Backend]] = {}
    for ep in endpoints:
        out[PublishedPort(ep.port.published_port, ep.port.protocol)] = [
            Backend(addr, port, task_id) for addr, port, task_id in ep.backends]
    return out


def endpoints_to_kernel(endpoints: list[Endpoint]) -> list[IngressRule]:
    """Published ports (TCP and UDP) → the kernel path's DNAT rules, in a stable order."""
    return sorted((IngressRule(ep.port.published_port, ep.port.protocol,
                               tuple((addr, port) for addr, port, _ in ep.backends), ep.lb,
                               ep.port.traffic == "local", ep.lb_affinity)
                   for ep in endpoints), key=lambda r: (r.protocol, r.port))


# What nftables can do itself: round-robin and random with numgen, source hash with jhash
# (and client-IP affinity on top of any of them, with a timed set per backend).
KERNEL_LB = ("rr", "random", "source-hash")


def kernel_capable(ep: Endpoint) -> bool:
    """Whether the kernel path can serve this port as asked (else the userspace proxy does)."""
    return ep.lb in KERNEL_LB and not ep.port.proxy_protocol


def policies_of(endpoints: list[Endpoint]) -> dict[PublishedPort, LbPolicy]:
    """Each published port's balancing policy for the userspace mesh."""
    out: dict[PublishedPort, LbPolicy] = {}
    for ep in endpoints:
        # PROXY headers are a TCP stream thing (v2 has a UDP form, not used here).
        version = {"": 0, "v1": 1, "v2": 2}[ep.port.proxy_protocol] if ep.port.protocol == "tcp" else 0
        out[PublishedPort(ep.port.published_port, ep.port.protocol)] = (ep.lb, ep.lb_affinity, version)
    return out
