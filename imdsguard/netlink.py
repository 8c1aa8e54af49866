"""Netlink, in one place: constants, message framing, and the netfilter socket.

- Framing: build and parse ``nlmsghdr`` messages and ``nlattr`` attributes
  (pure byte handling, shared by the NFQUEUE, NFLOG and sock_diag clients and
  the broker's unix-socket peer lookup). Headers are in host byte order
  (netlink is a local protocol); attribute payloads are whatever the
  subsystem says (nfnetlink uses network byte order for numbers).
- :class:`NetfilterPacket`: a packet netfilter copied to us, with what the
  kernel knows of it; the queue and log clients each extend it.
- :class:`NetfilterSocket`: a ``NETLINK_NETFILTER`` socket reading one kind
  of packet message (the base of :class:`~imdsguard.events.nfqueue.NfQueue`
  and :class:`~imdsguard.events.nflog.NfLog`).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from imdsguard.errors import CaptureError

# Protocols (the third argument of socket(AF_NETLINK, SOCK_RAW, ...)).
NETLINK_SOCK_DIAG = 4
NETLINK_NETFILTER = 12

# sock_diag
SOCK_DIAG_BY_FAMILY = 20

# nfnetlink: the version in ``struct nfgenmsg``; the nftables multicast group.
NFNETLINK_V0 = 0
NFNLGRP_NFTABLES = 7

# Netfilter hooks, as a queued or logged packet names the one it was taken at.
NF_INET_FORWARD = 2
NF_INET_LOCAL_OUT = 3

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
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_NO_ENOBUFS = 5
SO_RCVBUFFORCE = 33

#: Receive buffer of a netfilter socket: a burst must not overflow it.
RCVBUF = 4 * 1024 * 1024


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


def nfgen(res_id: int, family: int = socket.AF_UNSPEC) -> bytes:
    """The ``struct nfgenmsg`` that starts every nfnetlink message (``res_id``: queue/group)."""
    return NFGEN_HDR.pack(family, NFNETLINK_V0, res_id)


@dataclass(frozen=True)
class NetfilterPacket:
    """A packet netfilter copied to us: the hook it was taken at, mark, owner, devices, bytes."""

    hook: int
    mark: int
    uid: int | None
    gid: int | None
    indev: int | None
    outdev: int | None
    payload: bytes


P = TypeVar("P", bound=NetfilterPacket)


class NetfilterSocket(Generic[P]):
    """A ``NETLINK_NETFILTER`` socket that reads one kind of packet message.

    Shared by :class:`~imdsguard.events.nfqueue.NfQueue` and
    :class:`~imdsguard.events.nflog.NfLog`: opening and tuning the socket,
    config requests that wait for their acknowledgement (keeping packets that
    arrive meanwhile), and non-blocking reads. ``parse`` turns a message into
    a packet or None.
    """

    def __init__(self, parse: Callable[[Message], P | None]) -> None:
        self._parse = parse
        self._seq = itertools.count(1)
        self._buf = bytearray(65536)
        self._backlog: list[P] = []  # packets that arrived while awaiting an ACK
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        except OSError as exc:
            raise CaptureError(f"cannot open a netfilter netlink socket: {exc}") from None
        try:
            self.sock.bind((0, 0))
            self._tune()
        except BaseException:
            self.sock.close()
            raise

    def _tune(self) -> None:
        # A burst must not overflow the socket: overflow drops packets (enforce: denied,
        # but unattributed). NO_ENOBUFS: an overrun is not an error for us to handle.
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        with contextlib.suppress(OSError):
            self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)

    def _request(self, data: bytes, what: str) -> None:
        """Send a config message and wait for its acknowledgement."""
        seq = NLMSG_HDR.unpack_from(data)[3]
        self.sock.settimeout(2.0)
        try:
            self.sock.send(data)
            while True:
                got = self.sock.recv(65536)
                for msg in parse_messages(got):
                    pkt = self._parse(msg)
                    if pkt is not None:
                        self._backlog.append(pkt)  # every held packet must get its verdict
                    elif msg.type == NLMSG_ERROR and msg.seq == seq:
                        err = error_code(msg)
                        if err:
                            raise OSError(err, os.strerror(err))
                        return
        except socket.timeout:
            raise CaptureError(f"no answer from the kernel to {what}") from None
        finally:
            self.sock.settimeout(None)

    def fileno(self) -> int:
        """For select()."""
        return self.sock.fileno()

    def receive(self) -> list[P]:
        """Packets waiting now (empty when none: the socket is non-blocking)."""
        if self._backlog:
            packets, self._backlog = self._backlog, []
            return packets
        try:
            n = self.sock.recv_into(self._buf)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                return []  # the kernel dropped some: nothing to answer for those
            raise
        packets = []
        for msg in parse_messages(bytes(memoryview(self._buf)[:n])):
            pkt = self._parse(msg)
            if pkt is not None:
                packets.append(pkt)
        return packets

    def _close(self, unbind: bytes) -> None:
        """Send ``unbind`` (best effort) and close."""
        try:
            self.sock.setblocking(True)
            self.sock.send(unbind)
        except OSError:
            pass
        self.sock.close()
