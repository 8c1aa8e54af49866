"""Netlink framing: build and parse ``nlmsghdr`` messages and ``nlattr`` attributes.

Pure byte handling shared by the NFQUEUE and sock_diag clients. Headers are in
host byte order (netlink is a local protocol); attribute payloads are whatever
the subsystem says (nfnetlink uses network byte order for numbers).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLA_HDR = struct.Struct("=HH")  # len, type
NFGEN_HDR = struct.Struct("!BBH")  # family, version, res_id (big-endian)

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300

NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF

SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
SO_RCVBUFFORCE = 33


def align4(n: int) -> int:
    """``n`` rounded up to the netlink alignment (4 bytes)."""
    return (n + 3) & ~3


@dataclass(frozen=True)
class Message:
    """One parsed netlink message: header fields and the payload after the header."""

    type: int
    flags: int
    seq: int
    pid: int
    payload: bytes


def attr(kind: int, value: bytes) -> bytes:
    """One attribute (header, value, padding)."""
    length = NLA_HDR.size + len(value)
    return NLA_HDR.pack(length, kind) + value + b"\0" * (align4(length) - length)


def message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    """One netlink message with ``body`` (already padded attributes or a struct)."""
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), kind, flags, seq, 0) + body


def parse_messages(data: bytes) -> Iterator[Message]:
    """The messages in one datagram; stops at a truncated or malformed one."""
    offset = 0
    while offset + NLMSG_HDR.size <= len(data):
        length, kind, flags, seq, pid = NLMSG_HDR.unpack_from(data, offset)
        if length < NLMSG_HDR.size or offset + length > len(data):
            return
        yield Message(kind, flags, seq, pid, bytes(data[offset + NLMSG_HDR.size : offset + length]))
        offset += align4(length)


def parse_attrs(data: bytes, offset: int = 0) -> dict[int, bytes]:
    """Attributes from ``offset`` on, by type (flags masked off; the last one wins)."""
    result: dict[int, bytes] = {}
    while offset + NLA_HDR.size <= len(data):
        length, kind = NLA_HDR.unpack_from(data, offset)
        if length < NLA_HDR.size or offset + length > len(data):
            break
        result[kind & NLA_TYPE_MASK] = bytes(data[offset + NLA_HDR.size : offset + length])
        offset += align4(length)
    return result


def error_code(msg: Message) -> int:
    """The (positive) errno of an ``NLMSG_ERROR`` message; 0 is an acknowledgement."""
    if len(msg.payload) < 4:
        return 0
    (err,) = struct.unpack_from("=i", msg.payload)
    return -int(err)


def be32(attrs: dict[int, bytes], kind: int) -> int | None:
    """Attribute ``kind`` as a big-endian 32-bit number (nfnetlink's order), if present."""
    value = attrs.get(kind)
    return struct.unpack_from("!I", value)[0] if value is not None and len(value) >= 4 else None
