"""`corral service`: create, ls, ps, inspect, scale, rm, logs."""

from __future__ import annotations

import functools
import shlex
import sys
import time
from typing import Annotated, Optional

import typer

from corral.api.errors import InvalidArgument
from corral.api.types import (
    MAX_REPLICAS,
    ContainerSpec,
    Placement,
    RestartCondition,
    RestartPolicy,
    Service,
    ServiceMode,
    ServiceSpec,
    Task,
    TaskState,
)
from corral.cli.context import client, echo_json, print_table
from corral.cli.parse import (
    check_port_conflicts,
    parse_duration,
    parse_env,
    parse_label,
    parse_publish,
    parse_secret,
)
from corral.cli import specflags as sf
from corral.cli.progress import nodes_of, run_operation, tasks_of
from corral.cli.render import service_ls_rows, service_ps_rows, to_json_lines
from corral.client import Client

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Manage swarm services.")

Quiet = Annotated[bool, typer.Option("-q", "--quiet", help="Only display IDs")]
Format = Annotated[Optional[str], typer.Option("--format", help="json: one object per line")]
Detach = Annotated[bool, typer.Option("-d", "--detach",
                                      help="Exit immediately instead of waiting for convergence")]




@app.command(context_settings={"allow_interspersed_args": False})
def create(
    ctx: typer.Context,
    image: Annotated[str, typer.Argument(metavar="IMAGE",
                                         help="A built-in app (whoami) or an executable")],
    command: Annotated[Optional[list[str]], typer.Argument(metavar="[COMMAND] [ARG...]",
                                                           help="Command and arguments")] = None,
    name: Annotated[Optional[str], typer.Option(help="Service name")] = None,
    replicas: Annotated[Optional[int], typer.Option(help="Number of tasks")] = None,
    mode: Annotated[str, typer.Option(help="replicated or global")] = "replicated",
    publish: Annotated[Optional[list[str]], typer.Option(
        "-p", "--publish", help="Publish a port as a node port (PUBLISHED:TARGET)")] = None,
    env: Annotated[Optional[list[str]], typer.Option("-e", "--env", help="Set an environment variable")] = None,
    label: Annotated[Optional[list[str]], typer.Option("-l", "--label", help="Service label")] = None,
    constraint: Annotated[Optional[list[str]], typer.Option(help="Placement constraint")] = None,
    replicas_max_per_node: Annotated[int, typer.Option(help="Maximum tasks per node (0 = unlimited)")] = 0,
    network: Annotated[Optional[list[str]], typer.Option(help="Attach to an overlay network")] = None,
    secret: Annotated[Optional[list[str]], typer.Option(
        help="Give tasks a secret as a file: NAME or source=NAME,target=FILE,mode=0400")] = None,
    endpoint_mode: Annotated[str, typer.Option(help="vip or dnsrr")] = "vip",
    restart_condition: Annotated[str, typer.Option(help="any, on-failure or none")] = "any",
    restart_delay: Annotated[str, typer.Option(help="Delay between restart attempts")] = "5s",
    restart_max_attempts: Annotated[int, typer.Option(help="Maximum restarts (0 = unlimited)")] = 0,
    stop_grace_period: Annotated[str, typer.Option(help="Time to wait before force killing a task")] = "10s",
    health_cmd: sf.HealthCmd = None,
    health_http: sf.HealthHttp = None,
    health_tcp: sf.HealthTcp = False,
    health_interval: sf.HealthInterval = None,
    health_timeout: sf.HealthTimeout = None,
    health_retries: sf.HealthRetries = None,
    health_start_period: sf.HealthStart = None,
    no_healthcheck: sf.NoHealth = False,
    update_parallelism: sf.Parallelism = None,
    update_delay: sf.Delay = None,
    update_failure_action: sf.FailureAction = None,
    update_monitor: sf.Monitor = None,
    update_max_failure_ratio: sf.Ratio = None,
    update_order: sf.Order = None,
    rollback_parallelism: sf.Parallelism = None,
    rollback_delay: sf.Delay = None,
    rollback_failure_action: sf.FailureAction = None,
    rollback_monitor: sf.Monitor = None,
    rollback_max_failure_ratio: sf.Ratio = None,
    rollback_order: sf.Order = None,
    lb: sf.Lb = None,
    lb_affinity: sf.LbAffinity = None,
    detach: Detach = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Suppress progress output")] = False,
) -> None:
    """Create a new service."""
    if mode not in ("replicated", "global"):
        raise InvalidArgument(f"invalid mode {mode!r}: expected replicated or global")
    if replicas is not None and not 0 <= replicas <= MAX_REPLICAS:
        raise InvalidArgument(f"invalid replicas value {replicas}: must be between 0 and "
                              f"{MAX_REPLICAS}")
    if replicas is not None and mode == "global":
        raise InvalidArgument("replicas can only be used with replicated mode")
    if endpoint_mode not in ("vip", "dnsrr"):
        raise InvalidArgument(f"invalid endpoint mode {endpoint_mode!r}: expected vip or dnsrr")
    if restart_condition not in ("any", "on-failure", "none"):
        raise InvalidArgument(f"invalid restart condition {restart_condition!r}: "
                              "expected any, on-failure or none")
    if restart_max_attempts < 0:
        raise InvalidArgument("restart max attempts must be 0 (unlimited) or more")
    if replicas_max_per_node < 0:
        raise InvalidArgument("replicas max per node must be 0 (unlimited) or more")
    ports = [parse_publish(p) for p in publish or []]
    check_port_conflicts(ports)
    from corral.manager.constraints import parse_constraints
    parse_constraints(constraint or [])
    spec = ServiceSpec(
        name=name or f"{image.split('/')[-1].split(':')[0]}-{int(time.time()) % 100000}",
        labels=parse_label(label or []),
        task=ContainerSpec(image=image, args=command or [], env=parse_env(env or []),
                           stop_grace_period=parse_duration(stop_grace_period),
                           secrets=[parse_secret(x) for x in secret or []]),
        mode=ServiceMode(mode),
        replicas=1 if replicas is None else replicas,
        restart_policy=RestartPolicy(condition=RestartCondition(restart_condition),
                                     delay=parse_duration(restart_delay),
                                     max_attempts=restart_max_attempts),
        placement=Placement(constraints=constraint or [], max_replicas=replicas_max_per_node),
        ports=ports,
        networks=network or [],
        endpoint_mode="dnsrr" if endpoint_mode == "dnsrr" else "vip",
    )
    spec = sf.apply_all(
        spec,
        sf.HealthFlags(health_cmd, health_http, health_tcp, health_interval, health_timeout,
                       health_retries, health_start_period, no_healthcheck),
        sf.UpdateFlags(update_parallelism, update_delay, update_failure_action, update_monitor,
                       update_max_failure_ratio, update_order),
        sf.UpdateFlags(rollback_parallelism, rollback_delay, rollback_failure_action,
                       rollback_monitor, rollback_max_failure_ratio, rollback_order))
    spec = sf.apply_lb(spec, lb, lb_affinity)
    c = client(ctx)
    run_operation(c, lambda: Service.model_validate(c.post("/v1/services", spec.model_dump(mode="json"))),
                  lambda svc: svc.id, wait=not detach and not quiet)


@app.command("ls")
def ls(ctx: typer.Context, quiet: Quiet = False, format: Format = None) -> None:
    """List services."""
    c = client(ctx)
    services = sorted((Service.model_validate(s) for s in c.get("/v1/services")),
                      key=lambda s: s.spec.name)
    if quiet:
        for s in services:
            typer.echo(s.id)
        return
    if format == "json":
        typer.echo(to_json_lines(services))
        return
    tasks = tasks_of(c)
    nodes = nodes_of(c)
    running: dict[str, int] = {}
    desired: dict[str, int] = {}
    for s in services:
        mine = [t for t in tasks if t.service_id == s.id]
        running[s.id] = sum(1 for t in mine if t.status.state is TaskState.RUNNING
                            and t.desired_state is TaskState.RUNNING
                            and nodes.get(t.node_id) is not None
                            and nodes[t.node_id].status.state.value == "ready")
        desired[s.id] = (s.spec.replicas if s.spec.mode is ServiceMode.REPLICATED
                         else sum(1 for t in mine if t.desired_state is TaskState.RUNNING))
    print_table(*service_ls_rows(services, running, desired))


@app.command()
def ps(ctx: typer.Context, services: Annotated[list[str], typer.Argument(help="SERVICE...")],
       quiet: Quiet = False, format: Format = None,
       no_trunc: Annotated[bool, typer.Option("--no-trunc", help="Do not truncate output")] = False) -> None:
    """List the tasks of one or more services."""
    c = client(ctx)
    tasks: list[Task] = []
    for ref in services:
        tasks += tasks_of(c, ref)
    if quiet:
        for t in tasks:
            typer.echo(t.id)
    elif format == "json":
        typer.echo(to_json_lines(tasks))
    else:
        print_table(*service_ps_rows(tasks, nodes_of(c), time.time(), no_trunc=no_trunc))


@app.command()
def inspect(ctx: typer.Context, services: Annotated[list[str], typer.Argument(help="SERVICE...")]) -> None:
    """Display detailed information on one or more services."""
    c = client(ctx)
    echo_json([c.get(f"/v1/services/{s}") for s in services])


@app.command()
def scale(ctx: typer.Context,
          pairs: Annotated[list[str], typer.Argument(help="SERVICE=REPLICAS...")],
          detach: Detach = False) -> None:
    """Scale one or more replicated services."""
    c = client(ctx)
    todo = []
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise InvalidArgument(f"invalid scale specifier '{pair}': expected SERVICE=REPLICAS")
        try:
            n = int(value)
        except ValueError:
            raise InvalidArgument(f"invalid replicas value for {name}: {value}") from None
        todo.append((name, n))
    for name, n in todo:
        run_operation(c, functools.partial(_scale, c, name, n),
                      functools.partial(_scaled, name, n), wait=not detach)


def _scaled(name: str, replicas: int, _: Service) -> str:
    return f"{name} scaled to {replicas}"


def _scale(c: Client, name: str, replicas: int) -> Service:
    return Service.model_validate(c.post(f"/v1/services/{name}/scale", {"replicas": replicas}))


@app.command("rm")
def rm(ctx: typer.Context, services: Annotated[list[str], typer.Argument(help="SERVICE...")]) -> None:
    """Remove one or more services."""
    c = client(ctx)
    for s in services:
        c.delete(f"/v1/services/{s}")
        typer.echo(s)


@app.command(name="exec", context_settings={"allow_interspersed_args": False})
def exec_(ctx: typer.Context,
          target: Annotated[str, typer.Argument(metavar="SERVICE[.SLOT]",
                                                help="A service, or one of its tasks by slot")],
          cmd: Annotated[list[str], typer.Argument(metavar="COMMAND [ARG...]")]) -> None:
    """Run a command inside a running task (its network namespace with the netns runtime)."""
    if cmd and cmd[0] == "--":  # `service exec web -- ls`: the separator is not the command
        cmd = cmd[1:]
    if not cmd:
        raise InvalidArgument("no command given: corral service exec SERVICE[.SLOT] -- COMMAND")
    c = client(ctx)
    service, _, slot = target.rpartition(".") if target.rpartition(".")[2].isdigit() else (target, "", "")
    tasks = [t for t in tasks_of(c, service) if t.desired_state is TaskState.RUNNING
             and t.status.state is TaskState.RUNNING and (not slot or t.slot == int(slot))]
    if not tasks:
        raise InvalidArgument(f"no running task for {target}")
    task = sorted(tasks, key=lambda t: t.slot)[0]
    r = c.post(f"/v1/tasks/{task.id}/exec", {"cmd": cmd})
    sys.stdout.write(r["stdout"])
    sys.stderr.write(r["stderr"])
    raise typer.Exit(r["exit_code"])


@app.command()
def logs(ctx: typer.Context, service: Annotated[str, typer.Argument(help="SERVICE")],
         tail: Annotated[Optional[int], typer.Option("-n", "--tail", help="Lines from the end of each task's logs")] = None,
         raw: Annotated[bool, typer.Option("--raw", help="Do not prefix lines with the task")] = False,
         follow: Annotated[bool, typer.Option("-f", "--follow", help="Follow log output")] = False) -> None:
    """Fetch the logs of a service's tasks."""
    c = client(ctx)
    printed: dict[tuple[str, str], int] = {}  # (task, stream) -> lines shown so far

    def show(lines: list[dict[str, str]]) -> None:
        seen: dict[tuple[str, str], int] = {}
        for ln in lines:
            key = (ln["task_id"], ln["stream"])
            seen[key] = seen.get(key, 0) + 1
            if seen[key] <= printed.get(key, 0):
                continue  # shown by an earlier poll
            printed[key] = seen[key]
            typer.echo(ln["line"] if raw else
                       f"{ln['task_name']}.{ln['task_id'][:12]}@{ln['node']}    | {ln['line']}")
    show(c.get(f"/v1/services/{service}/logs", tail=tail))
    if follow and tail is None:
        try:
            while True:  # a poll a second: the nodes keep each task's logs in files
                time.sleep(1.0)
                show(c.get(f"/v1/services/{service}/logs"))
        except KeyboardInterrupt:
            pass
    elif follow:
        raise InvalidArgument("--follow with --tail is not supported yet: use one of them")


@app.command()
def update(
    ctx: typer.Context,
    service: Annotated[str, typer.Argument(metavar="SERVICE")],
    image: Annotated[Optional[str], typer.Option(help="Service image")] = None,
    command: Annotated[Optional[str], typer.Option(help="Service command (space separated)")] = None,
    args: Annotated[Optional[str], typer.Option(help="Service command args (space separated)")] = None,
    replicas: Annotated[Optional[int], typer.Option(help="Number of tasks")] = None,
    env_add: Annotated[Optional[list[str]], typer.Option(help="Add or update an environment variable")] = None,
    env_rm: Annotated[Optional[list[str]], typer.Option(help="Remove an environment variable")] = None,
    secret_add: Annotated[Optional[list[str]], typer.Option(
        help="Add or replace a secret (NAME or source=NAME,target=FILE,mode=0400)")] = None,
    secret_rm: Annotated[Optional[list[str]], typer.Option(help="Remove a secret (its NAME)")] = None,
    publish_add: Annotated[Optional[list[str]], typer.Option(help="Add or update a published port")] = None,
    publish_rm: Annotated[Optional[list[str]], typer.Option(help="Remove a published port by its published port")] = None,
    constraint_add: Annotated[Optional[list[str]], typer.Option(help="Add a placement constraint")] = None,
    constraint_rm: Annotated[Optional[list[str]], typer.Option(help="Remove a placement constraint")] = None,
    stop_grace_period: Annotated[Optional[str], typer.Option(help="Time to wait before force killing a task")] = None,
    health_cmd: sf.HealthCmd = None,
    health_http: sf.HealthHttp = None,
    health_tcp: sf.HealthTcp = False,
    health_interval: sf.HealthInterval = None,
    health_timeout: sf.HealthTimeout = None,
    health_retries: sf.HealthRetries = None,
    health_start_period: sf.HealthStart = None,
    no_healthcheck: sf.NoHealth = False,
    update_parallelism: sf.Parallelism = None,
    update_delay: sf.Delay = None,
    update_failure_action: sf.FailureAction = None,
    update_monitor: sf.Monitor = None,
    update_max_failure_ratio: sf.Ratio = None,
    update_order: sf.Order = None,
    rollback_parallelism: sf.Parallelism = None,
    rollback_delay: sf.Delay = None,
    rollback_failure_action: sf.FailureAction = None,
    rollback_monitor: sf.Monitor = None,
    rollback_max_failure_ratio: sf.Ratio = None,
    rollback_order: sf.Order = None,
    lb: sf.Lb = None,
    lb_affinity: sf.LbAffinity = None,
    force: Annotated[bool, typer.Option(help="Replace the tasks even if nothing changed")] = False,
    detach: Detach = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Suppress progress output")] = False,
) -> None:
    """Update a service (a rolling update when its tasks must change)."""
    c = client(ctx)
    svc = Service.model_validate(c.get(f"/v1/services/{service}"))
    spec = svc.spec
    task = spec.task
    if image is not None:
        task = task.model_copy(update={"image": image})
    if command is not None:
        task = task.model_copy(update={"command": shlex.split(command)})
    if args is not None:
        task = task.model_copy(update={"args": shlex.split(args)})
    if env_add or env_rm:
        drop = set(env_rm or []) | {e.split("=", 1)[0] for e in parse_env(env_add or [])}
        kept = [e for e in task.env if e.split("=", 1)[0] not in drop]
        task = task.model_copy(update={"env": kept + parse_env(env_add or [])})
    if stop_grace_period is not None:
        task = task.model_copy(update={"stop_grace_period": parse_duration(stop_grace_period)})
    if secret_add or secret_rm:
        added = [parse_secret(x) for x in secret_add or []]
        unknown = set(secret_rm or []) - {r.secret_name for r in task.secrets}
        if unknown:
            raise InvalidArgument(f"--secret-rm: the service has no secret {sorted(unknown)[0]}")
        drop = set(secret_rm or []) | {r.secret_name for r in added}
        remaining = [r for r in task.secrets if r.secret_name not in drop]
        task = task.model_copy(update={"secrets": remaining + added})
    ports = list(spec.ports)
    if publish_rm:
        gone = {int(p.split("/")[0].split(":")[0]) for p in publish_rm if p.split("/")[0].split(":")[0].isdigit()}
        if len(gone) != len(publish_rm):
            raise InvalidArgument("--publish-rm takes published port numbers (e.g. 8080)")
        ports = [p for p in ports if p.published_port not in gone]
    for p in (parse_publish(x) for x in publish_add or []):
        ports = [q for q in ports if (q.published_port, q.protocol) != (p.published_port, p.protocol)] + [p]
    check_port_conflicts(ports)
    constraints = [x for x in spec.placement.constraints if x not in (constraint_rm or [])]
    constraints += [x for x in constraint_add or [] if x not in constraints]
    from corral.manager.constraints import parse_constraints
    parse_constraints(constraints)
    if replicas is not None and not 0 <= replicas <= MAX_REPLICAS:
        raise InvalidArgument(f"invalid replicas value {replicas}: must be between 0 and {MAX_REPLICAS}")
    spec = spec.model_copy(update={
        "task": task, "ports": ports,
        "placement": spec.placement.model_copy(update={"constraints": constraints}),
        "replicas": spec.replicas if replicas is None else replicas})
    spec = sf.apply_all(
        spec,
        sf.HealthFlags(health_cmd, health_http, health_tcp, health_interval, health_timeout,
                       health_retries, health_start_period, no_healthcheck),
        sf.UpdateFlags(update_parallelism, update_delay, update_failure_action, update_monitor,
                       update_max_failure_ratio, update_order),
        sf.UpdateFlags(rollback_parallelism, rollback_delay, rollback_failure_action,
                       rollback_monitor, rollback_max_failure_ratio, rollback_order))
    spec = sf.apply_lb(spec, lb, lb_affinity)
    body = {"spec": spec.model_dump(mode="json"), "force": force}
    run_operation(c, lambda: Service.model_validate(c.post(f"/v1/services/{svc.id}/update", body)),
                  lambda _: service, wait=not detach and not quiet)


@app.command()
def rollback(ctx: typer.Context, service: Annotated[str, typer.Argument(metavar="SERVICE")],
             detach: Detach = False,
             quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Suppress progress output")] = False) -> None:
    """Revert a service to its spec before the last update."""
    c = client(ctx)
    run_operation(c, lambda: Service.model_validate(c.post(f"/v1/services/{service}/rollback")),
                  lambda _: service, wait=not detach and not quiet)
