"""Real etcd members for tests and the lab: a cluster of N on loopback, always cleaned up."""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from corral.store.etcd_member import member_argv, wait_healthy

ETCD_MISSING = "etcd is not installed (Debian: etcd-server; `make test` installs it as root)"


def etcd_available() -> bool:
    return shutil.which("etcd") is not None


def make_tls(directory: Path, addrs: list[str]) -> dict[str, Path]:
    """A CA, a server certificate for `addrs` (IP SANs, as etcd's clients check) and a client
    certificate: what etcd's --cert-file/--key-file/--trusted-ca-file/--client-cert-auth use."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from corral.security.pki import create_root_ca, key_to_pem
    directory.mkdir(parents=True, exist_ok=True)
    ca = create_root_ca("etcd-test")
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    now = dt.datetime.now(dt.timezone.utc)

    def issue(name: str, usage: list[x509.ObjectIdentifier], sans: list[x509.GeneralName]) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
             .issuer_name(ca_cert.subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=1))
             .not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.ExtendedKeyUsage(usage), critical=False))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{name}-key.pem").write_bytes(key_to_pem(key))

    # etcd's JSON gateway dials etcd itself showing the server certificate: it must be good
    # for client authentication too (etcd's own guides issue them that way).
    issue("server", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
          [x509.IPAddress(ipaddress.ip_address(a)) for a in addrs])
    issue("client", [ExtendedKeyUsageOID.CLIENT_AUTH], [])
    (directory / "ca.pem").write_bytes(ca.cert_pem)
    return {"ca": directory / "ca.pem", "server": directory / "server.pem",
            "server-key": directory / "server-key.pem", "client": directory / "client.pem",
            "client-key": directory / "client-key.pem"}


@dataclass
class Member:
    name: str
    addr: str
    client_port: int
    peer_port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None

    scheme: str = "http"

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://{self.addr}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.addr}:{self.peer_port}"


@dataclass
class EtcdCluster:
    """`size` members on `addrs` (one loopback address each), client port 2379, peer 2380."""

    root: Path
    addrs: list[str]
    token: str = "corral-test"
    members: list[Member] = field(default_factory=list)
    tls: bool = False  # clients over TLS, with client certificates required
    tls_files: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.members = [Member(f"etcd{i + 1}", a, 2379, 2380, self.root / f"etcd{i + 1}",
                               scheme="https" if self.tls else "http")
                        for i, a in enumerate(self.addrs)]
        self._verify: ssl.SSLContext | bool = True  # how health checks trust the members
        if self.tls:
            self.tls_files = f = make_tls(self.root / "tls", self.addrs)
            self._verify = ssl.create_default_context(cafile=str(f["ca"]))
            self._verify.load_cert_chain(f["client"], f["client-key"])

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self, timeout: float = 30.0) -> None:
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            self._spawn(m, initial)
        deadline = time.monotonic() + timeout
        for m in self.members:
            self.wait_healthy(m, deadline)

    def _spawn(self, m: Member, initial: str | None) -> None:
        """Start `m`: a new cluster's member (`initial`), or an existing one on its data."""
        m.data_dir.mkdir(parents=True, exist_ok=True)
        argv = member_argv(m.name, m.data_dir, m.endpoint, m.peer_url, initial, self.token)
        if self.tls:
            f = self.tls_files
            argv += ["--cert-file", str(f["server"]), "--key-file", str(f["server-key"]),
                     "--trusted-ca-file", str(f["ca"]), "--client-cert-auth"]
        with open(m.data_dir.parent / f"{m.name}.log", "ab") as log:
            m.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_healthy(self, m: Member, deadline: float) -> None:
        proc = m.proc
        assert proc is not None
        if wait_healthy(m.endpoint, deadline, self._verify, lambda: proc.poll() is None):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{m.name} exited ({proc.returncode}); see "
                               f"{m.data_dir.parent / (m.name + '.log')}")
        raise RuntimeError(f"{m.name} did not become healthy in time")

    def kill(self, i: int) -> None:
        """SIGKILL member `i` (a host dying)."""
        m = self.members[i]
        if m.proc is not None and m.proc.poll() is None:
            os.killpg(m.proc.pid, signal.SIGKILL)
            m.proc.wait(5)

    def restart(self, i: int, timeout: float = 30.0) -> None:
        """Start member `i` again on its data (it rejoins the cluster); nothing if it runs."""
        m = self.members[i]
        if m.proc is not None and m.proc.poll() is None:
            return  # a second etcd on its ports and data would fail, and orphan the first
        self._spawn(self.members[i], None)
        self.wait_healthy(self.members[i], time.monotonic() + timeout)

    def stop(self) -> None:
        """SIGTERM every member, wait (the last can take seconds), then SIGKILL."""
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                os.killpg(m.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for m in self.members:
            if m.proc is None:
                continue
            try:
                m.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(m.proc.pid, signal.SIGKILL)
                m.proc.wait(5)
