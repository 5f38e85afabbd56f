"""The node's own identity on disk: which swarm it belongs to and how to reach the manager."""

from __future__ import annotations

import os
from pathlib import Path

from corral.api.types import Model, NodeRole


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
    p = identity_path(data_dir)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    # Not a secret any more (the certificate is the credential), but nobody else's business.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(ident.model_dump_json())
    tmp.replace(p)


def forget_identity(data_dir: Path) -> None:
    identity_path(data_dir).unlink(missing_ok=True)
