"""The process runtime, with real child processes in a tmp data dir."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from corral.agent.exec import TaskEnv, TaskFailed, TaskRejected
from corral.agent.runtimes.process import (
    ProcessController,
    ProcessExecutor,
    proc_stat,
    resolve_image,
)
from corral.api.types import ContainerSpec, Task
from corral.testing.polling import until

Runner = Callable[[Task], Awaitable[ProcessController]]

ENV = TaskEnv(node_name="node-1", node_id="nodeid1", node_addr="127.0.0.1")

SERVER = f"""\
#!{sys.executable}
import os, socket, sys
for k in sorted(os.environ):
    print(f"{{k}}={{os.environ[k]}}")
print("to stderr", file=sys.stderr)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((os.environ["HOST"], int(os.environ["PORT"])))
s.listen()
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"hello " + os.environ["CORRAL_TASK_NAME"].encode())
    c.close()
"""

PY_SLEEPER = """
import signal, sys, time
{setup}
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


def make_task(
    image: str, *args: str, env: list[str] | None = None, slot: int = 2, task_id: str = ""
) -> Task:
    """A task of service `web`."""
    return Task(
        id=task_id or f"t{time.monotonic_ns()}",
        service_id="svc1",
        service_name="web",
        slot=slot,
        spec=ContainerSpec(image=image, args=list(args), env=env or []),
    )


def python_task(code: str, **kw: object) -> Task:
    """A task running `python -c code` (the interpreter itself is the image)."""
    return make_task(sys.executable, "-c", code, **kw)  # type: ignore[arg-type]


@pytest.fixture
def executor(tmp_path: Path) -> ProcessExecutor:
    return ProcessExecutor(tmp_path / "data", ENV)


@pytest.fixture
async def run(
    executor: ProcessExecutor,
) -> AsyncIterator[Runner]:
    """Prepare and start tasks; kill them all at teardown."""
    started: list[ProcessController] = []

    async def _run(task: Task) -> ProcessController:
        c = executor.controller(task)
        started.append(c)
        await c.prepare()
        await c.start()
        return c

    yield _run
    for c in started:
        await c.shutdown(0)


async def wait_for_line(
    executor: ProcessExecutor, task_id: str, line: str, timeout: float = 10.0
) -> list[tuple[str, str]]:
    """Poll the task's logs until `line` shows up on stdout."""
    deadline = time.monotonic() + timeout
    while True:
        logs = executor.logs(task_id) or []
        if ("stdout", line) in logs:
            return logs
        if time.monotonic() > deadline:
            raise AssertionError(f"{line!r} not in logs: {logs}")
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- image


def test_resolve_builtin_images() -> None:
    argv = [sys.executable, "-m", "corral.apps.whoami"]
    for image in ("whoami", "corral/whoami", "whoami:latest", "corral/whoami:1.2"):
        assert resolve_image(image) == argv


def test_resolve_executables(tmp_path: Path) -> None:
    assert resolve_image(sys.executable) == [os.path.abspath(sys.executable)]
    sh = resolve_image("sh")
    assert len(sh) == 1 and os.path.isabs(sh[0])
    not_exec = tmp_path / "script"
    not_exec.write_text("#!/bin/sh\n")
    for bad in (str(not_exec), str(tmp_path), "nosuch-image-xyz", "nginx:latest", ""):
        with pytest.raises(TaskRejected):
            resolve_image(bad)


async def test_unknown_image_is_rejected(executor: ProcessExecutor) -> None:
    c = executor.controller(make_task("nosuch-image-xyz"))
    with pytest.raises(TaskRejected) as ei:
        await c.prepare()
    assert str(ei.value) == "No such image: nosuch-image-xyz"
    await c.shutdown(1)  # never started: fine
    await c.remove()
    assert c.pid == 0


# --------------------------------------------------------------------------- running


async def test_task_runs_listens_and_logs(
    executor: ProcessExecutor, run: Runner, tmp_path: Path
) -> None:
    script = tmp_path / "server"
    script.write_text(SERVER)
    script.chmod(0o755)
    task = make_task(str(script), env=["GREETING=hi there", "PATH=/custom/bin:/usr/bin:/bin"])
    c = await run(task)
    addr, port = c.endpoint
    assert addr == "127.0.0.1" and port > 0
    assert c.pid > 0
    pid_file = executor.task_dir(task.id) / "pid"
    stat = proc_stat(c.pid)
    assert stat is not None
    assert pid_file.read_text().split() == [str(c.pid), str(stat[1])]

    logs = await wait_for_line(executor, task.id, "listening")
    env = dict(line.split("=", 1) for stream, line in logs if stream == "stdout" and "=" in line)
    assert env["PORT"] == str(port)
    assert env["HOST"] == "127.0.0.1"
    assert env["CORRAL_TASK_NAME"] == "web.2"
    assert env["CORRAL_TASK_ID"] == task.id
    assert env["CORRAL_SERVICE_NAME"] == "web"
    assert env["CORRAL_NODE_NAME"] == "node-1"
    assert env["CORRAL_NODE_ID"] == "nodeid1"
    assert env["GREETING"] == "hi there"
    assert env["PATH"] == "/custom/bin:/usr/bin:/bin"  # user env wins
    assert env["PYTHONUNBUFFERED"] == "1"
    assert ("stderr", "to stderr") in logs
    assert executor.logs(task.id, tail=1) == [("stdout", "listening"), ("stderr", "to stderr")]
    assert executor.logs("no-such-task") is None

    reader, writer = await asyncio.open_connection(addr, port)
    assert await reader.read() == b"hello web.2"
    writer.close()

    await c.shutdown(2)
    assert c.pid == 0
    assert not pid_file.exists()
    await c.remove()
    assert executor.logs(task.id)  # logs outlive the task
    executor.prune(task.id)
    assert executor.logs(task.id) is None


async def test_exit_code(
    executor: ProcessExecutor, run: Runner
) -> None:
    c = await run(make_task("sh", "-c", "echo bye; exit 3"))
    assert await asyncio.wait_for(c.wait(), 10) == 3
    assert await c.wait() == 3  # again: same answer
    assert c.pid == 0
    assert executor.logs(c.task.id) == [("stdout", "bye")]
    await c.shutdown(1)  # already exited: fine


async def test_shutdown_kills_task_ignoring_sigterm(
    executor: ProcessExecutor, run: Runner
) -> None:
    c = await run(python_task(PY_SLEEPER.format(setup="signal.signal(signal.SIGTERM, signal.SIG_IGN)")))
    await wait_for_line(executor, c.task.id, "ready")
    t0 = time.monotonic()
    await c.shutdown(0.5)
    elapsed = time.monotonic() - t0
    assert 0.5 <= elapsed < 3
    assert await c.wait() == -signal.SIGKILL
    await c.shutdown(0.5)  # idempotent


async def test_shutdown_lets_task_exit_on_sigterm(
    executor: ProcessExecutor, run: Runner
) -> None:
    c = await run(python_task(PY_SLEEPER.format(setup="signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))")))
    await wait_for_line(executor, c.task.id, "ready")
    waiter = asyncio.create_task(c.wait())
    t0 = time.monotonic()
    await asyncio.gather(c.shutdown(5), c.shutdown(5))  # concurrent shutdowns are fine
    assert time.monotonic() - t0 < 4
    assert await waiter == 0


async def test_wait_is_cancellable(
    executor: ProcessExecutor, run: Runner
) -> None:
    c = await run(python_task("import time; time.sleep(60)"))
    waiter = asyncio.create_task(c.wait())
    await asyncio.sleep(0.1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert c.pid > 0  # cancelling the wait leaves the task alone
    await c.shutdown(1)
    assert await c.wait() == -signal.SIGTERM


async def test_exec_failure_fails_the_task(executor: ProcessExecutor, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus"
    bogus.write_bytes(b"\x00\x01 not a program")
    bogus.chmod(0o755)
    c = executor.controller(make_task(str(bogus)))
    await c.prepare()
    with pytest.raises(TaskFailed):
        await c.start()
    assert c.pid == 0
    await c.shutdown(1)


async def test_no_fd_leak(executor: ProcessExecutor, run: Runner) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        c = await run(make_task("true"))
        assert await c.wait() == 0
    assert len(os.listdir("/proc/self/fd")) <= before + 1


# --------------------------------------------------------------------------- orphans

DAEMON = """
import asyncio, os, sys
from pathlib import Path
from corral.agent.exec import TaskEnv
from corral.agent.runtimes.process import ProcessExecutor
from corral.api.types import ContainerSpec, Task

async def main() -> None:
    ex = ProcessExecutor(Path(sys.argv[1]), TaskEnv("node-1", "nodeid1", "127.0.0.1"))
    task = Task(id=sys.argv[2], service_id="s", service_name="web", slot=1,
                spec=ContainerSpec(image=sys.executable, args=["-c", "import time; time.sleep(60)"]))
    c = ex.controller(task)
    await c.prepare()
    await c.start()
    print(c.pid, flush=True)
    if sys.argv[3] == "crash":
        os._exit(0)  # no shutdown, no cleanup: the task keeps running
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def start_daemon(data_dir: Path, task_id: str, mode: str, **kw: object) -> tuple[asyncio.subprocess.Process, int]:
    """Run a throwaway "daemon" that starts one task; return it and the task's pid."""
    daemon = await asyncio.create_subprocess_exec(
        sys.executable, "-c", DAEMON, str(data_dir), task_id, mode,
        stdout=asyncio.subprocess.PIPE, **kw,  # type: ignore[arg-type]
    )
    assert daemon.stdout is not None
    line = await asyncio.wait_for(daemon.stdout.readline(), 30)
    return daemon, int(line)


def gone(pid: int) -> bool:
    """True if `pid` no longer runs (zombies count as gone)."""
    st = proc_stat(pid)
    return st is None or st[0] == "Z"


async def test_cleanup_orphans_kills_what_a_crashed_daemon_left(tmp_path: Path) -> None:
    data = tmp_path / "data"
    daemon, pid = await start_daemon(data, "orphan1", "crash")
    try:
        assert await asyncio.wait_for(daemon.wait(), 10) == 0
        assert not gone(pid)  # survived the daemon
        # Decoys: a live pid with the wrong start time, a dead pid, a garbage file.
        for name, text in [("decoy", f"{os.getpid()} 12345"), ("dead", "999999999 1"), ("junk", "x")]:
            (data / "tasks" / name).mkdir(parents=True)
            (data / "tasks" / name / "pid").write_text(text)

        fresh = ProcessExecutor(data, ENV)
        assert fresh.cleanup_orphans() == ["orphan1"]
        assert gone(pid)
        assert not list((data / "tasks").glob("*/pid"))
        assert fresh.cleanup_orphans() == []
        assert fresh.logs("orphan1") == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def test_killing_daemon_process_group_kills_tasks(tmp_path: Path) -> None:
    daemon, pid = await start_daemon(tmp_path / "data", "t1", "stay", start_new_session=True)
    try:
        assert os.getpgid(pid) == daemon.pid  # the task is in the daemon's group
        os.killpg(daemon.pid, signal.SIGKILL)
        assert await asyncio.wait_for(daemon.wait(), 10) == -signal.SIGKILL
        await until(lambda: gone(pid))
    finally:
        for p in (pid, daemon.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
