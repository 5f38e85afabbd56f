"""The executor/controller seam between the agent and a task runtime (swarmkit's agent/exec).

How this works: the agent never touches processes itself. For every task it is given, it asks
the node's `Executor` for a `Controller` and drives it one step at a time, mapping each step
to a task state: `prepare` (PREPARING -> READY; raises `TaskRejected` when the task can never
run, e.g. an unknown image), `start` (STARTING -> RUNNING), `wait` (RUNNING -> COMPLETE or
FAILED by exit code), `shutdown` (desired state SHUTDOWN) and `remove` (the task is gone).
The executor also kills what a crashed daemon left running (`cleanup_orphans`, at daemon
start) and serves task logs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from corral.api.types import Task


class TaskRejected(Exception):
    """The runtime cannot run this task at all (e.g. no such image); the task ends REJECTED."""


class TaskFailed(Exception):
    """The runtime tried to run the task and failed (e.g. exec failed); the task ends FAILED."""


@dataclass(frozen=True)
class TaskEnv:
    """What the agent knows about where its tasks run."""

    node_name: str
    node_id: str
    node_addr: str


class Controller(Protocol):
    """Drives one task's runtime object, one step at a time."""

    async def prepare(self) -> None:
        """Resolve the image, allocate the port, create log files; raise TaskRejected if bad."""
        ...

    async def start(self) -> None:
        """Start the task's process."""
        ...

    async def wait(self) -> int:
        """Wait for the process to exit; return its exit code (negative = killed by signal)."""
        ...

    async def shutdown(self, grace: float) -> None:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL; idempotent, fine if never started."""
        ...

    async def remove(self) -> None:
        """Delete runtime leftovers of the task (logs are kept)."""
        ...

    @property
    def endpoint(self) -> tuple[str, int]:
        """(addr, port) the task listens on; valid after prepare."""
        ...

    @property
    def pid(self) -> int:
        """The process id while it runs, else 0."""
        ...

    @property
    def netns(self) -> str | None:
        """The task's own network namespace (None: it shares its node's)."""
        ...

    def environment(self) -> dict[str, str]:
        """The task's environment (health commands and `service exec` run with it too)."""
        ...


class Executor(Protocol):
    """Makes controllers for tasks and cleans up what a previous daemon left behind."""

    secrets: dict[str, bytes]
    """Secret values the node's tasks use, by secret id (the agent keeps this current)."""

    def controller(self, task: Task) -> Controller:
        """A new controller for `task` (nothing happens until `prepare`)."""
        ...

    def cleanup_orphans(self) -> list[str]:
        """Kill processes left running by a previous daemon; return their task ids."""
        ...

    def logs(self, task_id: str, tail: int | None = None) -> list[tuple[str, str]] | None:
        """The task's output as (stream, line) pairs, or None if the task is unknown."""
        ...


def in_task_namespaces(pid: int, argv: Sequence[str]) -> list[str]:
    """`argv` run in the network and mount namespaces of the task whose process is `pid`:
    it sees what the task sees (its addresses, its /run/secrets)."""
    return ["nsenter", "-t", str(pid), "--net", "--mount", *argv]
