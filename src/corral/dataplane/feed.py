"""Translate the dispatcher's endpoint list into the mesh's input (pure)."""

from __future__ import annotations

from corral.dataplane.ingress import Backend, PublishedPort
from corral.manager.dispatcher import Endpoint


def endpoints_to_mesh(endpoints: list[Endpoint]) -> dict[PublishedPort, list[Backend]]:
    """Published TCP ports → backends (UDP joins with the data-plane issue)."""
    out: dict[PublishedPort, list[Backend]] = {}
    for ep in endpoints:
        if ep.port.protocol != "tcp":
            continue
        out[PublishedPort(ep.port.published_port)] = [
            Backend(addr, port, task_id) for addr, port, task_id in ep.backends]
    return out
