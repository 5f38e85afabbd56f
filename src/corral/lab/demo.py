"""`make demo`: the seed's routing-mesh scenario, run for real on a 3-node loopback lab."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from corral.lab.lab import Lab

NODES = ["127.0.0.11", "127.0.0.12", "127.0.0.13"]


def run(*args: str, env: dict[str, str]) -> None:
    """Show a command like a shell transcript, then run it."""
    print(f"\n$ corral {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "corral", *args], env=env, check=True)


def curl(addr: str) -> None:
    print(f"\n$ curl {addr}:9200", flush=True)
    if shutil.which("curl"):
        subprocess.run(["curl", "-s", f"{addr}:9200"], check=True)
    else:
        import httpx
        print(httpx.get(f"http://{addr}:9200").text, end="")


def main() -> int:
    env = dict(os.environ, CORRAL_HOST=f"{NODES[0]}:2377")
    lab = Lab()
    if lab.state_file.exists():
        print("(an earlier demo lab exists: taking it down first)")
        lab.load().down()
    try:
        run("lab", "up", "--nodes", "3", env=env)
        print(f"\n$ export CORRAL_HOST={NODES[0]}:2377")
        run("node", "ls", env=env)
        run("service", "create", "--name", "search", "--replicas", "3", "-p", "9200:9200",
            "whoami", env=env)
        run("service", "ls", env=env)
        run("service", "ps", "search", env=env)
        for addr in [NODES[1]] * 3 + [NODES[0], NODES[2]]:
            curl(addr)
        print("\nSuccessive requests to any node cycle through the replicas, wherever they run.")
        run("lab", "kill", "node3", env=env)
        print("(waiting for the swarm to notice node3 is gone and replace its task…)")
        time.sleep(5)
        run("service", "ps", "search", env=env)
        run("lab", "start", "node3", env=env)
    except subprocess.CalledProcessError as exc:
        print(f"demo step failed: {exc}", file=sys.stderr)
        return 1
    print("\nThe lab is still running. Try it yourself:\n"
          "    . .venv/bin/activate\n"
          f"    export CORRAL_HOST={NODES[0]}:2377\n"
          "    corral service scale search=5\n"
          f"    curl {NODES[2]}:9200\n"
          "    corral lab down        # when done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
