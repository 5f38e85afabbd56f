"""What every command shares: the daemon it talks to and how it prints."""

from __future__ import annotations

from typing import Any

import typer

from corral.cli.render import format_table
from corral.client import Client, TlsFiles


class State:
    """Per-invocation CLI state (-H/--host, --tls*), with a lazily made client."""

    def __init__(self, host: str | None, tls: TlsFiles | None = None) -> None:
        self.host = host
        self.tls = tls
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.host, tls=self.tls)
        return self._client


def client(ctx: typer.Context) -> Client:
    state = ctx.find_object(State)
    return state.client if state is not None else Client()


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    typer.echo(format_table(headers, rows))


def echo_json(obj: Any) -> None:
    import json
    typer.echo(json.dumps(obj, indent=4))
