"""Secret files for tasks: written on a tmpfs (never a disk), in a directory only the daemon's
user can enter, and removed with the task. Values arrive with the node's assignments (only
those its tasks use) and are kept in memory, never in the node's data directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from corral.agent.exec import TaskFailed
from corral.api.types import SecretReference

TASK_SECRETS_DIR = "/run/secrets"
"""Where a task with its own mount namespace (the netns runtime) finds its secrets, as in docker."""


def secrets_root() -> Path:
    """/run/corral/secrets as root; else a private directory on /dev/shm (both tmpfs)."""
    if os.geteuid() == 0 and Path("/run").is_dir():
        return Path("/run/corral/secrets")
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() else Path(tempfile.gettempdir())
    return base / f"corral-{os.getuid()}-secrets"


def write_task_secrets(root: Path, task_id: str, refs: list[SecretReference],
                       values: Mapping[str, bytes]) -> Path:
    """One file per reference, named by its target, with its mode; returns the directory."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(root, 0o700)
    d = root / task_id
    d.mkdir(exist_ok=True, mode=0o700)
    for ref in refs:
        data = values.get(ref.secret_id)
        if data is None:
            raise TaskFailed(f"secret {ref.secret_name} has not reached this node")
        path = d / ref.file_name
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(path, ref.mode)
    return d


def remove_task_secrets(root: Path, task_id: str) -> None:
    shutil.rmtree(root / task_id, ignore_errors=True)
