"""The kernel mesh's rulesets against golden files (regenerate: CORRAL_UPDATE_GOLDEN=1)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from corral.dataplane.nft_ingress import IngressRule, render_ingress_table, render_ingress_update

GOLDEN = Path(__file__).parent / "golden"
RR = IngressRule(9200, "tcp", (("10.0.0.5", 9200), ("10.0.0.6", 9200), ("10.0.0.7", 9200)))
HASHED = IngressRule(8080, "tcp", (("10.0.0.8", 80), ("10.0.0.9", 80)), "source-hash")
LOCAL_UDP = IngressRule(53, "udp", (("10.0.0.10", 53),), local=True)
STICKY = IngressRule(443, "tcp", (("10.0.0.11", 8443), ("10.0.0.12", 8443)), affinity=600.0)

CASES: dict[str, Any] = {
    "ingress_table": lambda: render_ingress_table("10.99.0.11", [RR, HASHED, LOCAL_UDP, STICKY]),
    "ingress_update": lambda: render_ingress_update(
        [RR, HASHED, STICKY],
        [IngressRule(9200, "tcp", RR.backends[:2]), LOCAL_UDP,
         IngressRule(443, "tcp", STICKY.backends[:1], affinity=600.0)]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str) -> None:
    rendered = CASES[name]()
    path = GOLDEN / f"{name}.json"
    text = json.dumps(rendered, indent=1, sort_keys=True) + "\n"
    if os.environ.get("CORRAL_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{path.name} differs: review, then CORRAL_UPDATE_GOLDEN=1"


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/sbin/nft").exists(),
                    reason="needs root and nft to ask the kernel")
def test_the_kernel_accepts_the_golden_table() -> None:
    import subprocess
    import uuid
    ns = f"corral-golden-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        r = subprocess.run(["ip", "netns", "exec", ns, "nft", "-j", "-f",
                            str(GOLDEN / "ingress_table.json")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
