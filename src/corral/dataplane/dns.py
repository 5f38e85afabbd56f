"""Embedded DNS for tasks (corral's answer to Docker's 127.0.0.11).

Names in corral's namespace, per network (all matched case-insensitively,
with or without the trailing dot, exact names only -- no search-domain
stripping):

* ``<service>``       -> the service's VIP on that network, or, for a
  ``dnsrr`` service (``vip is None``), the running task IPs;
* ``tasks.<service>`` -> the running task IPs;
* ``<task-name>``     -> that task's IP (task names such as ``search.2``
  contain a dot, so the record table is always consulted first).

Only A records are served for these names; any other type (AAAA, MX, ...)
gets NOERROR with an empty answer (NODATA). Multi-address answers are
rotated round-robin, one step per query and name.

A name that is not in the table is NXDOMAIN when it is in corral's namespace
(a single label such as ``nosuchservice``, or ``tasks.<label>``), and is
forwarded to the upstream resolvers otherwise (``example.com``,
``tasks.example.com``, the root). Forwarding uses UDP, then TCP when the
upstream answer is truncated, with one overall deadline
(``forward_timeout``) shared by the upstreams in order; when every upstream
fails the client gets SERVFAIL.

:func:`resolve` is the pure part (plus the round-robin counter carried by
:class:`DnsRecords`); :class:`DnsServer` puts it on UDP and TCP sockets.
Records are chosen by the listener address a query arrived on, so tasks of
different networks (each talking to its own listener IP) see only their own
network. Malformed packets are dropped, or answered with FORMERR when a DNS
header could be read; they never raise out of a protocol callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import secrets
import socket
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

__all__ = [
    "DnsRecords",
    "DnsServer",
    "DnsStats",
    "ServiceEntry",
    "TaskEntry",
    "resolve",
    "upstreams_from_resolv_conf",
]

log = logging.getLogger(__name__)

DEFAULT_TTL = 5
DEFAULT_FORWARD_TIMEOUT = 2.0
_UDP_MIN = 512  # RFC 1035 limit for clients without EDNS
_UDP_MAX = 4096  # cap on the EDNS payload size we honour
_TCP_MAX = 65535
_HEADER = struct.Struct("!HHHHHH")
_QR = 0x8000
_OPCODE_MASK = 0x7800
_RD = 0x0100
_RA = 0x0080


# --- records -----------------------------------------------------------------


@dataclass(frozen=True)
class ServiceEntry:
    """A service attached to one network."""

    name: str
    vip: str | None  # None: endpoint mode dnsrr (the name resolves to task IPs)
    task_ips: tuple[str, ...]  # IPs of the service's running tasks on this network


@dataclass(frozen=True)
class TaskEntry:
    """A running task attached to one network."""

    name: str  # e.g. "search.2"
    ip: str


def _norm_name(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _ipv4s(addrs: Iterable[str]) -> tuple[str, ...]:
    """Canonical IPv4 strings, deduplicated in order; anything else is skipped."""
    out: dict[str, None] = {}
    for a in addrs:
        try:
            ip = ipaddress.IPv4Address(a.strip())
        except (ValueError, AttributeError):
            log.warning("dns: ignoring non-IPv4 address %r", a)
            continue
        out[str(ip)] = None
    return tuple(out)


@dataclass(frozen=True)
class DnsRecords:
    """What one network's tasks may resolve.

    ``names`` maps a name (normalised here to lowercase without the trailing
    dot) to its IPv4 addresses; a name mapped to ``()`` exists but has no
    address (NODATA), e.g. ``tasks.<svc>`` of a service with no running task.
    Non-IPv4 addresses are dropped. The only mutable state is the round-robin
    counter per name, which :func:`resolve` advances.
    """

    names: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    _rdatas: dict[str, tuple[dns.rdata.Rdata, ...]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _packed: dict[str, tuple[bytes, ...]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _rr: dict[str, int] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        names: dict[str, tuple[str, ...]] = {}
        for raw, addrs in self.names.items():
            key = _norm_name(raw)
            if not key:
                continue
            names[key] = _ipv4s((*names.get(key, ()), *addrs))
        object.__setattr__(self, "names", names)
        IN, A = dns.rdataclass.IN, dns.rdatatype.A
        self._rdatas.update(
            {k: tuple(dns.rdata.from_text(IN, A, ip) for ip in v) for k, v in names.items()}
        )
        self._packed.update(
            {k: tuple(ipaddress.IPv4Address(ip).packed for ip in v) for k, v in names.items()}
        )

    @staticmethod
    def build(services: Iterable[ServiceEntry], tasks: Iterable[TaskEntry]) -> DnsRecords:
        """The table for one network: services, ``tasks.<svc>`` and task names.

        A service name takes precedence over a task of the same name; several
        tasks sharing a name (old and new task of one slot during an update)
        resolve to all of their IPs.
        """
        names: dict[str, tuple[str, ...]] = {}
        taken: set[str] = set()
        for svc in services:
            key = _norm_name(svc.name)
            if not key:
                continue
            ips = _ipv4s(svc.task_ips)
            names[key] = _ipv4s((svc.vip,)) if svc.vip is not None else ips
            names[f"tasks.{key}"] = ips
            taken.update((key, f"tasks.{key}"))
        for task in tasks:
            key = _norm_name(task.name)
            if not key or key in taken:
                continue
            names[key] = _ipv4s((*names.get(key, ()), task.ip))
        return DnsRecords(names)

    def _advance(self, name: str, count: int) -> int:
        if count < 2:
            return 0
        n = self._rr.get(name, 0) % count
        self._rr[name] = (n + 1) % count
        return n

    def lookup(self, name: str) -> tuple[dns.rdata.Rdata, ...] | None:
        """The A rdatas for *name* (normalised), rotated one step per call; None if unknown."""
        rdatas = self._rdatas.get(name)
        if rdatas is None:
            return None
        n = self._advance(name, len(rdatas))
        return rdatas[n:] + rdatas[:n]

    def lookup_packed(self, name: str) -> tuple[bytes, ...] | None:
        """Like :meth:`lookup`, as 4-byte packed addresses (same rotation counter)."""
        packed = self._packed.get(name)
        if packed is None:
            return None
        n = self._advance(name, len(packed))
        return packed[n:] + packed[:n]


EMPTY_RECORDS = DnsRecords()


def _in_namespace(name: str) -> bool:
    """Whether an unknown *name* is NXDOMAIN (corral's) rather than forwarded."""
    if "." not in name:
        return True
    return name.startswith("tasks.") and "." not in name[6:]


def _reply(query: dns.message.Message, rcode: dns.rcode.Rcode) -> dns.message.Message:
    resp = dns.message.make_response(query, recursion_available=True)
    resp.set_rcode(rcode)
    return resp


def resolve(
    query: dns.message.Message, records: DnsRecords, ttl: int = DEFAULT_TTL
) -> dns.message.Message | None:
    """The response to *query* from *records*, or None when it must be forwarded.

    Pure apart from the round-robin counter in *records*. *query* must not be
    a response (QR set); :class:`DnsServer` drops those before calling this.
    """
    if query.opcode() != dns.opcode.QUERY:
        return _reply(query, dns.rcode.NOTIMP)
    if len(query.question) != 1:
        return _reply(query, dns.rcode.FORMERR)
    if query.edns > 0:
        return _reply(query, dns.rcode.BADVERS)
    q = query.question[0]
    if q.name == dns.name.root:
        return None
    key = q.name.to_text(omit_final_dot=True).lower()
    rdatas = records.lookup(key)
    if rdatas is None:
        if not _in_namespace(key):
            return None
        resp = _reply(query, dns.rcode.NXDOMAIN)
        resp.flags |= dns.flags.AA
        return resp
    resp = _reply(query, dns.rcode.NOERROR)
    resp.flags |= dns.flags.AA
    if (
        rdatas
        and q.rdclass in (dns.rdataclass.IN, dns.rdataclass.ANY)
        and q.rdtype in (dns.rdatatype.A, dns.rdatatype.ANY)
    ):
        rrset = dns.rrset.RRset(q.name, dns.rdataclass.IN, dns.rdatatype.A)
        rrset.update_ttl(ttl)
        for rd in rdatas:
            rrset.add(rd)
        resp.answer.append(rrset)
    return resp


# --- wire helpers --------------------------------------------------------------

FORWARD = b""  # _fast_answer: the query is well formed and must be forwarded

_PLAIN_NAME = re.compile(rb"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
_ANSWER_HEAD = struct.Struct("!HHHIH")  # name pointer, type, class, ttl, rdlength
_RR_TAIL = struct.Struct("!HHIH")  # type, class, ttl, rdlength (OPT: type, payload, flags, rdlength)
_OUR_PAYLOAD = 1232


def _fast_answer(wire: bytes, records: DnsRecords, ttl: int, tcp: bool) -> bytes | None:
    """Answer the common case straight from the wire, without dnspython.

    Handles a standard query with one question, a plain name (letters,
    digits, ``-``, ``_``), and at most an option-less EDNS0 OPT record.
    Returns the response bytes, :data:`FORWARD` (``b""``) for a name to
    forward, or None for anything else (the caller takes the dnspython path,
    which also produces FORMERR/NOTIMP/BADVERS and truncation). The result is
    the same as :func:`resolve` would give.
    """
    size = len(wire)
    if size < 17:
        return None
    qid, flags, qd, an, ns, ar = _HEADER.unpack_from(wire)
    if flags & 0xF800 or qd != 1 or an or ns or ar > 1:  # QR, opcode
        return None
    pos = 12
    while True:  # the question name: plain labels, no compression
        n = wire[pos]
        if n == 0:
            break
        if n > 63:
            return None
        pos += n + 1
        if pos >= size:
            return None
    qend = pos + 5  # root byte, qtype, qclass
    if qend > size or pos == 12 or pos - 12 > 254:
        return None
    qtype, qclass = struct.unpack_from("!HH", wire, pos + 1)
    edns, payload = False, 0
    if ar:
        if qend + 11 != size or wire[qend] != 0:
            return None
        rtype, payload, ettl, rdlen = _RR_TAIL.unpack_from(wire, qend + 1)
        if rtype != 41 or rdlen or ettl & 0x00FF0000:  # OPT, no options, version 0
            return None
        edns = True
    elif qend != size:
        return None
    if tcp:
        max_size = _TCP_MAX
    else:
        max_size = max(_UDP_MIN, min(payload, _UDP_MAX)) if edns else _UDP_MIN
    # labels -> "a.b.c": replace each length byte after the first with a dot
    raw = bytearray(wire[13:pos])
    i = wire[12]
    while i < len(raw):
        step = raw[i]
        raw[i] = 0x2E
        i += step + 1
    if _PLAIN_NAME.fullmatch(raw) is None:
        return None
    key = raw.decode("ascii").lower()
    known = records._packed.get(key)
    if known is not None and qend + 16 * len(known) + (11 if edns else 0) > max_size:
        return None  # needs truncation: the dnspython path does it
    packed = records.lookup_packed(key)
    if packed is None:
        if not _in_namespace(key):
            return FORWARD
        rcode, packed = dns.rcode.NXDOMAIN, ()
    else:
        rcode = dns.rcode.NOERROR
        if qclass not in (1, 255) or qtype not in (1, 255):  # IN/ANY, A/ANY
            packed = ()
    out_flags = _QR | 0x0400 | _RA | (flags & _RD) | rcode  # AA
    parts = [_HEADER.pack(qid, out_flags, 1, len(packed), 0, 1 if edns else 0), wire[12:qend]]
    for ip in packed:
        parts.append(_ANSWER_HEAD.pack(0xC00C, 1, 1, ttl, 4))
        parts.append(ip)
    if edns:
        parts.append(b"\x00" + _RR_TAIL.pack(41, _OUR_PAYLOAD, 0, 0))
    return b"".join(parts)



def _header_reply(wire: bytes, rcode: int) -> bytes | None:
    """A bare header answering *wire* with *rcode*, or None if it is not a readable query."""
    if len(wire) < _HEADER.size:
        return None
    qid, flags = struct.unpack_from("!HH", wire)
    if flags & _QR:
        return None  # never answer a response: no reflection loops
    out_flags = _QR | (flags & (_OPCODE_MASK | _RD)) | _RA | (rcode & 0xF)
    return _HEADER.pack(qid, out_flags, 0, 0, 0, 0)


def _parse(wire: bytes) -> dns.message.Message | bytes | None:
    """The query in *wire*; FORMERR bytes if only its header is readable; None to drop."""
    try:
        msg = dns.message.from_wire(wire)
    except Exception:
        return _header_reply(wire, dns.rcode.FORMERR)
    if msg.flags & dns.flags.QR:
        return None
    return msg


def _udp_limit(query: dns.message.Message) -> int:
    if query.edns >= 0:
        return max(_UDP_MIN, min(query.payload, _UDP_MAX))
    return _UDP_MIN


def _render(resp: dns.message.Message, max_size: int, query_wire: bytes) -> bytes | None:
    """*resp* on the wire within *max_size* (truncated, TC set, if needed); SERVFAIL if unrenderable."""
    try:
        return resp.to_wire(max_size=max_size, prefer_truncation=True)
    except Exception as exc:  # e.g. upstream data we cannot re-render
        log.debug("dns: cannot render response: %s", exc)
        return _header_reply(query_wire, dns.rcode.SERVFAIL)


def _canon_ip(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return ip


def upstreams_from_resolv_conf(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """The ``nameserver`` entries of a resolv.conf, as ``(ip, 53)``, in order, deduplicated.

    Loopback entries are kept (the caller decides); invalid ones are skipped;
    an unreadable file gives ``[]``.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return []
    out: list[tuple[str, int]] = []
    for line in lines:
        parts = line.split()
        if len(parts) < 2 or parts[0] != "nameserver":
            continue
        host = parts[1]
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            continue
        if (host, 53) not in out:
            out.append((host, 53))
    return out


# --- server --------------------------------------------------------------------


@dataclass(slots=True)
class DnsStats:
    """Counters for the whole server (updated inline)."""

    queries: int = 0  # well-formed queries received (UDP + TCP)
    answered: int = 0  # answered from the records (including NXDOMAIN/NODATA)
    forwarded: int = 0  # sent upstream
    forward_failures: int = 0  # answered SERVFAIL because no upstream answered
    malformed: int = 0  # packets that could not be parsed (dropped or FORMERR)
    overload: int = 0  # answered SERVFAIL because too many forwards were in flight


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer, ip: str) -> None:
        self.server = server
        self.ip = ip
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDPTransport does not subclass asyncio.DatagramTransport
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        try:
            self.server._on_datagram(self, data, addr)
        except Exception as exc:  # never let one packet break the endpoint
            log.debug("dns: dropping UDP query from %s: %r", addr, exc)

    def error_received(self, exc: Exception) -> None:
        log.debug("dns: UDP error on %s: %s", self.ip, exc)

    def send(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.sendto(data, addr)


@dataclass(eq=False)
class _Listener:
    ip: str
    port: int
    udp: asyncio.DatagramTransport
    tcp: asyncio.Server


class DnsServer:
    """UDP (and TCP) DNS server on one or more addresses; records swapped atomically.

    Records are set per listening IP (:meth:`set_records`) and chosen by the
    listener a query arrived on; a listener bound to ``0.0.0.0`` uses the
    records set for ``"0.0.0.0"``. An IP without records answers NXDOMAIN
    for corral names and still forwards the rest.
    """

    def __init__(
        self,
        upstreams: Sequence[tuple[str, int]] = (),
        ttl: int = DEFAULT_TTL,
        forward_timeout: float = DEFAULT_FORWARD_TIMEOUT,
        *,
        max_inflight: int = 1024,
        max_tcp_connections: int = 256,
        tcp_idle_timeout: float = 10.0,
    ) -> None:
        self.upstreams: list[tuple[str, int]] = list(upstreams)
        self.ttl = ttl
        self.forward_timeout = forward_timeout
        self.max_inflight = max_inflight
        self.max_tcp_connections = max_tcp_connections
        self.tcp_idle_timeout = tcp_idle_timeout
        self.stats = DnsStats()
        self._records: dict[str, DnsRecords] = {}
        self._listeners: dict[tuple[str, int], _Listener] = {}
        self._forwards: set[asyncio.Task[None]] = set()
        self._tcp_conns: dict[asyncio.Task[object], tuple[str, int]] = {}
        self._closed = False

    # -- configuration --

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound ``(ip, port)`` pairs (each serving UDP and TCP)."""
        return list(self._listeners)

    def set_records(self, addr: str, records: DnsRecords) -> None:
        """Serve *records* to queries arriving on listener IP *addr* (from the next query on)."""
        self._records[_canon_ip(addr)] = records

    def records_for(self, addr: str) -> DnsRecords:
        return self._records.get(_canon_ip(addr), EMPTY_RECORDS)

    async def start(self, addrs: Sequence[tuple[str, int]]) -> None:
        """Bind UDP+TCP on each ``(ip, port)``; on failure unbind what this call bound and raise OSError."""
        added: list[tuple[str, int]] = []
        try:
            for addr in addrs:
                if (_canon_ip(addr[0]), addr[1]) in self._listeners:
                    continue
                added.append(await self.add_listener(addr))
        except BaseException:
            for key in added:
                await self._close_listeners(lambda k: k == key)
            raise

    async def add_listener(self, addr: tuple[str, int]) -> tuple[str, int]:
        """Bind UDP and TCP on ``(ip, port)``; port 0 picks one port free for both.

        Returns the bound ``(ip, port)``; binding an address already bound is a
        no-op. Raises OSError when the address cannot be bound.
        """
        if self._closed:
            raise RuntimeError("DnsServer is closed")
        ip, port = _canon_ip(addr[0]), addr[1]
        if port and (ip, port) in self._listeners:
            return (ip, port)
        attempts = 20 if port == 0 else 1  # port 0: the UDP port may be taken for TCP
        for attempt in range(attempts):
            try:
                listener = await self._bind(ip, port)
            except OSError:
                if attempt == attempts - 1:
                    raise
                continue
            self._listeners[(ip, listener.port)] = listener
            log.debug("dns: listening on %s:%d", ip, listener.port)
            return (ip, listener.port)
        raise AssertionError("unreachable")

    async def _bind(self, ip: str, port: int) -> _Listener:
        loop = asyncio.get_running_loop()
        # Bind the UDP socket ourselves: uvloop leaks a transport when its own bind fails.
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((ip, port))
            bound_port = int(sock.getsockname()[1])
            udp, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self, ip), sock=sock)
        except BaseException:
            sock.close()
            raise
        try:
            tcp = await asyncio.start_server(
                lambda r, w: self._serve_tcp((ip, bound_port), r, w),
                host=ip,
                port=bound_port,
                reuse_address=True,
            )
        except BaseException:
            udp.close()
            raise
        return _Listener(ip, bound_port, udp, tcp)

    async def remove_listener(self, ip: str) -> None:
        """Close every listener on *ip* (and its TCP connections) and forget its records."""
        ip = _canon_ip(ip)
        await self._close_listeners(lambda k: k[0] == ip)
        self._records.pop(ip, None)

    async def _close_listeners(self, which: Callable[[tuple[str, int]], bool]) -> None:
        gone = [k for k in self._listeners if which(k)]
        servers = []
        for key in gone:
            lst = self._listeners.pop(key)
            lst.udp.close()
            lst.tcp.close()
            servers.append(lst.tcp)
        conns = [t for t, key in self._tcp_conns.items() if key in gone]
        for t in conns:
            t.cancel()
        if conns:
            await asyncio.gather(*conns, return_exceptions=True)
        for s in servers:
            with contextlib.suppress(Exception):
                await s.wait_closed()

    async def close(self) -> None:
        """Unbind everything and cancel in-flight forwards and TCP connections."""
        self._closed = True
        for t in list(self._forwards):
            t.cancel()
        await self._close_listeners(lambda k: True)
        if self._forwards:
            await asyncio.gather(*self._forwards, return_exceptions=True)

    # -- query path --

    def _on_datagram(self, proto: _UdpProtocol, data: bytes, addr: tuple[str | object, ...]) -> None:
        fast = _fast_answer(data, self.records_for(proto.ip), self.ttl, tcp=False)
        if fast:
            self.stats.queries += 1
            self.stats.answered += 1
            proto.send(fast, addr)
            return
        parsed = _parse(data)
        if not isinstance(parsed, dns.message.Message):
            self.stats.malformed += 1
            if parsed is not None:
                proto.send(parsed, addr)
            return
        self.stats.queries += 1
        resp = None if fast == FORWARD else resolve(parsed, self.records_for(proto.ip), self.ttl)
        if resp is not None:
            self.stats.answered += 1
            out = _render(resp, _udp_limit(parsed), data)
            if out is not None:
                proto.send(out, addr)
            return
        if len(self._forwards) >= self.max_inflight:
            self.stats.overload += 1
            out = _header_reply(data, dns.rcode.SERVFAIL)
            if out is not None:
                proto.send(out, addr)
            return
        task = asyncio.get_running_loop().create_task(self._forward_udp(proto, parsed, data, addr))
        self._forwards.add(task)
        task.add_done_callback(self._forwards.discard)

    async def _forward_udp(
        self,
        proto: _UdpProtocol,
        query: dns.message.Message,
        wire: bytes,
        addr: tuple[str | object, ...],
    ) -> None:
        limit = _udp_limit(query)
        resp = await self._forward(query)
        out = _render(resp, limit, wire)
        if out is not None:
            proto.send(out, addr)

    async def _answer_tcp(self, ip: str, wire: bytes) -> bytes | None:
        fast = _fast_answer(wire, self.records_for(ip), self.ttl, tcp=True)
        if fast:
            self.stats.queries += 1
            self.stats.answered += 1
            return fast
        parsed = _parse(wire)
        if not isinstance(parsed, dns.message.Message):
            self.stats.malformed += 1
            return parsed
        self.stats.queries += 1
        resp = None if fast == FORWARD else resolve(parsed, self.records_for(ip), self.ttl)
        if resp is None:
            resp = await self._forward(parsed)
        else:
            self.stats.answered += 1
        return _render(resp, _TCP_MAX, wire)

    async def _serve_tcp(
        self, key: tuple[str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        ip = key[0]
        task = asyncio.current_task()
        if task is None or len(self._tcp_conns) >= self.max_tcp_connections:
            writer.close()
            return
        self._tcp_conns[task] = key
        try:
            while True:
                async with asyncio.timeout(self.tcp_idle_timeout):
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    if size == 0:
                        break
                    wire = await reader.readexactly(size)
                out = await self._answer_tcp(ip, wire)
                if out is None:
                    break  # unreadable garbage: close the connection
                writer.write(len(out).to_bytes(2, "big") + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, OSError):
            pass
        except asyncio.CancelledError:
            # Only close()/remove_listener() cancel these; re-raising would make
            # asyncio (3.11) log the CancelledError from the connection callback.
            pass
        except Exception as exc:
            log.debug("dns: TCP connection on %s failed: %r", ip, exc)
        finally:
            self._tcp_conns.pop(task, None)
            writer.close()

    async def _forward(self, query: dns.message.Message) -> dns.message.Message:
        """The upstream answer to *query* (with the client's id), or SERVFAIL."""
        client_id = query.id
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.forward_timeout
        ours = set(self._listeners)
        upstreams = [u for u in self.upstreams if (_canon_ip(u[0]), u[1]) not in ours]
        self.stats.forwarded += 1
        fallback: dns.message.Message | None = None
        query.id = secrets.randbits(16)  # do not reuse the client's id upstream
        try:
            for i, (host, port) in enumerate(upstreams):
                budget = (deadline - loop.time()) / (len(upstreams) - i)
                if budget <= 0:
                    break
                try:
                    async with asyncio.timeout(budget):
                        resp = await dns.asyncquery.udp(
                            query, host, port=port, ignore_unexpected=True, ignore_errors=True
                        )
                        if resp.flags & dns.flags.TC:
                            resp = await dns.asyncquery.tcp(query, host, port=port)
                except (TimeoutError, OSError, EOFError, dns.exception.DNSException) as exc:
                    log.debug("dns: upstream %s:%d failed: %r", host, port, exc)
                    continue
                if resp.rcode() in (dns.rcode.SERVFAIL, dns.rcode.REFUSED):
                    fallback = resp
                    continue
                resp.id = client_id
                return resp
        finally:
            query.id = client_id
        if fallback is not None:
            fallback.id = client_id
            return fallback
        self.stats.forward_failures += 1
        return _reply(query, dns.rcode.SERVFAIL)
