"""The PROXY protocol codec (corral.dataplane.proxyproto): pure, no sockets."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from typing import Any

import pytest

from corral.dataplane.proxyproto import (
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    encode_v1,
    encode_v2,
    looks_like_proxy,
    parse,
)

SIG = V2_SIGNATURE


def v2(ver_cmd: int, fam: int, block: bytes, length: int | None = None) -> bytes:
    """A hand-built v2 header (``length`` overrides the real block length)."""
    n = len(block) if length is None else length
    return SIG + bytes([ver_cmd, fam]) + struct.pack("!H", n) + block


V4_BLOCK = bytes([203, 0, 113, 7, 10, 0, 0, 1]) + struct.pack("!HH", 5555, 80)


# ------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    ("src", "dst", "family"),
    [
        (("203.0.113.7", 5555), ("10.0.0.1", 80), "TCP4"),
        (("0.0.0.0", 0), ("255.255.255.255", 65535), "TCP4"),
        (("2001:db8::1", 40000), ("2001:db8::2", 443), "TCP6"),
        (("::", 0), ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535), "TCP6"),
    ],
)
def test_v1_round_trip(src: tuple[str, int], dst: tuple[str, int], family: str) -> None:
    raw = encode_v1(src, dst)
    assert raw.startswith(f"PROXY {family} ".encode()) and raw.endswith(b"\r\n")
    assert len(raw) <= V1_MAX_LENGTH
    want = ProxyHeader(1, "PROXY", family, src, dst)  # type: ignore[arg-type]
    assert parse(raw + b"GET / HTTP/1.1\r\n") == (want, len(raw))


def test_v1_exact_text() -> None:
    assert encode_v1(("203.0.113.7", 5555), ("10.0.0.1", 80)) == (
        b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 80\r\n"
    )
    # Addresses are canonicalised on the way out and on the way in.
    assert encode_v1(("2001:DB8:0::1", 1), ("::1", 2)) == b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n"
    header, _ = parse(b"PROXY TCP6 2001:DB8:0:0::1 ::1 1 2\r\n") or pytest.fail("incomplete")
    assert header.src == ("2001:db8::1", 1)


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
@pytest.mark.parametrize(
    ("src", "dst", "ip"),
    [
        (("203.0.113.7", 5555), ("10.0.0.1", 80), "4"),
        (("2001:db8::1", 40000), ("fe80::2", 443), "6"),
    ],
)
def test_v2_round_trip(src: tuple[str, int], dst: tuple[str, int], ip: str, protocol: str) -> None:
    raw = encode_v2(src, dst, protocol=protocol)  # type: ignore[arg-type]
    assert raw.startswith(SIG) and raw[12] == 0x21
    assert len(raw) == 16 + (12 if ip == "4" else 36)
    family = ("TCP" if protocol == "tcp" else "UDP") + ip
    want = ProxyHeader(2, "PROXY", family, src, dst)  # type: ignore[arg-type]
    assert parse(raw + b"\x00rest") == (want, len(raw))


def test_v2_exact_bytes() -> None:
    raw = encode_v2(("203.0.113.7", 5555), ("10.0.0.1", 80))
    assert raw == v2(0x21, 0x11, V4_BLOCK)


def test_encode_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        encode_v1(("1.2.3.4", 1), ("::1", 2))  # mixed families
    with pytest.raises(ValueError):
        encode_v2(("1.2.3.4", 1), ("5.6.7.8", 65536))
    with pytest.raises(ValueError):
        encode_v1(("not-an-ip", 1), ("5.6.7.8", 2))
    with pytest.raises(ValueError):
        encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs=[(256, b"")])


def test_encode_drops_ipv6_zone() -> None:
    assert encode_v1(("fe80::1%eth0", 1), ("fe80::2", 2)) == b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n"


# ------------------------------------------------------------- incremental


@pytest.mark.parametrize(
    "raw",
    [
        encode_v1(("203.0.113.7", 5555), ("10.0.0.1", 80)),
        encode_v1(("2001:db8::1", 65535), ("2001:db8::2", 0)),
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN ffff:f::1 ffff:f::2 1 2\r\n",
        encode_v2(("203.0.113.7", 5555), ("10.0.0.1", 80)),
        encode_v2(("2001:db8::1", 1), ("2001:db8::2", 2), protocol="udp", tlvs=[(0x02, b"a.b")]),
        v2(0x20, 0x00, b""),
    ],
    ids=["v1-tcp4", "v1-tcp6", "v1-unknown", "v1-unknown-addrs",
         "v2-tcp4", "v2-udp6-tlv", "v2-local"],  # fmt: skip
)
def test_every_prefix_is_incomplete(raw: bytes) -> None:
    whole = parse(raw)
    assert whole is not None and whole[1] == len(raw)
    for i in range(len(raw)):
        assert parse(raw[:i]) is None, i
    tail = b"GET / HTTP/1.1\r\n\r\n"
    assert parse(raw + tail) == whole


def test_looks_like_proxy() -> None:
    assert looks_like_proxy(b"") is None
    assert looks_like_proxy(b"PROX") is None
    assert looks_like_proxy(b"PROXY") is None
    assert looks_like_proxy(b"PROXY ") is True
    assert looks_like_proxy(b"PROXY garbage") is True
    assert looks_like_proxy(SIG[:11]) is None
    assert looks_like_proxy(SIG) is True
    assert looks_like_proxy(SIG + b"\x21") is True
    for http in (b"GET / HTTP/1.1\r\n", b"POST", b"PUT", b"PATCH", b"\r\n\r\nGET", b"X"):
        assert looks_like_proxy(http) is False, http
    assert looks_like_proxy(b"PROXY_") is False
    assert looks_like_proxy(SIG[:6] + b"x") is False


# ------------------------------------------------------------- special headers


def test_v1_unknown_is_local() -> None:
    for raw in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN anything \xff at all\r\n"):
        assert parse(raw + b"x") == (ProxyHeader(1, "LOCAL", "UNKNOWN", None, None), len(raw))


def test_v2_local() -> None:
    raw = v2(0x20, 0x00, b"")
    assert parse(raw + b"GET") == (ProxyHeader(2, "LOCAL", "UNKNOWN", None, None), 16)
    # LOCAL ignores the family byte and the whole block, even a weird one.
    raw = v2(0x20, 0xFF, b"\x01\x02\x03")
    assert parse(raw) == (ProxyHeader(2, "LOCAL", "UNKNOWN", None, None), 19)


def test_v2_unspec_and_unix_have_no_addresses() -> None:
    assert parse(v2(0x21, 0x00, b"ignored")) == (ProxyHeader(2, "PROXY", "UNKNOWN", None, None), 23)
    unix = b"/tmp/a".ljust(108, b"\x00") + b"/tmp/b".ljust(108, b"\x00")
    header, used = parse(v2(0x21, 0x31, unix + b"\x04\x00\x00")) or pytest.fail("incomplete")
    assert (header.family, header.src, header.tlvs) == ("UNKNOWN", None, ((4, b""),))
    assert used == 16 + 216 + 3


def test_v2_tlvs_are_kept_and_skipped() -> None:
    tlvs = [(0x02, b"example.com"), (0x04, b""), (0x20, b"\x01" + b"\x00" * 4), (0xEE, b"x" * 300)]
    raw = encode_v2(("192.0.2.1", 1234), ("192.0.2.2", 443), tlvs=tlvs)
    header, used = parse(raw + b"payload") or pytest.fail("incomplete")
    assert used == len(raw)
    assert header.src == ("192.0.2.1", 1234) and header.tlvs == tuple(tlvs)
    # Hand-built: the address block followed by a TLV, len covers both.
    hand = v2(0x21, 0x11, V4_BLOCK + b"\x01\x00\x02h2")
    assert parse(hand) == (
        ProxyHeader(2, "PROXY", "TCP4", ("203.0.113.7", 5555), ("10.0.0.1", 80), ((1, b"h2"),)),
        len(hand),
    )


def test_v2_big_header_allowed() -> None:
    raw = encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs=[(0xE0, b"z" * 65000)])
    assert parse(raw[:-1]) is None
    result = parse(raw)
    assert result is not None and result[1] == len(raw) > 65000


# ------------------------------------------------------------- malformed

MALFORMED: list[tuple[str, bytes]] = [
    ("not-proxy", b"GET / HTTP/1.1\r\n"),
    ("v1-lowercase", b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("v1-no-space", b"PROXYTCP4"),
    ("v1-garbage", b"PROXY garbage\r\n"),
    ("v1-bad-proto", b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("v1-udp", b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("v1-too-long", b"PROXY UNKNOWN " + b"x" * 100),
    ("v1-too-long-crlf", b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n"),
    ("v1-missing-field", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"),
    ("v1-extra-field", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n"),
    ("v1-double-space", b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n"),
    ("v1-trailing-space", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n"),
    ("v1-bad-ipv4", b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n"),
    ("v1-short-ipv4", b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n"),
    ("v1-leading-zero-ip", b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n"),
    ("v1-v6-in-tcp4", b"PROXY TCP4 ::1 ::2 1 2\r\n"),
    ("v1-v4-in-tcp6", b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("v1-v6-zone", b"PROXY TCP6 fe80::1%eth0 ::2 1 2\r\n"),
    ("v1-bad-ipv6", b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::2 1 2\r\n"),
    ("v1-port-too-big", b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n"),
    ("v1-port-negative", b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n"),
    ("v1-port-leading-zero", b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n"),
    ("v1-port-hex", b"PROXY TCP4 1.2.3.4 5.6.7.8 0x50 2\r\n"),
    ("v1-port-empty", b"PROXY TCP4 1.2.3.4 5.6.7.8  2\r\n"),
    ("v1-bare-lf", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"),
    ("v1-cr-then-junk", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX"),
    ("v1-non-ascii", b"PROXY TCP4 1.2.3.\xff 5.6.7.8 1 2\r\n"),
    ("v1-unicode-digit", "PROXY TCP4 1.2.3.4 5.6.7.8 \u0661 2\r\n".encode()),
    ("v1-unknownx", b"PROXY UNKNOWNX\r\n"),
    ("v2-bad-signature", SIG[:11] + b"X" + b"\x21\x11\x00\x0c" + V4_BLOCK),
    ("v2-version-1", v2(0x11, 0x11, V4_BLOCK)),
    ("v2-version-3", v2(0x31, 0x11, V4_BLOCK)),
    ("v2-command-2", v2(0x22, 0x11, V4_BLOCK)),
    ("v2-command-f", v2(0x2F, 0x11, V4_BLOCK)),
    ("v2-family-40", v2(0x21, 0x41, V4_BLOCK)),
    ("v2-family-10", v2(0x21, 0x10, V4_BLOCK)),
    ("v2-family-13", v2(0x21, 0x13, V4_BLOCK)),
    ("v2-inet-too-short", v2(0x21, 0x11, V4_BLOCK[:11])),
    ("v2-inet6-too-short", v2(0x21, 0x21, b"\x00" * 35)),
    ("v2-unix-too-short", v2(0x21, 0x31, b"\x00" * 215)),
    ("v2-truncated-tlv", v2(0x21, 0x11, V4_BLOCK + b"\x01\x00")),
    ("v2-tlv-overrun", v2(0x21, 0x11, V4_BLOCK + b"\x01\x00\x05abc")),
]


@pytest.mark.parametrize("raw", [m[1] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_raises(raw: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse(raw)


def test_malformed_detected_early() -> None:
    """Bad input fails as soon as it cannot become valid, not at the CRLF."""
    for raw in (
        b"PROXY g",
        b"PROXY TCP4 1.2.3.4.5",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 65536",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ",
        b"PROXY TCP6 ::1%",
        SIG + b"\x31",
        SIG + b"\x21\x41",
        SIG + b"\x21\x11\x00\x0b",
    ):
        with pytest.raises(ProxyProtocolError):
            parse(raw)


def test_error_is_a_value_error() -> None:
    assert issubclass(ProxyProtocolError, ValueError)


# ------------------------------------------------------------- property-based
# hypothesis is optional: each property imports it with importorskip, so only
# these tests are skipped when it is missing.


Property = Callable[..., None]
Decorator = Callable[..., Callable[[Property], Callable[[], None]]]


def _hypothesis() -> tuple[Decorator, Decorator, Any]:
    """(given, settings, strategies), or skip the calling test.

    ``settings`` is wrapped to never write an example database into the repo.
    """
    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    def settings(**kw: Any) -> Callable[[Property], Callable[[], None]]:
        return hypothesis.settings(database=None, **kw)  # type: ignore[no-any-return]

    return hypothesis.given, settings, st


def _pairs(st: Any) -> Any:
    """Strategy: (src, dst) endpoints of the same IP version."""
    ports = st.integers(0, 65535)
    v4 = st.ip_addresses(v=4).map(str)
    v6 = st.ip_addresses(v=6).map(str)
    return st.one_of(
        st.tuples(st.tuples(v4, ports), st.tuples(v4, ports)),
        st.tuples(st.tuples(v6, ports), st.tuples(v6, ports)),
    )


def _checked_parse(data: bytes) -> tuple[ProxyHeader, int] | None:
    """parse(), treating ProxyProtocolError as None; anything else propagates."""
    try:
        result = parse(data)
    except ProxyProtocolError:
        return None
    if result is not None:
        assert 0 < result[1] <= len(data)
    return result


def test_fuzz_arbitrary_bytes_only_raise_protocol_error() -> None:
    given, settings, st = _hypothesis()

    @settings(max_examples=1000, deadline=None)
    @given(st.binary(max_size=300))
    def arbitrary(data: bytes) -> None:
        _checked_parse(data)
        looks_like_proxy(data)

    prefixes = [b"P", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 ", SIG, SIG + b"\x21\x11", SIG + b"\x20"]  # fmt: skip

    @settings(max_examples=1000, deadline=None)
    @given(st.sampled_from(prefixes), st.binary(max_size=120))
    def near_valid(prefix: bytes, tail: bytes) -> None:
        _checked_parse(prefix + tail)

    @settings(max_examples=500, deadline=None)
    @given(_pairs(st), st.integers(0, 200), st.integers(0, 255))
    def one_byte_flipped(pair: Any, where: int, value: int) -> None:
        raw = bytearray(encode_v1(*pair) if where % 2 else encode_v2(*pair))
        raw[where % len(raw)] = value
        _checked_parse(bytes(raw))

    arbitrary()
    near_valid()
    one_byte_flipped()


def test_fuzz_addresses_round_trip() -> None:
    given, settings, st = _hypothesis()

    @settings(max_examples=500, deadline=None)
    @given(_pairs(st), st.sampled_from(["tcp", "udp"]))
    def round_trip(pair: tuple[tuple[str, int], tuple[str, int]], proto: str) -> None:
        src, dst = pair
        want_src = (str(ipaddress.ip_address(src[0])), src[1])
        want_dst = (str(ipaddress.ip_address(dst[0])), dst[1])
        raw1 = encode_v1(src, dst)
        h1, n1 = parse(raw1) or pytest.fail("incomplete v1")
        assert (h1.version, h1.command, h1.src, h1.dst) == (1, "PROXY", want_src, want_dst)
        assert n1 == len(raw1)
        raw2 = encode_v2(src, dst, protocol=proto)  # type: ignore[arg-type]
        h2, n2 = parse(raw2) or pytest.fail("incomplete v2")
        assert (h2.version, h2.command, h2.src, h2.dst) == (2, "PROXY", want_src, want_dst)
        assert n2 == len(raw2)
        assert h2.family == ("TCP" if proto == "tcp" else "UDP") + h1.family[-1]

    round_trip()


def test_fuzz_any_split_parses_identically() -> None:
    given, settings, st = _hypothesis()
    tlvs = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4)
    valid = st.one_of(
        _pairs(st).map(lambda p: encode_v1(*p)),
        st.tuples(_pairs(st), st.sampled_from(["tcp", "udp"]), tlvs).map(
            lambda t: encode_v2(*t[0], protocol=t[1], tlvs=t[2])
        ),
        st.just(b"PROXY UNKNOWN\r\n"),
        st.just(SIG + b"\x20\x00\x00\x00"),
    )

    @settings(max_examples=500, deadline=None)
    @given(valid, st.binary(max_size=20), st.data())
    def split(raw: bytes, tail: bytes, data: Any) -> None:
        stream = raw + tail
        whole = parse(stream)
        assert whole is not None and whole[1] == len(raw)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
        got = None
        for cut in [*cuts, len(stream)]:
            # Feed the stream as it would arrive: everything up to each cut.
            got = parse(stream[:cut])
            if got is not None:
                assert cut >= len(raw)
                break
            assert cut < len(raw)
        assert got == whole

    split()


def test_v1_length_boundary() -> None:
    ok = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
    assert len(ok) == V1_MAX_LENGTH
    assert parse(ok) == (ProxyHeader(1, "LOCAL", "UNKNOWN", None, None), V1_MAX_LENGTH)
    assert parse(ok[:-1]) is None  # the LF may still come
    with pytest.raises(ProxyProtocolError):
        parse(ok[:-1] + b"x")  # 107 bytes and no CRLF in sight
