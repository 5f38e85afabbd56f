"""Waiting for a service to converge, with docker's progress display (create, scale, update)."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import typer

from corral.api.errors import CorralError
from corral.api.types import Node, NodeState, Service, ServiceMode, Task, TaskState
from corral.cli.render import VERIFY_CONVERGED, ProgressDisplay, progress_lines, verify_waiting_message
from corral.client import Client

# How long a new service's tasks must stay running before "converged" (an update waits for
# its own monitor period instead, as the manager only completes it after that).
VERIFY_SECONDS = 2
UPDATING = ("updating", "rollback_started")


def tasks_of(c: Client, service: str | None = None) -> list[Task]:
    return [Task.model_validate(t) for t in c.get("/v1/tasks", service=service)]


def nodes_of(c: Client) -> dict[str, Node]:
    return {n["id"]: Node.model_validate(n) for n in c.get("/v1/nodes")}


def converged(service: Service, tasks: list[Task], nodes: dict[str, Node] | None = None) -> bool:
    """Every wanted task runs the current spec, and nothing being removed still runs (a task
    on a node that is down cannot report it stopped: it does not hold things up)."""
    down = {i for i, n in (nodes or {}).items() if n.status.state is NodeState.DOWN}
    mine = [t for t in tasks if t.service_id == service.id]
    running = [t for t in mine if t.desired_state is TaskState.RUNNING
               and t.status.state is TaskState.RUNNING and t.spec_version == service.spec_version
               and t.status.health in ("", "healthy")]
    leftovers = [t for t in mine if t.desired_state > TaskState.RUNNING and not t.status.state.terminal
                 and t.node_id and t.node_id not in down]
    if service.spec.mode is ServiceMode.GLOBAL:
        wanted = [t for t in mine if t.desired_state is TaskState.RUNNING]
        return bool(wanted) and len(running) == len(wanted) and not leftovers
    slots = {t.slot for t in running}
    return slots >= set(range(1, service.spec.replicas + 1)) and not leftovers


class UpdateFailed(CorralError):
    """The update paused or rolled back instead of converging."""


def run_operation(c: Client, request: Callable[[], Service], message: Callable[[Service], str],
                  wait: bool) -> None:
    """Send a change, print what docker prints, then (unless detached) show its progress.

    Ctrl-C is held from just before the request until the progress loop can handle it: at
    any moment it either stops the CLI before anything was sent or leaves the operation
    running with docker's message — never a bare interrupt in between."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        svc = request()
        typer.echo(message(svc))
    except BaseException:
        _release_interrupts()
        raise
    if not wait:
        _release_interrupts()
        return
    wait_converged(c, svc.id)


def _release_interrupts() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def wait_converged(c: Client, service_id: str) -> None:
    """Redraw docker's progress display until converged and stable, or Ctrl-C."""
    display = ProgressDisplay()
    stable_since: float | None = None
    lines: list[str] = []
    try:
        _release_interrupts()  # a Ctrl-C held by run_operation arrives here, inside the try
        first = Service.model_validate(c.get(f"/v1/services/{service_id}"))
        was_updating = first.update_status is not None and first.update_status.state == "updating"
        while True:
            svc = Service.model_validate(c.get(f"/v1/services/{service_id}"))
            tasks = tasks_of(c, service_id)
            nodes = nodes_of(c)
            status = svc.update_status
            rolling_back = status is not None and status.state.startswith("rollback")
            if status is not None and status.state in ("paused", "rollback_paused"):
                display.finish(progress_lines(svc, tasks, nodes, rollback=rolling_back))
                raise UpdateFailed(status.message or "update paused")
            verify = None
            if status is not None and status.state in UPDATING:
                stable_since = None
                if converged(svc, tasks, nodes):
                    verify = verify_waiting_message(int(config_monitor(svc)))
            elif converged(svc, tasks, nodes):
                stable_since = stable_since or time.monotonic()
                wait = 0 if status is not None else VERIFY_SECONDS
                if time.monotonic() - stable_since >= wait:
                    display.finish(progress_lines(svc, tasks, nodes, verify=VERIFY_CONVERGED,
                                                  rollback=rolling_back))
                    if was_updating and status is not None and status.state == "rollback_completed":
                        raise UpdateFailed(status.message or "update rolled back")
                    return
                verify = verify_waiting_message(wait)
            else:
                stable_since = None
            lines = progress_lines(svc, tasks, nodes, verify=verify, rollback=rolling_back)
            display.update(lines)
            time.sleep(0.1)
    except KeyboardInterrupt:
        display.finish(lines)
        typer.echo("Operation continuing in background.")
        typer.echo(f"Use `corral service ps {service_id[:12]}` to check progress.")


def config_monitor(svc: Service) -> float:
    status = svc.update_status
    cfg = svc.spec.rollback_config if status and status.state.startswith("rollback") \
        else svc.spec.update_config
    return cfg.monitor

