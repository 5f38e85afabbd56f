"""Which daemon the CLI talks to: -H, $CORRAL_HOST, the local lab's manager, the default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corral.client import Client, DaemonUnreachable, TlsFiles, default_socket, resolve_host


def test_order_of_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CORRAL_LAB_DIR", str(tmp_path))
    monkeypatch.delenv("CORRAL_HOST", raising=False)
    assert resolve_host(None) == default_socket(), "no lab: the local default socket"
    (tmp_path / "lab.json").write_text(json.dumps(
        {"nodes": [{"addr": "10.99.0.11", "data_dir": "/labs/a/node1"}]}))
    assert resolve_host(None) == "unix:///labs/a/node1/corral.sock", "a lab: its manager's socket"
    monkeypatch.setenv("CORRAL_HOST", "http://127.0.0.12")
    assert resolve_host(None) == "127.0.0.12:2377"
    assert resolve_host("127.0.0.13:2400") == "127.0.0.13:2400"
    assert resolve_host("tcp://127.0.0.13") == "127.0.0.13:2377"
    assert resolve_host("/run/corral.sock") == "unix:///run/corral.sock"
    assert resolve_host("unix:///x/y.sock") == "unix:///x/y.sock"


def test_a_broken_lab_file_is_ignored(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CORRAL_LAB_DIR", str(tmp_path))
    monkeypatch.delenv("CORRAL_HOST", raising=False)
    (tmp_path / "lab.json").write_text("{not json")
    assert resolve_host(None) == default_socket()


def test_tcp_without_a_client_certificate_says_so(tmp_path: Path) -> None:
    with pytest.raises(DaemonUnreachable, match="needs a client certificate.*ca.pem"):
        Client("127.0.0.1:2377", tls=TlsFiles.in_dir(tmp_path))
