"""The node's own identity on disk: which swarm it belongs to and how to reach the manager."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import BinaryIO

from corral.api.errors import CorralError
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


def lock_data_dir(data_dir: Path) -> BinaryIO:
    """Hold DATA_DIR/daemon.lock while this daemon runs (released when the returned file is
    closed, or the process dies). A second daemon on the same directory would kill the first
    one's tasks as leftovers of a crash, and share its store: it is refused instead."""
    data_dir.mkdir(parents=True, exist_ok=True)
    f = open(data_dir / "daemon.lock", "a+b")  # noqa: SIM115 - held for the daemon's life
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().decode(errors="replace").strip() or "unknown"
        f.close()
        raise CorralError(f"another corral daemon (pid {holder}) is using {data_dir}: stop it "
                          f"first, or give this one another --data-dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n".encode())
    f.flush()
    return f
