"""host/netlink.py without a kernel: validation, error mapping, batch outcomes (no root)."""

from __future__ import annotations

import errno
import subprocess
from typing import Any

import pytest

from corral.host import netlink
from corral.host.netlink import NetlinkError


def fake_exec(monkeypatch: pytest.MonkeyPatch, returncode: int, stderr: str) -> list[Any]:
    """Make every command "run" with this outcome; returns the calls made (argv, stdin)."""
    calls: list[Any] = []

    def run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        calls.append((argv, stdin))
        return subprocess.CompletedProcess(argv, returncode, "", stderr)

    monkeypatch.setattr(netlink, "_exec", run)
    return calls


@pytest.mark.parametrize("name", ["", "x" * 16, "eth 0", "a/b", "a%d", "q'", "#c", "..", "é"])
def test_interface_names_outside_the_safe_set_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="invalid interface name"):
        netlink._check_ifname(name)


def test_namespace_names() -> None:
    assert netlink.valid_netns_name("corral-t-abc.1_+")
    for bad in ("", "..", "a/b", "a b", "x:y", "t@1", "x" * 256):
        assert not netlink.valid_netns_name(bad)
        with pytest.raises(ValueError, match="invalid network namespace name"):
            netlink.netns_exists(bad)


def test_macs_are_normalised_or_refused() -> None:
    assert netlink._norm_mac("02-42-0A-61-0:5") == "02:42:0a:61:00:05"
    for bad in ("02:42:0a:61:00", "02:42:0a:61:00:zz", "0242.0a61.0005"):
        with pytest.raises(ValueError, match="invalid MAC"):
            netlink._norm_mac(bad)


@pytest.mark.parametrize(("message", "code"), [
    ("RTNETLINK answers: File exists", errno.EEXIST),
    ('Cannot find device "vx-1"', errno.ENODEV),
    ("Error: Device does not exist.", errno.ENODEV),
    ("RTNETLINK answers: No such device or address", errno.ENXIO),  # longest text wins
    ("RTNETLINK answers: No such file or directory", errno.ENOENT),
    ("Error: Nexthop has invalid gateway.", 0),  # iproute2's own words: no errno
])
def test_errno_from_iproute2_messages(message: str, code: int) -> None:
    assert netlink._errno_of(message) == code


def test_a_batch_steps_over_the_failures_it_was_told_to_expect(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_exec(monkeypatch, 1, "RTNETLINK answers: No such file or directory\n"
                                      "Command failed -:1\n"
                                      "RTNETLINK answers: File exists\nCommand failed -:2\n")
    netlink._batch("bridge", [["fdb", "del", "02:42:0a:61:00:05", "dev", "vx1"],
                              ["fdb", "append", "02:42:0a:61:00:06", "dev", "vx1"]],
                   tolerate=[errno.ENOENT, errno.EEXIST])
    ((argv, stdin),) = calls
    assert argv == ["bridge", "-force", "-batch", "-"]
    assert stdin == ("fdb del 02:42:0a:61:00:05 dev vx1\n"
                     "fdb append 02:42:0a:61:00:06 dev vx1\n")


def test_a_batch_raises_on_an_unexpected_failure_naming_its_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake_exec(monkeypatch, 1, "RTNETLINK answers: Operation not permitted\nCommand failed -:2\n")
    with pytest.raises(NetlinkError) as err:
        netlink._batch("ip", [["link", "set", "a", "up"], ["link", "set", "b", "up"]],
                       netns="t1", tolerate=[0, errno.EEXIST])
    assert err.value.code == errno.EPERM
    assert "ip -n t1: link set b up: RTNETLINK answers: Operation not permitted" in str(err.value)


def test_a_batch_that_fails_outside_any_line_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    # e.g. the namespace cannot be entered: the tool gives up before reading a line
    fake_exec(monkeypatch, 1, 'Cannot open network namespace "t1": No such file or directory\n')
    with pytest.raises(NetlinkError) as err:
        netlink._batch("ip", [["link", "set", "lo", "up"]], netns="t1")
    assert err.value.code == errno.ENOENT


def test_a_batch_line_with_an_unsafe_token_never_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_exec(monkeypatch, 0, "")
    with pytest.raises(ValueError, match="unsafe ip batch token"):
        netlink._batch("ip", [["link", "set", "a\nlink del eth0", "up"]])
    assert calls == []
