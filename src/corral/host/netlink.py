"""A narrow, typed wrapper over pyroute2 for the links a corral node needs.

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
an ``IPRoute`` bound to the task namespace, never by entering it.

Two things about the environment worth knowing:

* pyroute2 0.9's synchronous ``IPRoute`` drives a private asyncio loop with
  ``run_until_complete``, so it can neither be built nor called on a thread
  whose event loop is running ("Cannot run the event loop while another loop
  is running"). :class:`Netlink` therefore owns one worker thread and runs
  every pyroute2 call there: its methods are plain blocking calls that work
  from any thread, including from inside a coroutine (they block the loop for
  the ~ms a netlink round trip takes; wrap them in ``asyncio.to_thread`` for
  long reconciles). Calls are serialised.
* Named namespaces are bind mounts under ``/run/netns``. A process started
  with ``ip netns exec NODE`` lives in a private *mount* namespace whose mounts
  are slaves of the host's, so namespaces it creates (``ip netns add`` or
  :func:`pyroute2.netns.create`) are invisible outside it and die with it. A
  daemon that creates task namespaces must share the host mount namespace:
  start it with ``nsenter --net=/run/netns/NODE ...`` (network namespace only).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar, cast

from pyroute2 import IPRoute, NetlinkError, netns
from pyroute2.netlink.rtnl import ndmsg

__all__ = [
    "HostNetwork",
    "Netlink",
    "NETNS_RUN_DIR",
    "VXLAN_MTU",
    "delete_netns",
    "mac_for_ip",
    "netns_exists",
]

NETNS_RUN_DIR: str = netns.NETNS_RUN_DIR  # /var/run/netns, as iproute2 uses
#: MTU for VXLAN devices and task veths: 1500 underlay minus 50 bytes of VXLAN/UDP/IP/Ethernet.
VXLAN_MTU = 1450
IFNAMSIZ = 15

_NUD_PERMANENT: int = ndmsg.states["permanent"]
_NUD_NOARP: int = ndmsg.states["noarp"]
_NTF_SELF: int = ndmsg.flags["self"]

T = TypeVar("T")


# ---------------------------------------------------------------- helpers


def mac_for_ip(ip: str) -> str:
    """Docker-style MAC for an IPv4 address: ``"10.97.0.5"`` -> ``"02:42:0a:61:00:05"``."""
    addr = ipaddress.ip_address(ip)
    if not isinstance(addr, ipaddress.IPv4Address):
        raise ValueError(f"mac_for_ip needs an IPv4 address, got {ip!r}")
    return "02:42:" + ":".join(f"{b:02x}" for b in addr.packed)


def _check_netns_name(name: str) -> None:
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise ValueError(f"invalid network namespace name {name!r}")


def _check_ifname(name: str) -> None:
    if not name or len(name) > IFNAMSIZ or "/" in name or any(c.isspace() for c in name):
        raise ValueError(f"invalid interface name {name!r} (1 to {IFNAMSIZ} chars, no '/' or spaces)")


def _netns_path(name: str) -> str:
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


def netns_exists(name: str) -> bool:
    """True if the named network namespace exists (``ip netns list`` would show it)."""
    return _netns_mounted(_netns_path(name))


def delete_netns(name: str) -> None:
    """Remove the named network namespace (like ``ip netns del``); no error if it is missing.

    The namespace itself lives on while processes still run in it; its links are destroyed
    once the last reference goes (a veth destroyed that way takes its peer with it).
    """
    path = _netns_path(name)
    if not os.path.lexists(path):
        return
    try:
        netns.remove(name)
    except FileNotFoundError:
        pass


def _create_netns(name: str) -> None:
    path = _netns_path(name)
    if _netns_mounted(path):
        return
    if os.path.lexists(path):  # stale mount point left by a crash mid-create
        try:
            netns.remove(name)
        except FileNotFoundError:
            pass
    try:
        netns.create(name)
    except FileExistsError:
        if not _netns_mounted(path):
            raise


def _norm_ip(ip: str) -> str:
    return str(ipaddress.ip_address(ip))


def _norm_mac(mac: str) -> str:
    parts = mac.strip().lower().replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) in (1, 2) for p in parts):
        raise ValueError(f"invalid MAC address {mac!r}")
    try:
        return ":".join(f"{int(p, 16):02x}" for p in parts)
    except ValueError:
        raise ValueError(f"invalid MAC address {mac!r}") from None


def _family(ip: str) -> int:
    return socket.AF_INET if ipaddress.ip_address(ip).version == 4 else socket.AF_INET6


def _code(exc: NetlinkError) -> int:
    return cast(int, getattr(exc, "code", 0))


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
    """Narrow wrapper over pyroute2 for the links a node needs; operates in the current namespace.

    All pyroute2 calls run on one private worker thread (see the module docstring), so the
    methods are safe to call from any thread, including one running an asyncio loop.
    Errors from the kernel surface as :class:`pyroute2.NetlinkError` (``.code`` is an errno);
    bad arguments as :class:`ValueError`.
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corral-netlink")
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._ipr: Any = self._executor.submit(IPRoute).result()
        except BaseException:
            self._executor.shutdown(wait=False)
            raise

    # -- plumbing

    def _run(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            if self._closed:
                raise RuntimeError("Netlink is closed")
            future = self._executor.submit(fn, *args)
        return future.result()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._executor.submit(self._ipr.close).result()
        finally:
            self._executor.shutdown(wait=True)

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- public API (each runs its _do_* twin on the worker thread)

    def ensure_bridge(self, name: str, addrs: list[str]) -> None:
        """Create bridge ``name`` if missing, set its addresses to exactly ``addrs`` (and its MAC
        to the one :func:`mac_for_ip` gives the first IPv4 one), bring it up.

        ``addrs`` are CIDR strings (``"10.97.2.11/24"``). IPv6 link-local addresses the kernel
        adds itself are left alone.
        """
        self._run(self._do_ensure_bridge, name, list(addrs))

    def ensure_vxlan(self, name: str, vni: int, local: str, bridge: str, port: int = 4789) -> None:
        """Create (or recreate, if its VNI/local/port/learning/proxy differ) VXLAN ``name``.

        Learning off, proxy ARP on, MTU :data:`VXLAN_MTU`, enslaved to ``bridge`` (which must
        exist), up.
        """
        self._run(self._do_ensure_vxlan, name, vni, local, bridge, port)

    def set_fdb(self, vxlan: str, entries: dict[str, str]) -> None:
        """Make the device's static unicast FDB entries exactly ``entries`` (MAC -> remote IP).

        Only the driver's own entries that carry a destination (``bridge fdb ... dst IP self``)
        are managed; the bridge's permanent entry for the device MAC is left alone.
        """
        self._run(self._do_set_fdb, vxlan, dict(entries))

    def set_neighbours(self, dev: str, entries: dict[str, str]) -> None:
        """Make the device's permanent neighbour entries exactly ``entries`` (IP -> MAC).

        Dynamic (kernel-learned) entries for other IPs are left to the kernel; an entry for a
        wanted IP is replaced by a permanent one whatever its state.
        """
        self._run(self._do_set_neighbours, dev, dict(entries))

    def delete_link(self, name: str) -> None:
        """Delete link ``name``; no error if it does not exist."""
        self._run(self._do_delete_link, name)

    def link_exists(self, name: str) -> bool:
        return self._run(self._index, name) is not None

    def attach_task(self, netns: str, bridge: str, host_if: str, ip_cidr: str,
                    gateway: str | None, mtu: int = VXLAN_MTU, ns_if: str = "eth0") -> str:
        """Give task namespace ``netns`` (created if missing) an ``eth0`` on ``bridge``.

        veth ``host_if`` (host side, enslaved to ``bridge``) <-> ``eth0`` (created directly in
        the task namespace) with MAC :func:`mac_for_ip`, address ``ip_cidr``, MTU ``mtu`` on
        both ends, ``lo`` and ``eth0`` up, default route via ``gateway`` if given. A stale
        ``host_if`` from an earlier attempt is deleted first; on failure the new veth is
        removed again (the namespace is kept). Returns the MAC.
        """
        return self._run(self._do_attach_task, netns, bridge, host_if, ip_cidr, gateway, mtu,
                         ns_if)

    def detach_task(self, netns: str, host_if: str) -> None:
        """Delete ``host_if`` (its peer goes with it) and the task namespace; no error if missing."""
        self._run(self._do_detach_task, netns, host_if)

    # -- implementation (worker thread only)

    def _index(self, name: str) -> int | None:
        _check_ifname(name)
        found = self._ipr.link_lookup(ifname=name)
        return int(found[0]) if found else None

    def _require(self, name: str) -> int:
        idx = self._index(name)
        if idx is None:
            raise NetlinkError(errno.ENODEV, f"no such device: {name}")
        return idx

    def _link_info(self, idx: int) -> tuple[str | None, Any]:
        msg = self._ipr.link("get", index=idx)[0]
        kind = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
        data = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
        return (cast("str | None", kind), data)

    def _do_ensure_bridge(self, name: str, addrs: list[str]) -> None:
        wanted = {ipaddress.ip_interface(a) for a in addrs}
        idx = self._index(name)
        if idx is None:
            try:
                self._ipr.link("add", ifname=name, kind="bridge")
            except NetlinkError as exc:
                if _code(exc) != errno.EEXIST:
                    raise
            idx = self._require(name)
        kind, _ = self._link_info(idx)
        if kind != "bridge":
            raise ValueError(f"link {name!r} exists but is a {kind or 'plain'} device, not a bridge")
        have: set[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = set()
        for msg in self._ipr.addr("dump", index=idx):
            if msg["index"] != idx:
                continue
            iface = ipaddress.ip_interface(f"{msg.get('address')}/{msg['prefixlen']}")
            if iface.version == 6 and iface.ip.is_link_local:
                continue
            have.add(iface)
        for iface in have - wanted:
            self._ipr.addr("del", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        for iface in wanted - have:
            self._ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        # The bridge answers for the node's own overlay address, so it must carry the MAC
        # every other node programs for that address.
        first4 = [i for i in wanted if i.version == 4]
        if first4:
            self._ipr.link("set", index=idx, address=mac_for_ip(str(sorted(first4)[0].ip)))
        self._ipr.link("set", index=idx, state="up")

    def _do_ensure_vxlan(self, name: str, vni: int, local: str, bridge: str, port: int) -> None:
        if not 0 < vni < 1 << 24:
            raise ValueError(f"VNI must be in 1..16777215, got {vni}")
        if not 0 < port < 1 << 16:
            raise ValueError(f"invalid UDP port {port}")
        local = _norm_ip(local)
        br = self._require(bridge)
        idx = self._index(name)
        if idx is not None:
            kind, data = self._link_info(idx)
            ok = (
                kind == "vxlan"
                and data is not None
                and data.get("IFLA_VXLAN_ID") == vni
                and data.get("IFLA_VXLAN_LOCAL") == local
                and data.get("IFLA_VXLAN_PORT") == port
                and not data.get("IFLA_VXLAN_LEARNING")
                and bool(data.get("IFLA_VXLAN_PROXY"))
            )
            if not ok:  # VNI, local and port cannot be changed on a live device
                self._do_delete_link(name)
                idx = None
        if idx is None:
            family_key = "vxlan_local" if _family(local) == socket.AF_INET else "vxlan_local6"
            self._ipr.link(
                "add", ifname=name, kind="vxlan", vxlan_id=vni, vxlan_port=port,
                vxlan_learning=0, vxlan_proxy=1, mtu=VXLAN_MTU, **{family_key: local},
            )
            idx = self._require(name)
        self._ipr.link("set", index=idx, master=br, state="up")

    def _fdb_dump(self, idx: int) -> set[tuple[str, str]]:
        have: set[tuple[str, str]] = set()
        for msg in self._ipr.fdb("dump", ifindex=idx):
            if msg["ifindex"] != idx or not msg["flags"] & _NTF_SELF:
                continue
            dst, lladdr = msg.get("NDA_DST"), msg.get("NDA_LLADDR")
            if dst is None or lladdr is None:
                continue
            have.add((_norm_mac(lladdr), _norm_ip(dst)))
        return have

    def _do_set_fdb(self, vxlan: str, entries: dict[str, str]) -> None:
        wanted = {(_norm_mac(mac), _norm_ip(dst)) for mac, dst in entries.items()}
        idx = self._require(vxlan)
        have = self._fdb_dump(idx)
        for mac, dst in have - wanted:
            try:
                self._ipr.fdb("del", ifindex=idx, lladdr=mac, dst=dst)
            except NetlinkError as exc:
                if _code(exc) != errno.ENOENT:
                    raise
        for mac, dst in wanted - have:
            try:
                self._ipr.fdb("append", ifindex=idx, lladdr=mac, dst=dst)
            except NetlinkError as exc:
                if _code(exc) != errno.EEXIST:
                    raise

    def _do_set_neighbours(self, dev: str, entries: dict[str, str]) -> None:
        wanted = {_norm_ip(ip): _norm_mac(mac) for ip, mac in entries.items()}
        idx = self._require(dev)
        permanent: dict[str, str | None] = {}
        other: dict[str, str | None] = {}
        for msg in self._ipr.neigh("dump", ifindex=idx):
            if msg["ifindex"] != idx or msg["family"] not in (socket.AF_INET, socket.AF_INET6):
                continue
            dst, lladdr = msg.get("NDA_DST"), msg.get("NDA_LLADDR")
            if dst is None:
                continue
            mac = _norm_mac(lladdr) if lladdr else None
            (permanent if msg["state"] & _NUD_PERMANENT else other)[_norm_ip(dst)] = mac
        for ip in set(permanent) - set(wanted):
            try:
                self._ipr.neigh("del", dst=ip, ifindex=idx, family=_family(ip))
            except NetlinkError as exc:
                if _code(exc) != errno.ENOENT:
                    raise
        for ip, mac in wanted.items():
            if permanent.get(ip) == mac:
                continue
            self._ipr.neigh("replace", dst=ip, lladdr=mac, ifindex=idx, family=_family(ip),
                            state=_NUD_PERMANENT)

    def _do_delete_link(self, name: str) -> None:
        idx = self._index(name)
        if idx is None:
            return
        try:
            self._ipr.link("del", index=idx)
        except NetlinkError as exc:
            if _code(exc) != errno.ENODEV:
                raise

    def _do_attach_task(self, ns: str, bridge: str, host_if: str, ip_cidr: str,
                        gateway: str | None, mtu: int, ns_if: str) -> str:
        # ns_if: the interface's name inside the task (eth0, eth1, … one per network)
        _check_netns_name(ns)
        _check_ifname(host_if)
        _check_ifname(ns_if)
        iface = ipaddress.ip_interface(ip_cidr)
        mac = mac_for_ip(str(iface.ip))
        gw = _norm_ip(gateway) if gateway else None
        if gw is not None and ipaddress.ip_address(gw).version != iface.version:
            raise ValueError(f"gateway {gateway!r} and address {ip_cidr!r} differ in family")
        if not 68 <= mtu <= 65535:
            raise ValueError(f"invalid MTU {mtu}")
        br = self._require(bridge)

        _create_netns(ns)
        self._do_delete_link(host_if)  # stale from a crashed attempt
        task = IPRoute(netns=ns, flags=0)
        try:
            stale = task.link_lookup(ifname=ns_if)
            if stale:
                task.link("del", index=stale[0])
            self._ipr.link(
                "add", ifname=host_if, kind="veth", mtu=mtu,
                peer={"ifname": ns_if, "net_ns_fd": ns, "address": mac, "mtu": mtu},
            )
            try:
                host = self._require(host_if)
                self._ipr.link("set", index=host, master=br, state="up")
                eth0 = int(task.link_lookup(ifname=ns_if)[0])
                lo = task.link_lookup(ifname="lo")
                if lo:
                    task.link("set", index=lo[0], state="up")
                task.addr("add", index=eth0, address=str(iface.ip),
                          prefixlen=iface.network.prefixlen)
                task.link("set", index=eth0, state="up")
                if gw is not None:
                    default = "0.0.0.0/0" if iface.version == 4 else "::/0"
                    task.route("replace", dst=default, gateway=gw, oif=eth0)
            except BaseException:
                self._do_delete_link(host_if)
                raise
        finally:
            task.close()
        return mac

    def _do_detach_task(self, ns: str, host_if: str) -> None:
        _check_netns_name(ns)
        self._do_delete_link(host_if)
        delete_netns(ns)


def _conforms(nl: Netlink) -> HostNetwork:  # mypy checks Netlink satisfies the protocol
    return nl
