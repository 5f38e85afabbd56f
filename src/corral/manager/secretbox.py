"""Seals secret values before they reach the store (AES-256-GCM with the manager's own key).

The key lives next to the CA's in the manager's data directory, readable by its owner only;
the store — and whatever copies of it exist, backups or a later etcd — holds ciphertext only.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from corral.security.files import write_private

NONCE = 12


class SecretBox:
    """Seal and open secret values with one key."""

    def __init__(self, key: bytes) -> None:
        self.key = key  # managers share it (a manager that joins gets it over mutual TLS)
        self._aead = AESGCM(key)

    @classmethod
    def at(cls, path: Path | None) -> SecretBox:
        """The key at `path`, made on first use (None: a key in memory only, for tests)."""
        if path is None:
            return cls(AESGCM.generate_key(bit_length=256))
        try:
            return cls(path.read_bytes())
        except FileNotFoundError:
            key = AESGCM.generate_key(bit_length=256)
            write_private(path, key)
            return cls(key)

    def seal(self, data: bytes, secret_id: str) -> str:
        nonce = os.urandom(NONCE)
        # The secret's id is bound in: a sealed value copied onto another secret does not open.
        return base64.b64encode(nonce + self._aead.encrypt(nonce, data, secret_id.encode())).decode()

    def open(self, sealed: str, secret_id: str) -> bytes:
        raw = base64.b64decode(sealed)
        try:
            return self._aead.decrypt(raw[:NONCE], raw[NONCE:], secret_id.encode())
        except InvalidTag:
            raise ValueError(f"secret {secret_id} does not open with this manager's key") from None
