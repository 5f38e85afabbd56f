"""corral: a Swarm-style orchestrator with a routing mesh."""

__version__ = "0.1.0"
