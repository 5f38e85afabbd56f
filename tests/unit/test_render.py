"""Tests for corral.cli.render: docker-identical tables and progress text."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from corral.api.types import (
    ContainerSpec,
    Node,
    NodeAvailability,
    NodeDescription,
    NodeRole,
    NodeSpec,
    NodeState,
    NodeStatus,
    Placement,
    PortConfig,
    Service,
    ServiceMode,
    ServiceSpec,
    Task,
    TaskState,
    TaskStatus,
)
from corral.cli.render import (
    ProgressDisplay,
    format_service_ports,
    format_table,
    human_duration,
    node_ls_rows,
    progress_bar,
    progress_lines,
    service_ls_rows,
    service_ps_rows,
    to_json_lines,
    verify_waiting_message,
)

FULL = "[" + "=" * 50 + ">]"
NOW = 1_000_000.0

# --------------------------------------------------------------------------- builders


def mk_node(
    node_id: str,
    hostname: str,
    *,
    role: NodeRole = NodeRole.WORKER,
    state: NodeState = NodeState.READY,
    availability: NodeAvailability = NodeAvailability.ACTIVE,
    engine: str = "0.1.0",
) -> Node:
    return Node(
        id=node_id,
        spec=NodeSpec(role=role, availability=availability),
        description=NodeDescription(hostname=hostname, addr="127.0.0.1", engine_version=engine),
        status=NodeStatus(state=state),
    )


def port(published: int, target: int, protocol: str = "tcp", mode: str = "ingress") -> PortConfig:
    return PortConfig(
        published_port=published,
        target_port=target,
        protocol=protocol,
        publish_mode=mode,
    )


def mk_service(
    name: str = "search",
    *,
    service_id: str = "svc0123456789abcdefghijkl",
    replicas: int = 3,
    mode: ServiceMode = ServiceMode.REPLICATED,
    ports: list[PortConfig] | None = None,
    max_replicas: int = 0,
    image: str = "elasticsearch:8",
    spec_version: int = 1,
) -> Service:
    return Service(
        id=service_id,
        spec_version=spec_version,
        spec=ServiceSpec(
            name=name,
            task=ContainerSpec(image=image),
            mode=mode,
            replicas=replicas,
            ports=ports or [],
            placement=Placement(max_replicas=max_replicas),
        ),
    )


_counter = 0


def mk_task(
    svc: Service,
    slot: int,
    state: TaskState,
    *,
    desired: TaskState = TaskState.RUNNING,
    node_id: str = "node1",
    err: str = "",
    age: float = 0.0,
    created: float = 0.0,
    spec_version: int | None = None,
    ports: list[PortConfig] | None = None,
    task_id: str | None = None,
) -> Task:
    global _counter
    _counter += 1
    return Task(
        id=task_id or f"task{_counter:04d}abcdefghijklmnopq",
        service_id=svc.id,
        service_name=svc.spec.name,
        slot=slot,
        node_id=node_id,
        spec=svc.spec.task,
        spec_version=svc.spec_version if spec_version is None else spec_version,
        desired_state=desired,
        status=TaskStatus(state=state, err=err, timestamp=NOW - age),
        created_at=created,
        ports=ports or [],
    )


# --------------------------------------------------------------------------- format_table


def test_format_table_alignment() -> None:
    out = format_table(["ID", "NAME", "X"], [["a", "longer-name-here", "last"], ["bb", "n", ""]])
    assert out.split("\n") == [
        # min width 10; NAME column = 16 + 3; last column never padded
        "ID        NAME               X",
        "a         longer-name-here   last",
        "bb        n                  ",
    ]


@pytest.mark.parametrize(
    ("headers", "rows", "expected"),
    [
        (["A"], [], "A"),
        (["A"], [["x"], ["yy"]], "A\nx\nyy"),
        (["ABCDEFGHIJKL", "B"], [["1", "2"]], "ABCDEFGHIJKL   B\n1              2"),
        (["A", "B", "C"], [["", "", ""]], "A         B         C\n                    "),
    ],
)
def test_format_table_cases(headers: list[str], rows: list[list[str]], expected: str) -> None:
    assert format_table(headers, rows) == expected


def test_format_table_custom_padding() -> None:
    assert format_table(["A", "B"], [["xx", "y"]], min_width=0, padding=1) == "A  B\nxx y"


# --------------------------------------------------------------------------- human_duration


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-3, "Less than a second"),
        (0, "Less than a second"),
        (0.99, "Less than a second"),
        (1, "1 second"),
        (1.9, "1 second"),
        (8, "8 seconds"),
        (59.9, "59 seconds"),
        (60, "About a minute"),
        (119, "About a minute"),
        (120, "2 minutes"),
        (59 * 60 + 59, "59 minutes"),
        (3600, "About an hour"),
        (5399, "About an hour"),
        (5400, "2 hours"),
        (47 * 3600, "47 hours"),
        (48 * 3600, "2 days"),
        (13 * 86400, "13 days"),
        (14 * 86400, "2 weeks"),
        (59 * 86400, "8 weeks"),
        (60 * 86400, "2 months"),
        (729 * 86400, "24 months"),
        (730 * 86400, "2 years"),
    ],
)
def test_human_duration(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


# --------------------------------------------------------------------------- node ls


def test_node_ls_rows() -> None:
    nodes = [
        mk_node("w2xxxxxxxxxxxxxxxxxxxxxxx", "worker10", state=NodeState.DOWN),
        mk_node("m1xxxxxxxxxxxxxxxxxxxxxxx", "manager1", role=NodeRole.MANAGER),
        mk_node(
            "m2xxxxxxxxxxxxxxxxxxxxxxx",
            "manager2",
            role=NodeRole.MANAGER,
            availability=NodeAvailability.DRAIN,
        ),
        mk_node(
            "m3xxxxxxxxxxxxxxxxxxxxxxx", "manager3", role=NodeRole.MANAGER, state=NodeState.DOWN
        ),
        mk_node(
            "w1xxxxxxxxxxxxxxxxxxxxxxx",
            "worker2",
            availability=NodeAvailability.PAUSE,
            state=NodeState.UNKNOWN,
            engine="",
        ),
    ]
    headers, rows = node_ls_rows(
        nodes, self_id="m2xxxxxxxxxxxxxxxxxxxxxxx", leader_id="m1xxxxxxxxxxxxxxxxxxxxxxx"
    )
    assert headers == [
        "ID",
        "HOSTNAME",
        "STATUS",
        "AVAILABILITY",
        "MANAGER STATUS",
        "ENGINE VERSION",
    ]
    assert format_table(headers, rows).split("\n") == [
        "ID                            HOSTNAME   STATUS    AVAILABILITY   MANAGER STATUS   ENGINE VERSION",
        "m1xxxxxxxxxxxxxxxxxxxxxxx     manager1   Ready     Active         Leader           0.1.0",
        "m2xxxxxxxxxxxxxxxxxxxxxxx *   manager2   Ready     Drain          Reachable        0.1.0",
        "m3xxxxxxxxxxxxxxxxxxxxxxx     manager3   Down      Active         Unreachable      0.1.0",
        "w1xxxxxxxxxxxxxxxxxxxxxxx     worker2    Unknown   Pause                           ",
        "w2xxxxxxxxxxxxxxxxxxxxxxx     worker10   Down      Active                          0.1.0",
    ]


# --------------------------------------------------------------------------- service ls


@pytest.mark.parametrize(
    ("ports", "text"),
    [
        ([], ""),
        ([port(9200, 9200)], "*:9200->9200/tcp"),
        ([port(8080, 80), port(53, 53, "udp")], "*:8080->80/tcp, *:53->53/udp"),
        ([port(8080, 80), port(8443, 443, mode="host")], "*:8080->80/tcp"),
        ([port(8443, 443, mode="host")], ""),
        ([port(81, 81), port(80, 80)], "*:80-81->80-81/tcp"),
        ([port(80, 80), port(81, 80)], "*:80-81->80/tcp"),
        ([port(80, 80), port(81, 81), port(82, 80)], "*:80-81->80-81/tcp, *:82->80/tcp"),
        ([port(80, 80), port(82, 82)], "*:80->80/tcp, *:82->82/tcp"),
        ([port(53, 53, "udp"), port(53, 53)], "*:53->53/tcp, *:53->53/udp"),
        ([port(80, 90), port(81, 85)], "*:80->90/tcp, *:81->85/tcp"),
    ],
)
def test_format_service_ports(ports: list[PortConfig], text: str) -> None:
    assert format_service_ports(ports) == text


def test_service_ls_rows() -> None:
    web = mk_service(
        "web",
        service_id="web0123456789abcdefghijkl",
        replicas=3,
        max_replicas=2,
        ports=[port(8080, 80), port(8443, 443, mode="host")],
        image="nginx",
    )
    search = mk_service(
        "search",
        service_id="sea0123456789abcdefghijkl",
        replicas=3,
        ports=[port(9200, 9200), port(9300, 9300)],
    )
    agent = mk_service(
        "agent",
        service_id="age0123456789abcdefghijkl",
        mode=ServiceMode.GLOBAL,
        max_replicas=1,  # ignored for global services, like docker
        image="agent",
    )
    headers, rows = service_ls_rows(
        [web, search, agent],
        running={web.id: 2, search.id: 3, agent.id: 4},
        desired={web.id: 3, search.id: 3, agent.id: 4},
    )
    assert headers == ["ID", "NAME", "MODE", "REPLICAS", "IMAGE", "PORTS"]
    assert format_table(headers, rows).split("\n") == [
        "ID             NAME      MODE         REPLICAS               IMAGE             PORTS",
        "age012345678   agent     global       4/4                    agent             ",
        "sea012345678   search    replicated   3/3                    elasticsearch:8   *:9200->9200/tcp, *:9300->9300/tcp",
        "web012345678   web       replicated   2/3 (max 2 per node)   nginx             *:8080->80/tcp",
    ]


def test_service_ls_missing_counts_and_natural_order() -> None:
    a10 = mk_service("app10", service_id="b" * 25, replicas=0)
    a2 = mk_service("app2", service_id="a" * 25, replicas=2)
    _, rows = service_ls_rows([a10, a2], {}, {a2.id: 2})
    assert [r[1] for r in rows] == ["app2", "app10"]
    assert [r[3] for r in rows] == ["0/2", "0/0"]


# --------------------------------------------------------------------------- service ps


def test_service_ps_rows_order_history_and_states() -> None:
    svc = mk_service()
    nodes = {
        "node1": mk_node("node1", "alpha"),
        "node2": mk_node("node2", "beta"),
    }
    tasks = [
        mk_task(svc, 10, TaskState.PENDING, node_id="", age=150, created=9, task_id="t10aaaaaaaaaaaa"),
        mk_task(
            svc,
            2,
            TaskState.FAILED,
            desired=TaskState.SHUTDOWN,
            err="task: non-zero exit (1): boom goes the dynamite",
            age=75,
            created=2,
            node_id="node2",
            task_id="t2oldaaaaaaaaaa",
        ),
        mk_task(svc, 1, TaskState.RUNNING, age=8, created=1, task_id="t1aaaaaaaaaaaaa"),
        mk_task(
            svc,
            2,
            TaskState.RUNNING,
            age=0.3,
            created=5,
            node_id="node2",
            ports=[port(8080, 80, mode="host"), port(9000, 9000)],
            task_id="t2newaaaaaaaaaa",
        ),
        mk_task(
            svc,
            2,
            TaskState.SHUTDOWN,
            desired=TaskState.SHUTDOWN,
            age=3,
            created=3,
            node_id="gone-node",
            task_id="t2midaaaaaaaaaa",
        ),
    ]
    headers, rows = service_ps_rows(tasks, nodes, NOW)
    assert headers == [
        "ID",
        "NAME",
        "IMAGE",
        "NODE",
        "DESIRED STATE",
        "CURRENT STATE",
        "ERROR",
        "PORTS",
    ]
    assert rows == [
        ["t1aaaaaaaaaa", "search.1", "elasticsearch:8", "alpha", "Running",
         "Running 8 seconds ago", "", ""],
        ["t2newaaaaaaa", "search.2", "elasticsearch:8", "beta", "Running",
         "Running less than a second ago", "", "*:8080->80/tcp"],
        ["t2midaaaaaaa", " \\_ search.2", "elasticsearch:8", "gone-node", "Shutdown",
         "Shutdown 3 seconds ago", "", ""],
        ["t2oldaaaaaaa", " \\_ search.2", "elasticsearch:8", "beta", "Shutdown",
         "Failed about a minute ago", '"task: non-zero exit (1): boom…"', ""],
        ["t10aaaaaaaaa", "search.10", "elasticsearch:8", "", "Running",
         "Pending 2 minutes ago", "", ""],
    ]  # fmt: skip


def test_service_ps_no_trunc_and_global_names() -> None:
    svc = mk_service("agent", mode=ServiceMode.GLOBAL)
    err = "x" * 45
    tasks = [
        mk_task(svc, 0, TaskState.RUNNING, node_id="nodeb", created=1, task_id="b" * 25),
        mk_task(svc, 0, TaskState.REJECTED, node_id="nodea", err=err, created=1, task_id="a" * 25),
        mk_task(svc, 0, TaskState.READY, desired=TaskState.READY, node_id="nodea", created=2,
                task_id="c" * 25),
    ]  # fmt: skip
    _, rows = service_ps_rows(tasks, {}, NOW, no_trunc=True)
    assert [(r[0], r[1], r[3], r[6]) for r in rows] == [
        ("c" * 25, "agent.nodea", "nodea", ""),
        ("a" * 25, " \\_ agent.nodea", "nodea", f'"{err}"'),
        ("b" * 25, "agent.nodeb", "nodeb", ""),
    ]
    _, rows = service_ps_rows(tasks, {}, NOW)
    assert rows[1][0] == "a" * 12
    assert rows[1][6] == '"' + "x" * 29 + '…"'


def test_service_ps_table_text() -> None:
    svc = mk_service(image="es")
    tasks = [mk_task(svc, 1, TaskState.RUNNING, age=61, task_id="abcdefghijklmnop")]
    text = format_table(*service_ps_rows(tasks, {"node1": mk_node("node1", "n1")}, NOW))
    assert text.split("\n") == [
        "ID             NAME       IMAGE     NODE      DESIRED STATE   CURRENT STATE                "
        "ERROR     PORTS",
        "abcdefghijkl   search.1   es        n1        Running         Running about a minute ago   "
        "          ",
    ]


# --------------------------------------------------------------------------- progress


def bar(n: int) -> str:
    return "[" + "=" * n + ">" + " " * (50 - n) + "]"


@pytest.mark.parametrize(
    ("current", "expected"),
    [
        (9, FULL),
        (8, bar(44)),
        (7, bar(38)),
        (6, bar(33)),
        (5, bar(27)),
        (4, bar(22)),
        (3, bar(16)),
        (1, bar(5)),
        (0, bar(0)),
        (12, FULL),
    ],
)
def test_progress_bar(current: int, expected: str) -> None:
    assert progress_bar(current) == expected
    assert len(progress_bar(current)) == 53


def test_progress_three_replicas_running() -> None:
    svc = mk_service(replicas=3)
    tasks = [mk_task(svc, s, TaskState.RUNNING) for s in (3, 1, 2)]
    assert progress_lines(svc, tasks, {}) == [
        "overall progress: 3 out of 3 tasks",
        "1/3: running   [==================================================>]",
        "2/3: running   [==================================================>]",
        "3/3: running   [==================================================>]",
    ]
    assert progress_lines(svc, tasks, {}, verify=verify_waiting_message(5))[-1] == (
        "verify: Waiting 5 seconds to verify that tasks are stable..."
    )
    assert progress_lines(svc, tasks, {}, verify="Service converged")[-1] == (
        "verify: Service converged"
    )


def test_progress_mixed_states() -> None:
    svc = mk_service(replicas=5)
    tasks = [
        mk_task(svc, 1, TaskState.RUNNING),
        mk_task(svc, 2, TaskState.STARTING),
        mk_task(svc, 3, TaskState.PREPARING),
        mk_task(svc, 4, TaskState.NEW, desired=TaskState.READY, node_id=""),
        # slot 5 has no task yet
    ]
    assert progress_lines(svc, tasks, {}) == [
        "overall progress: 1 out of 5 tasks",
        "1/5: running   " + FULL,
        "2/5: starting  [============================================>      ]",
        "3/5: preparing [=================================>                 ]",
        "4/5: new       [=====>                                             ]",
        "5/5:",
    ]


def test_progress_unschedulable_error_line() -> None:
    svc = mk_service(replicas=3)
    err = "no suitable node (scheduling constraints not satisfied on 3 nodes)"
    tasks = [
        mk_task(svc, 1, TaskState.RUNNING),
        mk_task(svc, 2, TaskState.PENDING, node_id="", err=err),
        mk_task(svc, 3, TaskState.PENDING, node_id="", err="line one\nline two " + "z" * 80),
    ]
    lines = progress_lines(svc, tasks, {})
    assert lines[0] == "overall progress: 1 out of 3 tasks"
    assert lines[2] == f"2/3: {err}"
    assert lines[3] == "3/3: " + ("line one line two " + "z" * 80)[:74] + "…"


def test_progress_more_than_20_replicas() -> None:
    svc = mk_service(replicas=25)
    tasks = [mk_task(svc, s, TaskState.RUNNING) for s in range(1, 22)]
    assert progress_lines(svc, tasks, {}) == ["overall progress: 21 out of 25 tasks"]
    assert progress_lines(svc, tasks, {}, verify="x") == [
        "overall progress: 21 out of 25 tasks",
        "verify: x",
    ]


def test_progress_twenty_replicas_still_draws_bars() -> None:
    svc = mk_service(replicas=20)
    lines = progress_lines(svc, [], {})
    assert len(lines) == 21
    assert lines[20] == "20/20:"


def test_progress_slot_selection_restart_update_and_down_nodes() -> None:
    svc = mk_service(replicas=3, spec_version=2)
    nodes = {"up": mk_node("up", "up"), "down": mk_node("down", "down", state=NodeState.DOWN)}
    tasks = [
        # slot 1: failed task replaced by one waiting for its restart delay
        mk_task(svc, 1, TaskState.FAILED, desired=TaskState.SHUTDOWN, err="exit 1", node_id="up",
                created=1),
        mk_task(svc, 1, TaskState.NEW, desired=TaskState.READY, node_id="", created=2),
        # slot 2: old-spec task still running (not counted) and its up-to-date replacement
        mk_task(svc, 2, TaskState.RUNNING, node_id="up", spec_version=1, created=1),
        mk_task(svc, 2, TaskState.ASSIGNED, node_id="up", created=2),
        # slot 3: running on a node that is down: ignored; scaled-away slot 4 ignored
        mk_task(svc, 3, TaskState.RUNNING, node_id="down"),
        mk_task(svc, 4, TaskState.RUNNING, node_id="up"),
    ]  # fmt: skip
    assert progress_lines(svc, tasks, nodes) == [
        "overall progress: 0 out of 3 tasks",
        "1/3: new       " + bar(5),
        "2/3: assigned  " + bar(22),
        "3/3:",
    ]


def test_progress_terminal_task_without_error_shows_state() -> None:
    svc = mk_service(replicas=1)
    tasks = [mk_task(svc, 1, TaskState.SHUTDOWN, desired=TaskState.SHUTDOWN)]
    assert progress_lines(svc, tasks, {}) == ["overall progress: 0 out of 1 tasks", "1/1: shutdown"]


def test_progress_rollback() -> None:
    svc = mk_service(replicas=2)
    tasks = [mk_task(svc, 1, TaskState.RUNNING), mk_task(svc, 2, TaskState.STARTING)]
    assert progress_lines(svc, tasks, {}, rollback=True)[0] == (
        "overall progress: rolling back update: 1 out of 2 tasks"
    )


def test_progress_ignores_other_services() -> None:
    svc = mk_service(replicas=1)
    other = mk_service("other", service_id="other" + "x" * 20)
    tasks = [mk_task(other, 1, TaskState.RUNNING)]
    assert progress_lines(svc, tasks, {}) == ["overall progress: 0 out of 1 tasks", "1/1:"]


def test_progress_global() -> None:
    svc = mk_service("agent", mode=ServiceMode.GLOBAL)
    nodes = {
        "bbbbbbbbbbbbbbbbbbbb": mk_node("bbbbbbbbbbbbbbbbbbbb", "host1"),
        "aaaaaaaaaaaaaaaaaaaa": mk_node("aaaaaaaaaaaaaaaaaaaa", "host2"),
        "cccccccccccccccccccc": mk_node("cccccccccccccccccccc", "host3"),
    }
    assert progress_lines(svc, [], nodes) == ["overall progress: waiting for new tasks"]
    tasks = [
        mk_task(svc, 0, TaskState.RUNNING, node_id="aaaaaaaaaaaaaaaaaaaa"),
        mk_task(svc, 0, TaskState.RUNNING, node_id="bbbbbbbbbbbbbbbbbbbb"),
        mk_task(svc, 0, TaskState.PREPARING, node_id="cccccccccccccccccccc"),
    ]
    assert progress_lines(svc, tasks, nodes, verify="Service converged") == [
        "overall progress: 2 out of 3 tasks",
        "bbbbbbbbbbbb: running   " + FULL,
        "aaaaaaaaaaaa: running   " + FULL,
        "cccccccccccc: preparing " + bar(33),
        "verify: Service converged",
    ]


def test_progress_global_many_nodes_no_bars() -> None:
    svc = mk_service("agent", mode=ServiceMode.GLOBAL)
    tasks = [mk_task(svc, 0, TaskState.RUNNING, node_id=f"n{i}") for i in range(21)]
    assert progress_lines(svc, tasks, {}) == ["overall progress: 21 out of 21 tasks"]


# --------------------------------------------------------------------------- ProgressDisplay


def test_progress_display_not_a_terminal_prints_final_frame_once() -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=40)
    with ProgressDisplay(console) as display:
        display.update(["overall progress: 0 out of 1 tasks", "1/1: new       " + bar(5)])
        display.update(["overall progress: 1 out of 1 tasks", "1/1: running   " + FULL])
        assert buf.getvalue() == ""
        display.finish()
        display.finish(["ignored"])  # idempotent
    assert buf.getvalue() == (
        "overall progress: 1 out of 1 tasks\n1/1: running   " + FULL + "\n"
    )


def test_progress_display_finish_with_explicit_lines() -> None:
    buf = io.StringIO()
    display = ProgressDisplay(Console(file=buf, force_terminal=False))
    display.finish(["a [b]", "verify: Service converged"])
    assert buf.getvalue() == "a [b]\nverify: Service converged\n"


def test_progress_display_terminal_uses_live() -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=100, color_system=None)
    display = ProgressDisplay(console)
    display.update(["overall progress: 0 out of 1 tasks", "1/1: new       " + bar(5)])
    display.update(["overall progress: 1 out of 1 tasks", "1/1: running   " + FULL])
    display.finish()
    out = buf.getvalue()
    assert "1/1: running   " + FULL in out
    assert "1/1: new" in out
    assert out.endswith("1/1: running   " + FULL + "\n\x1b[?25h")  # final frame, cursor shown


# --------------------------------------------------------------------------- json


def test_to_json_lines() -> None:
    svc = mk_service(ports=[port(80, 80)])
    node = mk_node("n1", "host1")
    out = to_json_lines([svc, node])
    lines = out.split("\n")
    assert len(lines) == 2
    assert " " not in lines[1].replace("127.0.0.1", "")  # compact separators
    assert json.loads(lines[0])["spec"]["name"] == "search"
    assert json.loads(lines[0])["spec"]["ports"][0]["publish_mode"] == "ingress"
    assert json.loads(lines[1])["status"]["state"] == "ready"
    assert to_json_lines([]) == ""


def test_service_ps_shows_health_while_running() -> None:
    svc = Service(id="s" * 25, spec=ServiceSpec(name="web", task=ContainerSpec(image="whoami")))
    t = Task(id="t" * 25, service_id=svc.id, service_name="web", slot=1, spec=svc.spec.task,
             status=TaskStatus(state=TaskState.RUNNING, timestamp=NOW - 8, health="healthy"))
    _, rows = service_ps_rows([t], {}, NOW)
    assert rows[0][5] == "Running 8 seconds ago (healthy)"


def test_a_task_left_on_a_down_node_does_not_hold_convergence() -> None:
    from corral.cli.progress import converged
    svc = mk_service(replicas=2)
    tasks = [mk_task(svc, 1, TaskState.RUNNING, node_id="n2"),
             mk_task(svc, 2, TaskState.RUNNING, node_id="n3"),
             # Replaced, but its node died before it could report it stopped.
             mk_task(svc, 2, TaskState.ASSIGNED, desired=TaskState.SHUTDOWN, node_id="n1")]
    nodes = {"n1": mk_node("n1", "node1"), "n2": mk_node("n2", "node2"),
             "n3": mk_node("n3", "node3")}
    assert not converged(svc, tasks, nodes)  # node1 is up: its task must stop first
    nodes["n1"] = mk_node("n1", "node1", state=NodeState.DOWN)
    assert converged(svc, tasks, nodes)
