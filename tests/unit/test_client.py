"""Which daemon the CLI talks to: -H, $CORRAL_HOST, the local lab's manager, the default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corral.client import resolve_host


def test_order_of_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CORRAL_LAB_DIR", str(tmp_path))
    monkeypatch.delenv("CORRAL_HOST", raising=False)
    assert resolve_host(None) == "127.0.0.1:2377", "no lab: the local default"
    (tmp_path / "lab.json").write_text(json.dumps({"nodes": [{"addr": "10.99.0.11"}]}))
    assert resolve_host(None) == "10.99.0.11:2377", "a lab: its manager"
    monkeypatch.setenv("CORRAL_HOST", "http://127.0.0.12")
    assert resolve_host(None) == "127.0.0.12:2377"
    assert resolve_host("127.0.0.13:2400") == "127.0.0.13:2400"


def test_a_broken_lab_file_is_ignored(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CORRAL_LAB_DIR", str(tmp_path))
    monkeypatch.delenv("CORRAL_HOST", raising=False)
    (tmp_path / "lab.json").write_text("{not json")
    assert resolve_host(None) == "127.0.0.1:2377"
