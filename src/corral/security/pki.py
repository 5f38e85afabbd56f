"""The cluster's PKI: a root CA, node and client certificates, join tokens pinned to the CA.

Pure functions over PEM bytes (no files, no sockets), so every decision is unit-testable.
As in swarmkit, a certificate says who its holder is: the subject's common name is the node
ID, the organizational unit its role, the organization the cluster ID — and the subject
alternative names repeat the role (``corral-manager``/``corral-worker``/``corral-client``) so a
TLS client can insist on talking to a manager by asking for that name.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import ssl
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from corral.api.errors import InvalidArgument

Role = Literal["manager", "worker", "client"]
ROLES: tuple[Role, ...] = ("manager", "worker", "client")
TOKEN_PREFIX = "SWMTKN-1"
DEFAULT_CERT_EXPIRY = dt.timedelta(days=90)  # docker's default
ROOT_CA_EXPIRY = dt.timedelta(days=20 * 365)  # swarmkit's root CA also lives 20 years
CLOCK_SKEW = dt.timedelta(minutes=1)  # certificates are valid a little before they are issued
NODE_NAME = "corral-node"
"""A name every node certificate carries: what nodes ask for when any node will do."""

_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def role_name(role: Role) -> str:
    """The DNS name (and OU) that marks a certificate's role."""
    return f"corral-{role}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _base36(data: bytes, length: int) -> str:
    n = int.from_bytes(data, "big")
    out = []
    for _ in range(length):
        n, r = divmod(n, 36)
        out.append(_B36[r])
    return "".join(reversed(out))


# -- keys and the root CA -------------------------------------------------------------------


@dataclass(frozen=True)
class CertKey:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidArgument("the CA key is not an EC key")
    return key


def create_root_ca(cluster_id: str, now: dt.datetime | None = None) -> CertKey:
    """A new self-signed root CA for one cluster (EC P-256)."""
    now = now or _now()
    key = new_key()
    # A fresh name per root: during a rotation two roots (and a cross-signed one) coexist.
    cn = f"corral-ca-{cluster_id[:12]}-{secrets.token_hex(3)}"
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster_id)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + ROOT_CA_EXPIRY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertKey(cert.public_bytes(serialization.Encoding.PEM), key_to_pem(key))


def ca_digest(cert_pem: bytes) -> str:
    """What a join token pins: sha256 of the root certificate's DER, in base 36 (50 digits)."""
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return _base36(hashlib.sha256(der).digest(), 50)


def split_bundle(pem: bytes) -> list[bytes]:
    """The certificates of a PEM bundle, one PEM each (a rotation trusts two roots at once)."""
    return [c.public_bytes(serialization.Encoding.PEM) for c in x509.load_pem_x509_certificates(pem)]


# -- issuing ------------------------------------------------------------------------------------


def make_csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A certificate request; the CA decides the subject, so the request names nobody."""
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "corral-csr")]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def issue(ca: CertKey, csr_pem: bytes, *, node_id: str, role: Role, cluster_id: str,
          expiry: dt.timedelta = DEFAULT_CERT_EXPIRY, now: dt.datetime | None = None) -> bytes:
    """Sign a node's (or client's) request: the subject says who it is and what it may do."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise InvalidArgument("invalid certificate request: not a PEM CSR") from None
    if not csr.is_signature_valid:
        raise InvalidArgument("invalid certificate request: bad signature")
    if not isinstance(csr.public_key(), ec.EllipticCurvePublicKey):
        raise InvalidArgument("invalid certificate request: the key must be EC P-256")
    now = now or _now()
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    names: list[x509.GeneralName] = [x509.DNSName(role_name(role))]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role != "client":
        names += [x509.DNSName(NODE_NAME), x509.DNSName(node_id)]
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, node_id),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role_name(role)),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        # Backdated a little for clocks that lag — but never by much of a short lifetime, which
        # renewal at half-life measures.
        .not_valid_before(now - min(CLOCK_SKEW, expiry / 10)).not_valid_after(now + expiry)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_cert.public_key()), critical=False)  # type: ignore[arg-type]
        .sign(_load_key(ca.key_pem), hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Identity:
    """Who a certificate says its holder is."""

    node_id: str
    role: Role
    cluster_id: str
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    issuer_key_id: bytes  # which root signed it (rotation moves every node to the new one)

    def remaining(self, now: dt.datetime | None = None) -> dt.timedelta:
        return self.not_after - (now or _now())

    def lifetime(self) -> dt.timedelta:
        return self.not_after - self.not_before


def identity(cert: bytes) -> Identity:
    """Parse a certificate (PEM or DER) issued by :func:`issue`."""
    try:
        c = (x509.load_pem_x509_certificate(cert) if cert.lstrip().startswith(b"-----")
             else x509.load_der_x509_certificate(cert))
    except ValueError:
        raise InvalidArgument("not a certificate") from None

    def attr(oid: x509.ObjectIdentifier) -> str:
        values = c.subject.get_attributes_for_oid(oid)
        return str(values[0].value) if values else ""

    ou = attr(NameOID.ORGANIZATIONAL_UNIT_NAME)
    role = next((r for r in ROLES if role_name(r) == ou), None)
    if role is None:
        raise InvalidArgument(f"certificate has no corral role (OU {ou!r})")
    try:
        aki = c.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except x509.ExtensionNotFound:
        aki = None
    return Identity(node_id=attr(NameOID.COMMON_NAME), role=role,
                    cluster_id=attr(NameOID.ORGANIZATION_NAME), serial=c.serial_number,
                    not_before=c.not_valid_before_utc, not_after=c.not_valid_after_utc,
                    issuer_key_id=aki or b"")


def key_id(ca_cert_pem: bytes) -> bytes:
    """The subject key identifier of a root (matches :attr:`Identity.issuer_key_id`)."""
    c = x509.load_pem_x509_certificate(ca_cert_pem)
    return x509.SubjectKeyIdentifier.from_public_key(c.public_key()).digest


def signed_by(cert_pem: bytes, ca_cert_pem: bytes) -> bool:
    """Whether `ca_cert_pem`'s key signed `cert_pem` (checks the signature, not dates)."""
    try:
        x509.load_pem_x509_certificate(cert_pem).verify_directly_issued_by(
            x509.load_pem_x509_certificate(ca_cert_pem))
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def cross_sign(new_root: CertKey, old_root: CertKey, now: dt.datetime | None = None) -> bytes:
    """The new root's certificate signed by the old root. Sent along with certificates issued
    during a root rotation, it lets nodes that still trust only the old root accept them —
    swarmkit's way to rotate without a moment where nodes cannot talk."""
    now = now or _now()
    new_cert = x509.load_pem_x509_certificate(new_root.cert_pem)
    old_cert = x509.load_pem_x509_certificate(old_root.cert_pem)
    cert = (
        x509.CertificateBuilder()
        .subject_name(new_cert.subject).issuer_name(old_cert.subject)
        .public_key(new_cert.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW).not_valid_after(old_cert.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(new_cert.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            old_cert.public_key()), critical=False)  # type: ignore[arg-type]
        .sign(_load_key(old_root.key_pem), hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def bundle_digest(bundle_pem: bytes) -> str:
    """Names a set of trusted roots (heartbeats carry it: a change means "renew now")."""
    return hashlib.sha256(bundle_pem).hexdigest()[:16]


# -- join tokens ----------------------------------------------------------------------------------


def new_join_secret() -> str:
    return _base36(secrets.token_bytes(16), 25)


@dataclass(frozen=True)
class JoinToken:
    """``SWMTKN-1-<digest of the root CA certificate>-<secret>``, as docker prints them."""

    digest: str
    secret: str

    def __str__(self) -> str:
        return f"{TOKEN_PREFIX}-{self.digest}-{self.secret}"

    @staticmethod
    def parse(text: str) -> JoinToken:
        parts = text.strip().split("-")
        if len(parts) != 4 or "-".join(parts[:2]) != TOKEN_PREFIX or not parts[2] or not parts[3]:
            raise InvalidArgument("invalid join token: expected SWMTKN-1-<digest>-<secret>")
        return JoinToken(parts[2], parts[3])

    def pins(self, ca_cert_pem: bytes) -> bool:
        """Whether `ca_cert_pem` is the root this token was made for."""
        return hmac.compare_digest(self.digest, ca_digest(ca_cert_pem))


# -- TLS contexts -----------------------------------------------------------------------------------


def _base_context(purpose: ssl.Purpose, ca_bundle_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.create_default_context(purpose, cadata=ca_bundle_pem.decode())
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def server_context(ca_bundle_pem: bytes, cert_file: str, key_file: str) -> ssl.SSLContext:
    """A node's listener: TLS 1.3, its node certificate, clients' certificates checked against
    the cluster's roots. Optional at the TLS layer only because a joining node has none yet:
    every endpoint but joining refuses a client without one (see corral.security.authz)."""
    ctx = _base_context(ssl.Purpose.CLIENT_AUTH, ca_bundle_pem)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def client_context(ca_bundle_pem: bytes, cert_file: str | None = None,
                   key_file: str | None = None) -> ssl.SSLContext:
    """Talking to a node: its certificate must chain to the cluster's roots and carry the role
    name the caller asks for as server name (hostnames mean nothing here: the CA is pinned)."""
    ctx = _base_context(ssl.Purpose.SERVER_AUTH, ca_bundle_pem)
    if cert_file and key_file:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


def bootstrap_context() -> ssl.SSLContext:
    """Only for fetching the root certificate before joining: nothing is verified here — the
    joining node checks what it got against the digest in its token instead."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx
