"""A narrow, typed wrapper over iproute2 (``ip``, ``bridge``) for the links a corral node needs.

Each overlay network on a node is a Linux bridge holding the node's own IP on
that network plus a VXLAN device (one VNI per network, learning off, proxy ARP
on, UDP 4789, ``local`` = the node's underlay address) enslaved to it. Remote
tasks are reached through static FDB entries (task MAC -> remote node underlay
IP) and permanent neighbour entries (task IP -> task MAC) on the VXLAN device:
no multicast, no flooding. Task MACs derive from task IPs like Docker's
(``02:42`` + the four IPv4 bytes), so a node can program remote tasks knowing
only their IPs and nodes.

Everything here operates on the *current* network namespace (the daemon runs
inside its node's namespace); task namespaces are configured from outside with
``ip -n NETNS``, never by entering them from this process.

Why commands and not a netlink library: pyroute2 cost the daemon ~9 MB
resident (its package imports every netlink family, and its synchronous API
needs a private asyncio loop on a thread of its own), while these calls are
rare (a network or task changes, not a packet). So each step is one ``ip`` or
``bridge`` process (a few ms), steps that go together share one
``-batch -``, reads use ``-json``, and link lookups in the current namespace
are ``if_nametoindex`` (no process). Every name, address and MAC is validated
before a command line is built; commands are argument lists (never a shell),
and batch lines hold only tokens from a character set the batch reader takes
literally.

Named namespaces are bind mounts under ``/run/netns``. A process started with
``ip netns exec NODE`` lives in a private *mount* namespace whose mounts are
slaves of the host's, so namespaces it creates (``ip netns add``) are
invisible outside it and die with it. A daemon that creates task namespaces
must share the host mount namespace: start it with
``nsenter --net=/run/netns/NODE ...`` (network namespace only).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

__all__ = [
    "HostNetwork",
    "Netlink",
    "NetlinkError",
    "NETNS_RUN_DIR",
    "VXLAN_MTU",
    "delete_netns",
    "mac_for_ip",
    "netns_exists",
    "valid_netns_name",
]

NETNS_RUN_DIR = "/var/run/netns"  # where iproute2 binds named namespaces
#: MTU for VXLAN devices and task veths: 1500 underlay minus 50 bytes of VXLAN/UDP/IP/Ethernet.
VXLAN_MTU = 1450
IFNAMSIZ = 15
COMMAND_TIMEOUT = 30.0  # seconds; an iproute2 command takes milliseconds

# Names: what the kernel accepts minus what iproute2 could read as something else ('%' is a
# kernel name template, quotes, '#' and '\' mean something to `-batch`).
_IFNAME = re.compile(r"[A-Za-z0-9_.+-]{1,%d}" % IFNAMSIZ)
_NETNS_NAME = re.compile(r"[A-Za-z0-9_.+-]{1,255}")
# Every token of a batch line (keywords, names, addresses, MACs, numbers) must match this:
# `-batch` splits on whitespace and treats quotes, '#' and '\' specially.
_BATCH_TOKEN = re.compile(r"[A-Za-z0-9_.:/+-]+")
# iproute2's batch mode names each failed line after that line's messages.
_BATCH_FAILED = re.compile(r"Command failed (?:-|.*):(\d+)")
# iproute2 reports a missing device in its own words before asking the kernel anything.
_NO_DEVICE = re.compile(r"Cannot find device|[Dd]evice .*does not exist")


# ---------------------------------------------------------------- helpers


class NetlinkError(OSError):
    """An ``ip``/``bridge`` command failed; ``code`` is the errno its message names (0 if none)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)

    @property
    def code(self) -> int:
        """The errno (like ``pyroute2.NetlinkError.code``), 0 if iproute2 named none."""
        return self.errno or 0

    def __str__(self) -> str:
        """``[Errno N] message``, or just the message when iproute2 named no errno."""
        return super().__str__() if self.code else str(self.strerror)


def mac_for_ip(ip: str) -> str:
    """Docker-style MAC for an IPv4 address: ``"10.97.0.5"`` -> ``"02:42:0a:61:00:05"``."""
    addr = ipaddress.ip_address(ip)
    if not isinstance(addr, ipaddress.IPv4Address):
        raise ValueError(f"mac_for_ip needs an IPv4 address, got {ip!r}")
    return "02:42:" + ":".join(f"{b:02x}" for b in addr.packed)


def valid_netns_name(name: str) -> bool:
    """Whether ``name`` is a namespace name this module works with (a plain, safe file name)."""
    return bool(_NETNS_NAME.fullmatch(name)) and name not in (".", "..")


def _check_netns_name(name: str) -> None:
    """Refuse a namespace name that is not a plain file name of safe characters."""
    if not valid_netns_name(name):
        raise ValueError(f"invalid network namespace name {name!r} (letters, digits, '_.+-')")


def _check_ifname(name: str) -> None:
    """Refuse an interface name the kernel or iproute2 would not take literally."""
    if not _IFNAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"invalid interface name {name!r} (1 to {IFNAMSIZ} letters, digits, '_.+-')")


def _netns_path(name: str) -> str:
    """The bind-mount path of a named namespace."""
    _check_netns_name(name)
    return os.path.join(NETNS_RUN_DIR, name)


def _netns_mounted(path: str) -> bool:
    """True if ``path`` is a bound namespace (not a leftover empty file from a failed create)."""
    try:
        st = os.stat(path)
        parent = os.stat(os.path.dirname(path))
    except OSError:
        return False
    return st.st_dev != parent.st_dev


def _errno_of(message: str) -> int:
    """The errno an iproute2 error message names (the longest strerror text in it), else 0."""
    if _NO_DEVICE.search(message):
        return errno.ENODEV
    # Longest match wins: "No such device or address" (ENXIO) also contains "No such device".
    found = [(len(os.strerror(code)), code) for code in errno.errorcode
             if os.strerror(code) in message]
    return max(found)[1] if found else 0


def _oneline(stderr: str) -> str:
    """A command's stderr on one line."""
    return "; ".join(line.strip() for line in stderr.splitlines() if line.strip()) or "failed"


def _exec(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (no shell), English messages so :func:`_errno_of` can read them."""
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False,
                              timeout=COMMAND_TIMEOUT, env={**os.environ, "LC_ALL": "C"})
    except subprocess.TimeoutExpired:
        raise NetlinkError(errno.ETIMEDOUT, f"{' '.join(argv)}: no answer in "
                                            f"{COMMAND_TIMEOUT:.0f}s") from None


def _cmd(argv: list[str]) -> str:
    """Run one command; its stdout, or :class:`NetlinkError` with its message and errno."""
    proc = _exec(argv)
    if proc.returncode != 0:
        raise NetlinkError(_errno_of(proc.stderr), f"{' '.join(argv)}: {_oneline(proc.stderr)}")
    return proc.stdout


def _json(argv: list[str]) -> list[dict[str, Any]]:
    """Run a ``-json`` read; its list of objects (iproute2 prints nothing for none)."""
    out = _cmd(argv).strip()
    data = json.loads(out) if out else []
    if not isinstance(data, list):
        raise NetlinkError(errno.EPROTO, f"{' '.join(argv)}: expected a JSON list")
    return [d for d in data if isinstance(d, dict)]


def _batch(tool: str, lines: list[list[str]], netns: str | None = None,
           tolerate: list[int] | None = None) -> None:
    """Run ``lines`` through one ``tool [-n netns] -batch -``.

    Without ``tolerate`` it stops at the first failing line. With it (one errno per line, 0 for
    none) every line runs (``-force``) and a line may fail with its own errno (EEXIST on an
    append, ENOENT on a delete: the state is already what we want); any other failure raises.
    Not for ``ip neigh``: it exits at its first kernel error, ``-force`` or not.
    """
    if not lines:
        return
    for line in lines:
        bad = [tok for tok in line if not _BATCH_TOKEN.fullmatch(tok)]
        if bad:  # validation should have caught it: never let a batch line be misread
            raise ValueError(f"unsafe {tool} batch token {bad[0]!r}")
    argv = [tool, *(["-n", netns] if netns else []), *(["-force"] if tolerate else []),
            "-batch", "-"]
    proc = _exec(argv, "".join(" ".join(line) + "\n" for line in lines))
    if proc.returncode == 0:
        return
    pending: list[str] = []
    failures: list[tuple[int, str]] = []
    for text in proc.stderr.splitlines():
        if m := _BATCH_FAILED.fullmatch(text.strip()):
            failures.append((int(m[1]), "; ".join(pending)))
            pending = []
        elif text.strip():
            pending.append(text.strip())
    for n, message in failures:
        code = _errno_of(message)
        if 0 < n <= len(lines):
            if tolerate and code and code == tolerate[n - 1]:
                continue
            where = f"{tool} -n {netns}" if netns else tool
            raise NetlinkError(code, f"{where}: {' '.join(lines[n - 1])}: {message or 'failed'}")
        raise NetlinkError(code, f"{' '.join(argv)}: line {n}: {message or 'failed'}")
    # No line named, or messages after the last named one: the tool gave up outside a line
    # (it could not enter the namespace, or a parse error exited mid-batch).
    if pending or not failures:
        stderr = "\n".join(pending) or proc.stderr
        raise NetlinkError(_errno_of(stderr), f"{' '.join(argv)}: {_oneline(stderr)}")


def _link(obj: str, name: str) -> dict[str, Any]:
    """``ip -d -json OBJ show dev NAME``'s entry for exactly ``name`` (``obj``: link or addr)."""
    for entry in _json(["ip", "-d", "-json", obj, "show", "dev", name]):
        # `dev ifN` can resolve to index N: only the entry of that very name counts.
        if entry.get("ifname") == name:
            return entry
    raise NetlinkError(errno.ENODEV, f"no such device: {name}")


def netns_exists(name: str) -> bool:
    """True if the named network namespace exists (``ip netns list`` would show it)."""
    return _netns_mounted(_netns_path(name))


def delete_netns(name: str) -> None:
    """Remove the named network namespace (``ip netns del``); no error if it is missing.

    The namespace itself lives on while processes still run in it; its links are destroyed
    once the last reference goes (a veth destroyed that way takes its peer with it).
    """
    path = _netns_path(name)
    if not os.path.lexists(path):
        return
    try:
        _cmd(["ip", "netns", "del", name])  # unmounts (a stale file is not mounted) and unlinks
    except NetlinkError as exc:
        if exc.code != errno.ENOENT:  # gone meanwhile
            raise


def _create_netns(name: str) -> bool:
    """Create the named namespace if missing (``ip netns add``); True if it was created now."""
    path = _netns_path(name)
    if _netns_mounted(path):
        return False
    if os.path.lexists(path):  # stale mount point left by a crash mid-create
        delete_netns(name)
    try:
        _cmd(["ip", "netns", "add", name])
    except NetlinkError as exc:
        if exc.code != errno.EEXIST or not _netns_mounted(path):
            raise
        return False  # created by someone else meanwhile
    return True


def _norm_ip(ip: str) -> str:
    """An IP address in canonical form (as iproute2 prints it); ValueError if it is none."""
    return str(ipaddress.ip_address(ip))


def _norm_mac(mac: str) -> str:
    """A MAC address as ``aa:bb:cc:dd:ee:ff``; ValueError if it is none."""
    parts = mac.strip().lower().replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) in (1, 2) for p in parts):
        raise ValueError(f"invalid MAC address {mac!r}")
    try:
        return ":".join(f"{int(p, 16):02x}" for p in parts)
    except ValueError:
        raise ValueError(f"invalid MAC address {mac!r}") from None


# ---------------------------------------------------------------- protocol


class HostNetwork(Protocol):
    """What the daemon needs from the host network; :class:`Netlink` is the real one."""

    def close(self) -> None: ...
    def ensure_bridge(self, name: str, addrs: list[str]) -> None: ...
    def ensure_vxlan(self, name: str, vni: int, local: str, bridge: str, port: int = 4789) -> None: ...
    def set_fdb(self, vxlan: str, entries: dict[str, str]) -> None: ...
    def set_neighbours(self, dev: str, entries: dict[str, str]) -> None: ...
    def delete_link(self, name: str) -> None: ...
    def link_exists(self, name: str) -> bool: ...
    def attach_task(self, netns: str, bridge: str, host_if: str, ip_cidr: str,
                    gateway: str | None, mtu: int = 1450, ns_if: str = "eth0") -> str: ...
    def detach_task(self, netns: str, host_if: str) -> None: ...


# ---------------------------------------------------------------- netlink


class Netlink:
    """The links a node needs, set with iproute2's commands; operates in the current namespace.

    Methods are plain blocking calls (a few ms per command; callers run them off the event
    loop with ``asyncio.to_thread``), safe from any thread and serialised by a lock. Errors
    from iproute2 or the kernel surface as :class:`NetlinkError` (``.code`` is an errno); bad
    arguments as :class:`ValueError`, before any command runs.
    """

    def __init__(self) -> None:
        missing = [tool for tool in ("ip", "bridge") if shutil.which(tool) is None]
        if missing:  # fail at start, not at the first network or task
            raise FileNotFoundError(errno.ENOENT, f"iproute2 is needed: no {' or '.join(missing)}"
                                                  " on PATH")
        self._lock = threading.Lock()
        self._closed = False

    # -- plumbing

    @contextmanager
    def _serial(self) -> Iterator[None]:
        """Hold the lock for one public call; refuse calls after :meth:`close`."""
        with self._lock:
            if self._closed:
                raise RuntimeError("Netlink is closed")
            yield

    def close(self) -> None:
        """Refuse further calls (nothing is held open between calls)."""
        with self._lock:
            self._closed = True

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- public API

    def ensure_bridge(self, name: str, addrs: list[str]) -> None:
        """Create bridge ``name`` if missing, set its addresses to exactly ``addrs`` (and its MAC
        to the one :func:`mac_for_ip` gives the first IPv4 one), bring it up.

        ``addrs`` are CIDR strings (``"10.97.2.11/24"``). IPv6 link-local addresses the kernel
        adds itself are left alone.
        """
        _check_ifname(name)
        wanted = {ipaddress.ip_interface(a) for a in addrs}
        with self._serial():
            if self._index(name) is None:
                try:
                    _cmd(["ip", "link", "add", "name", name, "type", "bridge"])
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:
                        raise
            link = _link("addr", name)  # with -d: its kind and its addresses in one read
            kind = (link.get("linkinfo") or {}).get("info_kind")
            if kind != "bridge":
                raise ValueError(f"link {name!r} exists but is a {kind or 'plain'} device, "
                                 "not a bridge")
            have: set[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = set()
            for a in link.get("addr_info", []):
                iface = ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}")
                if iface.version == 6 and iface.ip.is_link_local:
                    continue
                have.add(iface)
            lines = [["addr", "del", str(i), "dev", name] for i in sorted(have - wanted, key=str)]
            lines += [["addr", "add", str(i), "dev", name] for i in sorted(wanted - have, key=str)]
            # The bridge answers for the node's own overlay address, so it must carry the MAC
            # every other node programs for that address.
            first4 = sorted(i for i in wanted if isinstance(i, ipaddress.IPv4Interface))
            mac = ["address", mac_for_ip(str(first4[0].ip))] if first4 else []
            _batch("ip", [*lines, ["link", "set", "dev", name, *mac, "up"]])

    def ensure_vxlan(self, name: str, vni: int, local: str, bridge: str, port: int = 4789) -> None:
        """Create (or recreate, if its VNI/local/port/learning/proxy differ) VXLAN ``name``.

        Learning off, proxy ARP on, MTU :data:`VXLAN_MTU`, enslaved to ``bridge`` (which must
        exist), up.
        """
        if not 0 < vni < 1 << 24:
            raise ValueError(f"VNI must be in 1..16777215, got {vni}")
        if not 0 < port < 1 << 16:
            raise ValueError(f"invalid UDP port {port}")
        _check_ifname(name)
        _check_ifname(bridge)
        local = _norm_ip(local)
        with self._serial():
            self._require(bridge)
            exists = self._index(name) is not None
            if exists:
                info = _link("link", name).get("linkinfo") or {}
                data = info.get("info_data") or {}
                # iproute2 prints the address canonically (inet_ntop), as _norm_ip does;
                # "proxy" is absent when off before iproute2 6.4 and false from 6.4 on.
                ok = (
                    info.get("info_kind") == "vxlan"
                    and data.get("id") == vni
                    and data.get("local", data.get("local6")) == local
                    and data.get("port") == port
                    and not data.get("learning")
                    and bool(data.get("proxy"))
                )
                if not ok:  # VNI, local and port cannot be changed on a live device
                    self._delete_link(name)
                    exists = False
            lines = [] if exists else [[
                "link", "add", "name", name, "mtu", str(VXLAN_MTU), "type", "vxlan",
                "id", str(vni), "local", local, "dstport", str(port), "nolearning", "proxy"]]
            _batch("ip", [*lines, ["link", "set", "dev", name, "master", bridge, "up"]])

    def set_fdb(self, vxlan: str, entries: dict[str, str]) -> None:
        """Make the device's static unicast FDB entries exactly ``entries`` (MAC -> remote IP).

        Only the driver's own entries that carry a destination (``bridge fdb ... dst IP self``)
        are managed; the bridge's permanent entry for the device MAC is left alone.
        """
        _check_ifname(vxlan)
        wanted = {(_norm_mac(mac), _norm_ip(dst)) for mac, dst in entries.items()}
        with self._serial():
            self._require(vxlan)
            have: set[tuple[str, str]] = set()
            for e in _json(["bridge", "-json", "fdb", "show", "dev", vxlan]):
                if "self" in e.get("flags", []) and e.get("mac") and e.get("dst"):
                    have.add((_norm_mac(e["mac"]), _norm_ip(e["dst"])))
            stale, new = sorted(have - wanted), sorted(wanted - have)
            _batch("bridge",
                   [["fdb", "del", mac, "dev", vxlan, "dst", dst, "self"] for mac, dst in stale]
                   + [["fdb", "append", mac, "dev", vxlan, "dst", dst, "self", "permanent"]
                      for mac, dst in new],
                   tolerate=[errno.ENOENT] * len(stale) + [errno.EEXIST] * len(new))

    def set_neighbours(self, dev: str, entries: dict[str, str]) -> None:
        """Make the device's permanent neighbour entries exactly ``entries`` (IP -> MAC).

        Dynamic (kernel-learned) entries for other IPs are left to the kernel; an entry for a
        wanted IP is replaced by a permanent one whatever its state.
        """
        _check_ifname(dev)
        wanted = {_norm_ip(ip): _norm_mac(mac) for ip, mac in entries.items()}
        with self._serial():
            self._require(dev)
            permanent: dict[str, str | None] = {}
            # "nud all": by default `ip neigh show` hides NOARP entries
            for e in _json(["ip", "-json", "neigh", "show", "dev", dev, "nud", "all"]):
                if not e.get("dst") or "PERMANENT" not in e.get("state", []):
                    continue
                permanent[_norm_ip(e["dst"])] = _norm_mac(e["lladdr"]) if e.get("lladdr") else None
            stale = sorted(set(permanent) - set(wanted))
            new = sorted(ip for ip, mac in wanted.items() if permanent.get(ip) != mac)
            _batch("ip", [["neigh", "replace", ip, "lladdr", wanted[ip], "dev", dev, "nud",
                           "permanent"] for ip in new])
            for ip in stale:
                # One command each: `ip neigh` exits at its first kernel error, even under
                # -force, so a batch could not step over an entry that vanished meanwhile.
                try:
                    _cmd(["ip", "neigh", "del", ip, "dev", dev])
                except NetlinkError as exc:
                    if exc.code != errno.ENOENT:
                        raise

    def delete_link(self, name: str) -> None:
        """Delete link ``name``; no error if it does not exist."""
        _check_ifname(name)
        with self._serial():
            self._delete_link(name)

    def link_exists(self, name: str) -> bool:
        """True if link ``name`` exists in the current namespace."""
        _check_ifname(name)
        with self._serial():
            return self._index(name) is not None

    def attach_task(self, netns: str, bridge: str, host_if: str, ip_cidr: str,
                    gateway: str | None, mtu: int = VXLAN_MTU, ns_if: str = "eth0") -> str:
        """Give task namespace ``netns`` (created if missing) an ``eth0`` on ``bridge``.

        veth ``host_if`` (host side, enslaved to ``bridge``) <-> ``eth0`` (created directly in
        the task namespace) with MAC :func:`mac_for_ip`, address ``ip_cidr``, MTU ``mtu`` on
        both ends, ``lo`` and ``eth0`` up, default route via ``gateway`` if given. A stale
        ``host_if`` from an earlier attempt is deleted first; on failure the new veth is
        removed again (the namespace is kept). Returns the MAC.
        """
        # ns_if: the interface's name inside the task (eth0, eth1, … one per network)
        _check_netns_name(netns)
        _check_ifname(bridge)
        _check_ifname(host_if)
        _check_ifname(ns_if)
        iface = ipaddress.ip_interface(ip_cidr)
        mac = mac_for_ip(str(iface.ip))
        gw = _norm_ip(gateway) if gateway else None
        if gw is not None and ipaddress.ip_address(gw).version != iface.version:
            raise ValueError(f"gateway {gateway!r} and address {ip_cidr!r} differ in family")
        if not 68 <= mtu <= 65535:
            raise ValueError(f"invalid MTU {mtu}")
        with self._serial():
            self._require(bridge)
            created = _create_netns(netns)
            self._delete_link(host_if)  # stale from a crashed attempt (its peer goes with it)
            if not created:  # an older namespace may still hold an interface of that name
                try:
                    _cmd(["ip", "-n", netns, "link", "del", "dev", ns_if])
                except NetlinkError as exc:
                    if exc.code != errno.ENODEV:
                        raise
            task = [["link", "set", "dev", "lo", "up"],
                    ["addr", "add", str(iface), "dev", ns_if],
                    ["link", "set", "dev", ns_if, "up"]]
            if gw is not None:
                default = "0.0.0.0/0" if iface.version == 4 else "::/0"
                task.append(["route", "replace", default, "via", gw, "dev", ns_if])
            try:
                # The peer is created directly in the task namespace, with its MAC and MTU.
                _batch("ip", [["link", "add", "name", host_if, "mtu", str(mtu), "type", "veth",
                               "peer", "name", ns_if, "netns", netns, "address", mac,
                               "mtu", str(mtu)],
                              ["link", "set", "dev", host_if, "master", bridge, "up"]])
                _batch("ip", task, netns=netns)
            except BaseException:
                self._delete_link(host_if)
                raise
        return mac

    def detach_task(self, netns: str, host_if: str) -> None:
        """Delete ``host_if`` (its peer goes with it) and the task namespace; no error if missing."""
        _check_netns_name(netns)
        _check_ifname(host_if)
        with self._serial():
            self._delete_link(host_if)
            delete_netns(netns)

    # -- implementation (caller holds the lock and has validated the names)

    def _index(self, name: str) -> int | None:
        """The link's index in the current namespace, None if missing (an ioctl, no process)."""
        try:
            return socket.if_nametoindex(name)
        except OSError:
            return None

    def _require(self, name: str) -> int:
        """The link's index; :class:`NetlinkError` (ENODEV) if it is missing."""
        idx = self._index(name)
        if idx is None:
            raise NetlinkError(errno.ENODEV, f"no such device: {name}")
        return idx

    def _delete_link(self, name: str) -> None:
        """Delete the link if it exists (gone meanwhile is no error)."""
        if self._index(name) is None:
            return
        try:
            _cmd(["ip", "link", "del", "dev", name])
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise


def _conforms(nl: Netlink) -> HostNetwork:  # mypy checks Netlink satisfies the protocol
    return nl
