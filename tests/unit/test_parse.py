"""Tests for corral.cli.parse: CLI flag values."""

from __future__ import annotations

import pytest

from corral.api.errors import InvalidArgument
from corral.api.types import PortConfig
from corral.cli.parse import (
    check_port_conflicts,
    parse_duration,
    parse_env,
    parse_label,
    parse_publish,
)

# --------------------------------------------------------------------------- --publish


@pytest.mark.parametrize(
    ("value", "published", "target", "protocol", "mode"),
    [
        ("9200:9200", 9200, 9200, "tcp", "ingress"),
        ("8080:80/tcp", 8080, 80, "tcp", "ingress"),
        ("5353:53/udp", 5353, 53, "udp", "ingress"),
        ("5353:53/UDP", 5353, 53, "udp", "ingress"),
        (" 1:65535 ", 1, 65535, "tcp", "ingress"),
        ("published=8080,target=80", 8080, 80, "tcp", "ingress"),
        ("target=80,published=8080,protocol=udp", 8080, 80, "udp", "ingress"),
        ("published=8080,target=80,mode=host", 8080, 80, "tcp", "host"),
        ("published=8080,target=80,protocol=tcp,mode=ingress", 8080, 80, "tcp", "ingress"),
        ("Published=8080, Target=80", 8080, 80, "tcp", "ingress"),
    ],
)
def test_parse_publish_ok(value: str, published: int, target: int, protocol: str, mode: str) -> None:
    assert parse_publish(value) == PortConfig(
        published_port=published,
        target_port=target,
        protocol=protocol,
        publish_mode=mode,
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("70000:80", 'invalid published port "70000": must be between 1 and 65535'),
        ("0:80", 'invalid published port "0": must be between 1 and 65535'),
        ("80:70000", 'invalid target port "70000": must be between 1 and 65535'),
        ("x:80", 'invalid published port "x": must be between 1 and 65535'),
        (
            "abc",
            'invalid publish "abc": expected PUBLISHED:TARGET[/PROTOCOL] or published=P,target=T',
        ),
        (
            "",
            'invalid publish "": expected PUBLISHED:TARGET[/PROTOCOL] or published=P,target=T',
        ),
        (
            "1:2:3",
            'invalid publish "1:2:3": expected PUBLISHED:TARGET[/PROTOCOL] or published=P,target=T',
        ),
        (
            "80",
            'invalid publish "80": a published port is required (use PUBLISHED:TARGET, e.g. 80:80)',
        ),
        (
            "80/udp",
            'invalid publish "80/udp": a published port is required '
            "(use PUBLISHED:TARGET, e.g. 80:80)",
        ),
        ("8080-8081:80-81", 'invalid publish "8080-8081:80-81": port ranges are not supported'),
        ("80:80/sctp", 'invalid protocol "sctp" in "80:80/sctp": must be tcp or udp'),
        ("80:80/", 'invalid protocol "" in "80:80/": must be tcp or udp'),
        (
            "published=80,target=80,protocol=icmp",
            'invalid protocol "icmp" in "published=80,target=80,protocol=icmp": must be tcp or udp',
        ),
        (
            "published=80,target=80,foo=1",
            'invalid publish field "foo" in "published=80,target=80,foo=1": '
            "expected published, target, protocol, mode, proxy-protocol or traffic",
        ),
        (
            "published=80,target",
            'invalid field "target" in "published=80,target": expected key=value',
        ),
        ("published=80", 'invalid publish "published=80": target port is required'),
        ("target=80", 'invalid publish "target=80": published port is required'),
        (
            "published=80,target=80,mode=vip",
            'invalid publish mode "vip": must be ingress or host',
        ),
        (
            "published=99999,target=80",
            'invalid published port "99999": must be between 1 and 65535',
        ),
    ],
)
def test_parse_publish_errors(value: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        parse_publish(value)
    assert exc.value.message == message
    assert "\n" not in exc.value.message


# --------------------------------------------------------------------------- port conflicts


def _port(published: int, target: int = 80, protocol: str = "tcp") -> PortConfig:
    return PortConfig(published_port=published, target_port=target, protocol=protocol)


@pytest.mark.parametrize(
    "ports",
    [
        [],
        [_port(80)],
        [_port(80), _port(81)],
        [_port(53, 53, "tcp"), _port(53, 53, "udp")],
        [_port(80, 80), _port(81, 80)],
    ],
)
def test_check_port_conflicts_ok(ports: list[PortConfig]) -> None:
    check_port_conflicts(ports)


@pytest.mark.parametrize(
    ("ports", "message"),
    [
        (
            [_port(80, 80), _port(80, 81)],
            "duplicate published port 80/tcp: a port can be published only once per protocol",
        ),
        (
            [_port(53, 53, "udp"), _port(1, 1), _port(53, 54, "udp")],
            "duplicate published port 53/udp: a port can be published only once per protocol",
        ),
    ],
)
def test_check_port_conflicts_errors(ports: list[PortConfig], message: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        check_port_conflicts(ports)
    assert exc.value.message == message


# --------------------------------------------------------------------------- --env


def test_parse_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_TEST_SET", "from-env")
    monkeypatch.delenv("CORRAL_TEST_UNSET", raising=False)
    assert parse_env(
        ["A=1", "B=", "C=x=y", "CORRAL_TEST_SET", "CORRAL_TEST_UNSET", "D= spaced "]
    ) == ["A=1", "B=", "C=x=y", "CORRAL_TEST_SET=from-env", "D= spaced "]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("=1", 'invalid environment variable "=1": empty name'),
        ("", 'invalid environment variable "": empty name'),
        (" =x", 'invalid environment variable " =x": empty name'),
    ],
)
def test_parse_env_errors(value: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        parse_env(["OK=1", value])
    assert exc.value.message == message


# --------------------------------------------------------------------------- --label


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], {}),
        (["a=b"], {"a": "b"}),
        (["flag"], {"flag": ""}),
        (["a=b=c", "e="], {"a": "b=c", "e": ""}),
        (["a=1", "a=2"], {"a": "2"}),
        (["com.example.tier=web"], {"com.example.tier": "web"}),
    ],
)
def test_parse_label(values: list[str], expected: dict[str, str]) -> None:
    assert parse_label(values) == expected


@pytest.mark.parametrize("value", ["=x", "", "  =x"])
def test_parse_label_errors(value: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        parse_label([value])
    assert exc.value.message == f'invalid label "{value}": empty name'


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("5s", 5.0),
        ("500ms", 0.5),
        ("1m30s", 90.0),
        ("2h", 7200.0),
        ("10", 10.0),
        ("0", 0.0),
        ("0s", 0.0),
        ("1.5s", 1.5),
        ("2.5", 2.5),
        (".5s", 0.5),
        ("1h2m3s", 3723.0),
        ("100us", 100e-6),
        ("100\u00b5s", 100e-6),
        ("1500ns", 1500e-9),
        ("1m500ms", 60.5),
        (" 3s ", 3.0),
        ("+4s", 4.0),
    ],
)
def test_parse_duration_ok(value: str, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-5s", 'invalid duration "-5s": must not be negative'),
        ("-1", 'invalid duration "-1": must not be negative'),
        ("", 'invalid duration "": expected a number with a unit, e.g. 5s, 500ms, 1m30s or 2h'),
        ("abc", 'invalid duration "abc": expected a number with a unit, e.g. 5s, 500ms, 1m30s or 2h'),
        ("5x", 'invalid duration "5x": expected a number with a unit, e.g. 5s, 500ms, 1m30s or 2h'),
        ("s", 'invalid duration "s": expected a number with a unit, e.g. 5s, 500ms, 1m30s or 2h'),
        ("1m 30s", 'invalid duration "1m 30s": expected a number with a unit, e.g. 5s, 500ms, 1m30s or 2h'),
        ("1d", 'invalid duration "1d": expected a number with a unit, e.g. 5s, 500ms, 1m30s or 2h'),
        ("inf", 'invalid duration "inf": expected a number with a unit, e.g. 5s, 500ms, 1m30s or 2h'),
        ("5s1", 'invalid duration "5s1": expected a number with a unit, e.g. 5s, 500ms, 1m30s or 2h'),
    ],
)
def test_parse_duration_errors(value: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        parse_duration(value)
    assert exc.value.message == message
