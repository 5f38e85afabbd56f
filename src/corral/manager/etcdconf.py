"""Where a manager finds etcd: its endpoints and, when etcd asks for it, the TLS material a
client shows it (etcd's CA, a client certificate and key). Kept in the manager's directory —
``etcd.json`` and ``etcd-tls/`` (the key 0600) — and handed to managers that join."""

from __future__ import annotations

import json
import ssl
import tempfile
from pathlib import Path

from corral.api.errors import InvalidArgument
from corral.api.types import Model
from corral.security.files import write_private
from corral.store.etcd_client import EtcdClient

CONFIG = "etcd.json"
TLS_DIR = "etcd-tls"


class EtcdConfig(Model):
    endpoints: list[str]
    ca: str = ""  # PEM of the CA that signed etcd's certificates ("": plain HTTP)
    cert: str = ""  # PEM client certificate for etcd's --client-cert-auth
    key: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.ca)

    def check(self) -> None:
        if not self.endpoints:
            raise InvalidArgument("--store etcd needs --etcd-endpoints HOST:PORT[,HOST:PORT…]")
        if bool(self.cert) != bool(self.key):
            raise InvalidArgument("--etcd-cert and --etcd-key go together")
        if self.cert and not self.ca:
            raise InvalidArgument("a client certificate for etcd needs --etcd-cacert too")
        try:
            if self.tls:
                self._context()  # refuses bad PEM now rather than at the first write
        except (ssl.SSLError, ValueError) as exc:
            raise InvalidArgument(f"cannot use the etcd TLS files: {exc}") from None

    def save(self, data_dir: Path) -> None:
        d = data_dir / "manager"
        d.mkdir(parents=True, exist_ok=True)
        if self.tls:
            t = d / TLS_DIR
            t.mkdir(exist_ok=True, mode=0o700)
            (t / "ca.pem").write_text(self.ca)
            if self.cert:
                (t / "cert.pem").write_text(self.cert)
                write_private(t / "key.pem", self.key.encode())
        (d / CONFIG).write_text(json.dumps({"endpoints": self.endpoints, "tls": self.tls}))

    @classmethod
    def load(cls, data_dir: Path) -> EtcdConfig | None:
        """This node's manager's etcd, or None (its store is SQLite)."""
        d = data_dir / "manager"
        try:
            raw = json.loads((d / CONFIG).read_text())
        except FileNotFoundError:
            return None
        conf = cls(endpoints=list(raw["endpoints"]))
        if raw.get("tls"):
            t = d / TLS_DIR
            conf.ca = (t / "ca.pem").read_text()
            if (t / "cert.pem").exists():
                conf.cert, conf.key = (t / "cert.pem").read_text(), (t / "key.pem").read_text()
        return conf

    def client(self) -> EtcdClient:
        return EtcdClient(self.endpoints, tls=self._context() if self.tls else None)

    def _context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=self.ca)
        if self.cert:
            # load_cert_chain reads files only: a private scratch copy for the moment it takes.
            with tempfile.TemporaryDirectory() as tmp:
                cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
                cert.write_text(self.cert)
                write_private(key, self.key.encode())
                ctx.load_cert_chain(cert, key)
        return ctx
