"""Data-plane benchmark: the corral userspace mesh against HAProxy, nginx `stream` and no proxy.

    python bench/dataplane.py [--seconds N]

Starts 3 nginx backends on loopback, then measures over the same backends, each path on its
own loopback address:

- direct: wrk straight to backend 1 (on a second address of its own, 127.0.0.84, so direct
  and balanced traffic never share backend 4-tuples: see the loopback TIME_WAIT trap in
  /work/shared/platform-facts.md);
- corral mesh: bench/mesh_proxy.py (an IngressMesh on uvloop), round-robin over the 3: one
  process, and one per CPU sharing the port (SO_REUSEPORT; the daemon's default workers);
- HAProxy `mode tcp` and nginx `stream`, round-robin over the 3, one thread/worker each, and
  HAProxy with one thread per CPU (its default nbthread), compared with the per-CPU mesh;
- Python floor: bench/floor_proxy.py, the least any Python proxy does per connection (one epoll
  loop, raw sockets, no features), to tell what corral's mesh costs from what Python costs;
- corral kernel (nftables): corral's own ingress ruleset (nft_ingress.render_ingress_table,
  applied with nft.apply) DNATing round-robin over 3 backends, in a throwaway network namespace
  (the node): from the node itself to backends on its loopback (the issue's reference setup),
  and from another host (a client namespace) to tasks in a namespace of their own (ingress as a
  node of the netns runtime does it), each next to direct traffic measured the same way.

Loads: keep-alive req/s (with p50/p99), a new connection per request, and 100 MB transfers,
all of them `--repeat` times (default 3) over all paths; each figure is the median. Prints one
table with each figure also as a ratio to direct and to HAProxy, a second with each proxy's
CPU time per request, then the mesh's resident memory idle and while holding 10,000 idle
connections (and HAProxy's, for comparison). Needs root only to install wrk/haproxy/nginx when
they are missing and for the namespaces (without root the kernel rows are skipped). All
traffic stays on 127.0.0.0/8 or inside the benchmark's own namespaces; every process, the
namespaces and every temporary file are removed on exit, also on failure or Ctrl-C.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import resource
import secrets
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO

try:
    import corral  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "src"))

from corral.daemon.config import usable_cpus
from corral.dataplane.limits import raise_nofile_limit
from corral.dataplane.nft import NftError
from corral.dataplane.nft import apply as nft_apply
from corral.dataplane.nft_ingress import IngressRule, render_ingress_table
from corral.testing.labs import rss_kb

HERE = pathlib.Path(__file__).resolve().parent

BACKENDS = [("127.0.0.81", 18081), ("127.0.0.82", 18082), ("127.0.0.83", 18083)]
DIRECT = ("127.0.0.84", 18084)  # backend 1's second address, only for direct traffic
BULK_BYTES = 100 * 1024 * 1024
WRK_THREADS = 2
# The CPUs we may use, counted as `corral daemon --mesh-workers auto` counts them (HAProxy's
# default nbthread is the same count).
CORES = usable_cpus()
WRK_CONNECTIONS = 50
BULK_RUNS = 3
HELD_CONNECTIONS = 10_000
# Descriptors a proxy process needs besides two per proxied connection (listeners, stdio, logs).
FD_SPARE = 64

STREAM_MODULE = pathlib.Path("/usr/lib/nginx/modules/ngx_stream_module.so")

# The kernel path, all inside one throwaway network namespace (these addresses exist only on
# that namespace's loopback). The kernel path needs every backend of a port on one target port,
# so the 3 backends share a port on 3 addresses.
NS_NODE = ("10.98.200.1", 18080)  # the "node address" and published port: corral's DNAT
NS_BACKENDS = [("10.98.200.11", 18081), ("10.98.200.12", 18081), ("10.98.200.13", 18081)]
NS_DIRECT = ("10.98.200.21", 18081)  # backend 1's second address, only for direct traffic
# Ingress as a node sees it: a client on another host (a namespace behind a second veth pair,
# routed by the node) and tasks in a namespace of their own behind a link (as the netns
# runtime's tasks are, behind a bridge; the kernel mesh runs only with that runtime).
NS_LINK = ("10.98.201.1", 24)  # the node's side of the tasks' link
NS_CLIENT_LINK = ("10.98.202.1", "10.98.202.2", 24)  # the node's and the client's side
NS_TASK_PORT = 18082  # the published port for them on NS_NODE[0]
NS_TASK_BACKENDS = [("10.98.201.11", 18081), ("10.98.201.12", 18081), ("10.98.201.13", 18081)]
NS_TASK_DIRECT = ("10.98.201.21", 18081)
# Conntrack's TIME_WAIT timeout inside the namespace (default 120 s): new-connection runs open
# ~40k connections a second, which would otherwise fill the conntrack table (262,144 entries).
NS_CT_TIME_WAIT = 2


def log(msg: str) -> None:
    """Progress goes to stderr; the result table goes to stdout."""
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- tools


def nginx_stream_available() -> bool:
    """Whether nginx can run a `stream` block (built in, or the dynamic module installed)."""
    if shutil.which("nginx") is None:
        return False
    flags = subprocess.run(["nginx", "-V"], capture_output=True, text=True).stderr
    if "--with-stream=dynamic" in flags:
        return STREAM_MODULE.exists()
    return "--with-stream" in flags


def nginx_stream_needs_module() -> bool:
    flags = subprocess.run(["nginx", "-V"], capture_output=True, text=True).stderr
    return "--with-stream=dynamic" in flags


# Debian package -> how to tell it is already there.
REQUIRED: dict[str, Callable[[], bool]] = {
    "wrk": lambda: shutil.which("wrk") is not None,
    "curl": lambda: shutil.which("curl") is not None,
    "nginx": lambda: shutil.which("nginx") is not None,
    "haproxy": lambda: shutil.which("haproxy") is not None,
    "libnginx-mod-stream": nginx_stream_available,
}


def ensure_tools() -> list[str]:
    """apt-get install whatever is missing; return notes about what could not be installed."""
    missing = [pkg for pkg, present in REQUIRED.items() if not present()]
    if not missing:
        return []
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return [f"not installed (needs root and apt-get): {pkg}" for pkg in missing]
    log(f"installing {' '.join(missing)} (apt-get)…")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
    notes = []
    for pkg in missing:  # one at a time, so one failure does not block the others
        done = subprocess.run(["apt-get", "install", "-y", "-q", pkg], env=env,
                              capture_output=True, text=True)
        if done.returncode != 0 or not REQUIRED[pkg]():
            notes.append(f"could not install {pkg}: {done.stderr.strip()[-200:]}")
    return notes


def version(argv: Sequence[str]) -> str:
    """First line a tool prints about its version (nginx prints to stderr)."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "?"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "?"


# ----------------------------------------------------------------------- processes


class Processes:
    """Child processes, each in its own process group, all killed by :meth:`stop_all`."""

    def __init__(self, workdir: pathlib.Path) -> None:
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: Sequence[str], *,
              stdout: int | IO[bytes] = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
        stderr = open(self.workdir / f"{name}.stderr", "wb")
        try:
            proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        finally:
            stderr.close()
        self.procs.append((name, proc))
        return proc

    def stderr_tail(self, name: str) -> str:
        path = self.workdir / f"{name}.stderr"
        return path.read_text(errors="replace")[-800:] if path.exists() else ""

    def stop_all(self) -> None:
        for _, proc in reversed(self.procs):
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            # The group, not just the leader: nginx and haproxy leave workers behind.
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
        self.procs.clear()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session: the group id is the leader's pid
    except ProcessLookupError:
        pass


def wait_listening(addr: str, port: int, proc: subprocess.Popen[bytes], procs: Processes,
                   name: str, timeout: float = 10.0) -> None:
    """Poll until ``addr:port`` accepts a connection; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}: {procs.stderr_tail(name)}")
        try:
            socket.create_connection((addr, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not listening on {addr}:{port} after {timeout}s")
            time.sleep(0.05)


def wait_ready_line(proc: subprocess.Popen[bytes], procs: Processes, name: str,
                    timeout: float = 15.0) -> None:
    """Wait for the process to print "ready" on stdout."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            if line.strip() == b"ready":
                return
            if not line:  # EOF: it exited
                break
    proc.poll()
    raise RuntimeError(f"{name} did not become ready (exit {proc.returncode}): "
                       f"{procs.stderr_tail(name)}")


# ------------------------------------------------------------------- configuration


def backend_conf(tmp: pathlib.Path, backends: Sequence[tuple[str, int]] = BACKENDS,
                 direct: tuple[str, int] = DIRECT, name: str = "backends") -> str:
    """Three server blocks on one nginx worker; backend 1 also listens on ``direct``."""
    servers = []
    for i, (addr, port) in enumerate(backends):
        listens = [f"listen {addr}:{port} backlog=4096;"]
        if i == 0:
            listens.append(f"listen {direct[0]}:{direct[1]} backlog=4096;")
        servers.append(f"""
        server {{
            {' '.join(listens)}
            location / {{ return 200 "ok\\n"; }}
            location = /bulk {{ alias {tmp}/bulk.bin; default_type application/octet-stream; }}
        }}""")
    return f"""
worker_processes 1;
worker_rlimit_nofile 65536;
daemon off;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}.error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    default_type text/plain;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    {''.join(servers)}
}}
"""


def haproxy_maxconn() -> int:
    """As high as the descriptor limit allows: HAProxy refuses to start if maxconn needs more
    descriptors (two per proxied connection) than it may open."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return min(100_000, (hard - 200) // 2)


def haproxy_conf(tmp: pathlib.Path, listen: tuple[str, int], threads: int = 1) -> str:
    servers = "\n".join(f"    server b{i} {a}:{p}" for i, (a, p) in enumerate(BACKENDS, 1))
    maxconn = haproxy_maxconn()
    return f"""
global
    nbthread {threads}
    maxconn {maxconn}
    pidfile {tmp}/haproxy-{listen[1]}.pid
defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend mesh
    bind {listen[0]}:{listen[1]}
    default_backend backends
backend backends
    balance roundrobin
    source {listen[0]}
{servers}
"""


def nginx_stream_conf(tmp: pathlib.Path, listen: tuple[str, int]) -> str:
    module = f"load_module {STREAM_MODULE};" if nginx_stream_needs_module() else ""
    servers = "\n".join(f"        server {a}:{p};" for a, p in BACKENDS)
    return f"""
{module}
worker_processes 1;
worker_rlimit_nofile 65536;
daemon off;
pid {tmp}/stream.pid;
error_log {tmp}/stream.error.log warn;
events {{ worker_connections 16384; }}
stream {{
    upstream backends {{
{servers}
    }}
    server {{
        listen {listen[0]}:{listen[1]} backlog=4096;
        proxy_pass backends;
        proxy_bind {listen[0]};
    }}
}}
"""


# --------------------------------------------------------------------------- paths


@dataclass
class Path:
    """One way from the load generator to the backends."""

    key: str  # short name used in ratios ("direct", "haproxy")
    label: str  # row label
    addr: str
    port: int
    skipped: str = ""  # why this path was not measured ("" = it was)
    pid: int | None = None  # the proxy process (for memory figures)
    pids: list[int] = dataclasses.field(default_factory=list)  # all of its processes
    netns: str | None = None  # run the load generator inside this network namespace
    extra_refs: tuple[str, ...] = ()  # more paths to show ratios to (besides direct, haproxy)

    @property
    def url(self) -> str:
        return f"http://{self.addr}:{self.port}/"


@dataclass
class Results:
    keepalive_rps: float | None = None
    newconn_rps: float | None = None
    p50_s: float | None = None
    p99_s: float | None = None
    bulk_mbps: float | None = None
    # CPU time (user + system) of the proxy's processes per request, µs (proxies only).
    keepalive_cpu_us: float | None = None
    newconn_cpu_us: float | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


def start_backends(procs: Processes, tmp: pathlib.Path) -> None:
    with open(tmp / "bulk.bin", "wb") as f:  # real bytes, not a sparse file
        chunk = os.urandom(1024 * 1024)
        for _ in range(BULK_BYTES // len(chunk)):
            f.write(chunk)
    (tmp / "bulk.bin").chmod(0o644)
    conf = tmp / "backends.conf"
    conf.write_text(backend_conf(tmp))
    proc = procs.start("backends", ["nginx", "-p", f"{tmp}/", "-c", str(conf),
                                    "-e", str(tmp / "backends.error.log")])
    for addr, port in [*BACKENDS, DIRECT]:
        wait_listening(addr, port, proc, procs, "backends")


def start_mesh(procs: Processes, path: Path, workers: int = 1,
               script: str = "mesh_proxy.py") -> None:
    """One mesh process, or `workers` of them sharing the port (corral --mesh-workers);
    `script` floor_proxy.py for the Python floor row."""
    argv = [sys.executable, str(HERE / script), f"{path.addr}:{path.port}",
            *(f"{a}:{p}" for a, p in BACKENDS)]
    if workers > 1:
        argv.append("--reuse-port")
    for i in range(workers):
        name = path.key if workers == 1 else f"{path.key}{path.port}-{i}"
        proc = procs.start(name, argv, stdout=subprocess.PIPE)
        wait_ready_line(proc, procs, name)
        if i == 0:
            path.pid = proc.pid
        path.pids.append(proc.pid)


def start_haproxy(procs: Processes, tmp: pathlib.Path, path: Path, threads: int = 1) -> None:
    conf = tmp / f"haproxy-{path.port}.cfg"
    conf.write_text(haproxy_conf(tmp, (path.addr, path.port), threads))
    name = "haproxy" if threads == 1 else f"haproxy{path.port}"
    proc = procs.start(name, ["haproxy", "-db", "-f", str(conf)])
    wait_listening(path.addr, path.port, proc, procs, name)
    path.pid = proc.pid
    path.pids.append(proc.pid)


def start_nginx_stream(procs: Processes, tmp: pathlib.Path, path: Path) -> None:
    conf = tmp / "stream.conf"
    conf.write_text(nginx_stream_conf(tmp, (path.addr, path.port)))
    proc = procs.start("stream", ["nginx", "-p", f"{tmp}/", "-c", str(conf),
                                  "-e", str(tmp / "stream.error.log")])
    wait_listening(path.addr, path.port, proc, procs, "stream")
    path.pid = proc.pid
    path.pids.append(proc.pid)  # the master, leading its worker's process group


# ------------------------------------------------------------- the kernel (nft) path


class BenchNetns:
    """The kernel rows' throwaway namespaces (the node, a task namespace and a client
    namespace, joined by veth pairs); :meth:`delete` removes them all."""

    def __init__(self) -> None:
        self.name = f"corral-bench-{secrets.token_hex(4)}"
        self.tasks = f"{self.name}-t"  # the tasks' namespace, behind a veth pair
        self.client = f"{self.name}-c"  # another host's, behind a second one
        self.created = False

    def _ip(self, *args: str) -> None:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
        if done.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")

    def create(self) -> None:
        self._ip("netns", "add", self.name)
        self.created = True
        self._ip("-n", self.name, "link", "set", "lo", "up")
        for addr in {NS_NODE[0], *(a for a, _ in NS_BACKENDS), NS_DIRECT[0]}:
            self._ip("-n", self.name, "addr", "add", f"{addr}/32", "dev", "lo")
        self._ip("netns", "add", self.tasks)
        self._ip("-n", self.tasks, "link", "set", "lo", "up")
        self._ip("-n", self.name, "link", "add", "veth0", "type", "veth",
                 "peer", "name", "veth1", "netns", self.tasks)
        self._ip("-n", self.name, "addr", "add", f"{NS_LINK[0]}/{NS_LINK[1]}", "dev", "veth0")
        for addr in (*(a for a, _ in NS_TASK_BACKENDS), NS_TASK_DIRECT[0]):
            self._ip("-n", self.tasks, "addr", "add", f"{addr}/{NS_LINK[1]}", "dev", "veth1")
        self._ip("-n", self.name, "link", "set", "veth0", "up")
        self._ip("-n", self.tasks, "link", "set", "veth1", "up")
        node, client, bits = NS_CLIENT_LINK
        self._ip("netns", "add", self.client)
        self._ip("-n", self.client, "link", "set", "lo", "up")
        self._ip("-n", self.name, "link", "add", "veth2", "type", "veth",
                 "peer", "name", "veth3", "netns", self.client)
        self._ip("-n", self.name, "addr", "add", f"{node}/{bits}", "dev", "veth2")
        self._ip("-n", self.client, "addr", "add", f"{client}/{bits}", "dev", "veth3")
        self._ip("-n", self.name, "link", "set", "veth2", "up")
        self._ip("-n", self.client, "link", "set", "veth3", "up")
        self._ip("-n", self.client, "route", "add", "default", "via", node)
        # Direct traffic from the client reaches a task unchanged: the task answers it through
        # the node (balanced traffic comes masqueraded, from the node's end of the link).
        self._ip("-n", self.tasks, "route", "add", f"{client}/32", "via", NS_LINK[0])
        # The node routes between the two links (in its own namespace only).
        done = subprocess.run(in_netns(self.name, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]),
                              capture_output=True, text=True, timeout=10)
        if done.returncode != 0:
            raise RuntimeError(f"cannot turn forwarding on in {self.name}: {done.stderr.strip()}")

    def set_ct_time_wait(self, seconds: int) -> str:
        """Conntrack's TCP TIME_WAIT timeout in the namespace; returns a note if refused."""
        done = subprocess.run(in_netns(self.name, [
            "sysctl", "-q", "-w", f"net.netfilter.nf_conntrack_tcp_timeout_time_wait={seconds}"]),
            capture_output=True, text=True, timeout=10)
        if done.returncode != 0:
            return ("could not shorten conntrack's TIME_WAIT timeout in the namespace "
                    f"({done.stderr.strip()[-120:]}): new-connection runs may fill the table")
        return ""

    def delete(self) -> None:
        if not self.created:
            return
        for name in (self.client, self.tasks, self.name):
            try:
                # Anything still running in there is ours (nginx, wrk, curl): kill it by pid.
                pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                                      text=True, timeout=10).stdout.split()
                for pid in pids:
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except (ProcessLookupError, ValueError):
                        pass
                # Deleting a namespace also removes its links, nft table and conntrack entries.
                subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
            except subprocess.TimeoutExpired:  # go on with the others
                print(f"dataplane bench: could not remove namespace {name}", file=sys.stderr)
        self.created = False


def wait_listening_netns(netns: str, addr: str, port: int, proc: subprocess.Popen[bytes],
                         procs: Processes, name: str, timeout: float = 10.0) -> None:
    """:func:`wait_listening` for an address inside ``netns`` (an HTTP GET with curl)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}: {procs.stderr_tail(name)}")
        done = subprocess.run(in_netns(netns, ["curl", "-s", "-m", "1", f"http://{addr}:{port}/"]),
                              capture_output=True, text=True, timeout=10)
        if done.returncode == 0 and done.stdout == "ok\n":
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: no answer from {addr}:{port} in {netns} after {timeout}s")
        time.sleep(0.1)


def start_ns_backends(procs: Processes, tmp: pathlib.Path, name: str, netns: str,
                      backends: Sequence[tuple[str, int]], direct: tuple[str, int], *,
                      probe_from: str) -> subprocess.Popen[bytes]:
    """An nginx like the root namespace's backends, in ``netns``, answering from ``probe_from``."""
    conf = tmp / f"{name}.conf"
    conf.write_text(backend_conf(tmp, backends, direct, name))
    proc = procs.start(name, in_netns(netns, [
        "nginx", "-p", f"{tmp}/", "-c", str(conf), "-e", str(tmp / f"{name}.error.log")]))
    for addr, port in [*backends, direct]:
        wait_listening_netns(probe_from, addr, port, proc, procs, name)
    return proc


def start_kernel_paths(procs: Processes, tmp: pathlib.Path, ns: BenchNetns) -> list[str]:
    """Namespace, its own backends, corral's ingress table; returns notes. Raises if unusable."""
    if os.geteuid() != 0:
        raise RuntimeError("needs root (network namespace, nftables)")
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not installed")
    ns.create()
    notes = [note for note in [ns.set_ct_time_wait(NS_CT_TIME_WAIT)] if note]
    proc = start_ns_backends(procs, tmp, "ns-backends", ns.name, NS_BACKENDS, NS_DIRECT,
                             probe_from=ns.name)
    tasks = start_ns_backends(procs, tmp, "ns-tasks", ns.tasks, NS_TASK_BACKENDS,
                              NS_TASK_DIRECT, probe_from=ns.client)
    # corral's own kernel fast path, exactly as a node renders and applies it.
    rules = [IngressRule(NS_NODE[1], "tcp", tuple(NS_BACKENDS)),
             IngressRule(NS_TASK_PORT, "tcp", tuple(NS_TASK_BACKENDS))]
    try:
        nft_apply(render_ingress_table(NS_NODE[0], rules), netns=ns.name)
    except NftError as exc:
        raise RuntimeError(f"nft refused corral's ingress table: {exc}") from exc
    wait_listening_netns(ns.name, *NS_NODE, proc, procs, "ns-backends")
    wait_listening_netns(ns.client, NS_NODE[0], NS_TASK_PORT, tasks, procs, "ns-tasks")
    return notes


# --------------------------------------------------------------------------- loads


@dataclass
class WrkRun:
    rps: float
    requests: int  # completed, as wrk counted them
    p50_s: float | None
    p99_s: float | None
    problems: str  # socket errors / non-2xx responses, "" when clean


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _duration(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if m is None:
        raise ValueError(f"unparsable wrk duration {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def in_netns(netns: str | None, argv: Sequence[str]) -> list[str]:
    """``argv``, run inside ``netns`` when given (``ip netns exec`` execs it, same pid)."""
    return ["ip", "netns", "exec", netns, *argv] if netns else list(argv)


def run_wrk(url: str, seconds: float, headers: Sequence[str] = (),
            netns: str | None = None) -> WrkRun:
    argv = ["wrk", f"-t{WRK_THREADS}", f"-c{WRK_CONNECTIONS}", f"-d{seconds:g}s", "--latency",
            "--timeout", "5s"]
    for header in headers:
        argv += ["-H", header]
    out = subprocess.run(in_netns(netns, [*argv, url]), capture_output=True, text=True,
                         timeout=seconds + 30).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rps is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.MULTILINE))
    problems = [line.strip() for line in out.splitlines()
                if line.strip().startswith(("Socket errors", "Non-2xx"))]
    done = re.search(r"(\d+) requests in", out)
    return WrkRun(rps=float(rps.group(1)), requests=int(done.group(1)) if done else 0,
                  p50_s=_duration(pct["50"]) if "50" in pct else None,
                  p99_s=_duration(pct["99"]) if "99" in pct else None,
                  problems="; ".join(problems))


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of the process groups these processes lead (every process is
    started in a session of its own: see Processes), all threads included — so nginx's worker
    counts with its master."""
    groups, ticks = set(pids), 0
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone
            continue
        if int(fields[2]) in groups:  # the process group
            ticks += int(fields[11]) + int(fields[12])
    return ticks / _CLK_TCK


def measured_wrk(path: Path, seconds: float, headers: Sequence[str] = ()
                 ) -> tuple[WrkRun, float | None]:
    """A wrk run, and the CPU µs the path's processes spent per request during it."""
    before = cpu_seconds(path.pids)
    run = run_wrk(path.url, seconds, headers, netns=path.netns)
    if not path.pids or not run.requests:
        return run, None
    return run, (cpu_seconds(path.pids) - before) / run.requests * 1e6


def keepalive(path: Path, seconds: float, res: Results) -> str:
    run_wrk(path.url, 1, netns=path.netns)  # warm-up: caches, connection pools, the allocator
    run, res.keepalive_cpu_us = measured_wrk(path, seconds)
    res.keepalive_rps, res.p50_s, res.p99_s = run.rps, run.p50_s, run.p99_s
    if run.problems:
        res.notes.append(f"keep-alive: {run.problems}")
    return f"{fmt_rate(run.rps)} req/s, p50 {fmt_latency(run.p50_s)}, p99 {fmt_latency(run.p99_s)}"


def new_connection(path: Path, seconds: float, res: Results) -> str:
    run, res.newconn_cpu_us = measured_wrk(path, seconds, ["Connection: close"])
    res.newconn_rps = run.rps
    if run.problems:
        res.notes.append(f"new-conn: {run.problems}")
    return f"{fmt_rate(run.rps)} req/s"


def bulk(path: Path, seconds: float, res: Results) -> str:
    """Best of BULK_RUNS single 100 MB downloads with curl."""
    best = 0.0
    for _ in range(BULK_RUNS):
        out = subprocess.run(
            in_netns(path.netns, ["curl", "-s", "-o", "/dev/null", "--max-time", "60",
                                  "-w", "%{speed_download} %{size_download}", path.url + "bulk"]),
            capture_output=True, text=True, timeout=90).stdout.split()
        if len(out) != 2 or int(float(out[1])) != BULK_BYTES:
            res.notes.append(f"bulk: short transfer {out}")
            continue
        best = max(best, float(out[0]) / 1e6)
    res.bulk_mbps = best or None
    return f"{best:.0f} MB/s"


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def median_results(runs: Sequence[Results]) -> Results:
    """Each figure's median over the rounds (notes: all of them, once each)."""
    notes = list(dict.fromkeys(n for r in runs for n in r.notes))
    return Results(
        keepalive_rps=_median([r.keepalive_rps for r in runs]),
        newconn_rps=_median([r.newconn_rps for r in runs]),
        p50_s=_median([r.p50_s for r in runs]), p99_s=_median([r.p99_s for r in runs]),
        bulk_mbps=_median([r.bulk_mbps for r in runs]),
        keepalive_cpu_us=_median([r.keepalive_cpu_us for r in runs]),
        newconn_cpu_us=_median([r.newconn_cpu_us for r in runs]), notes=notes)


@dataclass
class Memory:
    held: int  # how many idle connections were held
    idle_kb: int  # fresh process(es), listening, no traffic yet
    before_kb: int  # after a few warm-up requests
    held_kb: int  # with `held` idle connections open
    after_kb: int  # after closing them again
    final_kb: int | None = None  # after all the load runs

    @property
    def kb_per_conn(self) -> float:
        return (self.held_kb - self.before_kb) / self.held


def _request(sock: socket.socket) -> None:
    """One keep-alive request; returns once the whole tiny response is in."""
    sock.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
    data = b""
    while not data.endswith(b"ok\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("connection closed by the mesh before the response")
        data += chunk


def total_rss_kb(pids: Sequence[int]) -> int:
    return sum(rss_kb(pid) for pid in pids)


def fd_limit(pid: int) -> int:
    """The soft RLIMIT_NOFILE of a running process, from /proc/PID/limits."""
    for line in pathlib.Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft = line.split()[3]
            return 1 << 62 if soft == "unlimited" else int(soft)
    raise RuntimeError(f"no open files limit for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def hold_connections(path: Path, count: int) -> Memory:
    """RSS of the proxy idle and while `count` idle keep-alive connections are open.

    Each connection makes one request first, so both its client and upstream sockets exist
    and have carried data, then sits idle. RSS is summed over all the path's processes.
    """
    pids = path.pids
    idle = total_rss_kb(pids)
    for _ in range(20):
        with socket.create_connection((path.addr, path.port), timeout=5) as s:
            _request(s)
    time.sleep(0.2)
    before = total_rss_kb(pids)
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.create_connection((path.addr, path.port), timeout=5)
            socks.append(s)
            _request(s)
        time.sleep(0.5)
        held = total_rss_kb(pids)
    finally:
        for s in socks:
            s.close()
    time.sleep(1.0)
    return Memory(count, idle, before, held, total_rss_kb(pids))


def memory_path(paths: dict[str, Path]) -> Path:
    """The corral mesh that can hold HELD_CONNECTIONS: one process when its descriptor limit
    allows two per connection, else the per-CPU mesh workers (the connections spread over them)."""
    single = paths["corral"]
    assert single.pid is not None
    if fd_limit(single.pid) >= 2 * HELD_CONNECTIONS + FD_SPARE:
        return single
    return paths["corral2"]


def memory_line(label: str, memory: Memory) -> str:
    line = (f"{label} RSS: idle {memory.idle_kb / 1024:.1f} MB, after warm-up "
            f"{memory.before_kb / 1024:.1f} MB, holding {memory.held:,} idle connections "
            f"{memory.held_kb / 1024:.1f} MB → {memory.kb_per_conn:.1f} KB per connection "
            f"(client + upstream socket); after closing them {memory.after_kb / 1024:.1f} MB")
    if memory.final_kb is not None:
        line += f"; after all loads {memory.final_kb / 1024:.1f} MB"
    return line


# -------------------------------------------------------------------------- output


def fmt_rate(v: float | None) -> str:
    if v is None:
        return "—"
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e4:
        return f"{v / 1e3:.0f}k"
    if v >= 1e3:
        return f"{v / 1e3:.1f}k"
    return f"{v:.0f}"


def fmt_latency(v: float | None) -> str:
    if v is None:
        return "—"
    if v < 1e-3:
        return f"{v * 1e6:.0f}µs"
    if v < 1:
        return f"{v * 1e3:.2f}ms"
    return f"{v:.2f}s"


def fmt_mbps(v: float | None) -> str:
    return "—" if v is None else f"{v:.0f}"


COLUMNS: list[tuple[str, Callable[[Results], float | None], Callable[[float | None], str]]] = [
    ("keep-alive req/s", lambda r: r.keepalive_rps, fmt_rate),
    ("new-conn req/s", lambda r: r.newconn_rps, fmt_rate),
    ("p50 (keep-alive)", lambda r: r.p50_s, fmt_latency),
    ("p99 (keep-alive)", lambda r: r.p99_s, fmt_latency),
    ("bulk MB/s", lambda r: r.bulk_mbps, fmt_mbps),
]


def fmt_us(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f} µs"


# The proxies' own cost, steadier than their rates when wrk, the backends and the proxy share
# a few CPUs (lower is better).
CPU_COLUMNS: list[tuple[str, Callable[[Results], float | None], Callable[[float | None], str]]] = [
    ("CPU per keep-alive request", lambda r: r.keepalive_cpu_us, fmt_us),
    ("CPU per new connection", lambda r: r.newconn_cpu_us, fmt_us),
]


def paired_ratio(rounds: Sequence[Results], ref_rounds: Sequence[Results],
                 get: Callable[[Results], float | None]) -> float | None:
    """The median over rounds of this round's figure / the reference's figure in that round
    (run back to back, so the ratio sees the same background load; see RUN_ORDER)."""
    ratios = []
    for res, ref in zip(rounds, ref_rounds):
        value, ref_value = get(res), get(ref)
        if value is not None and ref_value:
            ratios.append(value / ref_value)
    return statistics.median(ratios) if ratios else None


def render_table(paths: Sequence[Path], results: dict[str, Results],
                 rounds: dict[str, list[Results]],
                 references: Sequence[str] = ("direct", "haproxy"),
                 columns: Sequence[tuple[str, Callable[[Results], float | None],
                                         Callable[[float | None], str]]] = COLUMNS) -> str:
    """Rows = paths; each cell = the median figure (the median ratio to each reference path)."""
    header = ["path", *(name for name, _, _ in columns)]
    rows = []
    for path in paths:
        if path.skipped:  # the reason is printed below the table
            rows.append([path.label, *(["skipped"] * len(columns))])
            continue
        res = results[path.key]
        row = [path.label]
        for _, get, fmt in columns:
            value = get(res)
            ratios = []
            for ref in (*references, *path.extra_refs):
                if ref == path.key or ref not in rounds or value is None:
                    continue
                ratio = paired_ratio(rounds[path.key], rounds[ref], get)
                if ratio is not None:
                    ratios.append(f"{ratio:.2f}× {ref}")
            row.append(fmt(value) + (f" ({', '.join(ratios)})" if ratios else ""))
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def kernel_note(ns: BenchNetns) -> str:
    first, last = NS_BACKENDS[0][0], NS_BACKENDS[-1][0].rsplit(".", 1)[1]
    tfirst, tlast = NS_TASK_BACKENDS[0][0], NS_TASK_BACKENDS[-1][0].rsplit(".", 1)[1]
    return (f"note: the kernel rows use corral's render_ingress_table() (numgen round-robin "
            f"DNAT, masquerade) in the throwaway namespace {ns.name}, the node; conntrack is "
            f"on there for every row. 'corral kernel (nftables)': wrk and curl on the node "
            f"itself (the nat output hook) to {NS_NODE[0]}:{NS_NODE[1]}, backends on its "
            f"loopback (an nginx with 1 worker on {first}-{last}:{NS_BACKENDS[0][1]}): the "
            f"setup of the issue's reference figures; '× ns-direct' compares it with wrk on "
            f"the node straight to backend 1. 'corral kernel: another host → tasks': wrk and "
            f"curl in {ns.client}, behind a veth pair, to {NS_NODE[0]}:{NS_TASK_PORT} "
            f"(prerouting, forwarding), backends in {ns.tasks} behind another one ({tfirst}-"
            f"{tlast}, another such nginx), as a node's ingress reaches the netns runtime's "
            f"tasks (the only runtime with the kernel mesh); '× task-direct' compares it with "
            f"that host's traffic routed by the node straight to a task. Their 'direct'/"
            f"'haproxy' ratios cross into the root namespace's run (other backend processes, "
            f"same load generator settings).")


def print_memory(paths: dict[str, Path], mem_path: Path, memory: Memory,
                 haproxy_memory: Memory | None) -> None:
    print(memory_line(mem_path.label, memory))
    if mem_path.key != "corral":
        print(f"note: one process may open {fd_limit(paths['corral'].pid or 0):,} files "
              f"(the hard limit here; raising it needs CAP_SYS_RESOURCE), two per proxied "
              f"connection: the memory run used the {len(mem_path.pids)} mesh workers, RSS summed")
    if haproxy_memory is not None:
        print(memory_line("HAProxy", haproxy_memory))


# ---------------------------------------------------------------------------- main


# The order paths run in, within each load of a round: the paths each figure is compared with
# run right next to it (each kernel row after its direct path, each mesh row after its HAProxy
# and before the floor), so a ratio sees the same background load. Every other round runs the
# list backwards, so neither side of a pair always goes first.
RUN_ORDER = ["direct", "ns-direct", "kernel", "task-direct", "kernel-tasks", "haproxy", "corral",
             "floor", "nginx", "haproxy2", "corral2"]

LOADS: list[tuple[str, Callable[[Path, float, Results], str]]] = [
    ("keep-alive", keepalive),
    ("new connection per request", new_connection),
    ("bulk 100 MB", bulk),
]


def run(seconds: float, memory_only: bool = False, repeat: int = 3,
        only: Sequence[str] = ()) -> int:
    notes = ensure_tools()
    for tool in ("wrk", "curl", "nginx"):
        if shutil.which(tool) is None:
            print(f"dataplane bench: cannot run without {tool}. " + "; ".join(notes))
            return 1
    # Holding 10,000 connections needs more descriptors than the usual soft limit of 1,024.
    soft, _ = raise_nofile_limit()
    if soft < HELD_CONNECTIONS + FD_SPARE:
        print(f"dataplane bench: needs {HELD_CONNECTIONS + FD_SPARE:,} open files to hold "
              f"{HELD_CONNECTIONS:,} connections, the limit here is {soft:,}")
        return 1

    ns = BenchNetns()
    paths = [
        Path("direct", "direct (1 backend)", *DIRECT),
        Path("ns-direct", "direct in netns (1 backend)", *NS_DIRECT, netns=ns.name),
        Path("corral", "corral mesh (uvloop)", "127.0.0.90", 19090, extra_refs=("floor",)),
        Path("corral2", f"corral mesh, {CORES} workers (default)", "127.0.0.93", 19093,
             extra_refs=("haproxy2",)),
        Path("kernel", "corral kernel (nftables)", *NS_NODE, netns=ns.name,
             extra_refs=("ns-direct",)),
        Path("task-direct", "another host → a task, routed (1 backend)", *NS_TASK_DIRECT,
             netns=ns.client),
        Path("kernel-tasks", "corral kernel: another host → tasks", NS_NODE[0], NS_TASK_PORT,
             netns=ns.client, extra_refs=("task-direct",)),
        Path("haproxy", "HAProxy mode tcp", "127.0.0.91", 19091),
        Path("haproxy2", f"HAProxy, {CORES} threads (default)", "127.0.0.94", 19094),
        Path("nginx", "nginx stream", "127.0.0.92", 19092),
        Path("floor", "Python floor (bare epoll, no features)", "127.0.0.96", 19096),
    ]
    by_key = {p.key: p for p in paths}
    if only:  # (names checked by main)
        # The chosen paths and the ones their own ratios need (× floor, × ns-direct, …).
        chosen = {*only, *(ref for key in only for ref in by_key[key].extra_refs)}
        for path in paths:
            if path.key not in chosen:
                path.skipped = "not chosen (--only)"
    if shutil.which("haproxy") is None:
        by_key["haproxy"].skipped = by_key["haproxy2"].skipped = "haproxy not installed"
    if not nginx_stream_available():
        by_key["nginx"].skipped = "nginx stream module not installed"

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="corral-dataplane-"))
    tmp.chmod(0o755)  # nginx workers run as nobody and must read bulk.bin
    procs = Processes(tmp)
    try:
        load_at_start = os.getloadavg()[0]
        log(f"load average {load_at_start:.2f} on {os.cpu_count()} CPUs; "
            f"starting backends and proxies in {tmp}")
        start_backends(procs, tmp)
        start_mesh(procs, by_key["corral"])
        start_mesh(procs, by_key["corral2"], workers=CORES)
        start_mesh(procs, by_key["floor"], script="floor_proxy.py")
        starters: list[tuple[str, Callable[[Processes, pathlib.Path, Path], None]]] = [
            ("haproxy", start_haproxy),
            ("haproxy2", lambda procs, tmp, path: start_haproxy(procs, tmp, path, CORES)),
            ("nginx", start_nginx_stream)]
        for key, starter in starters:
            path = by_key[key]
            if path.skipped:
                continue
            try:
                starter(procs, tmp, path)
            except RuntimeError as exc:
                lines = str(exc).strip().splitlines()  # the last line says why (ALERT/emerg)
                path.skipped = f"did not start: {lines[-1].strip()[-160:] if lines else exc}"
        kernel_rows = [by_key[key] for key in ("ns-direct", "kernel", "task-direct",
                                                 "kernel-tasks") if not by_key[key].skipped]
        if kernel_rows:
            log(f"kernel rows: namespaces {ns.name}(-t, -c), corral's ingress table…")
            try:
                notes += start_kernel_paths(procs, tmp, ns)
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                lines = str(exc).strip().splitlines()
                for path in kernel_rows:
                    path.skipped = lines[-1].strip()[-200:] if lines else repr(exc)

        # Memory first, on the fresh mesh process, before the load runs grow its heap.
        mem_path = memory_path(by_key)
        memory: Memory | None = None
        if not only or memory_only:
            log(f"mesh memory: holding {HELD_CONNECTIONS:,} idle connections through "
                f"{mem_path.label}…")
            memory = hold_connections(mem_path, HELD_CONNECTIONS)
        haproxy_memory = None
        if memory is not None and not by_key["haproxy"].skipped:
            # HAProxy gets as many as its maxconn allows (its descriptor limit is ours).
            count = min(HELD_CONNECTIONS, haproxy_maxconn() - FD_SPARE)
            log(f"HAProxy memory: holding {count:,} idle connections…")
            haproxy_memory = hold_connections(by_key["haproxy"], count)

        if memory_only:
            assert memory is not None
            print_memory(by_key, mem_path, memory, haproxy_memory)
            return 0
        live = [p for p in paths if not p.skipped]
        runs: dict[str, list[Results]] = {p.key: [] for p in live}
        # One load kind across all paths back to back, so the paths see similar background
        # load; the whole sequence `repeat` times, and each figure is the median of its runs.
        ordered = sorted(live, key=lambda p: RUN_ORDER.index(p.key))
        for rep in range(repeat):
            reps = {p.key: Results() for p in live}
            for load_name, load in LOADS:
                for path in (ordered if rep % 2 == 0 else ordered[::-1]):
                    summary = load(path, seconds, reps[path.key])
                    log(f"  [{rep + 1}/{repeat}] {load_name:<28} {path.label:<42} {summary}")
                    time.sleep(0.5)
            for key, res in reps.items():
                runs[key].append(res)
        results = {key: median_results(rs) for key, rs in runs.items()}
        if memory is not None:
            memory.final_kb = total_rss_kb(mem_path.pids)

        print()
        print(f"wrk {WRK_THREADS} threads, {WRK_CONNECTIONS} connections, {seconds:g}s per run; "
              f"bulk = best of {BULK_RUNS} curl downloads of 100 MiB; each figure the median "
              f"of {repeat} rounds, each ratio the median of the rounds' ratios (compared "
              f"paths run back to back); {CORES} CPUs; load average at start "
              f"{load_at_start:.2f}, at the end {os.getloadavg()[0]:.2f}")
        print(f"{version(['haproxy', '-v'])}; {version(['nginx', '-v'])}; "
              f"{version(['nft', '--version'])}; kernel {os.uname().release}")
        print(render_table(paths, results, runs))
        proxies = [p for p in paths if p.pids and not p.skipped]
        if proxies:
            print()
            print("CPU time (user + system) of each proxy's processes per request, from /proc "
                  "(lower is better):")
            print(render_table(proxies, results, runs, ("haproxy",), CPU_COLUMNS))
        if any(not by_key[key].skipped for key in ("kernel", "kernel-tasks")):
            print(kernel_note(ns))
        if memory is not None:
            print_memory(by_key, mem_path, memory, haproxy_memory)
        for path in paths:
            if path.skipped:
                print(f"note: {path.label} skipped: {path.skipped}")
        for path in live:
            for note in results[path.key].notes:
                print(f"note: {path.label}: {note}")
        for note in notes:
            print(f"note: {note}")
        return 0
    finally:
        try:
            procs.stop_all()
        finally:
            try:
                ns.delete()
            finally:
                shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="duration of each wrk measurement (default 5)")
    parser.add_argument("--memory-only", action="store_true",
                        help="only the memory run (no load runs)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of all loads over all paths; figures are medians (default 3)")
    parser.add_argument("--only", default="", metavar="PATHS",
                        help="measure only these paths (comma-separated: "
                             f"{', '.join(RUN_ORDER)}) and the ones their own ratios need "
                             "(× floor, × ns-direct, …; name direct or haproxy to get those); "
                             "no memory run. E.g. --only kernel,kernel-tasks --repeat 10")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    only = [key.strip() for key in args.only.split(",") if key.strip()]
    unknown = sorted(set(only) - set(RUN_ORDER))
    if unknown:
        parser.error(f"--only: no path named {', '.join(unknown)} "
                     f"(paths: {', '.join(RUN_ORDER)})")
    if only and args.memory_only:
        parser.error("--only and --memory-only exclude each other (the memory run needs "
                     "the mesh and HAProxy)")
    # SIGTERM unwinds like Ctrl-C, so the finally block cleans up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return run(args.seconds, args.memory_only, args.repeat, only)
    except KeyboardInterrupt:  # run() has already cleaned up in its finally block
        log("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
