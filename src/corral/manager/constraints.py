"""Placement constraints (`node.role==manager`, `node.labels.zone!=a`, ...), as in Docker Swarm.

An expression is `KEY==VALUE` or `KEY!=VALUE` (whitespace around the operator is allowed).
Keys follow swarmkit's: `node.id`, `node.hostname`, `node.role`, `node.platform.os`,
`node.platform.arch`, `node.labels.<label>` and `engine.labels.<label>` (corral has no
separate engine labels, so those match node labels too). Fixed keys and label prefixes are
case-insensitive; label names are case-sensitive. Values of fixed keys compare
case-insensitively, label values exactly. A node without the label fails `==` and passes `!=`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from corral.api.errors import InvalidArgument
from corral.api.types import Node, NodeRole

Operator = Literal["==", "!="]

_FIXED_KEYS = ("node.id", "node.hostname", "node.role", "node.platform.os", "node.platform.arch")
_LABEL_PREFIXES = ("node.labels.", "engine.labels.")
_KEYS_HELP = (
    "expected node.id, node.hostname, node.role, node.platform.os, node.platform.arch, "
    "node.labels.<label> or engine.labels.<label>"
)
# Like swarmkit: a value must not contain current or future operators (=, !, <, >, ~ ...).
_VALUE_RE = re.compile(r"^[A-Za-z0-9:\-_\s.*()?+\[\]\\^$|/@,]+$")
_LABEL_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-/]+$")
_OPERATOR_RE = re.compile(r"==|!=")


@dataclass(frozen=True)
class Constraint:
    """One parsed constraint; `key` is normalised (lower-case fixed part, label name as given)."""

    key: str
    op: Operator
    value: str

    def __str__(self) -> str:
        """The constraint as an expression, e.g. `node.role==manager`."""
        return f"{self.key}{self.op}{self.value}"

    @property
    def label(self) -> str | None:
        """The label name for a label key, None for a fixed key."""
        for prefix in _LABEL_PREFIXES:
            if self.key.startswith(prefix):
                return self.key[len(prefix) :]
        return None

    def matches(self, node: Node) -> bool:
        """Whether `node` satisfies this constraint."""
        label = self.label
        if label is not None:
            actual = node.spec.labels.get(label)
            equal = actual is not None and actual == self.value
        else:
            equal = _fixed_value(self.key, node).casefold() == self.value.casefold()
        return equal if self.op == "==" else not equal


def _fixed_value(key: str, node: Node) -> str:
    """The node's value for a fixed (non-label) key."""
    if key == "node.id":
        return node.id
    if key == "node.hostname":
        return node.description.hostname
    if key == "node.role":
        return node.spec.role.value
    if key == "node.platform.os":
        return node.description.os
    if key == "node.platform.arch":
        return node.description.arch
    raise AssertionError(f"unknown constraint key {key!r}")  # parse_constraint refuses these


def _normalise_key(key: str, expr: str) -> str:
    """The canonical spelling of `key`, or InvalidArgument if it is not a supported key."""
    lowered = key.lower()
    if lowered in _FIXED_KEYS:
        return lowered
    for prefix in _LABEL_PREFIXES:
        if lowered.startswith(prefix):
            name = key[len(prefix) :]
            if not name or not _LABEL_NAME_RE.match(name):
                raise InvalidArgument(
                    f'invalid constraint key "{key}" in "{expr}": missing or invalid label name'
                )
            return prefix + name
    raise InvalidArgument(f'invalid constraint key "{key}": {_KEYS_HELP}')


def parse_constraint(expr: str) -> Constraint:
    """Parse one `KEY==VALUE` / `KEY!=VALUE` expression; InvalidArgument if malformed."""
    found = _OPERATOR_RE.search(expr)
    syntax_error = InvalidArgument(
        f'invalid constraint "{expr}": expected KEY==VALUE or KEY!=VALUE'
    )
    if found is None:
        raise syntax_error
    key = expr[: found.start()].strip()
    value = expr[found.end() :].strip()
    if not key or not value or any(c.isspace() for c in key):
        raise syntax_error
    op: Operator = "==" if found.group() == "==" else "!="
    key = _normalise_key(key, expr)
    if not _VALUE_RE.match(value):
        raise InvalidArgument(
            f'invalid constraint value "{value}" in "{expr}": '
            "it must not contain operators or characters such as = ! < > ~"
        )
    if key == "node.role" and value.lower() not in {r.value for r in NodeRole}:
        raise InvalidArgument(
            f'invalid constraint value "{value}" for node.role: expected worker or manager'
        )
    return Constraint(key=key, op=op, value=value)


def parse_constraints(exprs: list[str]) -> list[Constraint]:
    """Parse a list of expressions (all must hold); InvalidArgument on the first bad one."""
    return [parse_constraint(e) for e in exprs]


def node_matches(constraints: list[Constraint], node: Node) -> bool:
    """Whether `node` satisfies every constraint (an empty list matches every node)."""
    return all(c.matches(node) for c in constraints)
