"""`corral daemon`: run one node's daemon in the foreground on uvloop."""

from __future__ import annotations

import logging
import sys
import uvicorn
import uvloop

from corral.daemon.api import make_app
from corral.daemon.config import DaemonConfig
from corral.daemon.daemon import Daemon
from corral.dataplane.limits import raise_nofile_limit


async def serve(daemon: Daemon) -> int:
    """Run the API server until SIGTERM/SIGINT, then stop tasks, mesh and manager."""
    config = uvicorn.Config(make_app(daemon), host=daemon.addr, port=daemon.api_port,
                            log_level="warning", access_log=False, lifespan="off",
                            # Agents hold long-polls open: don't wait for them on shutdown.
                            timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    await daemon.start()
    try:
        await server.serve()
    finally:
        await daemon.stop()
    return 0 if server.started else 1


def run_daemon(config: DaemonConfig) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    raise_nofile_limit()  # two descriptors per proxied connection (dockerd: LimitNOFILE=infinity)
    return uvloop.run(serve(Daemon(config)))
