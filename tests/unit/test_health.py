"""Health checks: the tracker's state machine, the three probes, and the watch loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from corral.agent.health import (
    OUTPUT_LIMIT,
    CommandProbe,
    Health,
    HealthTracker,
    HttpProbe,
    TcpProbe,
    check_config,
    command_argv,
    make_probe,
    watch_health,
)
from corral.agent.runtimes.process import proc_stat
from corral.api.errors import InvalidArgument
from corral.api.types import HealthConfig

Run = Callable[[Callable[[], Awaitable[None]]], None]

S, H, U = Health.STARTING, Health.HEALTHY, Health.UNHEALTHY


# --- the tracker ---------------------------------------------------------------------------

# (config, [(ok, now)], expected states after each result)
TRACKER_CASES: dict[str, tuple[HealthConfig, list[tuple[bool, float]], list[Health]]] = {
    "success makes healthy": (
        HealthConfig(retries=3), [(True, 1)], [H]),
    "retries failures make unhealthy": (
        HealthConfig(retries=3), [(False, 1), (False, 2), (False, 3)], [S, S, U]),
    "one retry": (
        HealthConfig(retries=1), [(False, 1)], [U]),
    "a success resets the streak": (
        HealthConfig(retries=2),
        [(False, 1), (True, 2), (False, 3), (True, 4), (False, 5), (False, 6)],
        [S, H, H, H, H, U]),
    "healthy then failing": (
        HealthConfig(retries=3), [(True, 1), (False, 2), (False, 3), (False, 4)], [H, H, H, U]),
    "recovery from unhealthy": (
        HealthConfig(retries=1), [(False, 1), (True, 2), (False, 3)], [U, H, U]),
    "failures in the start period don't count": (
        HealthConfig(retries=2, start_period=10),
        [(False, 1), (False, 5), (False, 9.9), (False, 10), (False, 11)], [S, S, S, S, U]),
    "a success in the start period makes healthy": (
        HealthConfig(retries=2, start_period=10), [(False, 1), (True, 2)], [S, H]),
    "once healthy, start period failures count": (
        HealthConfig(retries=2, start_period=10), [(True, 1), (False, 2), (False, 3)], [H, H, U]),
}


@pytest.mark.parametrize("name", sorted(TRACKER_CASES))
def test_tracker(name: str) -> None:
    config, results, expected = TRACKER_CASES[name]
    tracker = HealthTracker(config, started_at=0.0)
    assert tracker.state is S
    states = []
    for i, (ok, now) in enumerate(results):
        before = tracker.state
        changed = tracker.record(ok, f"out {i}", now)
        assert changed == (tracker.state is not before)
        assert tracker.last_output == f"out {i}"
        states.append(tracker.state)
    assert states == expected


def test_tracker_streak() -> None:
    t = HealthTracker(HealthConfig(retries=5, start_period=2), started_at=100.0)
    t.record(False, "", 101)
    assert t.failing_streak == 0  # in the start period
    t.record(False, "", 102)
    t.record(False, "", 103)
    assert t.failing_streak == 2
    t.record(True, "", 104)
    assert (t.failing_streak, t.state) == (0, H)


# --- config --------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    HealthConfig(test=["CMD", "true"], tcp=True),
    HealthConfig(test=["true"], http_path="/"),
    HealthConfig(http_path="/", tcp=True),
    HealthConfig(test=["CMD"]),
    HealthConfig(test=["CMD-SHELL"]),
    HealthConfig(test=["CMD-SHELL", " "]),
    HealthConfig(http_path="health"),
    HealthConfig(http_path=""),
])
def test_check_config_rejects(config: HealthConfig) -> None:
    with pytest.raises(InvalidArgument):
        check_config(config)
    with pytest.raises(InvalidArgument):
        make_probe(config, addr="127.0.0.1", port=80)


@pytest.mark.parametrize("config", [
    HealthConfig(), HealthConfig(test=["NONE"]), HealthConfig(test=["CMD", "true"]),
    HealthConfig(test=["CMD-SHELL", "exit 0"]), HealthConfig(http_path="/healthz"),
    HealthConfig(tcp=True),
])
def test_check_config_accepts(config: HealthConfig) -> None:
    check_config(config)


def test_command_argv() -> None:
    assert command_argv(["CMD", "curl", "-f", "x"]) == ["curl", "-f", "x"]
    assert command_argv(["CMD-SHELL", "curl -f x || exit 1"]) == \
        ["/bin/sh", "-c", "curl -f x || exit 1"]
    assert command_argv(["true", "x"]) == ["true", "x"]


def test_make_probe() -> None:
    assert make_probe(HealthConfig(), addr="127.0.0.1", port=80) is None
    assert make_probe(HealthConfig(test=["NONE"]), addr="127.0.0.1", port=80) is None
    cmd = make_probe(HealthConfig(test=["CMD", "true"]), addr="10.0.0.2", port=0,
                     netns="corral-abc", env={"A": "1"})
    assert isinstance(cmd, CommandProbe)
    assert cmd.argv == ["ip", "netns", "exec", "corral-abc", "true"]
    assert cmd.env == {"A": "1"}
    # Once the task runs: its own namespaces, mount namespace included (its /run/secrets).
    running = make_probe(HealthConfig(test=["CMD", "true"]), addr="10.0.0.2", port=0,
                         netns="corral-abc", pid=4242)
    assert isinstance(running, CommandProbe)
    assert running.argv == ["nsenter", "-t", "4242", "--net", "--mount", "true"]
    plain = make_probe(HealthConfig(test=["CMD-SHELL", "exit 0"]), addr="x", port=0)
    assert isinstance(plain, CommandProbe) and plain.argv == ["/bin/sh", "-c", "exit 0"]
    http = make_probe(HealthConfig(http_path="/h?x=1"), addr="10.0.0.2", port=8080)
    assert isinstance(http, HttpProbe) and http.url == "http://10.0.0.2:8080/h?x=1"
    http6 = make_probe(HealthConfig(http_path="/"), addr="::1", port=81)
    assert isinstance(http6, HttpProbe) and http6.url == "http://[::1]:81/"
    tcp = make_probe(HealthConfig(tcp=True), addr="0.0.0.0", port=9)
    assert isinstance(tcp, TcpProbe) and (tcp.addr, tcp.port) == ("127.0.0.1", 9)
    with pytest.raises(ValueError):
        make_probe(HealthConfig(tcp=True), addr="10.0.0.2", port=0)


# --- command probe -------------------------------------------------------------------------

def _gone(pid: int) -> bool:
    st = proc_stat(pid)
    return st is None or st[0] in ("Z", "X")


async def _wait_gone(pid: int, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not _gone(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def test_command_true_false(run: Run) -> None:
    async def scenario() -> None:
        assert await CommandProbe(["CMD", "true"]).check(5) == (True, "")
        assert await CommandProbe(["CMD", "false"]).check(5) == (False, "exit status 1")
        assert await CommandProbe(["CMD-SHELL", "exit 0"]).check(5) == (True, "")

    run(scenario)


def test_command_output(run: Run) -> None:
    async def scenario() -> None:
        probe = CommandProbe(["sh", "-c", "echo first; echo hi; exit 1"])
        assert await probe.check(5) == (False, "hi")
        probe = CommandProbe(["CMD-SHELL", "echo ok; echo on stderr >&2"])
        assert await probe.check(5) == (True, "on stderr")
        probe = CommandProbe(["CMD-SHELL", f"printf '%0{OUTPUT_LIMIT * 2}d\\n\\n' 7"])
        ok, out = await probe.check(5)
        assert ok and out == "0" * OUTPUT_LIMIT
        probe = CommandProbe(
            ["CMD-SHELL", "head -c 1000000 /dev/zero | tr '\\0' x; echo; echo end"])
        assert await probe.check(5) == (True, "end")

    run(scenario)


def test_command_env_and_cwd(run: Run, tmp_path: Path) -> None:
    async def scenario() -> None:
        probe = CommandProbe(["CMD-SHELL", 'echo "$GREETING $(pwd)"'],
                             env={"GREETING": "hello", "PATH": os.environ["PATH"]}, cwd=tmp_path)
        assert await probe.check(5) == (True, f"hello {tmp_path}")

    run(scenario)


def test_command_not_found(run: Run) -> None:
    async def scenario() -> None:
        ok, out = await CommandProbe(["CMD", "no-such-command-corral"]).check(5)
        assert not ok and out == "exec: no-such-command-corral: not found"
        ok, out = await CommandProbe(["/nonexistent/dir/cmd"]).check(5)
        assert not ok and "not found" in out

    run(scenario)


def test_command_timeout_kills(run: Run, tmp_path: Path) -> None:
    async def scenario() -> None:
        pids = tmp_path / "pids"
        pids.unlink(missing_ok=True)
        # A direct child and a background grandchild: both must die.
        probe = CommandProbe(["sh", "-c", f"sleep 5 & echo $$ $! > {pids}; wait"])
        start = time.monotonic()
        ok, out = await probe.check(0.2)
        assert time.monotonic() - start < 2.5
        assert (ok, out) == (False, "health check timed out after 0.2s")
        for pid in map(int, pids.read_text().split()):
            assert await _wait_gone(pid), f"process {pid} survived the timeout"

    run(scenario)


# --- HTTP and TCP probes -------------------------------------------------------------------

@contextlib.asynccontextmanager
async def http_server(status: int) -> AsyncIterator[tuple[int, asyncio.Server]]:
    """A tiny HTTP server on 127.0.0.1 answering every request with `status`."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\n"
                         "Location: /elsewhere\r\nConnection: close\r\n\r\nok".encode())
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, server
    finally:
        server.close()
        await server.wait_closed()


def test_http_probe(run: Run) -> None:
    async def scenario() -> None:
        async with http_server(200) as (port, server):
            probe = HttpProbe("127.0.0.1", port, "/healthz")
            assert await probe.check(2) == (True, "HTTP 200")
            assert await probe.check(2) == (True, "HTTP 200")
            server.close()
            await server.wait_closed()
            ok, out = await probe.check(2)
            assert not ok and out.startswith(f"GET http://127.0.0.1:{port}/healthz: ")
            assert "refused" in out.lower(), out
        async with http_server(500) as (port, _):
            ok, out = await HttpProbe("127.0.0.1", port, "/").check(2)
            assert (ok, out) == (False, f"GET http://127.0.0.1:{port}/: HTTP 500")
        async with http_server(302) as (port, _):
            assert await HttpProbe("0.0.0.0", port, "/").check(2) == (True, "HTTP 302")
        async with http_server(404) as (port, _):
            assert not (await HttpProbe("127.0.0.1", port, "/").check(2))[0]

    run(scenario)


def test_http_probe_timeout(run: Run) -> None:
    async def scenario() -> None:
        async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(10)  # accepts, never answers

        server = await asyncio.start_server(mute, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            start = time.monotonic()
            ok, out = await HttpProbe("127.0.0.1", port, "/").check(0.2)
            assert time.monotonic() - start < 2
            assert (ok, out) == (False, "health check timed out after 0.2s")
        finally:
            server.close()
            for t in asyncio.all_tasks():
                if t is not asyncio.current_task():
                    t.cancel()

    run(scenario)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_tcp_probe(run: Run) -> None:
    async def scenario() -> None:
        async with http_server(200) as (port, _):
            assert await TcpProbe("127.0.0.1", port).check(2) == \
                (True, f"connected to 127.0.0.1:{port}")
        port = _closed_port()
        ok, out = await TcpProbe("127.0.0.1", port).check(2)
        assert not ok and out.startswith(f"connect 127.0.0.1:{port}: ")
        assert "refused" in out.lower(), out

    run(scenario)


# --- watch_health --------------------------------------------------------------------------

class ScriptedProbe:
    """Answers from a script, then keeps answering the last entry."""

    def __init__(self, script: list[bool]) -> None:
        self.script = script
        self.calls: list[float] = []

    async def check(self, timeout: float) -> tuple[bool, str]:
        i = min(len(self.calls), len(self.script) - 1)
        self.calls.append(timeout)
        ok = self.script[i]
        return ok, f"probe {len(self.calls)} {'ok' if ok else 'failed'}"


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


async def test_watch_health_fake_clock() -> None:
    config = HealthConfig(interval=10, timeout=3, retries=3)
    probe = ScriptedProbe([True, False, False, False, True, False])
    fake = FakeTime()
    changes: list[tuple[Health, str]] = []

    async def on_change(state: Health, output: str) -> None:
        changes.append((state, output))

    task = asyncio.create_task(watch_health(config, probe, on_change,
                                            clock=fake.clock, sleep=fake.sleep))
    while len(probe.calls) < 8:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert changes == [(H, "probe 1 ok"), (U, "probe 4 failed"), (H, "probe 5 ok"),
                       (U, "probe 8 failed")]
    assert set(fake.sleeps) == {10} and set(probe.calls) == {3}


async def test_watch_health_start_period() -> None:
    config = HealthConfig(interval=1, timeout=1, retries=2, start_period=5)
    probe = ScriptedProbe([False])
    fake = FakeTime()
    changes: list[tuple[Health, float]] = []

    def on_change(state: Health, output: str) -> None:  # a plain function works too
        changes.append((state, fake.now))

    task = asyncio.create_task(watch_health(config, probe, on_change,
                                            clock=fake.clock, sleep=fake.sleep))
    while len(probe.calls) < 10:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Probes at t+1..t+4 don't count, t+5 and t+6 do.
    assert changes == [(U, 1006.0)]


async def test_watch_health_probe_error_is_failure() -> None:
    class Broken:
        async def check(self, timeout: float) -> tuple[bool, str]:
            raise RuntimeError("boom")

    fake = FakeTime()
    changes: list[tuple[Health, str]] = []
    task = asyncio.create_task(watch_health(
        HealthConfig(interval=1, retries=1), Broken(),
        lambda s, o: changes.append((s, o)), clock=fake.clock, sleep=fake.sleep))
    while not changes:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert changes == [(U, "health check error: boom")]


def test_watch_health_real_time(run: Run, tmp_path: Path) -> None:
    """End to end with a command probe whose result flips with a file."""
    flag = tmp_path / "ok"

    async def scenario() -> None:
        flag.touch()
        config = HealthConfig(
            test=["CMD-SHELL", f"if test -e {flag}; then echo up; else echo down; exit 1; fi"],
            interval=0.05, timeout=2, retries=3)
        probe = make_probe(config, addr="127.0.0.1", port=0)
        assert probe is not None
        changes: list[tuple[Health, str]] = []
        changed = asyncio.Event()

        async def on_change(state: Health, output: str) -> None:
            changes.append((state, output))
            changed.set()

        task = asyncio.create_task(watch_health(config, probe, on_change))
        try:
            await asyncio.wait_for(changed.wait(), 5)
            assert changes == [(H, "up")]
            changed.clear()
            flag.unlink()
            start = time.monotonic()
            await asyncio.wait_for(changed.wait(), 5)
            assert time.monotonic() - start >= 0.15  # three failing probes, 0.05 s apart
            assert changes == [(H, "up"), (U, "down")]
            changed.clear()
            flag.touch()
            await asyncio.wait_for(changed.wait(), 5)
            assert changes == [(H, "up"), (U, "down"), (H, "up")]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    run(scenario)


def test_watch_health_cancel_kills_probe(run: Run, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"

    async def scenario() -> None:
        pid_file.unlink(missing_ok=True)
        config = HealthConfig(test=["CMD-SHELL", f"echo $$ > {pid_file}.tmp && "
                                    f"mv {pid_file}.tmp {pid_file} && exec sleep 30"],
                              interval=0.05, timeout=60)
        probe = make_probe(config, addr="127.0.0.1", port=0)
        assert probe is not None
        task = asyncio.create_task(watch_health(config, probe, lambda s, o: None))
        deadline = time.monotonic() + 5
        while not pid_file.exists():
            assert time.monotonic() < deadline, "the probe never started"
            await asyncio.sleep(0.02)
        pid = int(pid_file.read_text())
        assert not _gone(pid)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await _wait_gone(pid), "the probe's process survived the cancellation"

    run(scenario)
