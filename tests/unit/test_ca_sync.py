"""Every manager signs with the root the store says: a rotation made by one leader is the
next leader's too (the CA travels sealed in the cluster object)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from corral.api.types import Cluster, NodeRole
from corral.manager.controlapi import CA_SEAL_ID, ControlAPI
from corral.manager.secretbox import SecretBox
from corral.security import pki
from corral.store.base import MemoryStore, WriteTx
from corral.store.etcd import NotWritable

CSR = pki.make_csr(pki.new_key()).decode()


def test_a_rotation_reaches_the_next_leader(tmp_path: Path) -> None:
    store, box = MemoryStore(), SecretBox.at(tmp_path / "secrets.key")
    first = ControlAPI(store, tmp_path / "m1" / "ca", box)
    first.init_cluster(hostname="m1", addr="10.0.0.1", heartbeat_period=1.0, engine_version="t",
                       csr=CSR)
    second = ControlAPI(store, tmp_path / "m2" / "ca", box)  # another manager, same store
    assert second.ca.root.cert_pem == first.ca.root.cert_pem
    assert stat.S_IMODE((tmp_path / "m2" / "ca" / "root-key.pem").stat().st_mode) == 0o600
    old_root = first.ca.root.cert_pem
    first.rotate_ca()
    assert second.ca.rotating and second.ca.root.cert_pem == first.ca.root.cert_pem != old_root
    cert = second.renew(first.nodes()[0].id, pki.make_csr(pki.new_key()))
    assert pki.signed_by(cert.cert.encode(), second.ca.root.cert_pem)
    # The only node moved: the rotation is over for both, and tokens pin the new root.
    assert not first.ca.rotating and not second.ca.rotating
    token = pki.JoinToken.parse(second.join_token(NodeRole.WORKER, rotate=False))
    assert token.pins(second.ca.root.cert_pem)
    # The key is sealed in the store, never in clear.
    sealed = store.view().cluster()
    assert sealed is not None and second.ca.root.key_pem.decode() not in sealed.model_dump_json()


def test_a_rotation_the_store_refuses_changes_nothing(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # The leader lost etcd (or its lead) mid-rotation: it must keep signing with the root
    # every other manager has, in memory and on disk.
    store, box = MemoryStore(), SecretBox.at(tmp_path / "secrets.key")
    api = ControlAPI(store, tmp_path / "m1" / "ca", box)
    api.init_cluster(hostname="m1", addr="10.0.0.1", heartbeat_period=1.0, engine_version="t",
                     csr=CSR)
    root = api.ca.root.cert_pem
    on_disk = (tmp_path / "m1" / "ca" / "root.pem").read_bytes()

    def refuse(_: object) -> None:
        raise NotWritable("lost the leadership")

    monkeypatch.setattr(store, "update", refuse)
    with pytest.raises(NotWritable):
        api.rotate_ca()
    assert api.ca.root.cert_pem == root and not api.ca.rotating
    assert (tmp_path / "m1" / "ca" / "root.pem").read_bytes() == on_disk
    assert not (tmp_path / "m1" / "ca" / "cross.pem").exists()


def test_a_published_ca_replaced_at_the_same_version_is_reloaded(tmp_path: Path) -> None:
    # This manager's rotation was queued, then dropped when it stepped down; the next leader
    # published its own at the same version number. Signing must follow the store, not ours.
    store, box = MemoryStore(), SecretBox.at(tmp_path / "secrets.key")
    api = ControlAPI(store, tmp_path / "m1" / "ca", box)
    api.init_cluster(hostname="m1", addr="10.0.0.1", heartbeat_period=1.0, engine_version="t",
                     csr=CSR)
    api.rotate_ca()
    theirs = api.ca.finish_rotation().begin_rotation(api.cluster().cluster_id)

    def replace(tx: WriteTx) -> None:
        c = tx.must_get(Cluster, "default")
        tx.update(c.model_copy(update={"ca_sealed": box.seal(theirs.to_json(), CA_SEAL_ID)}))

    version = api.cluster().ca_version
    store.update(replace)
    assert api.cluster().ca_version == version
    assert api.ca.root.cert_pem == theirs.root.cert_pem
