"""Flags shared by `service create` and `service update`: health checks and update/rollback
settings, parsed into the spec (None = leave as it is)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Annotated, Optional

import typer

from corral.api.errors import InvalidArgument
from corral.api.types import HealthConfig, ServiceSpec, UpdateConfig
from corral.cli.parse import parse_duration

HealthCmd = Annotated[Optional[str], typer.Option(help="Command to run to check health")]
HealthHttp = Annotated[Optional[str], typer.Option(help="Built-in probe: HTTP GET PATH on the task's port")]
HealthTcp = Annotated[bool, typer.Option(help="Built-in probe: the task's port accepts connections")]
HealthInterval = Annotated[Optional[str], typer.Option(help="Time between running the check")]
HealthTimeout = Annotated[Optional[str], typer.Option(help="Maximum time to allow one check to run")]
HealthRetries = Annotated[Optional[int], typer.Option(help="Consecutive failures needed to report unhealthy")]
HealthStart = Annotated[Optional[str], typer.Option(help="Start period before failures count")]
NoHealth = Annotated[bool, typer.Option(help="Disable any health check")]
Parallelism = Annotated[Optional[int], typer.Option(help="Maximum number of tasks updated at once (0 = all)")]
Delay = Annotated[Optional[str], typer.Option(help="Delay between updates")]
FailureAction = Annotated[Optional[str], typer.Option(help="On failure: pause, continue or rollback")]
Monitor = Annotated[Optional[str], typer.Option(help="Time to monitor each updated task for failure")]
Ratio = Annotated[Optional[float], typer.Option(help="Failure rate to tolerate")]
Order = Annotated[Optional[str], typer.Option(help="stop-first or start-first")]
Lb = Annotated[Optional[str], typer.Option(
    help="Mesh balancing: rr, random, least-conn, source-hash or maglev")]
LbAffinity = Annotated[Optional[str], typer.Option(
    help="Stickiness: client-ip[:TIMEOUT] (default timeout 1h), or none")]


def apply_lb(spec: ServiceSpec, lb: str | None, affinity: str | None) -> ServiceSpec:
    """`--lb` and `--lb-affinity` applied to a spec."""
    changes: dict[str, object] = {}
    if lb is not None:
        if lb not in ("rr", "random", "least-conn", "source-hash", "maglev"):
            raise InvalidArgument(f"invalid --lb {lb!r}: expected rr, random, least-conn, "
                                  "source-hash or maglev")
        changes["lb"] = lb
    if affinity is not None:
        kind, _, timeout = affinity.partition(":")
        if kind == "none" and not timeout:
            changes["lb_affinity"] = None
        elif kind != "client-ip":
            raise InvalidArgument(f"invalid --lb-affinity {affinity!r}: expected "
                                  "client-ip[:TIMEOUT] or none")
        else:
            seconds = parse_duration(timeout) if timeout else 3600.0
            if seconds <= 0:
                raise InvalidArgument(f"invalid --lb-affinity {affinity!r}: timeout must be "
                                      "more than 0")
            changes["lb_affinity"] = seconds
    return spec.model_copy(update=changes) if changes else spec


@dataclass
class HealthFlags:
    """--health-* flags as given (None: not given)."""

    cmd: str | None = None
    http: str | None = None
    tcp: bool = False
    interval: str | None = None
    timeout: str | None = None
    retries: int | None = None
    start_period: str | None = None
    disable: bool = False

    def given(self) -> bool:
        # `is not`: --health-retries 0 was given (and is refused), though 0 == False
        return any(getattr(self, f.name) is not None and getattr(self, f.name) is not False
                   for f in fields(self))


@dataclass
class UpdateFlags:
    """--update-* (or --rollback-*) flags as given."""

    parallelism: int | None = None
    delay: str | None = None
    failure_action: str | None = None
    monitor: str | None = None
    max_failure_ratio: float | None = None
    order: str | None = None


def apply_health(current: HealthConfig | None, f: HealthFlags) -> HealthConfig | None:
    """The health config after the flags (docker: --no-healthcheck wins; a new probe kind
    replaces the old one; timings apply to whatever probe there is)."""
    if f.disable:
        if f.cmd or f.http or f.tcp:
            raise InvalidArgument("--no-healthcheck conflicts with --health-* options")
        return None
    if not f.given():
        return current
    if sum(1 for x in (f.cmd, f.http, f.tcp) if x) > 1:
        raise InvalidArgument("choose one of --health-cmd, --health-http and --health-tcp")
    base = current or HealthConfig()
    changes: dict[str, object] = {}
    if f.cmd:
        changes.update(test=["CMD-SHELL", f.cmd], http_path=None, tcp=False)
    elif f.http:
        if not f.http.startswith("/"):
            raise InvalidArgument(f"invalid --health-http {f.http!r}: a path starting with /")
        changes.update(test=[], http_path=f.http, tcp=False)
    elif f.tcp:
        changes.update(test=[], http_path=None, tcp=True)
    if f.interval is not None:
        changes["interval"] = _positive("--health-interval", f.interval)
    if f.timeout is not None:
        changes["timeout"] = _positive("--health-timeout", f.timeout)
    if f.start_period is not None:
        changes["start_period"] = parse_duration(f.start_period)
    if f.retries is not None:
        if f.retries < 1:
            raise InvalidArgument("--health-retries must be at least 1")
        changes["retries"] = f.retries
    cfg = base.model_copy(update=changes)
    if not (cfg.test or cfg.http_path or cfg.tcp):
        raise InvalidArgument("health timings given without a check: add --health-cmd, "
                              "--health-http or --health-tcp")
    return cfg


def apply_update(current: UpdateConfig, f: UpdateFlags, flag: str) -> UpdateConfig:
    """The update (or rollback) config after the flags; `flag` names them in errors."""
    changes: dict[str, object] = {}
    if f.parallelism is not None:
        if f.parallelism < 0:
            raise InvalidArgument(f"invalid --{flag}-parallelism {f.parallelism}: must be 0 or more")
        changes["parallelism"] = f.parallelism
    if f.delay is not None:
        changes["delay"] = parse_duration(f.delay)
    if f.monitor is not None:
        changes["monitor"] = parse_duration(f.monitor)
    if f.failure_action is not None:
        if f.failure_action not in ("pause", "continue", "rollback"):
            raise InvalidArgument(f"invalid --{flag}-failure-action {f.failure_action!r}: "
                                  "expected pause, continue or rollback")
        changes["failure_action"] = f.failure_action
    if f.max_failure_ratio is not None:
        if not 0 <= f.max_failure_ratio <= 1:
            raise InvalidArgument(f"invalid --{flag}-max-failure-ratio {f.max_failure_ratio}: "
                                  "must be between 0 and 1")
        changes["max_failure_ratio"] = f.max_failure_ratio
    if f.order is not None:
        if f.order not in ("stop-first", "start-first"):
            raise InvalidArgument(f"invalid --{flag}-order {f.order!r}: expected stop-first or "
                                  "start-first")
        changes["order"] = f.order
    return current.model_copy(update=changes)


def apply_all(spec: ServiceSpec, health: HealthFlags, update: UpdateFlags,
              rollback: UpdateFlags) -> ServiceSpec:
    """`spec` with every shared flag applied."""
    task = spec.task.model_copy(update={"healthcheck": apply_health(spec.task.healthcheck, health)})
    return spec.model_copy(update={
        "task": task,
        "update_config": apply_update(spec.update_config, update, "update"),
        "rollback_config": apply_update(spec.rollback_config, rollback, "rollback")})


def _positive(flag: str, value: str) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise InvalidArgument(f"invalid {flag} {value!r}: must be more than 0")
    return seconds
