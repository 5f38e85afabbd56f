"""Table and progress rendering for the CLI, matching docker's output text.

The functions here are pure: they take API objects and return strings or (headers, rows).
`rich` is used only by `ProgressDisplay`, at the edge, to redraw a frame in place.

References (docker/cli): `cli/command/formatter` (tabwriter: min width 10, padding 3),
`cli/command/node/formatter.go`, `cli/command/service/formatter.go`,
`cli/command/task/{print,formatter}.go`, `cli/command/service/progress/progress.go`,
go-units `HumanDuration` and moby's `jsonmessage.JSONProgress` bar.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from types import TracebackType

from pydantic import BaseModel
from rich.console import Console
from rich.live import Live
from rich.text import Text

from corral.api.types import (
    Node,
    NodeRole,
    NodeState,
    PortConfig,
    Service,
    ServiceMode,
    Task,
    TaskState,
)

__all__ = [
    "MAX_PROGRESS_BARS",
    "VERIFY_CONVERGED",
    "VERIFY_TASK_FAILURE",
    "ProgressDisplay",
    "format_service_ports",
    "format_table",
    "human_duration",
    "node_ls_rows",
    "progress_bar",
    "progress_lines",
    "service_ls_rows",
    "service_ps_rows",
    "to_json_lines",
    "verify_waiting_message",
]

Rows = list[list[str]]
TableData = tuple[list[str], Rows]

TABLE_MIN_WIDTH = 10  # docker: tabwriter.NewWriter(out, 10, 1, 3, ' ', 0)
TABLE_PADDING = 3
ID_LENGTH = 12  # docker's TruncateID
MAX_ERR_LENGTH = 30  # `service ps` ERROR column, docker's maxErrLength
MAX_PROGRESS_ERR_LENGTH = 75  # progress lines, docker's truncError

# --------------------------------------------------------------------------- helpers


def _pretty(value: str) -> str:
    """Docker's PrettyPrint: capitalise the first letter (`running` -> `Running`)."""
    return value[:1].upper() + value[1:]


def _natural_key(text: str) -> list[str | int]:
    """Sort key comparing digit runs numerically (`web.2` < `web.10`), like sortorder.NaturalLess."""
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", text))]


def _ellipsis(text: str, max_len: int) -> str:
    """Cut `text` to `max_len` characters, the last one being `…`, as docker's Ellipsis does."""
    if len(text) <= max_len:
        return text
    return text[: max_len - 1] + "\u2026"


def human_duration(seconds: float) -> str:
    """go-units HumanDuration: `Less than a second`, `8 seconds`, `About a minute`, `3 days`, …"""
    seconds = max(seconds, 0.0)
    secs = int(seconds)
    if secs < 1:
        return "Less than a second"
    if secs == 1:
        return "1 second"
    if secs < 60:
        return f"{secs} seconds"
    minutes = int(seconds / 60)
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = int(seconds / 3600 + 0.5)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds / 3600) // 24 // 365} years"


# --------------------------------------------------------------------------- tables


def format_table(
    headers: list[str],
    rows: list[list[str]],
    *,
    min_width: int = TABLE_MIN_WIDTH,
    padding: int = TABLE_PADDING,
) -> str:
    """Align columns like docker's tabwriter: width max(min_width, widest + padding); last unpadded."""
    lines = [headers, *rows]
    ncols = max(len(line) for line in lines)
    widths: list[int] = []
    for col in range(ncols - 1):
        cells = [len(line[col]) for line in lines if col < len(line) - 1]
        widths.append(max([min_width, *(w + padding for w in cells)]))
    out: list[str] = []
    for line in lines:
        parts = [
            cell if col == len(line) - 1 else cell.ljust(widths[col])
            for col, cell in enumerate(line)
        ]
        out.append("".join(parts))
    return "\n".join(out)


def node_ls_rows(nodes: list[Node], self_id: str, leader_id: str) -> TableData:
    """`node ls` table: ID (`<id> *` for this node), HOSTNAME, STATUS, AVAILABILITY, …"""
    headers = ["ID", "HOSTNAME", "STATUS", "AVAILABILITY", "MANAGER STATUS", "ENGINE VERSION"]
    rows: Rows = []
    for node in sorted(nodes, key=lambda n: (_natural_key(n.hostname), n.id)):
        if node.spec.role != NodeRole.MANAGER:
            manager = ""
        elif node.id == leader_id:
            manager = "Leader"
        elif node.status.state in (NodeState.DOWN, NodeState.DISCONNECTED):
            manager = "Unreachable"
        else:
            manager = "Reachable"
        rows.append(
            [
                # docker's template is `{{.ID}} {{if .Self}}*{{else}} {{end}}`
                f"{node.id} *" if node.id == self_id else f"{node.id}  ",
                node.hostname,
                _pretty(node.status.state.value),
                _pretty(node.spec.availability.value),
                manager,
                node.description.engine_version,
            ]
        )
    return headers, rows


def format_service_ports(ports: Sequence[PortConfig]) -> str:
    """Ingress-mode ports as docker's `service ls` prints them, ranges grouped: `*:80-81->80-81/tcp`."""
    ingress = sorted(
        (p for p in ports if p.publish_mode == "ingress"),
        key=lambda p: (p.protocol, p.published_port),
    )

    def gap(a: int, b: int) -> bool:
        """Go's unsigned `a-b > 1`: true unless a is b or b+1."""
        return a - b > 1 or a < b

    out: list[str] = []
    # current range: published start/end, target start/end, protocol
    cur: list[int] | None = None
    proto = ""

    def flush() -> None:
        """Append the current range, if any, to the output."""
        if cur is None:
            return
        ps, pe, ts, te = cur
        pub = f"{ps}-{pe}" if pe > ps else str(ps)
        tgt = f"{ts}-{te}" if te > ts else str(ts)
        out.append(f"*:{pub}->{tgt}/{proto}")

    for p in ingress:
        if cur is not None and p.protocol == proto:
            is_range = cur[3] != cur[2]
            if not (
                gap(p.published_port, cur[1])
                or gap(p.target_port, cur[3])
                or (is_range and p.target_port <= cur[3])
            ):
                cur[1], cur[3] = p.published_port, p.target_port
                continue
        flush()
        cur = [p.published_port, p.published_port, p.target_port, p.target_port]
        proto = p.protocol
    flush()
    return ", ".join(out)


def service_ls_rows(
    services: list[Service], running: dict[str, int], desired: dict[str, int]
) -> TableData:
    """`service ls` table: ID, NAME, MODE, REPLICAS (`2/3 (max 1 per node)`), IMAGE, PORTS."""
    headers = ["ID", "NAME", "MODE", "REPLICAS", "IMAGE", "PORTS"]
    rows: Rows = []
    for svc in sorted(services, key=lambda s: (_natural_key(s.spec.name), s.id)):
        replicas = f"{running.get(svc.id, 0)}/{desired.get(svc.id, 0)}"
        max_per_node = svc.spec.placement.max_replicas
        if svc.spec.mode == ServiceMode.REPLICATED and max_per_node > 0:
            replicas += f" (max {max_per_node} per node)"
        rows.append(
            [
                svc.id[:ID_LENGTH],
                svc.spec.name,
                svc.spec.mode.value,
                replicas,
                svc.spec.task.image,
                format_service_ports(svc.spec.ports),
            ]
        )
    return headers, rows


def service_ps_rows(
    tasks: list[Task], nodes: dict[str, Node], now: float, no_trunc: bool = False
) -> TableData:
    """`service ps` table, newest task of each slot first and older ones as ` \\_ name`."""
    headers = [
        "ID",
        "NAME",
        "IMAGE",
        "NODE",
        "DESIRED STATE",
        "CURRENT STATE",
        "ERROR",
        "PORTS",
    ]
    # Newest first, then (stable) group by name in natural order: slots 1, 2, …, 10.
    ordered = sorted(tasks, key=lambda t: t.created_at, reverse=True)
    ordered.sort(key=lambda t: _natural_key(t.name))
    rows: Rows = []
    prev_name = ""
    for task in ordered:
        name = f" \\_ {task.name}" if task.name == prev_name else task.name
        prev_name = task.name
        if not task.node_id:
            node_name = ""
        elif task.node_id in nodes:
            node_name = nodes[task.node_id].hostname
        else:
            node_name = task.node_id
        ago = human_duration(now - task.status.timestamp)
        current = f"{_pretty(task.status.state.value)} {ago.lower()} ago"
        if task.status.health and task.status.state is TaskState.RUNNING:
            current += f" ({task.status.health})"  # like `docker ps`: "Up 5 seconds (healthy)"
        err = task.status.err if no_trunc else _ellipsis(task.status.err, MAX_ERR_LENGTH)
        ports = ",".join(
            f"*:{p.published_port}->{p.target_port}/{p.protocol}"
            for p in task.ports
            if p.publish_mode == "host"
        )
        rows.append(
            [
                task.id if no_trunc else task.id[:ID_LENGTH],
                name,
                task.spec.image,
                node_name,
                _pretty(task.desired_state.value),
                current,
                f'"{err}"' if err else "",
                ports,
            ]
        )
    return headers, rows


# --------------------------------------------------------------------------- progress

# docker's numberedStates (corral has no "allocated"; remove/orphaned are not shown at all)
_PROGRESS_RANK: dict[TaskState, int] = {
    TaskState.NEW: 1,
    TaskState.PENDING: 3,
    TaskState.ASSIGNED: 4,
    TaskState.ACCEPTED: 5,
    TaskState.PREPARING: 6,
    TaskState.READY: 7,
    TaskState.STARTING: 8,
    TaskState.RUNNING: 9,
    TaskState.COMPLETE: 10,
    TaskState.SHUTDOWN: 11,
    TaskState.FAILED: 12,
    TaskState.REJECTED: 13,
}
MAX_PROGRESS = 9
MAX_PROGRESS_BARS = 20
_LONGEST_STATE = 9  # len("preparing")
_BAR_WIDTH = 50

VERIFY_CONVERGED = "Service converged"
VERIFY_TASK_FAILURE = "Detected task failure"


def verify_waiting_message(seconds: int) -> str:
    """The `verify:` text shown while a converged service is being watched for stability."""
    return f"Waiting {seconds} seconds to verify that tasks are stable..."


def progress_bar(current: int, total: int = MAX_PROGRESS) -> str:
    """moby's JSONProgress bar: `[` + `=`*pct + `>` + spaces + `]`, pct = int(cur/total*100)/2."""
    pct = 0 if total <= 0 else min(int(current / total * 100) // 2, _BAR_WIDTH)
    pct = max(pct, 0)
    return "[" + "=" * pct + ">" + " " * (_BAR_WIDTH - pct) + "]"


def _progress_terminal(state: TaskState) -> bool:
    """True for states docker never draws a bar for (past running)."""
    return _PROGRESS_RANK[state] > _PROGRESS_RANK[TaskState.RUNNING]


def _truncate_progress_error(err: str) -> str:
    """docker's truncError: newlines to spaces, at most 75 characters."""
    return _ellipsis(err.replace("\n", " "), MAX_PROGRESS_ERR_LENGTH)


def _task_progress_line(label: str, task: Task | None) -> str:
    """One `label: state [bar]` line (or `label: error`) for the task shown in a slot/node."""
    if task is None:
        return f"{label}:"
    if task.status.err:
        return f"{label}: {_truncate_progress_error(task.status.err)}"
    state = task.status.state
    if _progress_terminal(task.desired_state) or _progress_terminal(state):
        return f"{label}: {state.value}"
    bar = progress_bar(_PROGRESS_RANK[state])
    return f"{label}: {state.value:<{_LONGEST_STATE}} {bar}"


def _pick_task(current: Task | None, task: Task) -> Task:
    """Docker's tie-break within a slot: lowest desired state, then lowest observed, then newest."""
    if current is None:
        return task

    def key(t: Task) -> tuple[int, int, float]:
        """Ordering key; the smallest wins."""
        return (_PROGRESS_RANK[t.desired_state], _PROGRESS_RANK[t.status.state], -t.created_at)

    return task if key(task) < key(current) else current


def _node_active(task: Task, nodes: dict[str, Node]) -> bool:
    """False when the task's node is known to be down (docker ignores those tasks)."""
    node = nodes.get(task.node_id) if task.node_id else None
    return node is None or node.status.state != NodeState.DOWN


def _overall(running: int, total: int, rollback: bool) -> str:
    """The `overall progress:` line."""
    if rollback:
        return f"overall progress: rolling back update: {running} out of {total} tasks"
    return f"overall progress: {running} out of {total} tasks"


def _counts_running(task: Task) -> bool:
    """A task counts towards convergence when it runs and is meant to."""
    return not _progress_terminal(task.desired_state) and task.status.state == TaskState.RUNNING


def progress_lines(
    service: Service,
    tasks: list[Task],
    nodes: dict[str, Node],
    verify: str | None = None,
    rollback: bool = False,
) -> list[str]:
    """The text of docker's `service create/update` progress for the current state of `tasks`."""
    current = [
        t
        for t in tasks
        if t.service_id == service.id
        and t.spec_version == service.spec_version  # docker's `_up-to-date` filter
        and t.desired_state in _PROGRESS_RANK
        and t.status.state in _PROGRESS_RANK
        and _node_active(t, nodes)
    ]
    lines: list[str]
    if service.spec.mode == ServiceMode.GLOBAL:
        lines = _global_progress(current, nodes, rollback)
    else:
        lines = _replicated_progress(service.spec.replicas, current, rollback)
    if verify is not None:
        lines.append(f"verify: {verify}")
    return lines


def _replicated_progress(replicas: int, tasks: list[Task], rollback: bool) -> list[str]:
    """Overall line plus one line per slot 1..replicas (no slot lines past 20 replicas)."""
    by_slot: dict[int, Task] = {}
    for t in tasks:
        if 1 <= t.slot <= replicas:
            by_slot[t.slot] = _pick_task(by_slot.get(t.slot), t)
    running = sum(1 for t in by_slot.values() if _counts_running(t))
    lines = [_overall(running, replicas, rollback)]
    if replicas <= MAX_PROGRESS_BARS:
        for slot in range(1, replicas + 1):
            lines.append(_task_progress_line(f"{slot}/{replicas}", by_slot.get(slot)))
    return lines


def _global_progress(tasks: list[Task], nodes: dict[str, Node], rollback: bool) -> list[str]:
    """Overall line plus one line per node (`<node id[:12]>: running [...]`)."""
    by_node: dict[str, Task] = {}
    for t in tasks:
        by_node[t.node_id] = _pick_task(by_node.get(t.node_id), t)
    if not by_node:
        return ["overall progress: waiting for new tasks"]
    running = sum(1 for t in by_node.values() if _counts_running(t))
    lines = [_overall(running, len(by_node), rollback)]
    if len(by_node) <= MAX_PROGRESS_BARS:

        def order(node_id: str) -> tuple[list[str | int], str]:
            """Nodes in hostname order (unknown nodes by ID)."""
            node = nodes.get(node_id)
            return (_natural_key(node.hostname if node else node_id), node_id)

        for node_id in sorted(by_node, key=order):
            lines.append(_task_progress_line(node_id[:ID_LENGTH], by_node[node_id]))
    return lines


class ProgressDisplay:
    """Redraws progress frames in place with rich Live on a terminal; elsewhere prints the last frame."""

    def __init__(self, console: Console | None = None) -> None:
        """Use `console` (default: stdout, no highlighting)."""
        self.console = console if console is not None else Console(highlight=False)
        self._live: Live | None = None
        self._lines: list[str] = []
        self._finished = False

    @staticmethod
    def _render(lines: Iterable[str]) -> Text:
        """A frame as plain Text, so `[===>]` is never read as rich markup."""
        return Text("\n".join(lines))

    def update(self, lines: list[str]) -> None:
        """Show a new frame (terminal only; otherwise it is remembered for `finish`)."""
        self._lines = list(lines)
        if self._finished or not self.console.is_terminal:
            return
        if self._live is None:
            self._live = Live(
                self._render(self._lines),
                console=self.console,
                auto_refresh=False,
                transient=False,
            )
            self._live.start(refresh=True)
        else:
            self._live.update(self._render(self._lines), refresh=True)

    def finish(self, lines: list[str] | None = None) -> None:
        """Leave the final frame (`lines`, or the last one given) on screen; idempotent."""
        if self._finished:
            return
        self._finished = True
        if lines is not None:
            self._lines = list(lines)
        if self._live is not None:
            self._live.update(self._render(self._lines), refresh=True)
            self._live.stop()
            self._live = None
            return
        for line in self._lines:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def __enter__(self) -> ProgressDisplay:
        """Context manager: `finish()` is called on exit."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Finish the display (also on Ctrl-C), restoring the cursor."""
        self.finish()


# --------------------------------------------------------------------------- json


def to_json_lines(objs: Sequence[BaseModel]) -> str:
    """`--format json`: one compact JSON object per line (no trailing newline)."""
    return "\n".join(obj.model_dump_json() for obj in objs)
