"""Service VIPs as nftables DNAT, inside each task's network namespace.

Like Swarm's per-container IPVS, corral installs one small nftables table in
every task's network namespace. Connections the task opens to a service VIP
(any port; the port is kept) are DNATed in the ``output`` hook to one of the
service's running task IPs, round-robin with ``numgen inc mod N map {...}``;
conntrack reverses the translation for the replies and keeps established
connections on their backend when the backend set changes. A VIP without
backends is rejected (TCP reset, ICMP port-unreachable for everything else) so
clients fail fast instead of hanging on SYN retries.

This module is pure rendering plus a thin applier that pipes the JSON ruleset
into ``nft -j -f -`` (no Python bindings: ``python3-nftables`` only imports on
the system Python). :func:`render_vip_table` replaces the whole table in one
transaction with the ``add table; delete table; add table`` idiom, so applying
is atomic and idempotent whether or not the table exists yet.

Every table carries one extra rule in the nat chain, ``ct state new`` with no
statement (a no-op: the nat chain only sees new connections anyway). It is
there for its side effect: a rule using a ``ct`` expression holds a reference
on conntrack in the namespace. Conntrack is otherwise only held by the
``dnat`` expressions, so a table without any DNAT rule (every VIP empty, or no
VIPs) would switch conntrack off in the namespace, and connections that were
DNATed before the update would lose their translation: their packets leave
addressed to the VIP (hang, or hit the reject rule). Checked on kernel 6.18.

Quirk worth knowing: nft 1.0.6 given *syntactically* invalid JSON on stdin
exits 0 and does nothing (it falls back to its native parser, which then reads
an exhausted stdin). :func:`apply` therefore only accepts a dict and
serialises it itself; structurally wrong rulesets are rejected by nft with a
non-zero exit and surface as :class:`NftError`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FAMILY",
    "FILTER_CHAIN",
    "NAT_CHAIN",
    "PIN_COMMENT",
    "TABLE",
    "TIMEOUT",
    "NftError",
    "VipRule",
    "apply",
    "apply_async",
    "command",
    "render_delete",
    "render_vip_table",
]

TABLE = "corral"
FAMILY = "ip"
NAT_CHAIN = "output"
FILTER_CHAIN = "reject"
PIN_COMMENT = "corral: keeps conntrack on for established DNAT"
# dstnat priority for the nat output hook; filter priority for the reject chain.
_NAT_PRIO = -100
_FILTER_PRIO = 0
TIMEOUT = 10.0


@dataclass(frozen=True)
class VipRule:
    """One service VIP and the task IPs behind it (round-robin in this order)."""

    vip: str
    backends: tuple[str, ...]


class NftError(Exception):
    """``nft`` refused a ruleset, timed out, or could not be run."""


def _ipv4(addr: str, what: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(addr)
    except ValueError as exc:
        raise ValueError(f"{what} {addr!r} is not an IPv4 address") from exc


def _table(table: str) -> dict[str, Any]:
    return {"table": {"family": FAMILY, "name": table}}


def _daddr(addr: str) -> dict[str, Any]:
    return {
        "match": {
            "op": "==",
            "left": {"payload": {"protocol": "ip", "field": "daddr"}},
            "right": addr,
        }
    }


def _rule(table: str, chain: str, expr: list[dict[str, Any]]) -> dict[str, Any]:
    return {"add": {"rule": {"family": FAMILY, "table": table, "chain": chain, "expr": expr}}}


def _chain(table: str, name: str, kind: str, prio: int) -> dict[str, Any]:
    return {
        "add": {
            "chain": {
                "family": FAMILY,
                "table": table,
                "name": name,
                "type": kind,
                "hook": "output",
                "prio": prio,
                "policy": "accept",
            }
        }
    }


def _dnat(backends: Sequence[str]) -> dict[str, Any]:
    if len(backends) == 1:
        return {"dnat": {"addr": backends[0]}}
    return {
        "dnat": {
            "addr": {
                "map": {
                    "key": {"numgen": {"mode": "inc", "mod": len(backends), "offset": 0}},
                    "data": {"set": [[i, b] for i, b in enumerate(backends)]},
                }
            }
        }
    }


def render_vip_table(rules: Sequence[VipRule], table: str = TABLE) -> dict[str, Any]:
    """nft JSON that atomically replaces ``table`` with the given VIP rules.

    Output is deterministic: rules are ordered by VIP (numerically), backends
    keep their given order (it is the round-robin order). The nat chain
    always starts with the conntrack-pinning rule (see the module docstring);
    a VIP with one backend is a plain ``dnat to`` without a map. The ``reject``
    filter chain exists only when some VIP has no backends, so namespaces
    without such VIPs pay no per-packet filter hook. Raises ``ValueError`` for
    a non-IPv4 address or a VIP listed twice.
    """
    by_vip: dict[ipaddress.IPv4Address, tuple[str, ...]] = {}
    for rule in rules:
        vip = _ipv4(rule.vip, "VIP")
        if vip in by_vip:
            raise ValueError(f"VIP {vip} listed twice")
        by_vip[vip] = tuple(str(_ipv4(b, f"backend of VIP {vip}")) for b in rule.backends)

    commands: list[dict[str, Any]] = [
        {"add": _table(table)},
        {"delete": _table(table)},
        {"add": _table(table)},
        _chain(table, NAT_CHAIN, "nat", _NAT_PRIO),
    ]
    commands.append(
        {
            "add": {
                "rule": {
                    "family": FAMILY,
                    "table": table,
                    "chain": NAT_CHAIN,
                    "comment": PIN_COMMENT,
                    "expr": [
                        {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}}
                    ],
                }
            }
        }
    )
    empty = [vip for vip, backends in by_vip.items() if not backends]
    if empty:
        commands.append(_chain(table, FILTER_CHAIN, "filter", _FILTER_PRIO))
    for vip in sorted(by_vip):
        backends = by_vip[vip]
        addr = str(vip)
        if backends:
            commands.append(_rule(table, NAT_CHAIN, [_daddr(addr), _dnat(backends)]))
        else:
            tcp = {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}
            commands.append(
                _rule(table, FILTER_CHAIN, [_daddr(addr), tcp, {"reject": {"type": "tcp reset"}}])
            )
            commands.append(
                _rule(
                    table,
                    FILTER_CHAIN,
                    [_daddr(addr), {"reject": {"type": "icmp", "expr": "port-unreachable"}}],
                )
            )
    return {"nftables": commands}


def render_delete(table: str = TABLE) -> dict[str, Any]:
    """nft JSON that removes ``table`` if present (``add`` makes the delete safe)."""
    return {"nftables": [{"add": _table(table)}, {"delete": _table(table)}]}


def command(netns: str | None = None, nft: str = "nft") -> list[str]:
    """The argv :func:`apply` runs: ``nft -j -f -``, inside ``netns`` if given."""
    argv = [nft, "-j", "-f", "-"]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    return argv


def _payload(ruleset: dict[str, Any]) -> bytes:
    if not isinstance(ruleset, dict) or not isinstance(ruleset.get("nftables"), list):
        raise NftError('ruleset must be a dict with an "nftables" list')
    try:
        return json.dumps(ruleset, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise NftError(f"ruleset is not serialisable as JSON: {exc}") from exc


def _one_line(stderr: bytes, returncode: int) -> str:
    lines = []
    for raw in stderr.decode(errors="replace").splitlines():
        line = raw.strip()
        # Drop nft's caret/tilde markers under the echoed input.
        if line and line.strip("^~ "):
            lines.append(line)
    text = "; ".join(lines)
    return text or f"nft exited with status {returncode}"


def apply(ruleset: dict[str, Any], netns: str | None = None, nft: str = "nft") -> None:
    """Run ``ruleset`` through ``nft -j -f -`` (in ``netns`` if given)."""
    payload = _payload(ruleset)
    argv = command(netns, nft)
    try:
        proc = subprocess.run(
            argv, input=payload, capture_output=True, timeout=TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise NftError(f"{' '.join(argv)} timed out after {TIMEOUT:g} s") from exc
    except OSError as exc:
        raise NftError(f"cannot run {argv[0]}: {exc}") from exc
    if proc.returncode != 0:
        raise NftError(_one_line(proc.stderr, proc.returncode))


async def apply_async(
    ruleset: dict[str, Any], netns: str | None = None, nft: str = "nft"
) -> None:
    """:func:`apply` without blocking the event loop.

    It runs the blocking :func:`apply` on a thread rather than using an asyncio subprocess:
    uvloop hands a child a socket, not a pipe, as its stdin, and nft cannot open
    ``/dev/stdin`` on a socket ("No such device or address").
    """
    await asyncio.to_thread(apply, ruleset, netns, nft)
