"""Parsing and matching of placement constraints."""

from __future__ import annotations

import pytest

from corral.api.errors import InvalidArgument
from corral.api.types import (
    Node,
    NodeDescription,
    NodeRole,
    NodeSpec,
    NodeState,
    NodeStatus,
)
from corral.manager.constraints import Constraint, node_matches, parse_constraint, parse_constraints


def make_node(
    node_id: str = "n1",
    hostname: str = "node1",
    role: NodeRole = NodeRole.WORKER,
    labels: dict[str, str] | None = None,
    os: str = "linux",
    arch: str = "x86_64",
) -> Node:
    return Node(
        id=node_id,
        description=NodeDescription(hostname=hostname, addr="10.0.0.1", os=os, arch=arch),
        spec=NodeSpec(role=role, labels=labels or {}),
        status=NodeStatus(state=NodeState.READY),
    )


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("node.hostname==node2", Constraint("node.hostname", "==", "node2")),
        ("node.role != manager", Constraint("node.role", "!=", "manager")),
        ("  node.id==abc  ", Constraint("node.id", "==", "abc")),
        ("Node.Hostname==Node2", Constraint("node.hostname", "==", "Node2")),
        ("node.platform.os==linux", Constraint("node.platform.os", "==", "linux")),
        ("node.platform.arch!=arm64", Constraint("node.platform.arch", "!=", "arm64")),
        ("node.labels.zone!=a", Constraint("node.labels.zone", "!=", "a")),
        ("NODE.LABELS.Zone==A", Constraint("node.labels.Zone", "==", "A")),
        ("engine.labels.disk==ssd", Constraint("engine.labels.disk", "==", "ssd")),
        ("node.labels.com.example.tier==web-1", Constraint("node.labels.com.example.tier", "==", "web-1")),
    ],
)
def test_parse(expr: str, expected: Constraint) -> None:
    assert parse_constraint(expr) == expected


def test_parse_many_and_str() -> None:
    cs = parse_constraints(["node.role==manager", "node.labels.zone != a"])
    assert [str(c) for c in cs] == ["node.role==manager", "node.labels.zone!=a"]
    assert parse_constraints([]) == []


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("node.foo~bar", 'invalid constraint "node.foo~bar": expected KEY==VALUE or KEY!=VALUE'),
        ("node.hostname", 'invalid constraint "node.hostname": expected KEY==VALUE or KEY!=VALUE'),
        ("node.hostname=node1", 'invalid constraint "node.hostname=node1": expected KEY==VALUE or KEY!=VALUE'),
        ("==node1", 'invalid constraint "==node1": expected KEY==VALUE or KEY!=VALUE'),
        ("node.hostname==", 'invalid constraint "node.hostname==": expected KEY==VALUE or KEY!=VALUE'),
        ("node hostname==x", 'invalid constraint "node hostname==x": expected KEY==VALUE or KEY!=VALUE'),
        ("", 'invalid constraint "": expected KEY==VALUE or KEY!=VALUE'),
        (
            "node.colour==x",
            'invalid constraint key "node.colour": expected node.id, node.hostname, node.role, '
            "node.platform.os, node.platform.arch, node.labels.<label> or engine.labels.<label>",
        ),
        (
            "node.labels.==x",
            'invalid constraint key "node.labels." in "node.labels.==x": missing or invalid label name',
        ),
        (
            "node.role==boss",
            'invalid constraint value "boss" for node.role: expected worker or manager',
        ),
        (
            "node.labels.a==b==c",
            'invalid constraint value "b==c" in "node.labels.a==b==c": '
            "it must not contain operators or characters such as = ! < > ~",
        ),
        (
            "node.labels.a==>b",
            'invalid constraint value ">b" in "node.labels.a==>b": '
            "it must not contain operators or characters such as = ! < > ~",
        ),
    ],
)
def test_parse_errors(expr: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        parse_constraint(expr)
    assert exc.value.message == message
    assert "\n" not in exc.value.message


def test_parse_constraints_reports_first_bad_expression() -> None:
    with pytest.raises(InvalidArgument, match='"node.colour"'):
        parse_constraints(["node.role==worker", "node.colour==x", "bad"])


NODE = make_node(
    node_id="abc123",
    hostname="Node2",
    role=NodeRole.MANAGER,
    labels={"zone": "a", "Disk": "SSD"},
    os="linux",
    arch="aarch64",
)


@pytest.mark.parametrize(
    ("expr", "matches"),
    [
        ("node.id==abc123", True),
        ("node.id!=abc123", False),
        ("node.id==zzz", False),
        ("node.hostname==node2", True),  # hostname compares case-insensitively
        ("node.hostname==NODE2", True),
        ("node.hostname!=node2", False),
        ("node.hostname==node1", False),
        ("node.role==manager", True),
        ("node.role==Manager", True),
        ("node.role==worker", False),
        ("node.role!=worker", True),
        ("node.platform.os==Linux", True),
        ("node.platform.os==windows", False),
        ("node.platform.arch==AARCH64", True),
        ("node.platform.arch!=x86_64", True),
        ("node.labels.zone==a", True),
        ("node.labels.zone==A", False),  # label values compare exactly
        ("node.labels.zone!=a", False),
        ("node.labels.zone!=b", True),
        ("node.labels.Disk==SSD", True),
        ("node.labels.disk==SSD", False),  # label names are case-sensitive (missing here)
        ("node.labels.missing==x", False),  # missing label: == fails
        ("node.labels.missing!=x", True),  # missing label: != passes
        ("engine.labels.zone==a", True),  # engine labels are node labels
        ("engine.labels.missing!=a", True),
    ],
)
def test_matches(expr: str, matches: bool) -> None:
    assert parse_constraint(expr).matches(NODE) is matches


def test_node_matches_is_a_conjunction() -> None:
    assert node_matches([], NODE)
    assert node_matches(parse_constraints(["node.role==manager", "node.labels.zone==a"]), NODE)
    assert not node_matches(parse_constraints(["node.role==manager", "node.labels.zone==b"]), NODE)
