"""The store over an etcd that requires TLS client certificates (one real member on
127.0.0.95): what a manager keeps on disk, and what etcd refuses."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.api.errors import InvalidArgument
from corral.api.types import Node, NodeDescription
from corral.manager.etcdconf import EtcdConfig
from corral.security import pki
from corral.store.etcd import EtcdStore, Fence
from corral.store.etcd_client import EtcdUnavailable, cmp_absent, op_put
from corral.testing.etcd import ETCD_MISSING, EtcdCluster, etcd_available

pytestmark = pytest.mark.skipif(not etcd_available(), reason=ETCD_MISSING)


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd-tls"), ["127.0.0.95"], tls=True)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def config(etcd: EtcdCluster, *, cert: bool = True, ca: bytes | None = None) -> EtcdConfig:
    f = etcd.tls_files
    return EtcdConfig(endpoints=["127.0.0.95:2379"],
                      ca=(ca or f["ca"].read_bytes()).decode(),
                      cert=f["client"].read_text() if cert else "",
                      key=f["client-key"].read_text() if cert else "")


async def test_the_store_over_tls(etcd: EtcdCluster, tmp_path: Path) -> None:
    conf = config(etcd)
    conf.check()
    conf.save(tmp_path)  # what a manager keeps: the key readable by its owner only
    assert stat.S_IMODE((tmp_path / "manager" / "etcd-tls" / "key.pem").stat().st_mode) == 0o600
    assert EtcdConfig.load(tmp_path) == conf
    client = conf.client()
    assert client.endpoints == ["https://127.0.0.95:2379"]
    try:
        store = EtcdStore(client, "/tls-test/")
        await store.load()
        ok, revision = await client.txn([cmp_absent("/tls-test/leader")],
                                           [op_put("/tls-test/leader", "me")])
        assert ok
        store.lead(Fence("/tls-test/leader", revision))
        writer = asyncio.create_task(store.run_writer())
        try:
            store.update(lambda tx: tx.create(Node(id="n1", description=NodeDescription(
                hostname="h1", addr="10.0.0.1"))))
            await store.flush()
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
        again = EtcdStore(client, "/tls-test/")
        await again.load()
        assert [n.id for n in again.view().all(Node)] == ["n1"]
    finally:
        await client.close()


async def test_etcd_refuses_a_client_without_the_right_credentials(etcd: EtcdCluster) -> None:
    for conf in (config(etcd, cert=False),  # no client certificate
                 config(etcd, ca=pki.create_root_ca("other").cert_pem)):  # etcd not trusted
        client = conf.client()
        try:
            with pytest.raises(EtcdUnavailable):
                await client.range_prefix("/tls-test/")
        finally:
            await client.close()


def test_bad_tls_options_are_refused_up_front(etcd: EtcdCluster) -> None:
    conf = config(etcd)
    with pytest.raises(InvalidArgument, match="go together"):
        EtcdConfig(endpoints=conf.endpoints, ca=conf.ca, cert=conf.cert).check()
    with pytest.raises(InvalidArgument, match="needs --etcd-cacert"):
        EtcdConfig(endpoints=conf.endpoints, cert=conf.cert, key=conf.key).check()
    with pytest.raises(InvalidArgument, match="cannot use the etcd TLS files"):
        EtcdConfig(endpoints=conf.endpoints, ca="not a pem").check()
    with pytest.raises(InvalidArgument, match="needs --etcd-endpoints"):
        EtcdConfig(endpoints=[]).check()
