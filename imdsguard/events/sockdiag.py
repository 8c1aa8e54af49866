"""Find the socket behind a packet: ``sock_diag`` exact lookup (NETLINK_SOCK_DIAG).

Given the 5-tuple of a packet the kernel is holding for us, one request
returns the socket's inode and owner uid (``inet_diag_msg``), the same data
``ss -e`` shows. The inode is what ``/proc/<pid>/fd/*`` links point at
(``socket:[inode]``), which is how we get from a packet to a process.

Message layouts (``linux/inet_diag.h``)::

    struct inet_diag_req_v2 { u8 family, protocol, ext, pad; u32 states;
                              struct inet_diag_sockid id; }
    struct inet_diag_sockid { be16 sport, dport; be32 src[4], dst[4];
                              u32 if; u32 cookie[2]; }
    struct inet_diag_msg    { u8 family, state, timer, retrans;
                              struct inet_diag_sockid id;
                              u32 expires, rqueue, wqueue, uid, inode; }
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import socket
import struct
from dataclasses import dataclass

from imdsguard import netlink as nl
from imdsguard.events.packet import IPPROTO_TCP, IPPROTO_UDP

INET_DIAG_NOCOOKIE = 0xFFFFFFFF
ALL_STATES = 0xFFFFFFFF

_REQ = struct.Struct("=BBBxI")
_PORTS = struct.Struct("!HH")
_TAIL = struct.Struct("=III")  # if, cookie[0], cookie[1]
_MSG_TAIL = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode
SOCKID_SIZE = _PORTS.size + 32 + _TAIL.size

_FAMILIES = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}


@dataclass(frozen=True)
class SocketInfo:
    """What the kernel says about one socket."""

    inode: int
    uid: int
    state: int


def _addr16(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed.ljust(16, b"\0")


def build_request(
    family: str, proto: int, local: tuple[str, int], remote: tuple[str, int], seq: int = 1
) -> bytes:
    """An exact-lookup request for the socket ``local`` -> ``remote``.

    For TCP the kernel takes ``id.src`` as the local end; for UDP it passes
    ``src``/``dst`` to its lookup the other way round ("swapped for
    historical reasons", ``net/ipv4/udp_diag.c``), so we swap them too.
    """
    src, dst = (remote, local) if proto == IPPROTO_UDP else (local, remote)
    body = (
        _REQ.pack(_FAMILIES[family], proto, 0, ALL_STATES)
        + _PORTS.pack(src[1], dst[1])
        + _addr16(src[0])
        + _addr16(dst[0])
        + _TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    )
    return nl.message(nl.SOCK_DIAG_BY_FAMILY, nl.NLM_F_REQUEST, seq, body)


def parse_response(data: bytes, seq: int | None = None) -> SocketInfo | None:
    """The socket in a lookup answer; None for "no such socket" (or a stale answer)."""
    for msg in nl.parse_messages(data):
        if seq is not None and msg.seq != seq:
            continue
        if msg.type == nl.NLMSG_ERROR:
            return None
        if msg.type == nl.SOCK_DIAG_BY_FAMILY and len(msg.payload) >= 4 + SOCKID_SIZE + 20:
            state = msg.payload[1]
            _, _, _, uid, inode = _MSG_TAIL.unpack_from(msg.payload, 4 + SOCKID_SIZE)
            return SocketInfo(inode=inode, uid=uid, state=state)
    return None


class SockDiag:
    """A sock_diag netlink socket in the caller's network namespace.

    Not thread-safe: one per thread (the capture thread owns one).
    """

    def __init__(self, timeout: float = 0.05) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, nl.NETLINK_SOCK_DIAG)
        self._sock.bind((0, 0))
        self._sock.settimeout(timeout)
        self._seq = itertools.count(1)

    def lookup(
        self, family: str, proto: int, local: tuple[str, int], remote: tuple[str, int]
    ) -> SocketInfo | None:
        """The socket with this exact 5-tuple, or None (gone, or not TCP/UDP)."""
        if proto not in (IPPROTO_TCP, IPPROTO_UDP) or family not in _FAMILIES:
            return None
        seq = next(self._seq) & 0x7FFFFFFF
        self._sock.send(build_request(family, proto, local, remote, seq))
        for _ in range(4):  # skip answers to earlier requests that timed out
            try:
                data = self._sock.recv(8192)
            except socket.timeout:
                return None
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.EAGAIN):
                    return None
                raise
            if any(m.seq == seq for m in nl.parse_messages(data)):
                return parse_response(data, seq)
        return None

    def close(self) -> None:
        """Release the netlink socket."""
        self._sock.close()
