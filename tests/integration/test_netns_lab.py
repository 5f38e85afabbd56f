"""The netns lab: every node a "real host" (own network namespace, own address on a lab bridge).

This module's labs live in 10.99.7.0/24 (the shared lab in .0/25, short-lived ones in .128/25)
and publish ports 19400-19499.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.api.errors import CorralError
from corral.lab import lab as lab_mod
from corral.lab.hosts import list_links, list_namespaces
from corral.lab.lab import NEEDS_ROOT, Lab, check_root, parse_subnet
from corral.testing.labs import LabSwarm, http_get, lab_swarm, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the netns lab needs root")

SUBNET = "10.99.7.0/25"
SPARE_SUBNET = "10.99.7.128/25"  # for the labs a single test brings up and down


def corral(*args: str, input: str | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run the CLI (no CORRAL_HOST/CORRAL_LAB_DIR from the environment)."""
    env = {k: v for k, v in os.environ.items() if k not in ("CORRAL_HOST", "CORRAL_LAB_DIR")}
    return subprocess.run([sys.executable, "-m", "corral", *args], capture_output=True, text=True,
                          input=input, timeout=timeout, env=env,
                          stdin=None if input is not None else subprocess.DEVNULL)


def lab_traces(lab: Lab) -> list[str]:
    """Everything of `lab` still on the machine: namespaces, links, daemon processes."""
    prefix = lab.hosts.prefix
    found = [f"netns {n}" for n in list_namespaces() if n.startswith(prefix + "-")]
    found += [f"link {n}" for n in list_links() if n == prefix or n.startswith(prefix + "n")]
    found += [f"pid {p}" for p in lab_mod._daemons_under(lab.dir)]
    return found


def ip_br_link() -> str:
    return subprocess.run(["ip", "-br", "link"], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabSwarm]:
    with lab_swarm(tmp_path_factory.mktemp("netns"), 3, netns=True, subnet=SUBNET) as s:
        yield s
    assert lab_traces(s.lab) == []


@pytest.fixture
def spare_lab(tmp_path: Path) -> Iterator[Path]:
    """A lab dir for a test's own lab; whatever the test leaves is removed."""
    d = tmp_path / "lab"
    try:
        yield d
    finally:
        lab = Lab(d)
        if lab.state_file.exists():
            lab.load()
        else:
            lab.netns, lab.prefix = True, lab.hosts.prefix
        lab.down()


def test_nodes_are_namespaces_on_a_lab_bridge(swarm: LabSwarm) -> None:
    lab = swarm.lab
    assert swarm.addrs == ["10.99.7.11", "10.99.7.12", "10.99.7.13"]
    prefix = lab.prefix
    assert len(prefix) == 7 and prefix.startswith("crl") and lab.bridge == prefix
    state = json.loads(lab.state_file.read_text())
    assert state["netns"] is True and state["subnet"] == SUBNET and state["bridge"] == prefix
    assert state["namespaces"] == [f"{prefix}-node{i}" for i in (1, 2, 3)]

    bridge = subprocess.run(["ip", "-br", "-4", "addr", "show", "dev", prefix],
                            capture_output=True, text=True, check=True).stdout
    assert "10.99.7.1/25" in bridge and " UP " in bridge
    links = ip_br_link()
    for i in (1, 2, 3):
        assert f"{prefix}n{i}@" in links
    for i, n in enumerate(lab.nodes, 1):
        assert n.netns in list_namespaces()
        eth0 = json.loads(swarm.exec(n.name, "ip", "-j", "addr", "show", "dev", "eth0").out)[0]
        assert eth0["mtu"] == 1500 and "UP" in eth0["flags"]
        assert [a["local"] for a in eth0["addr_info"] if a["family"] == "inet"] == [f"10.99.7.1{i}"]
        assert "UP" in json.loads(swarm.exec(n.name, "ip", "-j", "link", "show", "lo").out)[0]["flags"]
        routes = json.loads(swarm.exec(n.name, "ip", "-j", "route", "show").out)
        # The lab subnet on eth0 (plus the node's overlay bridges), and no default route:
        # nothing leaves the lab.
        assert [r["dst"] for r in routes if r.get("dev") == "eth0"] == ["10.99.7.0/25"]
        assert all(r["dst"] != "default" for r in routes)
        assert all(r.get("dev") == "eth0" or r.get("dev", "").startswith("cb") for r in routes)
        # The daemon itself runs inside the node's namespace.
        ident = subprocess.run(["ip", "netns", "identify", str(n.pid)], capture_output=True,
                               text=True, check=True).stdout.strip()
        assert ident == n.netns


def test_node_ls_shows_three_ready_nodes(swarm: LabSwarm) -> None:
    out = swarm.ok("node", "ls").out.splitlines()
    assert len(out) == 4
    assert sorted(line.split()[1] if "*" not in line else line.split()[2] for line in out[1:]) == \
        ["node1", "node2", "node3"]
    assert all("Ready" in line for line in out[1:])


def test_service_mesh_across_namespaces(swarm: LabSwarm) -> None:
    r = swarm.ok("service", "create", "--name", "search", "--replicas", "3", "-p", "19400:9200",
                 "whoami")
    assert r.out.splitlines()[-1] == "verify: Service converged"
    tasks = {t["id"] for t in swarm.running("search")}
    assert len(tasks) == 3
    # From the root namespace, through the bridge, every node's published port reaches all 3.
    for addr in swarm.addrs:
        seen = [http_get(addr, 19400) for _ in range(6)]
        assert {s["task_id"] for s in seen} == tasks
        assert all(s["service"] == "search" for s in seen)
    # From one node's namespace to another's address.
    r = swarm.ok("lab", "exec", "node2", "--", "curl", "-s", "--noproxy", "*", "-m", "5",
                 "http://10.99.7.13:19400/")
    assert json.loads(r.out)["service"] == "search"
    py = swarm.exec("node1", sys.executable, "-c",
                    "import urllib.request as u; print(u.urlopen('http://10.99.7.12:19400/', "
                    "timeout=5).read().decode())")
    assert py.code == 0 and json.loads(py.out)["task_id"] in tasks
    swarm.ok("service", "rm", "search")


def test_kill_and_start_a_node(swarm: LabSwarm) -> None:
    assert swarm.ok("lab", "kill", "node3").out.strip() == "node3 killed"
    wait_for(lambda: swarm.nodes()["node3"]["status"]["state"] == "down", timeout=30,
             what="node3 to be Down")
    assert "Down" in next(line for line in swarm.ok("node", "ls").out.splitlines() if "node3" in line)
    ps = swarm.ok("lab", "ps").out.splitlines()
    assert ps[0].split() == ["NAME", "ADDRESS", "PID", "STATUS", "NAMESPACE", "LOG"]
    assert ps[3].split()[:2] == ["node3", "10.99.7.13"] and "stopped" in ps[3]
    swarm.ok("lab", "start", "node3")
    wait_for(lambda: swarm.nodes()["node3"]["status"]["state"] == "ready", timeout=30,
             what="node3 to be Ready again")
    n3 = swarm.lab.load().node("node3")
    ident = subprocess.run(["ip", "netns", "identify", str(n3.pid)], capture_output=True,
                           text=True, check=True).stdout.strip()
    assert ident == n3.netns


def test_lab_env_exec_and_exit_codes(swarm: LabSwarm) -> None:
    assert swarm.ok("lab", "env", "node2").out.splitlines() == [
        "export CORRAL_HOST=10.99.7.12:2377", f"export CORRAL_CERT_PATH={swarm.lab.tls_dir}"]
    r = swarm.cli("lab", "exec", "node2", "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (r.code, r.out, r.err) == (7, "out\n", "err\n")
    r = swarm.cli("lab", "exec", "node3", "ip", "-br", "-4", "addr", "show", "dev", "eth0")
    assert r.code == 0 and "10.99.7.13/25" in r.out
    p = subprocess.run([sys.executable, "-m", "corral", "lab", "exec", "--dir", str(swarm.lab.dir),
                        "node1", "--", "cat"], input="through stdin\n", capture_output=True,
                       text=True, timeout=30)
    assert (p.returncode, p.stdout) == (0, "through stdin\n")
    r = swarm.cli("lab", "exec", "node1", "--", "no-such-command-here")
    assert r.code == 127 and "command not found" in r.err
    r = swarm.cli("lab", "exec", "node9", "--", "true")
    assert r.code == 1 and "no lab node node9" in r.err


def test_bad_subnets_are_refused(tmp_path: Path, swarm: LabSwarm) -> None:
    d = str(tmp_path / "lab")
    for subnet, msg in [("nonsense", "invalid --subnet 'nonsense'"),
                        ("10.99.7.5/24", "has host bits set"),
                        ("10.99.7.0/29", "too few addresses for 3 nodes"),
                        ("8.8.8.0/24", "private IPv4 subnet"),
                        ("10.99.7.0/24", "overlaps route 10.99.7.0/25")]:
        r = corral("lab", "up", "--netns", "--subnet", subnet, "--dir", d)
        assert r.returncode == 1 and msg in r.stderr, (subnet, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
    r = corral("lab", "up", "--subnet", SPARE_SUBNET, "--dir", d)
    assert r.returncode == 1 and "--subnet needs --netns" in r.stderr
    assert not (tmp_path / "lab").exists()


def test_down_removes_everything_even_after_a_kill(spare_lab: Path) -> None:
    d = str(spare_lab)
    r = corral("lab", "up", "--nodes", "2", "--netns", "--subnet", SPARE_SUBNET, "--heartbeat",
               "500ms", "--dir", d)
    assert r.returncode == 0, r.stderr
    lab = Lab(spare_lab).load()
    assert lab.netns and lab_traces(lab)
    env = dict(os.environ, CORRAL_HOST=f"{lab.nodes[0].addr}:2377", CORRAL_CERT_PATH=str(lab.tls_dir))
    subprocess.run([sys.executable, "-m", "corral", "service", "create", "--name", "web",
                    "--replicas", "2", "-p", "19401:80", "whoami"], check=True, env=env,
                   capture_output=True, timeout=60)
    # Daemons run in the node namespaces, tasks (netns runtime) in their own namespaces.
    spaces = [p.name for p in Path("/run/netns").iterdir() if p.name.startswith(f"{lab.prefix}-")]
    tasks = [int(x) for ns in spaces for x in subprocess.run(
        ["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()]
    assert len(tasks) >= 4  # 2 daemons + 2 whoami tasks
    # A stray namespace of the kind the daemons make for tasks is removed too.
    subprocess.run(["ip", "netns", "add", f"{lab.prefix}-t-stray"], check=True)
    assert corral("lab", "kill", "node2", "--dir", d).returncode == 0
    r = corral("lab", "down", "--dir", d)
    assert r.returncode == 0 and "Lab removed." in r.stdout, r.stderr
    assert lab_traces(lab) == []
    assert lab.prefix not in ip_br_link()
    assert not any(lab_mod.pid_alive(p) for p in tasks)
    assert not spare_lab.exists()


def test_existing_namespaces_are_refused_and_down_removes_them(spare_lab: Path) -> None:
    lab = Lab(spare_lab)
    leftover = f"{lab.hosts.prefix}-node1"
    subprocess.run(["ip", "netns", "add", leftover], check=True)
    r = corral("lab", "up", "--nodes", "2", "--netns", "--subnet", SPARE_SUBNET, "--dir", str(spare_lab))
    assert r.returncode == 1
    assert f"netns {leftover}" in r.stderr and "run `corral lab down" in r.stderr
    assert leftover in list_namespaces(), "up must not remove what it refused to touch"
    r = corral("lab", "down", "--dir", str(spare_lab))
    assert r.returncode == 0, r.stderr
    assert leftover not in list_namespaces()


def test_failed_up_cleans_up(spare_lab: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kw: object) -> None:
        raise CorralError("the lab's nodes did not all become ready in time")

    monkeypatch.setattr(Lab, "_wait_nodes_ready", boom)
    lab = Lab(spare_lab)
    with pytest.raises(CorralError, match="did not all become ready"):
        lab.up(2, netns=True, subnet=SPARE_SUBNET, progress=lambda _: None)
    assert lab_traces(lab) == []
    assert not spare_lab.exists()


def test_non_root_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(CorralError) as exc:
        check_root(euid=1000)
    assert exc.value.message == NEEDS_ROOT == "the netns lab needs root (network namespaces)"
    check_root(euid=0)
    # The whole CLI path, in this process, as a user who is not root. (Not with setpriv in a
    # subprocess: an unprivileged user may not be able to read the checkout at all.)
    from corral.cli.entry import main
    d = tmp_path / "lab"
    monkeypatch.setattr(lab_mod.os, "geteuid", lambda: 65534)
    monkeypatch.setattr(sys, "argv", ["corral", "lab", "up", "--netns", "--dir", str(d)])
    with pytest.raises(SystemExit) as code:
        main()
    assert (code.value.code, capsys.readouterr().err.strip()) == (1, f"Error: {NEEDS_ROOT}")
    assert not d.exists()


def test_parse_subnet() -> None:
    assert str(parse_subnet("10.99.7.0/24", 50)) == "10.99.7.0/24"
    with pytest.raises(CorralError, match="too few addresses"):
        parse_subnet("10.99.7.0/27", 21)
    assert parse_subnet("10.99.7.0/27", 20).prefixlen == 27
