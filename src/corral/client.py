"""The CLI's client for a daemon's API (like the docker client for DOCKER_HOST).

Two ways in, as with docker: the daemon's unix socket (``unix:///…/corral.sock``; the local
admin, root-only permissions) or its control port over mutual TLS (``HOST:2377``), with an
admin client certificate: ``--tlscacert/--tlscert/--tlskey``, or ``ca.pem``/``cert.pem``/
``key.pem`` in ``$CORRAL_CERT_PATH`` (the lab's ``tls`` directory when a lab is up).
"""

from __future__ import annotations

import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from corral.api.errors import CorralError
from corral.api.types import API_PORT
from corral.security.pki import NODE_NAME

SOCKET_NAME = "corral.sock"
"""The daemon's unix socket, in its data directory."""


class DaemonError(CorralError):
    """The daemon refused the request; the message is its one-line explanation."""


class DaemonUnreachable(CorralError):
    """No daemon answers at the address."""


def default_socket() -> str:
    """Where `corral daemon --addr 127.0.0.1` listens by default."""
    return f"unix://{Path.home() / '.corral' / 'daemon-127.0.0.1' / SOCKET_NAME}"


def _lab_nodes() -> list[dict[str, Any]]:
    from corral.lab.lab import default_lab_dir  # the lab imports this module: import late
    try:
        nodes = json.loads((default_lab_dir() / "lab.json").read_text())["nodes"]
        return list(nodes) if isinstance(nodes, list) else []
    except (OSError, ValueError, KeyError, TypeError):
        return []


def lab_manager() -> str | None:
    """The unix socket of node1 of the lab in $CORRAL_LAB_DIR (or ~/.corral/lab), if any."""
    nodes = _lab_nodes()
    try:
        return f"unix://{Path(nodes[0]['data_dir']) / SOCKET_NAME}"
    except (IndexError, KeyError, TypeError):
        return None


def resolve_host(host: str | None) -> str:
    """-H, then CORRAL_HOST, then the local lab's manager, then the default socket.

    Returns ``unix:///PATH`` or ``HOST:PORT`` (accepts HOST, HOST:PORT, tcp://…, https://…,
    unix:///PATH and a bare /PATH)."""
    h = host or os.environ.get("CORRAL_HOST") or lab_manager() or default_socket()
    if h.startswith("/"):
        return f"unix://{h}"
    if h.startswith("unix://"):
        return h
    for scheme in ("tcp://", "https://", "http://"):
        h = h.removeprefix(scheme)
    h = h.rstrip("/")
    if ":" not in h:
        h = f"{h}:{API_PORT}"
    return h


@dataclass(frozen=True)
class TlsFiles:
    """An admin client's certificate, key and the swarm's root CA, as docker's --tls* files."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_dir(cls, d: Path) -> TlsFiles:
        return cls(d / "ca.pem", d / "cert.pem", d / "key.pem")

    def context(self) -> ssl.SSLContext:
        from corral.security.pki import client_context
        for f in (self.ca, self.cert, self.key):
            if not f.is_file():
                raise DaemonUnreachable(
                    f"TLS to the daemon needs a client certificate, but {f} does not exist: set "
                    "$CORRAL_CERT_PATH or --tlscacert/--tlscert/--tlskey (`corral swarm ca "
                    "--client-cert DIR` on a manager makes them), or use the unix socket")
        try:
            return client_context(self.ca.read_bytes(), str(self.cert), str(self.key))
        except (ssl.SSLError, ValueError, OSError) as exc:
            raise DaemonUnreachable(f"cannot use the TLS files in {self.cert.parent}: {exc}") from None


def default_tls() -> TlsFiles:
    """$CORRAL_CERT_PATH, else the local lab's client certificate, else ~/.corral/tls."""
    env = os.environ.get("CORRAL_CERT_PATH")
    if env:
        return TlsFiles.in_dir(Path(env))
    from corral.lab.lab import default_lab_dir
    lab_tls = default_lab_dir() / "tls"
    if lab_tls.is_dir():
        return TlsFiles.in_dir(lab_tls)
    return TlsFiles.in_dir(Path.home() / ".corral" / "tls")


class Client:
    """Synchronous JSON calls to one daemon."""

    def __init__(self, host: str | None = None, timeout: float = 15.0,
                 tls: TlsFiles | None = None) -> None:
        self.host = resolve_host(host)
        self._ext: dict[str, Any] = {}
        try:
            if self.host.startswith("unix://"):
                self._http = httpx.Client(transport=httpx.HTTPTransport(uds=self.host[7:]),
                                          base_url="http://corral", timeout=timeout)
            else:
                ctx = (tls or default_tls()).context()
                self._http = httpx.Client(base_url=f"https://{self.host}", verify=ctx,
                                          timeout=timeout)
                # Every node's certificate carries this name; the CA is what is pinned.
                self._ext = {"sni_hostname": NODE_NAME}
        except httpx.InvalidURL as exc:
            raise DaemonUnreachable(f"invalid daemon address {self.host!r}: {exc}") from None

    def request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self._http.request(method, path, extensions=self._ext, **kw)
        except httpx.InvalidURL as exc:
            raise DaemonUnreachable(f"invalid daemon address {self.host!r}: {exc}") from None
        except httpx.ConnectError as exc:
            raise DaemonUnreachable(self._connect_failure(exc)) from None
        except httpx.TimeoutException:
            raise DaemonUnreachable(f"The corral daemon at {self.host} did not answer in time") from None
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            if not self._ext:
                raise DaemonUnreachable(f"The corral daemon at {self.host} closed the connection: "
                                        f"{exc}") from None
            # TLS 1.3: a server refusing our certificate says so after the handshake.
            raise DaemonUnreachable(
                f"The corral daemon at {self.host} closed the connection: it does not accept this "
                "client certificate (expired, revoked or of another swarm)") from None
        except httpx.HTTPError as exc:
            raise DaemonUnreachable(f"Cannot talk to the corral daemon at {self.host}: {exc}") from None
        if r.status_code >= 400:
            try:
                msg = r.json().get("message") or r.text
            except ValueError:
                msg = r.text.strip() or f"HTTP {r.status_code}"
            raise DaemonError(f"Error response from daemon: {msg}")
        return r.json() if r.content else None

    def _connect_failure(self, exc: httpx.ConnectError) -> str:
        text = str(exc)
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
            return (f"The corral daemon at {self.host} presented a certificate this client does "
                    f"not trust (another swarm's CA?): {text}")
        if "Permission denied" in text:
            return f"Permission denied on {self.host}: the daemon's socket is its owner's only"
        return f"Cannot connect to the corral daemon at {self.host}. Is the daemon running?"

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, json=body if body is not None else {})

    def delete(self, path: str, **params: Any) -> Any:
        return self.request("DELETE", path, params={k: v for k, v in params.items() if v is not None})

    def close(self) -> None:
        self._http.close()
