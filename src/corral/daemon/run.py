"""`corral daemon`: run one node's daemon in the foreground on uvloop."""

from __future__ import annotations

import asyncio
import logging
import ssl
import sys
from typing import Any

import uvicorn
import uvloop

from corral.api.errors import CorralError
from corral.daemon.api import make_app
from corral.daemon.config import DaemonConfig
from corral.daemon.daemon import Daemon
from corral.daemon.forward import leader_door
from corral.daemon.listeners import bind_unix, control_door, local_door, server
from corral.daemon.state import lock_data_dir
from corral.dataplane.limits import raise_nofile_limit

log = logging.getLogger("corral.daemon")


def _quiet_tls_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A client that is not TLS, or whose certificate we refuse, is a log line, not a traceback."""
    exc = context.get("exception")
    if isinstance(exc, (ssl.SSLError, ConnectionError)):
        peer = ""
        transport = context.get("transport")
        if transport is not None:
            peer = f" from {transport.get_extra_info('peername')}"
        log.warning("TLS connection%s refused: %s", peer, exc)
        return
    loop.default_exception_handler(context)


async def serve(daemon: Daemon) -> int:
    """Serve the local socket (and, in a swarm, the TLS control port) until SIGTERM/SIGINT,
    then stop tasks, mesh and manager."""
    asyncio.get_running_loop().set_exception_handler(_quiet_tls_errors)
    app = leader_door(make_app(daemon), daemon)
    daemon.control_app = control_door(app, daemon.cluster_id, daemon.node_roles)
    local = uvicorn.Server(server(local_door(app)))
    with lock_data_dir(daemon.config.data_dir):
        sock = bind_unix(daemon.config.socket)
        try:
            await daemon.start()
            try:
                await local.serve(sockets=[sock])
            finally:
                await daemon.stop()
        finally:
            sock.close()
            daemon.config.socket.unlink(missing_ok=True)
    return 0 if local.started else 1


def run_daemon(config: DaemonConfig) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    raise_nofile_limit()  # two descriptors per proxied connection (dockerd: LimitNOFILE=infinity)
    try:
        return uvloop.run(serve(Daemon(config)))
    except CorralError as exc:
        log.error("%s", exc.message)
        return 1
