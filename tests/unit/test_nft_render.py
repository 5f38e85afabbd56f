"""Golden tests for the nftables VIP ruleset renderer (pure, no nft needed)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from corral.dataplane.nft import (
    TABLE,
    NftError,
    VipRule,
    apply,
    command,
    render_delete,
    render_vip_table,
)

HEAD: list[dict[str, Any]] = [
    {"add": {"table": {"family": "ip", "name": "corral"}}},
    {"delete": {"table": {"family": "ip", "name": "corral"}}},
    {"add": {"table": {"family": "ip", "name": "corral"}}},
    {
        "add": {
            "chain": {
                "family": "ip",
                "table": "corral",
                "name": "output",
                "type": "nat",
                "hook": "output",
                "prio": -100,
                "policy": "accept",
            }
        }
    },
    # Conntrack pin: a ct expression keeps conntrack on in the namespace even
    # when no dnat rule is left, so established DNATed connections survive.
    {
        "add": {
            "rule": {
                "family": "ip",
                "table": "corral",
                "chain": "output",
                "comment": "corral: keeps conntrack on for established DNAT",
                "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}}],
            }
        }
    },
]

FILTER_CHAIN: dict[str, Any] = {
    "add": {
        "chain": {
            "family": "ip",
            "table": "corral",
            "name": "reject",
            "type": "filter",
            "hook": "output",
            "prio": 0,
            "policy": "accept",
        }
    }
}


def daddr(addr: str) -> dict[str, Any]:
    return {
        "match": {
            "op": "==",
            "left": {"payload": {"protocol": "ip", "field": "daddr"}},
            "right": addr,
        }
    }


def nat_rule(expr: list[dict[str, Any]]) -> dict[str, Any]:
    return {"add": {"rule": {"family": "ip", "table": "corral", "chain": "output", "expr": expr}}}


def reject_rule(expr: list[dict[str, Any]]) -> dict[str, Any]:
    return {"add": {"rule": {"family": "ip", "table": "corral", "chain": "reject", "expr": expr}}}


def numgen_map(backends: list[str]) -> dict[str, Any]:
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


def test_zero_vips_is_a_nat_chain_with_only_the_pin() -> None:
    assert render_vip_table([]) == {"nftables": HEAD}


def test_one_vip_one_backend_is_a_plain_dnat() -> None:
    got = render_vip_table([VipRule("10.98.0.2", ("10.98.0.11",))])
    assert got == {
        "nftables": [*HEAD, nat_rule([daddr("10.98.0.2"), {"dnat": {"addr": "10.98.0.11"}}])]
    }


def test_one_vip_three_backends_exact_json() -> None:
    # The shape `nft -j list table` prints for
    #   ip daddr 10.98.0.2 dnat to numgen inc mod 3 map { 0 : .11, 1 : .12, 2 : .13 }
    got = render_vip_table([VipRule("10.98.0.2", ("10.98.0.11", "10.98.0.12", "10.98.0.13"))])
    expected_text = """
    {"nftables": [
      {"add": {"table": {"family": "ip", "name": "corral"}}},
      {"delete": {"table": {"family": "ip", "name": "corral"}}},
      {"add": {"table": {"family": "ip", "name": "corral"}}},
      {"add": {"chain": {"family": "ip", "table": "corral", "name": "output", "type": "nat",
                         "hook": "output", "prio": -100, "policy": "accept"}}},
      {"add": {"rule": {"family": "ip", "table": "corral", "chain": "output",
                        "comment": "corral: keeps conntrack on for established DNAT",
                        "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}},
                                            "right": "new"}}]}}},
      {"add": {"rule": {"family": "ip", "table": "corral", "chain": "output", "expr": [
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                   "right": "10.98.0.2"}},
        {"dnat": {"addr": {"map": {
          "key": {"numgen": {"mode": "inc", "mod": 3, "offset": 0}},
          "data": {"set": [[0, "10.98.0.11"], [1, "10.98.0.12"], [2, "10.98.0.13"]]}}}}}
      ]}}}
    ]}
    """
    assert got == json.loads(expected_text)


def test_three_vips_sorted_numerically() -> None:
    rules = [
        VipRule("10.98.0.10", ("10.98.1.1", "10.98.1.2")),
        VipRule("10.98.0.2", ("10.98.2.1", "10.98.2.2", "10.98.2.3")),
        VipRule("10.98.0.9", ("10.98.3.1",)),
    ]
    assert render_vip_table(rules) == {
        "nftables": [
            *HEAD,
            nat_rule([daddr("10.98.0.2"), numgen_map(["10.98.2.1", "10.98.2.2", "10.98.2.3"])]),
            nat_rule([daddr("10.98.0.9"), {"dnat": {"addr": "10.98.3.1"}}]),
            nat_rule([daddr("10.98.0.10"), numgen_map(["10.98.1.1", "10.98.1.2"])]),
        ]
    }


def test_empty_backend_vip_rejects() -> None:
    rules = [
        VipRule("10.98.0.3", ()),
        VipRule("10.98.0.2", ("10.98.0.11", "10.98.0.12")),
    ]
    tcp = {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}
    assert render_vip_table(rules) == {
        "nftables": [
            *HEAD,
            FILTER_CHAIN,
            nat_rule([daddr("10.98.0.2"), numgen_map(["10.98.0.11", "10.98.0.12"])]),
            reject_rule([daddr("10.98.0.3"), tcp, {"reject": {"type": "tcp reset"}}]),
            reject_rule(
                [daddr("10.98.0.3"), {"reject": {"type": "icmp", "expr": "port-unreachable"}}]
            ),
        ]
    }


def test_input_order_does_not_matter_but_backend_order_does() -> None:
    a = VipRule("10.98.0.2", ("10.98.0.11", "10.98.0.12"))
    b = VipRule("10.98.0.3", ())
    c = VipRule("10.98.0.4", ("10.98.0.13",))
    first = json.dumps(render_vip_table([a, b, c]))
    assert json.dumps(render_vip_table([c, b, a])) == first
    assert json.dumps(render_vip_table([b, c, a])) == first
    swapped = VipRule("10.98.0.2", ("10.98.0.12", "10.98.0.11"))
    assert json.dumps(render_vip_table([swapped, b, c])) != first


def test_custom_table_name_everywhere() -> None:
    got = render_vip_table([VipRule("10.98.0.2", ()), VipRule("10.98.0.5", ("10.98.0.6",))], "t1")
    text = json.dumps(got)
    assert '"corral"' not in text
    for cmd in got["nftables"]:
        (obj,) = cmd.values()
        (kind, body) = next(iter(obj.items()))
        assert body["table" if kind != "table" else "name"] == "t1"


def test_addresses_are_validated() -> None:
    with pytest.raises(ValueError, match="VIP"):
        render_vip_table([VipRule("fd00::1", ("10.98.0.11",))])
    with pytest.raises(ValueError, match="backend"):
        render_vip_table([VipRule("10.98.0.2", ("not-an-ip",))])
    with pytest.raises(ValueError, match="twice"):
        render_vip_table([VipRule("10.98.0.2", ()), VipRule("10.98.0.2", ("10.98.0.11",))])


def test_render_delete() -> None:
    assert render_delete() == {
        "nftables": [
            {"add": {"table": {"family": "ip", "name": TABLE}}},
            {"delete": {"table": {"family": "ip", "name": TABLE}}},
        ]
    }
    assert render_delete("x")["nftables"][1] == {"delete": {"table": {"family": "ip", "name": "x"}}}


def test_command_argv() -> None:
    assert command() == ["nft", "-j", "-f", "-"]
    assert command("ns1", "/usr/sbin/nft") == [
        "ip", "netns", "exec", "ns1", "/usr/sbin/nft", "-j", "-f", "-",
    ]


def test_apply_rejects_non_rulesets_before_running_nft() -> None:
    # nft exits 0 on syntactically invalid JSON, so apply() must never send any.
    with pytest.raises(NftError, match="nftables"):
        apply({"tables": []}, nft="/nonexistent/nft")
    with pytest.raises(NftError, match="JSON"):
        apply({"nftables": [float("nan")]}, nft="/nonexistent/nft")


def test_apply_reports_missing_binary() -> None:
    with pytest.raises(NftError, match="cannot run"):
        apply(render_delete(), nft="/nonexistent/nft")
