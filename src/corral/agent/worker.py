"""Agent: runs the tasks the manager assigns to this node and reports what it observes.

How this works: three loops share one session with the manager — heartbeats every period,
a long-poll for assignments (the node's tasks plus the cluster's ingress endpoints), and a
sender that reports task states in order. Each assigned task gets one `TaskRunner` that walks
it through the executor's controller, one step per state (swarmkit's agent/exec model). The
manager only changes a task's *desired* state; the runner reacts to it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable

from corral.agent.drain import connections
from corral.agent.exec import Controller, Executor, TaskFailed, TaskRejected
from corral.agent.health import Health, HealthTracker, make_probe, watch_health
from corral.agent.session import ManagerSession, SessionRefused
from corral.api.errors import CorralError
from corral.api.types import NodeRole, Task, TaskState
from corral.manager.dispatcher import Assignments, Endpoint, StatusUpdate

log = logging.getLogger(__name__)

Report = Callable[[StatusUpdate], None]

# How long a stopping task waits for every node to drop it from its balancers before counting
# its connections (Swarm waits a fixed 2 s), and the least time SIGTERM gets before SIGKILL.
DRAIN_PROPAGATION = 0.5
MIN_TERM_GRACE = 1.0


async def wait_listening(addr: str, port: int, timeout: float, alive: Callable[[], bool]) -> bool:
    """Poll until the task accepts TCP connections, so the mesh never sees a half-started task."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            _, writer = await asyncio.open_connection(addr, port)
            writer.close()
            return True
        except OSError:
            await asyncio.sleep(0.05)
    return False


class TaskRunner:
    """Drives one task from ACCEPTED to a final state, following its desired state."""

    def __init__(self, task: Task, controller: Controller, report: Report,
                 advertise_addr: str = "") -> None:
        self.task = task
        self.advertise_addr = advertise_addr
        self.ctl = controller
        self._report = report
        self.changed = asyncio.Event()
        self.state = task.status.state
        self.health = ""  # docker's health status while running ("" = no health check)
        self.health_output = ""
        self.unhealthy = False

    def set_task(self, task: Task) -> None:
        """A newer copy of the task arrived (its desired state may have changed)."""
        self.task = task
        self.changed.set()

    def forget(self) -> None:
        """The task is gone from the manager: stop it."""
        self.task = self.task.model_copy(update={"desired_state": TaskState.REMOVE})
        self.changed.set()

    @property
    def stopping(self) -> bool:
        return self.task.desired_state > TaskState.RUNNING

    def report(self, state: TaskState, message: str, err: str = "", exit_code: int | None = None) -> None:
        self.state = state
        addr, port = self.ctl.endpoint
        if addr in ("0.0.0.0", "::", "") and self.advertise_addr:
            addr = self.advertise_addr  # a task bound to all addresses is reached at the node's
        self._report(StatusUpdate(task_id=self.task.id, state=state, message=message, err=err,
                                  exit_code=exit_code, addr=addr, port=port, pid=self.ctl.pid,
                                  health=self.health if state is TaskState.RUNNING else ""))

    async def _until(self, cond: Callable[[], bool]) -> None:
        while not cond():
            self.changed.clear()
            await self.changed.wait()

    async def run(self) -> None:
        """The task's whole life on this node."""
        try:
            await self._run()
        except asyncio.CancelledError:
            # The agent is shutting down: stop the process, report nothing (the manager will
            # see the node go down, or the daemon reports on restart).
            await asyncio.shield(self.ctl.shutdown(0.5))
            raise
        except Exception as exc:  # a runtime bug must end this task, not the agent
            log.exception("task %s: runtime error", self.task.name)
            await self.ctl.shutdown(0)
            self.report(TaskState.FAILED, "runtime error", err=str(exc))
        finally:
            await self.ctl.remove()

    async def _run(self) -> None:
        if self.stopping:
            self.report(TaskState.SHUTDOWN, "shutdown before start")
            return
        self.report(TaskState.ACCEPTED, "accepted")
        # A replacement waiting out its restart delay is only prepared once the manager says
        # run: preparing earlier would turn a task that is always rejected (no such image)
        # into a hot loop that ignores the delay.
        await self._until(lambda: self.task.desired_state is not TaskState.READY)
        if self.stopping:
            self.report(TaskState.SHUTDOWN, "shutdown before start")
            return
        self.report(TaskState.PREPARING, "preparing")
        try:
            await self.ctl.prepare()
        except TaskRejected as exc:
            self.report(TaskState.REJECTED, "rejected", err=str(exc))
            return
        self.report(TaskState.READY, "prepared")
        self.report(TaskState.STARTING, "starting")
        try:
            await self.ctl.start()
        except (TaskFailed, OSError) as exc:
            self.report(TaskState.FAILED, "starting failed", err=str(exc))
            return
        exited = asyncio.ensure_future(self.ctl.wait())
        health: asyncio.Future[None] | None = None
        grace = self.task.spec.stop_grace_period
        try:
            addr, port = self.listen_addr()
            if self.task.ports and port:
                await wait_listening(addr, port, 5.0, lambda: not exited.done())
            if not exited.done():
                health = self._start_health(addr, port)
                self.report(TaskState.RUNNING, "started")
            stop = asyncio.ensure_future(self._until(lambda: self.stopping or self.unhealthy))
            try:
                await asyncio.wait({exited, stop}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
            if health is not None:
                health.cancel()
            if not exited.done() and self.unhealthy and not self.stopping:
                # Liveness: an unhealthy task is killed and the orchestrator replaces it — but
                # like any task going away, only once the balancers have dropped it (its
                # unhealthy report did that) and its in-flight connections are done.
                remaining = await self._drain(port, exited, grace)
                await self.ctl.shutdown(remaining)
                await exited
                self.report(TaskState.FAILED, "unhealthy",
                            err=f"task: unhealthy container ({self.health_output})",
                            exit_code=exited.result())
                return
            if not exited.done():
                remaining = await self._drain(port, exited, grace)
                await self.ctl.shutdown(remaining)
                await exited
                self.report(TaskState.SHUTDOWN, "shutdown", exit_code=exited.result())
                return
            code = exited.result()
            if self.stopping:
                self.report(TaskState.SHUTDOWN, "shutdown", exit_code=code)
            elif code == 0:
                self.report(TaskState.COMPLETE, "finished", exit_code=0)
            else:
                self.report(TaskState.FAILED, "started", err=f"task: non-zero exit ({code})",
                            exit_code=code)
        finally:
            if not exited.done():
                exited.cancel()
            if health is not None:
                health.cancel()

    def listen_addr(self) -> tuple[str, int]:
        """Where the task serves: a process task's own port, or a netns task's target port."""
        addr, port = self.ctl.endpoint
        if not port and self.task.ports:
            port = self.task.ports[0].target_port
        return addr, port

    def _start_health(self, addr: str, port: int) -> asyncio.Future[None] | None:
        """Start probing the task if it has a health check; it is routable once healthy."""
        cfg = self.task.spec.healthcheck
        if cfg is None:
            return None
        try:
            probe = make_probe(cfg, addr=addr, port=port, netns=self.ctl.netns,
                               pid=self.ctl.pid, env=self.ctl.environment())
        except (ValueError, CorralError) as exc:
            self.health, self.health_output = Health.UNHEALTHY.value, str(exc)
            self.unhealthy = True
            return None
        if probe is None:
            return None
        self.health = Health.STARTING.value

        def changed(state: Health, output: str) -> None:
            self.health_output = output
            self._set_health(state.value)
            if state is Health.UNHEALTHY:
                self.unhealthy = True  # liveness: `retries` failures in a row
                self.changed.set()

        def result(ok: bool, output: str, tracker: HealthTracker) -> None:
            # Readiness: one failed probe of a healthy task takes it out of every balancer at
            # once; it is restarted only after `retries` failures (above).
            if not ok and tracker.state is Health.HEALTHY and tracker.failing_streak:
                self.health_output = output
                self._set_health(Health.UNHEALTHY.value)
            elif ok and self.health != Health.HEALTHY.value and tracker.state is Health.HEALTHY:
                self._set_health(Health.HEALTHY.value)
        return asyncio.ensure_future(watch_health(cfg, probe, changed, on_result=result))

    def _set_health(self, health: str) -> None:
        if health != self.health:
            self.health = health
            self.report(TaskState.RUNNING, f"health: {health}")

    async def _drain(self, port: int, exited: asyncio.Future[int], grace: float) -> float:
        """Out of every balancer first, then let in-flight connections finish (up to the
        grace period); returns how much of the grace period is left for SIGTERM."""
        if not (self.task.ports or self.task.networks):
            return grace  # never behind a balancer
        start = time.monotonic()
        # Every node's mesh and VIP rules learn of the change through the same long-poll:
        # give that a moment before counting connections.
        await asyncio.sleep(min(DRAIN_PROPAGATION, grace))
        pid = self.ctl.pid
        while (port and pid and not exited.done() and time.monotonic() - start < grace
               and connections(pid, port) > 0):
            await asyncio.sleep(0.05)
        return max(MIN_TERM_GRACE, grace - (time.monotonic() - start))


class Agent:
    """The node's worker: session with the manager, task runners, and the mesh feed."""

    def __init__(self, session: ManagerSession, executor: Executor,
                 apply_endpoints: Callable[[list[Endpoint]], Awaitable[None]],
                 advertise_addr: str = "",
                 apply_networks: Callable[[Assignments], Awaitable[None]] | None = None,
                 forward_host_ports: bool = False,
                 on_role: Callable[[NodeRole], None] | None = None) -> None:
        self.session = session
        self.on_role = on_role  # told when the manager says this node's role changed
        self.forward_host_ports = forward_host_ports
        self.apply_networks = apply_networks
        self.advertise_addr = advertise_addr
        self.executor = executor
        self.apply_endpoints = apply_endpoints
        self.runners: dict[str, TaskRunner] = {}
        self._runs: dict[str, asyncio.Task[None]] = {}
        self._outbox: list[StatusUpdate] = []
        self._outbox_ready = asyncio.Event()
        # Tasks whose runner has finished: their final report may not have reached the
        # manager yet, so a stale assignment must not be mistaken for a lost task.
        self._finished: set[str] = set()
        self.period = 1.0
        self.refused: str = ""
        self.manager_ids: frozenset[str] = frozenset()  # the swarm's managers, as last told

    def report(self, update: StatusUpdate) -> None:
        self._outbox.append(update)
        self._outbox_ready.set()

    async def run(self) -> None:
        """Run until cancelled; on cancel, stop every task this node runs."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._heartbeats())
                tg.create_task(self._assignments())
                tg.create_task(self._sender())
        finally:
            runs = list(self._runs.values())
            for r in runs:
                r.cancel()
            await asyncio.gather(*runs, return_exceptions=True)

    async def _heartbeats(self) -> None:
        while True:
            try:
                self.period = await self.session.heartbeat()
                self.refused = ""
            except SessionRefused as exc:
                self.refused = str(exc)
                log.error("manager refused this node: %s", exc)
            except Exception as exc:  # manager down: keep tasks running, keep trying
                log.warning("heartbeat failed: %r", exc)
            await asyncio.sleep(self.period)

    async def _sender(self) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            batch, self._outbox = self._outbox, []
            try:
                await self.session.send_status(batch)
            except SessionRefused as exc:
                log.error("status refused: %s", exc)
            except Exception as exc:
                log.warning("status report failed, will retry: %r", exc)
                self._outbox = batch + self._outbox
                self._outbox_ready.set()
                await asyncio.sleep(0.5)

    async def _assignments(self) -> None:
        version = -1
        while True:
            try:
                a = await self.session.assignments(version, timeout=10.0)
            except Exception as exc:
                log.warning("assignments poll failed: %r", exc)
                await asyncio.sleep(0.5)
                continue
            version = a.version
            await self.apply(a)

    async def apply(self, a: Assignments) -> None:
        """Reconcile local task runners and the mesh with a fresh set of assignments."""
        # Secrets first: a task about to be prepared writes its files from them.
        self.executor.secrets = {s.id: base64.b64decode(s.data) for s in a.secrets}
        if a.managers:
            self.session.set_managers(a.managers)
        if a.role is not None and self.on_role is not None:
            self.on_role(a.role)
        if a.manager_ids:
            self.manager_ids = frozenset(a.manager_ids)
        if self.apply_networks is not None:
            # Networks first: a task about to be prepared needs its bridge to exist.
            try:
                await self.apply_networks(a)
            except Exception:
                log.exception("applying network state failed; will retry on the next change")
        seen = set()
        for t in a.tasks:
            seen.add(t.id)
            runner = self.runners.get(t.id)
            if runner is not None:
                runner.set_task(t)
            elif t.status.state.terminal or t.id in self._finished:
                continue
            elif t.status.state > TaskState.ASSIGNED:
                # We reported progress on this task before, but no runner has it: this daemon
                # restarted and its process is gone.
                if t.desired_state > TaskState.RUNNING:
                    self.report(StatusUpdate(task_id=t.id, state=TaskState.SHUTDOWN,
                                             message="shutdown"))
                else:
                    self.report(StatusUpdate(task_id=t.id, state=TaskState.FAILED,
                                             message="task lost",
                                             err="task lost: the node's daemon restarted"))
            else:
                self._start(t)
        for task_id, runner in list(self.runners.items()):
            if task_id not in seen:
                runner.forget()
        self._finished &= seen
        await self.apply_endpoints(a.endpoints + self.host_endpoints(a))

    def host_endpoints(self, a: Assignments) -> list[Endpoint]:
        """Host-mode ports the node must forward itself: a node-local forward to tasks in
        their own namespace; none for process tasks, which bind the node's port directly."""
        return a.host_endpoints if self.forward_host_ports else []

    def _start(self, task: Task) -> None:
        runner = TaskRunner(task, self.executor.controller(task), self.report, self.advertise_addr)
        self.runners[task.id] = runner

        async def supervise() -> None:
            try:
                await runner.run()
            finally:
                self._finished.add(task.id)
                self.runners.pop(task.id, None)
                self._runs.pop(task.id, None)
        self._runs[task.id] = asyncio.create_task(supervise(), name=f"task {task.name}")
