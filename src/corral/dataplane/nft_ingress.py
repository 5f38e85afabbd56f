"""The kernel fast path for the routing mesh: published ports as nftables DNAT on the node.

How this works: in the node's own network namespace one table, rendered here as data from the
endpoint state, DNATs connections to `node address:published port` (from outside: prerouting;
from the node itself: output) to the service's running tasks on their ingress-network address
and target port, round-robin with `numgen`. Connections leaving towards a task are masqueraded
to the node's address on the overlay, so a task on another node answers back through this
node — as Swarm's ingress sandbox does. The table is replaced atomically on every change;
established connections keep their translation in conntrack, so a removed backend gets no new
connection while its existing ones finish.

This needs forwarding in the node's namespace (never in the host's: the netns runtime keeps
every node in a namespace of its own).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TABLE = "corral_ingress"
FAMILY = "ip"
PORTS_MAP = "ports"
LOCAL_MARK = 0x636F  # "co": set on traffic=local connections, which are not source-NATed


@dataclass(frozen=True)
class IngressRule:
    """One published port and where its connections go."""

    port: int
    protocol: str  # "tcp" or "udp"
    backends: tuple[tuple[str, int], ...]  # (task address, target port)
    lb: str = "rr"  # rr (numgen inc), random (numgen random) or source-hash (jhash saddr)
    local: bool = False  # traffic=local: local tasks only, no source NAT (client IP kept)
    affinity: float | None = None  # client-IP stickiness, seconds (a timed set per backend)


def _table(name: str) -> dict[str, Any]:
    return {"table": {"family": FAMILY, "name": name}}


def _chain(table: str, name: str, hook: str, prio: int) -> dict[str, Any]:
    return {"add": {"chain": {"family": FAMILY, "table": table, "name": name, "type": "nat",
                              "hook": hook, "prio": prio, "policy": "accept"}}}


def _match(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _selector(lb: str, n: int) -> dict[str, Any]:
    """The expression that picks a backend index 0..n-1."""
    if lb == "random":
        return {"numgen": {"mode": "random", "mod": n, "offset": 0}}
    if lb == "source-hash":
        return {"jhash": {"expr": {"payload": {"protocol": "ip", "field": "saddr"}},
                          "mod": n, "seed": 0, "offset": 0}}
    return {"numgen": {"mode": "inc", "mod": n, "offset": 0}}


def _dnat(backends: Sequence[tuple[str, int]], lb: str = "rr") -> dict[str, Any]:
    ports = {p for _, p in backends}
    if len(ports) != 1:
        raise ValueError("the kernel path needs every backend of a port on the same target port")
    port = ports.pop()
    addrs = [a for a, _ in backends]
    if len(addrs) == 1:
        return {"dnat": {"addr": addrs[0], "port": port}}
    return {"dnat": {"addr": {"map": {
        "key": _selector(lb, len(addrs)),
        "data": {"set": [[i, a] for i, a in enumerate(addrs)]}}}, "port": port}}


def _rule(table: str, chain: str, expr: list[dict[str, Any]]) -> dict[str, Any]:
    return {"add": {"rule": {"family": FAMILY, "table": table, "chain": chain, "expr": expr}}}


def _port_chain(r: IngressRule) -> str:
    return f"p_{r.protocol}_{r.port}"


def _port_rule(table: str, r: IngressRule) -> dict[str, Any]:
    """The one rule of a port's chain: its head, then DNAT."""
    return _rule(table, _port_chain(r), [*_head(r), _dnat(r.backends, r.lb)])


def _head(r: IngressRule) -> list[dict[str, Any]]:
    """Transport match (nft needs it before a port), and the traffic=local mark."""
    expr = [_match({"meta": {"key": "l4proto"}}, r.protocol)]
    if r.local:
        # Marked so postrouting leaves the client's address alone: the local task's replies
        # come back through this node (its default route) anyway.
        expr.append({"mangle": {"key": {"meta": {"key": "mark"}}, "value": LOCAL_MARK}})
    return expr


def _sticky_names(r: IngressRule, i: int) -> tuple[str, str]:
    return f"a_{r.protocol}_{r.port}_{i}", f"b_{r.protocol}_{r.port}_{i}"


def _add_port(table: str, r: IngressRule) -> list[dict[str, Any]]:
    """Everything one port needs: its chain (and, with affinity, a timed set and a chain per
    backend, kube-proxy style), and its entry in the ports map."""
    cmds: list[dict[str, Any]] = []
    if r.affinity is None:
        cmds += [{"add": _chain_ref(table, r)}, _port_rule(table, r)]
    else:
        port = r.backends[0][1]
        for i, (addr, _) in enumerate(r.backends):
            aff, chain = _sticky_names(r, i)
            cmds.append({"add": {"set": {"family": FAMILY, "table": table, "name": aff,
                                         "type": "ipv4_addr", "flags": ["timeout"],
                                         "timeout": max(1, int(r.affinity))}}})
            cmds.append({"add": {"chain": {"family": FAMILY, "table": table, "name": chain}}})
            cmds.append(_rule(table, chain, _head(r) + [
                {"set": {"op": "update", "elem": {"payload": {"protocol": "ip", "field": "saddr"}},
                         "set": f"@{aff}"}},
                {"dnat": {"addr": addr, "port": port}}]))
        cmds.append({"add": _chain_ref(table, r)})
        for i, (addr, _) in enumerate(r.backends):
            aff, _chain = _sticky_names(r, i)
            # A client seen recently goes back where it went (and its entry stays fresh).
            cmds.append(_rule(table, _port_chain(r), _head(r) + [
                _match({"payload": {"protocol": "ip", "field": "saddr"}}, f"@{aff}"),
                {"dnat": {"addr": addr, "port": port}}]))
        cmds.append(_rule(table, _port_chain(r), [{"vmap": {
            "key": _selector(r.lb, len(r.backends)),
            "data": {"set": [[i, {"goto": {"target": _sticky_names(r, i)[1]}}]
                             for i in range(len(r.backends))]}}}]))
    cmds.append({"add": _element(table, r, verdict=True)})
    return cmds


def _remove_port(table: str, r: IngressRule) -> list[dict[str, Any]]:
    """The reverse of `_add_port`, references first."""
    cmds: list[dict[str, Any]] = [{"delete": _element(table, r, verdict=False)},
                                  {"flush": _chain_ref(table, r)}, {"delete": _chain_ref(table, r)}]
    if r.affinity is not None:
        for i in range(len(r.backends)):
            aff, chain = _sticky_names(r, i)
            ref = {"chain": {"family": FAMILY, "table": table, "name": chain}}
            cmds += [{"flush": ref}, {"delete": ref},
                     {"delete": {"set": {"family": FAMILY, "table": table, "name": aff}}}]
    return cmds


def _element(table: str, r: IngressRule, verdict: bool) -> dict[str, Any]:
    key = {"concat": [r.protocol, r.port]}
    elem: Any = [key, {"jump": {"target": _port_chain(r)}}] if verdict else key
    return {"element": {"family": FAMILY, "table": table, "name": PORTS_MAP, "elem": [elem]}}


def _chain_ref(table: str, r: IngressRule) -> dict[str, Any]:
    return {"chain": {"family": FAMILY, "table": table, "name": _port_chain(r)}}


def _validate(rules: Sequence[IngressRule]) -> list[IngressRule]:
    live = []
    for r in sorted(rules, key=lambda r: (r.protocol, r.port)):
        for a, _ in r.backends:
            ipaddress.IPv4Address(a)
        if r.backends:
            _dnat(r.backends, r.lb)  # refuses mixed target ports early
            live.append(r)  # a port without backends has no entry: the kernel refuses it
    return live


def render_ingress_table(node_addr: str, rules: Sequence[IngressRule],
                         table: str = TABLE) -> dict[str, Any]:
    """nft JSON that atomically replaces the node's ingress table (pure, deterministic).

    Layout: one rule per hook looks the (protocol, port) up in a verdict map and jumps to the
    port's own chain, which holds its DNAT rule — so a change to one port rewrites that one
    chain (see `render_ingress_update`) and leaves every other port's state alone.
    """
    addr = str(ipaddress.IPv4Address(node_addr))
    live = _validate(rules)
    cmds: list[dict[str, Any]] = [
        {"add": _table(table)}, {"delete": _table(table)}, {"add": _table(table)},
        {"add": {"map": {"family": FAMILY, "table": table, "name": PORTS_MAP,
                         "type": ["inet_proto", "inet_service"], "map": "verdict"}}},
    ]
    for r in live:
        cmds += _add_port(table, r)
    lookup = [_match({"payload": {"protocol": "ip", "field": "daddr"}}, addr),
              {"vmap": {"key": {"concat": [{"meta": {"key": "l4proto"}},
                                           {"payload": {"protocol": "th", "field": "dport"}}]},
                        "data": f"@{PORTS_MAP}"}}]
    for chain, hook in (("prerouting", "prerouting"), ("output", "output")):
        cmds.append(_chain(table, chain, hook, -100))
        cmds.append(_rule(table, chain, lookup))
    cmds.append(_chain(table, "postrouting", "postrouting", 100))
    # Replies must come back through this node: source-NAT what we DNATed towards the tasks.
    cmds.append(_rule(table, "postrouting", [
        _match({"ct": {"key": "status"}}, "dnat", op="in"),
        _match({"meta": {"key": "mark"}}, LOCAL_MARK, op="!="),
        _match({"ct": {"key": "daddr", "family": "ip", "dir": "original"}}, addr),
        {"masquerade": None}]))
    return {"nftables": cmds}


def render_ingress_update(old: Sequence[IngressRule], new: Sequence[IngressRule],
                          table: str = TABLE) -> dict[str, Any] | None:
    """The smallest transaction taking the table from `old` to `new` (None: no change).

    Only the ports that changed are touched: their chain is flushed and rewritten, added or
    removed with its map entry. Other ports keep their rules, counters and round-robin state.
    """
    before = {(r.protocol, r.port): r for r in _validate(old)}
    after = {(r.protocol, r.port): r for r in _validate(new)}
    cmds: list[dict[str, Any]] = []
    for key, r in sorted(before.items()):
        was_new = after.get(key)
        if was_new is None or (was_new != r and (r.affinity or was_new.affinity)):
            # Gone — or sticky, whose per-backend sets and chains are rebuilt whole.
            cmds += _remove_port(table, r)
    for key, r in sorted(after.items()):
        was = before.get(key)
        if was is None or (was != r and (r.affinity or was.affinity)):
            cmds += _add_port(table, r)
        elif was != r:
            cmds += [{"flush": _chain_ref(table, r)}, _port_rule(table, r)]
    return {"nftables": cmds} if cmds else None


def render_delete(table: str = TABLE) -> dict[str, Any]:
    """Remove the ingress table if present."""
    return {"nftables": [{"add": _table(table)}, {"delete": _table(table)}]}


def enable_forwarding() -> None:
    """Let this namespace route between its underlay and its overlay bridges."""
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
