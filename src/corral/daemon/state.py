"""The node's own identity on disk: which swarm it belongs to and how to reach the manager."""

from __future__ import annotations

from pathlib import Path

from corral.api.types import Model, NodeRole
from corral.security.files import write_private


class NodeIdentity(Model):
    """What a daemon needs to rejoin its swarm after a restart."""

    node_id: str
    role: NodeRole
    manager_addr: str
    managers: list[str] = []  # every manager known, to fail over to


def identity_path(data_dir: Path) -> Path:
    return data_dir / "node.json"


def load_identity(data_dir: Path) -> NodeIdentity | None:
    p = identity_path(data_dir)
    try:
        return NodeIdentity.model_validate_json(p.read_text())
    except FileNotFoundError:
        return None
    except ValueError:  # written by an older corral (a bearer secret, no certificate)
        return None


def save_identity(data_dir: Path, ident: NodeIdentity) -> None:
    # Not a secret any more (the certificate is the credential), but nobody else's business.
    write_private(identity_path(data_dir), ident.model_dump_json().encode())


def forget_identity(data_dir: Path) -> None:
    identity_path(data_dir).unlink(missing_ok=True)
