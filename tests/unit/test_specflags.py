"""Shared service flags: --health-* into HealthConfig, --update-*/--rollback-* into UpdateConfig."""

from __future__ import annotations

import pytest

from corral.api.errors import InvalidArgument
from corral.api.types import ContainerSpec, HealthConfig, ServiceSpec, UpdateConfig
from corral.cli.specflags import (
    HealthFlags,
    UpdateFlags,
    apply_all,
    apply_health,
    apply_update,
)

CMD_CHECK = HealthConfig(test=["CMD-SHELL", "true"], interval=10.0, retries=2)


# --------------------------------------------------------------------------- apply_health


def test_no_health_flags_keeps_current() -> None:
    assert apply_health(None, HealthFlags()) is None
    assert apply_health(CMD_CHECK, HealthFlags()) == CMD_CHECK


def test_health_cmd_is_cmd_shell() -> None:
    cfg = apply_health(None, HealthFlags(cmd="curl -f localhost"))
    assert cfg is not None
    assert cfg.test == ["CMD-SHELL", "curl -f localhost"]
    assert cfg.http_path is None and cfg.tcp is False
    # docker's defaults for the timings
    assert (cfg.interval, cfg.timeout, cfg.retries, cfg.start_period) == (30.0, 30.0, 3, 0.0)


def test_health_http_replaces_command() -> None:
    cfg = apply_health(CMD_CHECK, HealthFlags(http="/health"))
    assert cfg is not None
    assert cfg.http_path == "/health"
    assert cfg.test == [] and cfg.tcp is False
    # timings of the existing check are kept
    assert cfg.interval == 10.0 and cfg.retries == 2


def test_health_tcp_replaces_http() -> None:
    cfg = apply_health(HealthConfig(http_path="/x"), HealthFlags(tcp=True))
    assert cfg is not None
    assert cfg.tcp is True and cfg.http_path is None and cfg.test == []


def test_health_cmd_replaces_tcp() -> None:
    cfg = apply_health(HealthConfig(tcp=True), HealthFlags(cmd="true"))
    assert cfg is not None
    assert cfg.test == ["CMD-SHELL", "true"] and cfg.tcp is False and cfg.http_path is None


def test_health_timings_parsed() -> None:
    cfg = apply_health(None, HealthFlags(tcp=True, interval="2s", timeout="500ms",
                                         start_period="1m30s", retries=5))
    assert cfg is not None
    assert cfg.interval == 2.0
    assert cfg.timeout == pytest.approx(0.5)
    assert cfg.start_period == 90.0
    assert cfg.retries == 5


def test_start_period_may_be_zero() -> None:
    cfg = apply_health(None, HealthFlags(tcp=True, start_period="0s"))
    assert cfg is not None and cfg.start_period == 0.0


@pytest.mark.parametrize("current", [None, CMD_CHECK])
def test_no_healthcheck_returns_none(current: HealthConfig | None) -> None:
    assert apply_health(current, HealthFlags(disable=True)) is None


@pytest.mark.parametrize("flags", [
    HealthFlags(disable=True, cmd="true"),
    HealthFlags(disable=True, http="/h"),
    HealthFlags(disable=True, tcp=True),
])
def test_no_healthcheck_conflicts_with_probe(flags: HealthFlags) -> None:
    with pytest.raises(InvalidArgument, match="--no-healthcheck"):
        apply_health(CMD_CHECK, flags)


@pytest.mark.parametrize("flags", [
    HealthFlags(cmd="true", http="/h"),
    HealthFlags(cmd="true", tcp=True),
    HealthFlags(http="/h", tcp=True),
    HealthFlags(cmd="true", http="/h", tcp=True),
])
def test_two_probe_kinds_refused(flags: HealthFlags) -> None:
    with pytest.raises(InvalidArgument, match="choose one"):
        apply_health(None, flags)


def test_http_path_must_start_with_slash() -> None:
    with pytest.raises(InvalidArgument, match="--health-http"):
        apply_health(None, HealthFlags(http="health"))


@pytest.mark.parametrize("flags", [
    HealthFlags(interval="5s"),
    HealthFlags(timeout="5s"),
    HealthFlags(retries=2),
    HealthFlags(start_period="5s"),
])
def test_timings_without_any_check_refused(flags: HealthFlags) -> None:
    with pytest.raises(InvalidArgument, match="without a check"):
        apply_health(None, flags)


def test_timings_apply_to_existing_check() -> None:
    cfg = apply_health(CMD_CHECK, HealthFlags(interval="3s", retries=7))
    assert cfg is not None
    assert cfg.test == CMD_CHECK.test
    assert cfg.interval == 3.0 and cfg.retries == 7
    assert cfg.timeout == CMD_CHECK.timeout


def test_timings_with_existing_http_check() -> None:
    cfg = apply_health(HealthConfig(http_path="/ok"), HealthFlags(timeout="250ms"))
    assert cfg is not None
    assert cfg.http_path == "/ok" and cfg.timeout == pytest.approx(0.25)


@pytest.mark.parametrize("retries", [0, -1])
def test_retries_below_one_refused_with_probe(retries: int) -> None:
    with pytest.raises(InvalidArgument, match="--health-retries"):
        apply_health(None, HealthFlags(cmd="true", retries=retries))


def test_negative_retries_refused_on_existing_check() -> None:
    with pytest.raises(InvalidArgument, match="--health-retries"):
        apply_health(CMD_CHECK, HealthFlags(retries=-1))


def test_zero_retries_alone_refused() -> None:
    with pytest.raises(InvalidArgument, match="--health-retries"):
        apply_health(CMD_CHECK, HealthFlags(retries=0))


@pytest.mark.parametrize("flags, name", [
    (HealthFlags(tcp=True, interval="0s"), "--health-interval"),
    (HealthFlags(tcp=True, timeout="0"), "--health-timeout"),
])
def test_zero_interval_or_timeout_refused(flags: HealthFlags, name: str) -> None:
    with pytest.raises(InvalidArgument, match=name):
        apply_health(None, flags)


@pytest.mark.parametrize("flags", [
    HealthFlags(tcp=True, interval="soon"),
    HealthFlags(tcp=True, timeout="-1s"),
    HealthFlags(tcp=True, start_period="-2s"),
])
def test_bad_durations_refused(flags: HealthFlags) -> None:
    with pytest.raises(InvalidArgument):
        apply_health(None, flags)


def test_apply_health_does_not_mutate_current() -> None:
    before = CMD_CHECK.model_copy(deep=True)
    apply_health(CMD_CHECK, HealthFlags(http="/h", interval="1s"))
    assert CMD_CHECK == before


# --------------------------------------------------------------------------- apply_update


@pytest.mark.parametrize("flags, field, value", [
    (UpdateFlags(parallelism=3), "parallelism", 3),
    (UpdateFlags(parallelism=0), "parallelism", 0),
    (UpdateFlags(delay="10s"), "delay", 10.0),
    (UpdateFlags(delay="1m"), "delay", 60.0),
    (UpdateFlags(monitor="500ms"), "monitor", 0.5),
    (UpdateFlags(monitor="0s"), "monitor", 0.0),
    (UpdateFlags(failure_action="pause"), "failure_action", "pause"),
    (UpdateFlags(failure_action="continue"), "failure_action", "continue"),
    (UpdateFlags(failure_action="rollback"), "failure_action", "rollback"),
    (UpdateFlags(max_failure_ratio=0.25), "max_failure_ratio", 0.25),
    (UpdateFlags(max_failure_ratio=0.0), "max_failure_ratio", 0.0),
    (UpdateFlags(max_failure_ratio=1.0), "max_failure_ratio", 1.0),
    (UpdateFlags(order="start-first"), "order", "start-first"),
    (UpdateFlags(order="stop-first"), "order", "stop-first"),
])
def test_apply_update_each_field(flags: UpdateFlags, field: str, value: object) -> None:
    base = UpdateConfig(parallelism=2, delay=1.0, failure_action="continue", monitor=7.0,
                        max_failure_ratio=0.5, order="start-first")
    if field == "order" and value == "start-first":
        base = base.model_copy(update={"order": "stop-first"})
    cfg = apply_update(base, flags, "update")
    expected = pytest.approx(value) if isinstance(value, float) else value
    assert getattr(cfg, field) == expected
    # every other field is left as it was
    for other in UpdateConfig.model_fields:
        if other != field:
            assert getattr(cfg, other) == getattr(base, other), other
    # the result is still a valid config
    assert UpdateConfig.model_validate(cfg.model_dump()) == cfg


def test_apply_update_no_flags_is_identity() -> None:
    base = UpdateConfig(parallelism=4)
    assert apply_update(base, UpdateFlags(), "update") == base


def test_apply_update_all_fields() -> None:
    cfg = apply_update(UpdateConfig(), UpdateFlags(
        parallelism=2, delay="3s", failure_action="rollback", monitor="20s",
        max_failure_ratio=0.3, order="start-first"), "rollback")
    assert cfg == UpdateConfig(parallelism=2, delay=3.0, failure_action="rollback", monitor=20.0,
                               max_failure_ratio=0.3, order="start-first")


@pytest.mark.parametrize("flag", ["update", "rollback"])
@pytest.mark.parametrize("flags, suffix", [
    (UpdateFlags(failure_action="retry"), "failure-action"),
    (UpdateFlags(failure_action="Pause"), "failure-action"),
    (UpdateFlags(order="random"), "order"),
    (UpdateFlags(order="start_first"), "order"),
    (UpdateFlags(parallelism=-1), "parallelism"),
    (UpdateFlags(max_failure_ratio=1.5), "max-failure-ratio"),
    (UpdateFlags(max_failure_ratio=-0.1), "max-failure-ratio"),
    (UpdateFlags(max_failure_ratio=float("nan")), "max-failure-ratio"),
])
def test_apply_update_invalid_names_flag(flags: UpdateFlags, suffix: str, flag: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        apply_update(UpdateConfig(), flags, flag)
    assert f"--{flag}-{suffix}" in exc.value.message
    other = "rollback" if flag == "update" else "update"
    assert f"--{other}-" not in exc.value.message


@pytest.mark.parametrize("flags", [
    UpdateFlags(delay="-1s"), UpdateFlags(monitor="-5s"), UpdateFlags(delay="later"),
])
def test_apply_update_bad_durations_refused(flags: UpdateFlags) -> None:
    with pytest.raises(InvalidArgument):
        apply_update(UpdateConfig(), flags, "update")


# --------------------------------------------------------------------------- apply_all


def _spec(**kw: object) -> ServiceSpec:
    return ServiceSpec(name="web", task=ContainerSpec(image="whoami", **kw))  # type: ignore[arg-type]


def test_apply_all_composes() -> None:
    spec = _spec()
    out = apply_all(spec, HealthFlags(http="/ready", interval="1s"),
                    UpdateFlags(parallelism=2, order="start-first"),
                    UpdateFlags(failure_action="continue", monitor="2s"))
    assert out.task.healthcheck == HealthConfig(http_path="/ready", interval=1.0)
    assert out.task.image == "whoami"
    assert out.update_config == UpdateConfig(parallelism=2, order="start-first")
    assert out.rollback_config == UpdateConfig(failure_action="continue", monitor=2.0)
    # the input spec is untouched
    assert spec == _spec()
    # the rest of the spec survives
    assert out.name == "web" and out.replicas == spec.replicas


def test_apply_all_no_flags_is_identity() -> None:
    spec = _spec(healthcheck=CMD_CHECK)
    assert apply_all(spec, HealthFlags(), UpdateFlags(), UpdateFlags()) == spec


def test_apply_all_disables_health() -> None:
    out = apply_all(_spec(healthcheck=CMD_CHECK), HealthFlags(disable=True), UpdateFlags(),
                    UpdateFlags())
    assert out.task.healthcheck is None


def test_apply_all_names_rollback_flag() -> None:
    with pytest.raises(InvalidArgument, match="--rollback-order"):
        apply_all(_spec(), HealthFlags(), UpdateFlags(order="start-first"),
                  UpdateFlags(order="sideways"))


def test_apply_all_names_update_flag() -> None:
    with pytest.raises(InvalidArgument, match="--update-parallelism"):
        apply_all(_spec(), HealthFlags(), UpdateFlags(parallelism=-2), UpdateFlags())


def test_apply_all_health_error_propagates() -> None:
    with pytest.raises(InvalidArgument, match="choose one"):
        apply_all(_spec(), HealthFlags(cmd="true", tcp=True), UpdateFlags(), UpdateFlags())
