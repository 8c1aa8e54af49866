"""Parse the IPv4/IPv6 packets NFQUEUE hands over, and classify IMDS requests.

Only what attribution and the event need: the 5-tuple, TCP flags and the
transport payload (for the audit-mode IMDS version). Nothing here trusts the
packet: every length is checked, and a packet we cannot parse still gets an
event (``dport`` null) and, above all, a verdict.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from imdsguard.errors import PacketError as PacketError  # noqa: PLC0414 - raised here

IPPROTO_TCP = 6
IPPROTO_UDP = 17

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_ACK = 0x10

#: IPv6 extension headers that we step over to find TCP/UDP.
_V6_EXTENSIONS = frozenset({0, 43, 60})  # hop-by-hop, routing, destination options
_V6_FRAGMENT = 44
_V6_AH = 51

#: How many request bytes we look at to tell IMDSv1 from v2 (headers only).
MAX_REQUEST_BYTES = 8192

_METHODS = frozenset({b"GET", b"PUT", b"POST", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH"})
_TOKEN_HEADER = b"x-aws-ec2-metadata-token"
_TOKEN_PATH = b"/latest/api/token"


@dataclass(frozen=True)
class Packet:
    """The parts of one IP packet that matter to us.

    ``sport``/``dport`` are 0 and ``flags`` 0 for anything but TCP/UDP (or a
    non-first fragment).
    """

    family: str  # "ipv4" | "ipv6"
    proto: int
    src: str
    dst: str
    sport: int = 0
    dport: int = 0
    flags: int = 0
    seq: int = 0
    payload: bytes = b""

    @property
    def is_syn(self) -> bool:
        """A TCP connection request (SYN without ACK): the first packet of a connection."""
        return self.proto == IPPROTO_TCP and self.flags & (TCP_SYN | TCP_ACK) == TCP_SYN

    @property
    def is_close(self) -> bool:
        """A TCP FIN or RST: the connection ends."""
        return self.proto == IPPROTO_TCP and bool(self.flags & (TCP_FIN | TCP_RST))


def parse_packet(data: bytes) -> Packet:
    """Parse an IP packet (as NFQUEUE copies it: starting at the IP header)."""
    if not data:
        raise PacketError("empty packet")
    version = data[0] >> 4
    if version == 4:
        return _parse_v4(data)
    if version == 6:
        return _parse_v6(data)
    raise PacketError(f"IP version {version}")


def _parse_v4(data: bytes) -> Packet:
    if len(data) < 20:
        raise PacketError("truncated IPv4 header")
    ihl = (data[0] & 0x0F) * 4
    total = struct.unpack_from("!H", data, 2)[0]
    frag = struct.unpack_from("!H", data, 6)[0] & 0x1FFF
    proto = data[9]
    if ihl < 20 or len(data) < ihl:
        raise PacketError("bad IPv4 header length")
    src = str(ipaddress.IPv4Address(data[12:16]))
    dst = str(ipaddress.IPv4Address(data[16:20]))
    # A GSO packet's total length can be 0 or stale; trust what we were given then.
    end = total if ihl <= total <= len(data) else len(data)
    if frag:
        return Packet("ipv4", proto, src, dst)
    return _transport(Packet("ipv4", proto, src, dst), data[ihl:end])


def _parse_v6(data: bytes) -> Packet:
    if len(data) < 40:
        raise PacketError("truncated IPv6 header")
    plen = struct.unpack_from("!H", data, 4)[0]
    nxt = data[6]
    src = str(ipaddress.IPv6Address(data[8:24]))
    dst = str(ipaddress.IPv6Address(data[24:40]))
    end = 40 + plen if plen > 0 and 40 + plen <= len(data) else len(data)
    offset = 40
    for _ in range(8):  # a bounded walk over extension headers
        if nxt in _V6_EXTENSIONS or nxt == _V6_AH:
            if offset + 2 > end:
                break
            step = (data[offset + 1] + 2) * 4 if nxt == _V6_AH else (data[offset + 1] + 1) * 8
            nxt, offset = data[offset], offset + step
        elif nxt == _V6_FRAGMENT:
            if offset + 8 > end:
                break
            frag = struct.unpack_from("!H", data, offset + 2)[0] >> 3
            nxt, offset = data[offset], offset + 8
            if frag:
                return Packet("ipv6", nxt, src, dst)
        else:
            break
    return _transport(Packet("ipv6", nxt, src, dst), data[offset:end])


def _transport(ip: Packet, data: bytes) -> Packet:
    if ip.proto == IPPROTO_TCP and len(data) >= 20:
        sport, dport, seq = struct.unpack_from("!HHI", data)
        doff = (data[12] >> 4) * 4
        flags = data[13]
        payload = data[doff:] if 20 <= doff <= len(data) else b""
        return Packet(ip.family, ip.proto, ip.src, ip.dst, sport, dport, flags, seq, payload)
    if ip.proto == IPPROTO_UDP and len(data) >= 8:
        sport, dport = struct.unpack_from("!HH", data)
        return Packet(ip.family, ip.proto, ip.src, ip.dst, sport, dport, 0, 0, data[8:])
    return ip


def imds_version(request: bytes, complete: bool = False) -> str | None:
    """``v2``, ``v1`` or ``unknown`` for the start of a client's byte stream.

    ``v2``: the token request (``PUT /latest/api/token``) or any request
    carrying an ``X-aws-ec2-metadata-token`` header. ``v1``: an HTTP request
    whose headers are complete and carry no token. ``unknown``: not HTTP.
    None: cannot tell yet (headers incomplete); ``complete`` says no more
    bytes will come, which turns None into an answer. Only the header names
    are looked at: the token itself is never kept.
    """
    if not request:
        return "unknown" if complete else None
    line_end = request.find(b"\r\n")
    first = request if line_end < 0 else request[:line_end]
    parts = first.split(b" ")
    method = parts[0]
    if method not in _METHODS:
        if line_end < 0 and len(request) < 8 and any(m.startswith(request) for m in _METHODS):
            return "unknown" if complete else None
        return "unknown"
    if method == b"PUT" and len(parts) > 1 and parts[1].split(b"?")[0] == _TOKEN_PATH:
        return "v2"
    if line_end < 0:
        return "unknown" if complete or len(request) >= MAX_REQUEST_BYTES else None
    head_end = request.find(b"\r\n\r\n")
    head = request[line_end + 2 : head_end if head_end >= 0 else len(request)]
    for line in head.split(b"\r\n"):
        name, sep, _ = line.partition(b":")
        if sep and name.strip().lower() == _TOKEN_HEADER:
            return "v2"
    if head_end >= 0:
        return "v1"
    if complete or len(request) >= MAX_REQUEST_BYTES:
        return "unknown"
    return None
