"""The balancing choices of a service, shared by the API and the data plane (no pydantic here:
mesh worker processes import it)."""

from __future__ import annotations

from typing import Literal

# How the routing mesh may spread a service's connections over its tasks.
LbKind = Literal["rr", "random", "least-conn", "source-hash", "maglev"]
