"""Parsing of CLI flag values (`--publish`, `--env`, `--label`, durations).

Everything here is pure: bad input raises `InvalidArgument` with a one-line message that the
CLI prints as `Error: ...`. Wording follows docker's where docker has an equivalent.
"""

from __future__ import annotations

import os
import re
from typing import Literal, cast

from pydantic import ValidationError

from corral.api.errors import InvalidArgument
from corral.api.types import PortConfig, SecretReference

__all__ = [
    "check_port_conflicts",
    "parse_duration",
    "parse_env",
    "parse_label",
    "parse_publish",
]

_PUBLISH_USAGE = "expected PUBLISHED:TARGET[/PROTOCOL] or published=P,target=T"
_LONG_KEYS = ("published", "target", "protocol", "mode", "proxy-protocol", "traffic")
_PROTOCOLS = ("tcp", "udp")
_MODES = ("ingress", "host")


# --------------------------------------------------------------------------- --publish


def _port(kind: str, text: str) -> int:
    """Parse one port number, refusing anything outside 1..65535."""
    text = text.strip()
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise InvalidArgument(f'invalid {kind} port "{text}": must be between 1 and 65535')
    return int(text)


def _protocol(text: str, value: str) -> Literal["tcp", "udp"]:
    """Validate a protocol name (case-insensitive) and return it lowercased."""
    proto = text.strip().lower()
    if proto not in _PROTOCOLS:
        raise InvalidArgument(f'invalid protocol "{text}" in "{value}": must be tcp or udp')
    return cast(Literal["tcp", "udp"], proto)


def _mode(text: str) -> Literal["ingress", "host"]:
    """Validate a publish mode (case-insensitive) and return it lowercased."""
    mode = text.strip().lower()
    if mode not in _MODES:
        raise InvalidArgument(f'invalid publish mode "{text}": must be ingress or host')
    return cast(Literal["ingress", "host"], mode)


def _parse_publish_long(value: str) -> PortConfig:
    """Parse docker's long form `published=P,target=T[,protocol=...][,mode=...]`."""
    fields: dict[str, str] = {}
    for field in value.split(","):
        field = field.strip()
        if not field:
            continue
        key, sep, val = field.partition("=")
        key = key.strip().lower()
        if not sep or not key:
            raise InvalidArgument(f'invalid field "{field}" in "{value}": expected key=value')
        if key not in _LONG_KEYS:
            raise InvalidArgument(
                f'invalid publish field "{key}" in "{value}": '
                "expected published, target, protocol, mode, proxy-protocol or traffic"
            )
        fields[key] = val.strip()
    if "target" not in fields:
        raise InvalidArgument(f'invalid publish "{value}": target port is required')
    if "published" not in fields:
        raise InvalidArgument(f'invalid publish "{value}": published port is required')
    traffic = fields.get("traffic", "cluster")
    if traffic not in ("cluster", "local"):
        raise InvalidArgument(f'invalid traffic "{traffic}" in "{value}": expected cluster or local')
    proxy = fields.get("proxy-protocol", "")
    if proxy not in ("", "v1", "v2"):
        raise InvalidArgument(f'invalid proxy-protocol "{proxy}" in "{value}": expected v1 or v2')
    return PortConfig(
        published_port=_port("published", fields["published"]),
        target_port=_port("target", fields["target"]),
        protocol=_protocol(fields.get("protocol", "tcp"), value),
        publish_mode=_mode(fields.get("mode", "ingress")),
        proxy_protocol="v1" if proxy == "v1" else "v2" if proxy == "v2" else "",
        traffic="local" if traffic == "local" else "cluster",
    )


def parse_publish(value: str) -> PortConfig:
    """Parse a `-p/--publish` value: `8080:80[/udp]` or `published=8080,target=80[,...]`."""
    value = value.strip()
    if "=" in value:
        return _parse_publish_long(value)
    ports, slash, proto = value.partition("/")
    parts = ports.split(":")
    if len(parts) == 1 and parts[0].strip().isdigit():
        raise InvalidArgument(
            f'invalid publish "{value}": a published port is required '
            f"(use PUBLISHED:TARGET, e.g. {parts[0].strip()}:{parts[0].strip()})"
        )
    if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
        raise InvalidArgument(f'invalid publish "{value}": {_PUBLISH_USAGE}')
    if any(re.fullmatch(r"\s*\d+-\d+\s*", p) for p in parts):
        raise InvalidArgument(f'invalid publish "{value}": port ranges are not supported')
    return PortConfig(
        published_port=_port("published", parts[0]),
        target_port=_port("target", parts[1]),
        protocol=_protocol(proto, value) if slash else "tcp",
    )


def check_port_conflicts(ports: list[PortConfig]) -> None:
    """Refuse a spec that publishes the same port/protocol twice."""
    seen: set[tuple[int, str]] = set()
    for p in ports:
        key = (p.published_port, p.protocol)
        if key in seen:
            raise InvalidArgument(
                f"duplicate published port {p.published_port}/{p.protocol}: "
                "a port can be published only once per protocol"
            )
        seen.add(key)


# --------------------------------------------------------------------------- --env / --label


def parse_env(values: list[str]) -> list[str]:
    """Validate `K=V` values; a bare `K` takes its value from os.environ (dropped if unset)."""
    out: list[str] = []
    for val in values:
        key, sep, _ = val.partition("=")
        if not key.strip():
            raise InvalidArgument(f'invalid environment variable "{val}": empty name')
        if sep:
            out.append(val)
        elif key in os.environ:
            out.append(f"{key}={os.environ[key]}")
    return out


def parse_label(values: list[str]) -> dict[str, str]:
    """Parse `k=v` (or bare `k`, meaning an empty value) labels; later ones win."""
    labels: dict[str, str] = {}
    for val in values:
        key, _, v = val.partition("=")
        if not key.strip():
            raise InvalidArgument(f'invalid label "{val}": empty name')
        labels[key] = v
    return labels


def parse_secret(value: str) -> SecretReference:
    """docker's --secret: `NAME`, or `source=NAME[,target=FILE][,mode=0400]`."""
    if "=" not in value:
        fields = {"source": value}
    else:
        fields = {}
        for part in value.split(","):
            key, sep, v = part.partition("=")
            if not sep or key not in ("source", "src", "target", "mode", "uid", "gid"):
                raise InvalidArgument(f"invalid --secret {value!r}: expected NAME or "
                                      "source=NAME[,target=FILE][,mode=0400]")
            fields["source" if key == "src" else key] = v
    if not fields.get("source"):
        raise InvalidArgument(f"invalid --secret {value!r}: no source secret")
    try:
        mode = int(fields.get("mode", "0444"), 8)
    except ValueError:
        raise InvalidArgument(f"invalid --secret mode {fields['mode']!r}: an octal mode like "
                              "0400") from None
    try:
        return SecretReference(secret_name=fields["source"], target=fields.get("target", ""),
                               mode=mode)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise InvalidArgument(f"invalid --secret {value!r}: {err['loc'][0]}: {err['msg']}") from None


# --------------------------------------------------------------------------- durations

_UNIT_SECONDS: dict[str, float] = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,  # micro sign
    "\u03bcs": 1e-6,  # greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_NUMBER = r"(?:\d+\.?\d*|\.\d+)"
_COMPONENT_RE = re.compile(rf"({_NUMBER})(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_DURATION_RE = re.compile(rf"(?:{_NUMBER}(?:ns|us|\u00b5s|\u03bcs|ms|s|m|h))+")
_BARE_RE = re.compile(_NUMBER)


def parse_duration(value: str) -> float:
    """Parse a docker/Go duration (`5s`, `500ms`, `1m30s`, `2h`; bare `10` = seconds) to seconds."""
    text = value.strip()
    if text.startswith("-"):
        raise InvalidArgument(f'invalid duration "{value}": must not be negative')
    if text.startswith("+"):
        text = text[1:]
    if _BARE_RE.fullmatch(text):
        return float(text)
    if not _DURATION_RE.fullmatch(text):
        raise InvalidArgument(
            f'invalid duration "{value}": expected a number with a unit, e.g. 5s, 500ms, 1m30s or 2h'
        )
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in _COMPONENT_RE.findall(text))
