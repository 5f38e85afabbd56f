"""Secrets: sealed in the store, resolved by name, delivered only to nodes whose tasks use them,
written as files with their modes."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest

from corral.agent.exec import TaskFailed
from corral.agent.secrets import remove_task_secrets, write_task_secrets
from corral.api.errors import Conflict, InvalidArgument
from corral.api.types import (
    ContainerSpec,
    NodeRole,
    SecretReference,
    SecretSpec,
    ServiceSpec,
    Task,
    TaskState,
)
from corral.cli.parse import parse_secret
from corral.manager.controlapi import ControlAPI, JoinRequest
from corral.manager.dispatcher import Dispatcher
from corral.manager.secretbox import SecretBox
from corral.security.pki import make_csr, new_key
from corral.store.base import MemoryStore, WriteTx

CSR = make_csr(new_key()).decode()


def test_box_seals_and_binds_the_id(tmp_path: Path) -> None:
    box = SecretBox.at(tmp_path / "k")
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    sealed = box.seal(b"hunter2", "s1")
    assert b"hunter2" not in base64.b64decode(sealed) and sealed != box.seal(b"hunter2", "s1")
    assert SecretBox.at(tmp_path / "k").open(sealed, "s1") == b"hunter2"  # same key on reopen
    with pytest.raises(ValueError):
        box.open(sealed, "s2")
    with pytest.raises(ValueError):
        SecretBox.at(None).open(sealed, "s1")


@pytest.mark.parametrize(("flag", "name", "target", "mode"), [
    ("db", "db", "", 0o444),
    ("source=db,target=password,mode=0400", "db", "password", 0o400),
    ("src=db", "db", "", 0o444),
])
def test_parse_secret(flag: str, name: str, target: str, mode: int) -> None:
    ref = parse_secret(flag)
    assert (ref.secret_name, ref.target, ref.mode) == (name, target, mode)


@pytest.mark.parametrize("flag", ["", "target=x", "source=db,mode=999", "source=db,bogus=1",
                                  "source=../etc", "source=db,target=../../x"])
def test_parse_secret_refuses(flag: str) -> None:
    with pytest.raises(InvalidArgument, match="secret"):
        parse_secret(flag)


@pytest.fixture
def api() -> ControlAPI:
    api = ControlAPI(MemoryStore())
    api.init_cluster(hostname="m", addr="10.0.0.1", heartbeat_period=1.0, engine_version="t",
                     csr=CSR)
    return api


def spec(*refs: SecretReference) -> ServiceSpec:
    return ServiceSpec(name="web", task=ContainerSpec(image="whoami", secrets=list(refs)))


def test_control_api_secrets(api: ControlAPI) -> None:
    s = api.create_secret(SecretSpec(name="db"), b"hunter2")
    assert s.size == 7 and b"hunter2" not in base64.b64decode(s.sealed)
    assert api.open_secret(s) == b"hunter2"
    with pytest.raises(Conflict):
        api.create_secret(SecretSpec(name="db"), b"x")
    with pytest.raises(InvalidArgument, match="empty"):
        api.create_secret(SecretSpec(name="e"), b"")
    with pytest.raises(InvalidArgument, match="too large"):
        api.create_secret(SecretSpec(name="big"), b"x" * (500 * 1024 + 1))
    with pytest.raises(InvalidArgument, match="secret not found: nope"):
        api.create_service(spec(SecretReference(secret_name="nope")))
    with pytest.raises(InvalidArgument, match="duplicate secret target"):
        api.create_service(spec(SecretReference(secret_name="db"),
                                SecretReference(secret_name="db")))
    svc = api.create_service(spec(SecretReference(secret_name="db", target="pw")))
    assert svc.spec.task.secrets[0].secret_id == s.id
    with pytest.raises(InvalidArgument, match="in use by the following service: web"):
        api.remove_secret("db")
    api.remove_service("web")
    assert api.remove_secret("db").id == s.id and api.secrets() == []


def test_only_nodes_whose_tasks_use_a_secret_get_it(api: ControlAPI) -> None:
    s = api.create_secret(SecretSpec(name="db"), b"hunter2")
    token = api.join_token(NodeRole.WORKER, rotate=False)
    w = api.join(JoinRequest(token=token, hostname="w", addr="10.0.0.2", csr=CSR))
    svc = api.create_service(spec(SecretReference(secret_name="db")))
    ref = svc.spec.task.secrets[0]
    task = Task(id="t1", service_id=svc.id, service_name="web", slot=1, node_id=w.node_id,
                spec=svc.spec.task, desired_state=TaskState.RUNNING)
    task.status.state = TaskState.ASSIGNED

    def add(tx: WriteTx) -> None:
        tx.create(task)
    api.store.update(add)
    d = Dispatcher(api.store, api.open_secret)
    got = d.assignments(w.node_id).secrets
    assert [(x.id, base64.b64decode(x.data)) for x in got] == [(ref.secret_id, b"hunter2")]
    manager = next(n for n in api.nodes() if n.id != w.node_id)
    assert d.assignments(manager.id).secrets == []


def test_task_files(tmp_path: Path) -> None:
    refs = [SecretReference(secret_name="db", secret_id="s1", target="pw", mode=0o400),
            SecretReference(secret_name="tls", secret_id="s2")]
    d = write_task_secrets(tmp_path / "root", "t1", refs, {"s1": b"hunter2", "s2": b"cert"})
    assert (d / "pw").read_bytes() == b"hunter2" and (d / "tls").read_bytes() == b"cert"
    assert stat.S_IMODE((d / "pw").stat().st_mode) == 0o400
    assert stat.S_IMODE((d / "tls").stat().st_mode) == 0o444
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "root").stat().st_mode) == 0o700
    with pytest.raises(TaskFailed, match="tls has not reached this node"):
        write_task_secrets(tmp_path / "root", "t2", refs, {"s1": b"x"})
    remove_task_secrets(tmp_path / "root", "t1")
    assert not d.exists()
