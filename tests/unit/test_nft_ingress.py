"""The kernel mesh's ruleset, rendered as data."""

from __future__ import annotations

import json

import pytest

from corral.api.types import PortConfig
from corral.dataplane.feed import endpoints_to_kernel
from corral.dataplane.nft_ingress import (
    IngressRule,
    render_delete,
    render_ingress_table,
    render_ingress_update,
)
from corral.manager.dispatcher import Endpoint


def rules_of(ruleset: dict[str, object], chain: str) -> list[list[dict[str, object]]]:
    return [c["add"]["rule"]["expr"] for c in ruleset["nftables"]  # type: ignore[attr-defined]
            if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == chain]


def test_table_is_replaced_atomically() -> None:
    cmds = render_ingress_table("10.99.0.11", [])["nftables"]
    assert cmds[:3] == [{"add": {"table": {"family": "ip", "name": "corral_ingress"}}},
                        {"delete": {"table": {"family": "ip", "name": "corral_ingress"}}},
                        {"add": {"table": {"family": "ip", "name": "corral_ingress"}}}]
    hooks = {c["add"]["chain"]["hook"] for c in cmds if "chain" in c.get("add", {})}
    assert hooks == {"prerouting", "output", "postrouting"}


def test_round_robin_dnat_to_the_target_port() -> None:
    r = render_ingress_table("10.99.0.11", [IngressRule(9200, "tcp", (("10.0.0.5", 9200),
                                                                      ("10.0.0.6", 9200)))])
    (lookup,) = rules_of(r, "prerouting")
    assert rules_of(r, "output") == [lookup]
    assert lookup[0]["match"]["right"] == "10.99.0.11"
    assert lookup[1]["vmap"]["data"] == "@ports"
    (port,) = rules_of(r, "p_tcp_9200")
    assert port[0]["match"]["right"] == "tcp"
    dnat = port[-1]["dnat"]
    assert dnat["port"] == 9200
    assert dnat["addr"]["map"]["key"] == {"numgen": {"mode": "inc", "mod": 2, "offset": 0}}
    assert dnat["addr"]["map"]["data"]["set"] == [[0, "10.0.0.5"], [1, "10.0.0.6"]]
    elems = [c["add"]["element"]["elem"] for c in r["nftables"] if "element" in c.get("add", {})]
    assert elems == [[[{"concat": ["tcp", 9200]}, {"jump": {"target": "p_tcp_9200"}}]]]
    (post,) = rules_of(r, "postrouting")
    assert post[-1] == {"masquerade": None}


def test_single_backend_local_traffic_and_empty_ports() -> None:
    r = render_ingress_table("10.99.0.11", [IngressRule(80, "udp", (("10.0.0.7", 8080),),
                                                        local=True),
                                            IngressRule(81, "tcp", ())])
    (port,) = rules_of(r, "p_udp_80")
    assert port[-1] == {"dnat": {"addr": "10.0.0.7", "port": 8080}}
    assert port[1]["mangle"]["key"] == {"meta": {"key": "mark"}}, "traffic=local is marked"
    assert rules_of(r, "p_tcp_81") == [], "a port without backends gets no chain: refused"


@pytest.mark.parametrize("lb, key", [("random", "numgen"), ("source-hash", "jhash")])
def test_kernel_balancing_modes(lb: str, key: str) -> None:
    r = render_ingress_table("10.0.0.9", [IngressRule(1, "tcp", (("10.0.0.1", 1),
                                                                 ("10.0.0.2", 1)), lb)])
    (port,) = rules_of(r, "p_tcp_1")
    assert key in port[-1]["dnat"]["addr"]["map"]["key"]


def test_incremental_update_touches_only_changed_ports() -> None:
    a = IngressRule(1, "tcp", (("10.0.0.1", 1),))
    b = IngressRule(2, "tcp", (("10.0.0.2", 2),))
    b2 = IngressRule(2, "tcp", (("10.0.0.2", 2), ("10.0.0.3", 2)))
    c = IngressRule(3, "udp", (("10.0.0.4", 3),))
    assert render_ingress_update([a, b], [a, b]) is None
    cmds = render_ingress_update([a, b], [b2, c])
    assert cmds is not None
    verbs = [(next(iter(x)), next(iter(next(iter(x.values()))))) for x in cmds["nftables"]]
    assert verbs == [("delete", "element"), ("flush", "chain"), ("delete", "chain"),  # port 1
                     ("flush", "chain"), ("add", "rule"),           # port 2 rewritten
                     ("add", "chain"), ("add", "rule"), ("add", "element")]  # port 3 new
    assert "p_tcp_1" not in json.dumps(cmds["nftables"][3:])


def test_deterministic_and_validated() -> None:
    a = [IngressRule(2, "tcp", (("10.0.0.1", 1),)), IngressRule(1, "tcp", (("10.0.0.2", 1),))]
    assert render_ingress_table("10.0.0.9", a) == render_ingress_table("10.0.0.9", a[::-1])
    with pytest.raises(ValueError):
        render_ingress_table("not-an-ip", a)
    with pytest.raises(ValueError):
        render_ingress_table("10.0.0.9", [IngressRule(1, "tcp", (("10.0.0.1", 1), ("10.0.0.2", 2)))])
    assert render_delete()["nftables"][1] == {"delete": {"table": {"family": "ip",
                                                                   "name": "corral_ingress"}}}


def test_endpoints_to_kernel() -> None:
    eps = [Endpoint(service_name="b", port=PortConfig(target_port=80, published_port=8080),
                    backends=[("10.0.0.5", 80, "t1")]),
           Endpoint(service_name="a", port=PortConfig(target_port=53, published_port=53,
                                                      protocol="udp"), backends=[])]
    assert endpoints_to_kernel(eps) == [IngressRule(8080, "tcp", (("10.0.0.5", 80),)),
                                        IngressRule(53, "udp", ())]


def test_affinity_uses_a_timed_set_per_backend() -> None:
    sticky = IngressRule(80, "tcp", (("10.0.0.1", 80), ("10.0.0.2", 80)), affinity=30.0)
    r = render_ingress_table("10.0.0.9", [sticky])
    sets = [c["add"]["set"] for c in r["nftables"] if "set" in c.get("add", {})]
    assert [(x["name"], x["timeout"], x["flags"]) for x in sets] == [
        ("a_tcp_80_0", 30, ["timeout"]), ("a_tcp_80_1", 30, ["timeout"])]
    port = rules_of(r, "p_tcp_80")
    assert [e[1]["match"]["right"] for e in port[:2]] == ["@a_tcp_80_0", "@a_tcp_80_1"]
    assert port[2][0]["vmap"]["data"]["set"][1] == [1, {"goto": {"target": "b_tcp_80_1"}}]
    (b0,) = rules_of(r, "b_tcp_80_0")
    assert b0[1]["set"] == {"op": "update", "elem": {"payload": {"protocol": "ip",
                                                                  "field": "saddr"}},
                            "set": "@a_tcp_80_0"}
    # A change to a sticky port rebuilds its objects whole, in one transaction.
    fewer = IngressRule(80, "tcp", (("10.0.0.1", 80),), affinity=30.0)
    cmds = render_ingress_update([sticky], [fewer])
    assert cmds is not None
    deleted_sets = [c["delete"]["set"]["name"] for c in cmds["nftables"]
                    if "set" in c.get("delete", {})]
    assert deleted_sets == ["a_tcp_80_0", "a_tcp_80_1"]
