"""The cluster's certificate authority, on the manager: signs node and client certificates.

The root key lives in the manager's data directory, readable by its owner only (0600); the
store holds only public parts (the root's digest, which join tokens pin). During a root
rotation the CA trusts two roots — the bundle — while it signs with the new one.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from corral.security import pki
from corral.security.files import write_private
from corral.security.pki import CertKey, Role


class CertificateAuthority:
    """Signs certificates with the current root; tells which roots nodes must trust."""

    ROOT, KEY, BUNDLE, CROSS = "root.pem", "root-key.pem", "bundle.pem", "cross.pem"

    def __init__(self, directory: Path | None, root: CertKey, bundle_pem: bytes,
                 cross_pem: bytes = b"") -> None:
        self.dir = directory
        self.root = root
        self.bundle_pem = bundle_pem
        # While rotating: the new root signed by the old one, sent with every certificate.
        self.cross_pem = cross_pem

    @classmethod
    def create(cls, directory: Path | None, cluster_id: str) -> CertificateAuthority:
        ca = cls(directory, pki.create_root_ca(cluster_id), b"")
        ca.bundle_pem = ca.root.cert_pem
        ca.save()
        return ca

    @classmethod
    def load(cls, directory: Path | None) -> CertificateAuthority | None:
        if directory is None:
            return None
        try:
            root = CertKey((directory / cls.ROOT).read_bytes(), (directory / cls.KEY).read_bytes())
            bundle = (directory / cls.BUNDLE).read_bytes()
        except FileNotFoundError:
            return None
        cross = directory / cls.CROSS
        return cls(directory, root, bundle, cross.read_bytes() if cross.exists() else b"")

    def save(self) -> None:
        if self.dir is None:  # in memory only (unit tests of the control API)
            return
        write_private(self.dir / self.KEY, self.root.key_pem)
        (self.dir / self.ROOT).write_bytes(self.root.cert_pem)
        (self.dir / self.BUNDLE).write_bytes(self.bundle_pem)
        if self.cross_pem:
            (self.dir / self.CROSS).write_bytes(self.cross_pem)
        else:
            (self.dir / self.CROSS).unlink(missing_ok=True)

    @property
    def digest(self) -> str:
        return pki.ca_digest(self.root.cert_pem)

    @property
    def key_id(self) -> str:
        """Which root signs now (hex of its key identifier; nodes record their issuer's)."""
        return pki.key_id(self.root.cert_pem).hex()

    def sign(self, csr_pem: bytes, *, node_id: str, role: Role, cluster_id: str,
             expiry: dt.timedelta) -> bytes:
        """A certificate (PEM), followed while rotating by the cross-signed new root."""
        return pki.issue(self.root, csr_pem, node_id=node_id, role=role, cluster_id=cluster_id,
                         expiry=expiry) + self.cross_pem

    def begin_rotation(self, cluster_id: str) -> CertificateAuthority:
        """The CA a rotation starts: a new root signs from then on, and both roots are trusted
        until every node moved over. Nothing changes here or on disk until it is published."""
        new = pki.create_root_ca(cluster_id)
        return CertificateAuthority(self.dir, new, self.root.cert_pem + new.cert_pem,
                                    pki.cross_sign(new, self.root))

    def finish_rotation(self) -> CertificateAuthority:
        """The CA after the rotation: only the current root is trusted (every node holds a
        certificate it signed). Not saved until it is published."""
        return CertificateAuthority(self.dir, self.root, self.root.cert_pem)

    def to_json(self) -> bytes:
        return json.dumps({"cert": self.root.cert_pem.decode(), "key": self.root.key_pem.decode(),
                           "bundle": self.bundle_pem.decode(),
                           "cross": self.cross_pem.decode()}).encode()

    @classmethod
    def from_json(cls, directory: Path | None, data: bytes) -> CertificateAuthority:
        d = json.loads(data)
        return cls(directory, CertKey(d["cert"].encode(), d["key"].encode()),
                   d["bundle"].encode(), d["cross"].encode())

    @property
    def rotating(self) -> bool:
        return len(pki.split_bundle(self.bundle_pem)) > 1
