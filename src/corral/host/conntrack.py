"""Forgetting UDP flows: conntrack entries that still pin clients to a removed backend.

A UDP "connection" lives in conntrack for as long as packets keep coming, so without this a
client that keeps talking would stay DNATed to a task that is gone. TCP needs nothing: its
established connections should finish where they are.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable


def flush_udp_flows(node_addr: str, port: int, backends: Iterable[str]) -> int:
    """Delete the UDP flows to `node_addr:port` answered by one of `backends`; returns how
    many. Blocking (netlink): run it off the event loop."""
    # Imported here: pyroute2 is large, and only kernel-mesh nodes with UDP ports need this.
    from pyroute2 import Conntrack

    gone = set(backends)
    deleted = 0
    with Conntrack() as ct:
        for entry in list(ct.dump_entries()):
            orig, reply = entry.tuple_orig, entry.tuple_reply
            if (orig.proto == socket.IPPROTO_UDP and orig.daddr == node_addr
                    and orig.dport == port and reply.saddr in gone):
                try:
                    ct.delete(entry)
                    deleted += 1
                except OSError:  # already expired
                    pass
    return deleted
