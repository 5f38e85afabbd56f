"""IP address management for overlay networks (pure).

Nothing is remembered apart from the objects themselves: the addresses in use are exactly
those held by services (VIPs), nodes (their bridge address) and tasks that may still run, so
an address comes free as soon as its holder is gone — there is no pool to leak from.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from corral.api.errors import Conflict, InvalidArgument
from corral.api.types import Network, Node, Service, Task

MIN_PREFIX = 8
MAX_PREFIX = 29  # at least 6 usable addresses


class AddressExhausted(Exception):
    """The network has no free address left."""


def parse_subnet(subnet: str) -> ipaddress.IPv4Network:
    """A valid IPv4 subnet for an overlay network, or InvalidArgument."""
    try:
        net = ipaddress.ip_network(subnet, strict=True)
    except ValueError as exc:
        raise InvalidArgument(f"invalid subnet {subnet!r}: {exc}") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise InvalidArgument(f"invalid subnet {subnet!r}: only IPv4 subnets are supported")
    if not MIN_PREFIX <= net.prefixlen <= MAX_PREFIX:
        raise InvalidArgument(f"invalid subnet {subnet!r}: prefix length must be between "
                              f"/{MIN_PREFIX} and /{MAX_PREFIX}")
    if net.is_loopback or net.is_multicast or net.is_link_local:
        raise InvalidArgument(f"invalid subnet {subnet!r}: loopback, link-local and multicast "
                              "ranges cannot be overlay networks")
    return net


def check_overlap(subnet: ipaddress.IPv4Network, others: Iterable[Network]) -> None:
    for other in others:
        if subnet.overlaps(ipaddress.ip_network(other.spec.subnet)):
            raise Conflict(f"subnet {subnet} overlaps with network {other.spec.name} "
                           f"({other.spec.subnet})")


def gateway_of(subnet: str) -> str:
    return str(next(ipaddress.ip_network(subnet).hosts()))


def used_addresses(network_id: str, services: Iterable[Service], nodes: Iterable[Node],
                   tasks: Iterable[Task]) -> set[str]:
    """IPs held on a network by VIPs, nodes and tasks that have not finished."""
    used: set[str] = set()
    for s in services:
        used |= {a.ip for a in s.vips if a.network_id == network_id}
    for n in nodes:
        used |= {a.ip for a in n.attachments if a.network_id == network_id}
    for t in tasks:
        if not t.status.state.terminal:
            used |= {a.ip for a in t.networks if a.network_id == network_id}
    return used


def allocate(network: Network, used: set[str]) -> str:
    """The lowest free address of the network, in CIDR form; adds it to `used`."""
    net = ipaddress.ip_network(network.spec.subnet)
    for host in net.hosts():
        ip = str(host)
        if ip == network.gateway or ip in used:
            continue
        used.add(ip)
        return f"{ip}/{net.prefixlen}"
    raise AddressExhausted(f"no free address in network {network.spec.name} ({net})")
