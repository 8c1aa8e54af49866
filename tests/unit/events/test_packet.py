"""Packet parsing (IPv4/IPv6, TCP/UDP) and IMDS version classification."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from imdsguard.events.packet import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_SYN,
    PacketError,
    imds_version,
    parse_packet,
)


def tcp(sport: int, dport: int, flags: int, payload: bytes = b"", seq: int = 1000) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 65535, 0, 0) + payload


def udp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def ipv4(src: str, dst: str, proto: int, l4: bytes, frag: int = 0) -> bytes:
    return (
        struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(l4), 1, frag, 64, proto, 0)
        + ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + l4
    )


def ipv6(src: str, dst: str, nxt: int, l4: bytes, ext: bytes = b"") -> bytes:
    return (
        struct.pack("!IHBB", 6 << 28, len(ext) + len(l4), nxt, 64)
        + ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + ext
        + l4
    )


def test_ipv4_tcp_syn() -> None:
    pkt = parse_packet(ipv4("192.0.2.1", "169.254.169.254", IPPROTO_TCP, tcp(40000, 80, TCP_SYN)))
    assert (pkt.family, pkt.proto, pkt.src, pkt.dst) == (
        "ipv4",
        IPPROTO_TCP,
        "192.0.2.1",
        "169.254.169.254",
    )
    assert (pkt.sport, pkt.dport, pkt.seq) == (40000, 80, 1000)
    assert pkt.is_syn and not pkt.is_close and pkt.payload == b""


def test_ipv4_tcp_payload_and_flags() -> None:
    req = b"GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n\r\n"
    pkt = parse_packet(ipv4("192.0.2.1", "169.254.169.254", 6, tcp(1, 80, TCP_ACK | 0x08, req)))
    assert pkt.payload == req
    assert not pkt.is_syn
    fin = parse_packet(ipv4("192.0.2.1", "169.254.169.254", 6, tcp(1, 80, TCP_ACK | TCP_FIN)))
    assert fin.is_close


def test_ipv4_trailing_padding_is_not_payload() -> None:
    raw = ipv4("192.0.2.1", "169.254.169.254", 6, tcp(1, 80, TCP_SYN)) + b"\0" * 6
    assert parse_packet(raw).payload == b""


def test_ipv4_non_first_fragment_has_no_ports() -> None:
    pkt = parse_packet(ipv4("192.0.2.1", "169.254.169.254", 6, b"x" * 24, frag=3))
    assert (pkt.sport, pkt.dport) == (0, 0)


def test_ipv4_udp() -> None:
    pkt = parse_packet(ipv4("192.0.2.1", "169.254.169.254", IPPROTO_UDP, udp(5353, 80, b"hi")))
    assert (pkt.proto, pkt.sport, pkt.dport, pkt.payload) == (IPPROTO_UDP, 5353, 80, b"hi")
    assert not pkt.is_syn


def test_ipv6_tcp_syn() -> None:
    pkt = parse_packet(ipv6("2001:db8::1", "fd00:ec2::254", IPPROTO_TCP, tcp(50000, 80, TCP_SYN)))
    assert (pkt.family, pkt.src, pkt.dst, pkt.sport, pkt.dport) == (
        "ipv6",
        "2001:db8::1",
        "fd00:ec2::254",
        50000,
        80,
    )
    assert pkt.is_syn


def test_ipv6_skips_extension_headers() -> None:
    hop_by_hop = bytes([60, 0]) + b"\0" * 6  # next: destination options, 8 bytes
    dest_opts = bytes([IPPROTO_TCP, 0]) + b"\0" * 6
    pkt = parse_packet(
        ipv6("2001:db8::1", "fd00:ec2::254", 0, tcp(1234, 80, TCP_SYN), hop_by_hop + dest_opts)
    )
    assert (pkt.proto, pkt.sport, pkt.dport) == (IPPROTO_TCP, 1234, 80)


def test_ipv6_fragment_header() -> None:
    first = bytes([IPPROTO_TCP, 0]) + struct.pack("!HI", 0x0001, 7)  # offset 0, more fragments
    pkt = parse_packet(ipv6("2001:db8::1", "fd00:ec2::254", 44, tcp(1, 80, TCP_SYN), first))
    assert pkt.dport == 80
    later = bytes([IPPROTO_TCP, 0]) + struct.pack("!HI", 100 << 3, 7)
    pkt = parse_packet(ipv6("2001:db8::1", "fd00:ec2::254", 44, b"x" * 20, later))
    assert pkt.dport == 0


@pytest.mark.parametrize(
    "raw",
    [b"", b"\x45\x00", b"\x60" + b"\0" * 10, b"\x10" + b"\0" * 40, b"\x41" + b"\0" * 30],
    ids=["empty", "short-v4", "short-v6", "version-1", "bad-ihl"],
)
def test_garbage_is_an_error(raw: bytes) -> None:
    with pytest.raises(PacketError):
        parse_packet(raw)


def test_truncated_tcp_header_gives_no_ports() -> None:
    pkt = parse_packet(ipv4("192.0.2.1", "169.254.169.254", 6, b"\x00\x50\x00"))
    assert pkt.dport == 0


TOKEN_PUT = b"PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n"
V2_GET = b"GET /latest/meta-data/ HTTP/1.1\r\nHost: h\r\nX-aws-ec2-metadata-token: AQAE==\r\n\r\n"
V1_GET = b"GET /latest/meta-data/ HTTP/1.1\r\nHost: h\r\nUser-Agent: curl\r\n\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        (TOKEN_PUT, "v2"),
        (TOKEN_PUT[:30], "v2"),  # the request line alone says it
        (V2_GET, "v2"),
        (V2_GET.replace(b"X-aws-ec2-metadata-token", b"x-AWS-EC2-METADATA-TOKEN"), "v2"),
        (V1_GET, "v1"),
        (V1_GET.replace(b"User-Agent", b"X-aws-ec2-metadata-token-ttl-seconds"), "v1"),
        (b"\x16\x03\x01\x02\x00", "unknown"),  # TLS
        (b"SSH-2.0-OpenSSH\r\n", "unknown"),
        (b"GET /x HTTP/1.1\r\nHost: h\r\n", None),  # headers not complete yet
        (b"GE", None),
        (b"", None),
    ],
)
def test_imds_version(request_bytes: bytes, expected: str | None) -> None:
    assert imds_version(request_bytes) == expected


def test_imds_version_complete_turns_undecided_into_an_answer() -> None:
    assert imds_version(b"", complete=True) == "unknown"
    assert imds_version(b"GET /x HTTP/1.1\r\nHost: h\r\n", complete=True) == "unknown"


def test_imds_version_gives_up_on_huge_headers() -> None:
    huge = b"GET /x HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 9000
    assert imds_version(huge) == "unknown"
