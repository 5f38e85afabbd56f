"""corral: a Swarm-style orchestrator with a routing mesh."""

import sys

__version__ = "0.1.0"

# httpx imports its own command line (and with it rich and pygments, ~3.5 MB in every daemon)
# whenever those are installed, which they are for corral's CLI. corral never runs httpx's
# command line: a None entry makes that one import fail, and httpx falls back to a stub.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
