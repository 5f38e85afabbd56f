"""Task health checks: docker's HEALTHCHECK (moby daemon/health.go), plus HTTP and TCP probes.

How this works:

* `HealthTracker` is the pure state machine. It starts STARTING; a successful probe makes it
  HEALTHY (and resets the failing streak); a failed probe adds to the failing streak, and
  `retries` failures in a row make it UNHEALTHY. While the task is still STARTING and inside
  its `start_period`, failures are not counted (a success still makes it HEALTHY). A success
  while UNHEALTHY makes it HEALTHY again, as docker does.
* A `Probe` runs one check and answers (healthy?, one line of output). Three kinds, one per
  way `HealthConfig` can say it: `CommandProbe` (`test`: an argv, docker's
  `["CMD", ...]` / `["CMD-SHELL", "..."]` forms, run inside the task's network namespace
  when it has one), `HttpProbe` (`http_path`: GET on the task's address, 2xx/3xx is healthy)
  and `TcpProbe` (`tcp`: the task's port accepts a connection). A probe never raises for a
  failed check and never outlives its timeout: a command probe runs in its own process
  group, killed as a whole on timeout or cancellation.
* `watch_health` loops forever: wait `interval`, probe, feed the tracker, report each state
  change. Cancelling it cancels the probe in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol

import httpx

from corral.agent.exec import in_task_namespaces
from corral.api.errors import InvalidArgument
from corral.api.types import HealthConfig

OUTPUT_LIMIT = 200
"""A probe's output is one line of at most this many characters."""

_TAIL_BYTES = 4096  # how much of a command's output is kept (docker keeps 4 KiB too)
_REAP_WAIT = 2.0  # how long to wait for a killed command's pipes to close
_WATCHDOG_GRACE = 5.0  # watch_health's own deadline on a probe: its timeout plus this


class Health(str, Enum):
    """A task's health (the values of `TaskStatus.health`)."""

    STARTING = "starting"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


@dataclass
class HealthTracker:
    """Pure state machine: feed probe results, get the health state."""

    config: HealthConfig
    started_at: float
    state: Health = Health.STARTING
    failing_streak: int = 0
    last_output: str = ""

    def record(self, ok: bool, output: str, now: float) -> bool:
        """Account for one probe result (`now`: when the probe started); True if `state` changed."""
        before = self.state
        self.last_output = output
        if ok:
            self.failing_streak = 0
            self.state = Health.HEALTHY
        elif not (self.state is Health.STARTING and self.in_start_period(now)):
            # Failures during the start period don't count towards retries while starting.
            self.failing_streak += 1
            if self.failing_streak >= self.config.retries:
                self.state = Health.UNHEALTHY
        return self.state is not before

    def in_start_period(self, now: float) -> bool:
        """True while `now` is within the task's start period."""
        return now - self.started_at < self.config.start_period


class Probe(Protocol):
    """One way of checking a task's health."""

    async def check(self, timeout: float) -> tuple[bool, str]:
        """Run one check within `timeout` seconds: (healthy?, one-line output or reason)."""
        ...


def _one_line(text: str) -> str:
    """The last non-empty line of `text`, stripped and trimmed to OUTPUT_LIMIT characters."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:OUTPUT_LIMIT] if lines else ""


def _seconds(timeout: float) -> str:
    return f"{timeout:g}s"


def _timed_out(timeout: float) -> str:
    return f"health check timed out after {_seconds(timeout)}"


def _reason(exc: BaseException) -> str:
    """A one-line description of an error: the system error behind it (e.g. "Connection
    refused") if there is one in its chain, else its message, else its type."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno)
        cause = cause.__cause__ or cause.__context__
    return _one_line(str(exc)) or type(exc).__name__


def _connect_host(addr: str) -> str:
    """Where to connect to reach a task bound to `addr` (a wildcard means this host)."""
    if addr in ("", "0.0.0.0"):
        return "127.0.0.1"
    if addr == "::":
        return "::1"
    return addr


def command_argv(test: Sequence[str]) -> list[str]:
    """The argv a `HealthConfig.test` runs: docker's CMD / CMD-SHELL forms, else as is."""
    if test and test[0] == "CMD":
        return list(test[1:])
    if test and test[0] == "CMD-SHELL":
        return ["/bin/sh", "-c", *test[1:]]
    return list(test)


class CommandProbe:
    """Runs a command (inside the task's network namespace if it has one); exit 0 is healthy.

    The command gets its own session (process group) so that on timeout or cancellation the
    whole group is killed, including whatever it started in the background.
    """

    def __init__(self, test: Sequence[str], *, netns: str | None = None, pid: int = 0,
                 env: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> None:
        argv = command_argv(test)
        if not argv:
            raise ValueError("health check command is empty")
        if netns and pid:
            argv = in_task_namespaces(pid, argv)
        elif netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        self.argv = argv
        self.env = dict(env) if env is not None else None
        self.cwd = cwd

    async def check(self, timeout: float) -> tuple[bool, str]:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        except FileNotFoundError:
            return False, f"exec: {self.argv[0]}: not found"
        except OSError as exc:
            return False, f"exec: {self.argv[0]}: {_reason(exc)}"
        try:
            async with asyncio.timeout(timeout):
                assert proc.stdout is not None
                output = await _read_tail(proc.stdout)
                code = await proc.wait()
        except TimeoutError:
            await _kill_and_reap(proc)
            return False, _timed_out(timeout)
        except BaseException:  # cancelled: never leave the command behind
            await _kill_and_reap(proc)
            raise
        _kill_group(proc)  # stragglers it left in the background
        line = _one_line(output)
        if code == 0:
            return True, line
        return False, line or (f"exit status {code}" if code > 0 else f"killed by signal {-code}")


async def _read_tail(stream: asyncio.StreamReader) -> str:
    """Read `stream` to EOF, keeping only its last _TAIL_BYTES bytes."""
    buf = b""
    while chunk := await stream.read(65536):
        buf = (buf + chunk)[-_TAIL_BYTES:]
    return buf.decode("utf-8", errors="replace")


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the command's process group (it is the group's leader)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


async def _kill_and_reap(proc: asyncio.subprocess.Process) -> None:
    """Kill the command's group and wait (briefly) until it is reaped and its pipe closed."""
    _kill_group(proc)
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()  # in case it left its group
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_REAP_WAIT):
            await proc.wait()


class HttpProbe:
    """GET http://addr:port/path on a fresh connection; a 2xx or 3xx answer is healthy."""

    def __init__(self, addr: str, port: int, path: str) -> None:
        host = _connect_host(addr)
        host = f"[{host}]" if ":" in host else host
        self.url = f"http://{host}:{port}{path}"

    async def check(self, timeout: float) -> tuple[bool, str]:
        try:
            async with asyncio.timeout(timeout):
                # trust_env=False: never through a proxy; the body is not read.
                async with httpx.AsyncClient(timeout=timeout, trust_env=False,
                                             follow_redirects=False) as client:
                    async with client.stream("GET", self.url, headers={
                            "User-Agent": "corral-healthcheck", "Connection": "close"}) as resp:
                        status = resp.status_code
        except (TimeoutError, httpx.TimeoutException):
            return False, _timed_out(timeout)
        except (httpx.HTTPError, OSError) as exc:
            return False, f"GET {self.url}: {_reason(exc)}"[:OUTPUT_LIMIT]
        if 200 <= status < 400:
            return True, f"HTTP {status}"
        return False, f"GET {self.url}: HTTP {status}"[:OUTPUT_LIMIT]


class TcpProbe:
    """The task's port accepts a TCP connection."""

    def __init__(self, addr: str, port: int) -> None:
        self.addr = _connect_host(addr)
        self.port = port

    async def check(self, timeout: float) -> tuple[bool, str]:
        where = f"[{self.addr}]:{self.port}" if ":" in self.addr else f"{self.addr}:{self.port}"
        try:
            async with asyncio.timeout(timeout):
                _, writer = await asyncio.open_connection(self.addr, self.port)
        except TimeoutError:
            return False, _timed_out(timeout)
        except OSError as exc:
            return False, f"connect {where}: {_reason(exc)}"
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(1.0):
                await writer.wait_closed()
        return True, f"connected to {where}"


def check_config(config: HealthConfig) -> None:
    """Raise InvalidArgument if `config` is not a usable health check."""
    kinds = [name for name, used in (("test", bool(config.test)),
                                     ("http_path", config.http_path is not None),
                                     ("tcp", config.tcp)) if used]
    if len(kinds) > 1:
        raise InvalidArgument(
            f"healthcheck: only one kind of probe is allowed, got {' and '.join(kinds)}")
    if config.test and config.test[0] in ("CMD", "CMD-SHELL") and \
            not any(arg.strip() for arg in config.test[1:]):
        raise InvalidArgument(f"healthcheck: {config.test[0]} needs a command after it")
    if config.http_path is not None and not config.http_path.startswith("/"):
        raise InvalidArgument(
            f"healthcheck: http_path must start with '/', got {config.http_path!r}")


def make_probe(config: HealthConfig, *, addr: str, port: int, netns: str | None = None,
               pid: int = 0, env: Mapping[str, str] | None = None,
               cwd: str | Path | None = None) -> Probe | None:
    """The probe `config` asks for (None if it has none, e.g. `["NONE"]`).

    `addr`/`port`: where the task listens (HTTP and TCP probes); `netns`/`pid`: the task's
    network namespace and process, whose namespaces a command probe runs in; `env`/`cwd`: the command's environment and
    directory (None: the daemon's). Raises InvalidArgument for a bad config.
    """
    check_config(config)
    if config.test:
        if config.test == ["NONE"]:
            return None
        return CommandProbe(config.test, netns=netns, pid=pid, env=env, cwd=cwd)
    if config.http_path is None and not config.tcp:
        return None
    if port <= 0:
        raise ValueError(f"an HTTP or TCP health check needs the task's port (got {port})")
    if config.http_path is not None:
        return HttpProbe(addr, port, config.http_path)
    return TcpProbe(addr, port)


async def watch_health(config: HealthConfig, probe: Probe,
                       on_change: Callable[[Health, str], Awaitable[None] | None], *,
                       clock: Callable[[], float] = time.monotonic,
                       sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                       started_at: float | None = None,
                       on_result: Callable[[bool, str, HealthTracker], None] | None = None) -> None:
    """Probe every `interval` seconds until cancelled; call `on_change(state, output)` on each
    change of health (the initial STARTING is the caller's to report).

    `started_at` (by `clock`; default: now) is when the task started, for the start period.
    A probe that raises counts as failed; one that overruns its timeout by more than a few
    seconds is cancelled and counts as timed out. `on_result`, if given, sees every probe's
    outcome with the tracker after it (readiness acts on single failures).
    """
    tracker = HealthTracker(config, clock() if started_at is None else started_at)
    while True:
        await sleep(config.interval)
        began = clock()
        try:
            async with asyncio.timeout(config.timeout + _WATCHDOG_GRACE):
                ok, output = await probe.check(config.timeout)
        except TimeoutError:
            ok, output = False, _timed_out(config.timeout)
        except Exception as exc:  # a probe bug must not end the watch
            ok, output = False, f"health check error: {_reason(exc)}"[:OUTPUT_LIMIT]
        changed = tracker.record(ok, output, began)
        if on_result is not None:
            on_result(ok, output, tracker)
        if changed:
            result = on_change(tracker.state, output)
            if result is not None:
                await result
