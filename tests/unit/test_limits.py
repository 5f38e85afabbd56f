"""raise_nofile_limit() in a child process (it changes the limits of the process it runs in)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

NR_OPEN = int(Path("/proc/sys/fs/nr_open").read_text())

CHILD = """
import json, os, resource, sys
from pathlib import Path
from corral.dataplane.limits import raise_nofile_limit
soft, hard, uid, nr_open = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
if uid:
    os.setuid(uid)
returned = raise_nofile_limit(Path(nr_open))
print(json.dumps([list(returned), list(resource.getrlimit(resource.RLIMIT_NOFILE))]))
"""


def run_child(soft: int, hard: int, uid: int = 0,
              nr_open: str = "/proc/sys/fs/nr_open") -> tuple[tuple[int, int], tuple[int, int]]:
    """The limits raise_nofile_limit() returned and the ones the child really has after it."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(soft), str(hard), str(uid), nr_open],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    returned, actual = json.loads(out)
    return (returned[0], returned[1]), (actual[0], actual[1])


CAP_SYS_RESOURCE = 24


def has_cap_sys_resource() -> bool:
    """Whether this process may raise a hard limit (root in a container often may not)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    return False


may_raise_hard = pytest.mark.skipif(not has_cap_sys_resource(),
                                    reason="needs CAP_SYS_RESOURCE to raise a hard limit")
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another uid")


@may_raise_hard
def test_privileged_raises_hard_limit_to_nr_open_and_soft_with_it() -> None:
    returned, actual = run_child(1024, 4096)
    assert returned == actual == (NR_OPEN, NR_OPEN)


@root_only
def test_unprivileged_raises_soft_limit_to_its_hard_limit() -> None:
    returned, actual = run_child(1024, 4096, uid=65534)
    assert returned == actual == (4096, 4096)


def test_without_privilege_the_hard_limit_stays() -> None:
    """As here: root in a container without CAP_SYS_RESOURCE cannot raise it either."""
    if has_cap_sys_resource():
        pytest.skip("this process may raise its hard limit")
    returned, actual = run_child(1024, 4096)
    assert returned == actual == (4096, 4096)


def test_never_lowers_a_limit_above_nr_open(tmp_path: Path) -> None:
    low = tmp_path / "nr_open"
    low.write_text("2048\n")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    returned, actual = run_child(1024, min(hard, 4096), nr_open=str(low))
    assert returned == actual == (min(hard, 4096),) * 2


def test_unreadable_nr_open_still_raises_soft_limit(tmp_path: Path) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    returned, actual = run_child(512, min(hard, 4096), nr_open=str(tmp_path / "missing"))
    assert returned == actual == (min(hard, 4096),) * 2
