"""The process runtime: every task is a plain child process of the node daemon.

How this works:

* Image: `ContainerSpec.image` names a built-in app (`whoami`, `corral/whoami`, any `:tag`),
  run as `python -m corral.apps.<app>`, or else an executable (a path, or a name looked up on
  PATH). The argv is that plus `command` plus `args`. Anything else is rejected with
  "No such image: <image>".
* Port: `prepare` picks a free TCP port on the node address by binding port 0; the task gets
  it as `PORT` (and the address as `HOST`) in a clean environment, and `endpoint` reports it.
* Files: each task has a directory `<data_dir>/tasks/<task id>/`, which is also its cwd. The
  child writes straight into `stdout.log` / `stderr.log` there (no pipes, so a chatty task
  never blocks on the daemon and its logs outlive a daemon restart).
* Orphans: while a task runs, its `pid` file holds "PID STARTTIME" (STARTTIME = field 22 of
  /proc/PID/stat), so a reused pid is never mistaken for the task. A daemon that starts again
  on the same data dir calls `cleanup_orphans` to SIGKILL whatever its predecessor left.
* The child stays in the daemon's process group (no new session): killing the daemon's group
  kills its tasks too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from corral.agent.exec import TaskEnv, TaskFailed, TaskRejected
from corral.agent.secrets import remove_task_secrets, secrets_root, write_task_secrets
from corral.api.types import Task

BUILTIN_APPS: dict[str, str] = {"whoami": "corral.apps.whoami"}
"""Built-in app name -> module run with `python -m`."""

_PASSTHROUGH_ENV = ("PATH", "HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV")
_ORPHAN_KILL_WAIT = 2.0


def resolve_image(image: str) -> list[str]:
    """The argv prefix that runs `image`; raise TaskRejected if there is no such image."""
    name = image.strip()
    repo, _, tag = name.rpartition(":")
    builtin = (repo if repo and "/" not in tag else name).removeprefix("corral/")
    if builtin in BUILTIN_APPS:
        return [sys.executable, "-m", BUILTIN_APPS[builtin]]
    if name:
        if os.sep in name:
            path = os.path.abspath(name)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return [path]
        else:
            found = shutil.which(name)
            if found is not None:
                return [os.path.abspath(found)]
    raise TaskRejected(f"No such image: {image}")


def free_port(addr: str) -> int:
    """A TCP port that is free on `addr` right now (bind port 0, read it, close)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        port: int = s.getsockname()[1]
        return port


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of process `pid` from /proc/PID/stat, or None if it does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[19])  # fields 3 and 22
    except (IndexError, ValueError):
        return None


def _alive(pid: int, starttime: int) -> bool:
    """True if `pid` is still the process that started at `starttime` and is not a zombie."""
    st = proc_stat(pid)
    return st is not None and st[1] == starttime and st[0] not in ("Z", "X")


def _read_lines(path: Path, tail: int | None) -> list[str]:
    """The lines of a log file (all, or the last `tail`), decoded leniently."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return []
    with f:
        if tail is None:
            data = f.read()
        elif tail <= 0:
            return []
        else:
            # Read backwards in blocks until we have more than `tail` newlines.
            end = f.seek(0, os.SEEK_END)
            pos, data = end, b""
            while pos > 0 and data.count(b"\n") <= tail:
                step = min(65536, pos)
                pos -= step
                f.seek(pos)
                data = f.read(step) + data
    lines = data.decode("utf-8", errors="replace").splitlines()
    return lines if tail is None else lines[-tail:]


def _write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class ProcessController:
    """Runs one task as a child process of the daemon."""

    def __init__(self, executor: ProcessExecutor, task: Task) -> None:
        self._executor = executor
        self._task = task
        self._dir = executor.task_dir(task.id)
        self._argv: list[str] | None = None
        self._port = 0
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def task(self) -> Task:
        """The task this controller runs."""
        return self._task

    @property
    def task_dir(self) -> Path:
        """The task's directory (cwd, logs, pid file)."""
        return self._dir

    @property
    def endpoint(self) -> tuple[str, int]:
        """(node addr, port) the task listens on; the port is 0 before prepare."""
        return (self._executor.env.node_addr, self._port)

    @property
    def pid(self) -> int:
        """The process id while it runs, else 0."""
        if self._proc is None or self._proc.returncode is not None:
            return 0
        return self._proc.pid

    @property
    def netns(self) -> str | None:
        """Process tasks share their node's network namespace."""
        return None

    @property
    def returncode(self) -> int | None:
        """The exit code once the process has been reaped, else None."""
        return None if self._proc is None else self._proc.returncode

    def environment(self) -> dict[str, str]:
        """The child's environment: a few host variables, corral's, then the task's own."""
        task, env = self._task, self._executor.env
        out = {k: os.environ[k] for k in _PASSTHROUGH_ENV if k in os.environ}
        out.update(
            PORT=str(self._port),
            HOST=env.node_addr,
            CORRAL_TASK_NAME=task.name,
            CORRAL_TASK_ID=task.id,
            CORRAL_TASK_SLOT=str(task.slot),
            CORRAL_SERVICE_NAME=task.service_name,
            CORRAL_SERVICE_ID=task.service_id,
            CORRAL_NODE_NAME=env.node_name,
            CORRAL_NODE_ID=env.node_id,
            PYTHONUNBUFFERED="1",
        )
        if self.secrets_dir is not None:
            out["CORRAL_SECRETS_DIR"] = str(self.secrets_dir)
        for entry in task.spec.env:
            key, sep, value = entry.partition("=")
            if not key:
                continue
            if sep:
                out[key] = value
            elif key in os.environ:  # Docker: a bare "K" passes the host's K through
                out[key] = os.environ[key]
        return out

    @property
    def secrets_dir(self) -> Path | None:
        """Where the task's secret files are written (None: it has none)."""
        if not self._task.spec.secrets:
            return None
        return self._executor.secrets_root / self._task.id

    async def prepare(self) -> None:
        """Resolve the image, allocate a free port and create the task dir and log files."""
        spec = self._task.spec
        if spec.secrets:
            write_task_secrets(self._executor.secrets_root, self._task.id, spec.secrets,
                               self._executor.secrets)
        self._argv = resolve_image(spec.image) + list(spec.command) + list(spec.args)
        if self._port == 0:
            host = [p for p in self._task.ports if p.publish_mode == "host"]
            # Publish mode host: the task binds the node's port itself, with no mesh between
            # (a process task's "container port" is the node port).
            self._port = (host[0].published_port if host
                          else free_port(self._executor.env.node_addr))
        self._dir.mkdir(parents=True, exist_ok=True)
        for name in ("stdout.log", "stderr.log"):
            (self._dir / name).touch()

    async def start(self) -> None:
        """Start the process, its output going to the log files; record its pid file."""
        if self._argv is None:
            raise RuntimeError("start() before prepare()")
        if self._proc is not None:
            raise RuntimeError("task already started")
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        out = os.open(self._dir / "stdout.log", flags, 0o644)
        try:
            err = os.open(self._dir / "stderr.log", flags, 0o644)
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *self._argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    cwd=self._dir,
                    env=self.environment(),
                )
            except OSError as e:
                raise TaskFailed(f"starting {self._argv[0]}: {e.strerror or e}") from e
            finally:
                os.close(err)
        finally:
            os.close(out)
        st = proc_stat(self._proc.pid)
        if st is not None:
            _write_atomic(self._dir / "pid", f"{self._proc.pid} {st[1]}\n")

    async def wait(self) -> int:
        """Wait for the process to exit and return its exit code; safe to cancel."""
        if self._proc is None:
            raise RuntimeError("wait() before start()")
        code = await self._proc.wait()
        self._forget_pid()
        return code

    async def shutdown(self, grace: float) -> None:
        """SIGTERM, wait up to `grace` seconds, SIGKILL, reap; a no-op if not running."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        try:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout=max(grace, 0.0))
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        except asyncio.CancelledError:
            # Never leave the process behind because our caller gave up.
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            raise
        self._forget_pid()

    async def remove(self) -> None:
        """Stop the process if it still runs and delete the pid file (logs are kept)."""
        await self.shutdown(0)
        self._forget_pid()
        if self._task.spec.secrets:
            remove_task_secrets(self._executor.secrets_root, self._task.id)

    def _forget_pid(self) -> None:
        """Delete the pid file: the process is gone."""
        with contextlib.suppress(FileNotFoundError):
            (self._dir / "pid").unlink()


class ProcessExecutor:
    """Runs tasks as child processes, keeping per-task files under `data_dir/tasks`."""

    def __init__(self, data_dir: Path, env: TaskEnv) -> None:
        self.data_dir = Path(data_dir)
        self.env = env
        self.tasks_dir = self.data_dir / "tasks"
        # Secret values this node's tasks use (id -> value), as the last assignments said.
        self.secrets: dict[str, bytes] = {}
        self.secrets_root = secrets_root()

    def task_dir(self, task_id: str) -> Path:
        """The directory of one task (refuses ids that would escape `tasks_dir`)."""
        if not task_id or "/" in task_id or task_id in (".", ".."):
            raise ValueError(f"bad task id: {task_id!r}")
        return self.tasks_dir / task_id

    def controller(self, task: Task) -> ProcessController:
        """A new controller for `task`."""
        return ProcessController(self, task)

    def cleanup_orphans(self) -> list[str]:
        """SIGKILL processes recorded in pid files that still run; return their task ids."""
        killed: list[tuple[str, int, int]] = []
        for pid_file in sorted(self.tasks_dir.glob("*/pid")):
            task_id = pid_file.parent.name
            try:
                pid_s, start_s = pid_file.read_text().split()
                pid, start = int(pid_s), int(start_s)
            except (OSError, ValueError):
                pid, start = 0, 0
            if pid > 1 and pid != os.getpid() and _alive(pid, start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed.append((task_id, pid, start))
            with contextlib.suppress(FileNotFoundError):
                pid_file.unlink()
        deadline = time.monotonic() + _ORPHAN_KILL_WAIT
        while any(_alive(p, s) for _, p, s in killed) and time.monotonic() < deadline:
            time.sleep(0.01)
        return [task_id for task_id, _, _ in killed]

    def logs(self, task_id: str, tail: int | None = None) -> list[tuple[str, str]] | None:
        """stdout lines then stderr lines of a task (`tail` applies to each), None if unknown."""
        try:
            d = self.task_dir(task_id)
        except ValueError:
            return None
        if not d.is_dir():
            return None
        out: list[tuple[str, str]] = []
        for stream in ("stdout", "stderr"):
            out.extend((stream, line) for line in _read_lines(d / f"{stream}.log", tail))
        return out

    def prune(self, task_id: str) -> None:
        """Delete everything left of a task, logs included (it must not be running)."""
        try:
            d = self.task_dir(task_id)
        except ValueError:
            return
        shutil.rmtree(d, ignore_errors=True)


if TYPE_CHECKING:
    from corral.agent.exec import Executor

    def _conforms(e: ProcessExecutor) -> Executor:
        """Type check only: ProcessExecutor implements the Executor protocol."""
        return e
