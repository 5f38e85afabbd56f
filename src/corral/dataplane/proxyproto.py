"""The HAProxy PROXY protocol, versions 1 (text) and 2 (binary). Pure: no I/O.

How this works: a proxy that forwards a TCP connection can prepend one header
telling the server who the real client was (haproxy's doc/proxy-protocol.txt).

* v1 is one ASCII line of at most 107 bytes including the CRLF:
  ``PROXY TCP4 <src> <dst> <sport> <dport>\\r\\n`` (``TCP6`` for IPv6), or
  ``PROXY UNKNOWN[ <anything>]\\r\\n`` when the addresses are not known.
* v2 is a 12-byte signature, a version/command byte (``0x21`` PROXY,
  ``0x20`` LOCAL), a family/transport byte, a big-endian 16-bit length, then
  that many bytes: the address block (12 bytes IPv4, 36 IPv6, 216 unix)
  followed by optional TLVs (type byte, 16-bit length, value).

:func:`parse` is incremental: feed it everything received so far; it returns
``None`` while the bytes are a valid but incomplete header, ``(header,
consumed)`` once complete (bytes after ``consumed`` belong to the application),
and raises :class:`ProxyProtocolError` as soon as the bytes cannot be the start
of a valid header. It only looks at the data it is given, does bounded work
(a v1 line is at most 107 bytes, a v2 header at most 16 + 65535 bytes) and
raises nothing but :class:`ProxyProtocolError`.

Receiver policy (strict where the spec allows it):

* v1: single spaces between fields; TCP4 addresses dotted-quad without leading
  zeros; TCP6 addresses without a zone (``%eth0``); ports decimal 0..65535
  without leading zeros; ``UNKNOWN`` ignores the rest of the line and is
  reported as a LOCAL header (use the socket's own endpoints).
* v2: version nibble must be 2, command LOCAL or PROXY; for PROXY the
  family byte must be one of the seven defined values and the length must
  cover the address block; TLVs must tile the rest of the header exactly.
  LOCAL headers ignore the family and the whole block. AF_UNSPEC and AF_UNIX
  PROXY headers are accepted but carry no (IP) addresses: family
  ``"UNKNOWN"``, ``src``/``dst`` ``None``.

Addresses are reported in canonical text form (``str(ipaddress.ip_address())``),
so ``"2001:DB8:0::1"`` comes back as ``"2001:db8::1"``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyProtocolError",
    "encode_v1",
    "encode_v2",
    "looks_like_proxy",
    "parse",
]

V1_PREFIX: Final = b"PROXY "
V1_MAX_LENGTH: Final = 107  # whole line, CRLF included
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_LENGTH: Final = 16  # signature + ver/cmd + family + length

_V2_VERSION: Final = 0x2
_V2_LOCAL: Final = 0x0
_V2_PROXY: Final = 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM, _DGRAM = 0x1, 0x2
# The only family/transport bytes a receiver may accept (spec, section 2.2).
_V2_FAMILIES: Final = frozenset({0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32})
_V2_ADDR_LEN: Final = {_AF_UNSPEC: 0, _AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}
_V2_NAMES: Final[dict[int, Literal["TCP4", "TCP6", "UDP4", "UDP6"]]] = {
    0x11: "TCP4",
    0x12: "UDP4",
    0x21: "TCP6",
    0x22: "UDP6",
}

_DIGITS: Final = frozenset("0123456789")
_V4_CHARS: Final = _DIGITS | {"."}
_V6_CHARS: Final = _DIGITS | set("abcdefABCDEF:.")
_V4_MAX_TEXT: Final = len("255.255.255.255")
_V6_MAX_TEXT: Final = len("ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255")

Address = tuple[str, int]


class ProxyProtocolError(ValueError):
    """The bytes are not (the start of) a valid PROXY protocol header."""


@dataclass(frozen=True)
class ProxyHeader:
    """One decoded header.

    ``command`` is ``"LOCAL"`` for v2 LOCAL and for v1 ``UNKNOWN`` headers:
    the receiver should use the connection's own endpoints; ``src``/``dst``
    are then ``None``. ``tlvs`` holds v2 TLVs as ``(type, value)`` in order
    (not interpreted, not verified: e.g. a CRC32C TLV is not checked).
    """

    version: Literal[1, 2]
    command: Literal["PROXY", "LOCAL"]
    family: Literal["TCP4", "TCP6", "UDP4", "UDP6", "UNKNOWN"]
    src: Address | None
    dst: Address | None
    tlvs: tuple[tuple[int, bytes], ...] = ()


# ---------------------------------------------------------------- encoding


_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _endpoints(src: Address, dst: Address) -> tuple[_IP, _IP]:
    """Validate both endpoints (same IP version, ports in range), zones dropped."""
    ips: list[_IP] = []
    for host, port in (src, dst):
        ip = ipaddress.ip_address(host)
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
            ip = ipaddress.IPv6Address(int(ip))  # the wire format has no zone
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
            raise ValueError(f"port out of range: {port!r}")
        ips.append(ip)
    if ips[0].version != ips[1].version:
        raise ValueError(f"source and destination differ in IP version: {src[0]!r}, {dst[0]!r}")
    return ips[0], ips[1]


def encode_v1(src: Address, dst: Address) -> bytes:
    """The v1 text line for a TCP connection (``TCP4`` or ``TCP6`` by address)."""
    s, d = _endpoints(src, dst)
    proto = "TCP4" if s.version == 4 else "TCP6"
    return f"PROXY {proto} {s} {d} {src[1]} {dst[1]}\r\n".encode("ascii")


def encode_v2(
    src: Address,
    dst: Address,
    *,
    protocol: Literal["tcp", "udp"] = "tcp",
    tlvs: Iterable[tuple[int, bytes]] = (),
) -> bytes:
    """The v2 binary header, command PROXY, AF_INET or AF_INET6 by address."""
    s, d = _endpoints(src, dst)
    if protocol not in ("tcp", "udp"):
        raise ValueError(f"protocol must be 'tcp' or 'udp', not {protocol!r}")
    af = _AF_INET if s.version == 4 else _AF_INET6
    fam = (af << 4) | (_STREAM if protocol == "tcp" else _DGRAM)
    block = s.packed + d.packed + src[1].to_bytes(2, "big") + dst[1].to_bytes(2, "big")
    for kind, value in tlvs:
        if not 0 <= kind <= 0xFF or len(value) > 0xFFFF:
            raise ValueError(f"bad TLV: type {kind!r}, {len(value)} bytes")
        block += bytes([kind]) + len(value).to_bytes(2, "big") + bytes(value)
    if len(block) > 0xFFFF:
        raise ValueError(f"v2 header too long: {len(block)} bytes after the fixed part")
    ver_cmd = (_V2_VERSION << 4) | _V2_PROXY
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + len(block).to_bytes(2, "big") + block


# ---------------------------------------------------------------- decoding


def looks_like_proxy(data: bytes) -> bool | None:
    """Whether ``data`` starts with a PROXY header signature (v1 or v2).

    ``None`` while ``data`` is a proper prefix of ``b"PROXY "`` or of the v2
    signature (too short to tell); otherwise ``True``/``False``.
    """
    for sig in (V1_PREFIX, V2_SIGNATURE):
        n = min(len(data), len(sig))
        if data[:n] == sig[:n]:
            return True if n == len(sig) else None
    return False


def parse(data: bytes) -> tuple[ProxyHeader, int] | None:
    """Decode the header at the start of ``data``.

    Returns ``None`` if more bytes are needed, ``(header, consumed)`` when the
    header is complete; raises :class:`ProxyProtocolError` if invalid.
    """
    if not data:
        return None
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data)
    if data[0] == V1_PREFIX[0]:
        return _parse_v1(data)
    raise ProxyProtocolError("not a PROXY protocol header")


def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | None:
    n = min(len(data), len(V1_PREFIX))
    if data[:n] != V1_PREFIX[:n]:
        raise ProxyProtocolError("bad v1 signature")
    if n < len(V1_PREFIX):
        return None
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end >= 0:
        return _v1_line(data[len(V1_PREFIX) : end]), end + 2
    if len(data) >= V1_MAX_LENGTH:
        raise ProxyProtocolError(f"v1 header longer than {V1_MAX_LENGTH} bytes")
    _v1_partial(data[len(V1_PREFIX) :])
    return None


def _v1_line(rest: bytes) -> ProxyHeader:
    """Decode what follows ``PROXY `` up to (not including) the CRLF."""
    if rest == b"UNKNOWN" or rest.startswith(b"UNKNOWN "):
        return ProxyHeader(1, "LOCAL", "UNKNOWN", None, None)
    try:
        text = rest.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("v1 header is not ASCII") from None
    parts = text.split(" ")
    proto = parts[0]
    if proto not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"bad v1 protocol: {proto[:16]!r}")
    if len(parts) != 5:
        raise ProxyProtocolError(f"v1 {proto} header needs 4 fields, got {len(parts) - 1}")
    src = (_v1_addr(parts[1], proto), _v1_port(parts[3]))
    dst = (_v1_addr(parts[2], proto), _v1_port(parts[4]))
    return ProxyHeader(1, "PROXY", "TCP4" if proto == "TCP4" else "TCP6", src, dst)


def _v1_addr(text: str, proto: str) -> str:
    chars, longest = (_V4_CHARS, _V4_MAX_TEXT) if proto == "TCP4" else (_V6_CHARS, _V6_MAX_TEXT)
    if not text or len(text) > longest or not set(text) <= chars:
        raise ProxyProtocolError(f"bad v1 {proto} address: {text[:48]!r}")
    try:
        ip = ipaddress.IPv4Address(text) if proto == "TCP4" else ipaddress.IPv6Address(text)
    except ValueError:
        raise ProxyProtocolError(f"bad v1 {proto} address: {text!r}") from None
    return str(ip)


def _v1_addr_prefix(text: str, proto: str) -> bool:
    """Whether ``text`` can still be completed into a valid address (cheap checks)."""
    if proto == "TCP6":
        return len(text) <= _V6_MAX_TEXT and set(text) <= _V6_CHARS and ":::" not in text
    octets = text.split(".")
    if len(text) > _V4_MAX_TEXT or not set(text) <= _V4_CHARS or len(octets) > 4:
        return False
    for i, octet in enumerate(octets):
        last = i == len(octets) - 1
        if (not octet and not last) or len(octet) > 3 or (len(octet) > 1 and octet[0] == "0"):
            return False
        if octet and int(octet) > 255:
            return False
    return True


def _v1_port(text: str) -> int:
    if not 1 <= len(text) <= 5 or not set(text) <= _DIGITS or (text[0] == "0" and text != "0"):
        raise ProxyProtocolError(f"bad v1 port: {text[:16]!r}")
    port = int(text)
    if port > 0xFFFF:
        raise ProxyProtocolError(f"v1 port out of range: {port}")
    return port


def _v1_partial(rest: bytes) -> None:
    """Raise unless ``rest`` (after ``PROXY ``, no CRLF yet) can still become valid."""
    if rest.startswith(b"UNKNOWN ") or b"UNKNOWN".startswith(rest) or rest == b"UNKNOWN\r":
        return  # UNKNOWN: the rest of the line is ignored
    if rest.endswith(b"\r"):
        _v1_line(rest[:-1])  # only a LF may follow: the line must already be whole
        return
    try:
        text = rest.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("v1 header is not ASCII") from None
    parts = text.split(" ")
    if len(parts) > 5:
        raise ProxyProtocolError("too many fields in v1 header")
    proto = parts[0]
    if len(parts) == 1:
        if not ("TCP4".startswith(proto) or "TCP6".startswith(proto)):
            raise ProxyProtocolError(f"bad v1 protocol: {proto[:16]!r}")
        return
    if proto not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"bad v1 protocol: {proto[:16]!r}")
    *whole, last = parts[1:]
    for i, field in enumerate(whole):
        if i < 2:
            _v1_addr(field, proto)
        else:
            _v1_port(field)
    if len(whole) < 2:  # an address still being received
        if not _v1_addr_prefix(last, proto):
            raise ProxyProtocolError(f"bad v1 {proto} address: {last[:48]!r}")
    elif last:  # a port still being received
        if len(last) > 5 or not set(last) <= _DIGITS or (last[0] == "0" and last != "0"):
            raise ProxyProtocolError(f"bad v1 port: {last[:16]!r}")
        if int(last) > 0xFFFF:
            raise ProxyProtocolError(f"v1 port out of range: {last}")


def _parse_v2(data: bytes) -> tuple[ProxyHeader, int] | None:
    n = min(len(data), len(V2_SIGNATURE))
    if data[:n] != V2_SIGNATURE[:n]:
        raise ProxyProtocolError("bad v2 signature")
    if len(data) <= 12:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != _V2_VERSION:
        raise ProxyProtocolError(f"unsupported v2 version {version}")
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyProtocolError(f"unsupported v2 command {command}")
    if len(data) <= 13:
        return None
    fam = data[13]
    if command == _V2_PROXY and fam not in _V2_FAMILIES:
        raise ProxyProtocolError(f"unsupported v2 family/transport 0x{fam:02x}")
    if len(data) < V2_HEADER_LENGTH:
        return None
    length = int.from_bytes(data[14:16], "big")
    af = fam >> 4
    if command == _V2_PROXY and length < _V2_ADDR_LEN[af]:
        raise ProxyProtocolError(f"v2 length {length} too short for family 0x{fam:02x}")
    total = V2_HEADER_LENGTH + length
    if len(data) < total:
        return None
    if command == _V2_LOCAL:  # family and block are to be ignored
        return ProxyHeader(2, "LOCAL", "UNKNOWN", None, None), total
    if af == _AF_UNSPEC:  # no address information, block ignored
        return ProxyHeader(2, "PROXY", "UNKNOWN", None, None), total
    block = data[V2_HEADER_LENGTH:total]
    cut = _V2_ADDR_LEN[af]
    tlvs = _v2_tlvs(block[cut:])
    if af == _AF_UNIX:
        return ProxyHeader(2, "PROXY", "UNKNOWN", None, None, tlvs), total
    size = 4 if af == _AF_INET else 16
    ips = [ipaddress.ip_address(block[i : i + size]) for i in (0, size)]
    sport = int.from_bytes(block[2 * size : 2 * size + 2], "big")
    dport = int.from_bytes(block[2 * size + 2 : 2 * size + 4], "big")
    src, dst = (str(ips[0]), sport), (str(ips[1]), dport)
    return ProxyHeader(2, "PROXY", _V2_NAMES[fam], src, dst, tlvs), total


def _v2_tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    out: list[tuple[int, bytes]] = []
    i = 0
    while i < len(data):
        if len(data) - i < 3:
            raise ProxyProtocolError("truncated v2 TLV")
        length = int.from_bytes(data[i + 1 : i + 3], "big")
        if i + 3 + length > len(data):
            raise ProxyProtocolError("v2 TLV overruns the header")
        out.append((data[i], bytes(data[i + 3 : i + 3 + length])))
        i += 3 + length
    return tuple(out)
