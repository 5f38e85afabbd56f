"""The `corral` command's entry point: the daemon without the CLI, and one-line errors for all.

`corral daemon …` (how every node runs, and how the labs start their nodes) imports only the
daemon's command: the rest of the CLI (every sub-command, its tables and colours) is ~3 MB of
resident memory a daemon would carry for its whole life.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def main() -> None:
    """Console entry point: `corral daemon …` takes the short way, the rest the whole CLI."""
    if sys.argv[1:2] == ["daemon"]:
        from corral.cli.daemoncmd import daemon_app
        guarded(lambda: daemon_app(args=sys.argv[2:], prog_name="corral daemon"))
    else:
        from corral.cli.main import app
        guarded(lambda: app(prog_name="corral"))


def guarded(run: Callable[[], object]) -> None:
    """Run the CLI: one-line errors and a non-zero exit, never a traceback."""
    import typer
    from pydantic import ValidationError

    from corral.api.errors import CorralError

    try:
        run()
    except ValidationError as exc:
        # Values the CLI passed through to an API type (a service name, say) and it refused.
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ())) or "value"
        value = err.get("input")
        shown = f" {value!r}" if isinstance(value, (str, int, float)) else ""
        typer.echo(f"Error: invalid {where}{shown}: {err.get('msg', 'invalid')}", err=True)
        sys.exit(1)
    except CorralError as exc:
        msg = exc.message
        typer.echo(msg if msg.startswith("Error") else f"Error: {msg}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # `corral service ls | head`: the reader went away, that is fine.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
