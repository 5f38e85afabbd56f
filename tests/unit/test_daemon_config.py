"""Daemon settings: runtime choice and refusals, decided before anything starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from corral.api.errors import InvalidArgument
from corral.daemon import config as config_mod
from corral.daemon.config import DaemonConfig


def make(**kw: object) -> DaemonConfig:
    return DaemonConfig(addr=str(kw.pop("addr", "127.0.0.1")), data_dir=Path("/tmp/x"),
                        hostname="n1", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("euid", "expected"), [(0, "netns"), (1000, "process")])
def test_auto_runtime_is_netns_only_for_root(monkeypatch: pytest.MonkeyPatch, euid: int,
                                             expected: str) -> None:
    monkeypatch.setattr(config_mod.os, "geteuid", lambda: euid)
    assert DaemonConfig.parse_runtime("auto") == expected
    assert DaemonConfig.parse_runtime(None) == expected
    assert DaemonConfig.parse_runtime("process") == "process"


def test_netns_runtime_without_root_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_mod.os, "geteuid", lambda: 1000)
    with pytest.raises(InvalidArgument, match="--runtime netns needs root"):
        make(runtime="netns")


def test_bad_runtime_name() -> None:
    with pytest.raises(InvalidArgument, match="invalid --runtime 'docker'"):
        DaemonConfig.parse_runtime("docker")


def test_wildcard_address_needs_an_advertise_address() -> None:
    with pytest.raises(InvalidArgument, match="--advertise-addr is required"):
        make(addr="0.0.0.0")
    assert make(addr="0.0.0.0", advertise_addr="192.0.2.10").advertise == "192.0.2.10"


@pytest.mark.parametrize(("initial", "runtime", "expected"), [
    (True, "netns", "userspace"),    # never turn on forwarding in the host's namespace by default
    (False, "netns", "kernel"),      # a node in its own namespace (the netns lab)
    (False, "process", "userspace"),  # the kernel path reaches tasks over the overlay only
])
def test_auto_mesh(monkeypatch: pytest.MonkeyPatch, initial: bool, runtime: str,
                   expected: str) -> None:
    monkeypatch.setattr(config_mod, "in_initial_netns", lambda: initial)
    monkeypatch.setattr(config_mod.shutil, "which", lambda _: "/usr/sbin/nft")
    assert DaemonConfig.parse_mesh("auto", runtime) == expected  # type: ignore[arg-type]
    assert DaemonConfig.parse_mesh("userspace", runtime) == "userspace"  # type: ignore[arg-type]


@pytest.mark.parametrize("prefix", ["", "x" * 21, "corral t", "a/b", "t@", "t%d"])
def test_bad_task_netns_prefix(prefix: str) -> None:
    # Task namespace names are built from it: refused at start, not at the first task.
    with pytest.raises(InvalidArgument, match="--task-netns-prefix must be 1 to 20 of"):
        make(task_netns_prefix=prefix)


def test_task_netns_prefix_of_safe_characters() -> None:
    assert make(task_netns_prefix="lab-1.t_+").task_netns_prefix == "lab-1.t_+"


def test_kernel_mesh_needs_the_netns_runtime() -> None:
    with pytest.raises(InvalidArgument, match="--mesh kernel needs --runtime netns"):
        make(mesh="kernel")



def test_mesh_workers_auto_is_one_per_usable_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_mod, "_cgroup_cpu_quota", lambda: None)
    monkeypatch.setattr(config_mod.os, "sched_getaffinity", lambda _: {0, 1, 2})
    assert DaemonConfig.parse_mesh_workers("auto") == 3
    assert DaemonConfig.parse_mesh_workers(None) == 3
    monkeypatch.setattr(config_mod.os, "sched_getaffinity", lambda _: set(range(200)))
    assert DaemonConfig.parse_mesh_workers("auto") == config_mod.MAX_MESH_WORKERS
    assert DaemonConfig.parse_mesh_workers("2") == 2


def test_bad_mesh_workers() -> None:
    with pytest.raises(InvalidArgument, match="invalid --mesh-workers 'many'"):
        DaemonConfig.parse_mesh_workers("many")
    with pytest.raises(InvalidArgument, match="--mesh-workers must be between 1 and 64"):
        make(mesh_workers=0)


def test_cgroup_cpu_quota(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert config_mod._cgroup_cpu_quota(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert config_mod._cgroup_cpu_quota(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert config_mod._cgroup_cpu_quota(v1) == 2.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert config_mod._cgroup_cpu_quota(v1) is None
    assert config_mod._cgroup_cpu_quota(tmp_path / "none") is None


def test_a_cpu_quota_bounds_the_mesh_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_mod.os, "sched_getaffinity", lambda _: set(range(64)))
    monkeypatch.setattr(config_mod, "_cgroup_cpu_quota", lambda: 1.5)  # a container's 1.5 CPUs
    assert DaemonConfig.parse_mesh_workers("auto") == 2


def test_the_daemon_command_leaves_the_rest_of_the_cli_unloaded() -> None:
    # A daemon lives for months: the other commands' code (tables, colours) is not its to carry.
    code = ("import sys\n"
            "sys.argv = ['corral', 'daemon', '--addr', '127.0.0.1', '--runtime', 'bogus']\n"
            "from corral.cli.entry import main\n"
            "try:\n"
            "    main()\n"
            "except SystemExit as exc:\n"
            "    print(exc.code, 'corral.cli.main' in sys.modules, 'corral.cli.service' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["1", "False", "False"]
    assert out.stderr.strip() == "Error: invalid --runtime 'bogus': expected process, netns or auto"


def test_the_daemon_does_not_load_httpx_command_line() -> None:
    # httpx pulls in its own command line (rich, pygments) when they are installed: ~3.5 MB
    # in every daemon for nothing. The daemon's modules still use httpx itself.
    code = ("import sys\n"
            "import corral.daemon.daemon, httpx\n"
            "httpx.Client().close()\n"
            "print('pygments' in sys.modules, 'rich' in sys.modules, 'httpx' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False", "True"], out.stderr
