"""The CLI's client for a daemon's API (like the docker client for DOCKER_HOST)."""

from __future__ import annotations

import json
import os
from typing import Any

import httpx

from corral.api.errors import CorralError
from corral.api.types import API_PORT

DEFAULT_HOST = f"127.0.0.1:{API_PORT}"


class DaemonError(CorralError):
    """The daemon refused the request; the message is its one-line explanation."""


class DaemonUnreachable(CorralError):
    """No daemon answers at the address."""


def lab_manager() -> str | None:
    """node1 of the lab in $CORRAL_LAB_DIR (or ~/.corral/lab), if one is recorded there."""
    from corral.lab.lab import default_lab_dir  # the lab imports this module: import late
    state = default_lab_dir() / "lab.json"
    try:
        nodes = json.loads(state.read_text())["nodes"]
        return f"{nodes[0]['addr']}:{API_PORT}"
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def resolve_host(host: str | None) -> str:
    """-H, then CORRAL_HOST, then the local lab's manager, then the default; accepts HOST,
    HOST:PORT or http://HOST:PORT."""
    h = host or os.environ.get("CORRAL_HOST") or lab_manager() or DEFAULT_HOST
    h = h.removeprefix("http://").removeprefix("tcp://").rstrip("/")
    if ":" not in h:
        h = f"{h}:{API_PORT}"
    return h


class Client:
    """Synchronous JSON calls to one daemon."""

    def __init__(self, host: str | None = None, timeout: float = 15.0) -> None:
        self.host = resolve_host(host)
        try:
            self._http = httpx.Client(base_url=f"http://{self.host}", timeout=timeout)
        except httpx.InvalidURL as exc:
            raise DaemonUnreachable(f"invalid daemon address {self.host!r}: {exc}") from None

    def request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.InvalidURL as exc:
            raise DaemonUnreachable(f"invalid daemon address {self.host!r}: {exc}") from None
        except httpx.ConnectError:
            raise DaemonUnreachable(
                f"Cannot connect to the corral daemon at {self.host}. Is the daemon running?"
            ) from None
        except httpx.TimeoutException:
            raise DaemonUnreachable(f"The corral daemon at {self.host} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise DaemonUnreachable(f"Cannot talk to the corral daemon at {self.host}: {exc}") from None
        if r.status_code >= 400:
            try:
                msg = r.json().get("message") or r.text
            except ValueError:
                msg = r.text.strip() or f"HTTP {r.status_code}"
            raise DaemonError(f"Error response from daemon: {msg}")
        return r.json() if r.content else None

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, json=body if body is not None else {})

    def delete(self, path: str, **params: Any) -> Any:
        return self.request("DELETE", path, params={k: v for k, v in params.items() if v is not None})

    def close(self) -> None:
        self._http.close()
