"""A node's own TLS material on disk (its certificate, key and the roots it trusts) and the
TLS contexts made from them, kept current as the certificate renews or the roots rotate."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import ssl
from pathlib import Path

from corral.security import pki
from corral.security.files import write_private
from corral.security.pki import Identity

RENEW_AT = 0.5
"""Renew once less than this share of the certificate's lifetime is left (swarmkit: 50–80 %)."""


class NodeTLS:
    """``DIR/ca.pem`` (trusted roots), ``DIR/node.pem``, ``DIR/node-key.pem`` (0600)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._pending_key: bytes | None = None
        # new_csr() .. install() is one renewal: held across it (role change vs. half-life).
        self.renewing = asyncio.Lock()
        self._server: ssl.SSLContext | None = None
        self._client: ssl.SSLContext | None = None
        # Bumped when the trusted roots change: contexts are then new objects, so listeners
        # and sessions built on the old ones must be rebuilt.
        self.generation = 0

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def cert_file(self) -> Path:
        return self.dir / "node.pem"

    @property
    def key_file(self) -> Path:
        return self.dir / "node-key.pem"

    def exists(self) -> bool:
        return self.cert_file.exists() and self.key_file.exists() and self.ca_file.exists()

    def bundle(self) -> bytes:
        return self.ca_file.read_bytes()

    def identity(self) -> Identity:
        return pki.identity(self.cert_file.read_bytes())

    def new_csr(self) -> bytes:
        """A request for a new certificate; its key is kept until :meth:`install`."""
        key = pki.new_key()
        self._pending_key = pki.key_to_pem(key)
        return pki.make_csr(key)

    def install(self, cert_pem: bytes, bundle_pem: bytes | None = None) -> None:
        """Store a certificate issued for the last :meth:`new_csr` (and the roots to trust);
        live contexts pick it up for their next handshakes."""
        if self._pending_key is None:
            raise RuntimeError("install() without a pending certificate request")
        if bundle_pem is not None:
            self._write_bundle(bundle_pem)
        write_private(self.key_file, self._pending_key)
        write_private(self.cert_file, cert_pem)
        self._pending_key = None
        for ctx in (self._server, self._client):
            if ctx is not None:
                ctx.load_cert_chain(self.cert_file, self.key_file)

    def _write_bundle(self, bundle_pem: bytes) -> None:
        write_private(self.ca_file, bundle_pem)  # atomically: readers never see half a file

    def trust(self, bundle_pem: bytes) -> bool:
        """Trust exactly these roots from now on; True if that changed anything."""
        if self.ca_file.exists() and self.bundle() == bundle_pem:
            return False
        self._write_bundle(bundle_pem)
        self._server = self._client = None
        self.generation += 1
        return True

    def server_context(self) -> ssl.SSLContext:
        if self._server is None:
            self._server = pki.server_context(self.bundle(), str(self.cert_file), str(self.key_file))
        return self._server

    def client_context(self) -> ssl.SSLContext:
        if self._client is None:
            self._client = pki.client_context(self.bundle(), str(self.cert_file), str(self.key_file))
        return self._client

    def needs_renewal(self, now: dt.datetime | None = None) -> bool:
        ident = self.identity()
        return ident.remaining(now) < ident.lifetime() * RENEW_AT

    def forget(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self._server = self._client = None
        self.generation += 1
