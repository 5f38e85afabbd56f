"""Embedded DNS: pure name resolution, and the UDP/TCP server on loopback.

All traffic stays on 127.0.0.0/8; the "upstream" resolver is a fake server
started by the test on 127.0.0.73.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import cast

import dns.asyncquery
import dns.edns
import dns.opcode
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from corral.dataplane.dns import (
    DnsRecords,
    DnsServer,
    ServiceEntry,
    TaskEntry,
    resolve,
    upstreams_from_resolv_conf,
)

Run = Callable[[Callable[[], Awaitable[None]]], None]

NET_A, NET_B, UPSTREAM, DEAD = "127.0.0.71", "127.0.0.72", "127.0.0.73", "127.0.0.74"
FAKE_EXAMPLE_IP = "192.0.2.10"  # TEST-NET-1: only ever returned by the fake upstream


def records() -> DnsRecords:
    return DnsRecords.build(
        [
            ServiceEntry("search", "10.0.1.2", ("10.0.1.5", "10.0.1.6", "10.0.1.7")),
            ServiceEntry("cache", None, ("10.0.1.8", "10.0.1.9")),
            ServiceEntry("idle", "10.0.1.3", ()),
        ],
        [
            TaskEntry("search.1", "10.0.1.5"),
            TaskEntry("search.2", "10.0.1.6"),
            TaskEntry("search.3", "10.0.1.7"),
            TaskEntry("cache.1", "10.0.1.8"),
            TaskEntry("cache.2", "10.0.1.9"),
        ],
    )


def query(name: str, rdtype: str = "A") -> dns.message.Message:
    return dns.message.make_query(name, rdtype)


def ips(resp: dns.message.Message | None) -> list[str]:
    assert resp is not None
    assert resp.rcode() == dns.rcode.NOERROR, dns.rcode.to_text(resp.rcode())
    return [rd.address for rrset in resp.answer for rd in rrset]


# --- pure resolve ------------------------------------------------------------


def test_service_resolves_to_vip() -> None:
    resp = resolve(query("search"), records(), ttl=7)
    assert ips(resp) == ["10.0.1.2"]
    assert resp is not None
    assert resp.answer[0].ttl == 7
    assert resp.flags & dns.flags.AA and resp.flags & dns.flags.QR


def test_dnsrr_service_resolves_to_task_ips() -> None:
    assert sorted(ips(resolve(query("cache"), records()))) == ["10.0.1.8", "10.0.1.9"]


def test_tasks_name_rotates_round_robin() -> None:
    recs = records()
    answers = [ips(resolve(query("tasks.search"), recs)) for _ in range(4)]
    assert answers[0] == ["10.0.1.5", "10.0.1.6", "10.0.1.7"]
    assert answers[1] == ["10.0.1.6", "10.0.1.7", "10.0.1.5"]
    assert answers[2] == ["10.0.1.7", "10.0.1.5", "10.0.1.6"]
    assert answers[3] == answers[0]


def test_task_name_resolves_to_its_ip() -> None:
    assert ips(resolve(query("search.2"), records())) == ["10.0.1.6"]


def test_case_insensitive_and_trailing_dot() -> None:
    recs = records()
    for name in ("SeArCh", "search.", "SEARCH.", "Tasks.Cache.", "SEARCH.2."):
        assert ips(resolve(query(name), recs)), name
    resp = resolve(query("SeArCh."), recs)
    assert resp is not None
    assert resp.answer[0].name.to_text() == "SeArCh."  # owner name echoes the question


def test_unknown_undotted_name_is_nxdomain() -> None:
    resp = resolve(query("nosuchservice"), records())
    assert resp is not None and resp.rcode() == dns.rcode.NXDOMAIN
    assert not resp.answer


def test_unknown_tasks_name_is_nxdomain() -> None:
    resp = resolve(query("tasks.x"), records())
    assert resp is not None and resp.rcode() == dns.rcode.NXDOMAIN


def test_other_names_are_forwarded() -> None:
    recs = records()
    for name in ("example.com", "search.example.com", "tasks.example.com", "."):
        assert resolve(query(name), recs) is None, name


def test_aaaa_for_known_name_is_nodata() -> None:
    for name in ("search", "tasks.search", "search.2"):
        resp = resolve(query(name, "AAAA"), records())
        assert resp is not None and resp.rcode() == dns.rcode.NOERROR
        assert resp.answer == []


def test_service_without_tasks_is_nodata() -> None:
    resp = resolve(query("tasks.idle"), records())
    assert resp is not None and resp.rcode() == dns.rcode.NOERROR and resp.answer == []
    assert ips(resolve(query("idle"), records())) == ["10.0.1.3"]


def test_empty_records_give_nxdomain() -> None:
    resp = resolve(query("search"), DnsRecords())
    assert resp is not None and resp.rcode() == dns.rcode.NXDOMAIN


def test_records_normalised_and_invalid_addresses_dropped() -> None:
    recs = DnsRecords({"Web.": ("10.0.0.1", "10.0.0.1", "fe80::1", "bogus", "10.0.0.2")})
    assert recs.names == {"web": ("10.0.0.1", "10.0.0.2")}


def test_build_service_wins_over_task_and_tasks_merge() -> None:
    recs = DnsRecords.build(
        [ServiceEntry("web", "10.0.0.2", ("10.0.0.5",))],
        [TaskEntry("web", "10.0.0.9"), TaskEntry("web.1", "10.0.0.5"), TaskEntry("WEB.1", "10.0.0.6")],
    )
    assert recs.names["web"] == ("10.0.0.2",)
    assert recs.names["tasks.web"] == ("10.0.0.5",)
    assert recs.names["web.1"] == ("10.0.0.5", "10.0.0.6")


def test_non_query_opcode_is_notimp() -> None:
    q = query("search")
    q.set_opcode(dns.opcode.NOTIFY)
    resp = resolve(q, records())
    assert resp is not None and resp.rcode() == dns.rcode.NOTIMP


def test_upstreams_from_resolv_conf(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "# comment\nsearch corp.example\nnameserver 127.0.0.53\nnameserver 10.0.0.1 # x\n"
        "nameserver not-an-ip\nnameserver ::1\nnameserver 10.0.0.1\noptions ndots:2\n"
        "; nameserver 10.9.9.9\n"
    )
    assert upstreams_from_resolv_conf(str(conf)) == [("127.0.0.53", 53), ("10.0.0.1", 53), ("::1", 53)]
    assert upstreams_from_resolv_conf(str(tmp_path / "missing")) == []


# --- helpers for the socket tests ----------------------------------------------


class FakeUpstream:
    """A tiny authoritative-for-everything resolver on UPSTREAM (UDP + TCP).

    ``example.com`` A -> FAKE_EXAMPLE_IP, ``big.example.com`` -> 100 addresses,
    anything else NXDOMAIN. With ``truncate_udp`` every UDP answer is an empty
    TC response (so clients must retry over TCP).
    """

    def __init__(self, truncate_udp: bool = False) -> None:
        self.truncate_udp = truncate_udp
        self.udp_queries: list[dns.message.Message] = []
        self.tcp_queries: list[dns.message.Message] = []
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    def answer(self, q: dns.message.Message) -> dns.message.Message:
        resp = dns.message.make_response(q)
        name = q.question[0].name.to_text().lower()
        if name == "example.com.":
            resp.answer.append(dns.rrset.from_text_list(q.question[0].name, 60, "IN", "A", [FAKE_EXAMPLE_IP]))
        elif name == "big.example.com.":
            addrs = [f"192.0.2.{i}" for i in range(1, 101)]
            resp.answer.append(dns.rrset.from_text_list(q.question[0].name, 60, "IN", "A", addrs))
        else:
            resp.set_rcode(dns.rcode.NXDOMAIN)
        return resp

    async def start(self) -> None:
        outer = self

        class Proto(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = cast(asyncio.DatagramTransport, transport)

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                q = dns.message.from_wire(data)
                outer.udp_queries.append(q)
                resp: dns.message.Message
                if outer.truncate_udp:
                    resp = dns.message.make_response(q)
                    resp.flags |= dns.flags.TC
                else:
                    resp = outer.answer(q)
                self.transport.sendto(resp.to_wire(), addr)

        async def serve_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while True:
                    n = int.from_bytes(await reader.readexactly(2), "big")
                    q = dns.message.from_wire(await reader.readexactly(n))
                    outer.tcp_queries.append(q)
                    writer.write(outer.answer(q).to_wire(prepend_length=True))
                    await writer.drain()
            writer.close()

        loop = asyncio.get_running_loop()
        self._udp, _ = await loop.create_datagram_endpoint(Proto, local_addr=(UPSTREAM, 0))
        self.port = self._udp.get_extra_info("sockname")[1]
        self._tcp = await asyncio.start_server(serve_tcp, UPSTREAM, self.port)

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()


@contextlib.asynccontextmanager
async def serving(
    addrs: list[str], recs: DnsRecords | None = None, **kw: object
) -> AsyncIterator[DnsServer]:
    server = DnsServer(**kw)  # type: ignore[arg-type]
    await server.start([(ip, 0) for ip in addrs])
    if recs is not None:
        for ip in addrs:
            server.set_records(ip, recs)
    try:
        yield server
    finally:
        await server.close()


def port_of(server: DnsServer, ip: str) -> int:
    return next(p for (i, p) in server.addresses if i == ip)


async def ask_udp(server: DnsServer, ip: str, name: str, rdtype: str = "A", **kw: object) -> dns.message.Message:
    return await dns.asyncquery.udp(query(name, rdtype), ip, port=port_of(server, ip), timeout=3, **kw)  # type: ignore[arg-type]


async def ask_tcp(server: DnsServer, ip: str, name: str, rdtype: str = "A") -> dns.message.Message:
    return await dns.asyncquery.tcp(query(name, rdtype), ip, port=port_of(server, ip), timeout=3)


def no_loop_errors() -> list[dict[str, object]]:
    """Collect what reaches the loop's exception handler (tracebacks we must never produce)."""
    errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    return errors


# --- server -----------------------------------------------------------------


def test_udp_and_tcp_queries(run: Run) -> None:
    async def scenario() -> None:
        async with serving([NET_A], records()) as server:
            assert ips(await ask_udp(server, NET_A, "search")) == ["10.0.1.2"]
            assert ips(await ask_tcp(server, NET_A, "search.2")) == ["10.0.1.6"]
            resp = await ask_udp(server, NET_A, "nosuch")
            assert resp.rcode() == dns.rcode.NXDOMAIN
            resp = await ask_tcp(server, NET_A, "tasks.search", "AAAA")
            assert resp.rcode() == dns.rcode.NOERROR and not resp.answer
            assert server.stats.queries == 4 and server.stats.answered == 4

    run(scenario)


def test_set_records_takes_effect_on_next_query(run: Run) -> None:
    async def scenario() -> None:
        async with serving([NET_A]) as server:
            # no records yet: corral names are NXDOMAIN
            assert (await ask_udp(server, NET_A, "search")).rcode() == dns.rcode.NXDOMAIN
            server.set_records(NET_A, records())
            assert ips(await ask_udp(server, NET_A, "search")) == ["10.0.1.2"]
            server.set_records(NET_A, DnsRecords.build([ServiceEntry("search", "10.0.9.9", ())], []))
            assert ips(await ask_udp(server, NET_A, "search")) == ["10.0.9.9"]
            assert ips(await ask_tcp(server, NET_A, "search")) == ["10.0.9.9"]

    run(scenario)


def test_each_listening_ip_sees_its_own_records(run: Run) -> None:
    async def scenario() -> None:
        async with serving([NET_A, NET_B]) as server:
            server.set_records(NET_A, DnsRecords.build([ServiceEntry("web", "10.0.1.2", ())], []))
            server.set_records(NET_B, DnsRecords.build([ServiceEntry("web", "10.0.2.2", ())], []))
            assert ips(await ask_udp(server, NET_A, "web")) == ["10.0.1.2"]
            assert ips(await ask_udp(server, NET_B, "web")) == ["10.0.2.2"]
            assert ips(await ask_tcp(server, NET_B, "web")) == ["10.0.2.2"]
            await server.remove_listener(NET_B)
            assert [ip for ip, _ in server.addresses] == [NET_A]
            assert ips(await ask_udp(server, NET_A, "web")) == ["10.0.1.2"]
            # re-added listener has no records until set again
            await server.add_listener((NET_B, 0))
            assert (await ask_udp(server, NET_B, "web")).rcode() == dns.rcode.NXDOMAIN

    run(scenario)


def test_bind_failure_raises_oserror(run: Run) -> None:
    async def scenario() -> None:
        async with serving([NET_A]) as server:
            other = DnsServer()
            kept = await other.add_listener((NET_B, 0))
            assert other.addresses == [kept] and kept[1] != 0
            with pytest.raises(OSError):
                await other.start([(NET_B, 0), (NET_A, port_of(server, NET_A))])
            # what this start() bound before failing was unbound; the older listener stays
            assert other.addresses == [kept]
            other.set_records(NET_B, records())
            assert ips(await ask_udp(other, NET_B, "search")) == ["10.0.1.2"]
            await other.close()
            assert other.addresses == []

    run(scenario)


def test_forward_to_upstream(run: Run) -> None:
    async def scenario() -> None:
        upstream = FakeUpstream()
        await upstream.start()
        try:
            async with serving([NET_A], records(), upstreams=[(UPSTREAM, upstream.port)]) as server:
                q = query("example.com")
                resp = await dns.asyncquery.udp(q, NET_A, port=port_of(server, NET_A), timeout=3)
                assert resp.id == q.id
                assert ips(resp) == [FAKE_EXAMPLE_IP]
                assert ips(await ask_tcp(server, NET_A, "example.com")) == [FAKE_EXAMPLE_IP]
                resp = await ask_udp(server, NET_A, "nosuch.example.com")
                assert resp.rcode() == dns.rcode.NXDOMAIN
                # corral names never reach the upstream
                assert ips(await ask_udp(server, NET_A, "search")) == ["10.0.1.2"]
                assert len(upstream.udp_queries) == 3
                assert all(u.id != q.id or u is upstream.udp_queries[0] for u in upstream.udp_queries)
                # a big answer is truncated for a plain UDP client, complete over TCP
                resp = await ask_udp(server, NET_A, "big.example.com", ignore_trailing=True)
                assert resp.flags & dns.flags.TC
                assert len(ips(await ask_tcp(server, NET_A, "big.example.com"))) == 100
        finally:
            await upstream.close()

    run(scenario)


def test_forward_retries_over_tcp_when_truncated(run: Run) -> None:
    async def scenario() -> None:
        upstream = FakeUpstream(truncate_udp=True)
        await upstream.start()
        try:
            async with serving([NET_A], upstreams=[(UPSTREAM, upstream.port)]) as server:
                assert ips(await ask_udp(server, NET_A, "example.com")) == [FAKE_EXAMPLE_IP]
                assert len(upstream.udp_queries) == 1 and len(upstream.tcp_queries) == 1
        finally:
            await upstream.close()

    run(scenario)


def test_forward_skips_dead_upstream(run: Run) -> None:
    async def scenario() -> None:
        upstream = FakeUpstream()
        await upstream.start()
        try:
            ups = [(DEAD, upstream.port), (UPSTREAM, upstream.port)]
            async with serving([NET_A], upstreams=ups, forward_timeout=1.0) as server:
                t0 = time.monotonic()
                assert ips(await ask_udp(server, NET_A, "example.com")) == [FAKE_EXAMPLE_IP]
                # the dead one only gets its share (1/2) of the deadline, then the next is asked
                assert time.monotonic() - t0 < 0.9
        finally:
            await upstream.close()

    run(scenario)


def test_upstream_down_gives_servfail(run: Run) -> None:
    async def scenario() -> None:
        # a bound socket that never answers: the forward must time out
        hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        hole.bind((UPSTREAM, 0))
        try:
            ups = [(UPSTREAM, hole.getsockname()[1])]
            async with serving([NET_A], upstreams=ups, forward_timeout=0.5) as server:
                t0 = time.monotonic()
                resp = await ask_udp(server, NET_A, "example.com")
                elapsed = time.monotonic() - t0
                assert resp.rcode() == dns.rcode.SERVFAIL
                assert 0.4 < elapsed < 1.5
                resp = await ask_tcp(server, NET_A, "example.com")
                assert resp.rcode() == dns.rcode.SERVFAIL
                assert server.stats.forward_failures == 2
            # nothing listening at the upstream address, or no upstreams at all
            for ups in ([(DEAD, 5353)], []):
                async with serving([NET_A], upstreams=ups, forward_timeout=0.5) as server:
                    t0 = time.monotonic()
                    resp = await ask_udp(server, NET_A, "example.com")
                    assert resp.rcode() == dns.rcode.SERVFAIL
                    assert time.monotonic() - t0 < 1.5
        finally:
            hole.close()

    run(scenario)


def test_fast_path_matches_resolve() -> None:
    """The server's wire-level fast path gives what resolve() gives, or defers to it."""
    from corral.dataplane.dns import FORWARD, _fast_answer

    names = ["search", "SEARCH.", "tasks.search", "search.2", "cache", "tasks.idle", "nosuch",
             "tasks.x", "example.com", "tasks.example.com", "a_b-c", "."]
    for name in names:
        for rdtype in ("A", "AAAA", "ANY", "MX"):
            for edns in (-1, 0):
                q = dns.message.make_query(name, rdtype, use_edns=edns)
                fast_recs, slow_recs = records(), records()
                fast = _fast_answer(q.to_wire(), fast_recs, 5, tcp=False)
                slow = resolve(q, slow_recs, 5)
                if fast is None:
                    assert name == "."  # the root is left to the dnspython path
                    continue
                if fast == FORWARD:
                    assert slow is None, name
                    continue
                assert slow is not None
                got = dns.message.from_wire(fast)
                assert got.id == q.id and got.flags == slow.flags, (name, rdtype)
                assert got.rcode() == slow.rcode() and got.question == slow.question
                assert got.answer == slow.answer and got.edns == slow.edns, (name, rdtype, edns)
                if got.answer:
                    assert got.answer[0].ttl == 5
    # anything unusual is left to the dnspython path
    notify = query("search")
    notify.set_opcode(dns.opcode.NOTIFY)
    two = query("search")
    two.question.append(query("cache").question[0])
    edns1 = dns.message.make_query("search", "A", use_edns=1)
    cookie = dns.message.make_query("search", "A", options=[dns.edns.CookieOption(b"12345678", b"")])
    for odd in (notify, two, edns1, cookie):
        assert _fast_answer(odd.to_wire(), records(), 5, tcp=False) is None
    for junk in (b"", b"\x00" * 11, b"\x00" * 17, bytes(range(256)), query("search").to_wire() + b"x"):
        assert _fast_answer(junk, records(), 5, tcp=False) is None


def test_big_local_answer_truncated_over_udp(run: Run) -> None:
    async def scenario() -> None:
        many = tuple(f"10.0.{i // 250}.{i % 250 + 1}" for i in range(100))
        recs = DnsRecords.build([ServiceEntry("wide", None, many)], [])
        async with serving([NET_A], recs) as server:
            resp = await ask_udp(server, NET_A, "wide", ignore_trailing=True)
            assert resp.flags & dns.flags.TC and len(resp.to_wire()) <= 512
            q = dns.message.make_query("wide", "A", use_edns=0, payload=4096)
            resp = await dns.asyncquery.udp(q, NET_A, port=port_of(server, NET_A), timeout=3)
            assert not resp.flags & dns.flags.TC and len(ips(resp)) == 100
            assert sorted(ips(await ask_tcp(server, NET_A, "wide"))) == sorted(many)

    run(scenario)


def test_default_forward_timeout_is_two_seconds() -> None:
    assert DnsServer().forward_timeout == 2.0 and DnsServer().ttl == 5


def test_garbage_does_not_kill_the_server(run: Run, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        errors = no_loop_errors()
        loop = asyncio.get_running_loop()
        async with serving([NET_A], records()) as server:
            port = port_of(server, NET_A)
            got: asyncio.Queue[bytes] = asyncio.Queue()

            class Client(asyncio.DatagramProtocol):
                def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                    got.put_nowait(data)

            transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=(NET_A, port))
            try:
                for junk in (
                    b"",
                    b"\x00",
                    b"\xff" * 5,  # shorter than a header: dropped
                    b"\x00\x01\x81\x80" + b"\x00" * 8,  # a response (QR set): dropped
                    bytes(range(256)),  # header readable, counts absurd: FORMERR, id 0x0001
                    b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff\xff",  # bad question
                    b"\x56\x78\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01",  # loop
                ):
                    transport.sendto(junk)
                replies = [dns.message.from_wire(await asyncio.wait_for(got.get(), 2)) for _ in range(3)]
                await asyncio.sleep(0.1)
                assert got.empty()
            finally:
                transport.close()
            assert sorted(r.id for r in replies) == [0x0001, 0x1234, 0x5678]
            assert all(r.rcode() == dns.rcode.FORMERR and r.flags & dns.flags.QR for r in replies)
            assert ips(await ask_udp(server, NET_A, "search")) == ["10.0.1.2"]

            # TCP: garbage body, truncated frame, zero length
            for junk in (b"\x00\x05hello", b"\x00\x20\x01\x02", b"\x00\x00", b"\x00\x0e" + bytes(range(14))):
                reader, writer = await asyncio.open_connection(NET_A, port)
                writer.write(junk)
                await writer.drain()
                with contextlib.suppress(ConnectionError):
                    writer.write_eof()
                with contextlib.suppress(ConnectionError):
                    await asyncio.wait_for(reader.read(), 2)  # server answers/closes, never hangs
                writer.close()
            assert ips(await ask_tcp(server, NET_A, "search")) == ["10.0.1.2"]
            assert server.stats.malformed >= 8
        assert errors == []

    with caplog.at_level(logging.DEBUG):
        run(scenario)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


def test_close_with_open_tcp_connection(run: Run) -> None:
    async def scenario() -> None:
        errors = no_loop_errors()
        async with serving([NET_A], records()) as server:
            reader, writer = await asyncio.open_connection(NET_A, port_of(server, NET_A))
            writer.write(query("search").to_wire(prepend_length=True))
            n = int.from_bytes(await reader.readexactly(2), "big")
            assert ips(dns.message.from_wire(await reader.readexactly(n))) == ["10.0.1.2"]
        # server closed while the client still holds the connection: it gets EOF
        assert await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()
        assert errors == []

    run(scenario)


def test_udp_throughput(run: Run) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with serving([NET_A], records()) as server:
            waiter: list[asyncio.Future[bytes]] = []

            class Client(asyncio.DatagramProtocol):
                def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                    if waiter and not waiter[0].done():
                        waiter[0].set_result(data)

            transport, _ = await loop.create_datagram_endpoint(
                Client, remote_addr=(NET_A, port_of(server, NET_A))
            )
            wire = query("tasks.search").to_wire()
            n = 2000
            t0 = time.perf_counter()
            for _ in range(n):
                fut = loop.create_future()
                waiter[:] = [fut]
                transport.sendto(wire)
                await asyncio.wait_for(fut, 2)
            elapsed = time.perf_counter() - t0
            transport.close()
            print(f"\n[{type(loop).__module__}] sequential UDP: {n / elapsed:,.0f} queries/s")
            assert len(ips(dns.message.from_wire(fut.result()))) == 3

    run(scenario)
